"""Recipe steps (llmcompressor's modifiers)."""

from .awq import AWQMapping, AWQModifier
from .base import Modifier
from .bnb import BNB_PRESETS, BnB4bitModifier, BnB4bitScheme
from .gptq import GPTQModifier
from .imatrix import IMatrixGatherer
from .llm_int8 import LLMInt8Modifier, LLMInt8Scheme
from .mixed_precision import Allocation, Budget, MixedPrecision, allocate
from .quantization import QuantizationModifier
from .sensitivity import SensitivityGatherer, SensitivityReport
from .smoothquant import SmoothQuantMapping, SmoothQuantModifier

# Names a YAML recipe may use.
MODIFIERS = {cls.__name__: cls for cls in (QuantizationModifier, GPTQModifier, AWQModifier, BnB4bitModifier, LLMInt8Modifier,
                                           IMatrixGatherer, SmoothQuantModifier, MixedPrecision, SensitivityGatherer)}

__all__ = ["Allocation", "AWQMapping", "AWQModifier", "Budget", "MixedPrecision", "SensitivityGatherer",
           "SensitivityReport", "allocate", "BNB_PRESETS", "BnB4bitModifier", "BnB4bitScheme", "MODIFIERS", "GPTQModifier", "IMatrixGatherer", "LLMInt8Modifier", "LLMInt8Scheme", "Modifier", "QuantizationModifier", "SmoothQuantMapping", "SmoothQuantModifier"]
