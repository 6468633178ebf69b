"""NF4 / FP4 blockwise quantization: the C++ kernels against bitsandbytes itself (bit for bit)
and against lowbit.reference.nf4, on random and real weights, every blocksize and dtype,
known byte patterns, and bad inputs."""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import pytest
import torch

from lowbit import functional as F
from lowbit import ops
from lowbit.reference import nf4 as R

from conftest import DTYPE_IDS, FLOAT_DTYPES, noncontig

# Every kernel test runs on each ISA path this CPU supports (AVX-512, AVX2, portable).
pytestmark = pytest.mark.usefixtures("isa_path")

BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
QUANT_TYPES = ["nf4", "fp4"]


def weight(shape, dtype, gen):
    """Gaussian with a few outliers, plus exact zeros and values on code midpoints' scale."""
    w = torch.randn(*shape, generator=gen) * 0.05
    w = torch.where(torch.rand(*shape, generator=gen) < 0.01, w * 8, w)
    w.view(-1)[:: 97] = 0.0
    return w.to(dtype)


def assert_same_as_bitsandbytes(w, blocksize, quant_type):
    packed, state = F.nf4_quantize(w, blocksize, quant_type)
    ref_packed, ref_state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
    assert packed.dtype == torch.uint8 and packed.shape == ref_packed.shape
    assert torch.equal(packed, ref_packed), f"{(packed != ref_packed).sum().item()} bytes differ"
    assert torch.equal(state.absmax, ref_state.absmax)
    ours = F.nf4_dequantize(packed, state)
    assert ours.dtype == w.dtype and ours.shape == w.shape
    assert torch.equal(ours, R.dequantize(packed, state.absmax, blocksize, quant_type, w.shape, w.dtype))
    if w.shape[-1] % blocksize == 0:
        # bitsandbytes 0.50.2's CPU dequantize_4bit decodes blocks that span rows wrongly (its
        # error exceeds the quantization error), so it is compared only where blocks stay in a row.
        assert torch.equal(ours, bnb_functional.dequantize_4bit(ref_packed, ref_state))


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_bit_exact_with_bitsandbytes(gen, quant_type, blocksize, dtype):
    assert_same_as_bitsandbytes(weight((96, 320), dtype, gen), blocksize, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (37, 113), (5, 64 * 3 + 1), (4097,)])
def test_partial_blocks_and_odd_counts(gen, quant_type, shape):
    """A final partial block gets its own absmax; an odd count pads the last low nibble."""
    assert_same_as_bitsandbytes(weight(shape, torch.float32, gen), 64, quant_type)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_all_zero_block_and_ties(quant_type):
    w = torch.zeros(2, 64)
    w[1] = torch.linspace(-1, 1, 64)  # scaled values hit midpoints and the extremes
    assert_same_as_bitsandbytes(w, 64, quant_type)
    packed, state = F.nf4_quantize(torch.zeros(64), 64, quant_type)
    zero_code = 7 if quant_type == "nf4" else 0
    assert state.absmax.item() == 0 and torch.equal(packed, torch.full((32, 1), zero_code * 17, dtype=torch.uint8))


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(R.dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("n,blocksize", [(1_000_003, 256), (257, 256), (4096, 64), (7, 256), (300, 4096)])
@pytest.mark.parametrize("scale", [1.0, 1e-3, 37.0])
def test_blockwise8_is_bitsandbytes_cpu(gen, n, blocksize, scale):
    """Its CPU library bins values instead of taking the nearest code; lowbit stores the same bytes."""
    x = torch.randn(n, generator=gen) * scale
    x[: min(n, blocksize)] = 0 if n > blocksize else x[: min(n, blocksize)]  # an all-zero block
    code = R.dynamic_map()
    q, absmax = ops.blockwise8_quantize(x, code, blocksize)
    ref_q, ref_state = bnb_functional.quantize_blockwise(x, code=code, blocksize=blocksize)
    assert torch.equal(q, ref_q) and torch.equal(absmax, ref_state.absmax)
    ref_q2, ref_absmax2 = R.blockwise8_quantize(x, code, blocksize)
    assert torch.equal(q, ref_q2) and torch.equal(absmax, ref_absmax2)
    assert torch.equal(ops.blockwise8_dequantize(q, absmax, code, blocksize),
                       bnb_functional.dequantize_blockwise(ref_q, ref_state).float())


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_double_quant_bit_exact_with_bitsandbytes(gen, quant_type, blocksize, dtype):
    w = weight((256, 640), dtype, gen)
    packed, state = F.nf4_quantize(w, blocksize, quant_type, double_quant=True)
    ref_packed, ref_state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type,
                                                         compress_statistics=True)
    assert state.double_quant and ref_state.nested
    assert torch.equal(packed, ref_packed)
    assert state.absmax.dtype == torch.uint8 and torch.equal(state.absmax, ref_state.absmax)
    assert torch.equal(state.nested_absmax, ref_state.state2.absmax) and torch.equal(state.offset, ref_state.offset)
    ours = F.nf4_dequantize(packed, state)
    if w.shape[-1] % blocksize == 0:  # see assert_same_as_bitsandbytes
        assert torch.equal(ours, bnb_functional.dequantize_4bit(ref_packed, ref_state))
    absmax = ops.blockwise8_dequantize(state.absmax, state.nested_absmax, R.dynamic_map(), 256) + state.offset
    assert torch.equal(ours, R.dequantize(packed, absmax, blocksize, quant_type, w.shape, dtype))
    # The reference, double-quantizing the plain absmax, stores the same codes.
    q, nested, offset = R.double_quantize(F.nf4_quantize(w, blocksize, quant_type)[1].absmax)
    assert torch.equal(q, state.absmax) and torch.equal(nested, state.nested_absmax)


def test_real_weights_match_bitsandbytes(smollm2):
    model = smollm2[0]
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.15.mlp.down_proj", "model.layers.29.mlp.up_proj"):
        w = dict(model.named_modules())[name].weight.detach()
        for quant_type in QUANT_TYPES:
            for dtype in (torch.float32, torch.bfloat16):
                assert_same_as_bitsandbytes(w.to(dtype), 64, quant_type)
            packed, state = F.nf4_quantize(w, 64, quant_type, double_quant=True)
            ref_packed, ref_state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                                                 compress_statistics=True)
            assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
            assert torch.equal(state.nested_absmax, ref_state.state2.absmax)


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_matches_reference(gen, quant_type, blocksize, dtype):
    w = weight((33, 129), dtype, gen)
    packed, state = F.nf4_quantize(w, blocksize, quant_type)
    ref_packed, ref_absmax = R.quantize(w, blocksize, quant_type)
    assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_absmax)
    assert torch.equal(F.nf4_dequantize(packed, state), R.dequantize(packed, state.absmax, blocksize, quant_type,
                                                                     w.shape, dtype))


@pytest.mark.parametrize("how", ["slice", "transpose"])
def test_non_contiguous_input_is_read_row_major(gen, how):
    w = weight((64, 96), torch.float32, gen)
    packed, state = F.nf4_quantize(noncontig(w, how), 64, "nf4")
    expected, expected_state = F.nf4_quantize(w.contiguous(), 64, "nf4")
    assert torch.equal(packed, expected) and torch.equal(state.absmax, expected_state.absmax)


def test_known_bytes():
    """Pinned by hand from the published codebooks: block absmax 2, values on exact codes."""
    w = torch.tensor([-2.0, 2.0, 0.0, 2 * 0.5626170039176941, 2 * -0.18477343022823334, 1e-9])
    packed, state = F.nf4_quantize(w, 32, "nf4")
    assert packed.flatten().tolist() == [0x0F, 0x7D, 0x57] and state.absmax.tolist() == [2.0]
    # FP4, absmax 3: -1 (code 11), 1 (3), 1/2 (5), -1/6 (14), 1/12 (nearer 0.0625/12: code 1), 0 (0)
    w = torch.tensor([-3.0, 3.0, 1.5, -0.5, 0.25, 0.0])
    packed, _ = F.nf4_quantize(w, 32, "fp4")
    assert packed.flatten().tolist() == [0xB3, 0x5E, 0x10]


@pytest.mark.parametrize("tokens", [1, 3, 5, 8, 9, 32, 40])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False)])
def test_fused_linear_matches_dequantize_then_matmul(gen, tokens, dtype, quant_type, double_quant):
    """Fused path (<= 32 tokens: groups of 8 tokens, 4 or 2 rows per pass, odd rows left over)
    and tiled GEMM path, bias, 3-D and non-contiguous x, against F.linear on the dequantized
    weight (fp32 accumulation)."""
    w = weight((77, 192), torch.float32, gen)
    packed, state = F.nf4_quantize(w, 64, quant_type, double_quant=double_quant)
    x = noncontig(torch.randn(tokens, 192, generator=gen)).to(dtype)
    bias = torch.randn(77, generator=gen).to(dtype)
    expected = torch.nn.functional.linear(x.float(), F.nf4_dequantize(packed, state), bias.float())
    got = F.nf4_linear(x, packed, state, bias)
    assert got.dtype == dtype and got.shape == (tokens, 77)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected.to(dtype).float(), rtol=tol, atol=tol)
    got3 = F.nf4_linear(x.reshape(1, tokens, 192), packed, state)
    torch.testing.assert_close(got3[0].float(), (expected - bias.float()).to(dtype).float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("tokens", [1, 12, 48])
def test_fused_linear_decodes_double_quant_exactly(gen, tokens):
    """The double-quantized absmax decoded inside the matmul equals nf4_dequantize's decode:
    the same result, bit for bit, as the state with the decoded fp32 absmax (10 nested blocks)."""
    w = weight((301, 256), torch.float32, gen)
    packed, state = F.nf4_quantize(w, 32, "nf4", double_quant=True)
    plain = state._replace(absmax=F._plain_absmax(state), nested_absmax=None, offset=None)
    x = torch.randn(tokens, 256, generator=gen)
    assert torch.equal(F.nf4_linear(x, packed, state), F.nf4_linear(x, packed, plain))


def test_fused_linear_on_real_weights(smollm2):
    model, tokenizer = smollm2
    layer = model.model.layers[3].mlp.down_proj
    packed, state = F.nf4_quantize(layer.weight.detach(), 64, "nf4", double_quant=True)
    with torch.inference_mode():
        captured = []
        handle = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        model(tokenizer("It is a truth universally acknowledged", return_tensors="pt").input_ids)
        handle.remove()
    x = captured[0]
    expected = torch.nn.functional.linear(x, F.nf4_dequantize(packed, state))
    torch.testing.assert_close(F.nf4_linear(x, packed, state), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(F.nf4_linear(x[:, :1], packed, state), expected[:, :1], rtol=1e-5, atol=1e-5)


def test_fused_linear_bad_inputs(gen):
    packed, state = F.nf4_quantize(torch.randn(16, 128, generator=gen))
    with pytest.raises(ValueError, match="128 features"):
        F.nf4_linear(torch.randn(2, 64), packed, state)
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        packed96, state96 = F.nf4_quantize(torch.randn(16, 96, generator=gen))
        F.nf4_linear(torch.randn(2, 96), packed96, state96)
    with pytest.raises(ValueError, match="2-D"):
        F.nf4_linear(torch.randn(2, 128), *F.nf4_quantize(torch.randn(2, 16, 128, generator=gen)))
    with pytest.raises(ValueError, match="bias must have 16"):
        F.nf4_linear(torch.randn(2, 128), packed, state, torch.randn(3))


@pytest.mark.parametrize("kwargs,match", [
    (dict(blocksize=48), "power of two"), (dict(blocksize=16), "power of two"), (dict(blocksize=8192), "power of two"),
    (dict(quant_type="int4"), "quant_type must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.nf4_quantize(torch.randn(64), **kwargs)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(bad):
    w = torch.randn(128)
    w[5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.nf4_quantize(w)


def test_corrupt_double_quant_state():
    packed, state = F.nf4_quantize(torch.randn(64 * 300), double_quant=True)
    with pytest.raises(ValueError, match="nested absmax has 1 entries, expected 2"):
        F.nf4_dequantize(packed, state._replace(nested_absmax=state.nested_absmax[:1]))
    with pytest.raises(ValueError, match="needs its offset"):
        F.nf4_dequantize(packed, state._replace(offset=None))


def test_corrupt_state():
    packed, state = F.nf4_quantize(torch.randn(256))
    with pytest.raises(ValueError, match="absmax has 3 entries"):
        F.nf4_dequantize(packed, state._replace(absmax=state.absmax[:3]))
    with pytest.raises(ValueError, match="packed bytes do not hold"):
        F.nf4_dequantize(packed[:100], state)
    with pytest.raises(TypeError, match="NF4QuantState"):
        F.nf4_dequantize(packed, {"absmax": state.absmax})


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
@pytest.mark.parametrize("out_features,in_features,blocksize", [
    (13, 96, 32),     # 64 + a 32-column tail: the vector kernels' half chunk
    (5, 160, 32),     # two chunks + a tail, blocks of 32 paired per chunk
    (3, 128, 64),     # bitsandbytes' default blocksize
    (7, 384, 128),    # several chunks per block
    (2, 4096, 4096),  # one block per row
])
def test_fused_linear_kernel_shapes(gen, quant_type, double_quant, out_features, in_features, blocksize):
    """Every kernel on this ISA path (fused for few tokens, decode + GEMM for more), K tails and
    row counts off the vector width, fp16 / bf16 / strided x, against the reference decode."""
    w = weight((out_features, in_features), torch.float32, gen)
    packed, state = F.nf4_quantize(w, blocksize, quant_type, double_quant=double_quant)
    absmax = state.absmax
    if double_quant:
        absmax = ops.blockwise8_dequantize(absmax, state.nested_absmax, R.dynamic_map(), 256) + state.offset
    dense = R.dequantize(packed, absmax, blocksize, quant_type, w.shape, torch.float32)
    for tokens, dtype in [(1, torch.float32), (3, torch.bfloat16), (8, torch.float32), (9, torch.float16),
                          (33, torch.float32)]:
        x = noncontig(torch.randn(tokens, in_features, generator=gen)).to(dtype)
        got = F.nf4_linear(x, packed, state)
        expected = torch.nn.functional.linear(x.float(), dense).to(dtype)
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
