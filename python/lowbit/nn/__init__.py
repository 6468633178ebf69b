"""Drop-in replacements for nn.Linear that hold quantized weights."""

from .convert import quantize_module, replace_module
from .fp8_linear import Fp8Linear
from .gguf_linear import GGUFLinear
from .int8_dynamic import Int8DynamicLinear
from .int8_outlier import Int8OutlierLinear
from .nf4_linear import NF4Linear
from .packed_linear import PackedLinear

# lowbit's quantized layers: already quantized, never a target of a modifier again.
QUANTIZED_LINEAR_TYPES = (Fp8Linear, GGUFLinear, Int8DynamicLinear, Int8OutlierLinear, NF4Linear, PackedLinear)

__all__ = ["Fp8Linear", "GGUFLinear", "Int8DynamicLinear", "Int8OutlierLinear", "NF4Linear", "PackedLinear", "QUANTIZED_LINEAR_TYPES", "quantize_module",
           "replace_module"]
