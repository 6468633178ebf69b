"""The functional API: integer quantization, bit packing and the packed linear layer.

Every function validates its arguments and raises ValueError / TypeError naming the fix,
then calls the C++ kernels (lowbit.ops). Weights are 2-D [out, in]; groups run along `in`.
Codes are signed int8 on compressed-tensors' grid [-2^(b-1), 2^(b-1) - 1].
"""

from __future__ import annotations

import warnings
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import ops
from .reference import nf4 as _reference_nf4
from .schemes import ACTORDERS, QuantizationArgs

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

__all__ = [
    "quant_params", "quantize", "dequantize", "fake_quantize", "pack", "unpack", "packed_linear",
    "hessian", "mirror_hessian_", "gptq", "GPTQResult", "awq_channel_stats", "awq_grid", "awq_scales",
    "awq_search", "AWQSearchResult", "awq_clip", "NF4QuantState", "nf4_quantize", "nf4_dequantize",
    "nf4_linear", "Int8Rowwise", "int8_quantize_rowwise", "int8_outlier_matmul", "fp8_scales", "fp8_quantize",
    "fp8_dequantize", "fp8_fake_quantize", "fp8_linear", "channel_range",
]


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        hint = (" (a meta tensor holds no data: load real values first, e.g. to_empty(device='cpu') + "
                "load_state_dict)") if t.device.type == "meta" else ""
        raise ValueError(
            f"{name} is on {t.device}, but lowbit's kernels run on the CPU: pass {name}.cpu(){hint}"
        )
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be a dense (strided) tensor, got layout {t.layout}: pass {name}.to_dense()")


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


def _check_int(v, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """A Python int (not a bool) within [minimum, maximum]."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        lo = "" if minimum is None else f" >= {minimum}"
        hi = "" if maximum is None else f"{' and' if lo else ''} <= {maximum}"
        raise ValueError(f"{name} must be an integer{lo}{hi}, got {v!r}")
    return v


def _check_bool(v, name: str) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {type(v).__name__} {v!r}")
    return v


def _check_number(v, name: str) -> float:
    """A finite real Python number (not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(v).__name__} {v!r}")
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _check_group_size_arg(group_size, name: str = "group_size") -> Optional[int]:
    """None (whole rows) or a positive int."""
    if group_size is None:
        return None
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"{name} must be a positive integer or None, got {type(group_size).__name__} {group_size!r}")
    if group_size <= 0:
        raise ValueError(f"{name} must be a positive integer or None (whole rows), got {group_size!r}")
    return group_size


def _qrange(bits: int) -> Tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _checking_values() -> bool:
    """Value checks (data-dependent) are skipped while torch.compile traces: the fake kernels
    see no data; eager calls always run them."""
    return not torch.compiler.is_compiling()


def _check_scale_values(scale: Tensor, name: str = "scale") -> None:
    if not _checking_values():
        return
    if scale.numel() and not (torch.isfinite(scale) & (scale > 0)).all():
        bad = scale[~(torch.isfinite(scale) & (scale > 0))].flatten()[:3].tolist()
        raise ValueError(f"{name} must be finite and > 0 everywhere, got values such as {bad}: recompute the "
                         f"quantization parameters (quant_params) or fix the checkpoint")


def _check_zero_values(zero: Tensor, bits: Optional[int], name: str = "zero_point") -> None:
    if not _checking_values():
        return
    lo, hi = _qrange(bits) if bits is not None else (-128, 127)
    if zero.numel() and (zero.min() < lo or zero.max() > hi):
        what = f"the {bits}-bit grid" if bits is not None else "the int8 range"
        raise ValueError(f"{name} must lie in [{lo}, {hi}] ({what}), got values in "
                         f"[{int(zero.min())}, {int(zero.max())}]")


def _check_bias(bias, out_features: int, name: str = "bias") -> None:
    if bias is None:
        return
    _check_tensor(bias, name)
    if bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {bias.dtype}: convert it with "
                        f"{name}.float()")
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"{name} must have {out_features} entries (shape ({out_features},), one per output "
                         f"feature), got shape {tuple(bias.shape)}")


def _check_x(x, in_features: int, name: str = "x") -> None:
    _check_float(x, name, dims=None)
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"{name} must have {in_features} features in its last dimension, got shape {tuple(x.shape)}")


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


# llmcompressor's imatrix_mse search: p = 1 - i/20 for i = 0 .. 19 (lowbit's loop stops below
# maxshrink * grid, so maxshrink 1.0 reaches i = 19), |error|^3, weights normalised by their mean.
IMATRIX_SEARCH = {"maxshrink": 1.0, "grid": 20, "norm": 3.0}
_warned_no_importance = False


def _search_args(scheme: QuantizationArgs, cols: int, importance: Optional[Tensor]) -> dict:
    """ops.quant_params' observer arguments: imatrix_mse gets its search settings and the
    importance weights [cols] (without them, as llmcompressor: uniform weights, one warning)."""
    if scheme.observer != "imatrix_mse":
        if importance is not None:
            raise ValueError(f"importance weights are only used by the 'imatrix_mse' observer, not {scheme.observer!r}")
        return {"observer": scheme.observer}
    global _warned_no_importance
    if importance is None:
        if not _warned_no_importance:
            warnings.warn("imatrix_mse: no importance data (E[x^2] per input column, gathered from calibration data "
                          "by oneshot); falling back to a uniformly weighted MSE search", stacklevel=4)
            _warned_no_importance = True
        importance = torch.ones(cols)
    _check_tensor(importance, "importance")
    if importance.dim() != 1 or importance.numel() != cols or not importance.dtype.is_floating_point:
        raise ValueError(f"importance must be a float tensor of shape [{cols}] (one weight per input column), got "
                         f"{importance.dtype} of shape {tuple(importance.shape)}")
    imp = importance.float()
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise ValueError("importance weights must be finite and >= 0 (E[x^2] of each input column)")
    imp = imp / (imp.mean() + torch.finfo(torch.float32).tiny)
    return {"observer": "imatrix_mse", **IMATRIX_SEARCH, "importance": imp}


def _params_2d(w: Tensor, scheme: QuantizationArgs, importance: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, int]:
    """Scale and zero point laid out per row ([rows, groups]), plus the group size."""
    rows, cols = w.shape
    search = _search_args(scheme, cols, importance)
    if scheme.strategy == "tensor":
        if "importance" in search:
            search["importance"] = search["importance"].repeat(rows)
        scale, zero = ops.quant_params(w.reshape(1, -1), scheme.num_bits, scheme.symmetric, w.numel(), **search)
        return scale.expand(rows, 1), zero.expand(rows, 1), cols
    gs = _group_size(cols, scheme)
    scale, zero = ops.quant_params(w, scheme.num_bits, scheme.symmetric, gs, **search)
    return scale, zero, gs


def _scheme(bits, symmetric, strategy, group_size, observer) -> QuantizationArgs:
    _check_bits(bits)
    _check_bool(symmetric, "symmetric")
    if not isinstance(strategy, str):
        raise TypeError(f"strategy must be a string ('group', 'channel' or 'tensor'), got {type(strategy).__name__}")
    if not isinstance(observer, str):
        raise TypeError(f"observer must be 'minmax', 'mse' or 'imatrix_mse', got {type(observer).__name__} {observer!r}")
    return QuantizationArgs(
        num_bits=bits, symmetric=symmetric, strategy=strategy,
        group_size=group_size if strategy == "group" else None, observer=observer,
    )


def quant_params(w: Tensor, bits: int = 4, symmetric: bool = True, strategy: str = "group",
                 group_size: Optional[int] = 128, observer: str = "minmax",
                 importance: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Scale (w.dtype) and int8 zero point of `w` [out, in].

    Shapes: [out, in / group_size] for "group", [out, 1] for "channel", [1] for "tensor".
    The zero point is all zeros when symmetric. observer "imatrix_mse" weighs each input
    column's error by importance [in] (E[x^2] of that input on calibration data).
    """
    scheme = _scheme(bits, symmetric, strategy, group_size, observer)
    _check_float(w, "weight")
    scale, zero, _ = _params_2d(w, scheme, importance)
    if strategy == "tensor":
        return scale[:1, 0].clone(), zero[:1, 0].clone()
    return scale, zero


def _layout(codes_shape: Sequence[int], scale: Tensor, zero_point: Optional[Tensor], bits: Optional[int] = None):
    """Per-row [rows, groups] views of scale / zero point and the group size they imply.

    scale: [rows, groups] with groups dividing cols, or a single element (shape (), (1,) or
    (1, 1)); float32 / float16 / bfloat16, finite and > 0. zero_point: an integer tensor of
    exactly scale's shape, within the `bits` grid (int8's range when bits is not known)."""
    _check_tensor(scale, "scale")
    if scale.dtype not in FLOAT_DTYPES:
        raise TypeError(f"scale must be float32, float16 or bfloat16, got {scale.dtype}")
    rows, cols = codes_shape
    if scale.numel() == 1 and scale.dim() <= 2:
        scale2d = scale.reshape(1, 1).expand(rows, 1)
    elif scale.dim() == 2 and scale.shape[0] == rows and scale.shape[1] > 0 and cols % scale.shape[1] == 0:
        scale2d = scale
    else:
        raise ValueError(
            f"scale of shape {tuple(scale.shape)} does not fit a [{rows}, {cols}] weight: expected "
            f"[{rows}, groups] with groups dividing {cols}, or a single element"
        )
    _check_scale_values(scale)
    zero2d = None
    if zero_point is not None:
        _check_tensor(zero_point, "zero_point")
        if zero_point.dtype.is_floating_point or zero_point.dtype.is_complex or zero_point.dtype == torch.bool:
            raise TypeError(f"zero_point must be an integer tensor, got {zero_point.dtype}: pass the int8 zero "
                            "point that quantize returns")
        if tuple(zero_point.shape) != tuple(scale.shape):
            raise ValueError(
                f"zero_point has shape {tuple(zero_point.shape)} but scale has {tuple(scale.shape)}: they must match"
            )
        _check_zero_values(zero_point, bits)
        zero2d = zero_point if scale.numel() > 1 else zero_point.reshape(1, 1).expand(rows, 1)
        if zero2d.dtype != torch.int8:
            zero2d = zero2d.to(torch.int8)
    return scale2d, zero2d, cols // scale2d.shape[1]


def quantize(w: Tensor, bits: int = 4, symmetric: bool = True, strategy: str = "group",
             group_size: Optional[int] = 128, observer: str = "minmax",
             importance: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Quantize `w` [out, in] to (codes int8 [out, in], scale, zero_point).

    Parameters come from `observer` ("minmax"; "mse": the shrink search of the GPTQ
    reference; "imatrix_mse": that search weighted by `importance`); scale / zero_point shapes
    are those of `quant_params`.
    """
    scheme = _scheme(bits, symmetric, strategy, group_size, observer)
    _check_float(w, "weight")
    scale, zero, gs = _params_2d(w, scheme, importance)
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
    dtype = scale.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return ops.dequantize(codes, scale2d, zero2d, gs, dtype)


def fake_quantize(w: Tensor, bits: int = 4, symmetric: bool = True, strategy: str = "group",
                  group_size: Optional[int] = 128, observer: str = "minmax",
                  scale: Optional[Tensor] = None, zero_point: Optional[Tensor] = None,
                  importance: Optional[Tensor] = None) -> Tensor:
    """dequantize(quantize(w)) in one pass, in w.dtype. Pass `scale` (and `zero_point`) to
    reuse parameters; otherwise they come from `observer` (and `importance`)."""
    scheme = _scheme(bits, symmetric, strategy, group_size, observer)
    _check_float(w, "weight")
    if scale is None:
        if zero_point is not None:
            raise ValueError("zero_point was given without scale: pass both, or neither to compute them")
        scale2d, zero2d, gs = _params_2d(w, scheme, importance)
    else:
        _check_finite(w, "weight")
        scale2d, zero2d, gs = _layout(w.shape, scale, zero_point, bits)
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
    if isinstance(packed_dim, bool) or packed_dim not in (0, 1):
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
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence) and not isinstance(shape, torch.Size):
        raise TypeError(f"shape must be a sequence of two ints (rows, cols), got {type(shape).__name__} {shape!r}")
    if packed.dim() != 2 or len(shape) != 2:
        raise ValueError(f"packed and shape must both be 2-D, got {tuple(packed.shape)} and {tuple(shape)}")
    shape = (_check_int(shape[0], "shape[0]", 0), _check_int(shape[1], "shape[1]", 0))
    if isinstance(packed_dim, bool) or packed_dim not in (0, 1):
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
    """x [..., in] @ dequantize(unpack(packed))^T + bias, without materialising the weight.

    packed int32 [out, ceil(in * bits / 32)]; scale [out, groups] (or one element) finite and
    > 0; zero_point integer, scale's shape, on the bits' grid; bias float [out]."""
    _check_bits(bits)
    _check_int(in_features, "in_features", 1)
    _check_x(x, in_features)
    _check_tensor(packed, "packed")
    if packed.dtype != torch.int32:
        raise TypeError(f"packed must be int32 (as returned by pack), got {packed.dtype}")
    words = (in_features * bits + 31) // 32
    if packed.dim() != 2 or packed.shape[1] != words or packed.shape[0] == 0:
        raise ValueError(f"packed has shape {tuple(packed.shape)}, but {in_features} inputs at {bits} bits "
                         f"take [out_features, {words}] int32 words (out_features >= 1)")
    scale2d, zero2d, gs = _layout((packed.shape[0], in_features), scale, zero_point, bits)
    _check_bias(bias, packed.shape[0])
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
    if inputs.dim() == 0:
        raise ValueError("inputs must have at least one dimension [..., in_features], got a 0-d tensor: "
                         "pass inputs.reshape(1, -1) for a single token")
    if inputs.numel() == 0:
        raise ValueError(f"inputs is empty (shape {tuple(inputs.shape)}): the Hessian needs at least one "
                         "calibration token")
    _check_int(num_samples, "num_samples", 0)
    _check_bool(mirror, "mirror")
    cols = inputs.shape[-1]
    if hessian is None:
        if num_samples:
            raise ValueError(f"num_samples is {num_samples} but no hessian was given: pass the (hessian, "
                             "num_samples) pair that the previous call returned, or num_samples=0")
        h = torch.zeros(cols, cols)
    else:
        _check_hessian_accumulator(hessian, cols)
        h = hessian
    total = ops.gptq_hessian_(h, inputs, num_samples, mirror)
    # NaN or Inf anywhere in x reaches the diagonal (sums of squares): one cheap check.
    if not torch.isfinite(h.diagonal()).all():
        raise ValueError("inputs contain NaN or Inf values; check the calibration data and the layers before")
    return h, total


def _check_hessian_accumulator(hessian, cols: int) -> None:
    _check_tensor(hessian, "hessian")
    if hessian.dtype != torch.float32 or tuple(hessian.shape) != (cols, cols) or not hessian.is_contiguous():
        raise ValueError(f"hessian must be the contiguous float32 [{cols}, {cols}] accumulator that hessian() "
                         f"returned for inputs with {cols} features, got {hessian.dtype} {tuple(hessian.shape)}"
                         f"{'' if hessian.is_contiguous() else ' (not contiguous)'}")


def mirror_hessian_(hessian: Tensor) -> Tensor:
    """Complete a Hessian accumulated with mirror=False: copy its upper triangle onto the
    lower one, in place."""
    _check_tensor(hessian, "hessian")
    if (hessian.dtype != torch.float32 or hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]
            or not hessian.is_contiguous()):
        raise ValueError("hessian must be a square, contiguous float32 matrix (as hessian() returns), got "
                         f"{hessian.dtype} {tuple(hessian.shape)}")
    return ops.hessian_mirror_(hessian)


def _column_groups(h_diag: Tensor, cols: int, group_size: int, actorder: Optional[str]):
    """(processing order, group of each processed column, g_idx, column order of the parameters)."""
    natural = torch.arange(cols)
    perm = torch.argsort(h_diag, descending=True, stable=True) if actorder else natural
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
    _check_bool(symmetric, "symmetric")
    group_size = _check_group_size_arg(group_size)
    _check_float(weight, "weight")
    _check_finite(weight, "weight")
    cols = weight.shape[1]
    _check_tensor(hessian, "hessian")
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(f"hessian must be a [{cols}, {cols}] tensor for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if not (hessian.dtype.is_floating_point and hessian.dtype in FLOAT_DTYPES + (torch.float64,)):
        raise TypeError(f"hessian must be a float tensor (float32, as hessian() returns), got {hessian.dtype}")
    if not torch.isfinite(hessian).all():
        raise ValueError("hessian contains NaN or Inf values; check the calibration data and the layers before")
    if not isinstance(actorder, (str, type(None))) or actorder not in ACTORDERS:
        raise ValueError(f"actorder must be one of {ACTORDERS}, got {actorder!r}")
    if not isinstance(observer, str) or observer not in ("minmax", "mse", "imatrix_mse"):
        raise ValueError(f"observer must be 'minmax', 'mse' or 'imatrix_mse', got {observer!r}")
    _check_number(dampening_frac, "dampening_frac")
    if not 0 < dampening_frac <= 1:
        raise ValueError(f"dampening_frac must be in (0, 1], got {dampening_frac}")
    _check_int(block_size, "block_size")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive (columns per GPTQ block, e.g. 128), got {block_size}")
    gs = _group_size(cols, QuantizationArgs(num_bits=bits, symmetric=symmetric, observer=observer,
                                            strategy="group" if group_size else "channel", group_size=group_size))
    w, h = weight.float().clone(), hessian.float().contiguous()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    w[:, dead] = 0
    # H[dead, dead] = 1, as the solve does it too
    perm, col_group, g_idx, param_order = _column_groups(torch.diag(h).masked_fill(dead, 1), cols, gs, actorder)
    # imatrix_mse weighs the range search by E[x^2] per input column: H's diagonal (H = 2/n X^T X)
    importance = torch.diag(h)[param_order] if observer == "imatrix_mse" else None
    search = _search_args(QuantizationArgs(num_bits=bits, observer=observer), cols, importance)
    scale, zero = ops.quant_params(w[:, param_order].to(weight.dtype).contiguous(), bits, symmetric, gs, **search)
    codes, updated, loss, damping = ops.gptq_solve(w[:, perm].contiguous(), h, perm, scale, zero, col_group, bits,
                                                   block_size, dampening_frac)
    inverse = torch.argsort(perm)
    return GPTQResult(codes[:, inverse], scale, zero, g_idx, loss, updated[:, inverse], damping)


# ---------------------------------------------------------------- AWQ


def awq_channel_stats(inputs: Tensor, sum_abs: Optional[Tensor] = None, count: int = 0) -> Tuple[Tensor, int]:
    """Stream AWQ's activation statistic: (sum over tokens of |x| per input channel as float64,
    tokens so far); mean |x| is sum_abs / count. Pass the previous pair to add a batch (the
    accumulator is updated in place)."""
    _check_float(inputs, "inputs", dims=None)
    if inputs.dim() == 0 or inputs.numel() == 0:
        raise ValueError(f"inputs must be a non-empty [..., in_features] tensor, got shape {tuple(inputs.shape)}: "
                         "AWQ's statistics need at least one calibration token")
    _check_int(count, "count", 0)
    cols = inputs.shape[-1]
    if sum_abs is None:
        if count:
            raise ValueError(f"count is {count} but no sum_abs was given: pass the (sum_abs, count) pair that the "
                             "previous call returned, or count=0")
        acc = torch.zeros(cols, dtype=torch.float64)
    else:
        _check_tensor(sum_abs, "sum_abs")
        if sum_abs.dtype != torch.float64 or tuple(sum_abs.shape) != (cols,) or not sum_abs.is_contiguous():
            raise ValueError(f"sum_abs must be the contiguous float64 [{cols}] accumulator that awq_channel_stats "
                             f"returned, got {sum_abs.dtype} {tuple(sum_abs.shape)}")
        acc = sum_abs
    return acc, ops.awq_channel_stats_(acc, inputs, count)


def awq_grid(duo_scaling: Union[bool, str] = True, n_grid: int = 20) -> List[Tuple[float, bool]]:
    """The (ratio, duo scaling) grid points, as llmcompressor walks them: duo_scaling True
    adds the identity point (0, False) before n_grid - 1 duo points; "both" interleaves
    n_grid / 2 ratios with and without duo scaling."""
    if not (isinstance(duo_scaling, bool) or (isinstance(duo_scaling, str) and duo_scaling == "both")):
        raise ValueError(f"duo_scaling must be True, False or 'both', got {duo_scaling!r}")
    # duo scaling: the identity point plus n_grid - 1 ratios i / (n_grid - 2), so at least 3
    least = 4 if duo_scaling == "both" else 3 if duo_scaling else 2
    if isinstance(n_grid, bool) or not isinstance(n_grid, int) or n_grid < least:
        raise ValueError(f"n_grid must be an integer >= {least} for duo_scaling={duo_scaling!r}, got {n_grid!r}")
    if duo_scaling == "both":
        n = n_grid // 2
        return [(i / (n - 1), duo) for i in range(n) for duo in (False, True)]
    if duo_scaling:
        return [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]
    return [(i / (n_grid - 1), False) for i in range(n_grid)]


def awq_scales(x_mean: Tensor, w_mean: Optional[Tensor], ratio: float, duo_scaling: bool) -> Tensor:
    """AWQ's per-channel scales for one grid point: x_mean^r (/ (w_mean^(1-r) + 1e-4) with duo
    scaling), at least 1e-4, divided by sqrt(max * min); non-finite entries become 1."""
    _check_mean(x_mean, "x_mean")
    ratio = _check_number(ratio, "ratio")
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    _check_bool(duo_scaling, "duo_scaling")
    if duo_scaling:
        _check_mean(w_mean, "w_mean")
        if w_mean.shape != x_mean.shape:
            raise ValueError(f"w_mean has shape {tuple(w_mean.shape)} but x_mean has {tuple(x_mean.shape)}: "
                             "they must match (one entry per input channel)")
    x_mean = x_mean.float()
    if duo_scaling:
        s = (x_mean.pow(ratio) / (w_mean.float().pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return torch.where(torch.isfinite(s), s, torch.ones_like(s))


def _check_mean(t, name: str) -> None:
    _check_tensor(t, name)
    if t.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"{name} must be a float tensor, got {t.dtype}")
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be 1-D with one entry per input channel, got shape {tuple(t.shape)}")


def awq_weight_mean(weight: Tensor, group_size: int) -> Tensor:
    """llmcompressor's w_mean: |w| / its group's absmax (+1e-6), averaged over output rows."""
    _check_float(weight, "weight")
    _check_int(group_size, "group_size", 1)
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"group_size {group_size} does not divide the {cols} input columns")
    w = weight.float().abs().reshape(-1, group_size)
    return (w / (w.amax(1, keepdim=True) + 1e-6)).reshape(rows, cols).mean(0, dtype=torch.float64).float()


class AWQSearchResult(NamedTuple):
    scales: Tensor        # float32 [cols]: multiply the weight's columns, divide the input
    ratio: float          # the chosen grid point; -1 when no point had a finite loss
    duo_scaling: bool
    losses: List[float]   # ||X D^T||^2 of every grid point, in awq_grid order
    identity_loss: float  # the loss without scaling (plain RTN)


def _awq_group_size(weight: Tensor, gram: Tensor, bits: int, group_size: Optional[int]) -> int:
    """Check an AWQ search's weight, Gram matrix and bits; the group size (None: whole rows)."""
    _check_bits(bits)
    group_size = _check_group_size_arg(group_size)
    _check_float(weight, "weight")
    _check_finite(weight, "weight")
    cols = weight.shape[1]
    _check_tensor(gram, "gram")
    if tuple(gram.shape) != (cols, cols):
        raise ValueError(f"gram must be a [{cols}, {cols}] tensor for a weight of shape {tuple(weight.shape)}, "
                         f"got {tuple(gram.shape)}")
    if gram.dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"gram must be a float tensor (X^T X), got {gram.dtype}")
    gs = group_size or cols
    if cols % gs:
        raise ValueError(f"group_size {gs} does not divide the {cols} input columns; pick a divisor of {cols} "
                         "or None (whole rows)")
    return gs


def awq_search(weight: Tensor, gram: Tensor, x_mean: Tensor, *, bits: int = 4, group_size: Optional[int] = 128,
               symmetric: bool = False, duo_scaling: Union[bool, str] = True, n_grid: int = 20) -> AWQSearchResult:
    """AWQ's scale search for the layers that share one input (their weights concatenated
    along rows, [rows, cols]). gram: X^T X of that input [cols, cols] (hessian() gives it up
    to a constant factor); x_mean: mean |x| per channel. Each grid point is scored by the C++
    kernel on the output error of the group-quantized, scaled weight. If no point gives a
    finite loss the scales are 1 (identity), with a warning."""
    gs = _awq_group_size(weight, gram, bits, group_size)
    _check_bool(symmetric, "symmetric")
    cols = weight.shape[1]
    _check_mean(x_mean, "x_mean")
    if tuple(x_mean.shape) != (cols,):
        raise ValueError(f"x_mean must be a [{cols}] tensor (mean |x| per input channel), got {tuple(x_mean.shape)}")
    grid = awq_grid(duo_scaling, n_grid)
    w_mean = awq_weight_mean(weight, gs) if any(duo for _, duo in grid) else None
    factor = ops.awq_gram_factor(gram)  # once: each grid point is then a triangular product
    losses = []
    for ratio, duo in grid:
        losses.append(ops.awq_scale_loss(weight, factor, awq_scales(x_mean, w_mean, ratio, duo), bits, gs, symmetric))
    identity = ops.awq_scale_loss(weight, factor, torch.ones(cols), bits, gs, symmetric)
    finite = [i for i, loss in enumerate(losses) if loss == loss and loss != float("inf")]
    if not finite:
        warnings.warn("AWQ: no grid point gave a finite loss (NaN or Inf in the statistics or weights?); "
                      "keeping identity scales", stacklevel=2)
        return AWQSearchResult(torch.ones(cols), -1.0, False, losses, identity)
    best = min(finite, key=lambda i: losses[i])  # the first of equal losses, as llmcompressor keeps it
    ratio, duo = grid[best]
    return AWQSearchResult(awq_scales(x_mean, w_mean, ratio, duo), ratio, duo, losses, identity)


def awq_clip(weight: Tensor, gram: Tensor, *, bits: int = 4, group_size: Optional[int] = 128,
             symmetric: bool = False, n_grid: int = 20, max_shrink: float = 0.5) -> Tensor:
    """AWQ's clip search: for each (row, group) the bound absmax * (1 - i / n_grid),
    i < max_shrink * n_grid, that minimises the group's output error once clamped and
    quantized, on all calibration tokens through gram = X^T X. Returns the bounds
    [rows, groups] (float32); clamp the weight's groups to +-bound before quantizing."""
    gs = _awq_group_size(weight, gram, bits, group_size)
    _check_bool(symmetric, "symmetric")
    _check_int(n_grid, "n_grid", 1)
    _check_number(max_shrink, "max_shrink")
    if not 0 <= max_shrink < 1 or n_grid <= 0:
        raise ValueError(f"clip search needs n_grid > 0 and 0 <= max_shrink < 1, got {n_grid}, {max_shrink}")
    return ops.awq_clip(weight, gram, bits, gs, symmetric, n_grid, max_shrink)


class NF4QuantState(NamedTuple):
    """What bitsandbytes keeps beside 4-bit codes (its QuantState)."""

    absmax: Tensor        # float32 [ceil(numel / blocksize)]; uint8 codes when double-quantized
    shape: torch.Size     # of the original tensor
    dtype: torch.dtype    # of the original tensor (dequantize casts back to it)
    blocksize: int
    quant_type: str       # "nf4" or "fp4"
    nested_absmax: Optional[Tensor] = None  # double quantization: float32 [ceil(blocks / 256)]
    offset: Optional[Tensor] = None         # double quantization: mean absmax, float32 0-d

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None


NESTED_BLOCKSIZE = 256  # bitsandbytes' blocksize for the absmax values


def nf4_quantize(w: Tensor, blocksize: int = 64, quant_type: str = "nf4",
                 double_quant: bool = False) -> Tuple[Tensor, NF4QuantState]:
    """Blockwise NF4 / FP4 quantization, bit for bit as bitsandbytes' quantize_4bit: the
    tensor is flattened row-major, each block of `blocksize` (a power of two, 32..4096)
    elements scaled by its absmax and mapped to the nearest of 16 codes; two codes per byte,
    the first in the high nibble. Returns (packed uint8 [(numel + 1) // 2, 1], state).
    An all-zero block stores the code of 0 (NF4 7, FP4 0) and absmax 0 (1e-38 for a final
    partial block), as bitsandbytes' CPU path does. double_quant: the absmax values, less
    their mean, are themselves quantized to 8 bits in blocks of 256 against bitsandbytes'
    signed dynamic map, with its CPU library's binning (compress_statistics=True)."""
    _check_float(w, "w", dims=None)
    if w.numel() == 0:
        raise ValueError("w is empty: nothing to quantize")
    _check_blocksize(blocksize)
    _check_quant_type(quant_type)
    _check_bool(double_quant, "double_quant")
    _check_finite(w, "w")
    packed, absmax = ops.nf4_quantize(w, blocksize, quant_type)
    if not double_quant:
        return packed, NF4QuantState(absmax, w.shape, w.dtype, blocksize, quant_type)
    offset = absmax.mean()
    codes, nested = ops.blockwise8_quantize(absmax - offset, DYNAMIC_MAP, NESTED_BLOCKSIZE)
    return packed, NF4QuantState(codes, w.shape, w.dtype, blocksize, quant_type, nested, offset)


def _check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or not 32 <= blocksize <= 4096 \
            or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")
    return blocksize


def _check_quant_type(quant_type) -> str:
    if not isinstance(quant_type, str) or quant_type not in ("nf4", "fp4"):
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return quant_type


def check_nf4_state(packed: Tensor, state: "NF4QuantState", prefix: str = "") -> int:
    """Validate 4-bit codes and their quant state (as nf4_quantize returns them, or as loaded
    from a checkpoint); raise ValueError / TypeError naming the bad field. Returns numel."""
    if not isinstance(state, NF4QuantState):
        raise TypeError(f"state must be the NF4QuantState that nf4_quantize returned, got {type(state).__name__}")
    if not isinstance(state.shape, (tuple, list, torch.Size)) or len(state.shape) == 0 or any(
            isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in state.shape):
        raise ValueError(f"{prefix}state.shape must be a non-empty tuple of ints >= 0, got {state.shape!r}")
    numel = 1
    for d in state.shape:
        numel *= d
    if numel == 0:
        raise ValueError(f"{prefix}state.shape {tuple(state.shape)} holds no elements")
    if not isinstance(state.dtype, torch.dtype) or state.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{prefix}state.dtype must be float32, float16 or bfloat16, got {state.dtype!r}")
    _check_blocksize(state.blocksize)
    _check_quant_type(state.quant_type)
    _check_tensor(packed, f"{prefix}packed")
    if packed.dtype != torch.uint8:
        raise TypeError(f"{prefix}packed must be uint8 (two 4-bit codes per byte), got {packed.dtype}")
    if packed.numel() != (numel + 1) // 2:
        raise ValueError(f"{prefix}packed has {packed.numel()} bytes, but {numel} codes take {(numel + 1) // 2}: "
                         "packed bytes do not hold this state's shape")
    blocks = -(-numel // state.blocksize)
    _check_tensor(state.absmax, f"{prefix}absmax")
    if tuple(state.absmax.shape) != (blocks,):
        raise ValueError(f"{prefix}absmax has {state.absmax.numel()} entries (shape {tuple(state.absmax.shape)}), "
                         f"expected shape ({blocks},): one per block of {state.blocksize}")
    if state.nested_absmax is None:
        if state.offset is not None:
            raise ValueError(f"{prefix}offset is set but nested_absmax is not: a double-quantized state needs both")
        if state.absmax.dtype != torch.float32:
            raise TypeError(f"{prefix}absmax must be float32 (uint8 only when double-quantized), "
                            f"got {state.absmax.dtype}")
        _check_absmax_values(state.absmax, f"{prefix}absmax")
        return numel
    if state.absmax.dtype != torch.uint8:
        raise TypeError(f"{prefix}absmax of a double-quantized state must hold uint8 codes, got {state.absmax.dtype}")
    _check_tensor(state.nested_absmax, f"{prefix}nested_absmax")
    nested = -(-blocks // NESTED_BLOCKSIZE)
    if state.nested_absmax.dtype != torch.float32:
        raise TypeError(f"{prefix}nested_absmax must be float32, got {state.nested_absmax.dtype}")
    if tuple(state.nested_absmax.shape) != (nested,):
        raise ValueError(f"{prefix}nested absmax has {state.nested_absmax.numel()} entries, expected {nested} "
                         f"(shape ({nested},))")
    _check_absmax_values(state.nested_absmax, f"{prefix}nested_absmax")
    _check_offset(state)
    _check_tensor(state.offset, f"{prefix}offset")
    if state.offset.dtype != torch.float32 or state.offset.numel() != 1:
        raise ValueError(f"{prefix}offset must be a float32 tensor of one value (the mean absmax), got "
                         f"{state.offset.dtype} {tuple(state.offset.shape)}")
    if _checking_values() and not torch.isfinite(state.offset).all():
        raise ValueError(f"{prefix}offset must be finite, got {state.offset.item()}")
    return numel


def _check_absmax_values(absmax: Tensor, name: str) -> None:
    if not _checking_values():
        return
    if absmax.numel() and not (torch.isfinite(absmax) & (absmax >= 0)).all():
        raise ValueError(f"{name} must be finite and >= 0 (block absolute maxima), got values such as "
                         f"{absmax[~(torch.isfinite(absmax) & (absmax >= 0))][:3].tolist()}")


def nf4_dequantize(packed: Tensor, state: NF4QuantState) -> Tensor:
    """code[nibble] * absmax[block] in fp32, cast to state.dtype, in state.shape (the absmax
    values decoded first when double-quantized)."""
    numel = check_nf4_state(packed, state)
    return ops.nf4_dequantize(packed, _plain_absmax(state), state.blocksize, state.quant_type, numel,
                              state.dtype).reshape(state.shape)


def nf4_linear(x: Tensor, packed: Tensor, state: NF4QuantState, bias: Optional[Tensor] = None) -> Tensor:
    """x [..., in] @ W^T (+ bias) for a [out, in] weight quantized by nf4_quantize, with the
    codes decoded inside the C++ loop (the weight is never materialised whole); in must be a
    multiple of the blocksize (transformers' checkpoints always are). Returns x.dtype."""
    if not isinstance(state, NF4QuantState):
        raise TypeError(f"state must be the NF4QuantState that nf4_quantize returned, got {type(state).__name__}")
    if not isinstance(state.shape, (tuple, list, torch.Size)) or len(state.shape) != 2:
        raise ValueError(f"nf4_linear needs a 2-D [out, in] weight, the state holds shape {tuple(state.shape)}")
    check_nf4_state(packed, state)
    out_features, in_features = state.shape
    if in_features % state.blocksize:
        raise ValueError(f"in_features {in_features} must be a multiple of the blocksize {state.blocksize} for the "
                         "fused kernel: use nf4_dequantize + torch.nn.functional.linear")
    _check_x(x, in_features)
    _check_bias(bias, out_features)
    if not state.double_quant:
        return ops.nf4_linear(x, packed, state.absmax, state.blocksize, state.quant_type, out_features, bias)
    return ops.nf4_linear(x, packed, state.absmax, state.blocksize, state.quant_type, out_features, bias,
                          state.nested_absmax, DYNAMIC_MAP, state.offset.reshape(()))


def _check_offset(state: NF4QuantState) -> None:
    if state.offset is None:
        raise ValueError("a double-quantized state needs its offset (the mean absmax)")


def _plain_absmax(state: NF4QuantState) -> Tensor:
    if not state.double_quant:
        return state.absmax
    _check_offset(state)
    return ops.blockwise8_dequantize(state.absmax, state.nested_absmax, DYNAMIC_MAP, NESTED_BLOCKSIZE) + state.offset


# bitsandbytes' signed 8-bit dynamic map, the code of double-quantized absmax values (the
# published map is data, not a kernel: built once by the reference's transcription).
DYNAMIC_MAP = _reference_nf4.dynamic_map()


class Int8Rowwise(NamedTuple):
    """LLM.int8()'s vector-wise quantization of a matrix's rows."""

    codes: Tensor         # int8, the input's shape; outlier columns 0
    absmax: Tensor        # float32 [rows] (bitsandbytes' row stats; SCB for a weight)
    outlier_cols: Tensor  # int64 indices of the input columns holding any |x| >= threshold


def _check_threshold(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < float("inf"):
        raise ValueError(f"threshold must be a number >= 0 and finite (0 disables the outlier decomposition), "
                         f"got {threshold!r}")
    return float(threshold)


def int8_quantize_rowwise(x: Tensor, threshold: float = 0.0) -> Int8Rowwise:
    """bitsandbytes' int8_vectorwise_quant: each row of x (cast to float16 first) scaled by its
    absmax to round(v * 127 / absmax). With threshold > 0, values with |v| >= threshold are left
    out of the absmax and every column holding one is coded 0 (it runs in floating point).
    A weight's absmax is bitsandbytes' SCB."""
    _check_float(x, "x", dims=None)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty tensor with at least one dimension, got shape {tuple(x.shape)}")
    return Int8Rowwise(*ops.int8_quantize_rowwise(x, _check_threshold(threshold)))


def int8_outlier_matmul(x: Tensor, w_int8: Tensor, w_scale: Tensor, threshold: float = 6.0,
                        bias: Optional[Tensor] = None) -> Tensor:
    """LLM.int8(): x [..., in] @ W^T (+ bias) for W stored as int8 codes [out, in] with row
    scales w_scale [out] (bitsandbytes' SCB; W = codes * SCB / 127). x is quantized per token;
    the input columns holding any |x| >= threshold are multiplied in floating point against the
    dequantized weight columns, the rest as int8 x int8 -> int32 (AVX512-VNNI where present),
    rescaled by absmax(token) * SCB / 127^2. Returns x.dtype."""
    _check_float(x, "x", dims=None)
    _check_tensor(w_int8, "w_int8")
    if w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise TypeError(f"w_int8 must be a 2-D int8 tensor of codes [out, in], got {w_int8.dtype} "
                        f"{tuple(w_int8.shape)}")
    if w_int8.numel() == 0:
        raise ValueError(f"w_int8 is empty (shape {tuple(w_int8.shape)}): a layer needs at least one input and "
                         "one output feature")
    if w_scale is None:
        raise ValueError("w_scale (the weight's SCB, one absmax per output row) is missing")
    _check_float(w_scale, "w_scale", dims=None)
    if tuple(w_scale.shape) != (w_int8.shape[0],):
        raise ValueError(f"w_scale (SCB) must have one entry per output row ({w_int8.shape[0]}), shape "
                         f"({w_int8.shape[0]},), got shape {tuple(w_scale.shape)}")
    _check_absmax_values(w_scale, "w_scale (SCB)")
    _check_x(x, w_int8.shape[1])
    _check_bias(bias, w_int8.shape[0])
    return ops.int8_outlier_matmul(x, w_int8, w_scale, _check_threshold(threshold), bias)


# ---------------------------------------------------------------- FP8

FP8_FORMATS = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}
Block = Union[str, Tuple[int, int]]


def _check_fp8_format(format) -> str:
    if not isinstance(format, str) or format not in FP8_FORMATS:
        raise ValueError(f"format must be 'e4m3' (torch.float8_e4m3fn, max 448) or 'e5m2' (torch.float8_e5m2, "
                         f"max 57344), got {format!r}")
    return format


def _fp8_block(block, shape: Sequence[int]) -> Tuple[int, int]:
    """(block_rows, block_cols) of a [rows, cols] tensor: "tensor" (one tile), "channel" / "token"
    (one tile per row), or a pair of positive ints (partial tiles at the edges)."""
    rows, cols = shape
    if block == "tensor":
        return max(rows, 1), max(cols, 1)
    if block in ("channel", "token"):
        return 1, max(cols, 1)
    if (isinstance(block, (tuple, list)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        return int(block[0]), int(block[1])
    raise ValueError(f"block must be 'tensor', 'channel', 'token' or a pair (block_rows, block_cols) of positive "
                     f"ints such as (128, 128), got {block!r}")


def _fp8_scale_2d(scale, shape: Sequence[int], block, name: str = "scale") -> Tuple[Tensor, int, int]:
    """scale as [ceil(rows / block_rows), ceil(cols / block_cols)] with the block it implies. block
    None: read from the scale's shape, for tiles that divide the tensor evenly (one element: per
    tensor; a dimension of 1: whole rows / columns; otherwise its size must divide the tensor's).
    Partial edge tiles need an explicit block: [2, 1] scales of 4 rows could be tiles of 2 or 3."""
    _check_tensor(scale, name)
    if scale.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {scale.dtype}")
    rows, cols = shape
    if scale.numel() == 1 and scale.dim() <= 1:
        scale = scale.reshape(1, 1)
    if scale.dim() != 2:
        raise ValueError(f"{name} must be 2-D [row tiles, column tiles] (or one element), got shape "
                         f"{tuple(scale.shape)}")
    if block is None:
        def size(n, s):  # the tile length along a dimension of n elements holding s scales
            if s == 1 or n == s == 0:
                return max(n, 1)
            if s > 0 and n % s == 0:
                return n // s
            raise ValueError(f"{name} of shape {tuple(scale.shape)} does not tile a [{rows}, {cols}] tensor evenly: "
                             "pass block=(block_rows, block_cols)")
        br, bc = size(rows, scale.shape[0]), size(cols, scale.shape[1])
    else:
        br, bc = _fp8_block(block, shape)
    expected = (-(-rows // br), -(-cols // bc))
    if tuple(scale.shape) != expected:
        raise ValueError(f"{name} has shape {tuple(scale.shape)}, but a [{rows}, {cols}] tensor in {br} x {bc} tiles "
                         f"takes {list(expected)} (one scale per tile)")
    _check_scale_values(scale, name)
    return scale, br, bc


def _check_fp8_input(x, name: str = "x") -> None:
    _check_float(x, name, dims=None)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, cols], got shape {tuple(x.shape)}")


def fp8_scales(x: Tensor, block: Block = "channel", format: str = "e4m3") -> Tensor:
    """FP8 scales of x [rows, cols] as compressed-tensors computes them: absmax / max (448 for
    E4M3, 57344 for E5M2) of each tile, 0 -> finfo(x.dtype).eps, in x.dtype, shape
    [ceil(rows / block_rows), ceil(cols / block_cols)]. block: "tensor", "channel" / "token"
    (a scale per row) or (block_rows, block_cols), e.g. (1, 128) per token group or (128, 128)
    for FP8_BLOCK. x must be finite."""
    _check_fp8_input(x)
    return ops.fp8_scales(x, *_fp8_block(block, x.shape), _check_fp8_format(format))


def fp8_quantize(x: Tensor, scale: Optional[Tensor] = None, block: Optional[Block] = None,
                 format: str = "e4m3") -> Tuple[Tensor, Tensor]:
    """(codes, scale): x [rows, cols] as torch.float8_e4m3fn (or float8_e5m2) codes
    clamp(x / scale, -max, max) rounded to nearest even (x / scale in fp32). Without `scale` the
    scales come from fp8_scales(x, block or "channel"); with it, block defaults to what the
    scale's shape implies. NaN in x raises; +-Inf saturates to +-max."""
    _check_fp8_input(x)
    format = _check_fp8_format(format)
    if scale is None:
        scale = fp8_scales(x, "channel" if block is None else block, format)
    scale2d, br, bc = _fp8_scale_2d(scale, x.shape, block)
    return ops.fp8_quantize(x, scale2d, br, bc, format), scale


def fp8_dequantize(q: Tensor, scale: Tensor, block: Optional[Block] = None,
                   dtype: Optional[torch.dtype] = None) -> Tensor:
    """float(q) * scale in fp32, as `dtype` (default: scale's dtype); q [rows, cols] FP8 codes,
    block as in fp8_quantize (read from the scale's shape when None)."""
    _check_tensor(q, "q")
    if q.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"q must be torch.float8_e4m3fn or torch.float8_e5m2 codes (as fp8_quantize returns), got "
                        f"{q.dtype}")
    if q.dim() != 2:
        raise ValueError(f"q must be 2-D [rows, cols], got shape {tuple(q.shape)}")
    scale2d, br, bc = _fp8_scale_2d(scale, q.shape, block)
    dtype = scale.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return ops.fp8_dequantize(q, scale2d, br, bc, dtype)


def fp8_fake_quantize(x: Tensor, scale: Optional[Tensor] = None, block: Optional[Block] = None,
                      format: str = "e4m3") -> Tensor:
    """fp8_dequantize(fp8_quantize(x)) in one pass, in x.dtype: how an FP8 scheme's forward sees
    activations. x [..., cols] is taken as [tokens, cols]; without `scale` the scales are dynamic,
    from fp8_scales(x, block or "token"); with it (e.g. a static per-tensor input_scale), block
    defaults to what its shape implies."""
    _check_float(x, "x", dims=None)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., cols], got a 0-d tensor")
    format = _check_fp8_format(format)
    x2d = x.reshape(-1, x.shape[-1])
    if scale is None:
        scale = fp8_scales(x2d, "token" if block is None else block, format)
    scale2d, br, bc = _fp8_scale_2d(scale, x2d.shape, block)
    return ops.fp8_fake_quantize(x2d, scale2d, br, bc, format).reshape(x.shape)


def fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Optional[Tensor] = None,
               block: Optional[Block] = None) -> Tensor:
    """x [..., in] @ fp8_dequantize(weight)^T + bias without materialising the weight: an FP8
    weight [out, in] (E4M3 or E5M2) with scales [out, 1] (per channel), one element (per tensor)
    or [ceil(out / block_rows), ceil(in / block_cols)] (blocks: pass block when they do not tile
    the weight evenly). The codes are decoded inside the C++ matmul (AVX-512 / AVX2 in registers
    for up to 64 tokens, ATen's GEMM on decoded tiles beyond); fp32 accumulation, x.dtype out."""
    _check_tensor(weight, "weight")
    if weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"weight must be torch.float8_e4m3fn or torch.float8_e5m2 codes, got {weight.dtype}: "
                        "quantize it with fp8_quantize")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    scale2d, br, bc = _fp8_scale_2d(weight_scale, weight.shape, block, "weight_scale")
    _check_x(x, weight.shape[1])
    _check_bias(bias, weight.shape[0])
    return ops.fp8_linear(x, weight, scale2d, br, bc, bias)


# ---------------------------------------------------------------- SmoothQuant


def channel_range(x: Tensor, mins: Optional[Tensor] = None, maxs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """SmoothQuant's activation statistic: the running minimum and maximum of each channel of
    x [..., C] over its tokens, as float32 [C]. Pass the previous (mins, maxs) to add a batch
    (they are updated in place); the first call starts from +inf / -inf. NaN or Inf in x raises
    ValueError and leaves the pair unchanged."""
    _check_float(x, "x", dims=None)
    if x.dim() == 0 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [..., channels] tensor, got shape {tuple(x.shape)}: the statistic "
                         "needs at least one calibration token")
    channels = x.shape[-1]
    if (mins is None) != (maxs is None):
        raise ValueError("pass both mins and maxs (the pair channel_range returned), or neither to start")
    if mins is None:
        mins, maxs = torch.full((channels,), float("inf")), torch.full((channels,), float("-inf"))
    for name, t in (("mins", mins), ("maxs", maxs)):
        _check_tensor(t, name)
        if t.dtype != torch.float32 or tuple(t.shape) != (channels,) or not t.is_contiguous():
            raise ValueError(f"{name} must be the contiguous float32 [{channels}] tensor that channel_range returned "
                             f"for inputs with {channels} channels, got {t.dtype} {tuple(t.shape)}")
    ops.channel_range_(mins, maxs, x)
    return mins, maxs
