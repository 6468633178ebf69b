"""The functional API: integer quantization, bit packing and the packed linear layer.

Every function validates its arguments and raises ValueError / TypeError naming the fix,
then calls the C++ kernels (lowbit.ops). Weights are 2-D [out, in]; groups run along `in`.
Codes are signed int8 on compressed-tensors' grid [-2^(b-1), 2^(b-1) - 1].
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops
from .schemes import ACTORDERS, QuantizationArgs

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = [
    "quant_params", "quantize", "dequantize", "fake_quantize", "pack", "unpack", "packed_linear",
    "hessian", "gptq", "GPTQResult",
]


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(
            f"{name} is on {t.device}, but lowbit's kernels run on the CPU: pass {name}.cpu()"
        )


def _check_float(t, name: str, dims: Optional[int] = 2) -> None:
    _check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be float32, float16 or bfloat16, got {t.dtype}: convert it with "
            f"{name}.float() (integer and complex tensors cannot be quantized)"
        )
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D [out_features, in_features], got shape {tuple(t.shape)}")
    if dims is not None and t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): nothing to quantize")


def _check_finite(t: Tensor, name: str) -> None:
    """For paths that skip quant_params (which checks as it scans the weight)."""
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or Inf values; fix the model weights before quantizing")


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 2..8, got {bits!r}")


def _group_size(cols: int, scheme: QuantizationArgs) -> int:
    """Columns per scale for a weight of `cols` input columns."""
    if scheme.strategy != "group":
        return cols
    if cols % scheme.group_size:
        raise ValueError(
            f"group_size {scheme.group_size} does not divide the {cols} input columns; pick a "
            f"divisor of {cols} or use strategy='channel'"
        )
    return scheme.group_size


def _params_2d(w: Tensor, scheme: QuantizationArgs) -> Tuple[Tensor, Tensor, int]:
    """Scale and zero point laid out per row ([rows, groups]), plus the group size."""
    rows, cols = w.shape
    if scheme.strategy == "tensor":
        scale, zero = ops.quant_params(w.reshape(1, -1), scheme.num_bits, scheme.symmetric,
                                       w.numel(), scheme.observer)
        return scale.expand(rows, 1), zero.expand(rows, 1), cols
    gs = _group_size(cols, scheme)
    scale, zero = ops.quant_params(w, scheme.num_bits, scheme.symmetric, gs, scheme.observer)
    return scale, zero, gs


def _scheme(bits, symmetric, strategy, group_size, observer) -> QuantizationArgs:
    _check_bits(bits)
    return QuantizationArgs(
        num_bits=bits, symmetric=symmetric, strategy=strategy,
        group_size=group_size if strategy == "group" else None, observer=observer,
    )


def quant_params(w: Tensor, bits: int = 4, symmetric: bool = True, strategy: str = "group",
                 group_size: Optional[int] = 128, observer: str = "minmax") -> Tuple[Tensor, Tensor]:
    """Scale (w.dtype) and int8 zero point of `w` [out, in].

    Shapes: [out, in / group_size] for "group", [out, 1] for "channel", [1] for "tensor".
    The zero point is all zeros when symmetric.
    """
    scheme = _scheme(bits, symmetric, strategy, group_size, observer)
    _check_float(w, "weight")
    scale, zero, _ = _params_2d(w, scheme)
    if strategy == "tensor":
        return scale[:1, 0].clone(), zero[:1, 0].clone()
    return scale, zero


def _layout(codes_shape: Sequence[int], scale: Tensor, zero_point: Optional[Tensor]):
    """Per-row [rows, groups] views of scale / zero point and the group size they imply."""
    _check_tensor(scale, "scale")
    if scale.dtype not in FLOAT_DTYPES:
        raise TypeError(f"scale must be float32, float16 or bfloat16, got {scale.dtype}")
    rows, cols = codes_shape
    if scale.numel() == 1:
        scale2d = scale.reshape(1, 1).expand(rows, 1)
    elif scale.dim() == 2 and scale.shape[0] == rows and scale.shape[1] > 0 and cols % scale.shape[1] == 0:
        scale2d = scale
    else:
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} does not fit a [{rows}, {cols}] weight: expected "
            f"[{rows}, groups] with groups dividing {cols}, or a single element"
        )
    zero2d = None
    if zero_point is not None:
        _check_tensor(zero_point, "zero_point")
        if zero_point.numel() != scale.numel():
            raise ValueError(
                f"zero_point has shape {tuple(zero_point.shape)} but scale has {tuple(scale.shape)}: they must match"
            )
        if zero_point.dtype.is_floating_point or zero_point.dtype.is_complex:
            raise TypeError(f"zero_point must be an integer tensor, got {zero_point.dtype}")
        zero2d = zero_point.reshape(scale2d.shape) if scale.numel() > 1 else zero_point.reshape(1, 1).expand(rows, 1)
    return scale2d, zero2d, cols // scale2d.shape[1]


def quantize(w: Tensor, bits: int = 4, symmetric: bool = True, strategy: str = "group",
             group_size: Optional[int] = 128, observer: str = "minmax") -> Tuple[Tensor, Tensor, Tensor]:
    """Quantize `w` [out, in] to (codes int8 [out, in], scale, zero_point).

    Parameters come from `observer` ("minmax", or "mse": the shrink search of the GPTQ
    reference); scale / zero_point shapes are those of `quant_params`.
    """
    scheme = _scheme(bits, symmetric, strategy, group_size, observer)
    _check_float(w, "weight")
    scale, zero, gs = _params_2d(w, scheme)
    codes = ops.quantize(w, scale, zero, bits, gs)
    if strategy == "tensor":
        return codes, scale[:1, 0].clone(), zero[:1, 0].clone()
    return codes, scale, zero


def dequantize(codes: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None,
               dtype: Optional[torch.dtype] = None) -> Tensor:
    """(codes - zero_point) * scale as `dtype` (default: scale's dtype).

    The strategy is read from scale's shape: [out, groups], [out, 1] or one element.
    """
    _check_tensor(codes, "codes")
    if codes.dtype != torch.int8:
        raise TypeError(f"codes must be int8 (as returned by quantize / unpack), got {codes.dtype}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    scale2d, zero2d, gs = _layout(codes.shape, scale, zero_point)
    dtype = dtype or scale.dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    return ops.dequantize(codes, scale2d, zero2d, gs, dtype)


def fake_quantize(w: Tensor, bits: int = 4, symmetric: bool = True, strategy: str = "group",
                  group_size: Optional[int] = 128, observer: str = "minmax",
                  scale: Optional[Tensor] = None, zero_point: Optional[Tensor] = None) -> Tensor:
    """dequantize(quantize(w)) in one pass, in w.dtype. Pass `scale` (and `zero_point`) to
    reuse parameters; otherwise they come from `observer`."""
    scheme = _scheme(bits, symmetric, strategy, group_size, observer)
    _check_float(w, "weight")
    if scale is None:
        scale2d, zero2d, gs = _params_2d(w, scheme)
    else:
        _check_finite(w, "weight")
        scale2d, zero2d, gs = _layout(w.shape, scale, zero_point)
    return ops.fake_quantize(w, scale2d, zero2d, bits, gs)


def pack(codes: Tensor, bits: int, packed_dim: int = 1) -> Tensor:
    """Pack int8 codes [rows, cols] into int32 along `packed_dim` as compressed-tensors'
    pack-quantized does (weights along dim 1, zero points along dim 0)."""
    _check_bits(bits)
    _check_tensor(codes, "codes")
    if codes.dtype != torch.int8:
        raise TypeError(f"codes must be int8, got {codes.dtype}: quantize first, or cast with .to(torch.int8)")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D, got shape {tuple(codes.shape)}")
    if packed_dim not in (0, 1):
        raise ValueError(f"packed_dim must be 0 or 1, got {packed_dim!r}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"codes must lie in [{lo}, {hi}] for {bits}-bit packing")
    if packed_dim == 0:
        return ops.pack(codes.t(), bits).t().contiguous()
    return ops.pack(codes, bits)


def unpack(packed: Tensor, bits: int, shape: Sequence[int], packed_dim: int = 1) -> Tensor:
    """The inverse of `pack`: int32 words -> int8 codes of the original `shape`."""
    _check_bits(bits)
    _check_tensor(packed, "packed")
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32, got {packed.dtype}")
    if packed.dim() != 2 or len(shape) != 2:
        raise ValueError(f"packed and shape must both be 2-D, got {tuple(packed.shape)} and {tuple(shape)}")
    if packed_dim not in (0, 1):
        raise ValueError(f"packed_dim must be 0 or 1, got {packed_dim!r}")
    rows, cols = (shape[1], shape[0]) if packed_dim == 0 else (shape[0], shape[1])
    src = packed.t() if packed_dim == 0 else packed
    words = (cols * bits + 31) // 32
    if tuple(src.shape) != (rows, words):
        raise ValueError(
            f"packed has shape {tuple(packed.shape)}, but a {tuple(shape)} tensor of {bits}-bit codes "
            f"packed along dim {packed_dim} needs {(words, rows) if packed_dim == 0 else (rows, words)}"
        )
    out = ops.unpack(src, bits, cols)
    return out.t().contiguous() if packed_dim == 0 else out


def packed_linear(x: Tensor, packed: Tensor, scale: Tensor, zero_point: Optional[Tensor], bits: int,
                  in_features: int, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., in] @ dequantize(unpack(packed))^T + bias, without materialising the weight."""
    _check_float(x, "x", dims=None)
    _check_bits(bits)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x must have {in_features} features in its last dimension, got shape {tuple(x.shape)}")
    _check_tensor(packed, "packed")
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32 (as returned by pack), got {packed.dtype}")
    words = (in_features * bits + 31) // 32
    if packed.dim() != 2 or packed.shape[1] != words:
        raise ValueError(f"packed has shape {tuple(packed.shape)}, but {in_features} inputs at {bits} bits "
                         f"take [out_features, {words}] int32 words")
    scale2d, zero2d, gs = _layout((packed.shape[0], in_features), scale, zero_point)
    if bias is not None:
        _check_tensor(bias, "bias")
        if bias.shape != (packed.shape[0],):
            raise ValueError(f"bias must have shape ({packed.shape[0]},), got {tuple(bias.shape)}")
    return ops.packed_linear(x, packed, scale2d, zero2d, bits, gs, bias)


# ---------------------------------------------------------------- GPTQ


class GPTQResult(NamedTuple):
    codes: Tensor        # int8 [rows, cols], original column order
    scale: Tensor        # [rows, groups] in the weight's dtype
    zero_point: Tensor   # int8 [rows, groups] (zeros when symmetric)
    g_idx: Tensor        # int32 [cols]: the group of each column
    loss: float          # sum over columns of |w - q|^2 / (2 d^2), GPTQ's objective
    weight: Tensor       # fp32 [rows, cols]: each column as it was when quantized
    damping: float       # dampening fraction that made H positive definite; -1: RTN fallback


def hessian(inputs: Tensor, hessian: Optional[Tensor] = None, num_samples: int = 0, *,
            mirror: bool = True) -> Tuple[Tensor, int]:
    """Accumulate a layer's GPTQ Hessian: the running average of 2 x^T x over the rows of
    `inputs` [..., in_features], computed on and above the diagonal. Pass the previous
    (hessian, num_samples) to stream batches: that fp32 tensor is updated in place. With
    mirror=False only the upper triangle is kept up to date (mirror on the last batch)."""
    _check_float(inputs, "inputs", dims=None)
    if inputs.numel() == 0:
        raise ValueError("inputs is empty: the Hessian needs at least one calibration token")
    cols = inputs.shape[-1]
    h = torch.zeros(cols, cols) if hessian is None else hessian
    total = ops.gptq_hessian_(h, inputs, num_samples, mirror)
    # NaN or Inf anywhere in x reaches the diagonal (sums of squares): one cheap check.
    if not torch.isfinite(h.diagonal()).all():
        raise ValueError("inputs contain NaN or Inf values; check the calibration data and the layers before")
    return h, total


def _column_groups(h: Tensor, cols: int, group_size: int, actorder: Optional[str]):
    """(processing order, group of each processed column, g_idx, column order of the parameters)."""
    natural = torch.arange(cols)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if actorder else natural
    if actorder == "group":  # groups follow the processing order: g_idx needed
        g_idx = torch.empty(cols, dtype=torch.int32)
        g_idx[perm] = (natural // group_size).to(torch.int32)
        return perm, natural // group_size, g_idx, perm
    return perm, perm // group_size, (natural // group_size).to(torch.int32), natural


def gptq(weight: Tensor, hessian: Tensor, *, bits: int = 4, group_size: Optional[int] = 128,
         symmetric: bool = True, actorder: Optional[str] = "static", block_size: int = 128,
         dampening_frac: float = 0.01, observer: str = "minmax") -> GPTQResult:
    """GPTQ-quantize `weight` [out, in] given its layer's Hessian [in, in].

    group_size None quantizes per output channel. actorder (llmcompressor's names): "static"
    (= "weight", the default) processes columns by descending diag(H) with the natural groups;
    "group" also forms the groups in that order (g_idx); None keeps the natural order.
    Parameters come from `observer` on the weight up front (as llmcompressor does). The
    damping starts at dampening_frac * mean(diag H) and doubles while the Cholesky
    factorisation fails; if none succeeds the result is plain RTN (damping -1).
    """
    _check_bits(bits)
    _check_float(weight, "weight")
    _check_finite(weight, "weight")
    cols = weight.shape[1]
    if not isinstance(hessian, Tensor) or hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be a [{cols}, {cols}] tensor for a weight of shape {tuple(weight.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or Inf values; check the calibration activations")
    if actorder not in ACTORDERS:
        raise ValueError(f"actorder must be one of {ACTORDERS}, got {actorder!r}")
    if not 0 < dampening_frac <= 1:
        raise ValueError(f"dampening_frac must be in (0, 1], got {dampening_frac}")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    gs = _group_size(cols, QuantizationArgs(num_bits=bits, symmetric=symmetric, observer=observer,
                                            strategy="group" if group_size else "channel", group_size=group_size))
    w, h = weight.float().clone(), hessian.float().clone()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    perm, col_group, g_idx, param_order = _column_groups(h, cols, gs, actorder)
    scale, zero = ops.quant_params(w[:, param_order].to(weight.dtype).contiguous(), bits, symmetric, gs, observer)
    codes, updated, loss, damping = ops.gptq_solve(w[:, perm].contiguous(), h[perm][:, perm].contiguous(),
                                                   scale, zero, col_group, bits, block_size, dampening_frac)
    inverse = torch.argsort(perm)
    return GPTQResult(codes[:, inverse], scale, zero, g_idx, loss, updated[:, inverse], damping)
