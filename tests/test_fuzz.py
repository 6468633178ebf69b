"""Property-based fuzzing (hypothesis) of every lowbit.functional op, every lowbit.nn module
and every raw op (torch.ops.lowbit.*).

Each case draws shapes (0, 1 and odd sizes included), dtypes, layouts (contiguous,
transposed, sliced views), value magnitudes, bit widths and group / block sizes, then either
keeps the call valid, where the result must match lowbit.reference (the pure-PyTorch oracle,
with the tolerances of test_quantize / test_packed_linear / test_nf4 / test_int8), or breaks
one argument (wrong dtype: int, bool, complex, float64; wrong shape; NaN / Inf; a meta
tensor; a value out of range; a bool or float where an int belongs), where the call must
raise ValueError or TypeError.

The raw ops run in a child process (this file run as a script), so a crash in a kernel fails
the test instead of killing pytest. Profiles: "ci" (default, derandomized) and "thorough"
(`pytest --hypothesis-profile=thorough`); see conftest.py. The terminal summary prints how
many cases were generated.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from torch import nn

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, note, strategies as st  # noqa: E402

import lowbit  # noqa: E402,F401
from lowbit import functional as F  # noqa: E402
from lowbit.nn import Int8DynamicLinear, Int8OutlierLinear, NF4Linear, PackedLinear  # noqa: E402
from lowbit.reference import awq as RA  # noqa: E402
from lowbit.reference import fp8 as R8  # noqa: E402
from lowbit.reference import gptq as RG  # noqa: E402
from lowbit.reference import int8 as RI  # noqa: E402
from lowbit.reference import nf4 as RN  # noqa: E402
from lowbit.reference import quant as RQ  # noqa: E402
from lowbit.reference import smoothquant as RS  # noqa: E402

try:
    from conftest import FUZZ_COUNTS
except ImportError:  # run as a script (the raw-op child process)
    FUZZ_COUNTS = {"valid": 0, "invalid": 0}

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
FP8S = (torch.float8_e4m3fn, torch.float8_e5m2)
BAD_DTYPES = (torch.float64, torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64)
ERRORS = (ValueError, TypeError)
# (rtol, atol as a fraction of the output's largest magnitude), as test_packed_linear
LINEAR_TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


# ------------------------------------------------------------------------------- helpers

_CASE = {"kind": None}


def counted(test):
    """Count each generated case once, as valid or invalid (the conftest summary prints them)."""
    @functools.wraps(test)
    def run(*args, **kwargs):
        _CASE["kind"] = None
        test(*args, **kwargs)
        if _CASE["kind"]:
            FUZZ_COUNTS[_CASE["kind"]] += 1
    return run


def valid():
    _CASE["kind"] = "valid"


def expect_error(call, name=None):
    """The call must raise ValueError / TypeError (naming `name` when given)."""
    try:
        call()
    except ERRORS as e:
        if name is not None:
            assert name in str(e), f"the error does not name {name!r}: {e}"
    else:
        raise AssertionError(f"expected ValueError / TypeError{f' about {name}' if name else ''}, got a result")
    _CASE["kind"] = _CASE["kind"] or "invalid"


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as a contiguous tensor, a transposed view or a sliced view."""
    if t.dim() != 2 or how == "contiguous":
        return t.contiguous()
    if how == "transpose":
        return t.t().contiguous().t()
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], dtype=t.dtype)
    wide[:, ::2] = t
    return wide[:, ::2]


def retype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t cast to a (usually wrong) dtype, its values kept where they fit."""
    if dtype.is_complex:
        return t.float().to(dtype)
    if dtype == torch.bool:
        return t != 0
    if not dtype.is_floating_point:
        return t.float().clamp(-100, 100).round().to(dtype)
    return t.to(dtype)


def poison(t: torch.Tensor, value: float, gen_seed: int) -> torch.Tensor:
    """A copy of t (same layout) with one element set to value."""
    t = t.clone()
    if t.numel():
        t[tuple(int(i) for i in torch.unravel_index(torch.tensor(gen_seed % t.numel()), t.shape))] = value
    return t


def weight_values(rows, cols, dtype, seed, magnitude=0.05):
    g = generator(seed)
    w = torch.randn(rows, cols, generator=g) * magnitude
    w = torch.where(torch.rand(rows, cols, generator=g) < 0.05, w * 6, w)
    return w.to(dtype)


def close(got, expected, dtype, scale_of=None):
    rtol, atol = LINEAR_TOL[dtype]
    ref = expected if scale_of is None else scale_of
    atol = atol * max(ref.float().abs().max().item() if ref.numel() else 0.0, 1e-6)
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)


SEEDS = st.integers(0, 2**31 - 1)
LAYOUTS = st.sampled_from(["contiguous", "transpose", "slice"])
DTYPES = st.sampled_from(FLOATS)
BAD_INTS = st.sampled_from([True, 4.0, "4", None, -1, 0])
BAD_NUMBERS = [float("nan"), float("inf"), -1.0, True, "0.1"]


def group_layout(draw, strategy, max_groups=4):
    """(rows, cols, group size) for a strategy; odd and size-1 dimensions included."""
    rows = draw(st.sampled_from([1, 2, 3, 5, 8, 13]))
    if strategy == "group":
        gs = draw(st.sampled_from([1, 2, 3, 8, 16, 32, 48]))
        cols = gs * draw(st.integers(1, max_groups))
    else:
        cols = draw(st.sampled_from([1, 2, 3, 7, 16, 33, 64]))
        gs = cols
    return rows, cols, gs


def ref_params(w, bits, symmetric, strategy, gs, observer, importance=None):
    rows, cols = w.shape
    kw = {}
    if observer == "imatrix_mse":  # lowbit.functional's imatrix search settings, normalised weights
        imp = importance.float() / (importance.float().mean() + torch.finfo(torch.float32).tiny)
        kw = dict(F.IMATRIX_SEARCH, importance=imp.repeat(rows) if strategy == "tensor" else imp)
    if strategy == "tensor":
        s, z = RQ.quant_params(w.reshape(1, -1), bits, symmetric, w.numel(), observer, **kw)
        return s.reshape(1), z.reshape(1), s.expand(rows, 1), z.expand(rows, 1), cols
    s, z = RQ.quant_params(w, bits, symmetric, gs, observer, **kw)
    return s, z, s, z, gs


def per_row(t, rows):
    return t.reshape(1, 1).expand(rows, 1) if t.dim() == 1 else t


def recon_error(w, s2d, z2d, bits, gs, norm=2.4, reduce=True):
    d = RQ.dequantize(RQ.quantize(w, s2d, z2d, bits, gs), s2d, z2d, gs, torch.float32) - w.float()
    e = d.abs().pow(norm).reshape(w.shape[0], -1, gs)
    return e.sum(-1) if reduce else e


# ------------------------------------------------------------ quant_params / quantize / fake

QUANT_MUTATIONS = ["dtype", "nan", "inf", "dim1", "dim3", "empty", "bits", "group_size", "group_not_dividing",
                   "strategy", "observer", "symmetric", "not_tensor", "meta", "importance"]


def draw_quantization(draw):
    """(strategy, rows, cols, group size, bits, symmetric) of a weight to quantize."""
    strategy = draw(st.sampled_from(["group", "channel", "tensor"]))
    rows, cols, gs = group_layout(draw, strategy)
    return strategy, rows, cols, gs, draw(st.integers(2, 8)), draw(st.booleans())


@given(data=st.data())
@counted
def test_fuzz_quantize(data):
    draw = data.draw
    strategy, rows, cols, gs, bits, symmetric = draw_quantization(draw)
    observer = draw(st.sampled_from(["minmax", "minmax", "mse", "imatrix_mse"]))
    dtype, how, seed = draw(DTYPES), draw(LAYOUTS), draw(SEEDS)
    magnitude = draw(st.sampled_from([1e-3, 0.05, 1.0, 300.0]))
    mutation = draw(st.one_of(st.none(), st.sampled_from(QUANT_MUTATIONS)))
    w = layout(weight_values(rows, cols, dtype, seed, magnitude), how)
    kw = dict(bits=bits, symmetric=symmetric, strategy=strategy, group_size=gs if strategy == "group" else None,
              observer=observer)
    if observer == "imatrix_mse":  # E[x^2]-like weights: non-negative, some columns dominant
        kw["importance"] = torch.rand(cols, generator=generator(seed)) ** 4 * draw(st.sampled_from([1e-6, 1.0, 1e4]))
    note(f"w {tuple(w.shape)} {dtype} {how}, {kw}, mutation {mutation}")
    fns = (F.quant_params, F.quantize, F.fake_quantize)
    if mutation is not None:
        bad_w, bad_kw, name = w, dict(kw), None
        if mutation == "dtype":
            bad_w, name = retype(w, draw(st.sampled_from(BAD_DTYPES))), "weight"
        elif mutation == "nan":
            bad_w, name = poison(w, float("nan"), seed), "NaN"
        elif mutation == "inf":
            bad_w, name = poison(w, draw(st.sampled_from([float("inf"), float("-inf")])), seed), "Inf"
        elif mutation == "dim1":
            bad_w, name = w.reshape(-1), "weight"
        elif mutation == "dim3":
            bad_w, name = w.reshape(1, *w.shape), "weight"
        elif mutation == "empty":
            bad_w, name = w[:0] if draw(st.booleans()) else w[:, :0], "empty"
        elif mutation == "bits":
            bad_kw["bits"], name = draw(st.sampled_from([0, 1, 9, 16, -4, True, 4.0, "4", None])), "bits"
        elif mutation == "group_size":
            bad_kw["strategy"] = "group"
            bad_kw["group_size"], name = draw(st.sampled_from([0, -32, None, True, 2.0, "32"])), "group_size"
        elif mutation == "group_not_dividing":
            bad_kw["strategy"], bad_kw["group_size"], name = "group", cols + 1, "group_size"
        elif mutation == "strategy":
            bad_kw["strategy"], name = draw(st.sampled_from(["block", "token", "", 3, None])), "strategy"
        elif mutation == "observer":
            bad_kw["observer"], name = draw(st.sampled_from(["percentile", "", None, 1])), "observer"
        elif mutation == "symmetric":
            bad_kw["symmetric"], name = draw(st.sampled_from([1, 0, "yes", None])), "symmetric"
        elif mutation == "not_tensor":
            bad_w, name = w.tolist(), "weight"
        elif mutation == "meta":
            bad_w, name = w.to("meta"), "weight"
        elif mutation == "importance":
            bad_kw["observer"], name = "imatrix_mse", "importance"
            bad_kw["importance"] = draw(st.sampled_from([
                torch.ones(cols + 1), torch.ones(1, cols), torch.full((cols,), -1.0), torch.full((cols,), float("nan")),
                torch.ones(cols, dtype=torch.int64), [1.0] * cols]))
        for fn in fns:
            expect_error(lambda: fn(bad_w, **bad_kw), name)
        return

    s, z = F.quant_params(w, **kw)
    rs, rz, rs2d, rz2d, rgs = ref_params(w, bits, symmetric, strategy, gs, observer, kw.get("importance"))
    assert s.dtype == dtype and z.dtype == torch.int8 and s.shape == rs.shape and z.shape == rz.shape
    if observer == "minmax":
        assert torch.equal(s, rs) and torch.equal(z, rz)
    else:  # the kernel's shrink factor is at least as good as the reference's, up to rounding
        weights = kw["importance"].float().repeat(rows, 1).reshape(rows, -1, rgs) if "importance" in kw else 1.0
        norm = F.IMATRIX_SEARCH["norm"] if "importance" in kw else 2.4
        mine = (recon_error(w, per_row(s, rows), per_row(z, rows), bits, rgs, norm, reduce=False) * weights).sum(-1)
        theirs = (recon_error(w, rs2d, rz2d, bits, rgs, norm, reduce=False) * weights).sum(-1)
        assert (mine <= theirs * (1 + 1e-4) + 1e-30).all()
    s2d, z2d = per_row(s, rows), per_row(z, rows)
    codes, s_, z_ = F.quantize(w, **kw)
    assert torch.equal(s_, s) and torch.equal(z_, z)
    rcodes = RQ.quantize(w, s2d, z2d, bits, rgs)
    assert torch.equal(codes, rcodes)
    deq = RQ.dequantize(rcodes, s2d, z2d, rgs, dtype)
    assert torch.equal(F.fake_quantize(w, **kw), deq)
    assert torch.equal(F.dequantize(codes, s, z), deq)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert codes.min() >= lo and codes.max() <= hi
    valid()


# ------------------------------------------------------------- dequantize / given parameters

PARAM_MUTATIONS = ["zero_transposed", "zero_shape", "scale_zero", "scale_nan", "scale_inf", "scale_negative",
                   "zero_range", "zero_bool", "zero_float", "scale_dtype", "scale_shape", "codes_dtype", "out_dtype",
                   "scale_meta", "zero_meta", "codes_meta", "zero_without_scale"]


@given(data=st.data())
@counted
def test_fuzz_given_parameters(data):
    draw = data.draw
    strategy, rows, cols, gs, bits, symmetric = draw_quantization(draw)
    groups = cols // gs
    dtype, out_dtype, how, seed = draw(DTYPES), draw(DTYPES), draw(LAYOUTS), draw(SEEDS)
    g = generator(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = layout(torch.randint(lo, hi + 1, (rows, cols), generator=g, dtype=torch.int8), how)
    shape = (1,) if strategy == "tensor" else (rows, groups)
    scale = (torch.rand(shape, generator=g) * 0.1 + 1e-3).to(dtype)
    zero = None if symmetric else torch.randint(lo, hi + 1, shape, generator=g, dtype=torch.int8)
    w = layout(weight_values(rows, cols, dtype, seed), how)
    mutation = draw(st.one_of(st.none(), st.sampled_from(PARAM_MUTATIONS)))
    note(f"codes {tuple(codes.shape)} {how}, scale {tuple(scale.shape)} {dtype}, bits {bits}, mutation {mutation}")
    if mutation is not None:
        c, s, z, kw, name = codes, scale, zero if zero is not None else torch.zeros(shape, dtype=torch.int8), {}, None
        if mutation == "zero_transposed":
            if rows == groups or strategy == "tensor":
                z, name = z.reshape(-1, 1, 1), "zero_point"
            else:
                z, name = z.t().contiguous(), "zero_point"
        elif mutation == "zero_shape":
            z, name = torch.zeros(z.numel() + 1, dtype=torch.int8), "zero_point"
        elif mutation in ("scale_zero", "scale_nan", "scale_inf", "scale_negative"):
            value = {"scale_zero": 0.0, "scale_nan": float("nan"), "scale_inf": float("inf"),
                     "scale_negative": -0.5}[mutation]
            s, name = poison(s, value, seed), "scale"
        elif mutation == "zero_range":
            value = draw(st.sampled_from([v for v in (hi + 1, lo - 1, 100, 200, -300) if not lo <= v <= hi]))
            z, name = poison(z.to(torch.int32), value, seed), "zero_point"
            if -128 <= value <= 127:  # within int8: only the bits (which dequantize is not told) rule it out
                expect_error(lambda: F.fake_quantize(w, bits, False, scale=s, zero_point=z), name)
                return
        elif mutation == "zero_bool":
            z, name = z != 0, "zero_point"
        elif mutation == "zero_float":
            z, name = z.to(draw(st.sampled_from([torch.float32, torch.float16, torch.complex64]))), "zero_point"
        elif mutation == "scale_dtype":
            s, name = retype(s, draw(st.sampled_from(BAD_DTYPES))), "scale"
        elif mutation == "scale_shape":
            s, name = draw(st.sampled_from([torch.ones(rows + 1, groups), torch.ones(rows, groups + cols),
                                            torch.ones(groups * rows + 1), torch.ones(rows, 0),
                                            torch.ones(1, rows, groups)])).to(dtype), "scale"
            z = None
        elif mutation == "codes_dtype":
            c, name = retype(codes, draw(st.sampled_from([torch.int32, torch.uint8, torch.float32, torch.bool]))), \
                "codes"
        elif mutation == "out_dtype":
            kw, name = {"dtype": draw(st.sampled_from([torch.int32, torch.float64, torch.bool, "float32"]))}, "dtype"
        elif mutation == "scale_meta":
            s, name = s.to("meta"), "scale"
        elif mutation == "zero_meta":
            z, name = z.to("meta"), "zero_point"
        elif mutation == "codes_meta":
            c, name = c.to("meta"), "codes"
        elif mutation == "zero_without_scale":
            expect_error(lambda: F.fake_quantize(w, bits, False, "group" if strategy == "group" else "channel",
                                                 gs if strategy == "group" else None, zero_point=z), "zero_point")
            return
        expect_error(lambda: F.dequantize(c, s, z, **kw), name)
        if mutation not in ("codes_dtype", "out_dtype", "codes_meta"):
            expect_error(lambda: F.fake_quantize(w, bits, scale=s, zero_point=z), name)
        return

    s2d = per_row(scale, rows)
    z2d = None if zero is None else per_row(zero, rows)
    deq = F.dequantize(codes, scale, zero, dtype=out_dtype)
    assert torch.equal(deq, RQ.dequantize(codes, s2d, z2d, gs, out_dtype))
    fq = F.fake_quantize(w, bits, symmetric, scale=scale, zero_point=zero)
    assert torch.equal(fq, RQ.fake_quantize(w, s2d, z2d, bits, gs))
    valid()


# -------------------------------------------------------------------------------- pack / unpack

@given(data=st.data())
@counted
def test_fuzz_pack_unpack(data):
    draw = data.draw
    rows, cols = draw(st.sampled_from([0, 1, 2, 3, 7])), draw(st.sampled_from([0, 1, 3, 5, 8, 31, 33, 64]))
    bits, packed_dim, how, seed = draw(st.integers(2, 8)), draw(st.sampled_from([0, 1])), draw(LAYOUTS), draw(SEEDS)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = layout(torch.randint(lo, hi + 1, (rows, cols), generator=generator(seed), dtype=torch.int8), how)
    mutation = draw(st.one_of(st.none(), st.sampled_from(["range", "dtype", "dim", "packed_dim", "bits",
                                                           "unpack_shape", "unpack_dtype", "meta"])))
    note(f"codes {tuple(codes.shape)} {how}, bits {bits}, packed_dim {packed_dim}, mutation {mutation}")
    if mutation is None:
        packed = F.pack(codes, bits, packed_dim)
        expected = RQ.pack(codes, bits) if packed_dim == 1 else RQ.pack(codes.t().contiguous(), bits).t()
        assert torch.equal(packed, expected)
        assert torch.equal(F.unpack(layout(packed, how), bits, (rows, cols), packed_dim), codes)
        valid()
        return
    packed = F.pack(codes, bits, packed_dim)
    if mutation == "range":
        if codes.numel() == 0 or bits == 8:  # int8 holds every 8-bit code: take a 4-bit grid instead
            codes, bits, lo, hi = torch.zeros(2, 3, dtype=torch.int8), 4, -8, 7
        bad = poison(codes, draw(st.sampled_from([hi + 1, lo - 1, 127, -128])), seed)
        expect_error(lambda: F.pack(bad, bits, packed_dim), "codes")
    elif mutation == "dtype":
        expect_error(lambda: F.pack(retype(codes, draw(st.sampled_from(BAD_DTYPES[:1] + BAD_DTYPES[2:]))), bits),
                     "codes")
    elif mutation == "dim":
        expect_error(lambda: F.pack(codes.reshape(-1), bits), "codes")
    elif mutation == "packed_dim":
        pd = draw(st.sampled_from([2, -1, True, None, "1"]))
        expect_error(lambda: F.pack(codes, bits, pd), "packed_dim")
        expect_error(lambda: F.unpack(packed, bits, (rows, cols), pd), "packed_dim")
    elif mutation == "bits":
        b = draw(st.sampled_from([1, 9, 0, True, 4.0]))
        expect_error(lambda: F.pack(codes, b), "bits")
        expect_error(lambda: F.unpack(packed, b, (rows, cols), packed_dim), "bits")
    elif mutation == "unpack_shape":
        if codes.numel() == 0:  # no codes: many shapes pack to the same empty words
            rows, cols = 3, 5
            packed = F.pack(torch.zeros(rows, cols, dtype=torch.int8), bits, packed_dim)
        shape = draw(st.sampled_from([(rows + 40, cols), (rows, cols + 40), (rows, -8), (rows, 1.5), (rows,),
                                      (rows, cols, 1), "rc", 5]))
        expect_error(lambda: F.unpack(packed, bits, shape, packed_dim))
    elif mutation == "unpack_dtype":
        not_int32 = [d for d in BAD_DTYPES if d != torch.int32]
        expect_error(lambda: F.unpack(retype(packed, draw(st.sampled_from(not_int32))),
                                      bits, (rows, cols),
                                      packed_dim), "packed")
    elif mutation == "meta":
        expect_error(lambda: F.pack(codes.to("meta"), bits), "codes")
        expect_error(lambda: F.unpack(packed.to("meta"), bits, (rows, cols), packed_dim), "packed")


# ---------------------------------------------------------------------- packed_linear (functional)

LINEAR_MUTATIONS = ["x_dtype", "x_features", "x_0d", "x_meta", "packed_dtype", "packed_width", "packed_meta",
                    "scale_shape", "scale_values", "scale_dtype", "zero_range", "zero_shape", "bias_dtype",
                    "bias_shape", "bias_meta", "in_features", "bits"]


def linear_case(draw):
    strategy = draw(st.sampled_from(["group", "channel"]))
    out_f = draw(st.sampled_from([1, 2, 3, 7, 16]))
    _, in_f, gs = group_layout(draw, strategy)
    bits, symmetric = draw(st.integers(2, 8)), draw(st.booleans())
    dtype, how, seed = draw(DTYPES), draw(LAYOUTS), draw(SEEDS)
    tokens = draw(st.sampled_from([0, 1, 2, 3, 5, 9, 33]))
    three_d = draw(st.booleans())
    g = generator(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(lo, hi + 1, (out_f, in_f), generator=g, dtype=torch.int8)
    scale = (torch.rand(out_f, in_f // gs, generator=g) * 0.1 + 1e-3).to(draw(DTYPES))
    zero = None if symmetric else torch.randint(lo, hi + 1, scale.shape, generator=g, dtype=torch.int8)
    bias = (torch.randn(out_f, generator=g) * 0.1).to(draw(DTYPES)) if draw(st.booleans()) else None
    x = layout(torch.randn(tokens, in_f, generator=g).to(dtype), how)
    if three_d and tokens:
        x = x.reshape(1, tokens, in_f)
    return dict(x=x, packed=F.pack(codes, bits), scale=scale, zero=zero, bits=bits, in_f=in_f, gs=gs, bias=bias,
                codes=codes, how=how)


@given(data=st.data())
@counted
def test_fuzz_packed_linear(data):
    draw = data.draw
    c = linear_case(draw)
    x, packed, scale, zero, bits, in_f, bias = c["x"], c["packed"], c["scale"], c["zero"], c["bits"], c["in_f"], \
        c["bias"]
    out_f = packed.shape[0]
    mutation = draw(st.one_of(st.none(), st.sampled_from(LINEAR_MUTATIONS)))
    note(f"x {tuple(x.shape)} {x.dtype} {c['how']}, packed {tuple(packed.shape)}, scale {tuple(scale.shape)}, "
         f"bits {bits}, zero {zero is not None}, bias {bias is not None}, mutation {mutation}")
    if mutation is None:
        y = F.packed_linear(x, packed, scale, zero, bits, in_f, bias)
        ref = RQ.packed_linear(x, packed, scale, zero, bits, c["gs"], bias)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], out_f)
        y32 = RQ.packed_linear(x.float(), packed, scale, zero, bits, c["gs"], bias)
        close(y, ref, x.dtype, y32)
        valid()
        return
    z = zero if zero is not None else torch.zeros(scale.shape, dtype=torch.int8)
    args = dict(x=x, packed=packed, scale=scale, zero_point=zero, bits=bits, in_features=in_f, bias=bias)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    name = {"x_dtype": "x", "x_features": "x", "x_0d": "x", "x_meta": "x", "packed_dtype": "packed",
            "packed_width": "packed", "packed_meta": "packed", "scale_shape": "scale", "scale_values": "scale",
            "scale_dtype": "scale", "zero_range": "zero_point", "zero_shape": "zero_point", "bias_dtype": "bias",
            "bias_shape": "bias", "bias_meta": "bias", "in_features": "in_features", "bits": "bits"}[mutation]
    if mutation == "x_dtype":
        args["x"] = retype(x, draw(st.sampled_from(BAD_DTYPES)))
    elif mutation == "x_features":
        args["x"] = torch.randn(2, in_f + draw(st.sampled_from([-1, 1, 32])) if in_f > 1 else in_f + 1)
    elif mutation == "x_0d":
        args["x"] = torch.tensor(1.0)
    elif mutation == "x_meta":
        args["x"] = x.to("meta")
    elif mutation == "packed_dtype":
        args["packed"] = retype(packed, draw(st.sampled_from([d for d in BAD_DTYPES if d != torch.int32])))
    elif mutation == "packed_width":
        args["packed"] = draw(st.sampled_from([packed[:, :-1], torch.cat([packed, packed[:, :1]], 1), packed[:0],
                                               packed.reshape(-1)]))
    elif mutation == "packed_meta":
        args["packed"] = packed.to("meta")
    elif mutation == "scale_shape":
        args["scale"] = draw(st.sampled_from([scale.t().contiguous() if scale.shape[0] != scale.shape[1]
                                              else scale[:, :0], scale[:-1], scale.reshape(-1)[:, None][:1].repeat(
                                                  1, in_f + 1), scale.reshape(1, *scale.shape)]))
        args["zero_point"] = None
        if args["scale"].numel() == 1:  # one element broadcasts (a valid per-tensor scale): take a wrong grid
            args["scale"] = torch.ones(out_f + 1, scale.shape[1] + 1, dtype=scale.dtype)
    elif mutation == "scale_values":
        args["scale"] = poison(scale, draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf")])), c["in_f"])
    elif mutation == "scale_dtype":
        args["scale"] = retype(scale, draw(st.sampled_from(BAD_DTYPES)))
    elif mutation == "zero_range":
        args["zero_point"] = poison(z.to(torch.int32), draw(st.sampled_from(
            [v for v in (hi + 1, lo - 1, 100, -200) if not lo <= v <= hi])), bits)
    elif mutation == "zero_shape":
        args["zero_point"] = draw(st.sampled_from([z.reshape(-1), z.reshape(1, -1), z[:, :1].repeat(1, 2)]))
        if tuple(args["zero_point"].shape) == tuple(scale.shape):
            args["zero_point"] = z.reshape(1, *z.shape)
    elif mutation == "bias_dtype":
        args["bias"] = retype(torch.randn(out_f), draw(st.sampled_from(BAD_DTYPES)))
    elif mutation == "bias_shape":
        args["bias"] = draw(st.sampled_from([torch.randn(out_f + 1), torch.randn(1, out_f), torch.randn(())]))
    elif mutation == "bias_meta":
        args["bias"] = torch.randn(out_f, device="meta")
    elif mutation == "in_features":
        args["in_features"] = draw(st.sampled_from([0, -in_f, True, float(in_f), None, in_f + 32]))
    elif mutation == "bits":
        args["bits"] = draw(st.sampled_from([1, 9, True, float(bits), None]))
    expect_error(lambda: F.packed_linear(**args), None if mutation in ("in_features", "x_features") else name)


# ------------------------------------------------------------------------------------ NF4 / FP4

NF4_MUTATIONS = ["w_dtype", "w_nan", "w_empty", "blocksize", "quant_type", "double_quant", "absmax_dtype",
                 "absmax_shape", "absmax_values", "packed_dtype", "packed_size", "packed_meta", "absmax_meta",
                 "state_shape", "state_dtype", "state_blocksize", "state_quant_type", "nested_shape", "nested_dtype",
                 "offset_missing", "offset_nan", "x_dtype", "x_features", "x_meta", "bias_dtype", "bias_shape",
                 "bias_meta", "not_a_state"]


@given(data=st.data())
@counted
def test_fuzz_nf4(data):
    draw = data.draw
    blocksize = draw(st.sampled_from([32, 64, 128, 4096]))
    quant_type, double_quant = draw(st.sampled_from(["nf4", "fp4"])), draw(st.booleans())
    dtype, how, seed = draw(DTYPES), draw(LAYOUTS), draw(SEEDS)
    two_d = draw(st.booleans())
    if two_d:
        shape = (draw(st.sampled_from([1, 2, 3, 7])), blocksize * draw(st.integers(1, 2)) if blocksize < 4096
                 and draw(st.booleans()) else draw(st.sampled_from([1, 3, 33, 65])))
    else:
        shape = (draw(st.sampled_from([1, 2, 31, 64, 65, 257, 600])),)
    g = generator(seed)
    w = (torch.randn(shape, generator=g) * draw(st.sampled_from([1e-3, 0.05, 2.0]))).to(dtype)
    if two_d and draw(st.booleans()):
        w[0] = 0  # an all-zero block
    w = layout(w, how)
    mutation = draw(st.one_of(st.none(), st.sampled_from(NF4_MUTATIONS)))
    note(f"w {shape} {dtype} {how}, blocksize {blocksize}, {quant_type}, double {double_quant}, mutation {mutation}")
    packed, state = F.nf4_quantize(w, blocksize, quant_type, double_quant) if mutation not in (
        "w_dtype", "w_nan", "w_empty", "blocksize", "quant_type", "double_quant") else (None, None)
    fused = two_d and shape[1] % blocksize == 0
    tokens = draw(st.sampled_from([0, 1, 2, 5, 9, 33]))
    x = layout(torch.randn(tokens, shape[-1], generator=g).to(draw(DTYPES)), how)
    bias = torch.randn(shape[0], generator=g).to(draw(DTYPES)) if two_d and draw(st.booleans()) else None
    if mutation is None:
        ref_packed, ref_absmax = RN.quantize(w, blocksize, quant_type)
        assert torch.equal(packed, ref_packed)
        if double_quant:
            q, nested, offset = RN.double_quantize(ref_absmax)
            assert torch.equal(state.absmax, q) and torch.equal(state.nested_absmax, nested)
            assert torch.equal(state.offset, offset)
            plain = F.DYNAMIC_MAP[q.long()] * nested.repeat_interleave(F.NESTED_BLOCKSIZE)[:q.numel()] + offset
            expected = RN.dequantize(packed, plain, blocksize, quant_type, shape, dtype)
            torch.testing.assert_close(F.nf4_dequantize(packed, state).float(), expected.float(), rtol=1e-6,
                                       atol=1e-6 * max(plain.abs().max().item(), 1e-30))
        else:
            assert torch.equal(state.absmax, ref_absmax)
            expected = RN.dequantize(packed, ref_absmax, blocksize, quant_type, shape, dtype)
            assert torch.equal(F.nf4_dequantize(packed, state), expected)
        if fused:
            got = F.nf4_linear(x, packed, state, bias)
            w_deq = F.nf4_dequantize(packed, state._replace(dtype=torch.float32))  # the kernel decodes in fp32
            ref = torch.nn.functional.linear(x.float(), w_deq, None if bias is None else bias.float())
            assert got.dtype == x.dtype and got.shape == (tokens, shape[0])
            tol = 1e-5 if x.dtype == torch.float32 else 1e-2
            scale = max(ref.abs().max().item() if ref.numel() else 0.0, 1.0)
            torch.testing.assert_close(got.float(), ref.to(x.dtype).float(), rtol=tol, atol=tol * scale)
        valid()
        return
    if mutation in ("w_dtype", "w_nan", "w_empty", "blocksize", "quant_type", "double_quant"):
        kw = dict(blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
        bad, name = w, mutation.split("_")[0] if mutation.startswith("w_") else mutation
        if mutation == "w_dtype":
            bad, name = retype(w, draw(st.sampled_from(BAD_DTYPES))), "w"
        elif mutation == "w_nan":
            bad, name = poison(w, draw(st.sampled_from([float("nan"), float("inf")])), seed), "NaN"
        elif mutation == "w_empty":
            bad, name = w.reshape(-1)[:0], "empty"
        elif mutation == "blocksize":
            kw["blocksize"] = draw(st.sampled_from([16, 48, 8192, 0, -64, True, 64.0, None]))
        elif mutation == "quant_type":
            kw["quant_type"] = draw(st.sampled_from(["int4", "NF4", "", None, 4]))
        elif mutation == "double_quant":
            kw["double_quant"] = draw(st.sampled_from([1, "yes", None]))
        expect_error(lambda: F.nf4_quantize(bad, **kw), name)
        return
    p, s, xx, b = packed, state, x, bias
    name = None
    if mutation == "absmax_dtype":
        s, name = s._replace(absmax=retype(s.absmax, draw(st.sampled_from(
            [torch.int32, torch.float16, torch.float64, torch.bool, torch.complex64] + (
                [] if double_quant else [torch.uint8]))))), "absmax"
        if double_quant and s.absmax.dtype == torch.uint8:
            s = s._replace(absmax=s.absmax.float())
    elif mutation == "absmax_shape":
        s, name = s._replace(absmax=draw(st.sampled_from([s.absmax[:-1], torch.cat([s.absmax, s.absmax[:1]]),
                                                          s.absmax.reshape(1, -1)]))), "absmax"
    elif mutation == "absmax_values":
        if double_quant:
            s, name = s._replace(nested_absmax=poison(s.nested_absmax, draw(st.sampled_from(
                [float("nan"), float("inf"), -1.0])), seed)), "nested_absmax"
        else:
            s, name = s._replace(absmax=poison(s.absmax, draw(st.sampled_from(
                [float("nan"), float("inf"), -1.0])), seed)), "absmax"
    elif mutation == "packed_dtype":
        p, name = retype(p, draw(st.sampled_from([torch.int8, torch.int32, torch.float32, torch.bool]))), "packed"
    elif mutation == "packed_size":
        p, name = draw(st.sampled_from([p[:-1], torch.cat([p, p[:1]])])), "packed"
    elif mutation == "packed_meta":
        p, name = p.to("meta"), "packed"
    elif mutation == "absmax_meta":
        s, name = s._replace(absmax=s.absmax.to("meta")), "absmax"
    elif mutation == "state_shape":
        s = s._replace(shape=draw(st.sampled_from([(shape[0] + 2, *shape[1:]), (), (-1, 4), (2.5,), "shape"])))
    elif mutation == "state_dtype":
        s = s._replace(dtype=draw(st.sampled_from([torch.int8, torch.float64, "float32", None])))
    elif mutation == "state_blocksize":
        s = s._replace(blocksize=draw(st.sampled_from([48, 0, True, None])))
    elif mutation == "state_quant_type":
        s = s._replace(quant_type=draw(st.sampled_from(["int4", None])))
    elif mutation == "nested_shape":
        if double_quant:
            s, name = s._replace(nested_absmax=torch.cat([s.nested_absmax, s.nested_absmax])), "nested"
        else:
            s = s._replace(nested_absmax=torch.ones(1), offset=torch.tensor(0.0))
    elif mutation == "nested_dtype":
        if double_quant:
            s, name = s._replace(nested_absmax=retype(s.nested_absmax, draw(st.sampled_from(
                [torch.float16, torch.int32, torch.float64])))), "nested_absmax"
        else:
            s, name = s._replace(offset=torch.tensor(0.0)), "offset"
    elif mutation == "offset_missing":
        if double_quant:
            s, name = s._replace(offset=None), "offset"
        else:
            s, name = s._replace(absmax=s.absmax.to(torch.uint8)), "absmax"
    elif mutation == "offset_nan":
        if double_quant:
            s, name = s._replace(offset=torch.tensor(draw(st.sampled_from([float("nan"), float("inf")])))), "offset"
        else:
            s, name = s._replace(absmax=poison(s.absmax, float("nan"), seed)), "absmax"
    elif mutation == "not_a_state":
        s, name = s._asdict(), "state"
    elif mutation in ("x_dtype", "x_features", "x_meta", "bias_dtype", "bias_shape", "bias_meta"):
        if not fused:
            expect_error(lambda: F.nf4_linear(x, p, s, bias))  # not 2-D / in not a multiple of the blocksize
            return
        if mutation == "x_dtype":
            xx, name = retype(x, draw(st.sampled_from(BAD_DTYPES))), "x"
        elif mutation == "x_features":
            xx, name = torch.randn(2, shape[1] + 1), "x"
        elif mutation == "x_meta":
            xx, name = x.to("meta"), "x"
        elif mutation == "bias_dtype":
            b, name = retype(torch.randn(shape[0]), draw(st.sampled_from(BAD_DTYPES))), "bias"
        elif mutation == "bias_shape":
            b, name = draw(st.sampled_from([torch.randn(shape[0] + 1), torch.randn(1, shape[0])])), "bias"
        elif mutation == "bias_meta":
            b, name = torch.randn(shape[0], device="meta"), "bias"
        expect_error(lambda: F.nf4_linear(xx, p, s, b), name)
        return
    expect_error(lambda: F.nf4_dequantize(p, s), name)
    if fused:
        expect_error(lambda: F.nf4_linear(xx, p, s, b), name)


# -------------------------------------------------------------------------------------- LLM.int8()

@given(data=st.data())
@counted
def test_fuzz_int8(data):
    draw = data.draw
    out_f, in_f = draw(st.sampled_from([1, 2, 3, 7, 16])), draw(st.sampled_from([1, 2, 3, 17, 64, 65]))
    tokens = draw(st.sampled_from([0, 1, 2, 5, 9, 33]))
    threshold = draw(st.sampled_from([0.0, 0.5, 3.0, 6.0]))
    dtype, how, seed = draw(DTYPES), draw(LAYOUTS), draw(SEEDS)
    g = generator(seed)
    w = (torch.randn(out_f, in_f, generator=g) * 0.05).to(draw(DTYPES))
    x = torch.randn(tokens, in_f, generator=g) * 1.5
    if in_f > 3 and tokens:
        x[:, 3] *= 12  # an outlier column
    x = layout(x.to(dtype), how)
    bias = torch.randn(out_f, generator=g).to(draw(DTYPES)) if draw(st.booleans()) else None
    mutation = draw(st.one_of(st.none(), st.sampled_from(
        ["threshold", "w_dtype", "w_dim", "scale_shape", "scale_values", "scale_dtype", "scale_none", "x_dtype",
         "x_features", "x_meta", "bias_dtype", "bias_shape", "bias_meta", "w_meta", "rowwise_empty",
         "rowwise_dtype"])))
    note(f"w {tuple(w.shape)}, x {tuple(x.shape)} {dtype} {how}, threshold {threshold}, mutation {mutation}")
    codes, scb, cols = F.int8_quantize_rowwise(w)
    if mutation is None:
        rcodes, rscb, rcols = RI.quantize_rowwise(w)
        assert torch.equal(codes, rcodes) and torch.equal(scb, rscb) and torch.equal(cols, rcols)
        if tokens:
            xc, xa, xcols = F.int8_quantize_rowwise(x, threshold)
            rc, ra, rcl = RI.quantize_rowwise(x, threshold)
            assert torch.equal(xc, rc) and torch.equal(xa, ra) and torch.equal(xcols, rcl)
        got = F.int8_outlier_matmul(x, codes, scb, threshold, bias)
        ref = RI.outlier_matmul(x, codes, scb, threshold, bias)
        assert got.dtype == dtype and got.shape == (tokens, out_f)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        scale = max(ref.float().abs().max().item() if ref.numel() else 0.0, 1.0)
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * scale)
        valid()
        return
    args = dict(x=x, w_int8=codes, w_scale=scb, threshold=threshold, bias=bias)
    name = mutation.split("_")[0]
    if mutation == "threshold":
        args["threshold"] = draw(st.sampled_from(BAD_NUMBERS + [None]))
    elif mutation == "w_dtype":
        args["w_int8"], name = retype(codes, draw(st.sampled_from(BAD_DTYPES[:1] + BAD_DTYPES[2:]))), "w_int8"
    elif mutation == "w_dim":
        args["w_int8"], name = codes.reshape(-1), "w_int8"
    elif mutation == "w_meta":
        args["w_int8"], name = codes.to("meta"), "w_int8"
    elif mutation == "scale_shape":
        args["w_scale"], name = draw(st.sampled_from([scb[:-1], torch.cat([scb, scb]), scb[:, None]])), "w_scale"
    elif mutation == "scale_values":
        args["w_scale"], name = poison(scb, draw(st.sampled_from([float("nan"), float("inf"), -1.0])), seed), \
            "w_scale"
    elif mutation == "scale_dtype":
        args["w_scale"], name = retype(scb, draw(st.sampled_from(BAD_DTYPES))), "w_scale"
    elif mutation == "scale_none":
        args["w_scale"], name = None, "w_scale"
    elif mutation == "x_dtype":
        args["x"] = retype(x, draw(st.sampled_from(BAD_DTYPES)))
    elif mutation == "x_features":
        args["x"] = torch.randn(2, in_f + 1)
    elif mutation == "x_meta":
        args["x"] = x.to("meta")
    elif mutation == "bias_dtype":
        args["bias"] = retype(torch.randn(out_f), draw(st.sampled_from(BAD_DTYPES)))
    elif mutation == "bias_shape":
        args["bias"] = draw(st.sampled_from([torch.randn(out_f + 1), torch.randn(1, out_f)]))
    elif mutation == "bias_meta":
        args["bias"] = torch.randn(out_f, device="meta")
    elif mutation == "rowwise_empty":
        expect_error(lambda: F.int8_quantize_rowwise(x[:0] if draw(st.booleans()) else torch.tensor(1.0)), "x")
        return
    elif mutation == "rowwise_dtype":
        expect_error(lambda: F.int8_quantize_rowwise(retype(w, draw(st.sampled_from(BAD_DTYPES)))), "x")
        return
    expect_error(lambda: F.int8_outlier_matmul(**args), name)


# ------------------------------------------------------------------ Hessian / AWQ statistics

@given(data=st.data())
@counted
def test_fuzz_statistics(data):
    draw = data.draw
    cols = draw(st.sampled_from([1, 2, 3, 17, 64]))
    batches = draw(st.integers(1, 3))
    dtype, seed = draw(DTYPES), draw(SEEDS)
    g = generator(seed)
    xs = [torch.randn(*draw(st.sampled_from([(1,), (3,), (2, 5)])), cols, generator=g).to(dtype)
          for _ in range(batches)]
    mutation = draw(st.one_of(st.none(), st.sampled_from(
        ["0d", "empty", "dtype", "nan", "acc_dtype", "acc_shape", "count", "meta", "mirror"])))
    note(f"{batches} batches of {[tuple(x.shape) for x in xs]} {dtype}, mutation {mutation}")
    if mutation is None:
        h, n, rh, rn = None, 0, None, 0
        acc, count, racc, rcount = None, 0, None, 0
        for x in xs:
            h, n = F.hessian(x, h, n)
            rh, rn = RG.hessian(x, rh, rn)
            acc, count = F.awq_channel_stats(x, acc, count)
            racc, rcount = RA.channel_stats(x, racc, rcount)
        assert n == rn and count == rcount
        torch.testing.assert_close(h, rh, rtol=1e-4, atol=1e-5 * max(rh.abs().max().item(), 1.0))
        torch.testing.assert_close(acc, racc, rtol=1e-6, atol=0)
        valid()
        return
    x = xs[0]
    if mutation == "0d":
        bad, name = torch.tensor(1.0, dtype=dtype), "inputs"
    elif mutation == "empty":
        bad, name = x.reshape(-1, cols)[:0], "inputs"
    elif mutation == "dtype":
        bad, name = retype(x, draw(st.sampled_from(BAD_DTYPES))), "inputs"
    elif mutation == "meta":
        bad, name = x.to("meta"), "inputs"
    else:
        bad, name = x, None
    if mutation == "nan":
        expect_error(lambda: F.hessian(poison(x, float("nan"), seed)), "NaN")
        return
    if mutation == "acc_dtype":
        expect_error(lambda: F.hessian(x, torch.zeros(cols, cols, dtype=torch.float64), 1), "hessian")
        expect_error(lambda: F.awq_channel_stats(x, torch.zeros(cols), 1), "sum_abs")
        return
    if mutation == "acc_shape":
        expect_error(lambda: F.hessian(x, torch.zeros(cols + 1, cols + 1), 1), "hessian")
        expect_error(lambda: F.awq_channel_stats(x, torch.zeros(cols + 1, dtype=torch.float64), 1), "sum_abs")
        expect_error(lambda: F.mirror_hessian_(torch.zeros(cols, cols + 1)), "hessian")
        expect_error(lambda: F.mirror_hessian_(x.tolist()), "hessian")
        return
    if mutation == "count":
        n = draw(st.sampled_from([-1, True, 1.5, None, 3]))
        expect_error(lambda: F.hessian(x, None, n), "num_samples")
        expect_error(lambda: F.awq_channel_stats(x, None, n), "count")
        return
    if mutation == "mirror":
        expect_error(lambda: F.hessian(x, mirror=draw(st.sampled_from([1, None, "no"]))), "mirror")
        return
    expect_error(lambda: F.hessian(bad), name)
    expect_error(lambda: F.awq_channel_stats(bad), name)


# ------------------------------------------------------------------------------------------ GPTQ

def layer_inputs(n, cols, g):
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5 + torch.eye(cols)
    return (torch.randn(n, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) * 3 + 0.1)


def draw_layer(draw):
    """(group size or None, columns, rows, bits, symmetric) of a layer GPTQ / AWQ can solve."""
    gs = draw(st.sampled_from([None, 4, 8, 16]))
    cols = (gs or draw(st.sampled_from([3, 8, 17]))) * draw(st.integers(1, 3))
    rows = draw(st.sampled_from([1, 2, 5, 9]))
    return gs, cols, rows, draw(st.integers(2, 8)), draw(st.booleans())


@given(data=st.data())
@counted
def test_fuzz_gptq(data):
    draw = data.draw
    gs, cols, rows, bits, symmetric = draw_layer(draw)
    actorder = draw(st.sampled_from([None, "static", "weight", "group"]))
    block_size = draw(st.sampled_from([1, 4, 7, 128]))
    dtype, seed = draw(DTYPES), draw(SEEDS)
    g = generator(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    h, _ = F.hessian(layer_inputs(4 * cols, cols, g))
    mutation = draw(st.one_of(st.none(), st.sampled_from(
        ["bits", "group_size", "block_size", "dampening_frac", "actorder", "symmetric", "hessian_shape",
         "hessian_dtype", "hessian_nan", "weight_nan", "weight_dtype", "observer", "hessian_meta"])))
    kw = dict(bits=bits, group_size=gs, symmetric=symmetric, actorder=actorder, block_size=block_size)
    note(f"w {tuple(w.shape)} {dtype}, {kw}, mutation {mutation}")
    if mutation is None:
        got = F.gptq(w, h, **kw)
        codes, scale, zero, g_idx, loss, updated = RG.gptq(w, h, bits=bits, group_size=gs or cols,
                                                            symmetric=symmetric, actorder=actorder,
                                                            block_size=block_size)
        assert torch.equal(got.scale, scale) and torch.equal(got.zero_point, zero) and torch.equal(got.g_idx, g_idx)
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        assert got.codes.dtype == torch.int8 and got.codes.min() >= lo and got.codes.max() <= hi
        # codes identical except after a rounding tie (test_gptq's rule); the rest within 1e-4
        order = RG.column_groups(h, cols, gs or cols, actorder)[0]
        differ = got.codes != codes
        for row in differ.any(dim=1).nonzero().flatten().tolist():
            col = order[differ[row][order].nonzero()[0].item()].item()
            grp = g_idx[col].item()
            t = updated[row, col].item() / scale[row, grp].float().item() + zero[row, grp].item()
            assert abs(abs(t - math.floor(t)) - 0.5) < 1e-3, (row, col, t)
        clean = ~differ.any(dim=1)
        if clean.any():
            num = (got.weight[clean] - updated[clean]).norm().item()
            assert num <= 1e-4 * max(updated[clean].norm().item(), 1e-12)
        valid()
        return
    name = mutation.split("_")[0]
    hh, ww = h, w
    if mutation == "bits":
        kw["bits"] = draw(st.sampled_from([1, 9, True, 4.0]))
    elif mutation == "group_size":
        kw["group_size"] = draw(st.sampled_from([0, -32, True, 4.0, cols + 1]))
    elif mutation == "block_size":
        kw["block_size"] = draw(st.sampled_from([0, -1, True, 2.5, None]))
    elif mutation == "dampening_frac":
        kw["dampening_frac"] = draw(st.sampled_from([0.0, 1.5, -0.1, float("nan"), float("inf"), True, "0.01"]))
    elif mutation == "actorder":
        kw["actorder"] = draw(st.sampled_from(["random", "", True, ["static"]]))
    elif mutation == "symmetric":
        kw["symmetric"] = draw(st.sampled_from([1, "yes", None]))
    elif mutation == "observer":
        kw["observer"] = draw(st.sampled_from(["percentile", None]))
    elif mutation == "hessian_shape":
        hh = draw(st.sampled_from([h[:-1], h.reshape(-1), torch.zeros(cols + 1, cols + 1)]))
    elif mutation == "hessian_dtype":
        hh = retype(h, draw(st.sampled_from([torch.int32, torch.bool, torch.complex64])))
    elif mutation == "hessian_nan":
        hh, name = poison(h, float("nan"), seed), "NaN"
    elif mutation == "hessian_meta":
        hh = h.to("meta")
    elif mutation == "weight_nan":
        ww, name = poison(w, float("inf"), seed), "NaN"
    elif mutation == "weight_dtype":
        ww = retype(w, draw(st.sampled_from(BAD_DTYPES)))
    expect_error(lambda: F.gptq(ww, hh, **kw), name)


# ------------------------------------------------------------------------------------------- AWQ

@given(data=st.data())
@counted
def test_fuzz_awq(data):
    draw = data.draw
    gs, cols, rows, bits, symmetric = draw_layer(draw)
    duo = draw(st.sampled_from([True, False]))
    n_grid = draw(st.sampled_from([3, 5, 20] if duo else [2, 3, 5, 20]))
    dtype, seed = draw(DTYPES), draw(SEEDS)
    g = generator(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    x = torch.randn(3 * cols, cols, generator=g) * torch.logspace(-1, 1, cols)
    gram, x_mean = x.t() @ x, x.abs().mean(0)
    mutation = draw(st.one_of(st.none(), st.sampled_from(
        ["group_size", "bits", "n_grid", "duo_scaling", "gram_shape", "gram_dtype", "x_mean_shape", "x_mean_dtype",
         "max_shrink", "symmetric", "weight_nan", "clip_n_grid", "gram_meta"])))
    note(f"w {tuple(w.shape)} {dtype}, gs {gs}, bits {bits}, sym {symmetric}, duo {duo}, n_grid {n_grid}, "
         f"mutation {mutation}")
    if mutation is None:
        got = F.awq_search(w, gram, x_mean, bits=bits, group_size=gs, symmetric=symmetric, duo_scaling=duo,
                           n_grid=n_grid)
        scales, ratio, rduo, losses = RA.search(w, gram, x_mean, bits, gs or cols, symmetric, duo, n_grid)
        ref_losses = torch.tensor(losses, dtype=torch.float64)
        mine = torch.tensor(got.losses, dtype=torch.float64)
        torch.testing.assert_close(mine, ref_losses, rtol=1e-3, atol=1e-6 * max(ref_losses.abs().max().item(), 1e-12))
        best = min(range(len(losses)), key=lambda i: losses[i])
        chosen = F.awq_grid(duo, n_grid).index((got.ratio, got.duo_scaling))
        assert losses[chosen] <= losses[best] * (1 + 1e-3) + 1e-12
        bounds = F.awq_clip(w, gram, bits=bits, group_size=gs, symmetric=symmetric, n_grid=n_grid)
        ref = RA.clip(w, gram, bits, gs or cols, symmetric, n_grid)
        assert bounds.shape == ref.shape
        assert (bounds != ref).float().mean() <= 0.5  # ties between shrink factors may pick either
        valid()
        return
    kw = dict(bits=bits, group_size=gs, symmetric=symmetric)
    gg, xm, ww = gram, x_mean, w
    name = mutation.split("_")[0] if not mutation.startswith("x_mean") else "x_mean"
    extra, clip_extra = dict(duo_scaling=duo, n_grid=n_grid), {}
    if mutation == "group_size":
        kw["group_size"] = draw(st.sampled_from([0, -32, True, 4.0, cols + 1]))
    elif mutation == "bits":
        kw["bits"] = draw(st.sampled_from([1, 9, True, 4.0]))
    elif mutation == "n_grid":
        extra["n_grid"] = draw(st.sampled_from([0, 1, True, 2.5, None]))
        clip_extra["n_grid"] = extra["n_grid"]
    elif mutation == "duo_scaling":
        extra["duo_scaling"], name = draw(st.sampled_from(["yes", 1, None, 1.0])), "duo_scaling"
    elif mutation == "gram_shape":
        gg = draw(st.sampled_from([gram[:-1], gram.reshape(-1), torch.eye(cols + 1)]))
    elif mutation == "gram_dtype":
        gg = retype(gram, draw(st.sampled_from([torch.int32, torch.bool, torch.complex64])))
    elif mutation == "gram_meta":
        gg = gram.to("meta")
    elif mutation == "x_mean_shape":
        xm = draw(st.sampled_from([x_mean[:-1] if cols > 1 else x_mean[:0], x_mean[None], x_mean.sum()]))
    elif mutation == "x_mean_dtype":
        xm = retype(x_mean, draw(st.sampled_from([torch.int32, torch.bool, torch.complex64])))
    elif mutation == "max_shrink":
        clip_extra["max_shrink"], name = draw(st.sampled_from([1.0, -0.1, float("nan"), True, "0.5"])), None
    elif mutation == "symmetric":
        kw["symmetric"] = draw(st.sampled_from([1, None, "no"]))
    elif mutation == "weight_nan":
        ww, name = poison(w, float("nan"), seed), "NaN"
    elif mutation == "clip_n_grid":
        clip_extra["n_grid"], name = draw(st.sampled_from([0, -3, True, 2.5])), "n_grid"
    if mutation not in ("max_shrink", "clip_n_grid"):
        expect_error(lambda: F.awq_search(ww, gg, xm, **kw, **extra), name)
    if mutation not in ("n_grid", "duo_scaling", "x_mean_shape", "x_mean_dtype"):
        expect_error(lambda: F.awq_clip(ww, gg, **kw, **clip_extra), name)
    if mutation == "n_grid":
        expect_error(lambda: F.awq_grid(duo, extra["n_grid"]), "n_grid")


# -------------------------------------------------------------------------------------------- FP8

FP8_MUTATIONS = ["x_dtype", "x_nan", "x_inf", "x_dim", "not_tensor", "block", "format", "scale_shape",
                 "scale_values", "scale_dtype", "q_dtype", "dtype", "x_features", "x_meta", "w_meta", "bias_shape",
                 "bias_dtype"]


def raw8(q):
    return q.view(torch.uint8)


@given(data=st.data())
@counted
def test_fuzz_fp8(data):
    draw = data.draw
    rows, cols = draw(st.sampled_from([1, 2, 3, 7, 33])), draw(st.sampled_from([1, 3, 16, 33, 64, 130]))
    block = draw(st.sampled_from(["tensor", "channel", (1, 16), (32, 32), (2, 3), (128, 128)]))
    fmt, dtype, how, seed = draw(st.sampled_from(["e4m3", "e5m2"])), draw(DTYPES), draw(LAYOUTS), draw(SEEDS)
    w = weight_values(rows, cols, dtype, seed, draw(st.sampled_from([1e-6, 0.05, 3.0, 100.0])))
    if rows > 1 and draw(st.booleans()):
        w[0] = 0  # an all-zero tile: scale eps
    w = layout(w, how)
    g = generator(seed)
    tokens = draw(st.sampled_from([0, 1, 2, 5, 9, 40, 70]))
    x = layout((torch.randn(tokens, cols, generator=g) * 0.1).to(draw(DTYPES)), how)
    bias = torch.randn(rows, generator=g).to(draw(DTYPES)) if draw(st.booleans()) else None
    mutation = draw(st.one_of(st.none(), st.sampled_from(FP8_MUTATIONS)))
    note(f"w {rows}x{cols} {dtype} {how}, block {block}, {fmt}, x {tuple(x.shape)}, mutation {mutation}")
    br, bc = F._fp8_block(block, (rows, cols))
    if mutation is None:
        q, s = F.fp8_quantize(w, block=block, format=fmt)
        rs = R8.scales(w, br, bc, fmt)
        assert torch.equal(s, rs) and torch.equal(F.fp8_scales(w, block, fmt), rs)
        assert q.dtype == R8.FORMATS[fmt] and torch.equal(raw8(q), raw8(R8.quantize(w, rs, br, bc, fmt)))
        assert torch.equal(F.fp8_dequantize(q, s, block), R8.dequantize(q, rs, br, bc, dtype))
        assert torch.equal(F.fp8_fake_quantize(w, s, block, fmt), R8.fake_quantize(w, rs, br, bc, fmt))
        got = F.fp8_linear(x, q, s, bias, block)
        assert got.dtype == x.dtype and got.shape == (tokens, rows)
        ref = R8.linear(x, q, rs, br, bc, bias)
        tol = 1e-5 if x.dtype == torch.float32 else 1e-2
        scale = max(ref.float().abs().max().item() if ref.numel() else 0.0, 1e-6)
        torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * scale)
        valid()
        return
    q, s = F.fp8_quantize(w, block=block, format=fmt)
    if mutation in ("x_dtype", "x_nan", "x_inf", "x_dim", "not_tensor", "block", "format"):
        bad, kw, name = w, dict(block=block, format=fmt), "x"
        if mutation == "x_dtype":
            bad = retype(w, draw(st.sampled_from(BAD_DTYPES)))
        elif mutation == "x_nan":
            bad, name = poison(w, float("nan"), seed), "NaN"
        elif mutation == "x_inf":
            bad, name = poison(w, draw(st.sampled_from([float("inf"), float("-inf")])), seed), "Inf"
        elif mutation == "x_dim":
            bad = w.reshape(-1) if draw(st.booleans()) else w.reshape(1, *w.shape)
        elif mutation == "not_tensor":
            bad = w.tolist()
        elif mutation == "block":
            kw["block"], name = draw(st.sampled_from([(0, 4), (-1, 2), "group", (1.5, 2), (True, 1), (1, 2, 3), 128])), \
                "block"
        else:
            kw["format"], name = draw(st.sampled_from(["e4m3fn", "", None, 8, "E4M3"])), "format"
        expect_error(lambda: F.fp8_quantize(bad, **kw), name)
        if mutation not in ("x_nan",):  # fp8_scales: NaN raises too ("NaN or Inf")
            expect_error(lambda: F.fp8_scales(bad, **kw), None if mutation == "x_inf" else name)
        if mutation in ("x_nan", "format"):
            expect_error(lambda: F.fp8_fake_quantize(bad, s, block, kw["format"]), name)
        return
    qq, ss, xx, bb, name = q, s, x, bias, "scale"
    if mutation == "scale_shape":
        ss = torch.cat([s, s[:1]]) if draw(st.booleans()) else s.reshape(1, -1, 1)
    elif mutation == "scale_values":
        ss = poison(s, draw(st.sampled_from([float("nan"), float("inf"), -1.0, 0.0])), seed)
    elif mutation == "scale_dtype":
        ss = retype(s, draw(st.sampled_from(BAD_DTYPES)))
    elif mutation == "q_dtype":
        qq, name = draw(st.sampled_from([raw8(q), q.float(), retype(q.float(), torch.int8)])), None
    elif mutation == "dtype":
        expect_error(lambda: F.fp8_dequantize(q, s, block, draw(st.sampled_from(
            [torch.int32, torch.float64, "float32", torch.float8_e4m3fn]))), "dtype")
        return
    elif mutation == "x_features":
        xx, name = torch.randn(2, cols + 1), "x"
    elif mutation == "x_meta":
        xx, name = x.to("meta"), "x"
    elif mutation == "w_meta":
        qq, name = q.to("meta"), None
    elif mutation == "bias_shape":
        bb, name = draw(st.sampled_from([torch.randn(rows + 1), torch.randn(1, rows)])), "bias"
    else:
        bb, name = retype(torch.randn(rows), draw(st.sampled_from(BAD_DTYPES))), "bias"
    if mutation in ("scale_shape", "scale_values", "scale_dtype", "q_dtype", "w_meta"):
        expect_error(lambda: F.fp8_dequantize(qq, ss, block), name)
    if mutation in ("scale_shape", "scale_values", "scale_dtype"):
        expect_error(lambda: F.fp8_fake_quantize(w, ss, block, fmt), name)
    expect_error(lambda: F.fp8_linear(xx, qq, ss, bb, block), name)


@given(data=st.data())
@counted
def test_fuzz_channel_range(data):
    draw = data.draw
    cols = draw(st.sampled_from([1, 2, 3, 17, 64]))
    dtype, how, seed = draw(DTYPES), draw(LAYOUTS), draw(SEEDS)
    g = generator(seed)
    xs = [(torch.randn(*draw(st.sampled_from([(1,), (3,), (2, 5), (40,)])), cols, generator=g)
           * draw(st.sampled_from([1e-3, 1.0, 1e4]))).to(dtype) for _ in range(draw(st.integers(1, 3)))]
    xs = [layout(x, how) for x in xs]
    mutation = draw(st.one_of(st.none(), st.sampled_from(
        ["0d", "empty", "dtype", "nan", "inf", "acc_dtype", "acc_shape", "acc_one", "acc_alias", "meta"])))
    note(f"{[tuple(x.shape) for x in xs]} {dtype} {how}, mutation {mutation}")
    if mutation is None:
        lo = hi = rlo = rhi = None
        for x in xs:
            lo, hi = F.channel_range(x, lo, hi)
            rlo, rhi = RS.channel_range(x, rlo, rhi)
        assert torch.equal(lo, rlo) and torch.equal(hi, rhi)
        valid()
        return
    x = xs[0]
    lo, hi = F.channel_range(x)
    before = lo.clone(), hi.clone()
    if mutation in ("nan", "inf"):
        bad = poison(x, float("nan") if mutation == "nan" else float("-inf"), seed)
        expect_error(lambda: F.channel_range(bad, lo, hi), "non-finite")
        assert torch.equal(lo, before[0]) and torch.equal(hi, before[1])  # unchanged
        return
    if mutation == "0d":
        expect_error(lambda: F.channel_range(torch.tensor(1.0, dtype=dtype)), "x")
    elif mutation == "empty":
        expect_error(lambda: F.channel_range(x.reshape(-1, cols)[:0]), "x")
    elif mutation == "dtype":
        expect_error(lambda: F.channel_range(retype(x, draw(st.sampled_from(BAD_DTYPES)))), "x")
    elif mutation == "meta":
        expect_error(lambda: F.channel_range(x.to("meta")), "x")
    elif mutation == "acc_dtype":
        expect_error(lambda: F.channel_range(x, lo.double(), hi.double()), "mins")
    elif mutation == "acc_shape":
        expect_error(lambda: F.channel_range(x, torch.zeros(cols + 1), torch.zeros(cols + 1)), "mins")
    elif mutation == "acc_one":
        expect_error(lambda: F.channel_range(x, lo, None), "maxs")
    else:
        expect_error(lambda: F.channel_range(x, lo, lo))


# ------------------------------------------------------------------------------ lowbit.nn modules

MODULE_KINDS = ["packed", "nf4", "int8_outlier", "int8_dynamic"]
SCHEMES = ["W4A16", "W8A16", "W4A16_ASYM", {"weights": {"num_bits": 3, "symmetric": False, "strategy": "channel",
                                                        "group_size": None}},
           {"weights": {"num_bits": 2, "group_size": 8}}, {"weights": {"num_bits": 5, "symmetric": False,
                                                                       "group_size": 16}}]


def make_module(draw, kind, linear):
    if kind == "packed":
        scheme = draw(st.sampled_from(SCHEMES))
        if isinstance(scheme, str):
            scheme = {"weights": {**lowbit.resolve_scheme(scheme).weights.to_dict(), "group_size": 16}}
        if draw(st.booleans()) and scheme["weights"].get("strategy", "group") == "group":
            scheme = {"weights": {**scheme["weights"], "actorder": "group"}}
        args = lowbit.QuantizationArgs(**scheme["weights"])
        if args.actorder == "group":  # a scattered group order, as GPTQ's actorder "group" leaves it
            w = linear.weight.detach()
            codes, scale, zero = F.quantize(w, args.num_bits, args.symmetric, args.strategy, args.group_size)
            perm = torch.randperm(linear.in_features, generator=generator(linear.in_features))
            g_idx = (perm // args.group_size).to(torch.int32)
            return PackedLinear.from_codes(linear, scheme, codes, scale, zero, g_idx)
        return PackedLinear.from_linear(linear, scheme)
    if kind == "nf4":
        return NF4Linear.from_linear(linear, draw(st.sampled_from(["nf4", "fp4"])), draw(st.sampled_from([32, 64])),
                                     draw(st.booleans()), draw(st.sampled_from([None, torch.float32, "bfloat16"])))
    if kind == "int8_outlier":
        return Int8OutlierLinear.from_linear(linear, draw(st.sampled_from([0.0, 1.0, 6.0])))
    return Int8DynamicLinear.from_linear(linear, "W8A8")


def module_reference(m, x):
    """The module's output computed by lowbit.reference."""
    if isinstance(m, PackedLinear):
        if m.weight_g_idx is not None:
            codes = RQ.unpack(m.weight_packed, m.args.num_bits, m.in_features).float()
            gi = m.weight_g_idx.long()
            zero = m.weight_zero_point[:, gi].float() if m.weight_zero_point is not None else 0.0
            w = ((codes - zero) * m.weight_scale[:, gi].float()).to(x.dtype).float()
            y = x.float() @ w.t() + (m.bias.float() if m.bias is not None else 0.0)
            return y.to(x.dtype)
        gs = m.in_features // m.weight_scale.shape[1]
        return RQ.packed_linear(x, m.weight_packed, m.weight_scale, m.weight_zero_point, m.args.num_bits, gs, m.bias)
    if isinstance(m, NF4Linear):
        if m.double_quant:
            absmax = F.DYNAMIC_MAP[m.absmax.long()] * m.nested_absmax.repeat_interleave(256)[:m.absmax.numel()] \
                + m.offset
        else:
            absmax = m.absmax
        w = RN.dequantize(m.weight, absmax, m.blocksize, m.quant_type, (m.out_features, m.in_features), torch.float32)
        xc = x.to(m.compute_dtype) if m.compute_dtype is not None else x
        if m.in_features % m.blocksize:  # no fused kernel: the weight in its own dtype, then x's (bitsandbytes')
            w = w.to(m.weight_dtype).to(xc.dtype).float()
        y = torch.nn.functional.linear(xc.float(), w, None if m.bias is None else m.bias.float())
        return y.to(xc.dtype).to(x.dtype)
    if isinstance(m, Int8OutlierLinear):
        return RI.outlier_matmul(x, m.weight, m.SCB, m.threshold, m.bias)
    x2d = x.reshape(-1, m.in_features)
    s, _ = RQ.quant_params(x2d, 8, True, m.in_features)
    q = RQ.quantize(x2d, s, None, 8, m.in_features)
    y = (q.double() @ m.weight.double().t()).float() * s.float() * m.weight_scale.float().t()
    if m.bias is not None:
        y = y + m.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], m.out_features)


def corrupt(draw, m):
    """(buffer name, a corrupted copy of it): wrong dtype, shape or value."""
    buffers = {n: b for n, b in m.named_buffers(recurse=False)}
    if m.bias is not None:
        buffers["bias"] = m.bias.data
    name = draw(st.sampled_from(sorted(buffers)))
    b = buffers[name]
    how = draw(st.sampled_from(["dtype", "shape", "value", "meta"]))
    if how == "dtype":
        bad = retype(b, draw(st.sampled_from([d for d in BAD_DTYPES + (torch.float16,) if d != b.dtype
                                              and not (b.dtype in FLOATS and d in FLOATS)
                                              and not (name == "weight_shape" and d == torch.int32)
                                              and not (name == "weight_g_idx" and d in (torch.int64,))])))
    elif how == "shape":
        bad = torch.cat([b.reshape(-1), b.reshape(-1)[:1]]) if b.numel() else torch.zeros(1, dtype=b.dtype)
        if b.dim() == 0:
            bad = b.reshape(1, 1)
    elif how == "meta":
        bad = b.to("meta")
    else:
        if b.dtype.is_floating_point and name != "bias":
            bad = poison(b, draw(st.sampled_from([float("nan"), float("inf")] + ([] if name == "offset" else [-1.0])
                                                 + ([0.0] if name in ("weight_scale",) else []))), 0)
        elif name in ("weight_zero_point", "weight_g_idx", "weight_shape"):
            bad = poison(b, draw(st.sampled_from([-100, 100] if name == "weight_zero_point" else [-1, 100])), 0)
            if name == "weight_zero_point" and m.args.num_bits == 8:
                bad = b.to(torch.int32)  # int8 cannot leave the 8-bit grid: a dtype error instead
            if name == "weight_g_idx":
                bad = poison(b, draw(st.sampled_from([-1, m.weight_scale.shape[1]])), 0)
        else:
            bad = retype(b, torch.float64)  # codes: any int8 / uint8 / int32 value is a valid code
    return name, bad


@given(data=st.data())
@counted
def test_fuzz_modules(data):
    draw = data.draw
    kind = draw(st.sampled_from(MODULE_KINDS))
    in_f = draw(st.sampled_from([16, 32, 48, 64, 96])) if kind != "nf4" else draw(st.sampled_from([32, 64, 96, 128]))
    out_f = draw(st.sampled_from([1, 2, 3, 7, 16]))
    has_bias, dtype, seed = draw(st.booleans()), draw(DTYPES), draw(SEEDS)
    g = generator(seed)
    linear = nn.Linear(in_f, out_f, bias=has_bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f))
        if has_bias:
            linear.bias.copy_(torch.randn(out_f, generator=g) * 0.1)
    linear = linear.to(dtype)
    m = make_module(draw, kind, linear)
    tokens, three_d, xdtype, how = draw(st.sampled_from([0, 1, 2, 5, 9])), draw(st.booleans()), draw(DTYPES), \
        draw(LAYOUTS)
    x = layout(torch.randn(tokens, in_f, generator=g).to(xdtype), how)
    if three_d:
        x = x.reshape(1, tokens, in_f)
    mutation = draw(st.one_of(st.none(), st.sampled_from(
        ["meta_module", "meta_x", "x_dtype", "x_features", "corrupt_state", "constructor"])))
    note(f"{m}, x {tuple(x.shape)} {xdtype} {how}, mutation {mutation}")
    if mutation is None:
        m.check_state()
        y = m(x)
        ref = module_reference(m, x)
        assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], out_f)
        compute = getattr(m, "compute_dtype", None)
        if kind == "int8_dynamic" or compute not in (None, x.dtype):
            tol = 2e-2 if xdtype == torch.float32 and compute in (None, torch.float32) else 5e-2
            scale = max(ref.float().abs().max().item() if ref.numel() else 0.0, 1.0)
            torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * scale)
        else:
            close(y, ref, x.dtype)
        valid()
        return
    if mutation == "meta_module":
        meta = m.to("meta")
        expect_error(lambda: meta(x), "meta")
        expect_error(lambda: meta.check_state(), "meta")
    elif mutation == "meta_x":
        expect_error(lambda: m(x.to("meta")), "x")
    elif mutation == "x_dtype":
        expect_error(lambda: m(retype(x, draw(st.sampled_from(BAD_DTYPES)))), "x")
    elif mutation == "x_features":
        expect_error(lambda: m(torch.randn(2, in_f + draw(st.sampled_from([-1, 1, 16])))), "x")
    elif mutation == "corrupt_state":
        name, bad = corrupt(draw, m)
        note(f"corrupt {name}: {bad.dtype} {tuple(bad.shape)}")
        if name == "bias":
            m.bias = nn.Parameter(bad, requires_grad=False)
        else:
            m._buffers[name] = bad
        expect_error(lambda: m.check_state("layer"), name)
    elif mutation == "constructor":
        cls = type(m)
        arg = draw(st.sampled_from(["in_features", "out_features", "bias", "dtype"]))
        kw = dict(in_features=in_f, out_features=out_f, bias=has_bias, dtype=dtype)
        kw[arg] = {"in_features": draw(st.sampled_from([0, -4, True, 16.0, None])),
                   "out_features": draw(st.sampled_from([0, -1, False, 2.0, "3"])),
                   "bias": draw(st.sampled_from([1, None, "yes"])),
                   "dtype": draw(st.sampled_from([torch.int8, torch.float64, torch.complex64, "float16x", 3]))}[arg]
        expect_error(lambda: cls(**kw), arg if arg != "dtype" else None)


# -------------------------------------------------------------------------- raw ops (child process)
#
# Contract: every bad call raises ValueError / TypeError (or the RuntimeError of the
# dispatcher's schema parsing: "Expected a value of type ..."), never crashes; valid calls
# match lowbit.reference. The child runs `raw_op_cases` (a hypothesis test called as a
# plain function) and prints one JSON line of counts; before each call it records the call
# in a file, so a crash names it.

RAW_OPS = ["quant_params", "quantize", "dequantize", "fake_quantize", "pack", "unpack", "packed_linear",
           "gptq_hessian_", "hessian_mirror_", "awq_channel_stats_", "awq_gram_factor", "awq_scale_loss", "awq_clip",
           "nf4_quantize", "nf4_dequantize", "nf4_linear", "blockwise8_quantize", "blockwise8_dequantize",
           "int8_quantize_rowwise", "int8_matmul", "int8_outlier_matmul", "int8_dynamic_linear", "gptq_solve",
           "fp8_scales", "fp8_quantize", "fp8_dequantize", "fp8_fake_quantize", "fp8_linear", "channel_range_"]

_LAST_CALL = {"path": None}


def _record(desc: str) -> None:
    if _LAST_CALL["path"]:
        with open(_LAST_CALL["path"], "w") as f:
            f.write(desc)


def _describe(v):
    if isinstance(v, torch.Tensor):
        return f"Tensor({tuple(v.shape)}, {v.dtype}, {v.device}, contiguous={v.is_contiguous()})"
    return repr(v)


def raw_call(op, args, expect_valid):
    """Call torch.ops.lowbit.<op>(*args): (ok, result); bad calls must raise cleanly."""
    _record(f"lowbit::{op}({', '.join(_describe(a) for a in args)})")
    fn = getattr(torch.ops.lowbit, op)
    try:
        out = fn(*args)
    except ERRORS:
        if expect_valid:
            raise
        _CASE["kind"] = "invalid"
        return False, None
    except RuntimeError as e:
        if "Expected a value of type" in str(e) and not expect_valid:
            _CASE["kind"] = "invalid"
            return False, None
        raise AssertionError(f"lowbit::{op} raised a bare RuntimeError (not ValueError / TypeError): {e}") from None
    if expect_valid is False:
        raise AssertionError(f"lowbit::{op} accepted a bad call: {[_describe(a) for a in args]}")
    _CASE["kind"] = "valid" if expect_valid else "invalid"  # a bad-but-harmless call (empty, ...) counts as invalid
    return True, out


# A tensor argument's spec: (accepted dtypes, shape rule). Shape rules: "strict" (rank and
# size fixed by the other arguments), "rank" (rank fixed, any size: a bigger weight is still
# valid), "batched" ([..., features]: leading dims free), "any" (only its element count or
# nothing at all is fixed by the others), "flat" (only the element count is fixed, e.g.
# bitsandbytes' [(n+1)//2, 1] codes: another rank is harmless, another count is wrong).
# Scalar specs: "bits", "int" (fixed by the tensors: 0, -1, 2^40 are all wrong), "pos" (any
# positive value is valid), "count" (>= 0), "str", "float" (finite, >= 0), "dtype".
BAD_SCALARS = {"bits": [1, 9, 0, -3, 2**40], "int": [0, -1, -2**31, 2**40], "pos": [0, -1, -2**31],
               "count": [-1, -2**31], "str": ["", "int4", "NF4"], "float": [float("nan"), float("inf"), -1.0],
               "dtype": [torch.int32, torch.float64, torch.bool]}


def _raw_mutate(draw, args, specs):
    """Break one argument of a valid call: (args, True when the call must raise, None when it
    may raise or return but must not crash, "same" for a non-contiguous view of the same
    values: a valid call whose result must match)."""
    i = draw(st.sampled_from([k for k, s in enumerate(specs) if s is not None]))
    spec, a = specs[i], args[i]
    args = list(args)
    if isinstance(spec, str):
        args[i] = draw(st.sampled_from(BAD_SCALARS[spec]))
        return args, True
    dtypes, rule = spec
    how = draw(st.sampled_from(["dtype", "dim", "shape", "meta", "noncontig", "empty"]))
    if how == "dtype":
        args[i] = retype(a, draw(st.sampled_from([d for d in BAD_DTYPES + FLOATS if d not in dtypes])))
        return args, True
    if how == "meta":  # mixed with CPU tensors: an error; the only tensor: the fake kernel's meta result
        args[i] = a.to("meta")
        return args, True if sum(isinstance(t, torch.Tensor) for t in args) > 1 else None
    if how == "noncontig":
        args[i] = layout(a, draw(st.sampled_from(["transpose", "slice"])))
        return args, "same"
    if how == "empty":
        args[i] = a.reshape(-1)[:0] if a.dim() <= 1 else a[:0]
        return args, None
    if how == "dim":
        args[i] = a.reshape(1, *a.shape) if a.dim() < 3 else a.reshape(-1)
        return args, True if rule in ("strict", "rank") else None  # "flat" / "batched" / "any": harmless
    flat = a.reshape(-1)
    if a.dim() == 0:
        args[i] = a.reshape(1).repeat(2)
    elif a.dim() == 1:
        args[i] = torch.cat([flat, flat[:1]])
    else:
        args[i] = torch.cat([a, a[:1]], 0)
    return args, True if rule in ("strict", "flat") else None


def raw_op_cases(data, op):
    """One raw-op case (wrapped with @given in the child process, once its settings are
    loaded: hypothesis reads the profile when it decorates)."""
    draw = data.draw
    seed = draw(SEEDS)
    g = generator(seed)
    dtype = draw(DTYPES)
    bits = draw(st.integers(2, 8))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    rows, groups, gs = draw(st.sampled_from([1, 2, 3, 7])), draw(st.integers(1, 3)), draw(st.sampled_from([1, 8, 32]))
    cols = groups * gs
    w = (torch.randn(rows, cols, generator=g) * 0.05).to(dtype)
    scale = (torch.rand(rows, groups, generator=g) * 0.1 + 1e-3).to(dtype)
    zero = torch.randint(lo, hi + 1, (rows, groups), generator=g, dtype=torch.int8)
    codes = torch.randint(lo, hi + 1, (rows, cols), generator=g, dtype=torch.int8)
    F32, I8, I32, U8 = (torch.float32,), (torch.int8,), (torch.int32,), (torch.uint8,)
    # absmax / SCB / code tables and Gram matrices: a kernel may convert any float dtype
    F64 = FLOATS + (torch.float64,)
    ZI = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)  # zero points: any integer type
    FL = FLOATS
    check = None
    if op == "quant_params":
        sym = draw(st.booleans())
        args, specs = [w, bits, sym, gs, "minmax"], [(FL, "rank"), "bits", None, "int", "str"]

        def check(out):
            s, z = RQ.quant_params(w, bits, sym, gs)
            assert torch.equal(out[0], s) and torch.equal(out[1], z)
    elif op == "quantize":
        args, specs = [w, scale, zero, bits, gs], [(FL, "strict"), (FL, "strict"), (ZI, "strict"), "bits", "int"]

        def check(out):
            assert torch.equal(out, RQ.quantize(w, scale, zero, bits, gs))
    elif op == "dequantize":
        args, specs = [codes, scale, zero, gs, dtype], [(I8, "strict"), (FL, "strict"), (ZI, "strict"), "int", "dtype"]

        def check(out):
            assert torch.equal(out, RQ.dequantize(codes, scale, zero, gs, dtype))
    elif op == "fake_quantize":
        args, specs = [w, scale, zero, bits, gs], [(FL, "strict"), (FL, "strict"), (ZI, "strict"), "bits", "int"]

        def check(out):
            assert torch.equal(out, RQ.fake_quantize(w, scale, zero, bits, gs))
    elif op == "pack":
        args, specs = [codes, bits], [(I8, "rank"), "bits"]

        def check(out):
            assert torch.equal(out, RQ.pack(codes, bits))
    elif op == "unpack":
        packed = RQ.pack(codes, bits)
        args, specs = [packed, bits, cols], [(I32, "rank"), "bits", "int"]

        def check(out):
            assert torch.equal(out, codes)
    elif op == "packed_linear":
        x = torch.randn(draw(st.sampled_from([1, 2, 5])), cols, generator=g).to(dtype)
        bias = torch.randn(rows, generator=g).to(dtype)
        packed = RQ.pack(codes, bits)
        args, specs = [x, packed, scale, zero, bits, gs, bias], [(FL, "batched"), (I32, "strict"), (FL, "strict"),
                                                                 (ZI, "strict"), "bits", "int", (F64, "strict")]

        def check(out):
            ref = RQ.packed_linear(x, packed, scale, zero, bits, gs, bias)
            close(out, ref, dtype, RQ.packed_linear(x.float(), packed, scale, zero, bits, gs, bias))
    elif op == "gptq_hessian_":
        x = torch.randn(3, cols, generator=g).to(dtype)
        h = torch.zeros(cols, cols)
        args, specs = [h, x, 0, True], [(F32, "strict"), (FL, "batched"), "count", None]

        def check(out):
            rh, rn = RG.hessian(x)
            assert out == rn
            torch.testing.assert_close(h, rh, rtol=1e-4, atol=1e-5 * max(rh.abs().max().item(), 1.0))
    elif op == "hessian_mirror_":
        h = torch.randn(cols, cols, generator=g)
        expected = torch.triu(h) + torch.triu(h, 1).t()
        args, specs = [h], [(F32, "rank")]

        def check(out):
            assert torch.equal(h, expected)
    elif op == "awq_channel_stats_":
        x = torch.randn(3, cols, generator=g).to(dtype)
        acc = torch.zeros(cols, dtype=torch.float64)
        args, specs = [acc, x, 0], [((torch.float64,), "strict"), (FL, "batched"), "count"]

        def check(out):
            ref, n = RA.channel_stats(x)
            assert out == n
            torch.testing.assert_close(acc, ref, rtol=1e-12, atol=0)
    elif op == "awq_gram_factor":
        x = torch.randn(2 * cols, cols, generator=g)
        gram = x.t() @ x
        args, specs = [gram], [(F64, "strict")]

        def check(out):
            torch.testing.assert_close(out.float() @ out.float().t(), gram, rtol=1e-3,
                                       atol=1e-3 * gram.diagonal().mean().item())
    elif op == "awq_scale_loss":
        x = torch.randn(2 * cols, cols, generator=g)
        gram = x.t() @ x
        factor = torch.linalg.cholesky(gram + 1e-3 * torch.eye(cols))
        s = torch.rand(cols, generator=g) + 0.5
        sym = draw(st.booleans())
        args, specs = [w, factor, s, bits, gs, sym], [(FL, "rank"), (F64, "strict"), (F64, "strict"), "bits", "int",
                                                       None]

        def check(out):
            ref = RA.scale_loss(w, factor @ factor.t(), s, bits, gs, sym)
            assert out == pytest.approx(ref, rel=1e-3, abs=1e-9)
    elif op == "awq_clip":
        x = torch.randn(2 * cols, cols, generator=g)
        gram = x.t() @ x
        sym = draw(st.booleans())
        args, specs = [w, gram, bits, gs, sym, 10, 0.5], [(FL, "rank"), (F64, "strict"), "bits", "int", None, "pos",
                                                           "float"]

        def check(out):
            assert out.shape == (rows, groups)
    elif op in ("nf4_quantize", "nf4_dequantize", "nf4_linear"):
        blocksize = draw(st.sampled_from([32, 64]))
        qt = draw(st.sampled_from(["nf4", "fp4"]))
        wn = (torch.randn(rows, blocksize * groups, generator=g) * 0.05).to(dtype)
        packed, absmax = RN.quantize(wn, blocksize, qt)
        if op == "nf4_quantize":
            args, specs = [wn, blocksize, qt], [(FL, "any"), "int", "str"]

            def check(out):
                assert torch.equal(out[0], packed) and torch.equal(out[1], absmax)
        elif op == "nf4_dequantize":
            args = [packed, absmax, blocksize, qt, wn.numel(), dtype]
            specs = [(U8, "flat"), (F64, "flat"), "int", "str", "int", "dtype"]

            def check(out):
                assert torch.equal(out, RN.dequantize(packed, absmax, blocksize, qt, (wn.numel(),), dtype))
        else:
            x = torch.randn(draw(st.sampled_from([1, 3, 9])), wn.shape[1], generator=g).to(dtype)
            bias = torch.randn(rows, generator=g).to(dtype)
            args, specs = [x, packed, absmax, blocksize, qt, rows, bias], [(FL, "batched"), (U8, "flat"), (F64, "flat"),
                                                                            "int", "str", "int", (F64, "strict")]

            def check(out):
                wd = RN.dequantize(packed, absmax, blocksize, qt, wn.shape, torch.float32)
                ref = torch.nn.functional.linear(x.float(), wd, bias.float())
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(out.float(), ref.to(dtype).float(), rtol=tol,
                                           atol=tol * max(ref.abs().max().item(), 1.0))
    elif op in ("blockwise8_quantize", "blockwise8_dequantize"):
        values = torch.randn(draw(st.sampled_from([1, 7, 256, 300])), generator=g)
        code = F.DYNAMIC_MAP
        q, absmax = RN.blockwise8_quantize(values, code, 256)
        if op == "blockwise8_quantize":
            args, specs = [values, code, 256], [(F64, "any"), (F64, "flat"), "pos"]

            def check(out):
                assert torch.equal(out[0], q) and torch.equal(out[1], absmax)
        else:
            args, specs = [q, absmax, code, 256], [(U8, "any"), (F64, "flat"), (F64, "flat"), "pos"]

            def check(out):
                ref = code[q.long()] * absmax.repeat_interleave(256)[:q.numel()]
                torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    elif op == "int8_quantize_rowwise":
        x = (torch.randn(rows, cols, generator=g) * 2).to(dtype)
        threshold = draw(st.sampled_from([0.0, 3.0]))
        args, specs = [x, threshold], [(FL, "batched"), "float"]

        def check(out):
            ref = RI.quantize_rowwise(x, threshold)
            assert all(torch.equal(a, b) for a, b in zip(out, ref))
    elif op == "int8_matmul":
        a = torch.randint(-127, 128, (rows, cols), generator=g, dtype=torch.int8)
        b = torch.randint(-127, 128, (draw(st.sampled_from([1, 3, 16])), cols), generator=g, dtype=torch.int8)
        args, specs = [a, b], [(I8, "rank"), (I8, "rank")]

        def check(out):
            assert torch.equal(out, (a.long() @ b.long().t()).int())
    elif op == "int8_outlier_matmul":
        x = (torch.randn(draw(st.sampled_from([1, 3])), cols, generator=g) * 2).to(dtype)
        wc, scb, _ = RI.quantize_rowwise(w)
        bias = torch.randn(rows, generator=g).to(dtype)
        threshold = draw(st.sampled_from([0.0, 3.0]))
        args, specs = [x, wc, scb, threshold, bias], [(FL, "batched"), (I8, "strict"), (F64, "flat"), "float",
                                                       (F64, "strict")]

        def check(out):
            ref = RI.outlier_matmul(x, wc, scb, threshold, bias)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            torch.testing.assert_close(out.float(), ref.float(), rtol=tol,
                                       atol=tol * max(ref.float().abs().max().item(), 1.0))
    elif op == "int8_dynamic_linear":
        x = (torch.randn(draw(st.sampled_from([1, 3, 20])), cols, generator=g) * 2).to(dtype)
        ws, _ = RQ.quant_params(w, 8, True, cols)
        wc = RQ.quantize(w, ws, None, 8, cols)
        input_scale = torch.tensor([0.02]).to(draw(DTYPES)) if draw(st.booleans()) else None
        bias = torch.randn(rows, generator=g).to(dtype)
        args = [x, wc, ws, input_scale, bias]
        specs = [(FL, "batched"), (I8, "strict"), (F64, "flat"), None if input_scale is None else (F64, "flat"),
                 (F64, "strict")]

        def check(out):
            assert torch.equal(out, RI.dynamic_linear(x, wc, ws, bias, input_scale))
    elif op == "gptq_solve":
        x = torch.randn(4 * cols, cols, generator=g)
        h = 2 * x.t() @ x / x.shape[0]
        perm = torch.arange(cols)
        wf = w.float()
        s, z = RQ.quant_params(w, bits, True, gs)
        col_group = torch.arange(cols) // gs
        args, specs = [wf, h, perm, s, z, col_group, bits, 128, 0.01], \
            [(FL, "strict"), (F32, "strict"), ((torch.int64,), "strict"), (FL, "strict"), (ZI, "strict"),
             ((torch.int64,), "strict"), "bits", "pos", "float"]

        def check(out):
            ref = RG.gptq(w, h, bits=bits, group_size=gs, symmetric=True, actorder=None, block_size=128)
            assert out[0].shape == ref[0].shape and out[0].dtype == torch.int8
            assert (out[0] != ref[0]).float().mean() <= 0.2  # ties aside (test_gptq checks the solve exactly)
    elif op in ("fp8_scales", "fp8_quantize", "fp8_dequantize", "fp8_fake_quantize", "fp8_linear"):
        fmt = draw(st.sampled_from(["e4m3", "e5m2"]))
        br, bc = draw(st.sampled_from([(1, cols), (rows, cols), (1, gs), (rows, gs)]))  # tiles that divide w
        s8 = R8.scales(w, br, bc, fmt)
        q8 = R8.quantize(w, s8, br, bc, fmt)
        if op == "fp8_scales":
            args, specs = [w, br, bc, fmt], [(FL, "rank"), "pos", "pos", "str"]

            def check(out):
                assert torch.equal(out, s8)
        elif op == "fp8_quantize":
            args, specs = [w, s8, br, bc, fmt], [(FL, "strict"), (FL, "strict"), "pos", "pos", "str"]

            def check(out):
                assert torch.equal(out.view(torch.uint8), q8.view(torch.uint8))
        elif op == "fp8_dequantize":
            args, specs = [q8, s8, br, bc, dtype], [(FP8S, "strict"), (FL, "strict"), "pos", "pos", "dtype"]

            def check(out):
                assert torch.equal(out, R8.dequantize(q8, s8, br, bc, dtype))
        elif op == "fp8_fake_quantize":
            args, specs = [w, s8, br, bc, fmt], [(FL, "strict"), (FL, "strict"), "pos", "pos", "str"]

            def check(out):
                assert torch.equal(out, R8.fake_quantize(w, s8, br, bc, fmt))
        else:
            x = torch.randn(draw(st.sampled_from([1, 3, 9, 70])), cols, generator=g).to(dtype)
            bias = torch.randn(rows, generator=g).to(dtype)
            args, specs = [x, q8, s8, br, bc, bias], [(FL, "batched"), (FP8S, "strict"), (FL, "strict"), "pos", "pos",
                                                       (F64, "strict")]

            def check(out):
                ref = R8.linear(x, q8, s8, br, bc, bias)
                tol = 1e-5 if dtype == torch.float32 else 1e-2
                torch.testing.assert_close(out.float(), ref.float(), rtol=tol,
                                           atol=tol * max(ref.float().abs().max().item(), 1.0))
    elif op == "channel_range_":
        x = torch.randn(*draw(st.sampled_from([(1,), (3,), (2, 5)])), cols, generator=g).to(dtype)
        lo, hi = torch.full((cols,), math.inf), torch.full((cols,), -math.inf)
        args, specs = [lo, hi, x], [(F32, "strict"), (F32, "strict"), (FL, "batched")]

        def check(out):
            rlo, rhi = RS.channel_range(x)
            assert out is None and torch.equal(lo, rlo) and torch.equal(hi, rhi)
    else:
        raise AssertionError(f"no generator for lowbit::{op}")
    if draw(st.booleans()):
        _, out = raw_call(op, args, True)
        check(out)
        return
    bad_args, must_fail = _raw_mutate(draw, args, specs)
    note(f"lowbit::{op}({', '.join(_describe(a) for a in bad_args)})")
    if must_fail == "same":  # a non-contiguous view of the same values: must match, unless updated in place
        ok, out = raw_call(op, bad_args, None if op.endswith("_") else True)
        if ok and not op.endswith("_"):
            check(out)
        return
    raw_call(op, bad_args, False if must_fail else None)


def _run_raw_ops(ops, examples, derandomize, counts_path, last_call_path):
    """Child process: each op's cases; exit status 1 on a failed property (with its report)."""
    import faulthandler
    import traceback

    from hypothesis import settings

    faulthandler.enable()
    settings.register_profile("raw", max_examples=examples, derandomize=derandomize, deadline=None, database=None,
                              print_blob=True, suppress_health_check=list(hypothesis.HealthCheck))
    settings.load_profile("raw")
    _LAST_CALL["path"] = last_call_path
    failed = []
    for op in ops:
        print(f"=== lowbit::{op}", flush=True)
        try:
            given(data=st.data())(counted(raw_op_cases))(op=op)
        except Exception as e:  # a property failure: report and carry on with the next op
            subs = getattr(e, "exceptions", [e])
            failed.append(f"lowbit::{op}: " + " | ".join(f"{type(x).__name__}: {str(x)[:400]}" for x in subs))
            traceback.print_exc(file=sys.stdout)
        with open(counts_path, "w") as f:
            json.dump({"valid": FUZZ_COUNTS["valid"], "invalid": FUZZ_COUNTS["invalid"], "done": op,
                       "failed": failed}, f)
    _record("")
    return 1 if failed else 0


RAW_GROUPS = [RAW_OPS[i::3] for i in range(3)]


@pytest.mark.parametrize("ops", RAW_GROUPS, ids=["raw-ops-a", "raw-ops-b", "raw-ops-c"])
def test_fuzz_raw_ops(ops, request):
    """torch.ops.lowbit.* in a child process: a crash (a signal, a non-zero exit) fails the test
    and names the last call; a property failure names the op and the falsifying call."""
    profile = hypothesis.settings.default
    examples = max(profile.max_examples // 2, 10)  # per op: cheap calls
    with tempfile.TemporaryDirectory() as tmp:
        counts_path, last_path = os.path.join(tmp, "counts.json"), os.path.join(tmp, "last_call")
        env = dict(os.environ, HYPOTHESIS_STORAGE_DIRECTORY=os.path.join(tmp, "hypothesis"))
        proc = subprocess.run([sys.executable, __file__, ",".join(ops), str(examples),
                               "1" if profile.derandomize else "0", counts_path, last_path],
                              capture_output=True, text=True, env=env, timeout=600,
                              cwd=os.path.dirname(os.path.abspath(__file__)))
        counts = json.load(open(counts_path)) if os.path.exists(counts_path) else {"valid": 0, "invalid": 0,
                                                                                    "failed": []}
        last = open(last_path).read() if os.path.exists(last_path) else ""
    FUZZ_COUNTS["valid"] += counts["valid"]
    FUZZ_COUNTS["invalid"] += counts["invalid"]
    if proc.returncode < 0 or proc.returncode not in (0, 1):
        pytest.fail(f"the raw-op child crashed (exit status {proc.returncode}) in {last or 'startup'}\n"
                    f"{proc.stderr[-3000:]}")
    if proc.returncode == 1 or counts.get("failed"):
        pytest.fail("raw-op property failures:\n" + "\n".join(counts.get("failed", [])) + "\n\n" + proc.stdout[-8000:]
                    + proc.stderr[-2000:])


if __name__ == "__main__":  # the raw-op child process
    torch.set_num_threads(1)
    sys.exit(_run_raw_ops(sys.argv[1].split(","), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]))
