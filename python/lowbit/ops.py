"""Typed wrappers over the C++ ops (torch.ops.lowbit.*), with fake (meta) kernels for
torch.compile. These check nothing beyond what the kernels check: user-facing validation
lives in lowbit.functional.

Every C++ kernel validates its own arguments (ValueError / TypeError), so a direct call cannot
crash. The fake kernels below run for FakeTensors (torch.compile) and meta tensors; they check
that all tensor arguments share one device (a meta tensor mixed with CPU ones would otherwise
dispatch here and return uninitialised memory) and the cheap shape preconditions, with
``torch._check_value`` so that symbolic shapes work."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

_ops = torch.ops.lowbit


def quant_params(
    w: Tensor, bits: int, symmetric: bool, group_size: int,
    observer: str = "minmax", maxshrink: float = 0.8, grid: int = 100, norm: float = 2.4,
    importance: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """w [rows, cols] float -> (scale [rows, cols/group_size] in w.dtype, zero_point int8 same shape).
    observer "imatrix_mse" weighs each column's error by importance [cols]."""
    return _ops.quant_params(w, bits, symmetric, group_size, observer, maxshrink, grid, norm, importance)


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
    # the overload itself: the packet's lookup costs about half a microsecond every call
    return _ops.packed_linear.default(x, packed, scale, zero_point, bits, group_size, bias)


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
    return _ops.nf4_linear.default(x, packed, absmax, blocksize, quant_type, out_features, bias, nested_absmax,
                                   nested_code, offset)


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


def int8_dynamic_linear(x: Tensor, w: Tensor, w_scale: Tensor, input_scale: Optional[Tensor] = None,
                        bias: Optional[Tensor] = None) -> Tensor:
    """W8A8: x [..., in] quantized symmetric int8 per token (compressed-tensors' min-max scale,
    in x's dtype) or with the static input_scale [1], times int8 w [out, in], rescaled by x_scale *
    w_scale [out, 1] in fp32 (+ bias) -> [..., out] in x.dtype."""
    return _ops.int8_dynamic_linear.default(x, w, w_scale, input_scale, bias)


def gptq_hessian_(hessian: Tensor, inputs: Tensor, num_samples: int, mirror: bool = True) -> int:
    """Update the fp32 [cols, cols] running average of 2 x^T x in place with inputs [..., cols]
    (upper triangle only unless mirror); returns the number of samples so far."""
    return _ops.gptq_hessian_(hessian, inputs, num_samples, mirror)


def hessian_mirror_(hessian: Tensor) -> Tensor:
    """Copy the upper triangle of a square fp32 matrix onto its lower one, in place."""
    return _ops.hessian_mirror_(hessian)


def gptq_solve(weight: Tensor, hessian: Tensor, perm: Tensor, scale: Tensor, zero_point: Tensor, col_group: Tensor,
               bits: int, block_size: int, dampening_frac: float, grid: str = "int") -> Tuple[Tensor, Tensor, float, float]:
    """weight [rows, cols] in processing order perm (int64 [cols]), hessian [cols, cols] in the
    original order, scale / zero_point [rows, groups] (zero_point integer, or float32 for a
    fractional offset), col_group int64 [cols] -> (codes int8,
    updated weight fp32, loss, damping fraction used or -1 when RTN was applied). grid "e4m3":
    the FP8 grid, codes are E4M3 bytes (view them as torch.float8_e4m3fn)."""
    return _ops.gptq_solve(weight, hessian, perm, scale, zero_point, col_group, bits, block_size, dampening_frac,
                           grid)


def fp8_scales(x: Tensor, block_rows: int, block_cols: int, format: str = "e4m3") -> Tensor:
    """x [rows, cols] float -> FP8 scales absmax / max of each block_rows x block_cols tile (0 ->
    finfo(x.dtype).eps), [ceil(rows / block_rows), ceil(cols / block_cols)] in x.dtype. format:
    "e4m3" (max 448) or "e5m2" (max 57344)."""
    return _ops.fp8_scales(x, block_rows, block_cols, format)


def fp8_quantize(x: Tensor, scale: Tensor, block_rows: int, block_cols: int, format: str = "e4m3") -> Tensor:
    """x [rows, cols] float -> float8_e4m3fn / float8_e5m2 codes clamp(x / scale, -max, max), round
    to nearest even, element (i, j) scaled by scale[i // block_rows, j // block_cols]."""
    return _ops.fp8_quantize(x, scale, block_rows, block_cols, format)


def fp8_dequantize(q: Tensor, scale: Tensor, block_rows: int, block_cols: int, dtype: torch.dtype) -> Tensor:
    """FP8 codes [rows, cols] -> float(q) * scale (fp32) as `dtype`."""
    return _ops.fp8_dequantize(q, scale, block_rows, block_cols, dtype)


def fp8_fake_quantize(x: Tensor, scale: Tensor, block_rows: int, block_cols: int, format: str = "e4m3") -> Tensor:
    """x [rows, cols] float -> fp8_dequantize(fp8_quantize(x)) in one pass, x.dtype."""
    return _ops.fp8_fake_quantize(x, scale, block_rows, block_cols, format)


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, block_rows: int, block_cols: int,
               bias: Optional[Tensor] = None) -> Tensor:
    """x [..., in] float @ dequant(weight)^T (+ bias) for an FP8 weight [out, in] with scales
    [ceil(out / block_rows), ceil(in / block_cols)] -> [..., out] in x.dtype."""
    return _ops.fp8_linear(x, weight, weight_scale, block_rows, block_cols, bias)


def gguf_quantize(weight: Tensor, type: str, importance: Optional[Tensor] = None) -> Tensor:
    """weight [rows, cols] float -> uint8 [rows, row_bytes] in the GGUF block format `type` (Q8_0,
    Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K; case-insensitive; cols a multiple of
    the type's 32- or 256-value block): the bytes of ggml's ggml_quantize_chunk, its reference
    quantizers without importance, its importance-weighted ones with importance (llama.cpp's
    imatrix: float32 [cols], one value per input column; Q8_0 ignores it)."""
    return _ops.gguf_quantize(weight, type, importance)


def gguf_dequantize(blocks: Tensor, type: str, cols: int, dtype: torch.dtype) -> Tensor:
    """GGUF blocks uint8 [rows, row_bytes] -> [rows, cols] as ggml's dequantize_row_* computes it
    (float32), cast to dtype."""
    return _ops.gguf_dequantize(blocks, type, cols, dtype)


def gguf_grid(blocks: Tensor, type: str, cols: int) -> Tuple[Tensor, Tensor]:
    """The affine grid of each sub-block of GGUF blocks: (scale, offset) float32 [rows, cols // sub]
    (sub 16 for Q2_K / Q3_K / Q6_K, else 32) such that each dequantized value is exactly
    scale * q + offset for its unsigned code q in [0, 2^bits - 1] (Q8_0: q = int8 + 128)."""
    return _ops.gguf_grid(blocks, type, cols)


def gguf_encode(codes: Tensor, blocks: Tensor, type: str) -> Tensor:
    """A copy of the GGUF blocks uint8 [rows, row_bytes] with every element's code replaced by
    codes (uint8 [rows, cols], gguf_grid's unsigned convention); d, dmin and the sub-block scales
    are kept."""
    return _ops.gguf_encode(codes, blocks, type)


def channel_range_(mins: Tensor, maxs: Tensor, x: Tensor) -> None:
    """SmoothQuant's statistic: mins / maxs (float32 [C]) become the running per-channel minimum /
    maximum over the tokens of x [..., C], in place."""
    _ops.channel_range_(mins, maxs, x)


# ---------------------------------------------------------------- fake (meta) kernels
# Ops without a fake kernel, and why (tests/test_raw_ops.py walks torch.ops.lowbit and requires
# every other op to have one). Their Meta kernel (below) raises ValueError.
NO_FAKE = {
    "awq_scale_loss": "returns a Python float computed from the data",
    "gptq_solve": "returns the loss and the damping used, Python floats computed from the data",
}


def _meta_refusal(name: str):
    def kernel(*args, **kwargs):
        raise ValueError(
            f"lowbit::{name} runs on CPU tensors only (it {NO_FAKE[name]}, so it has no meta / fake kernel); "
            "all tensors must be on the same device (cpu), got meta tensors"
        )
    return kernel


for _name in NO_FAKE:
    torch.library.impl(f"lowbit::{_name}", "Meta")(_meta_refusal(_name))

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_FLOATING = _FLOATS + (torch.float64,)


def _same_device(op: str, **tensors) -> None:
    """All tensor arguments on one device: a meta tensor mixed with CPU ones dispatches to the
    fake kernel, which must raise rather than return uninitialised memory."""
    present = [(name, t) for name, t in tensors.items() if t is not None]
    for name, t in present[1:]:
        if t.device != present[0][1].device:
            raise ValueError(
                f"lowbit::{op}: all tensors must be on the same device, but {name} is on {t.device} and "
                f"{present[0][0]} on {present[0][1].device}"
            )


def _check(op: str, cond, msg: str) -> None:
    torch._check_value(cond, lambda: f"lowbit::{op}: {msg}")


def _dtype(op: str, t: Tensor, name: str, allowed) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"lowbit::{op}: {name} must be one of {names}, got {t.dtype}")


def _integral(op: str, t: Tensor, name: str) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"lowbit::{op}: {name} must be an integer tensor, got {t.dtype}")


def _dim(op: str, t: Tensor, dim: int, name: str) -> None:
    if t.dim() != dim:
        raise ValueError(f"lowbit::{op}: {name} must be {dim}-D, got shape {tuple(t.shape)}")


def _bits(op: str, bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"lowbit::{op}: bits must be in 2..8, got {bits}")


def _blocksize(op: str, blocksize: int) -> None:
    if not (32 <= blocksize <= 4096 and blocksize & (blocksize - 1) == 0):
        raise ValueError(f"lowbit::{op}: blocksize must be a power of two from 32 to 4096, got {blocksize}")


def _quant_type(op: str, quant_type: str) -> None:
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"lowbit::{op}: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _groups(op: str, w: Tensor, group_size: int, name: str = "weight"):
    _dim(op, w, 2, name)
    if group_size <= 0:
        raise ValueError(f"lowbit::{op}: group_size must be positive, got {group_size}")
    _check(op, w.shape[1] % group_size == 0, f"group_size {group_size} must divide the {w.shape[1]} columns")
    return w.shape[1] // group_size


def _params(op: str, rows, groups, scale: Tensor, zero_point: Optional[Tensor]) -> None:
    _dtype(op, scale, "scale", _FLOATS)
    _dim(op, scale, 2, "scale")
    _check(op, scale.shape[0] == rows, f"scale must be [{rows}, {groups}], got {tuple(scale.shape)}")
    _check(op, scale.shape[1] == groups, f"scale must be [{rows}, {groups}], got {tuple(scale.shape)}")
    if zero_point is not None:
        _integral(op, zero_point, "zero_point")
        _dim(op, zero_point, 2, "zero_point")
        _check(op, zero_point.shape[0] == rows, "zero_point must have the shape of scale")
        _check(op, zero_point.shape[1] == groups, "zero_point must have the shape of scale")


def _bias(op: str, bias: Optional[Tensor], n) -> None:
    if bias is not None:
        _dtype(op, bias, "bias", _FLOATING)
        _dim(op, bias, 1, "bias")
        _check(op, bias.shape[0] == n, f"bias must have shape [{n}], got {tuple(bias.shape)}")


def _rows(x: Tensor):
    rows = 1
    for d in x.shape[:-1]:
        rows = rows * d
    return rows


@torch.library.register_fake("lowbit::quant_params")
def _(w, bits, symmetric, group_size, observer="minmax", maxshrink=0.8, grid=100, norm=2.4, importance=None):
    op = "quant_params"
    _bits(op, bits)
    _dtype(op, w, "weight", _FLOATS)
    groups = _groups(op, w, group_size)
    if observer not in ("minmax", "mse", "imatrix_mse"):
        raise ValueError(f"lowbit::{op}: observer must be 'minmax', 'mse' or 'imatrix_mse', got {observer!r}")
    if (observer == "imatrix_mse") != (importance is not None):
        raise ValueError(f"lowbit::{op}: the 'imatrix_mse' observer takes importance weights and the others none")
    shape = (w.shape[0], groups)
    return w.new_empty(shape), w.new_empty(shape, dtype=torch.int8)


@torch.library.register_fake("lowbit::quantize")
def _(w, scale, zero_point, bits, group_size):
    op = "quantize"
    _same_device(op, w=w, scale=scale, zero_point=zero_point)
    _bits(op, bits)
    _dtype(op, w, "weight", _FLOATS)
    _params(op, w.shape[0], _groups(op, w, group_size), scale, zero_point)
    return torch.empty_like(w, dtype=torch.int8, memory_format=torch.contiguous_format)


@torch.library.register_fake("lowbit::dequantize")
def _(codes, scale, zero_point, group_size, dtype):
    op = "dequantize"
    _same_device(op, codes=codes, scale=scale, zero_point=zero_point)
    _dtype(op, codes, "codes", (torch.int8,))
    if dtype not in _FLOATS:
        raise TypeError(f"lowbit::{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
    _params(op, codes.shape[0], _groups(op, codes, group_size, "codes"), scale, zero_point)
    return torch.empty_like(codes, dtype=dtype, memory_format=torch.contiguous_format)


@torch.library.register_fake("lowbit::fake_quantize")
def _(w, scale, zero_point, bits, group_size):
    op = "fake_quantize"
    _same_device(op, w=w, scale=scale, zero_point=zero_point)
    _bits(op, bits)
    _dtype(op, w, "weight", _FLOATS)
    _params(op, w.shape[0], _groups(op, w, group_size), scale, zero_point)
    return torch.empty_like(w, memory_format=torch.contiguous_format)


@torch.library.register_fake("lowbit::pack")
def _(codes, bits):
    op = "pack"
    _bits(op, bits)
    _dtype(op, codes, "codes", (torch.int8,))
    _dim(op, codes, 2, "codes")
    return codes.new_empty((codes.shape[0], (codes.shape[1] * bits + 31) // 32), dtype=torch.int32)


@torch.library.register_fake("lowbit::unpack")
def _(packed, bits, cols):
    op = "unpack"
    _bits(op, bits)
    _dtype(op, packed, "packed", (torch.int32,))
    _dim(op, packed, 2, "packed")
    if cols < 0:
        raise ValueError(f"lowbit::{op}: cols must be >= 0, got {cols}")
    _check(op, packed.shape[1] == (cols * bits + 31) // 32,
           f"{cols} columns of {bits}-bit codes take {(cols * bits + 31) // 32} words per row")
    return packed.new_empty((packed.shape[0], cols), dtype=torch.int8)


@torch.library.register_fake("lowbit::packed_linear")
def _(x, packed, scale, zero_point, bits, group_size, bias):
    op = "packed_linear"
    _same_device(op, x=x, packed=packed, scale=scale, zero_point=zero_point, bias=bias)
    _bits(op, bits)
    _dtype(op, x, "x", _FLOATS)
    if x.dim() < 1:
        raise ValueError(f"lowbit::{op}: x must have at least 1 dimension")
    _dtype(op, packed, "packed weight", (torch.int32,))
    _dim(op, packed, 2, "packed weight")
    k, n = x.shape[-1], packed.shape[0]
    if group_size <= 0:
        raise ValueError(f"lowbit::{op}: group_size must be positive, got {group_size}")
    _check(op, k % group_size == 0, f"group_size {group_size} must divide in_features {k}")
    _check(op, packed.shape[1] == (k * bits + 31) // 32, f"packed weight must have {(k * bits + 31) // 32} words per row")
    _params(op, n, k // group_size, scale, zero_point)
    _bias(op, bias, n)
    return x.new_empty((*x.shape[:-1], n))


def _streamed_inputs(op: str, inputs, count: int, count_name: str) -> None:
    """A batch [..., columns] of float inputs added to a running statistic of `count` rows."""
    _dtype(op, inputs, "inputs", _FLOATS)
    if inputs.dim() < 1:
        raise ValueError(f"lowbit::{op}: inputs must be a non-empty [..., columns] tensor")
    _check(op, inputs.numel() > 0, "inputs must be a non-empty [..., columns] tensor")
    if count < 0:
        raise ValueError(f"lowbit::{op}: {count_name} must be >= 0, got {count}")


@torch.library.register_fake("lowbit::gptq_hessian_")
def _(hessian, inputs, num_samples, mirror=True):
    op = "gptq_hessian_"
    _same_device(op, hessian=hessian, inputs=inputs)
    _streamed_inputs(op, inputs, num_samples, "num_samples")
    _dtype(op, hessian, "hessian", (torch.float32,))
    _dim(op, hessian, 2, "hessian")
    cols = inputs.shape[-1]
    _check(op, tuple(hessian.shape) == (cols, cols), f"hessian must be [{cols}, {cols}]")
    return num_samples + _rows(inputs)


@torch.library.register_fake("lowbit::hessian_mirror_")
def _(hessian):
    op = "hessian_mirror_"
    _dtype(op, hessian, "hessian", (torch.float32,))
    _dim(op, hessian, 2, "hessian")
    _check(op, hessian.shape[0] == hessian.shape[1], "the hessian must be square")
    return hessian


@torch.library.register_fake("lowbit::awq_channel_stats_")
def _(sum_abs, inputs, count):
    op = "awq_channel_stats_"
    _same_device(op, sum_abs=sum_abs, inputs=inputs)
    _streamed_inputs(op, inputs, count, "count")
    _dtype(op, sum_abs, "sum_abs", (torch.float64,))
    _dim(op, sum_abs, 1, "sum_abs")
    _check(op, sum_abs.shape[0] == inputs.shape[-1], f"sum_abs must have {inputs.shape[-1]} entries")
    return count + _rows(inputs)


@torch.library.register_fake("lowbit::awq_gram_factor")
def _(gram):
    op = "awq_gram_factor"
    _dtype(op, gram, "gram", _FLOATING)
    _dim(op, gram, 2, "gram")
    _check(op, gram.shape[0] == gram.shape[1], "gram must be square")
    _check(op, gram.shape[0] > 0, "gram must not be empty")
    return gram.new_empty(gram.shape, dtype=torch.float32)


@torch.library.register_fake("lowbit::awq_clip")
def _(weight, gram, bits, group_size, symmetric, n_grid, max_shrink):
    op = "awq_clip"
    _same_device(op, weight=weight, gram=gram)
    _bits(op, bits)
    _dtype(op, weight, "weight", _FLOATS)
    _dtype(op, gram, "gram", _FLOATING)
    groups = _groups(op, weight, group_size)
    _dim(op, gram, 2, "gram")
    _check(op, gram.shape[0] == weight.shape[1], "gram must be [cols, cols]")
    _check(op, gram.shape[1] == weight.shape[1], "gram must be [cols, cols]")
    if not (0 < n_grid <= 10000 and 0 <= max_shrink < 1):
        raise ValueError(f"lowbit::{op}: clip search needs 0 < n_grid <= 10000 and 0 <= max_shrink < 1")
    return weight.new_empty((weight.shape[0], groups), dtype=torch.float32)


@torch.library.register_fake("lowbit::nf4_quantize")
def _(weight, blocksize, quant_type):
    op = "nf4_quantize"
    _dtype(op, weight, "weight", _FLOATS)
    _blocksize(op, blocksize)
    _quant_type(op, quant_type)
    n = weight.numel()
    _check(op, n > 0, "cannot quantize an empty tensor")
    return (weight.new_empty(((n + 1) // 2, 1), dtype=torch.uint8),
            weight.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32))


@torch.library.register_fake("lowbit::nf4_dequantize")
def _(packed, absmax, blocksize, quant_type, numel, dtype):
    op = "nf4_dequantize"
    _same_device(op, packed=packed, absmax=absmax)
    _blocksize(op, blocksize)
    _quant_type(op, quant_type)
    _dtype(op, packed, "packed codes", (torch.uint8,))
    _dtype(op, absmax, "absmax", _FLOATING)
    if dtype not in _FLOATS:
        raise TypeError(f"lowbit::{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
    if numel <= 0:
        raise ValueError(f"lowbit::{op}: numel must be positive, got {numel}")
    _check(op, packed.numel() == (numel + 1) // 2, f"packed bytes do not hold {numel} elements")
    _dim(op, absmax, 1, "absmax")
    _check(op, absmax.shape[0] == (numel + blocksize - 1) // blocksize, "absmax must have one entry per block")
    return packed.new_empty((numel,), dtype=dtype)


@torch.library.register_fake("lowbit::nf4_linear")
def _(x, packed, absmax, blocksize, quant_type, out_features, bias, nested_absmax=None, nested_code=None, offset=None):
    op = "nf4_linear"
    _same_device(op, x=x, packed=packed, absmax=absmax, bias=bias, nested_absmax=nested_absmax,
                 nested_code=nested_code, offset=offset)
    _blocksize(op, blocksize)
    _quant_type(op, quant_type)
    _dtype(op, x, "x", _FLOATS)
    if x.dim() < 1:
        raise ValueError(f"lowbit::{op}: x must have at least 1 dimension")
    _dtype(op, packed, "packed codes", (torch.uint8,))
    _dtype(op, absmax, "absmax", _FLOATS + (torch.uint8,))
    k, n = x.shape[-1], out_features
    if n < 0:
        raise ValueError(f"lowbit::{op}: out_features must be >= 0, got {n}")
    _check(op, k > 0, "in_features must be positive")
    _check(op, k % blocksize == 0, f"in_features must be a multiple of the blocksize {blocksize}")
    _check(op, packed.numel() * 2 == n * k, f"packed codes do not hold a [{n}, {k}] weight")
    _dim(op, absmax, 1, "absmax")
    blocks = n * k // blocksize
    _check(op, absmax.shape[0] == blocks, f"absmax must have {blocks} entries")
    _bias(op, bias, n)
    nested = [t is not None for t in (nested_absmax, nested_code, offset)]
    if absmax.dtype == torch.uint8:
        if not all(nested):
            raise ValueError(f"lowbit::{op}: uint8 (double-quantized) absmax needs nested_absmax, nested_code and offset")
        _dtype(op, nested_absmax, "nested_absmax", _FLOATING)
        _dtype(op, nested_code, "nested_code", _FLOATING)
        _dtype(op, offset, "offset", _FLOATING)
        _dim(op, offset, 0, "offset")
        _dim(op, nested_absmax, 1, "nested_absmax")
        _dim(op, nested_code, 1, "nested_code")
        _check(op, nested_absmax.shape[0] == (blocks + 255) // 256, "nested_absmax must have one entry per 256 blocks")
        _check(op, nested_code.shape[0] == 256, "nested_code must have 256 entries")
    elif any(nested):
        raise ValueError(f"lowbit::{op}: nested_absmax, nested_code and offset go with uint8 absmax only")
    return x.new_empty((*x.shape[:-1], n))


def _blockwise8_code(op: str, code: Tensor, blocksize: int) -> None:
    """The 256-entry code and the block size of bitsandbytes' 8-bit blockwise quantization."""
    _dtype(op, code, "code", _FLOATING)
    _dim(op, code, 1, "code")
    _check(op, code.shape[0] == 256, "the 8-bit code must have 256 entries")
    if blocksize <= 0:
        raise ValueError(f"lowbit::{op}: blocksize must be positive, got {blocksize}")


@torch.library.register_fake("lowbit::blockwise8_quantize")
def _(values, code, blocksize):
    op = "blockwise8_quantize"
    _same_device(op, values=values, code=code)
    _dtype(op, values, "values", _FLOATS)
    _blockwise8_code(op, code, blocksize)
    n = values.numel()
    return (values.new_empty((n,), dtype=torch.uint8),
            values.new_empty(((n + blocksize - 1) // blocksize,), dtype=torch.float32))


@torch.library.register_fake("lowbit::blockwise8_dequantize")
def _(codes, absmax, code, blocksize):
    op = "blockwise8_dequantize"
    _same_device(op, codes=codes, absmax=absmax, code=code)
    _dtype(op, codes, "codes", (torch.uint8,))
    _dtype(op, absmax, "absmax", _FLOATING)
    _blockwise8_code(op, code, blocksize)
    n = codes.numel()
    _dim(op, absmax, 1, "absmax")
    _check(op, absmax.shape[0] == (n + blocksize - 1) // blocksize, "absmax must have one entry per block")
    return codes.new_empty((n,), dtype=torch.float32)


def _threshold(op: str, threshold: float) -> None:
    if not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"lowbit::{op}: threshold must be a finite number >= 0, got {threshold}")


@torch.library.register_fake("lowbit::int8_quantize_rowwise")
def _(x, threshold):
    op = "int8_quantize_rowwise"
    _threshold(op, threshold)
    _dtype(op, x, "x", _FLOATS)
    if x.dim() < 1:
        raise ValueError(f"lowbit::{op}: cannot quantize an empty tensor")
    _check(op, x.numel() > 0, "cannot quantize an empty tensor")
    if x.device.type == "meta" and not isinstance(x, FakeTensor):
        raise ValueError(f"lowbit::{op}: the number of outlier columns depends on the data, which meta tensors do not "
                         "hold (FakeTensors, as torch.compile uses, work); pass CPU tensors")
    rows = _rows(x)
    cols = torch.library.get_ctx().new_dynamic_size()
    return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((rows,), dtype=torch.float32),
            x.new_empty((cols,), dtype=torch.int64))


@torch.library.register_fake("lowbit::int8_matmul")
def _(a, b):
    op = "int8_matmul"
    _same_device(op, a=a, b=b)
    _dtype(op, a, "a", (torch.int8,))
    _dtype(op, b, "b", (torch.int8,))
    _dim(op, a, 2, "a")
    _dim(op, b, 2, "b")
    _check(op, a.shape[1] == b.shape[1], "a [M, K] and b [N, K] must have the same K")
    _check(op, a.shape[1] <= 65536, "K exceeds 65536 (the int32 accumulator could overflow)")
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.int32)


@torch.library.register_fake("lowbit::int8_outlier_matmul")
def _(x, w, w_scale, threshold, bias):
    op = "int8_outlier_matmul"
    _same_device(op, x=x, w=w, w_scale=w_scale, bias=bias)
    _threshold(op, threshold)
    return _int8_linear(op, x, w, w_scale, bias)


@torch.library.register_fake("lowbit::int8_dynamic_linear")
def _(x, w, w_scale, input_scale, bias):
    op = "int8_dynamic_linear"
    _same_device(op, x=x, w=w, w_scale=w_scale, input_scale=input_scale, bias=bias)
    if input_scale is not None:
        _dtype(op, input_scale, "input_scale", _FLOATING)
        _check(op, input_scale.numel() == 1, "input_scale must hold one value")
    return _int8_linear(op, x, w, w_scale, bias)


def _int8_linear(op, x, w, w_scale, bias):
    """The int8 linears' shared checks (x float [..., K], w int8 [N, K], a scale per output row,
    bias [N]) -> their [..., N] result."""
    _dtype(op, x, "x", _FLOATS)
    _dtype(op, w, "the weight w", (torch.int8,))
    _dtype(op, w_scale, "w_scale", _FLOATING)
    _dim(op, w, 2, "w")
    n, k = w.shape
    if x.dim() < 1:
        raise ValueError(f"lowbit::{op}: x must have at least 1 dimension")
    _check(op, x.shape[-1] == k, f"x must have {k} features in its last dimension")
    _check(op, w_scale.numel() == n and w_scale.dim() <= 2, f"the weight scale must have {n} entries")
    _check(op, k > 0, "in_features must be positive")
    _check(op, k <= 65536, "in_features exceeds 65536")
    _bias(op, bias, n)
    return x.new_empty((*x.shape[:-1], n))


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _fp8_format(op: str, format: str) -> torch.dtype:
    if format not in ("e4m3", "e5m2"):
        raise ValueError(f"lowbit::{op}: format must be 'e4m3' or 'e5m2', got {format!r}")
    return torch.float8_e4m3fn if format == "e4m3" else torch.float8_e5m2


def _fp8_scale(op: str, scale: Tensor, rows, cols, block_rows: int, block_cols: int, name: str = "scale") -> None:
    """scale [ceil(rows / block_rows), ceil(cols / block_cols)], float, for positive block sizes."""
    if block_rows <= 0 or block_cols <= 0:
        raise ValueError(f"lowbit::{op}: block_rows and block_cols must be positive, got {block_rows} and {block_cols}")
    _dtype(op, scale, name, _FLOATS)
    _dim(op, scale, 2, name)
    shape = ((rows + block_rows - 1) // block_rows, (cols + block_cols - 1) // block_cols)
    _check(op, scale.shape[0] == shape[0], f"{name} must be {list(shape)} for {block_rows} x {block_cols} blocks")
    _check(op, scale.shape[1] == shape[1], f"{name} must be {list(shape)} for {block_rows} x {block_cols} blocks")


@torch.library.register_fake("lowbit::fp8_scales")
def _(x, block_rows, block_cols, format="e4m3"):
    op = "fp8_scales"
    _fp8_format(op, format)
    _dtype(op, x, "x", _FLOATS)
    _dim(op, x, 2, "x")
    if block_rows <= 0 or block_cols <= 0:
        raise ValueError(f"lowbit::{op}: block_rows and block_cols must be positive, got {block_rows} and {block_cols}")
    return x.new_empty(((x.shape[0] + block_rows - 1) // block_rows, (x.shape[1] + block_cols - 1) // block_cols))


@torch.library.register_fake("lowbit::fp8_quantize")
def _(x, scale, block_rows, block_cols, format="e4m3"):
    op = "fp8_quantize"
    _same_device(op, x=x, scale=scale)
    dtype = _fp8_format(op, format)
    _dtype(op, x, "x", _FLOATS)
    _dim(op, x, 2, "x")
    _fp8_scale(op, scale, x.shape[0], x.shape[1], block_rows, block_cols)
    return x.new_empty(x.shape, dtype=dtype)


@torch.library.register_fake("lowbit::fp8_dequantize")
def _(q, scale, block_rows, block_cols, dtype):
    op = "fp8_dequantize"
    _same_device(op, q=q, scale=scale)
    if dtype not in _FLOATS:
        raise TypeError(f"lowbit::{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
    _dtype(op, q, "q", _FP8)
    _dim(op, q, 2, "q")
    _fp8_scale(op, scale, q.shape[0], q.shape[1], block_rows, block_cols)
    return q.new_empty(q.shape, dtype=dtype)


@torch.library.register_fake("lowbit::fp8_fake_quantize")
def _(x, scale, block_rows, block_cols, format="e4m3"):
    op = "fp8_fake_quantize"
    _same_device(op, x=x, scale=scale)
    _fp8_format(op, format)
    _dtype(op, x, "x", _FLOATS)
    _dim(op, x, 2, "x")
    _fp8_scale(op, scale, x.shape[0], x.shape[1], block_rows, block_cols)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("lowbit::fp8_linear")
def _(x, weight, weight_scale, block_rows, block_cols, bias):
    op = "fp8_linear"
    _same_device(op, x=x, weight=weight, weight_scale=weight_scale, bias=bias)
    _dtype(op, x, "x", _FLOATS)
    if x.dim() < 1:
        raise ValueError(f"lowbit::{op}: x must have at least 1 dimension")
    _dtype(op, weight, "weight", _FP8)
    _dim(op, weight, 2, "weight")
    n, k = weight.shape
    _check(op, x.shape[-1] == k, f"x must have {k} features in its last dimension")
    _fp8_scale(op, weight_scale, n, k, block_rows, block_cols, "weight_scale")
    _bias(op, bias, n)
    return x.new_empty((*x.shape[:-1], n))


@torch.library.register_fake("lowbit::channel_range_")
def _(mins, maxs, x):
    op = "channel_range_"
    _same_device(op, mins=mins, maxs=maxs, x=x)
    _dtype(op, x, "x", _FLOATS)
    if x.dim() < 1:
        raise ValueError(f"lowbit::{op}: x must be a [..., channels] tensor, got a 0-d tensor")
    for name, t in (("mins", mins), ("maxs", maxs)):
        _dtype(op, t, name, (torch.float32,))
        _dim(op, t, 1, name)
        _check(op, t.shape[0] == x.shape[-1], f"{name} must have {x.shape[-1]} entries (one per channel of x)")
    return None


# ggml's block types: name -> (values per block, bytes per block, values per sub-block scale, bits
# per code), as ggml-common.h lays them out. (This file also loads on its own, with the bare
# extension, in the raw-op tests: it imports nothing of lowbit's.)
GGUF_TYPES = {
    "Q8_0": (32, 34, 32, 8), "Q4_0": (32, 18, 32, 4), "Q4_1": (32, 20, 32, 4), "Q5_0": (32, 22, 32, 5),
    "Q5_1": (32, 24, 32, 5), "Q2_K": (256, 84, 16, 2), "Q3_K": (256, 110, 16, 3), "Q4_K": (256, 144, 32, 4),
    "Q5_K": (256, 176, 32, 5), "Q6_K": (256, 210, 16, 6),
}


def _gguf_type(op: str, type: str):
    t = GGUF_TYPES.get(type.upper())
    if t is None:
        raise ValueError(f"lowbit::{op}: unknown GGUF type {type!r}; expected one of {', '.join(GGUF_TYPES)}")
    return t


def _gguf_cols(op: str, type: str, cols, block: int) -> None:
    _check(op, cols > 0, f"cols must be a positive multiple of {type.upper()}'s block of {block}, got {cols}")
    _check(op, cols % block == 0, f"cols must be a positive multiple of {type.upper()}'s block of {block}, got {cols}")


def _gguf_blocks(op: str, blocks: Tensor, type: str, cols) -> Tuple[int, int, int, int]:
    t = _gguf_type(op, type)
    _dtype(op, blocks, "blocks", (torch.uint8,))
    _dim(op, blocks, 2, "blocks")
    _gguf_cols(op, type, cols, t[0])
    _check(op, blocks.shape[1] == cols // t[0] * t[1],
           f"blocks must have {cols // t[0] * t[1]} bytes per row for {cols} values of {type.upper()}")
    return t


@torch.library.register_fake("lowbit::gguf_quantize")
def _(weight, type, importance=None):
    op = "gguf_quantize"
    _same_device(op, weight=weight, importance=importance)
    block, nbytes = _gguf_type(op, type)[:2]
    _dtype(op, weight, "weight", _FLOATS)
    _dim(op, weight, 2, "weight")
    cols = weight.shape[1]
    _gguf_cols(op, type, cols, block)
    if importance is not None:
        _dtype(op, importance, "importance", (torch.float32,))
        _dim(op, importance, 1, "importance")
        _check(op, importance.shape[0] == cols, f"importance must have shape [{cols}] (one value per column)")
    return weight.new_empty((weight.shape[0], cols // block * nbytes), dtype=torch.uint8)


@torch.library.register_fake("lowbit::gguf_dequantize")
def _(blocks, type, cols, dtype):
    op = "gguf_dequantize"
    if dtype not in _FLOATS:
        raise TypeError(f"lowbit::{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
    _gguf_blocks(op, blocks, type, cols)
    return blocks.new_empty((blocks.shape[0], cols), dtype=dtype)


@torch.library.register_fake("lowbit::gguf_grid")
def _(blocks, type, cols):
    op = "gguf_grid"
    _, _, sub, _ = _gguf_blocks(op, blocks, type, cols)
    shape = (blocks.shape[0], cols // sub)
    return blocks.new_empty(shape, dtype=torch.float32), blocks.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("lowbit::gguf_encode")
def _(codes, blocks, type):
    op = "gguf_encode"
    _same_device(op, codes=codes, blocks=blocks)
    _dtype(op, codes, "codes", (torch.uint8,))
    _dim(op, codes, 2, "codes")
    _gguf_blocks(op, blocks, type, codes.shape[1])
    _check(op, blocks.shape[0] == codes.shape[0], "blocks must have one row per row of codes")
    return torch.empty_like(blocks, memory_format=torch.contiguous_format)
