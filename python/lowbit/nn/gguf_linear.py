"""GGUFLinear: a Linear whose weight is held as ggml blocks of one tensor type (Q4_0, Q4_K, ...),
the bytes a GGUF file stores; produced by the modifiers that quantize onto GGUF grids (GPTQ, AWQ,
round-to-nearest with an importance matrix) and written as they are by lowbit.save_gguf."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ggml, ops
from .frozen import check_features, frozen_linear


class GGUFLinear(nn.Module):
    """``blocks`` uint8 [out_features, row bytes] in ggml's `tensor_type` layout; the forward
    decodes them (lowbit's C++ decoder, ggml's arithmetic) and multiplies with ATen: a module to
    measure and export, not a fast kernel (llama.cpp runs the file)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tensor_type: str,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        check_features(in_features, out_features, bias, dtype)
        if tensor_type not in ggml.BLOCK or tensor_type in ggml.FLOAT_TYPES:
            raise ValueError(f"GGUFLinear holds ggml block types ({', '.join(t for t in ggml.BLOCK if t not in ggml.FLOAT_TYPES)}), "
                             f"not {tensor_type!r}")
        self.in_features, self.out_features, self.tensor_type = in_features, out_features, tensor_type
        self.register_buffer("blocks", torch.zeros(out_features, ggml.row_bytes(tensor_type, in_features),
                                                   dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, module: nn.Linear, tensor_type: str, importance: Optional[Tensor] = None) -> "GGUFLinear":
        """Round-to-nearest onto `tensor_type`'s blocks, exactly as ggml quantizes (weighted by
        importance, E[x^2] per input column, as llama.cpp uses an imatrix)."""
        return cls.from_blocks(module, tensor_type, ops.gguf_quantize(module.weight.detach(), tensor_type, importance))

    @classmethod
    def from_blocks(cls, module: nn.Linear, tensor_type: str, blocks: Tensor) -> "GGUFLinear":
        layer = cls(module.in_features, module.out_features, module.bias is not None, tensor_type,
                    dtype=module.weight.dtype)
        if blocks.shape != layer.blocks.shape or blocks.dtype != torch.uint8:
            raise ValueError(f"{tensor_type} blocks of a [{module.out_features}, {module.in_features}] weight are uint8 "
                             f"{list(layer.blocks.shape)}, got {blocks.dtype} {list(blocks.shape)}")
        layer.blocks.copy_(blocks)
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return ops.gguf_dequantize(self.blocks, self.tensor_type, self.in_features, dtype)

    def quantized_matmul(self, x: Tensor, bias: Optional[Tensor]) -> Tensor:
        return nn.functional.linear(x, self.dequantized_weight(x.dtype), None if bias is None else bias.to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(self, x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.tensor_type}"
