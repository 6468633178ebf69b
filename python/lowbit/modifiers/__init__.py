"""Recipe steps (llmcompressor's modifiers)."""

from .awq import AWQMapping, AWQModifier
from .base import Modifier
from .bnb import BNB_PRESETS, BnB4bitModifier, BnB4bitScheme
from .gptq import GPTQModifier
from .quantization import QuantizationModifier

# Names a YAML recipe may use.
MODIFIERS = {cls.__name__: cls for cls in (QuantizationModifier, GPTQModifier, AWQModifier, BnB4bitModifier)}

__all__ = ["AWQMapping", "AWQModifier", "BNB_PRESETS", "BnB4bitModifier", "BnB4bitScheme", "MODIFIERS", "GPTQModifier", "Modifier", "QuantizationModifier"]
