"""NF4Linear, BnB4bitModifier and bitsandbytes 4-bit checkpoints: the module against the
functional kernels, gradients through NF4Linear / PackedLinear and a PEFT LoRA run, the
checkpoint byte for byte against what transformers + bitsandbytes saves for the same model,
both directions of loading (stock transformers in a process without lowbit; lowbit.load of a
transformers-quantized model), and bad checkpoints.

Tolerances: bitsandbytes' CPU forward is not exact (on a machine with AVX512-BF16 its 4-bit
matmul rounds through bfloat16): its logits differ from an exact matmul with the same
dequantized weights by ~5e-3 relative (measured 4.9e-3 and 5.4e-3 on the fp32 models), so
stock logits are compared with BNB_TOL; lowbit's logits against the exact dequantized model
with EXACT_TOL (fp32 summation order only: measured 3.4e-7). A bfloat16 model's two matmuls round differently
(measured 7.9e-3): BF16_TOL.
"""

from __future__ import annotations

import json
import os

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit import functional as F
from lowbit.nn import NF4Linear, PackedLinear

from conftest import DTYPE_IDS, FLOAT_DTYPES
from tiny_models import (fixed_ids, logits, make_model, make_tokenizer, read_with_stock_bitsandbytes, rel_err,
                         save_float, stock_quantized_layers, transformers_quantized, w4_group_modifier)

BNB_TOL = 1e-2
EXACT_TOL = 1e-5
BF16_TOL = 2e-2


def linear(in_features, out_features, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.where(torch.rand_like(layer.weight) < 0.01, 8.0, 1.0))
    return layer.to(dtype)


# ----------------------------------------------------------------- NF4Linear

@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_nf4linear_holds_bitsandbytes_state_and_runs_the_kernel(quant_type, double_quant, dtype):
    layer = linear(192, 77, dtype=dtype)
    m = NF4Linear.from_linear(layer, quant_type, 64, double_quant)
    assert isinstance(m, nn.Linear) and m.weight.dtype == torch.uint8 and m.weight.shape == (192 * 77 // 2, 1)
    ref_packed, ref_state = bnb_functional.quantize_4bit(layer.weight.detach(), blocksize=64, quant_type=quant_type,
                                                         compress_statistics=double_quant)
    assert torch.equal(m.weight, ref_packed) and torch.equal(m.absmax, ref_state.absmax)
    if double_quant:
        assert torch.equal(m.nested_absmax, ref_state.state2.absmax) and torch.equal(m.offset, ref_state.offset)
    x = torch.randn(2, 5, 192, dtype=dtype)
    with torch.no_grad():
        got = m(x)
    packed, state = F.nf4_quantize(layer.weight.detach(), 64, quant_type, double_quant)
    assert got.dtype == dtype and got.shape == (2, 5, 77)
    assert torch.equal(got, F.nf4_linear(x, packed, state, layer.bias.detach()))


def test_nf4linear_pads_when_blocks_span_rows():
    """96 input columns, blocks of 64: blocks run across rows (bitsandbytes flattens the
    weight), so no fused kernel; the module dequantizes and matches the exact product."""
    layer = linear(96, 33)
    m = NF4Linear.from_linear(layer, "nf4", 64, True)
    ref_packed, _ = bnb_functional.quantize_4bit(layer.weight.detach(), blocksize=64, quant_type="nf4")
    assert torch.equal(m.weight, ref_packed)
    x = torch.randn(4, 96)
    with torch.no_grad():
        expected = nn.functional.linear(x, m.dequantized_weight(), layer.bias)
        torch.testing.assert_close(m(x), expected, rtol=EXACT_TOL, atol=EXACT_TOL)


def test_nf4linear_compute_dtype_and_model_casts():
    """compute_dtype: x is rounded to it before the matmul, the output returned in x's dtype
    (bitsandbytes' Linear4bit). Casting the module rounds the bias, never the block scales."""
    layer = linear(128, 16)
    m = NF4Linear.from_linear(layer, "nf4", 64, False, compute_dtype="bfloat16")
    x = torch.randn(3, 128)
    with torch.no_grad():
        expected = nn.functional.linear(x.bfloat16().float(), m.dequantized_weight(), layer.bias).bfloat16().float()
        torch.testing.assert_close(m(x), expected, rtol=1e-2, atol=1e-2)
        assert m(x).dtype == torch.float32
    absmax = m.absmax.clone()
    m.to(torch.float16)
    assert m.absmax.dtype == torch.float32 and torch.equal(m.absmax, absmax) and m.bias.dtype == torch.float16
    with pytest.raises(ValueError, match="compute_dtype must be float32, float16 or bfloat16"):
        NF4Linear(64, 64, compute_dtype="int8")


def test_nf4linear_bad_inputs():
    m = NF4Linear.from_linear(linear(128, 8))
    with pytest.raises(ValueError, match="128 features"):
        m(torch.randn(2, 64))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        m(torch.randn(2, 128, dtype=torch.float64))
    with pytest.raises(TypeError, match="float nn.Linear"):
        NF4Linear.from_linear(m)
    with pytest.raises(ValueError, match="power of two"):
        NF4Linear.from_linear(linear(128, 8), blocksize=48)
    with pytest.raises(ValueError, match="quant_type must be"):
        NF4Linear.from_linear(linear(128, 8), quant_type="int4")
    bad = linear(128, 8)
    with torch.no_grad():
        bad.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        NF4Linear.from_linear(bad)


# ----------------------------------------------------------------- gradients

def quantized_modules():
    layer = linear(128, 48)
    return {"nf4": NF4Linear.from_linear(layer, "nf4", 64, True),
            "nf4-padded": NF4Linear.from_linear(linear(96, 40), "fp4", 64),
            "packed-w4-g32": PackedLinear.from_linear(layer, w4_group_modifier().groups[0][1]),
            "packed-w8-channel": PackedLinear.from_linear(
                layer, {"weights": {"num_bits": 8, "strategy": "channel", "group_size": None}})}


@pytest.mark.parametrize("name", ["nf4", "nf4-padded", "packed-w4-g32", "packed-w8-channel"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
def test_gradients_reach_the_input(name, dtype):
    """dL/dx of the quantized module = dL/dx of a dense Linear holding its dequantized
    weight; the quantized weight gets none (it is a buffer), a bias that asks gets one."""
    m = quantized_modules()[name].to(dtype)
    m.bias.requires_grad_(True)
    dense = nn.Linear(m.in_features, m.out_features).to(dtype)
    with torch.no_grad():
        dense.weight.copy_(m.dequantized_weight(dtype))
        dense.bias.copy_(m.bias)
    x = torch.randn(3, 7, m.in_features, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 7, m.out_features, dtype=dtype)
    m(x).backward(grad)
    dense(x_ref).backward(grad)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(m.bias.grad, dense.bias.grad, rtol=tol, atol=tol)
    assert not any(p.requires_grad for n, p in m.named_parameters() if n != "bias")


def test_no_graph_when_no_gradient_is_wanted():
    m = quantized_modules()["nf4"]
    y = m(torch.randn(2, 128))
    assert y.grad_fn is None


@pytest.mark.parametrize("recipe", ["NF4", "W4A16-g32"])
def test_peft_lora_trains_on_a_quantized_model(recipe):
    """QLoRA in a plain training loop: LoRA adapters on every quantized Linear of a lowbit
    model (NF4Linear or PackedLinear) train, the loss falls, the quantized weights stay."""
    from peft import LoraConfig, get_peft_model

    model = lowbit.oneshot(make_model("llama"), "NF4" if recipe == "NF4" else w4_group_modifier())
    kind = NF4Linear if recipe == "NF4" else PackedLinear
    frozen = [(m, {k: v.clone() for k, v in m.state_dict().items()}) for m in model.modules() if isinstance(m, kind)]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, kind)]
    assert len(wrapped) == 14 and all(n.endswith(".base_layer") for n in wrapped)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = fixed_ids(4, 32)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    for module, state in frozen:
        assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


# ----------------------------------------------------------------- modifier and oneshot

def test_presets_and_modifier():
    nf4 = lowbit.parse_recipe("NF4")[0]
    assert isinstance(nf4, lowbit.BnB4bitModifier) and nf4.scheme.double_quant and nf4.ignore == ["lm_head"]
    fp4 = lowbit.parse_recipe("fp4")[0]
    assert fp4.scheme.quant_type == "fp4" and not fp4.scheme.double_quant
    yaml_recipe = """
    quant_stage:
      quant_modifiers:
        BnB4bitModifier:
          quant_type: nf4
          blocksize: 128
          double_quant: true
          compute_dtype: bfloat16
          ignore: [lm_head]
    """
    m = lowbit.parse_recipe(yaml_recipe)[0]
    assert m.scheme == lowbit.modifiers.BnB4bitScheme("nf4", 128, True, "bfloat16")
    assert lowbit.parse_recipe(lowbit.recipe.recipe_to_yaml([m]))[0].scheme == m.scheme


@pytest.mark.parametrize("kwargs,match", [
    (dict(quant_type="int4"), "quant_type must be"), (dict(blocksize=100), "power of two"),
    (dict(blocksize=8192), "power of two"), (dict(compute_dtype="float64"), "compute_dtype"),
    (dict(double_quant="yes"), "double_quant"),
])
def test_modifier_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowbit.BnB4bitModifier(**kwargs)


def test_modifier_refuses_mixing_and_conv1d():
    with pytest.raises(ValueError, match="one kind of modifier per recipe"):
        lowbit.oneshot(make_model("llama"), [lowbit.BnB4bitModifier(targets=["re:.*mlp.*"]),
                                             lowbit.QuantizationModifier(scheme="W8A16", targets=["re:.*self_attn.*"])])
    with pytest.raises(ValueError, match="Conv1D"):
        lowbit.oneshot(make_model("gpt2"), "NF4")


def test_oneshot_with_data_logs_layer_errors(caplog):
    texts = ["It is a truth universally acknowledged, that a single man in possession of a good fortune"] * 2
    model = lowbit.oneshot(make_model("llama"), "NF4", dataset=texts, tokenizer=make_tokenizer())
    errors = [r.getMessage() for r in caplog.records if "relative output error" in r.getMessage()]
    assert len(errors) == 2 and all(0 < float(e.rsplit(" ", 1)[1]) < 0.5 for e in errors)
    assert isinstance(model.model.layers[0].mlp.down_proj, NF4Linear) and isinstance(model.lm_head, nn.Linear)


# ----------------------------------------------------------------- the checkpoint

# name -> (arch, lowbit recipe, BitsAndBytesConfig kwargs, model dtype)
CASES = {
    "llama-nf4-dq": ("llama", "NF4", dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True), torch.float32),
    "qwen2-fp4": ("qwen2", "FP4", dict(bnb_4bit_quant_type="fp4"), torch.float32),
    "llama-nf4-bf16": ("llama", lambda: lowbit.BnB4bitModifier("nf4", compute_dtype="bfloat16", ignore=["lm_head"]),
                       dict(bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16), torch.bfloat16),
    # 96 columns: blocks of 64 cross rows (bitsandbytes flattens the weight).
    "llama_h96-nf4-dq": ("llama_h96", "NF4", dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
                         torch.float32),
}
# bitsandbytes 0.50.2's CPU dequantize_4bit decodes blocks that cross rows wrongly, so stock
# transformers only runs the cases whose rows hold whole blocks.
STOCK_CASES = ["llama-nf4-dq", "qwen2-fp4", "llama-nf4-bf16"]




def exact_logits(model, ids):
    """Logits of `model` with every NF4Linear replaced by a dense Linear of its dequantized weight."""
    import copy

    dense = copy.deepcopy(model)
    for name, m in list(dense.named_modules()):
        if isinstance(m, NF4Linear):
            layer = nn.Linear(m.in_features, m.out_features, m.bias is not None, dtype=m.weight_dtype)
            with torch.no_grad():
                layer.weight.copy_(m.dequantized_weight())
                if m.bias is not None:
                    layer.bias.copy_(m.bias)
            lowbit.nn.replace_module(dense, name, layer)
    return logits(dense, ids)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bnb")
    ids = fixed_ids()
    out = {}
    for name, (arch, recipe, bnb_kwargs, dtype) in CASES.items():
        model = lowbit.oneshot(make_model(arch, dtype=dtype), recipe() if callable(recipe) else recipe,
                               output_dir=root / name / "lowbit")
        out[name] = {"dir": root / name / "lowbit", "model": model, "memory": logits(model, ids),
                     "exact": exact_logits(model, ids),
                     "transformers_dir": transformers_quantized(arch, dict(load_in_4bit=True, **bnb_kwargs), dtype,
                                                                 str(root / name))}
    stock = read_with_stock_bitsandbytes({n: out[n]["dir"] for n in STOCK_CASES}, ids, root)
    for name in STOCK_CASES:
        out[name]["stock"] = stock[name]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_is_what_transformers_saves(checkpoints, case):
    """lowbit's safetensors hold the same tensors, bit for bit, as transformers + bitsandbytes
    saving the same float model (packed codes, absmax, quant maps, the JSON quant state), and
    config.json the same quantization_config."""
    c = checkpoints[case]
    ours, theirs = load_file(c["dir"] / "model.safetensors"), load_file(os.path.join(c["transformers_dir"],
                                                                                      "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key].view(torch.uint8), theirs[key].view(torch.uint8)), key
    with open(c["dir"] / "config.json") as f:
        qc = json.load(f)["quantization_config"]
    with open(os.path.join(c["transformers_dir"], "config.json")) as f:
        ref = json.load(f)["quantization_config"]
    assert qc.pop("llm_int8_skip_modules") == ["lm_head"] and ref.pop("llm_int8_skip_modules") is None
    assert qc == ref


@pytest.mark.parametrize("case", STOCK_CASES)
def test_stock_transformers_reads_lowbit_checkpoint(checkpoints, case):
    """A fresh interpreter with transformers + bitsandbytes (no lowbit) loads the directory with
    no missing / unexpected keys; every 4-bit weight dequantizes to lowbit's bit for bit, and
    its logits match lowbit's within bitsandbytes' own CPU error."""
    c = checkpoints[case]
    stock = c["stock"]
    for n, m in stock_quantized_layers(stock, c["model"], NF4Linear).items():
        assert torch.equal(stock["weights"][n], m.dequantized_weight()), n
    fp32 = CASES[case][3] == torch.float32
    assert rel_err(c["memory"], c["exact"]) <= (EXACT_TOL if fp32 else BF16_TOL)
    assert rel_err(stock["logits"], c["exact"]) <= (BNB_TOL if fp32 else BF16_TOL)


@pytest.mark.parametrize("case", list(CASES))
def test_lowbit_loads_both_checkpoints(checkpoints, case):
    """lowbit.load reads its own directory and the transformers-quantized one into NF4Linear
    layers with the same buffers, hence the same logits, as the model oneshot returned."""
    c = checkpoints[case]
    ids = fixed_ids()
    for path in (c["dir"], c["transformers_dir"]):
        loaded = lowbit.load(path)
        quantized = [m for m in loaded.modules() if isinstance(m, NF4Linear)]
        assert len(quantized) == 14
        assert torch.equal(logits(loaded, ids), c["memory"]), path


def test_save_is_deterministic_and_atomic(tmp_path, monkeypatch):
    model = lowbit.oneshot(make_model("llama"), "NF4", output_dir=tmp_path / "a")
    lowbit.save_compressed(model, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()

    def broken(module):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lowbit.formats.bitsandbytes, "nf4_tensors", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        lowbit.save_compressed(model, tmp_path / "c")
    assert not (tmp_path / "c").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


# ----------------------------------------------------------------- bad checkpoints

LAYER = "model.layers.0.self_attn.q_proj.weight"


def _edit(state):
    return {
        "missing quant state": (lambda s: s.pop(f"{LAYER}.quant_state.bitsandbytes__nf4"),
                                "stored as torch.uint8 codes but its quant state"),
        "corrupt JSON": (lambda s: s.update({f"{LAYER}.quant_state.bitsandbytes__nf4": torch.tensor(
            list(b'{"quant_type": "nf4", "blocksize"'), dtype=torch.uint8)}), "not valid JSON"),
        "JSON lacks fields": (lambda s: s.update({f"{LAYER}.quant_state.bitsandbytes__nf4": torch.tensor(
            list(b'{"quant_type": "nf4"}'), dtype=torch.uint8)}), r"lacks \['blocksize', 'dtype', 'shape'\]"),
        "wrong shape": (lambda s: s.update({f"{LAYER}.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(
            {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64, 32]}).encode()),
            dtype=torch.uint8)}), "does not match the model's"),
        "bad blocksize": (lambda s: s.update({f"{LAYER}.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(
            {"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [64, 64]}).encode()),
            dtype=torch.uint8)}), "power of two"),
        "missing absmax": (lambda s: s.pop(f"{LAYER}.absmax"), "absmax' is missing"),
        "short absmax": (lambda s: s.update({f"{LAYER}.absmax": s[f"{LAYER}.absmax"][:10]}),
                         "absmax is torch.uint8 with 10 entries, expected torch.uint8 with 64"),
        "float absmax for nested state": (lambda s: s.update({f"{LAYER}.absmax": s[f"{LAYER}.absmax"].float()}),
                                          "absmax is torch.float32"),
        "custom quant_map": (lambda s: s.update({f"{LAYER}.quant_map": s[f"{LAYER}.quant_map"] * 2}),
                             "custom codes are not supported"),
        "missing nested absmax": (lambda s: s.pop(f"{LAYER}.nested_absmax"), "nested_absmax' is missing"),
        "truncated codes": (lambda s: s.update({LAYER: s[LAYER][:100]}), "weight is torch.uint8 with 100 entries"),
    }


@pytest.mark.parametrize("edit", list(_edit({})))
def test_bad_checkpoints_raise_clear_errors(tmp_path, edit):
    path = tmp_path / "ckpt"
    lowbit.oneshot(make_model("llama"), "NF4", output_dir=path)
    state = load_file(path / "model.safetensors")
    change, match = _edit(state)[edit]
    change(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=match):
        lowbit.load(path)


@pytest.mark.parametrize("flags,match", [
    (dict(load_in_4bit=False, load_in_8bit=True), "stored as torch.uint8 codes but its quant state"),
    (dict(load_in_4bit=True, load_in_8bit=True), "exactly one of load_in_4bit / load_in_8bit"),
    (dict(load_in_4bit=False, load_in_8bit=False), "exactly one of load_in_4bit / load_in_8bit"),
])
def test_config_that_contradicts_the_tensors(tmp_path, flags, match):
    path = tmp_path / "ckpt"
    lowbit.oneshot(make_model("llama"), "NF4", output_dir=path)
    with open(path / "config.json") as f:
        config = json.load(f)
    config["quantization_config"].update(flags, **{f"_{k}": v for k, v in flags.items()})
    with open(path / "config.json", "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match=match):
        lowbit.load(path)


def test_float_directory_still_loads(tmp_path):
    save_float("llama", tmp_path / "f")
    assert not any(isinstance(m, NF4Linear) for m in lowbit.load(tmp_path / "f").modules())
