"""Typed wrappers over the C++ ops (torch.ops.lowbit.*), with fake (meta) kernels for
torch.compile. These check nothing beyond what the kernels check: user-facing validation
lives in lowbit.functional."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_ops = torch.ops.lowbit


def quant_params(
    w: Tensor, bits: int, symmetric: bool, group_size: int,
    observer: str = "minmax", maxshrink: float = 0.8, grid: int = 100, norm: float = 2.4,
) -> Tuple[Tensor, Tensor]:
    """w [rows, cols] float -> (scale [rows, cols/group_size] in w.dtype, zero_point int8 same shape)."""
    return _ops.quant_params(w, bits, symmetric, group_size, observer, maxshrink, grid, norm)


def quantize(w: Tensor, scale: Tensor, zero_point: Optional[Tensor], bits: int, group_size: int) -> Tensor:
    """w [rows, cols] float -> int8 codes [rows, cols] in [-2^(bits-1), 2^(bits-1)-1]."""
    return _ops.quantize(w, scale, zero_point, bits, group_size)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Optional[Tensor], group_size: int,
               dtype: torch.dtype) -> Tensor:
    """int8 codes [rows, cols] -> (codes - zero_point) * scale as `dtype`."""
    return _ops.dequantize(codes, scale, zero_point, group_size, dtype)


def fake_quantize(w: Tensor, scale: Tensor, zero_point: Optional[Tensor], bits: int, group_size: int) -> Tensor:
    """w [rows, cols] float -> dequantize(quantize(w)) in one pass, w.dtype."""
    return _ops.fake_quantize(w, scale, zero_point, bits, group_size)


def pack(codes: Tensor, bits: int) -> Tensor:
    """int8 codes [rows, cols] -> int32 [rows, ceil(cols * bits / 32)]."""
    return _ops.pack(codes, bits)


def unpack(packed: Tensor, bits: int, cols: int) -> Tensor:
    """int32 [rows, ceil(cols * bits / 32)] -> int8 codes [rows, cols]."""
    return _ops.unpack(packed, bits, cols)


def packed_linear(x: Tensor, packed: Tensor, scale: Tensor, zero_point: Optional[Tensor], bits: int,
                  group_size: int, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., in] float, packed int32 [out, ceil(in*bits/32)], scale [out, in/group_size],
    zero_point int8 [out, in/group_size] or None -> [..., out] in x.dtype."""
    return _ops.packed_linear(x, packed, scale, zero_point, bits, group_size, bias)


def awq_channel_stats_(sum_abs: Tensor, inputs: Tensor, count: int) -> int:
    """sum_abs (float64 [cols]) += sum of |inputs| over its rows, in place; returns rows seen so far."""
    return _ops.awq_channel_stats_(sum_abs, inputs, count)


def awq_gram_factor(gram: Tensor) -> Tensor:
    """Lower Cholesky factor L of a Gram matrix, G = L L^T (jittered if G is singular; all NaN
    if G holds NaN or Inf)."""
    return _ops.awq_gram_factor(gram)


def awq_scale_loss(weight: Tensor, gram_factor: Tensor, scales: Tensor, bits: int, group_size: int,
                   symmetric: bool) -> float:
    """||D L||^2 = sum((D G) * D) for D = W - Q(W * s) / s: the output error of one AWQ grid
    point; gram_factor is awq_gram_factor(G)."""
    return _ops.awq_scale_loss(weight, gram_factor, scales, bits, group_size, symmetric)


def awq_clip(weight: Tensor, gram: Tensor, bits: int, group_size: int, symmetric: bool, n_grid: int,
             max_shrink: float) -> Tensor:
    """The AWQ clip search's bound for each (row, group): float32 [rows, groups]."""
    return _ops.awq_clip(weight, gram, bits, group_size, symmetric, n_grid, max_shrink)


def nf4_quantize(weight: Tensor, blocksize: int, quant_type: str) -> Tuple[Tensor, Tensor]:
    """bitsandbytes' blockwise 4-bit quantization: (packed uint8 [(n+1)//2, 1], absmax fp32 [blocks])."""
    return _ops.nf4_quantize(weight, blocksize, quant_type)


def nf4_dequantize(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str, numel: int,
                   dtype: torch.dtype) -> Tensor:
    """code[nibble] * absmax[block] in fp32, cast to dtype: a flat tensor of numel elements."""
    return _ops.nf4_dequantize(packed, absmax, blocksize, quant_type, numel, dtype)


def nf4_linear(x: Tensor, packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str, out_features: int,
               bias: Optional[Tensor] = None, nested_absmax: Optional[Tensor] = None,
               nested_code: Optional[Tensor] = None, offset: Optional[Tensor] = None) -> Tensor:
    """x [..., in] @ W^T (+ bias) for W [out_features, in] stored as NF4 / FP4 codes -> x.dtype.
    absmax: fp32, or uint8 codes into nested_code (double quantization) decoded in the loop as
    nested_code[q] * nested_absmax[block // 256] + offset."""
    return _ops.nf4_linear(x, packed, absmax, blocksize, quant_type, out_features, bias, nested_absmax, nested_code,
                           offset)


def blockwise8_quantize(values: Tensor, code: Tensor, blocksize: int) -> Tuple[Tensor, Tensor]:
    """bitsandbytes' CPU 8-bit blockwise quantization: (codes uint8 [n], absmax fp32 [blocks])."""
    return _ops.blockwise8_quantize(values, code, blocksize)


def blockwise8_dequantize(codes: Tensor, absmax: Tensor, code: Tensor, blocksize: int) -> Tensor:
    """code[codes] * absmax[block], float32 [n]."""
    return _ops.blockwise8_dequantize(codes, absmax, code, blocksize)


def int8_quantize_rowwise(x: Tensor, threshold: float) -> Tuple[Tensor, Tensor, Tensor]:
    """LLM.int8()'s vector-wise quantization of x's rows (from float16 values): (codes int8 in
    x's shape, absmax float32 [rows], outlier column indices int64), outlier columns (any
    |x| >= threshold, threshold > 0) left out of the absmax and coded 0."""
    return _ops.int8_quantize_rowwise(x, threshold)


def int8_matmul(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] @ b [N, K]^T for int8 a, b -> int32 [M, N] (AVX512-VNNI where present)."""
    return _ops.int8_matmul(a, b)


def int8_outlier_matmul(x: Tensor, w: Tensor, w_scale: Tensor, threshold: float,
                        bias: Optional[Tensor] = None) -> Tensor:
    """LLM.int8()'s decomposed x @ dequant(w)^T (+ bias) for int8 w [out, in] with row scales
    w_scale [out] (bitsandbytes' SCB) -> x.dtype."""
    return _ops.int8_outlier_matmul(x, w, w_scale, threshold, bias)


def gptq_hessian_(hessian: Tensor, inputs: Tensor, num_samples: int, mirror: bool = True) -> int:
    """Update the fp32 [cols, cols] running average of 2 x^T x in place with inputs [..., cols]
    (upper triangle only unless mirror); returns the number of samples so far."""
    return _ops.gptq_hessian_(hessian, inputs, num_samples, mirror)


def hessian_mirror_(hessian: Tensor) -> Tensor:
    """Copy the upper triangle of a square fp32 matrix onto its lower one, in place."""
    return _ops.hessian_mirror_(hessian)


def gptq_solve(weight: Tensor, hessian: Tensor, perm: Tensor, scale: Tensor, zero_point: Tensor, col_group: Tensor,
               bits: int, block_size: int, dampening_frac: float) -> Tuple[Tensor, Tensor, float, float]:
    """weight [rows, cols] in processing order perm (int64 [cols]), hessian [cols, cols] in the
    original order, scale / zero_point [rows, groups], col_group int64 [cols] -> (codes int8,
    updated weight fp32, loss, damping fraction used or -1 when RTN was applied)."""
    return _ops.gptq_solve(weight, hessian, perm, scale, zero_point, col_group, bits, block_size, dampening_frac)


@torch.library.register_fake("lowbit::quant_params")
def _(w, bits, symmetric, group_size, observer="minmax", maxshrink=0.8, grid=100, norm=2.4):
    shape = (w.shape[0], w.shape[1] // group_size)
    return w.new_empty(shape), w.new_empty(shape, dtype=torch.int8)


@torch.library.register_fake("lowbit::quantize")
def _(w, scale, zero_point, bits, group_size):
    return torch.empty_like(w, dtype=torch.int8)


@torch.library.register_fake("lowbit::dequantize")
def _(codes, scale, zero_point, group_size, dtype):
    return torch.empty_like(codes, dtype=dtype)


@torch.library.register_fake("lowbit::fake_quantize")
def _(w, scale, zero_point, bits, group_size):
    return torch.empty_like(w)


@torch.library.register_fake("lowbit::pack")
def _(codes, bits):
    return codes.new_empty((codes.shape[0], (codes.shape[1] * bits + 31) // 32), dtype=torch.int32)


@torch.library.register_fake("lowbit::unpack")
def _(packed, bits, cols):
    return packed.new_empty((packed.shape[0], cols), dtype=torch.int8)


@torch.library.register_fake("lowbit::packed_linear")
def _(x, packed, scale, zero_point, bits, group_size, bias):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.register_fake("lowbit::nf4_linear")
def _(x, packed, absmax, blocksize, quant_type, out_features, bias, nested_absmax=None, nested_code=None, offset=None):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake("lowbit::int8_quantize_rowwise")
def _(x, threshold):
    rows = x.numel() // x.shape[-1]
    cols = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((cols,), dtype=torch.int64))


@torch.library.register_fake("lowbit::int8_matmul")
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@torch.library.register_fake("lowbit::int8_outlier_matmul")
def _(x, w, w_scale, threshold, bias):
    return x.new_empty((*x.shape[:-1], w.shape[0]))
