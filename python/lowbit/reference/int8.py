"""Reference LLM.int8() (Dettmers et al., 2022) in plain PyTorch, as bitsandbytes computes it:
row-wise int8 codes of float16 values, outlier columns (any |x| >= threshold) left out of the
int8 product and multiplied in floating point against the int8-dequantized weight."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

INV_SQUARE_127 = 6.200124e-05    # bitsandbytes' 1 / 127^2
INV_127 = 7.874015718698502e-3   # and its 1 / 127


def quantize_rowwise(x: Tensor, threshold: float = 0.0):
    """(codes int8 in x's shape, absmax float32 [rows], outlier column indices int64)."""
    a = x.reshape(-1, x.shape[-1]).to(torch.float16).float()
    cols = torch.empty(0, dtype=torch.int64)
    if threshold > 0:
        outliers = a.abs() >= threshold
        cols = torch.nonzero(outliers.any(0)).view(-1)
        a = a.masked_fill(outliers, 0.0)
    absmax = a.abs().amax(1)
    codes = torch.round(a * (127.0 / absmax)[:, None])
    codes = torch.where(absmax[:, None] > 0, codes, torch.zeros_like(codes))  # an all-zero row codes 0
    codes[:, cols] = 0
    return codes.to(torch.int8).view(x.shape), absmax, cols


def outlier_matmul(x: Tensor, w: Tensor, w_scale: Tensor, threshold: float, bias: Optional[Tensor] = None) -> Tensor:
    k = x.shape[-1]
    codes, absmax, cols = quantize_rowwise(x, threshold)
    acc = codes.reshape(-1, k).double() @ w.double().t()  # exact: every partial sum is an integer below 2^53
    scale = w_scale.reshape(-1).float()
    out = acc.float() * (absmax[:, None] * scale[None, :]) * INV_SQUARE_127
    if cols.numel():
        sub_w = w[:, cols].float() * scale[:, None] * INV_127
        out = out + x.reshape(-1, k)[:, cols].float() @ sub_w.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])


def dynamic_linear(x: Tensor, w: Tensor, w_scale: Tensor, bias: Optional[Tensor] = None,
                   input_scale: Optional[Tensor] = None) -> Tensor:
    """W8A8 (Int8DynamicLinear): x's tokens quantized symmetric int8 per token (compressed-tensors'
    min-max scale, codes may reach -128) or, given input_scale [1], with that static scale;
    times int8 w [out, in] exactly, rescaled by x_scale * w_scale [out, 1] in fp32 (+ bias),
    returned in x's dtype."""
    from . import quant

    k = x.shape[-1]
    x2d = x.reshape(-1, k)
    if input_scale is None:
        x_scale, _ = quant.quant_params(x2d, 8, True, k)
    else:
        x_scale = input_scale.reshape(1, 1).to(x.dtype).expand(x2d.shape[0], 1)
    codes = quant.quantize(x2d, x_scale, None, 8, k)
    acc = (codes.double() @ w.double().t()).float()  # exact: integers below 2^53
    y = acc * x_scale.float() * w_scale.float().t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], w.shape[0])
