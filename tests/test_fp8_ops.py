"""FP8 (E4M3 / E5M2) kernels and SmoothQuant's channel statistic: the C++ ops against torch's own
float8 conversion and lowbit.reference.fp8 / .smoothquant, on random and real (SmolLM2) weights
and activations, every layout of scales, dtype and ISA path, pinned byte patterns, and bad inputs.

Exactness: codes are compared byte for byte with torch.clamp(x / scale, -max, max).to(float8)
for fp32 x / scale; scales with torch's division in x's dtype (compressed-tensors' expression);
dequantize / fake_quantize values exactly. fp16 / bf16 x is divided in fp32 by the kernels, where
torch divides in x's dtype first: a quotient rounded onto the midpoint between two FP8 values then
goes to the even one. test_fp16_bf16_division_in_fp32 measures it on Gaussian weights with
per-channel scales: E4M3 codes differ (by one step) for 0.37% of fp16 and 2.97% of bf16 elements,
E5M2 for 0% of fp16 and 1.36% of bf16 ones.

fp8_linear is compared with the reference (dequantize, then F.linear in fp32): LINEAR_TOL (rtol
and atol as a fraction of the output's largest magnitude) for fp32 x (summation order only:
measured below 1e-6), one fp16 / bf16 rounding of the output otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch

from lowbit import functional as F
from lowbit import ops
from lowbit.reference import fp8 as R
from lowbit.reference import smoothquant as RS

from conftest import DTYPE_IDS, FLOAT_DTYPES, capture_inputs, noncontig, num_threads, real_linear_inputs

pytestmark = pytest.mark.usefixtures("isa_path")

FORMATS = ["e4m3", "e5m2"]
LINEAR_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def blocks_of(rows, cols):
    """Every layout: per tensor, per channel, per token group, FP8_BLOCK, odd tiles."""
    return [(rows, cols), (1, cols), (1, 32), (128, 128), (7, 5), (64, 1)]


def data(rows, cols, gen, dtype=torch.float32, std=0.05):
    """Gaussian with outliers, exact zeros and an all-zero row (its scale becomes eps)."""
    x = torch.randn(rows, cols, generator=gen) * std
    x = torch.where(torch.rand(rows, cols, generator=gen) < 0.02, x * 20, x)
    x.view(-1)[::37] = 0
    if rows > 2:
        x[1] = 0
    return x.to(dtype)


def raw(q):
    return q.view(torch.uint8)


def assert_quantize_exact(x, block, fmt):
    scale = ops.fp8_scales(x, *block, fmt)
    assert scale.dtype == x.dtype
    assert torch.equal(scale, R.scales(x, *block, fmt)), "scale differs from torch's division in x's dtype"
    q = ops.fp8_quantize(x, scale, *block, fmt)
    assert q.dtype == R.FORMATS[fmt] and q.shape == x.shape
    ref = R.quantize(x, scale, *block, fmt)
    assert torch.equal(raw(q), raw(ref)), f"{(raw(q) != raw(ref)).sum().item()} codes differ"
    for dtype in FLOAT_DTYPES:
        assert torch.equal(ops.fp8_dequantize(q, scale, *block, dtype), R.dequantize(ref, scale, *block, dtype))
    assert torch.equal(ops.fp8_fake_quantize(x, scale, *block, fmt), R.fake_quantize(x, scale, *block, fmt))
    return q, scale


# ---------------------------------------------------------------- codes, bit for bit

def torch_codes(x, fmt):
    return raw(torch.clamp(x, -R.MAX[fmt], R.MAX[fmt]).to(R.FORMATS[fmt]))


def our_codes(x, fmt):
    return raw(ops.fp8_quantize(x.reshape(1, -1), torch.ones(1, 1), 1, x.numel(), fmt)).reshape(-1)


def fp8_grid(fmt):
    """Every FP8 value (NaNs left out) in ascending order, as float32."""
    v = torch.arange(256, dtype=torch.uint8).view(R.FORMATS[fmt]).float()
    return torch.unique(v[torch.isfinite(v)])


@pytest.mark.parametrize("fmt", FORMATS)
def test_codes_equal_torch_exhaustively(fmt):
    """Every finite fp16 and bf16 value (as fp32), every midpoint between neighbouring FP8 values
    and its two fp32 neighbours (ties to even), the subnormal range and values past the maximum,
    and 2^20 random fp32 bit patterns spanning all exponents."""
    bits16 = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    grid = fp8_grid(fmt).double()
    mid = ((grid[1:] + grid[:-1]) / 2).float()
    pieces = [bits16.view(torch.float16).float(), bits16.view(torch.bfloat16).float(), mid,
              torch.nextafter(mid, torch.tensor(math.inf)), torch.nextafter(mid, torch.tensor(-math.inf)),
              torch.linspace(-2 * R.MAX[fmt], 2 * R.MAX[fmt], 100003),
              torch.randint(-(1 << 31), 1 << 31, (1 << 20,), generator=torch.Generator().manual_seed(1),
                            dtype=torch.int64).to(torch.int32).view(torch.float32)]
    x = torch.cat(pieces)
    x = x[~torch.isnan(x)]
    assert torch.equal(our_codes(x, fmt), torch_codes(x, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_fake_quantize_is_decoded_codes(fmt):
    """fake_quantize rounds in floating point without codes: the same values as decoding them."""
    grid = fp8_grid(fmt).double()
    mid = ((grid[1:] + grid[:-1]) / 2).float()
    x = torch.cat([mid, torch.nextafter(mid, torch.tensor(math.inf)), torch.nextafter(mid, torch.tensor(-math.inf)),
                   torch.randn(10000) * R.MAX[fmt] / 4]).reshape(1, -1)
    one = torch.ones(1, 1)
    expected = torch.clamp(x, -R.MAX[fmt], R.MAX[fmt]).to(R.FORMATS[fmt]).float()
    assert torch.equal(ops.fp8_fake_quantize(x, one, 1, x.shape[1], fmt), expected)


def test_pinned_bytes():
    """By hand from the formats: E4M3 1.0 = 0x38, 448 (largest) = 0x7E, -2 = 0xC0, 2^-9 (smallest
    subnormal) = 0x01, 2^-6 (smallest normal) = 0x08, -0 = 0x80; past 448 saturates; ties go to
    even (1.0625 between 0x38 and 0x39 -> 0x38, 1.1875 -> 0x3A, 1.5 * 2^-9 -> 0x02, 2^-10 -> 0)."""
    x = torch.tensor([1.0, 448.0, -2.0, 2.0 ** -9, 2.0 ** -6, -0.0, 500.0, -math.inf, 1.0625, 1.1875,
                      1.5 * 2.0 ** -9, 2.0 ** -10, 0.0, 240.0])
    assert our_codes(x, "e4m3").tolist() == [0x38, 0x7E, 0xC0, 0x01, 0x08, 0x80, 0x7E, 0xFE, 0x38, 0x3A, 0x02, 0x00,
                                             0x00, 0x77]
    # E5M2: 1.0 = 0x3C, 57344 (largest) = 0x7B, -2 = 0xC0, 2^-16 (smallest subnormal) = 0x01, 2^-14 = 0x04
    x = torch.tensor([1.0, 57344.0, -2.0, 2.0 ** -16, 2.0 ** -14, 1e9, 1.125, 1.375])
    assert our_codes(x, "e5m2").tolist() == [0x3C, 0x7B, 0xC0, 0x01, 0x04, 0x7B, 0x3C, 0x3E]
    # a scale divides first: 3.5 / 0.5 = 7 = 1.75 * 2^2 -> exponent 9, mantissa 6 -> 0x4E
    assert raw(ops.fp8_quantize(torch.tensor([[3.5]]), torch.tensor([[0.5]]), 1, 1)).item() == 0x4E


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 129), (129, 300), (300, 7)])
def test_matches_reference(gen, fmt, dtype, shape):
    x = data(*shape, gen, dtype)
    for block in blocks_of(*shape):
        assert_quantize_exact(x, block, fmt)


@pytest.mark.parametrize("how", ["slice", "transpose"])
def test_non_contiguous_inputs(gen, how):
    x = data(129, 300, gen)
    for block in [(1, 300), (128, 128)]:
        scale = ops.fp8_scales(noncontig(x, how), *block)
        assert torch.equal(scale, ops.fp8_scales(x, *block))
        q = ops.fp8_quantize(noncontig(x, how), noncontig(scale, how), *block)
        assert torch.equal(raw(q), raw(R.quantize(x, scale, *block)))
        assert torch.equal(ops.fp8_dequantize(noncontig(q, how), scale, *block, torch.float32),
                           R.dequantize(q, scale, *block, torch.float32))
        assert torch.equal(ops.fp8_fake_quantize(noncontig(x, how), scale, *block), R.fake_quantize(x, scale, *block))


def test_scales_zero_and_underflow():
    """An all-zero tile, and one whose absmax / 448 underflows fp16, both take finfo(dtype).eps."""
    x = torch.zeros(4, 64)
    x[2:, :32] = 1e-5
    x[2:, 32:] = 3.0
    for dtype in FLOAT_DTYPES:
        s = ops.fp8_scales(x.to(dtype), 2, 32)
        assert torch.equal(s, R.scales(x.to(dtype), 2, 32))
        assert s[0, 0].item() == torch.finfo(dtype).eps
    assert ops.fp8_scales(x.half(), 2, 32)[1, 0].item() == torch.finfo(torch.float16).eps


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPE_IDS.get)
def test_fp16_bf16_division_in_fp32(gen, fmt, dtype):
    """The kernels divide fp16 / bf16 x by the scale in fp32; torch (compressed-tensors) divides in
    x's dtype. Codes then differ by one step where that rounding lands on a midpoint: measured
    (this data) E4M3 0.37% (fp16) / 2.97% (bf16), E5M2 0% / 1.36%; never by more than one step."""
    x = (torch.randn(2048, 1024, generator=gen) * 0.05).to(dtype)
    s = ops.fp8_scales(x, 1, 1024, fmt)
    ours = raw(ops.fp8_quantize(x, s, 1, 1024, fmt)).int()
    in_dtype = raw(torch.clamp(x / s, -R.MAX[fmt], R.MAX[fmt]).to(R.FORMATS[fmt])).int()
    assert torch.equal(ours, raw(R.quantize(x, s, 1, 1024, fmt)).int())
    differ = (ours != in_dtype).float().mean().item()
    bound = {("e4m3", torch.float16): 0.006, ("e4m3", torch.bfloat16): 0.04, ("e5m2", torch.float16): 0.001,
             ("e5m2", torch.bfloat16): 0.02}[fmt, dtype]
    assert differ <= bound, f"{differ:.4%} of codes differ from torch's in-dtype division"
    assert (ours - in_dtype).abs().max().item() <= 1


def test_real_weights(smollm2):
    model = smollm2[0]
    modules = dict(model.named_modules())
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj", "model.layers.29.mlp.up_proj"):
        w = modules[name].weight.detach()
        for dtype in (torch.float32, torch.bfloat16):
            for block in [(w.shape[0], w.shape[1]), (1, w.shape[1]), (128, 128), (1, 128)]:
                assert_quantize_exact(w.to(dtype), block, "e4m3")
        assert_quantize_exact(w, (1, w.shape[1]), "e5m2")


def test_nan_is_rejected_and_inf_saturates():
    x = torch.randn(3, 40)
    x[1, 7] = math.nan
    one = torch.ones(1, 1)
    for op in (ops.fp8_quantize, ops.fp8_fake_quantize):
        for fmt in FORMATS:
            with pytest.raises(ValueError, match="NaN"):
                op(x, one, 3, 40, fmt)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.fp8_scales(x, 1, 40)
    x[1, 7] = math.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        ops.fp8_scales(x, 1, 40)
    assert raw(ops.fp8_quantize(x, one, 3, 40))[1, 7].item() == 0x7E
    assert ops.fp8_fake_quantize(x, one, 3, 40)[1, 7].item() == 448.0


# ---------------------------------------------------------------- fp8_linear

def assert_linear_close(got, x, q, scale, block, bias=None):
    ref = R.linear(x, q, scale, *block, bias)
    assert got.dtype == x.dtype and got.shape == ref.shape
    tol = LINEAR_TOL[x.dtype]
    finite = ref.float()[torch.isfinite(ref)].abs()
    atol = tol * max(finite.max().item() if finite.numel() else 0.0, 1e-6)
    torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=atol, equal_nan=True)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 17, 64, 65, 130])
@pytest.mark.parametrize("shape", [(129, 300), (7, 33)])
def test_linear_matches_reference(gen, fmt, tokens, shape):
    """Fused kernels (4 / 2 / 1-row tiles, token groups of 8, 4, 2, 1; partial last chunk) and
    the tiled GEMM path, for every scale layout (per-channel / per-tensor scale the row sums, blocks
    the weights; tiles not a multiple of 32 columns take the portable decoder)."""
    w = data(*shape, gen)
    x = torch.randn(tokens, shape[1], generator=gen)
    bias = torch.randn(shape[0], generator=gen)
    for block in blocks_of(*shape):
        scale = ops.fp8_scales(w, *block, fmt)
        q = ops.fp8_quantize(w, scale, *block, fmt)
        assert_linear_close(ops.fp8_linear(x, q, scale, *block, bias), x, q, scale, block, bias)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("tokens", [1, 5, 64, 100])
def test_linear_dtypes_layouts(gen, dtype, tokens):
    """fp16 / bf16 activations and bias, 3-D and non-contiguous x, bf16 scales, in parallel."""
    w = data(256, 320, gen)
    for block in [(1, 320), (256, 320), (128, 128)]:
        scale = ops.fp8_scales(w.to(torch.bfloat16), *block)
        q = ops.fp8_quantize(w, scale, *block)
        x = noncontig(torch.randn(tokens, 320, generator=gen).to(dtype), "transpose")
        bias = torch.randn(256, generator=gen).to(dtype)
        with num_threads():
            got = ops.fp8_linear(x, q, scale, *block, bias)
            got3 = ops.fp8_linear(x.reshape(1, tokens, 320), q, scale, *block, None)
        assert_linear_close(got, x, q, scale, block, bias)
        assert_linear_close(got3[0], x, q, scale, block)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad, torch.enable_grad])
def test_linear_under_inference_mode_in_parallel(gen, mode):
    """The many-token path calls ATen's GEMM on the worker threads, which take the caller's
    inference / grad mode (an output made in inference mode is written there)."""
    w = data(64, 96, gen)
    scale = ops.fp8_scales(w, 1, 96)
    q = ops.fp8_quantize(w, scale, 1, 96)
    x = torch.randn(100, 96, generator=gen, requires_grad=mode is torch.enable_grad)
    with num_threads(), mode():
        got = ops.fp8_linear(x, q, scale, 1, 96, None)
    assert_linear_close(got.detach(), x.detach(), q, scale, (1, 96))


def test_linear_nan_and_inf_codes(gen):
    """E4M3 NaN codes make their rows' outputs NaN (the kernels patch the rows they find), E5M2's
    Inf and NaN propagate, as in the dequantized reference."""
    for fmt, bad in (("e4m3", 0x7F), ("e4m3", 0xFF), ("e5m2", 0x7C), ("e5m2", 0x7E)):
        w = data(40, 96, gen)
        for block in [(1, 96), (32, 32)]:
            scale = ops.fp8_scales(w, *block, fmt)
            q = ops.fp8_quantize(w, scale, *block, fmt)
            raw(q)[5, 70] = bad
            raw(q)[33, 95] = bad
            for tokens in (1, 3, 100):
                x = torch.randn(tokens, 96, generator=gen)
                got = ops.fp8_linear(x, q, scale, *block, None)
                assert_linear_close(got, x, q, scale, block)
                assert torch.isnan(got[:, 5]).all() == (fmt == "e4m3" or bad == 0x7E)
                assert torch.isfinite(got[:, :5]).all()
            torch.testing.assert_close(ops.fp8_dequantize(q, scale, *block, torch.float32),
                                       R.dequantize(q, scale, *block, torch.float32), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("flush_denormal", [False, True])
@pytest.mark.parametrize("scale_value", [1.0, 3.0e-3, 300.0, 1e30])
def test_every_e4m3_code_decodes_exactly(gen, scale_value, flush_denormal):
    """All 256 E4M3 bytes (subnormals, -0, both NaNs) times the scale, bit for bit as the reference,
    in fp8_dequantize and in fp8_linear with one-hot x. The portable path decodes by arithmetic
    where that is exact and through its table where it is not: a scale of 300 or more (scale * 2^120
    overflows), and a thread that treats subnormal inputs as zero (torch.set_flush_denormal)."""
    q = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(4, 64)
    scale = torch.full((4, 1), scale_value)
    ref = R.dequantize(q, scale, 1, 64, torch.float32)
    x = torch.eye(64)[:2]  # two tokens (the fused kernels): y[t, r] = w[r, t] exactly
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        got = ops.fp8_dequantize(q, scale, 1, 64, torch.float32)
        y = ops.fp8_linear(x, q, scale, 1, 64, None)
    finally:
        torch.set_flush_denormal(False)
    assert torch.equal(got.isnan(), ref.isnan())
    assert torch.equal(got.nan_to_num().view(torch.int32), ref.nan_to_num().view(torch.int32))  # -0 included
    expected = R.linear(x, q, scale, 1, 64, None)  # the NaN codes' rows NaN, the others w[r, t]
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.nan_to_num(), expected.nan_to_num())


def test_linear_on_real_weights(smollm2):
    for w, x in real_linear_inputs(smollm2):
        for block in [(1, w.shape[1]), (128, 128)]:
            scale = ops.fp8_scales(w, *block)
            q = ops.fp8_quantize(w, scale, *block)
            for rows in (x[:1], x[:4], x):
                assert_linear_close(ops.fp8_linear(rows, q, scale, *block, None), rows, q, scale, block)


def test_linear_empty_and_degenerate():
    q = ops.fp8_quantize(torch.randn(5, 8), torch.ones(5, 1), 1, 8)
    assert ops.fp8_linear(torch.randn(0, 8), q, torch.ones(5, 1), 1, 8, None).shape == (0, 5)
    bias = torch.randn(3)
    empty_k = torch.zeros(3, 0, dtype=torch.float8_e4m3fn)
    assert torch.equal(ops.fp8_linear(torch.randn(2, 0), empty_k, torch.ones(3, 0), 1, 1, bias),
                       bias.expand(2, 3))


# ---------------------------------------------------------------- SmoothQuant statistic

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 5, 64), (1000, 33)])
def test_channel_range_matches_reference(gen, dtype, shape):
    batches = [(torch.randn(*shape, generator=gen) * 3).to(dtype) for _ in range(3)]
    mins, maxs = F.channel_range(batches[0])
    rmins, rmaxs = RS.channel_range(batches[0])
    for x in batches[1:]:
        if x.dim() == 2 and min(x.shape) > 1:
            x = noncontig(x, "transpose")
        with num_threads():
            same = F.channel_range(x, mins, maxs)
        assert same[0] is mins and same[1] is maxs
        rmins, rmaxs = RS.channel_range(x, rmins, rmaxs)
    assert torch.equal(mins, rmins) and torch.equal(maxs, rmaxs)


def test_channel_range_on_real_activations(smollm2):
    name = "model.layers.5.mlp.down_proj"
    _, x = capture_inputs(smollm2, ["The quick brown fox jumps over the lazy dog."], [name])[name]
    mins, maxs = torch.full((x.shape[-1],), math.inf), torch.full((x.shape[-1],), -math.inf)
    ops.channel_range_(mins, maxs, x)
    ops.channel_range_(mins, maxs, x[:3] * 2)
    rmins, rmaxs = RS.channel_range(x)
    rmins, rmaxs = RS.channel_range(x[:3] * 2, rmins, rmaxs)
    assert torch.equal(mins, rmins) and torch.equal(maxs, rmaxs)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_channel_range_non_finite(bad):
    mins, maxs = F.channel_range(torch.randn(4, 16))
    before = mins.clone(), maxs.clone()
    x = torch.randn(300, 16)
    x[200, 3] = bad
    with pytest.raises(ValueError, match="non-finite activations"):
        ops.channel_range_(mins, maxs, x)
    assert torch.equal(mins, before[0]) and torch.equal(maxs, before[1])


# ---------------------------------------------------------------- bad arguments

def test_raw_ops_reject_bad_arguments():
    x, one = torch.randn(4, 64), torch.ones(1, 1)
    q = ops.fp8_quantize(x, one, 4, 64)
    cases = [
        (ValueError, "format", lambda: ops.fp8_scales(x, 1, 64, "e3m4")),
        (ValueError, "positive", lambda: ops.fp8_scales(x, 0, 64)),
        (ValueError, "positive", lambda: ops.fp8_quantize(x, one, 4, -1)),
        (TypeError, "x must be", lambda: ops.fp8_scales(x.double(), 1, 64)),
        (TypeError, "x must be", lambda: ops.fp8_quantize(x.int(), one, 4, 64)),
        (ValueError, "2-D", lambda: ops.fp8_scales(x.reshape(2, 2, 64), 1, 64)),
        (ValueError, r"shape \[4, 1\]", lambda: ops.fp8_quantize(x, one, 1, 64)),
        (ValueError, "finite and > 0", lambda: ops.fp8_quantize(x, torch.zeros(1, 1), 4, 64)),
        (ValueError, "finite and > 0", lambda: ops.fp8_fake_quantize(x, torch.full((1, 1), math.inf), 4, 64)),
        (ValueError, "finite and > 0", lambda: ops.fp8_dequantize(q, torch.full((1, 1), math.nan), 4, 64,
                                                                  torch.float32)),
        (TypeError, "scale must be", lambda: ops.fp8_quantize(x, one.int(), 4, 64)),
        (TypeError, "float8", lambda: ops.fp8_dequantize(raw(q), one, 4, 64, torch.float32)),
        (TypeError, "dtype", lambda: ops.fp8_dequantize(q, one, 4, 64, torch.int32)),
        (TypeError, "float8", lambda: ops.fp8_linear(x, x, one, 4, 64, None)),
        (ValueError, "features", lambda: ops.fp8_linear(torch.randn(2, 32), q, one, 4, 64, None)),
        (ValueError, "bias", lambda: ops.fp8_linear(x, q, one, 4, 64, torch.randn(3))),
        (ValueError, "weight_scale|scale", lambda: ops.fp8_linear(x, q, torch.ones(4, 1), 4, 64, None)),
        (ValueError, "device|same", lambda: ops.fp8_linear(x, q.to("meta"), one, 4, 64, None)),
        (ValueError, "shape", lambda: ops.channel_range_(torch.zeros(63), torch.zeros(64), x)),
        (TypeError, "mins", lambda: ops.channel_range_(torch.zeros(64, dtype=torch.float64), torch.zeros(64), x)),
        (ValueError, "contiguous", lambda: ops.channel_range_(torch.zeros(128)[::2], torch.zeros(64), x)),
        (ValueError, "share memory", lambda: (lambda t: ops.channel_range_(t, t, x))(torch.zeros(64))),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()


def test_functional_errors():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="block must be"):
        F.fp8_scales(x, block=(0, 4))
    with pytest.raises(ValueError, match="format must be"):
        F.fp8_quantize(x, format="fp8")
    q, s = F.fp8_quantize(torch.randn(5, 64), block=(3, 64))  # partial tiles: the shape cannot tell
    with pytest.raises(ValueError, match="pass block"):
        F.fp8_dequantize(q, s)
    assert torch.equal(F.fp8_dequantize(q, s, block=(3, 64)), ops.fp8_dequantize(q, s, 3, 64, torch.float32))
    with pytest.raises(TypeError, match="float8"):
        F.fp8_linear(x, x, s)
    with pytest.raises(ValueError, match="64 features"):
        F.fp8_linear(torch.randn(2, 32), *F.fp8_quantize(x))
    with pytest.raises(ValueError, match="finite and > 0"):
        F.fp8_fake_quantize(x, scale=torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="both mins and maxs"):
        F.channel_range(x, torch.zeros(64))
    with pytest.raises(ValueError, match="float32"):
        F.channel_range(x, torch.zeros(63), torch.zeros(63))
    with pytest.raises(ValueError, match="non-empty"):
        F.channel_range(x[:0])
    # per-tensor scales of one element, and the defaults (per channel / per token)
    q, s = F.fp8_quantize(x, scale=torch.tensor([0.01]))
    assert torch.equal(F.fp8_dequantize(q, torch.tensor([0.01])), R.dequantize(q, torch.full((1, 1), 0.01), 4, 64,
                                                                                 torch.float32))
    assert F.fp8_quantize(x)[1].shape == (4, 1)
    assert torch.equal(F.fp8_fake_quantize(x.reshape(2, 2, 64)).reshape(4, 64),
                       R.fake_quantize(x, R.scales(x, 1, 64), 1, 64))


def test_compiles_with_fake_kernels():
    """The fake kernels let torch.compile trace the ops (dynamic shapes)."""
    w = torch.randn(48, 64)
    scale = ops.fp8_scales(w, 1, 64)
    q = ops.fp8_quantize(w, scale, 1, 64)

    def f(x):
        xq = ops.fp8_fake_quantize(x, ops.fp8_scales(x, 1, 64), 1, 64)
        return ops.fp8_linear(xq, q, scale, 1, 64, None)

    compiled = torch.compile(f, backend="eager", fullgraph=True, dynamic=True)
    for n in (3, 5):
        x = torch.randn(n, 64)
        assert torch.equal(compiled(x), f(x))
