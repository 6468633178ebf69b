"""Drop-in replacements for nn.Linear that hold quantized weights."""

from .convert import quantize_module, replace_module
from .int8_dynamic import Int8DynamicLinear
from .packed_linear import PackedLinear

__all__ = ["Int8DynamicLinear", "PackedLinear", "quantize_module", "replace_module"]
