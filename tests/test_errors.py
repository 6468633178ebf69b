"""Bad inputs raise ValueError / TypeError whose message says what to fix, never a bare
RuntimeError from the C++ kernels, an IndexError or a ZeroDivisionError."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import functional as F
from lowbit.nn import PackedLinear
from lowbit.schemes import PRESET_SCHEMES, QuantizationArgs, QuantizationScheme, resolve_scheme

W = torch.randn(4, 64)
CODES4 = torch.randint(-8, 8, (4, 64), dtype=torch.int8)
PACKED4 = F.pack(CODES4, 4)
SCALE = torch.rand(4, 2) + 0.1
ZERO = torch.zeros(4, 2, dtype=torch.int8)
X = torch.randn(3, 64)

DEVICES = ["meta"] + (["cuda"] if torch.cuda.is_available() else [])

FLOAT_FN = {
    "quant_params": lambda w, **kw: F.quant_params(w, **kw),
    "quantize": lambda w, **kw: F.quantize(w, **kw),
    "fake_quantize": lambda w, **kw: F.fake_quantize(w, **kw),
}


def _params(table):
    return [pytest.param(*row[1:], id=row[0]) for row in table]


# ------------------------------------------------------------------------- weights

@pytest.mark.parametrize("fn", FLOAT_FN.values(), ids=FLOAT_FN.keys())
@pytest.mark.parametrize("weight,kw,exc,match", _params([
    ("group-not-dividing", torch.randn(4, 96), dict(group_size=64), ValueError,
     r"group_size 64 does not divide the 96 input columns; pick a divisor of 96 or use strategy='channel'"),
    ("group-larger-than-cols", torch.randn(4, 7), dict(group_size=128), ValueError,
     r"group_size 128 does not divide the 7 input columns"),
    ("group-zero", W, dict(group_size=0), ValueError, r"positive integer group_size"),
    ("group-none", W, dict(group_size=None), ValueError, r"positive integer group_size"),
    ("int32", torch.ones(4, 64, dtype=torch.int32), {}, TypeError,
     r"must be float32, float16 or bfloat16, got torch.int32: convert it with weight.float\(\)"),
    ("int8", torch.ones(4, 64, dtype=torch.int8), {}, TypeError, r"float32, float16 or bfloat16, got torch.int8"),
    ("complex", torch.ones(4, 64, dtype=torch.complex64), {}, TypeError,
     r"float32, float16 or bfloat16, got torch.complex64"),
    ("float64", torch.randn(4, 64, dtype=torch.float64), {}, TypeError,
     r"float32, float16 or bfloat16, got torch.float64: convert it with weight.float\(\)"),
    ("1-D", torch.randn(64), {}, ValueError, r"weight must be 2-D \[out_features, in_features\], got shape \(64,\)"),
    ("3-D", torch.randn(2, 4, 64), {}, ValueError, r"2-D .* got shape \(2, 4, 64\)"),
    ("nan", W.clone().index_fill_(1, torch.tensor([5]), float("nan")), dict(group_size=32), ValueError,
     r"NaN or Inf.*fix the model weights"),
    ("inf", W.clone().index_fill_(1, torch.tensor([5]), float("inf")), dict(group_size=32), ValueError, r"NaN or Inf"),
    ("-inf", W.to(torch.float16).index_fill_(0, torch.tensor([3]), float("-inf")), dict(group_size=32), ValueError,
     r"NaN or Inf"),
    ("nan-channel", W.clone().index_fill_(1, torch.tensor([63]), float("nan")), dict(strategy="channel"), ValueError,
     r"NaN or Inf"),
    ("inf-tensor", W.clone().index_fill_(0, torch.tensor([0]), float("inf")), dict(strategy="tensor"), ValueError,
     r"NaN or Inf"),
    ("empty-rows", torch.empty(0, 64), {}, ValueError, r"empty \(shape \(0, 64\)\)"),
    ("empty-cols", torch.empty(4, 0), dict(strategy="channel"), ValueError, r"empty \(shape \(4, 0\)\)"),
    ("unknown-strategy", W, dict(strategy="block"), ValueError,
     r"strategy must be one of .*'tensor', 'channel', 'group'.*got 'block'"),
    ("unknown-observer", W, dict(observer="percentile"), ValueError,
     r"observer must be 'minmax' or 'mse', got 'percentile'"),
    ("not-a-tensor", [[1.0, 2.0]], {}, TypeError, r"weight must be a torch.Tensor, got list"),
]))
def test_bad_weights(fn, weight, kw, exc, match):
    with pytest.raises(exc, match=match):
        fn(weight, **kw)


@pytest.mark.parametrize("fn", FLOAT_FN.values(), ids=FLOAT_FN.keys())
@pytest.mark.parametrize("bits", [1, 9, 0, -4, 4.0, True, "4"], ids=repr)
def test_bits_out_of_range(fn, bits):
    with pytest.raises((ValueError, TypeError), match=r"bits must be an integer in 2\.\.8, got " + repr(bits)):
        fn(W, bits=bits, group_size=32)


@pytest.mark.parametrize("bits", [1, 9, 0, 4.5], ids=repr)
def test_bits_out_of_range_pack_unpack_linear(bits):
    with pytest.raises((ValueError, TypeError), match=r"bits must be an integer in 2\.\.8"):
        F.pack(CODES4, bits)
    with pytest.raises((ValueError, TypeError), match=r"bits must be an integer in 2\.\.8"):
        F.unpack(PACKED4, bits, (4, 64))
    with pytest.raises((ValueError, TypeError), match=r"bits must be an integer in 2\.\.8"):
        F.packed_linear(X, PACKED4, SCALE, None, bits, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_non_cpu_tensors(device):
    w = torch.empty(4, 64, device=device)
    for name, fn in FLOAT_FN.items():
        with pytest.raises(ValueError, match=rf"weight is on {device}.*run on the CPU: pass weight\.cpu\(\)"):
            fn(w, group_size=32)
    codes = torch.zeros(4, 64, dtype=torch.int8, device=device)
    with pytest.raises(ValueError, match=r"codes is on .*pass codes\.cpu\(\)"):
        F.pack(codes, 4)
    with pytest.raises(ValueError, match=r"codes is on .*pass codes\.cpu\(\)"):
        F.dequantize(codes, SCALE)
    with pytest.raises(ValueError, match=r"scale is on .*pass scale\.cpu\(\)"):
        F.dequantize(CODES4, SCALE.to(device))
    with pytest.raises(ValueError, match=r"zero_point is on .*pass zero_point\.cpu\(\)"):
        F.dequantize(CODES4, SCALE, ZERO.to(device))
    with pytest.raises(ValueError, match=r"packed is on .*pass packed\.cpu\(\)"):
        F.unpack(PACKED4.to(device), 4, (4, 64))
    with pytest.raises(ValueError, match=r"x is on .*pass x\.cpu\(\)"):
        F.packed_linear(X.to(device), PACKED4, SCALE, None, 4, 64)
    with pytest.raises(ValueError, match=r"packed is on .*pass packed\.cpu\(\)"):
        F.packed_linear(X, PACKED4.to(device), SCALE, None, 4, 64)
    with pytest.raises(ValueError, match=r"bias is on .*pass bias\.cpu\(\)"):
        F.packed_linear(X, PACKED4, SCALE, None, 4, 64, torch.zeros(4, device=device))


# ----------------------------------------------------------------------- pack / unpack

@pytest.mark.parametrize("call,exc,match", _params([
    ("code-above-range", lambda: F.pack(torch.tensor([[0, 8]], dtype=torch.int8), 4), ValueError,
     r"codes must lie in \[-8, 7\] for 4-bit packing"),
    ("code-below-range", lambda: F.pack(torch.tensor([[-9, 0]], dtype=torch.int8), 4), ValueError,
     r"codes must lie in \[-8, 7\]"),
    ("code-range-2bit", lambda: F.pack(torch.tensor([[2]], dtype=torch.int8), 2), ValueError,
     r"codes must lie in \[-2, 1\] for 2-bit packing"),
    ("code-range-dim0", lambda: F.pack(torch.tensor([[4], [0]], dtype=torch.int8), 3, packed_dim=0), ValueError,
     r"codes must lie in \[-4, 3\]"),
    ("codes-int32", lambda: F.pack(CODES4.int(), 4), TypeError,
     r"codes must be int8, got torch.int32: quantize first, or cast with \.to\(torch\.int8\)"),
    ("codes-uint8", lambda: F.pack(CODES4.to(torch.uint8), 4), TypeError, r"codes must be int8, got torch.uint8"),
    ("codes-float", lambda: F.pack(CODES4.float(), 4), TypeError, r"codes must be int8, got torch.float32"),
    ("codes-1-D", lambda: F.pack(CODES4[0], 4), ValueError, r"codes must be 2-D, got shape \(64,\)"),
    ("packed-dim-2", lambda: F.pack(CODES4, 4, packed_dim=2), ValueError, r"packed_dim must be 0 or 1, got 2"),
    ("packed-dim-neg", lambda: F.pack(CODES4, 4, packed_dim=-1), ValueError, r"packed_dim must be 0 or 1"),
    ("unpack-wrong-cols", lambda: F.unpack(PACKED4, 4, (4, 72)), ValueError,
     r"packed has shape \(4, 8\), but a \(4, 72\) tensor of 4-bit codes packed along dim 1 needs \(4, 9\)"),
    ("unpack-wrong-rows", lambda: F.unpack(PACKED4, 4, (5, 64)), ValueError, r"needs \(5, 8\)"),
    ("unpack-wrong-bits", lambda: F.unpack(PACKED4, 3, (4, 64)), ValueError, r"needs \(4, 6\)"),
    ("unpack-wrong-dim", lambda: F.unpack(PACKED4, 4, (4, 64), packed_dim=0), ValueError,
     r"packed along dim 0 needs \(1, 64\)"),
    ("unpack-3-D-shape", lambda: F.unpack(PACKED4, 4, (4, 64, 1)), ValueError, r"must both be 2-D"),
    ("unpack-1-D", lambda: F.unpack(PACKED4[0], 4, (4, 64)), ValueError, r"must both be 2-D"),
    ("unpack-int64", lambda: F.unpack(PACKED4.long(), 4, (4, 64)), TypeError, r"packed must be int32, got torch.int64"),
    ("unpack-uint32-like-float", lambda: F.unpack(PACKED4.float(), 4, (4, 64)), TypeError,
     r"packed must be int32, got torch.float32"),
    ("unpack-packed-dim", lambda: F.unpack(PACKED4, 4, (4, 64), packed_dim=3), ValueError, r"packed_dim must be 0 or 1"),
]))
def test_pack_unpack_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------- dequantize / given params

@pytest.mark.parametrize("call,exc,match", _params([
    ("codes-int32", lambda: F.dequantize(CODES4.int(), SCALE), TypeError,
     r"codes must be int8 \(as returned by quantize / unpack\), got torch.int32"),
    ("codes-1-D", lambda: F.dequantize(CODES4[0], SCALE), ValueError, r"codes must be 2-D \[out, in\]"),
    ("scale-groups-not-dividing", lambda: F.dequantize(CODES4, torch.ones(4, 3)), ValueError,
     r"scale of shape \(4, 3\) does not fit a \[4, 64\] weight: expected \[4, groups\] with groups dividing 64"),
    ("scale-wrong-rows", lambda: F.dequantize(CODES4, torch.ones(5, 2)), ValueError,
     r"scale of shape \(5, 2\) does not fit a \[4, 64\] weight"),
    ("scale-too-many-groups", lambda: F.dequantize(CODES4, torch.ones(4, 128)), ValueError, r"does not fit"),
    ("scale-1-D", lambda: F.dequantize(CODES4, torch.ones(4)), ValueError, r"scale of shape \(4,\) does not fit"),
    ("scale-no-groups", lambda: F.dequantize(CODES4, torch.ones(4, 0)), ValueError,
     r"scale of shape \(4, 0\) does not fit"),
    ("zero-point-shape", lambda: F.dequantize(CODES4, SCALE, ZERO[:, :1]), ValueError,
     r"zero_point has shape \(4, 1\) but scale has \(4, 2\): they must match"),
    ("zero-point-float", lambda: F.dequantize(CODES4, SCALE, ZERO.float()), TypeError,
     r"zero_point must be an integer tensor, got torch.float32"),
    ("scale-int", lambda: F.dequantize(CODES4, SCALE.int()), TypeError, r"float32, float16 or bfloat16"),
    ("scale-float64", lambda: F.dequantize(CODES4, SCALE.double()), TypeError, r"float32, float16 or bfloat16"),
    ("scale-float64-dtype-given", lambda: F.dequantize(CODES4, SCALE.double(), dtype=torch.float32), TypeError,
     r"scale must be float32, float16 or bfloat16"),
    ("dtype-int", lambda: F.dequantize(CODES4, SCALE, dtype=torch.int32), TypeError,
     r"dtype must be float32, float16 or bfloat16, got torch.int32"),
    ("fake-scale-shape", lambda: F.fake_quantize(W, 4, scale=torch.ones(4, 3)), ValueError,
     r"scale of shape \(4, 3\) does not fit a \[4, 64\] weight"),
    ("fake-zero-float", lambda: F.fake_quantize(W, 4, symmetric=False, scale=SCALE, zero_point=ZERO.float()),
     TypeError, r"zero_point must be an integer tensor"),
    ("fake-scale-float64", lambda: F.fake_quantize(W, 4, scale=SCALE.double()), TypeError,
     r"scale must be float32, float16 or bfloat16"),
]))
def test_dequantize_and_given_params_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------------ packed_linear

@pytest.mark.parametrize("call,exc,match", _params([
    ("x-in-features", lambda: F.packed_linear(torch.randn(3, 63), PACKED4, SCALE, None, 4, 64), ValueError,
     r"x must have 64 features in its last dimension, got shape \(3, 63\)"),
    ("x-3-D-in-features", lambda: F.packed_linear(torch.randn(2, 3, 128), PACKED4, SCALE, None, 4, 64), ValueError,
     r"x must have 64 features in its last dimension, got shape \(2, 3, 128\)"),
    ("x-float64", lambda: F.packed_linear(X.double(), PACKED4, SCALE, None, 4, 64), TypeError,
     r"x must be float32, float16 or bfloat16, got torch.float64: convert it with x\.float\(\)"),
    ("x-int", lambda: F.packed_linear(X.int(), PACKED4, SCALE, None, 4, 64), TypeError,
     r"x must be float32, float16 or bfloat16, got torch.int32"),
    ("x-0-D", lambda: F.packed_linear(torch.tensor(1.0), PACKED4, SCALE, None, 4, 64), ValueError,
     r"\bx\b"),
    ("scale-shape", lambda: F.packed_linear(X, PACKED4, torch.ones(4, 3), None, 4, 64), ValueError,
     r"scale of shape \(4, 3\) does not fit a \[4, 64\] weight"),
    ("scale-rows", lambda: F.packed_linear(X, PACKED4, torch.ones(5, 2), None, 4, 64), ValueError,
     r"scale of shape \(5, 2\) does not fit"),
    ("zero-point-shape", lambda: F.packed_linear(X, PACKED4, SCALE, ZERO[:, :1], 4, 64), ValueError,
     r"zero_point has shape \(4, 1\) but scale has \(4, 2\)"),
    ("zero-point-float", lambda: F.packed_linear(X, PACKED4, SCALE, ZERO.float(), 4, 64), TypeError,
     r"zero_point must be an integer tensor"),
    # the packed weight itself is not checked by lowbit.functional (the C++ check raises RuntimeError)
    ("packed-int64", lambda: F.packed_linear(X, PACKED4.long(), SCALE, None, 4, 64), TypeError,
     r"packed .*int32"),
    ("packed-width-vs-in-features", lambda: F.packed_linear(torch.randn(3, 128), PACKED4, torch.ones(4, 4), None,
                                                            4, 128), ValueError, r"packed"),
    ("packed-width-vs-bits", lambda: F.packed_linear(X, PACKED4, SCALE, None, 8, 64), ValueError, r"packed"),
    ("bias-size", lambda: F.packed_linear(X, PACKED4, SCALE, None, 4, 64, torch.zeros(5)), ValueError, r"bias"),
]))
def test_packed_linear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_packed_linear_module_errors():
    m = PackedLinear.from_linear(nn.Linear(128, 4), "W4A16")
    with pytest.raises(ValueError, match=r"x must have 128 features in its last dimension"):
        m(torch.randn(2, 64))
    with pytest.raises(TypeError, match=r"x must be float32, float16 or bfloat16, got torch.float64"):
        m(torch.randn(2, 128, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"from_linear expects a float nn.Linear, got Conv1d"):
        PackedLinear.from_linear(nn.Conv1d(4, 4, 1), "W4A16")
    with pytest.raises(ValueError, match=r"group_size 128 does not divide the 96 input columns"):
        PackedLinear.from_linear(nn.Linear(96, 4), "W4A16")
    with pytest.raises(ValueError, match=r"use strategy 'group' or 'channel'"):
        PackedLinear.from_linear(nn.Linear(64, 4), QuantizationArgs(strategy="tensor", group_size=None))
    with pytest.raises(TypeError, match=r"got torch.float64: convert it with weight\.float\(\)"):
        PackedLinear.from_linear(nn.Linear(128, 4).double(), "W4A16")
    with pytest.raises(ValueError, match=r"keeps activations in floating point"):
        PackedLinear.from_linear(nn.Linear(128, 4), "W8A8")


# ----------------------------------------------------------------------------- schemes

def test_unknown_scheme_lists_presets():
    with pytest.raises(ValueError, match=r"unknown scheme 'W5A5'; valid presets: ") as info:
        PackedLinear.from_linear(nn.Linear(128, 4), "W5A5")
    for name in PRESET_SCHEMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match=r"valid presets: .*W4A16"):
        resolve_scheme("gptq-4bit")


@pytest.mark.parametrize("kw,match", [
    (dict(num_bits=1), r"num_bits must be an integer in 2\.\.8, got 1"),
    (dict(num_bits=9), r"num_bits must be an integer in 2\.\.8, got 9"),
    (dict(num_bits=4.0), r"num_bits must be an integer in 2\.\.8, got 4\.0"),
    (dict(strategy="block"), r"strategy must be one of .*got 'block'"),
    (dict(strategy="group", group_size=-32), r"positive integer group_size, got -32"),
    (dict(strategy="channel", group_size=128), r"group_size is only meaningful with strategy 'group'"),
    (dict(observer="percentile"), r"observer must be 'minmax' or 'mse', got 'percentile'"),
], ids=["bits-1", "bits-9", "bits-float", "strategy", "group-negative", "channel-with-group", "observer"])
def test_bad_quantization_args(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantizationArgs(**kw)
    with pytest.raises(ValueError, match=match):
        resolve_scheme({"weights": {"num_bits": 4, **kw}})


def test_bad_scheme_objects():
    with pytest.raises(TypeError, match=r"scheme must be a preset name, a QuantizationScheme.*got int"):
        resolve_scheme(4)
    with pytest.raises(ValueError, match=r"needs a 'weights' entry"):
        resolve_scheme({"num_bits": 4})
    assert resolve_scheme("w4a16") == PRESET_SCHEMES["W4A16"]  # names are case-insensitive
    assert isinstance(resolve_scheme(QuantizationArgs()), QuantizationScheme)
    assert lowbit.resolve_scheme is resolve_scheme


def test_raw_ops_raise_value_and_type_errors():
    """The C++ checks use TORCH_CHECK_VALUE / _TYPE, so even lowbit.ops callers get
    ValueError / TypeError rather than a bare RuntimeError."""
    w = torch.randn(4, 64)
    scale, zero = lowbit.ops.quant_params(w, 4, True, 32)
    with pytest.raises(ValueError, match="bits must be in 2..8"):
        lowbit.ops.quantize(w, scale, zero, 9, 32)
    with pytest.raises(ValueError, match="group_size 48 must divide the 64 columns"):
        lowbit.ops.quant_params(w, 4, True, 48)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        lowbit.ops.quant_params(w.double(), 4, True, 32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        lowbit.ops.quant_params(w.index_fill(1, torch.tensor([3]), float("nan")), 4, True, 32)
    with pytest.raises(ValueError, match=r"codes must lie in \[-8, 7\]"):
        lowbit.ops.pack(torch.full((2, 8), 9, dtype=torch.int8), 4)
    with pytest.raises(TypeError, match="packed weight must be a 2-D int32"):
        lowbit.ops.packed_linear(torch.randn(1, 64), torch.zeros(4, 8, dtype=torch.int64), scale, None, 4, 32, None)
