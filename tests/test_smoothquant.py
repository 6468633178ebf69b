"""SmoothQuantModifier: the smoothing is an exact float transform, its scales are
llmcompressor's formula on lowbit's C++ channel ranges, it composes with the quantizing
modifiers in Python and YAML recipes, and bad input is refused up front."""

from __future__ import annotations

import math

import pytest
import torch

import lowbit
from lowbit.reference import smoothquant as RS
from tiny_models import TEXTS, fixed_ids, logits, make_model, make_tokenizer, rel_err

# Float outputs after folding the scales: the same function up to float32 rounding
# (measured <= 3e-7 on the tiny models).
FOLD_TOL = 1e-4
ARCHS = ["llama", "qwen2", "mistral"]


def hidden(model, ids):
    with torch.inference_mode():
        return model.model(input_ids=ids).last_hidden_state


def head_only():
    """A quantizer for lm_head alone (outside the decoder layers): the smoothed layers stay float."""
    return lowbit.QuantizationModifier(targets=["lm_head"], scheme={"weights": {"num_bits": 8, "strategy": "channel"}})


def smooth_only(model, strength=0.5, **kw):
    """SmoothQuant on every decoder layer; only lm_head (outside the layers) is quantized, so
    the smoothed decoder stays float."""
    recipe = [lowbit.SmoothQuantModifier(smoothing_strength=strength, **kw),
              head_only()]
    return lowbit.oneshot(model, recipe, dataset=TEXTS, tokenizer=make_tokenizer(), shuffle_calibration_samples=False)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("strength", [0.0, 0.5, 0.8, 1.0])
def test_smoothing_leaves_float_outputs_unchanged(arch, strength):
    ids = fixed_ids()
    before = hidden(make_model(arch), ids)
    model = smooth_only(make_model(arch), strength)
    err = rel_err(hidden(model, ids), before)
    assert err <= FOLD_TOL, f"{arch} alpha={strength}: {err:.3g}"


def test_scales_are_llmcompressors_formula():
    """s = (max - min)^a / (2 max_balance |W[:, j]|)^(1 - a), clamped at 1e-5, from the float
    model's norm outputs on the calibration tokens (earlier layers' smoothing changes nothing)."""
    float_model, tok = make_model("llama"), make_tokenizer()
    ranges = {}

    def hook(name):
        def record(mod, args, out):
            lo, hi = ranges.get(name, (None, None))
            ranges[name] = RS.channel_range(out, lo, hi)
        return record

    norms = {n: m for n, m in float_model.named_modules() if n.endswith("layernorm") and ".layers." in n}
    handles = [m.register_forward_hook(hook(n)) for n, m in norms.items()]
    with torch.inference_mode():
        for text in TEXTS:
            float_model(**tok(text, return_tensors="pt"))
    for h in handles:
        h.remove()
    weights = {n: m.weight.detach().clone() for n, m in float_model.named_modules() if n.endswith("proj")}
    modifier = lowbit.SmoothQuantModifier(smoothing_strength=0.8)
    lowbit.oneshot(make_model("llama"), [modifier, head_only()],
                   dataset=TEXTS, tokenizer=tok, shuffle_calibration_samples=False)
    assert set(modifier.scales) == set(norms)
    for name, scales in modifier.scales.items():
        layer = name.rsplit(".", 1)[0]
        balance = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] if "input" in name \
            else ["mlp.gate_proj", "mlp.up_proj"]
        w = 2 * torch.stack([weights[f"{layer}.{b}"].abs().amax(0) for b in balance]).amax(0)
        lo, hi = ranges[name]
        want = ((hi - lo).pow(0.8) / w.pow(0.2)).clamp_min(1e-5)
        torch.testing.assert_close(scales, want, rtol=1e-5, atol=0)


def test_log_equalization_and_calibration_steps():
    modifier = lowbit.SmoothQuantModifier(algorithm="log_equalization", num_calibration_steps=2)
    ids = fixed_ids()
    before = hidden(make_model("llama"), ids)
    model = lowbit.oneshot(make_model("llama"), [modifier, head_only()],
                           dataset=TEXTS, tokenizer=make_tokenizer())
    assert rel_err(hidden(model, ids), before) <= FOLD_TOL
    assert all(torch.isfinite(s).all() and (s >= 1e-5).all() for s in modifier.scales.values())


def test_explicit_mappings_and_ignore():
    """llmcompressor's [[balance...], smooth] form; a mapping whose layers are all ignored is skipped."""
    attn_only = [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]]
    modifier = lowbit.SmoothQuantModifier(mappings=attn_only)
    lowbit.oneshot(make_model("llama"), [modifier, head_only()],
                   dataset=TEXTS, tokenizer=make_tokenizer())
    assert sorted(modifier.scales) == ["model.layers.0.input_layernorm", "model.layers.1.input_layernorm"]
    skipped = lowbit.SmoothQuantModifier(ignore=["re:.*layers\\.0\\..*"])
    lowbit.oneshot(make_model("llama"), [skipped, head_only()],
                   dataset=TEXTS, tokenizer=make_tokenizer())
    assert all(n.startswith("model.layers.1.") for n in skipped.scales) and len(skipped.scales) == 2


def test_smoothquant_then_w8a8_saves_and_loads(tmp_path):
    """Python recipe == YAML recipe; the checkpoint (smoothed norms, int8 layers) loads in lowbit
    to the in-memory logits, and recipe.yaml rebuilds the SmoothQuantModifier."""
    yaml = """
quant_stage:
  quant_modifiers:
    SmoothQuantModifier:
      smoothing_strength: 0.8
      mappings:
        - [["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"], "re:.*input_layernorm"]
        - [["re:.*gate_proj", "re:.*up_proj"], "re:.*post_attention_layernorm"]
    GPTQModifier:
      targets: Linear
      scheme: W8A8
      ignore: [lm_head]
"""
    ids, tok = fixed_ids(), make_tokenizer()
    python_recipe = [lowbit.SmoothQuantModifier(smoothing_strength=0.8),
                     lowbit.GPTQModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]
    a = lowbit.oneshot(make_model("llama"), python_recipe, dataset=TEXTS, tokenizer=tok, output_dir=tmp_path / "py")
    b = lowbit.oneshot(make_model("llama"), yaml, dataset=TEXTS, tokenizer=tok, output_dir=tmp_path / "yaml")
    assert torch.equal(logits(a, ids), logits(b, ids))
    assert rel_err(logits(lowbit.load(tmp_path / "py"), ids), logits(a, ids)) <= 1e-6
    again = lowbit.parse_recipe(str(tmp_path / "py" / "recipe.yaml"))
    assert isinstance(again[0], lowbit.SmoothQuantModifier)
    assert math.isclose(again[0].smoothing_strength, python_recipe[0].smoothing_strength)


def test_smoothquant_lowers_w8a8_error_with_outlier_channels():
    """A Llama whose norms carry a few 50x channels (the outliers SmoothQuant was made for):
    W8A8 with SmoothQuant is closer to the float model than without."""
    def outliers():
        model = make_model("llama")
        with torch.no_grad():
            for name, m in model.named_modules():
                if name.endswith("layernorm"):
                    m.weight[[3, 17, 40]] *= 50
        return model

    ids, tok = fixed_ids(), make_tokenizer()
    ref = logits(outliers(), ids)
    plain = lowbit.oneshot(outliers(), "W8A8")
    smoothed = lowbit.oneshot(outliers(), [lowbit.SmoothQuantModifier(smoothing_strength=0.5),
                                           lowbit.QuantizationModifier(scheme="W8A8", ignore=["lm_head"])],
                              dataset=TEXTS, tokenizer=tok)
    assert rel_err(logits(smoothed, ids), ref) < 0.7 * rel_err(logits(plain, ids), ref)


def test_quantizers_calibrate_on_the_smoothed_inputs():
    """The quantizers' statistics come from a second pass over the smoothed layer: a static
    activation scale (static_minmax) is the range of the smoothed norm output, not the raw one."""
    groups = {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"},
                    "input_activations": {"num_bits": 8, "strategy": "tensor", "dynamic": False,
                                          "observer": "static_minmax"}}}
    tok = make_tokenizer()

    def norm_absmax(model):
        seen = []
        h = model.model.layers[0].input_layernorm.register_forward_hook(lambda m, a, o: seen.append(o.abs().max()))
        with torch.inference_mode():
            for text in TEXTS:
                model(**tok(text, return_tensors="pt"))
        h.remove()
        return max(seen).item()

    raw = norm_absmax(make_model("llama"))
    model = lowbit.oneshot(make_model("llama"), [lowbit.SmoothQuantModifier(smoothing_strength=0.8),
                                                 lowbit.GPTQModifier(config_groups=groups, ignore=["lm_head"])],
                           dataset=TEXTS, tokenizer=tok)
    smoothed = norm_absmax(model)  # layer 0's norm output is float in the quantized model too
    scale = model.model.layers[0].self_attn.q_proj.input_scale.item()
    assert math.isclose(scale, smoothed / 127.5, rel_tol=1e-6), (scale, smoothed / 127.5, raw / 127.5)
    assert not math.isclose(smoothed, raw, rel_tol=0.05)


@pytest.mark.parametrize("strength", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_strength(strength):
    with pytest.raises(ValueError, match="smoothing_strength"):
        lowbit.SmoothQuantModifier(smoothing_strength=strength)


def test_bad_arguments():
    with pytest.raises(ValueError, match="algorithm"):
        lowbit.SmoothQuantModifier(algorithm="awq")
    with pytest.raises(ValueError, match="num_calibration_steps"):
        lowbit.SmoothQuantModifier(num_calibration_steps=0)
    with pytest.raises(ValueError, match="calibration_function"):
        lowbit.SmoothQuantModifier(calibration_function=lambda *a: None)
    with pytest.raises(ValueError, match="SmoothQuant mapping"):
        lowbit.SmoothQuantModifier(mappings=["re:.*input_layernorm"])


def _run(model, modifier, output_dir=None):
    return lowbit.oneshot(model, [modifier, lowbit.QuantizationModifier(scheme="W8A8", ignore=["lm_head"])],
                          dataset=TEXTS, tokenizer=make_tokenizer(), output_dir=output_dir)


def test_mapping_that_matches_nothing(tmp_path):
    with pytest.raises(ValueError, match="match no"):
        _run(make_model("llama"), lowbit.SmoothQuantModifier(mappings=[[["re:.*fc1"], "re:.*final_layer_norm"]]),
             output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_architecture_needs_mappings():
    with pytest.raises(ValueError, match="no default mappings for OPTForCausalLM"):
        _run(make_model("opt"), lowbit.SmoothQuantModifier())


def test_mismatched_balance_layer():
    with pytest.raises(ValueError, match="does not take"):
        _run(make_model("llama"), lowbit.SmoothQuantModifier(mappings=[[["re:.*down_proj"], "re:.*input_layernorm"]]))


def test_non_finite_activations(tmp_path):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[5] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        _run(model, lowbit.SmoothQuantModifier(), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402

PATTERNS = st.sampled_from(["re:.*q_proj", "re:.*gate_proj", "re:.*input_layernorm", "re:.*nothing", "q_proj", 3, None])


@settings(max_examples=80, deadline=None, derandomize=True)
@given(strength=st.one_of(st.floats(-1, 2), st.just(float("nan")), st.integers(-1, 2), st.text(max_size=3), st.none()),
       mappings=st.one_of(st.none(), st.lists(st.one_of(st.tuples(st.lists(PATTERNS, max_size=3), PATTERNS),
                                                        PATTERNS, st.dictionaries(st.text(max_size=5), PATTERNS)),
                                              max_size=3)))
def test_fuzz_smoothquant_arguments(strength, mappings):
    """Any strength / mapping structure either builds a modifier whose values are valid, or is
    refused with a ValueError / TypeError at construction."""
    try:
        modifier = lowbit.SmoothQuantModifier(smoothing_strength=strength, mappings=mappings)
    except (ValueError, TypeError):
        return
    assert isinstance(strength, (int, float)) and not isinstance(strength, bool) and 0 <= strength <= 1
    assert all(isinstance(m.smooth_layers, str) and all(isinstance(b, str) for b in m.balance_layers)
               for m in modifier.mappings or [])
