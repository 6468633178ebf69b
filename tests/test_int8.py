"""LLM.int8(): the C++ kernels against bitsandbytes itself (bit for bit where it is exact) and
against lowbit.reference.int8 (planted outlier columns, every activation dtype, odd shapes,
non-contiguous inputs), Int8OutlierLinear, LLMInt8Modifier, bitsandbytes 8-bit checkpoints in
both directions (stock transformers in a process without lowbit), and bad inputs.

Tolerances: the int8 part is integer arithmetic with bitsandbytes' float expression, so it is
compared exactly; the outlier part is a float matmul whose summation order may differ
(OUTLIER_TOL, measured 0 to 2e-7 relative).
"""

from __future__ import annotations

import json
import os

import bitsandbytes as bnb
import bitsandbytes.functional as bnb_functional
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit import functional as F
from lowbit import ops
from lowbit.nn import Int8DynamicLinear, Int8OutlierLinear
from lowbit.reference import int8 as R

from conftest import DTYPE_IDS, FLOAT_DTYPES, noncontig, real_linear_inputs
from tiny_models import (fixed_ids, logits, make_model, make_tokenizer, read_with_stock_bitsandbytes, rel_err,
                         stock_quantized_layers, transformers_quantized)

# Every kernel test runs on each ISA path this CPU supports (AVX-512, AVX2, portable).
pytestmark = pytest.mark.usefixtures("int8_isa_path")

OUTLIER_TOL = 1e-5


def activations(rows, cols, gen, dtype=torch.float32, outlier_cols=(3, 17), spread=1.5):
    """Gaussian activations with a few planted outlier columns (LLM.int8()'s emergent features)
    and an exact zero row."""
    x = torch.randn(rows, cols, generator=gen) * spread
    for c in outlier_cols:
        if c < cols:
            x[:, c] *= 12
    if rows > 2:
        x[1] = 0
    return x.to(dtype)


# ----------------------------------------------------------------- quantization

@pytest.mark.parametrize("threshold", [0.0, 3.0, 6.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("shape", [(1, 64), (7, 300), (33, 129), (2, 5, 96)])
def test_quantize_rowwise_is_bitsandbytes(gen, threshold, dtype, shape):
    x = activations(shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1], gen, dtype).reshape(shape)
    codes, absmax, cols = F.int8_quantize_rowwise(x, threshold)
    ref_codes, ref_absmax, ref_cols = bnb_functional.int8_vectorwise_quant(x.reshape(-1, shape[-1]).half(), threshold)
    assert codes.shape == x.shape and codes.dtype == torch.int8
    assert torch.equal(codes.reshape(-1, shape[-1]), ref_codes) and torch.equal(absmax, ref_absmax)
    assert torch.equal(cols, ref_cols if ref_cols is not None else torch.empty(0, dtype=torch.int64))
    r_codes, r_absmax, r_cols = R.quantize_rowwise(x, threshold)
    assert torch.equal(codes, r_codes) and torch.equal(absmax, r_absmax) and torch.equal(cols, r_cols)


def test_quantize_rowwise_ties_and_non_contiguous(gen):
    """127 / absmax is the reciprocal times 127 (PyTorch's scalar-over-tensor), which decides
    products that land next to a .5; and strided inputs are read by value."""
    mismatches = 0
    for seed in range(40):
        x = torch.randn(20, 300, generator=torch.Generator().manual_seed(seed)) * 2
        mismatches += not torch.equal(F.int8_quantize_rowwise(x, 6.0).codes,
                                      bnb_functional.int8_vectorwise_quant(x.half(), 6.0)[0])
    assert mismatches == 0
    x = noncontig(activations(16, 200, gen))
    assert torch.equal(F.int8_quantize_rowwise(x, 6.0).codes, F.int8_quantize_rowwise(x.contiguous(), 6.0).codes)


def test_real_weights_are_bitsandbytes_cb_and_scb(smollm2):
    model, _ = smollm2
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.5.mlp.down_proj", "model.layers.29.mlp.gate_proj"):
        w = model.get_submodule(name).weight.detach()
        codes, scb, _ = F.int8_quantize_rowwise(w)
        ref = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        assert torch.equal(codes, ref.data) and torch.equal(scb, ref.SCB), name


# ----------------------------------------------------------------- int8 GEMM

@pytest.mark.parametrize("m", [1, 2, 5, 8, 9, 16, 17, 40])
@pytest.mark.parametrize("k", [1, 63, 64, 65, 300, 512])
def test_int8_matmul_is_exact(gen, m, k):
    """Register tiles (fewer than 12 tokens, or any count when K or N is not a multiple of 8;
    masked tails of K % 64), ATen's int8 GEMM otherwise, odd N: the exact integer product."""
    n = 24 if k % 8 == 0 else 37
    a = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    expected = (a.long() @ b.long().t()).int()
    assert torch.equal(ops.int8_matmul(a, b), expected)


def test_int8_matmul_extremes():
    a = torch.full((3, 4096), -127, dtype=torch.int8)
    b = torch.full((5, 4096), -127, dtype=torch.int8)
    assert torch.equal(ops.int8_matmul(a, b), torch.full((3, 5), 127 * 127 * 4096, dtype=torch.int32))


GEMM_TOKENS = [1, 3, 7, 8, 9, 12, 17, 33, 130]


@pytest.mark.parametrize("m", GEMM_TOKENS)
@pytest.mark.parametrize("k,n", [(31, 5), (100, 37), (4096 + 2081, 9)])
def test_int8_gemm_exact_with_minus_128(gen, m, k, n):
    """Every int8 code, -128 included on both sides (the AVX2 kernel's sign trick moves a -128
    of a to -127 plus a correction: listed per column when few, a second row when many), K tails
    (K % 32; 6177 = a 4096 block + a tail block), odd N, strided inputs: the exact product."""
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    a[0, : k // 2] = -128  # a row with many -128 codes
    b[-1] = -128
    expected = (a.long() @ b.long().t()).int()
    assert torch.equal(ops.int8_matmul(a, b), expected)
    assert torch.equal(ops.int8_matmul(noncontig(a), noncontig(b, "transpose")), expected)


@pytest.mark.parametrize("m", [1, 17])
def test_int8_gemm_extremes_exact(m):
    """The largest pair sums: 128 * 128 * 2 in one vpmaddubsw pair would saturate int16; the
    kernel never forms it. And K at its limit without int32 overflow."""
    for av, bv in ((-128, -128), (-128, 127), (127, -128), (-127, -127)):
        a = torch.full((m, 4096 + 5), av, dtype=torch.int8)
        b = torch.full((3, 4096 + 5), bv, dtype=torch.int8)
        assert torch.equal(ops.int8_matmul(a, b), torch.full((m, 3), av * bv * (4096 + 5), dtype=torch.int32))
    a = torch.full((m, 65536), 127, dtype=torch.int8)
    b = torch.full((2, 65536), -127, dtype=torch.int8)
    assert torch.equal(ops.int8_matmul(a, b), torch.full((m, 2), -127 * 127 * 65536, dtype=torch.int32))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("tokens", GEMM_TOKENS)
def test_modules_match_reference(gen, dtype, tokens):
    """Int8OutlierLinear (threshold 6) and Int8DynamicLinear (W8A8) against lowbit.reference.int8,
    K = 200 (tails), 37 outputs, strided activations; W8A8 rows whose absmax is negative quantize
    it to -128."""
    layer = nn.Linear(200, 37).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(37, 200, generator=gen) * 0.05)
    x = noncontig(activations(tokens, 200, gen, dtype))
    with torch.no_grad():
        x[:, 7] = -127.5  # each row's absmax: scale 1, code -127.5 rounds to -128
    llm = Int8OutlierLinear.from_linear(layer, 6.0)
    expected = R.outlier_matmul(x, llm.weight, llm.SCB, 6.0, llm.bias)
    tol = OUTLIER_TOL if dtype == torch.float32 else 1e-2
    with torch.no_grad():
        got = llm(x)
    assert got.dtype == dtype and got.shape == (tokens, 37)
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
    w8a8 = Int8DynamicLinear.from_linear(layer)
    x_scale, _ = ops.quant_params(x.contiguous(), 8, True, 200)
    assert (ops.quantize(x.contiguous(), x_scale, None, 8, 200) == -128).any()
    with torch.no_grad():
        got = w8a8(x)
    expected = R.dynamic_linear(x, w8a8.weight, w8a8.weight_scale, w8a8.bias)
    assert got.dtype == dtype and got.shape == (tokens, 37)
    torch.testing.assert_close(got.float(), expected.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("tokens", [1, 2, 5, 17, 130])
def test_dynamic_linear_op_is_the_reference(gen, static, dtype, tokens):
    """lowbit::int8_dynamic_linear (W8A8 in one call) equals lowbit.reference.int8.dynamic_linear
    bit for bit: per-token or static scales, 3-D and strided x, K = 203 (tails), codes of -128,
    with and without a bias, on every ISA path."""
    w = torch.randn(37, 203, generator=gen) * 0.05
    w_scale, _ = ops.quant_params(w, 8, True, 203)
    codes = ops.quantize(w, w_scale, None, 8, 203)
    x = noncontig(activations(tokens, 203, gen, dtype))
    with torch.no_grad():
        x[:, 11] = -x.abs().amax(1) * 1.0001 - 1e-3  # each row's absmax negative: its code is -128
    input_scale = torch.tensor([0.013]) if static else None
    for bias in (None, torch.randn(37, generator=gen).to(dtype)):
        got = ops.int8_dynamic_linear(x, codes, w_scale, input_scale, bias)
        expected = R.dynamic_linear(x, codes, w_scale, bias, input_scale)
        assert got.dtype == dtype and got.shape == (tokens, 37)
        assert torch.equal(got, expected)
        got3 = ops.int8_dynamic_linear(x.reshape(1, tokens, 203), codes, w_scale, input_scale, bias)
        assert torch.equal(got3[0], got)


def test_dynamic_linear_op_on_real_activations(smollm2):
    for w, x in real_linear_inputs(smollm2):
        w_scale, _ = ops.quant_params(w, 8, True, w.shape[1])
        codes = ops.quantize(w, w_scale, None, 8, w.shape[1])
        for rows in (x[:1], x[:4], x):
            assert torch.equal(ops.int8_dynamic_linear(rows, codes, w_scale, None, None),
                               R.dynamic_linear(rows, codes, w_scale))


# ----------------------------------------------------------------- decomposed matmul

@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("tokens", [1, 3, 9, 24])
def test_outlier_matmul_matches_reference(gen, threshold, dtype, tokens):
    w = (torch.randn(77, 192, generator=gen) * 0.05).to(dtype)
    codes, scb, _ = F.int8_quantize_rowwise(w)
    x = noncontig(activations(tokens, 192, gen, dtype))
    bias = torch.randn(77, generator=gen).to(dtype)
    got = F.int8_outlier_matmul(x, codes, scb, threshold, bias)
    expected = R.outlier_matmul(x, codes, scb, threshold, bias)
    assert got.dtype == dtype and got.shape == (tokens, 77)
    tol = OUTLIER_TOL if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)
    got3 = F.int8_outlier_matmul(x.reshape(1, tokens, 192), codes, scb, threshold, bias)
    torch.testing.assert_close(got3[0].float(), got.float(), rtol=0, atol=0)


def test_decomposition_keeps_outliers_accurate(gen):
    """With planted outlier columns, threshold 6 stays close to the float product; pure int8
    (threshold 0) loses the small features to the outliers' scale."""
    w = torch.randn(64, 256, generator=gen) * 0.05
    codes, scb, _ = F.int8_quantize_rowwise(w)
    x = activations(32, 256, gen, spread=1.0)
    exact = x @ (codes.float() * scb[:, None] / 127).t()
    err6 = rel_err(F.int8_outlier_matmul(x, codes, scb, 6.0), exact)
    err0 = rel_err(F.int8_outlier_matmul(x, codes, scb, 0.0), exact)
    assert err6 < 0.01 and err0 > 2 * err6


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_linear_matches_bitsandbytes_linear8bitlt(gen, threshold):
    """Against bitsandbytes' Linear8bitLt on the same float weight: the same CB / SCB, and
    outputs no further from the fp32 product than bitsandbytes' own."""
    layer = nn.Linear(256, 96)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 256, generator=gen) * 0.05)
    ours = Int8OutlierLinear.from_linear(layer, threshold)
    theirs = bnb.nn.Linear8bitLt(256, 96, has_fp16_weights=False, threshold=threshold)
    theirs.weight = bnb.nn.Int8Params(layer.weight.detach().clone(), requires_grad=False, has_fp16_weights=False)
    theirs.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    theirs = theirs.to("cpu").eval()
    assert torch.equal(ours.weight, theirs.weight.data) and torch.equal(ours.SCB, theirs.weight.SCB)
    x = activations(12, 256, gen)
    with torch.no_grad():
        exact, y, y_bnb = layer(x), ours(x), theirs(x)
    assert rel_err(y, y_bnb) <= 1e-6
    assert rel_err(y, exact) <= rel_err(y_bnb, exact) * 1.01 + 1e-7


# ----------------------------------------------------------------- module and modifier

def test_module_casts_gradients_and_compile(gen):
    layer = nn.Linear(128, 40)
    m = Int8OutlierLinear.from_linear(layer)
    assert isinstance(m, nn.Linear) and m.weight.dtype == torch.int8 and m.SCB.shape == (40,)
    scb = m.SCB.clone()
    m.to(torch.bfloat16)
    assert m.SCB.dtype == torch.float32 and torch.equal(m.SCB, scb) and m.bias.dtype == torch.bfloat16
    m.float()
    x = torch.randn(3, 128, generator=gen, requires_grad=True)
    grad = torch.randn(3, 40, generator=gen)
    m(x).backward(grad)
    torch.testing.assert_close(x.grad, grad @ m.dequantized_weight(), rtol=1e-5, atol=1e-5)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(x.detach()), m(x.detach()))


def test_preset_yaml_and_outlier_report(caplog):
    m = lowbit.parse_recipe("INT8_OUTLIER")[0]
    assert isinstance(m, lowbit.LLMInt8Modifier) and m.scheme.threshold == 6.0 and m.ignore == ["lm_head"]
    yaml_recipe = "s:\n  q_modifiers:\n    LLMInt8Modifier:\n      threshold: 1.5\n      ignore: [lm_head]\n"
    modifier = lowbit.parse_recipe(yaml_recipe)[0]
    assert modifier.scheme.threshold == 1.5
    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune"] * 2
    model = lowbit.oneshot(make_model("llama"), modifier, dataset=texts, tokenizer=make_tokenizer())
    assert len(modifier.outlier_fractions) == 14
    assert all(0 <= f <= 1 for f in modifier.outlier_fractions.values())
    assert any(f > 0 for f in modifier.outlier_fractions.values())
    assert sum("input dimensions held outliers" in r.getMessage() for r in caplog.records) == 14
    assert isinstance(model.model.layers[1].mlp.up_proj, Int8OutlierLinear) and type(model.lm_head) is nn.Linear


@pytest.mark.parametrize("kwargs", [dict(threshold=-1.0), dict(threshold="6"), dict(threshold=float("nan"))])
def test_modifier_bad_threshold(kwargs):
    with pytest.raises(ValueError, match="threshold must be a number >= 0"):
        lowbit.LLMInt8Modifier(**kwargs)


def test_recipe_mixing_is_refused():
    with pytest.raises(ValueError, match="one kind of modifier per recipe"):
        lowbit.parse_recipe([lowbit.LLMInt8Modifier(targets=["re:.*mlp.*"]), lowbit.BnB4bitModifier(
            targets=["re:.*self_attn.*"])])


# ----------------------------------------------------------------- checkpoints

CASES = {"llama": ("llama", torch.float32, 6.0), "qwen2": ("qwen2", torch.float32, 6.0),
         "llama-bf16": ("llama", torch.bfloat16, 6.0), "llama-pure-int8": ("llama", torch.float32, 0.0)}



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    ids = fixed_ids()
    out = {}
    for name, (arch, dtype, threshold) in CASES.items():
        model = lowbit.oneshot(make_model(arch, dtype=dtype), lowbit.LLMInt8Modifier(threshold, ignore=["lm_head"]),
                               output_dir=root / name / "lowbit")
        out[name] = {"dir": root / name / "lowbit", "model": model, "memory": logits(model, ids),
                     "transformers_dir": transformers_quantized(
                         arch, dict(load_in_8bit=True, llm_int8_threshold=threshold), dtype, root / name)}
    stock = read_with_stock_bitsandbytes({n: c["dir"] for n, c in out.items()}, ids, root)
    for name in out:
        out[name]["stock"] = stock[name]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_is_what_transformers_saves(checkpoints, case):
    c = checkpoints[case]
    ours = load_file(c["dir"] / "model.safetensors")
    theirs = load_file(os.path.join(c["transformers_dir"], "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    with open(c["dir"] / "config.json") as f:
        qc = json.load(f)["quantization_config"]
    with open(os.path.join(c["transformers_dir"], "config.json")) as f:
        ref = json.load(f)["quantization_config"]
    assert qc.pop("llm_int8_skip_modules") == ["lm_head"] and ref.pop("llm_int8_skip_modules") is None
    assert qc == ref


@pytest.mark.parametrize("case", list(CASES))
def test_stock_transformers_reads_lowbit_checkpoint(checkpoints, case):
    """A fresh interpreter with transformers + bitsandbytes (no lowbit): no missing or
    unexpected keys, the same CB / SCB in every Linear8bitLt, and lowbit's logits."""
    c = checkpoints[case]
    stock = c["stock"]
    for n, m in stock_quantized_layers(stock, c["model"], Int8OutlierLinear).items():
        assert torch.equal(stock["weights"][n][0], m.weight) and torch.equal(stock["weights"][n][1], m.SCB)
    tol = OUTLIER_TOL if CASES[case][1] == torch.float32 else 2e-2
    assert rel_err(stock["logits"], c["memory"]) <= tol


@pytest.mark.parametrize("case", list(CASES))
def test_lowbit_loads_both_checkpoints(checkpoints, case):
    c = checkpoints[case]
    for path in (c["dir"], c["transformers_dir"]):
        loaded = lowbit.load(path)
        layers = [m for m in loaded.modules() if isinstance(m, Int8OutlierLinear)]
        assert len(layers) == 14 and all(m.threshold == CASES[case][2] for m in layers)
        assert torch.equal(logits(loaded, fixed_ids()), c["memory"]), path


def test_quality_close_to_float(checkpoints):
    """Sanity: the int8 model is close to, but not exactly, the float one."""
    err = rel_err(checkpoints["llama"]["memory"], logits(make_model("llama"), fixed_ids()))
    assert 1e-4 < err < 0.05


# ----------------------------------------------------------------- bad inputs

W = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
SCB = torch.rand(16) + 0.5


@pytest.mark.parametrize("call,exc,match", [
    (lambda: F.int8_outlier_matmul(torch.randn(2, 64), W, SCB, -1.0), ValueError, "threshold must be a number >= 0"),
    (lambda: F.int8_outlier_matmul(torch.full((2, 64), float("nan")), W, SCB), ValueError, "NaN or Inf"),
    (lambda: F.int8_outlier_matmul(torch.full((2, 64), float("inf")), W, SCB, 0.0), ValueError, "NaN or Inf"),
    (lambda: F.int8_outlier_matmul(torch.full((2, 64), 1e6), W, SCB, 0.0), ValueError, "float16's range"),
    (lambda: F.int8_outlier_matmul(torch.randn(2, 64), W, None), ValueError, "SCB.*missing"),
    (lambda: F.int8_outlier_matmul(torch.randn(2, 64), W, SCB[:5]), ValueError, r"one entry per output row \(16\)"),
    (lambda: F.int8_outlier_matmul(torch.randn(2, 32), W, SCB), ValueError, "64 features"),
    (lambda: F.int8_outlier_matmul(torch.randn(2, 64), W.float(), SCB), TypeError, "int8 tensor of codes"),
    (lambda: F.int8_outlier_matmul(torch.randn(2, 64), W, SCB, 6.0, torch.zeros(3)), ValueError, "bias must have 16"),
    (lambda: F.int8_outlier_matmul(torch.randn(2, 64).long(), W, SCB), TypeError, "float32, float16 or bfloat16"),
    (lambda: F.int8_quantize_rowwise(torch.empty(0, 4)), ValueError, "non-empty"),
])
def test_bad_inputs(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.pop("model.layers.0.mlp.up_proj.SCB"), "stored as torch.int8 codes but its quant state"),
    (lambda s: s.update({"model.layers.0.mlp.up_proj.SCB": torch.ones(3)}), "SCB is torch.float32 with 3 entries"),
    (lambda s: s.update({"model.layers.0.mlp.up_proj.weight_format": torch.tensor(1, dtype=torch.uint8)}),
     "weight_format 1"),
    (lambda s: s.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(128, 32, dtype=torch.int8)}),
     r"expected int8 \(128, 64\)"),
])
def test_bad_checkpoints(tmp_path, edit, match):
    path = tmp_path / "ckpt"
    lowbit.oneshot(make_model("llama"), "INT8_OUTLIER", output_dir=path)
    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=match):
        lowbit.load(path)
