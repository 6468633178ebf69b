"""PackedLinear and the fused packed_linear kernel against a dequantized fp32 matmul and
lowbit.reference.packed_linear."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit import functional as F
from lowbit import reference as R
from lowbit.nn import PackedLinear
from lowbit.schemes import QuantizationArgs, QuantizationScheme

from conftest import FLOAT_DTYPES, dtype_id, make_generator, noncontig, num_threads

# Every kernel test runs on each ISA path this CPU supports (AVX-512, AVX2, portable).
pytestmark = pytest.mark.usefixtures("isa_path")

# Token counts that reach each token block of the fused kernels (8, 4, 2, 1 and their sums) and
# the tile path on every ISA.
BATCHES = [1, 3, 6, 8, 15, 16, 17, 33, 64]


def QS(**weights) -> QuantizationScheme:
    """A weight-only scheme with the given QuantizationArgs fields."""
    return QuantizationScheme(QuantizationArgs(**weights))

# (scheme, in_features, out_features). 4- and 8-bit schemes whose group size is a multiple of 32
# take the fused kernels for few tokens (AVX-512, AVX2 or SSE2 by path); other widths and group
# sizes dequantize a row at a time for up to 4 tokens; more tokens take the tiles.
CONFIGS = [
    ("W4A16", 128, 7),
    ("W4A16", 256, 65),
    ("W4A16", 4096, 7),
    ("W4A16_ASYM", 128, 65),
    ("W4A16_ASYM", 4096, 7),
    ("W8A16", 128, 7),
    ("W8A16", 256, 65),
    ("W8A16", 4096, 7),
    (QS(num_bits=8, symmetric=True, strategy="channel", group_size=None), 129, 7),
    (QS(num_bits=2, symmetric=True, group_size=32), 128, 65),
    (QS(num_bits=2, symmetric=False, group_size=128), 256, 7),
    (QS(num_bits=3, symmetric=True, group_size=64), 256, 7),
    (QS(num_bits=3, symmetric=False, group_size=32), 96, 65),
    (QS(num_bits=5, symmetric=True, group_size=128), 128, 7),
    (QS(num_bits=5, symmetric=False, group_size=64), 128, 65),
    (QS(num_bits=6, symmetric=True, group_size=32), 256, 65),
    (QS(num_bits=6, symmetric=False, group_size=128), 256, 7),
    (QS(num_bits=7, symmetric=True, group_size=64), 128, 7),
    (QS(num_bits=7, symmetric=False, group_size=32), 96, 7),
    (QS(num_bits=4, symmetric=True, group_size=32), 96, 65),
    (QS(num_bits=4, symmetric=False, group_size=64), 128, 7),
    (QS(num_bits=8, symmetric=False, group_size=32), 96, 65),
    (QS(num_bits=8, symmetric=True, group_size=128), 256, 7),
    (QS(num_bits=4, symmetric=True, strategy="channel", group_size=None), 129, 65),
    (QS(num_bits=4, symmetric=False, strategy="channel", group_size=None), 256, 7),
    (QS(num_bits=3, symmetric=False, strategy="channel", group_size=None), 129, 7),
]

# (rtol, atol as a fraction of the output's largest magnitude)
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def scheme_id(s) -> str:
    if isinstance(s, str):
        return s
    s = s.weights
    layout = f"g{s.group_size}" if s.strategy == "group" else s.strategy
    return f"b{s.num_bits}{'sym' if s.symmetric else 'asym'}-{layout}"


def config_id(c) -> str:
    return f"{scheme_id(c[0])}-{c[1]}x{c[2]}"


def make_linear(in_f, out_f, dtype, key, bias=True) -> nn.Linear:
    gen = make_generator("linear", key)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=gen) / math.sqrt(in_f))
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=gen) * 0.1)
    return lin.to(dtype)


def group_size_of(m: PackedLinear) -> int:
    s = m.args
    return s.group_size if s.strategy == "group" else m.in_features


def expected_outputs(m: PackedLinear, x: torch.Tensor):
    """(fp32 result, the same cast to x.dtype, reference.packed_linear's result)."""
    w = m.dequantized_weight(torch.float32)
    y32 = x.float() @ w.t()
    if m.bias is not None:
        y32 = y32 + m.bias.float()
    ref = R.packed_linear(x, m.weight_packed, m.weight_scale, m.weight_zero_point, m.args.num_bits,
                          group_size_of(m), m.bias)
    return y32, y32.to(x.dtype), ref


def assert_output_close(y, x, m):
    y32, expected, ref = expected_outputs(m, x)
    assert y.dtype == x.dtype
    assert tuple(y.shape) == (*x.shape[:-1], m.out_features)
    rtol, atol = TOL[x.dtype]
    atol = atol * max(y32.abs().max().item(), 1e-6)
    torch.testing.assert_close(y.float(), expected.float(), rtol=rtol, atol=atol)
    torch.testing.assert_close(y.float(), ref.float(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_packed_linear_matches_dequantized_matmul(config, dtype):
    scheme, in_f, out_f = config
    lin = make_linear(in_f, out_f, dtype, config_id(config))
    m = PackedLinear.from_linear(lin, scheme)
    s = m.args
    gen = make_generator("x", config_id(config), dtype_id(dtype))

    # the stored weight is the fake-quantized nn.Linear weight
    w = lin.weight.detach()
    fq = F.fake_quantize(w, s.num_bits, s.symmetric, s.strategy, s.group_size, s.observer)
    assert torch.equal(m.dequantized_weight(), fq)
    codes, scale, zero = F.quantize(w, s.num_bits, s.symmetric, s.strategy, s.group_size, s.observer)
    assert torch.equal(m.weight_packed, F.pack(codes, s.num_bits))
    assert torch.equal(m.weight_scale, scale)
    if not s.symmetric:
        assert torch.equal(m.weight_zero_point, zero)

    for batch in BATCHES:
        x = torch.randn(batch, in_f, generator=gen).to(dtype)
        assert_output_close(m(x), x, m)
    x3 = torch.randn(2, 5, in_f, generator=gen).to(dtype)
    assert_output_close(m(x3), x3, m)


def pick(*ids):
    chosen = [c for c in CONFIGS if config_id(c) in ids]
    assert len(chosen) == len(ids), "a config id above does not exist"
    return chosen


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("config", pick("W4A16-256x65", "W4A16_ASYM-128x65", "W8A16-4096x7",
                                        "b3asym-g32-96x65", "b4sym-channel-129x65"), ids=config_id)
def test_non_contiguous_inputs(config, dtype):
    scheme, in_f, out_f = config
    m = PackedLinear.from_linear(make_linear(in_f, out_f, dtype, config_id(config)), scheme)
    gen = make_generator("nc", config_id(config), dtype_id(dtype))
    for batch in (1, 5, 17, 40):
        x = torch.randn(batch, in_f, generator=gen).to(dtype)
        expected = m(x)
        assert_output_close(expected, x, m)
        for how in ("slice", "transpose"):
            xn = noncontig(x, how)
            assert torch.equal(m(xn), expected), how
    # 3-D, non-contiguous in the batch dimensions
    x3 = torch.randn(5, 2, in_f, generator=gen).to(dtype).transpose(0, 1)
    assert not x3.is_contiguous()
    y3 = m(x3)
    assert tuple(y3.shape) == (2, 5, out_f)
    assert torch.equal(y3, m(x3.contiguous()))
    assert_output_close(y3, x3, m)


@pytest.mark.parametrize("config", pick("W4A16-4096x7", "W4A16_ASYM-4096x7", "W8A16-4096x7",
                                        "b6sym-g32-256x65"), ids=config_id)
def test_multithreaded_matches_reference(config):
    """The kernels' parallel loops (rows of the decode kernel, tiles of the GEMM path)."""
    scheme, in_f, out_f = config
    lin = make_linear(in_f, out_f * 9, torch.float32, config_id(config))  # enough rows to split
    m = PackedLinear.from_linear(lin, scheme)
    gen = make_generator("mt", config_id(config))
    for batch in (1, 8, 33):
        x = torch.randn(batch, in_f, generator=gen)
        serial = m(x)
        with num_threads():
            parallel = m(x)
        assert_output_close(parallel, x, m)
        assert_output_close(serial, x, m)


def test_one_dimensional_input():
    m = PackedLinear.from_linear(make_linear(128, 7, torch.float32, "1d"), "W4A16")
    x = torch.randn(128, generator=make_generator("1d-x"))
    y = m(x)
    assert y.shape == (7,)
    torch.testing.assert_close(y, m(x[None])[0], rtol=0, atol=0)
    assert_output_close(y, x, m)


@pytest.mark.parametrize("scheme", ["W4A16", "W8A16", QS(num_bits=3, symmetric=False, group_size=32)],
                         ids=scheme_id)
def test_without_bias(scheme):
    lin = make_linear(128, 65, torch.float32, "nobias", bias=False)
    m = PackedLinear.from_linear(lin, scheme)
    assert m.bias is None
    x = torch.randn(9, 128, generator=make_generator("nobias-x"))
    assert_output_close(m(x), x, m)
    assert "bias" not in m.state_dict()


@pytest.mark.parametrize("scheme", ["W4A16_ASYM", "W8A16", QS(num_bits=3, symmetric=False, group_size=32)],
                         ids=scheme_id)
def test_bf16_inputs_over_many_tokens(scheme):
    """Many bf16 tokens on a CPU with bf16 arithmetic multiply in bf16 (cpu_info()["bf16_gemm"]):
    the product of x with the dequantized weight rounded to bf16, as a bf16 model computes it;
    elsewhere the fp32 product. Either is within bf16's tolerance of the fp32 result."""
    info = lowbit.cpu_info()
    assert info["bf16_gemm"] == (info["active"] == "avx512" and info["features"]["avx512bf16"])
    m = PackedLinear.from_linear(make_linear(256, 600, torch.bfloat16, "bf16-tiles"), scheme)
    x = torch.randn(2, 40, 256, generator=make_generator("bf16-tiles-x")).to(torch.bfloat16)
    y = m(x)
    assert_output_close(y, x, m)
    w = m.dequantized_weight(torch.float32)
    if info["bf16_gemm"]:
        w = w.to(torch.bfloat16).float()
    expected = (x.float() @ w.t() + m.bias.float()).to(torch.bfloat16)
    scale = expected.float().abs().max().item()
    torch.testing.assert_close(y.float(), expected.float(), rtol=2**-7, atol=2**-7 * scale)


def test_scheme_forms_are_equivalent():
    """A preset name, a QuantizationScheme, bare weight QuantizationArgs and a
    compressed-tensors style dict all build the same module."""
    lin = make_linear(128, 7, torch.float32, "forms")
    forms = ["W4A16_ASYM", "w4a16_asym", QS(num_bits=4, symmetric=False, group_size=128),
             QuantizationArgs(num_bits=4, symmetric=False, group_size=128),
             {"weights": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 128}}]
    modules = [PackedLinear.from_linear(lin, f) for f in forms]
    for m in modules[1:]:
        assert m.args == modules[0].args
        for key, value in modules[0].state_dict().items():
            assert torch.equal(m.state_dict()[key], value), key


def test_functional_packed_linear_matches_module():
    lin = make_linear(256, 65, torch.float32, "functional")
    m = PackedLinear.from_linear(lin, "W4A16_ASYM")
    x = torch.randn(4, 256, generator=make_generator("functional-x"))
    y = F.packed_linear(x, m.weight_packed, m.weight_scale, m.weight_zero_point, 4, 256, m.bias)
    assert torch.equal(y, m(x))
    y_raw = lowbit.ops.packed_linear(x, m.weight_packed, m.weight_scale, m.weight_zero_point, 4, 128, m.bias)
    assert torch.equal(y_raw, y)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64, torch.uint8])
def test_raw_op_takes_any_integer_zero_point(dtype):
    """The kernel reads int8 zero points in place; wider ones give the same result, and values
    that no int8 holds (no <= 8-bit grid has them) are refused rather than wrapped."""
    lin = make_linear(256, 65, torch.float32, "zero-dtype")
    m = PackedLinear.from_linear(lin, "W4A16_ASYM")
    x = torch.randn(3, 256, generator=make_generator("zero-dtype-x"))
    zero = m.weight_zero_point
    if dtype == torch.uint8:
        zero = zero.clamp(min=0)
    y8 = lowbit.ops.packed_linear(x, m.weight_packed, m.weight_scale, zero, 4, 128, m.bias)
    assert torch.equal(lowbit.ops.packed_linear(x, m.weight_packed, m.weight_scale, zero.to(dtype), 4, 128, m.bias), y8)
    if dtype != torch.uint8:
        wide = zero.to(dtype).clone()
        wide[0, 0] = 300
        with pytest.raises(ValueError, match="fit in int8"):
            lowbit.ops.packed_linear(x, m.weight_packed, m.weight_scale, wide, 4, 128, m.bias)


def test_quantization_error_is_small():
    """A sanity check independent of the reference: 8-bit per-channel output stays close to
    the float layer, 2-bit is much worse (so the test can tell them apart)."""
    lin = make_linear(256, 65, torch.float32, "error")
    x = torch.randn(16, 256, generator=make_generator("error-x"))
    y = lin(x).detach()
    err8 = (PackedLinear.from_linear(lin, "W8A16")(x) - y).norm() / y.norm()
    err2 = (PackedLinear.from_linear(lin, QS(num_bits=2, group_size=32))(x) - y).norm() / y.norm()
    assert err8 < 0.01
    assert 0.1 < err2 < 1.0


# ------------------------------------------------------------------------------- state dict

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("scheme,in_f,out_f", [
    ("W4A16", 256, 7),
    ("W4A16_ASYM", 256, 65),
    ("W8A16", 128, 7),
    (QS(num_bits=8, strategy="channel", group_size=None), 129, 7),
    (QS(num_bits=3, symmetric=False, group_size=32), 96, 7),
    (QS(num_bits=6, symmetric=True, group_size=64), 128, 65),
], ids=lambda v: scheme_id(v) if not isinstance(v, int) else str(v))
def test_state_dict_has_compressed_tensors_keys(scheme, in_f, out_f, dtype):
    m = PackedLinear.from_linear(make_linear(in_f, out_f, dtype, ("sd", scheme_id(scheme))), scheme)
    s = m.args
    groups = in_f // s.group_size if s.strategy == "group" else 1
    sd = m.state_dict()
    expected = {"weight_packed", "weight_scale", "weight_shape", "bias"}
    if not s.symmetric:
        expected.add("weight_zero_point")
    assert set(sd) == expected

    assert sd["weight_packed"].dtype == torch.int32
    assert tuple(sd["weight_packed"].shape) == (out_f, math.ceil(in_f * s.num_bits / 32))
    assert sd["weight_scale"].dtype == dtype
    assert tuple(sd["weight_scale"].shape) == (out_f, groups)
    assert sd["weight_shape"].dtype == torch.int64
    assert sd["weight_shape"].tolist() == [out_f, in_f]
    assert sd["bias"].dtype == dtype and tuple(sd["bias"].shape) == (out_f,)
    if not s.symmetric:
        assert sd["weight_zero_point"].dtype == torch.int8
        assert tuple(sd["weight_zero_point"].shape) == (out_f, groups)

    # a fresh module loads it strictly and computes the same thing
    fresh = PackedLinear(in_f, out_f, True, scheme, dtype=dtype)
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(3, in_f, generator=make_generator("sd-x")).to(dtype)
    assert torch.equal(fresh(x), m(x))
