"""Recipe steps (llmcompressor's modifiers)."""

from .awq import AWQMapping, AWQModifier
from .base import Modifier
from .gptq import GPTQModifier
from .quantization import QuantizationModifier

# Names a YAML recipe may use.
MODIFIERS = {cls.__name__: cls for cls in (QuantizationModifier, GPTQModifier, AWQModifier)}

__all__ = ["AWQMapping", "AWQModifier", "MODIFIERS", "GPTQModifier", "Modifier", "QuantizationModifier"]
