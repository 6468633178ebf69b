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
    ("unknown-strategy", W, dict(strategy="row"), ValueError,
     r"strategy must be one of .*'tensor', 'channel', 'group'.*got 'row'"),
    ("integer-block", W, dict(strategy="block"), ValueError, r"strategy 'block' needs block_structure"),
    ("unknown-observer", W, dict(observer="percentile"), ValueError,
     r"observer must be one of \('minmax', 'mse', 'imatrix_mse'.*got 'percentile'"),
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
    with pytest.raises(ValueError, match=r"activations dynamically per token to symmetric int8"):
        PackedLinear.from_linear(nn.Linear(128, 4), {"weights": {"num_bits": 4, "group_size": 32},
                                                     "input_activations": {"num_bits": 8, "strategy": "tensor"}})


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
    (dict(strategy="row"), r"strategy must be one of .*got 'row'"),
    (dict(strategy="group", group_size=-32), r"positive integer group_size, got -32"),
    (dict(strategy="channel", group_size=128), r"group_size is only meaningful with strategy 'group'"),
    (dict(observer="percentile"), r"observer must be one of \('minmax', 'mse', 'imatrix_mse'.*got 'percentile'"),
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


# ------------------------------------------- issue 13: devices, parameters, module state

def _module(kind):
    from lowbit.nn import Int8DynamicLinear, Int8OutlierLinear, NF4Linear
    lin = nn.Linear(64, 8)
    return {"PackedLinear": lambda: PackedLinear.from_linear(lin, {"weights": {"num_bits": 4, "group_size": 32}}),
            "NF4Linear": lambda: NF4Linear.from_linear(lin), "Int8OutlierLinear": lambda: Int8OutlierLinear.from_linear(lin),
            "Int8DynamicLinear": lambda: Int8DynamicLinear.from_linear(lin)}[kind]()


@pytest.mark.parametrize("kind", ["PackedLinear", "NF4Linear", "Int8OutlierLinear", "Int8DynamicLinear"])
def test_meta_module_raises_instead_of_returning_garbage(kind):
    with pytest.raises(ValueError, match=r"x is on meta"):
        _module(kind)(torch.randn(2, 64, device="meta"))
    meta = _module(kind).to("meta")
    with pytest.raises(ValueError, match=rf"{kind} weights are on meta .*load real weights first "
                                         r"\(module\.to_empty"):
        meta(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"is on meta"):
        meta.check_state()


def test_meta_tensors_in_functional_ops():
    packed, state = F.nf4_quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"packed is on meta"):
        F.nf4_linear(torch.randn(2, 64), packed.to("meta"), state)
    with pytest.raises(ValueError, match=r"absmax is on meta"):
        F.nf4_dequantize(packed, state._replace(absmax=state.absmax.to("meta")))
    codes, scb, _ = F.int8_quantize_rowwise(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"bias is on meta"):
        F.int8_outlier_matmul(torch.randn(2, 64), codes, scb, 6.0, torch.zeros(8, device="meta"))
    with pytest.raises(ValueError, match=r"w_int8 is on meta"):
        F.int8_outlier_matmul(torch.randn(2, 64), codes.to("meta"), scb)


CODES_A, SCALE_A, ZERO_A = F.quantize(torch.randn(8, 64), 4, False, "group", 32)


@pytest.mark.parametrize("call,exc,match", _params([
    ("zero-transposed", lambda: F.dequantize(CODES_A, SCALE_A, ZERO_A.t().contiguous()), ValueError,
     r"zero_point has shape \(2, 8\) but scale has \(8, 2\): they must match"),
    ("scale-zero", lambda: F.dequantize(CODES_A, torch.zeros_like(SCALE_A)), ValueError, r"scale must be finite and > 0"),
    ("scale-nan", lambda: F.dequantize(CODES_A, SCALE_A.index_fill(1, torch.tensor([0]), float("nan"))), ValueError,
     r"scale must be finite and > 0"),
    ("scale-inf", lambda: F.fake_quantize(torch.randn(8, 64), 4, scale=torch.full_like(SCALE_A, float("inf"))),
     ValueError, r"scale must be finite and > 0"),
    ("scale-negative", lambda: F.packed_linear(torch.randn(2, 64), F.pack(CODES_A, 4), -SCALE_A, ZERO_A, 4, 64),
     ValueError, r"scale must be finite and > 0"),
    ("zero-4bit-100", lambda: F.fake_quantize(torch.randn(8, 64), 4, False, scale=SCALE_A,
                                              zero_point=torch.full_like(ZERO_A, 100)), ValueError,
     r"zero_point must lie in \[-8, 7\] \(the 4-bit grid\)"),
    ("zero-4bit-packed-linear", lambda: F.packed_linear(torch.randn(2, 64), F.pack(CODES_A, 4), SCALE_A,
                                                        torch.full_like(ZERO_A, -9), 4, 64), ValueError,
     r"zero_point must lie in \[-8, 7\]"),
    ("zero-bool", lambda: F.dequantize(CODES_A, SCALE_A, ZERO_A != 0), TypeError,
     r"zero_point must be an integer tensor, got torch.bool"),
    ("zero-without-scale", lambda: F.fake_quantize(torch.randn(8, 64), 4, zero_point=ZERO_A), ValueError,
     r"zero_point was given without scale"),
    ("bias-complex", lambda: F.packed_linear(torch.randn(2, 64), F.pack(CODES_A, 4), SCALE_A, ZERO_A, 4, 64,
                                             torch.zeros(8, dtype=torch.complex64)), TypeError,
     r"bias must be float32, float16 or bfloat16, got torch.complex64"),
    ("bias-int", lambda: F.int8_outlier_matmul(torch.randn(2, 64), *F.int8_quantize_rowwise(torch.randn(8, 64))[:2],
                                               6.0, torch.zeros(8, dtype=torch.int32)), TypeError, r"bias must be float"),
    ("bias-2-D", lambda: F.packed_linear(torch.randn(2, 64), F.pack(CODES_A, 4), SCALE_A, ZERO_A, 4, 64,
                                         torch.zeros(1, 8)), ValueError, r"bias must have 8 entries"),
    ("in-features-bool", lambda: F.packed_linear(torch.randn(2, 64), F.pack(CODES_A, 4), SCALE_A, ZERO_A, 4, True),
     TypeError, r"in_features must be an integer"),
    ("scb-shape", lambda: F.int8_outlier_matmul(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8),
                                                torch.ones(8, 1)), ValueError, r"w_scale \(SCB\) must have one entry"),
    ("scb-nan", lambda: F.int8_outlier_matmul(torch.randn(2, 64), torch.zeros(8, 64, dtype=torch.int8),
                                              torch.full((8,), float("nan"))), ValueError, r"w_scale \(SCB\) must be finite"),
    ("threshold-inf", lambda: F.int8_quantize_rowwise(torch.randn(2, 64), float("inf")), ValueError, r"threshold"),
]))
def test_impossible_quantization_parameters(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_nf4_state_checks():
    packed, state = F.nf4_quantize(torch.randn(8, 64))
    with pytest.raises(TypeError, match=r"absmax must be float32 \(uint8 only when double-quantized\), got torch.int32"):
        F.nf4_dequantize(packed, state._replace(absmax=state.absmax.int()))
    with pytest.raises(ValueError, match=r"absmax must be finite and >= 0"):
        F.nf4_linear(torch.randn(2, 64), packed, state._replace(absmax=-state.absmax))
    with pytest.raises(TypeError, match=r"state.dtype must be float32"):
        F.nf4_dequantize(packed, state._replace(dtype=torch.int8))
    with pytest.raises(ValueError, match=r"blocksize must be a power of two"):
        F.nf4_dequantize(packed, state._replace(blocksize=True))
    dq_packed, dq = F.nf4_quantize(torch.randn(8, 64), double_quant=True)
    with pytest.raises(TypeError, match=r"absmax of a double-quantized state must hold uint8 codes"):
        F.nf4_dequantize(dq_packed, dq._replace(absmax=dq.absmax.float()))
    with pytest.raises(ValueError, match=r"offset must be finite"):
        F.nf4_linear(torch.randn(2, 64), dq_packed, dq._replace(offset=torch.tensor(float("nan"))))


@pytest.mark.parametrize("call,exc,match", _params([
    ("hessian-0-d", lambda: F.hessian(torch.tensor(1.0)), ValueError, r"inputs must have at least one dimension"),
    ("hessian-num-samples-bool", lambda: F.hessian(torch.randn(2, 4), None, True), TypeError, r"num_samples"),
    ("hessian-accumulator", lambda: F.hessian(torch.randn(2, 4), torch.zeros(3, 3), 2), ValueError,
     r"hessian must be the contiguous float32 \[4, 4\] accumulator"),
    ("mirror-not-tensor", lambda: F.mirror_hessian_([[1.0]]), TypeError, r"hessian must be a torch.Tensor"),
    ("awq-group-negative", lambda: F.awq_search(torch.randn(8, 64), torch.eye(64), torch.rand(64), group_size=-32),
     ValueError, r"group_size must be a positive integer or None \(whole rows\), got -32"),
    ("awq-group-float", lambda: F.awq_clip(torch.randn(8, 64), torch.eye(64), group_size=32.0), TypeError,
     r"group_size must be a positive integer or None"),
    ("awq-n-grid-bool", lambda: F.awq_grid(True, True), ValueError, r"n_grid must be an integer"),
    ("awq-duo-n-grid-2", lambda: F.awq_grid(True, 2), ValueError, r"n_grid must be an integer >= 3"),
    ("awq-duo-int", lambda: F.awq_grid(1, 20), ValueError, r"duo_scaling must be True, False or 'both'"),
    ("awq-x-mean-int", lambda: F.awq_search(torch.randn(8, 64), torch.eye(64), torch.ones(64, dtype=torch.int32),
                                                  group_size=32),
     TypeError, r"x_mean must be a float tensor"),
    ("awq-max-shrink-nan", lambda: F.awq_clip(torch.randn(8, 64), torch.eye(64), group_size=32,
                                                      max_shrink=float("nan")), ValueError,
     r"max_shrink must be a finite number"),
    ("gptq-damp-nan", lambda: F.gptq(torch.randn(8, 64), torch.eye(64), group_size=32, dampening_frac=float("nan")),
     ValueError, r"dampening_frac must be a finite number"),
    ("gptq-group-zero", lambda: F.gptq(torch.randn(8, 64), torch.eye(64), group_size=0), ValueError,
     r"group_size must be a positive integer or None"),
    ("gptq-block-bool", lambda: F.gptq(torch.randn(8, 64), torch.eye(64), group_size=32, block_size=True), TypeError,
     r"block_size must be an integer"),
    ("gptq-hessian-nan", lambda: F.gptq(torch.randn(8, 64), torch.full((64, 64), float("nan")), group_size=32),
     ValueError, r"hessian contains NaN or Inf"),
    ("gptq-symmetric-int", lambda: F.gptq(torch.randn(8, 64), torch.eye(64), group_size=32, symmetric=1), TypeError,
     r"symmetric must be True or False"),
    ("quantize-symmetric-str", lambda: F.quantize(W, 4, "yes", group_size=32), TypeError, r"symmetric"),
    ("unpack-shape-bool", lambda: F.unpack(PACKED4, 4, (4, True)), TypeError, r"shape\[1\] must be an integer"),
    ("pack-dim-bool", lambda: F.pack(CODES4, 4, packed_dim=True), ValueError, r"packed_dim must be 0 or 1"),
    ("nf4-double-quant-int", lambda: F.nf4_quantize(torch.randn(64), double_quant=1), TypeError, r"double_quant"),
]))
def test_every_bad_argument_names_itself(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(in_features=0, out_features=4), ValueError, r"in_features must be a positive integer, got 0"),
    (dict(in_features=64, out_features=True), TypeError, r"out_features must be a positive integer"),
    (dict(in_features=64.0, out_features=4), TypeError, r"in_features must be a positive integer"),
    (dict(in_features=64, out_features=4, bias=1), TypeError, r"bias must be True or False"),
    (dict(in_features=64, out_features=4, dtype=torch.int8), (TypeError, ValueError), r"dtype must be"),
])
def test_module_constructor_arguments(kwargs, exc, match):
    from lowbit.nn import Int8DynamicLinear, Int8OutlierLinear, NF4Linear
    for cls in (PackedLinear, NF4Linear, Int8OutlierLinear, Int8DynamicLinear):
        kw = dict(kwargs)
        if cls is PackedLinear:
            kw["scheme"] = {"weights": {"num_bits": 4, "group_size": 32}}
        with pytest.raises(exc, match=match):
            cls(**kw)


def test_check_state_names_the_bad_buffer():
    m = PackedLinear.from_linear(nn.Linear(64, 8), {"weights": {"num_bits": 4, "symmetric": False, "group_size": 32}})
    m.check_state()
    m.weight_zero_point[0, 0] = 100
    with pytest.raises(ValueError, match=r"layers.0.q_proj \(PackedLinear 64->8\): weight_zero_point must lie in "
                                         r"\[-8, 7\] \(the 4-bit grid\)"):
        m.check_state("layers.0.q_proj")
    m.weight_zero_point.zero_()
    m.weight_scale[1, 1] = 0
    with pytest.raises(ValueError, match=r"weight_scale must be finite and > 0"):
        m.check_state()
    m.weight_scale.fill_(1)
    m._buffers["weight_scale"] = torch.ones(2, 8)
    with pytest.raises(ValueError, match=r"weight_scale must have shape \(8, 2\), got \(2, 8\)"):
        m.check_state()
    from lowbit.nn import NF4Linear
    n = NF4Linear.from_linear(nn.Linear(64, 8))
    n._buffers["absmax"] = n.absmax.int()
    with pytest.raises(ValueError, match=r"absmax must be float32, got torch.int32"):
        n.check_state()
