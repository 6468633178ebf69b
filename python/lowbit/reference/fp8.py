"""Reference FP8 (E4M3 / E5M2) quantization in plain PyTorch, with torch's own float8 dtypes, as
compressed-tensors' float-quantized format computes it (same signatures as lowbit.ops).

A [rows, cols] tensor is cut into block_rows x block_cols tiles (partial tiles at the edges);
element (i, j) takes scale[i // block_rows, j // block_cols]. scale = absmax / max of its tile
in x's dtype (0 -> finfo(dtype).eps); code = clamp(x / scale, -max, max).to(float8) with x /
scale in fp32; value = float(code) * scale in fp32."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
MAX = {"e4m3": 448.0, "e5m2": 57344.0}


def per_element(scale: Tensor, rows: int, cols: int, block_rows: int, block_cols: int) -> Tensor:
    """The scale of each element, [rows, cols]."""
    return scale[torch.arange(rows) // block_rows][:, torch.arange(cols) // block_cols]


def scales(x: Tensor, block_rows: int, block_cols: int, format: str = "e4m3") -> Tensor:
    rows, cols = x.shape
    br, bc = min(block_rows, max(rows, 1)), min(block_cols, max(cols, 1))  # the same tiles
    sr, sc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros(sr * br, sc * bc, dtype=x.dtype)
    padded[:rows, :cols] = x.abs()
    absmax = padded.reshape(sr, br, sc, bc).amax((1, 3))
    s = absmax / torch.tensor(MAX[format], dtype=x.dtype)  # in x's dtype, as compressed-tensors divides
    return torch.where(s == 0, torch.tensor(torch.finfo(x.dtype).eps, dtype=x.dtype), s)


def quantize(x: Tensor, scale: Tensor, block_rows: int, block_cols: int, format: str = "e4m3") -> Tensor:
    s = per_element(scale.float(), *x.shape, block_rows, block_cols)
    return torch.clamp(x.float() / s, -MAX[format], MAX[format]).to(FORMATS[format])


def dequantize(q: Tensor, scale: Tensor, block_rows: int, block_cols: int, dtype: torch.dtype) -> Tensor:
    return (q.float() * per_element(scale.float(), *q.shape, block_rows, block_cols)).to(dtype)


def fake_quantize(x: Tensor, scale: Tensor, block_rows: int, block_cols: int, format: str = "e4m3") -> Tensor:
    return dequantize(quantize(x, scale, block_rows, block_cols, format), scale, block_rows, block_cols, x.dtype)


def linear(x: Tensor, weight: Tensor, weight_scale: Tensor, block_rows: int, block_cols: int,
           bias: Optional[Tensor] = None) -> Tensor:
    """x [..., in] @ dequantize(weight)^T (+ bias) in fp32, returned in x's dtype."""
    w = dequantize(weight, weight_scale, block_rows, block_cols, torch.float32)
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)
