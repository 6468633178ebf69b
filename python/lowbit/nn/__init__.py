"""Drop-in replacements for nn.Linear that hold quantized weights."""

from .convert import model_bytes, quantize_linears_
from .packed_linear import PackedLinear

__all__ = ["PackedLinear", "model_bytes", "quantize_linears_"]
