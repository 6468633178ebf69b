"""FP8 (E4M3) and static-activation W8A8 layers, schemes and checkpoints.

Fp8Linear is compared with compressed-tensors' arithmetic written out in torch (scale =
absmax / 448 per tile, torch's own float8_e4m3fn cast, activations fake-quantized the same
way); the checkpoints oneshot writes are read by stock transformers + compressed-tensors in a
process that never imports lowbit. Tolerances:

  * Fp8Linear vs the torch formula: 1e-5 relative in float32 (the same codes; only the
    summation order differs), 2e-2 in bfloat16 / 1e-2 in float16 (rounding of x and y).
  * stock transformers vs lowbit's in-memory logits: 1e-4 for FP8 weights only (measured
    <= 3e-7), 1e-2 where activations are quantized (float noise of 1e-7 can flip the odd FP8 /
    int8 activation code in a later layer, as in test_formats.py); each such Linear is also run
    by compressed-tensors on the inputs it saw in lowbit's model: 1e-5.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.nn import Fp8Linear, Int8DynamicLinear
from test_formats import read_with_stock
from tiny_models import TEXTS, fixed_ids, logits, make_model, make_tokenizer, rel_err

FP8 = torch.float8_e4m3fn
DTYPE_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}
EXACT_TOL, ACT_TOL, MODULE_TOL = 1e-4, 1e-2, 1e-5
FP8_WEIGHT_ONLY = {"group_0": {"targets": ["Linear"],
                               "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}}}
STATIC_W8A8 = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"},
                           "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False}}}


def torch_fp8(t: torch.Tensor, rows: int, cols: int):
    """compressed-tensors' FP8 quantization of t [R, C] in (rows x cols) tiles: (codes, scale)."""
    R, C = t.shape
    tiles = torch.nn.functional.pad(t.float(), (0, -C % cols, 0, -R % rows))
    tiles = tiles.reshape(math.ceil(R / rows), rows, math.ceil(C / cols), cols)
    scale = (tiles.abs().amax(dim=(1, 3)) / 448).to(t.dtype)
    scale = torch.where(scale == 0, torch.finfo(t.dtype).eps, scale)
    full = scale.float().repeat_interleave(rows, 0)[:R].repeat_interleave(cols, 1)[:, :C]
    return torch.clamp(t.float() / full, -448, 448).to(FP8), scale, full


def torch_fake_fp8(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    codes, _, full = torch_fp8(x, rows, cols)
    return (codes.float() * full).to(x.dtype)


def reference(layer: Fp8Linear, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = linear.weight.detach()
    codes, _, full = torch_fp8(w, *layer.block)
    a = layer.input_args
    x2 = x.reshape(-1, x.shape[-1])
    if a is not None and a.dynamic:
        x2 = torch_fake_fp8(x2, 1, x2.shape[1] if a.strategy == "token" else a.group_size)
    elif a is not None:
        s = layer.input_scale.float()
        x2 = (torch.clamp(x2.float() / s, -448, 448).to(FP8).float() * s).to(x.dtype)
    y = x2.float() @ (codes.float() * full).t()
    if linear.bias is not None:
        y = y + linear.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


SCHEMES = {
    "FP8_DYNAMIC": "FP8_DYNAMIC",
    "FP8_BLOCK": "FP8_BLOCK",
    "weights-only": {"weights": {"num_bits": 8, "type": "float", "strategy": "channel"}},
    "tensor-weights-only": {"weights": {"num_bits": 8, "type": "float", "strategy": "tensor"}},
    "FP8": "FP8",
}


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_fp8_linear_is_compressed_tensors_arithmetic(name, dtype, tokens):
    torch.manual_seed(0)
    out, inp = 200, 256  # 200 rows: a partial 128-row block
    linear = nn.Linear(inp, out, bias=True).to(dtype)
    x = torch.randn(2, tokens, inp, dtype=dtype) * 3
    input_scale = torch.tensor([x.abs().max().item() / 448], dtype=dtype) if name == "FP8" else None
    layer = Fp8Linear.from_linear(linear, SCHEMES[name], input_scale=input_scale)
    codes, scale, _ = torch_fp8(linear.weight.detach(), *layer.block)
    assert torch.equal(layer.weight.view(torch.uint8), codes.view(torch.uint8))
    assert torch.equal(layer.weight_scale, scale.reshape(layer.weight_scale.shape))
    with torch.inference_mode():
        y = layer(x)
    want = reference(layer, linear, x)
    assert y.dtype == dtype and y.shape == want.shape
    assert rel_err(y.float(), want.float()) <= DTYPE_TOL[dtype]
    # non-contiguous input: the same result
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    with torch.inference_mode():
        assert torch.allclose(layer(xt).float(), y.float(), rtol=1e-5, atol=1e-6)


def test_fp8_weights_survive_model_casts():
    layer = Fp8Linear.from_linear(nn.Linear(128, 64), "FP8_DYNAMIC")
    codes = layer.weight.clone()
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == FP8 and torch.equal(layer.weight.view(torch.uint8), codes.view(torch.uint8))
    assert layer.weight_scale.dtype == torch.bfloat16


def test_fp8_gradients_reach_the_input():
    layer = Fp8Linear.from_linear(nn.Linear(64, 32), {"weights": {"num_bits": 8, "type": "float",
                                                                  "strategy": "channel"}})
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, layer.dequantized_weight(torch.float32).sum(0).expand(3, -1))


def test_check_state_refuses_bad_buffers():
    layer = Fp8Linear.from_linear(nn.Linear(64, 32), "FP8_DYNAMIC")
    layer.weight_scale[3] = 0
    with pytest.raises(ValueError, match="weight_scale must be finite and > 0"):
        layer.check_state()
    layer = Fp8Linear.from_linear(nn.Linear(64, 32), "FP8_DYNAMIC")
    layer.weight.view(torch.uint8)[0, 0] = 0x7F  # E4M3's NaN
    with pytest.raises(ValueError, match="NaN"):
        layer.check_state()
    with pytest.raises(ValueError, match="input_scale"):
        Fp8Linear.from_linear(nn.Linear(64, 32), "FP8")  # static activations need their scale


def test_bad_fp8_schemes():
    with pytest.raises(ValueError, match="does not divide"):
        Fp8Linear.from_linear(nn.Linear(96, 32), "FP8_BLOCK")
    with pytest.raises(ValueError, match="block_structure"):
        lowbit.resolve_scheme({"weights": {"num_bits": 8, "type": "float", "strategy": "block"}})
    with pytest.raises(ValueError, match="FP8 E4M3"):
        lowbit.resolve_scheme({"weights": {"num_bits": 4, "type": "float", "strategy": "channel"}})
    with pytest.raises(ValueError, match="minmax observer"):
        lowbit.resolve_scheme({"weights": {"num_bits": 8, "type": "float", "strategy": "channel", "observer": "mse"}})
    with pytest.raises(ValueError, match="integer activations"):
        lowbit.QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": {
            "num_bits": 8, "type": "float", "strategy": "channel"}, "input_activations": {
            "num_bits": 8, "strategy": "token", "dynamic": True}}})
    with pytest.raises(ValueError, match="does not divide"):
        lowbit.oneshot(make_model("llama"), "FP8_BLOCK")  # 64 input columns, 128-wide blocks
    with pytest.raises(ValueError, match="Conv1D"):
        lowbit.oneshot(make_model("gpt2"), lowbit.QuantizationModifier(scheme="FP8_DYNAMIC", ignore=["lm_head"]))


def test_fp8_needs_float8_dtypes(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="float8"):
        lowbit.QuantizationModifier(scheme="FP8_DYNAMIC")


def test_static_schemes_need_calibration_data(tmp_path):
    for recipe in ("FP8", lowbit.QuantizationModifier(config_groups=STATIC_W8A8, ignore=["lm_head"])):
        with pytest.raises(ValueError, match="needs calibration data"):
            lowbit.oneshot(make_model("llama"), recipe, output_dir=tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_non_finite_activations_during_calibration(tmp_path):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        lowbit.oneshot(model, "FP8", dataset=TEXTS, tokenizer=make_tokenizer(), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _gptq(scheme):
    return lowbit.GPTQModifier(targets="Linear", scheme=scheme, ignore=["lm_head"])


# case -> (arch, recipe, needs data, tolerance vs stock)
CASES = {
    "fp8": ("llama", lambda: "FP8", True, ACT_TOL),
    "fp8-dynamic": ("llama", lambda: "FP8_DYNAMIC", False, ACT_TOL),
    "fp8-block": ("llama_h128", lambda: "FP8_BLOCK", False, ACT_TOL),
    "fp8-weight-only": ("llama", lambda: lowbit.QuantizationModifier(config_groups=FP8_WEIGHT_ONLY,
                                                                     ignore=["lm_head"]), False, EXACT_TOL),
    "gptq-fp8-dynamic": ("llama", lambda: _gptq("FP8_DYNAMIC"), True, ACT_TOL),
    "gptq-fp8-block": ("llama_h128", lambda: _gptq("FP8_BLOCK"), True, ACT_TOL),
    "w8a8-static": ("llama", lambda: lowbit.QuantizationModifier(config_groups=STATIC_W8A8, ignore=["lm_head"]),
                    True, ACT_TOL),
    "gptq-w8a8-static": ("qwen2", lambda: lowbit.GPTQModifier(config_groups=STATIC_W8A8, ignore=["lm_head"]),
                         True, ACT_TOL),
    "smoothquant-w8a8": ("mistral", lambda: [lowbit.SmoothQuantModifier(smoothing_strength=0.8), _gptq("W8A8")],
                         True, ACT_TOL),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    ids = fixed_ids()
    torch.save(ids, root / "ids.pt")
    out, args = {}, {}
    for name, (arch, recipe, data, _) in CASES.items():
        kw = {"dataset": TEXTS, "tokenizer": make_tokenizer()} if data else {}
        model = lowbit.oneshot(make_model(arch), recipe(), output_dir=root / name, **kw)
        inputs = {}

        def record(module, a, output, n=None):
            inputs[n] = a[0].clone()

        hooks = [m.register_forward_hook(functools.partial(record, n=n)) for n, m in model.named_modules()
                 if isinstance(m, Int8DynamicLinear) or isinstance(m, Fp8Linear) and m.input_args is not None]
        memory = logits(model, ids)
        outputs = {n: model.get_submodule(n)(x) for n, x in inputs.items()}
        for h in hooks:
            h.remove()
        torch.save(inputs, root / f"{name}.inputs.pt")
        out[name] = {"model": model, "memory": memory, "loaded": logits(lowbit.load(root / name), ids),
                     "module_outputs": outputs}
        args[name] = [str(root / name), str(root / f"{name}.inputs.pt")]
    stock = read_with_stock(args, root)
    for name in out:
        out[name]["stock"] = stock[name]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_stock_transformers_reads_checkpoint(checkpoints, case):
    c = checkpoints[case]
    stock = c["stock"]
    assert "error" not in stock, stock.get("error")
    assert stock["unexpected"] == [] and stock["missing"] == [], (stock["unexpected"][:6], stock["missing"][:6])
    assert stock["quantized"], "compressed-tensors applied no scheme"
    err = rel_err(stock["logits"], c["memory"])
    assert err <= CASES[case][3], f"{case}: stock vs lowbit logits differ by {err:.3g}"
    for name, ref in c["module_outputs"].items():
        err = rel_err(stock["per_module"][name], ref)
        assert err <= MODULE_TOL, f"{case} {name}: {err:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_lowbit_load_matches_memory(checkpoints, case):
    c = checkpoints[case]
    assert rel_err(c["loaded"], c["memory"]) <= 1e-6


def test_layer_kinds(checkpoints):
    kinds = {name: {type(m).__name__ for m in c["model"].modules() if isinstance(m, lowbit.nn.QUANTIZED_LINEAR_TYPES)}
             for name, c in checkpoints.items()}
    assert all(k == ({"Fp8Linear"} if "fp8" in n else {"Int8DynamicLinear"}) for n, k in kinds.items()), kinds


def test_gptq_fp8_beats_rtn_on_every_layer():
    modifier = _gptq("FP8_DYNAMIC")
    lowbit.oneshot(make_model("llama"), modifier, dataset=TEXTS, tokenizer=make_tokenizer())
    assert len(modifier.layer_errors) == 14
    for name, (gptq, rtn) in modifier.layer_errors.items():
        assert gptq <= rtn * 1.001, f"{name}: GPTQ {gptq:.4g} vs RTN {rtn:.4g}"


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.data())
def test_fuzz_fp8_linear(data):
    """Fp8Linear on drawn shapes, dtypes, layouts and magnitudes matches the torch formula;
    a broken input is a ValueError / TypeError."""
    name = data.draw(st.sampled_from(list(SCHEMES)))
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    inp = 128 * data.draw(st.integers(1, 2)) if name == "FP8_BLOCK" else data.draw(st.integers(1, 70))
    out, tokens = data.draw(st.integers(1, 150)), data.draw(st.integers(0, 9))
    magnitude = data.draw(st.sampled_from([1e-3, 1.0] + ([] if dtype == torch.float16 else [300.0])))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    linear = nn.Linear(inp, out, bias=data.draw(st.booleans())).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out, inp, generator=g) * magnitude)
    x = (torch.randn(tokens, inp, generator=g) * magnitude).to(dtype)
    if data.draw(st.booleans()):
        x = torch.cat([x, x], dim=1)[:, ::2]  # a strided view
    input_scale = torch.tensor([x.abs().max().item() / 448 if x.numel() else 1.0], dtype=dtype) \
        if name == "FP8" else None
    layer = Fp8Linear.from_linear(linear, SCHEMES[name], input_scale=input_scale)
    with torch.inference_mode():
        y = layer(x)
    assert y.shape == (tokens, out) and y.dtype == dtype
    if tokens:
        want = reference(layer, linear, x.contiguous())
        assert rel_err(y.float(), want.float()) <= DTYPE_TOL[dtype] * 2
    bad = data.draw(st.sampled_from(["width", "float64", "int", "meta"]))
    x_bad = {"width": torch.randn(2, inp + 1), "float64": torch.randn(2, inp, dtype=torch.float64),
             "int": torch.ones(2, inp, dtype=torch.int32), "meta": torch.randn(2, inp, device="meta")}[bad]
    with pytest.raises((ValueError, TypeError)):
        layer(x_bad)
