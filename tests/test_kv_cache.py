"""kv_cache_scheme (llmcompressor's quantization_kv_cache recipes): calibrated k/v scales,
compressed-tensors' checkpoint layout read by stock transformers, and a cache that really
stores FP8 / int8 in lowbit's models."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import lowbit
from lowbit.eval import memory_estimate
from test_formats import WEIGHT_ONLY_TOL, read_with_stock
from tiny_models import fixed_ids, logits, make_config, make_model, rel_err

GROUPS = {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 32}}}
SCHEMES = {f"{t}-{s}": {"num_bits": 8, "type": t, "strategy": s, "dynamic": False, "symmetric": True}
           for t in ("float", "int") for s in ("tensor", "attn_head")}
CALIBRATION = fixed_ids(4, 32)


def kv_recipe(kv, **kw):
    return lowbit.QuantizationModifier(config_groups=GROUPS, ignore=["lm_head"], kv_cache_scheme=kv, **kw)


def _post_rope_ranges(ids):
    """max |k| and |v| per KV head of each layer of the float tiny Llama, as its attention
    receives them (after RoPE), read through transformers' attention-function registry."""
    seen = {}

    def capture(module, q, k, v, *args, **kwargs):
        kmax, vmax = k.abs().amax(dim=(0, 2, 3)), v.abs().amax(dim=(0, 2, 3))
        old = seen.get(module.layer_idx)
        seen[module.layer_idx] = (kmax, vmax) if old is None else (torch.maximum(old[0], kmax),
                                                                  torch.maximum(old[1], vmax))
        return sdpa_attention_forward(module, q, k, v, *args, **kwargs)

    AttentionInterface.register("lowbit_test_capture", capture)
    model = make_model("llama")
    model.config._attn_implementation = "lowbit_test_capture"
    with torch.inference_mode():
        for row in ids:
            model(input_ids=row[None])
    return seen


@pytest.mark.parametrize("name", list(SCHEMES))
def test_scales_are_the_calibrated_post_rope_ranges(name):
    """Layer 0 sees the float model's inputs: its scales are max|k| / 448 (FP8) or / 127.5
    (int8) of the keys and values it stores, per tensor or per KV head."""
    kv = SCHEMES[name]
    model = lowbit.oneshot(make_model("llama"), kv_recipe(kv), dataset=CALIBRATION)
    kmax, vmax = _post_rope_ranges(CALIBRATION)[0]
    divisor = 448.0 if kv["type"] == "float" else 127.5
    attention = model.model.layers[0].self_attn
    for scale, amax in ((attention.k_scale, kmax), (attention.v_scale, vmax)):
        expected = (amax.max().reshape(1) if kv["strategy"] == "tensor" else amax.reshape(-1, 1, 1)) / divisor
        assert scale.shape == expected.shape and torch.allclose(scale, expected, rtol=1e-6)
    assert model.config.quantization_config["kv_cache_scheme"]["type"] == kv["type"]


@pytest.mark.parametrize("name", ["float-tensor", "int-attn_head"])
def test_cache_stores_codes_and_generation_matches(name):
    """generate() with lowbit's cache holds FP8 / int8 codes (one byte per element) and gives
    the tokens of a run that recomputes every step without a cache (both quantize-dequantize
    the same keys and values)."""
    kv = SCHEMES[name]
    model = lowbit.oneshot(make_model("llama"), kv_recipe(kv), dataset=CALIBRATION)
    prompt = fixed_ids(1, 8)
    cache = DynamicCache(config=model.config)
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False, past_key_values=cache)
    want = torch.float8_e4m3fn if kv["type"] == "float" else torch.int8
    assert {layer.keys.dtype for layer in cache.layers} == {want} and cache.layers[0].keys.shape[-2] == 13
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_checkpoint_loads_in_stock_transformers_and_lowbit(tmp_path):
    ids = fixed_ids()
    torch.save(ids, tmp_path / "ids.pt")
    cases, memory = {}, {}
    for name, kv in SCHEMES.items():
        model = lowbit.oneshot(make_model("llama"), kv_recipe(kv), dataset=CALIBRATION)
        model.save_pretrained(tmp_path / name)
        memory[name] = logits(model, ids)
        assert torch.equal(logits(lowbit.load(tmp_path / name), ids), memory[name])
        config = json.loads((tmp_path / name / "config.json").read_text())["quantization_config"]
        assert config["kv_cache_scheme"]["strategy"] == kv["strategy"]
        cases[name] = [str(tmp_path / name), None]
    stock = read_with_stock(cases, tmp_path)
    for name in SCHEMES:
        s = stock[name]
        assert "error" not in s, s.get("error")
        assert s["unexpected"] == [] and s["missing"] == [], (s["unexpected"][:6], s["missing"][:6])
        err = rel_err(s["logits"], memory[name])
        assert err <= WEIGHT_ONLY_TOL, f"{name}: stock vs lowbit logits differ by {err:.3g}"
        # and the KV quantization is in effect in both: without it the logits move
        plain = lowbit.oneshot(make_model("llama"), kv_recipe(None), dataset=CALIBRATION)
        assert rel_err(logits(plain, ids), memory[name]) > 10 * err


def test_yaml_recipe_and_memory_estimate():
    recipe = """
    quant_stage:
        quant_modifiers:
            GPTQModifier:
                ignore: ["lm_head"]
                config_groups:
                    group_0:
                        targets: ["Linear"]
                        weights: {num_bits: 4, type: int, strategy: group, group_size: 32, symmetric: true}
                kv_cache_scheme: {num_bits: 8, type: float, strategy: tensor, dynamic: false, symmetric: true}
    """
    model = lowbit.oneshot(make_model("llama"), recipe, dataset=CALIBRATION)
    assert model.model.layers[1].self_attn.k_scale.shape == (1,)
    config = make_config("llama")
    fp32 = memory_estimate(config, GROUPS["group_0"], context_length=4096)
    fp8 = memory_estimate(config, GROUPS["group_0"], context_length=4096, kv_cache_scheme=SCHEMES["float-tensor"])
    assert fp32.kv_cache_bytes == 4 * fp8.kv_cache_bytes == 4 * 2 * 2 * 2 * 16 * 4096


@pytest.mark.parametrize("kv,match", [
    (dict(num_bits=4, type="int"), "8 bits"),
    (dict(num_bits=8, type="float", dynamic=True), "static"),
    (dict(num_bits=8, type="int", symmetric=False), "symmetric"),
    (dict(num_bits=8, type="int", strategy="group", group_size=16), "8 bits"),
    (dict(num_bits=8, type="nf", strategy="tensor"), "type must be 'float'"),
    (dict(num_bits=8, type="float", strategy="channel"), "strategy 'tensor' or 'attn_head'"),
    ("fp8", "must be a dict"),
])
def test_bad_kv_cache_schemes(kv, match):
    with pytest.raises((ValueError, TypeError), match=match):
        kv_recipe(kv)


def test_kv_cache_needs_data_and_hookable_attention():
    with pytest.raises(ValueError, match="needs calibration data"):
        lowbit.oneshot(make_model("llama"), kv_recipe(SCHEMES["float-tensor"]))
    with pytest.raises(ValueError, match="attn_head' needs the number of KV heads"):
        lowbit.oneshot(make_model("gpt2"), lowbit.QuantizationModifier(
            config_groups=GROUPS, ignore=["lm_head"], kv_cache_scheme=SCHEMES["float-attn_head"]), dataset=CALIBRATION)
    # a model without attention (Mamba): refused, naming the architecture, before any work
    import transformers

    mamba = transformers.AutoModelForCausalLM.from_config(
        transformers.MambaConfig(vocab_size=256, hidden_size=64, state_size=8, num_hidden_layers=2))
    in_proj = {"group_0": {"targets": ["re:.*in_proj"], "weights": GROUPS["group_0"]["weights"]}}
    with pytest.raises(ValueError, match="cannot hook the attention of MambaForCausalLM"):
        lowbit.oneshot(mamba, lowbit.QuantizationModifier(config_groups=in_proj, kv_cache_scheme=SCHEMES["float-tensor"]),
                       dataset=CALIBRATION)
