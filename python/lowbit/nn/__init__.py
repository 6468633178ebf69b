"""Drop-in replacements for nn.Linear that hold quantized weights."""

from .packed_linear import PackedLinear

__all__ = ["PackedLinear"]
