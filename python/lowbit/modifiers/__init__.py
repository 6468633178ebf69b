"""Recipe steps (llmcompressor's modifiers)."""

from .base import Modifier
from .quantization import QuantizationModifier

# Names a YAML recipe may use.
MODIFIERS = {cls.__name__: cls for cls in (QuantizationModifier,)}

__all__ = ["MODIFIERS", "Modifier", "QuantizationModifier"]
