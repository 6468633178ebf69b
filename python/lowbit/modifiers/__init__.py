"""Recipe steps (llmcompressor's modifiers)."""

from .base import Modifier
from .gptq import GPTQModifier
from .quantization import QuantizationModifier

# Names a YAML recipe may use.
MODIFIERS = {cls.__name__: cls for cls in (QuantizationModifier, GPTQModifier)}

__all__ = ["MODIFIERS", "GPTQModifier", "Modifier", "QuantizationModifier"]
