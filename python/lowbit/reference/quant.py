"""Reference integer quantization, packing and packed linear (same signatures as lowbit.ops)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _range(bits: int):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _params(lo: Tensor, hi: Tensor, bits: int, symmetric: bool, dtype: torch.dtype):
    qmin, qmax = _range(bits)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    if symmetric:
        scale = torch.maximum(-lo, hi) / ((qmax - qmin) / 2)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = scale.to(dtype).float()
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(dtype).eps), scale)
    zero = torch.zeros_like(scale) if symmetric else torch.round(torch.clamp(qmin - lo / scale, qmin, qmax))
    return scale, zero


def _fake(x: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    qmin, qmax = _range(bits)
    return (torch.round(torch.clamp(x / scale + zero, qmin, qmax)) - zero) * scale


def quant_params(w, bits, symmetric, group_size, observer="minmax", maxshrink=0.8, grid=100, norm=2.4,
                 importance=None):
    rows, cols = w.shape
    x = w.float().reshape(rows, cols // group_size, group_size)
    lo, hi = x.amin(-1), x.amax(-1)
    scale, zero = _params(lo, hi, bits, symmetric, w.dtype)
    if observer in ("mse", "imatrix_mse"):
        weight = 1.0 if importance is None else importance.float().reshape(cols // group_size, group_size)

        def error(s, z):
            d = _fake(x, s[..., None], z[..., None], bits) - x
            return ((d * d if norm == 2.0 else d.abs().pow(norm)) * weight).sum(-1)

        best = error(scale, zero)
        for i in range(1, int(maxshrink * grid)):
            p = 1 - i / grid
            s, z = _params(p * lo, p * hi, bits, symmetric, w.dtype)
            err = error(s, z)
            better = err < best
            best = torch.where(better, err, best)
            scale, zero = torch.where(better, s, scale), torch.where(better, z, zero)
    return scale.to(w.dtype), zero.to(torch.int8)


def _per_column(t: Tensor, group_size: int) -> Tensor:
    return t.float().repeat_interleave(group_size, dim=1)


def quantize(w, scale, zero_point, bits, group_size):
    qmin, qmax = _range(bits)
    z = _per_column(zero_point, group_size) if zero_point is not None else 0.0
    q = torch.round(torch.clamp(w.float() / _per_column(scale, group_size) + z, qmin, qmax))
    return q.to(torch.int8)


def dequantize(codes, scale, zero_point, group_size, dtype):
    z = _per_column(zero_point, group_size) if zero_point is not None else 0.0
    return ((codes.float() - z) * _per_column(scale, group_size)).to(dtype)


def fake_quantize(w, scale, zero_point, bits, group_size):
    return dequantize(quantize(w, scale, zero_point, bits, group_size), scale, zero_point, group_size, w.dtype)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Dense little-endian bit stream per row: code i at bit i*bits, stored as q + 2^(bits-1)."""
    rows, cols = codes.shape
    words = (cols * bits + 31) // 32
    u = (codes.to(torch.int64) + 2 ** (bits - 1))
    start = torch.arange(cols) * bits
    word, offset = start // 32, start % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    out.index_add_(1, word, (u << offset) & 0xFFFFFFFF)
    spill = u >> (32 - offset)  # the high bits of a code that crosses into the next word
    out.index_add_(1, word + 1, torch.where(offset + bits > 32, spill, torch.zeros_like(spill)))
    out = out[:, :words]
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack(packed: Tensor, bits: int, cols: int) -> Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF
    words = torch.cat([words, torch.zeros(words.shape[0], 1, dtype=torch.int64)], dim=1)
    start = torch.arange(cols) * bits
    word, offset = start // 32, start % 32
    value = (words[:, word] >> offset) | (words[:, word + 1] << (32 - offset))
    return ((value & (2**bits - 1)) - 2 ** (bits - 1)).to(torch.int8)


def packed_linear(x, packed, scale, zero_point: Optional[Tensor], bits, group_size, bias=None):
    in_features = x.shape[-1]
    w = dequantize(unpack(packed, bits, in_features), scale, zero_point, group_size, torch.float32)
    y = x.float() @ w.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
