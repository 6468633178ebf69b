"""GPTQModifier inside oneshot: better than RTN on every layer, checkpoints that stock
transformers and lowbit.load read, llmcompressor's YAML, and the bad inputs of the issue."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from tiny_models import GROUP, fixed_ids, logits, make_model, rel_err, run_python, w4_group_modifier

CONFIG_GROUPS = {"group_0": {"targets": ["Linear"], "weights": {
    "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}}}


def calibration():
    return torch.randint(4, 256, (16, 48), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("actorder", ["static", "group", None])
def test_gptq_beats_rtn_on_every_layer_and_overall(actorder):
    ids = fixed_ids(4, 48)
    base = logits(make_model("llama"), ids)
    modifier = lowbit.GPTQModifier(config_groups=CONFIG_GROUPS, ignore=["lm_head"], actorder=actorder)
    model = lowbit.oneshot(make_model("llama"), modifier, dataset=calibration())
    assert len(modifier.layer_errors) == 14
    for name, (gptq_err, rtn_err) in modifier.layer_errors.items():
        assert gptq_err < rtn_err, name
    rtn = lowbit.oneshot(make_model("llama"), w4_group_modifier())
    assert rel_err(logits(model, ids), base) < rel_err(logits(rtn, ids), base)


def test_layers_that_read_one_input_share_its_hessian(monkeypatch):
    """q/k/v and gate/up see the same tensor: it is accumulated into one Hessian, not five."""
    calls = []
    real = lowbit.functional.hessian
    monkeypatch.setattr(lowbit.functional, "hessian", lambda x, *a, **k: calls.append(x.shape) or real(x, *a, **k))
    modifier = lowbit.GPTQModifier(config_groups=CONFIG_GROUPS, ignore=["lm_head"])
    model = lowbit.oneshot(make_model("llama"), modifier, dataset=calibration())
    layers, samples = model.config.num_hidden_layers, len(calibration())
    assert len(calls) == 4 * layers * samples  # q (shared by k, v), o, gate (shared by up), down
    assert len(modifier.layer_errors) == 7 * layers


def test_gptq_checkpoint_loads_in_stock_transformers_and_lowbit(tmp_path):
    ids = fixed_ids()
    out = tmp_path / "gptq"
    model = lowbit.oneshot(make_model("llama"), lowbit.GPTQModifier(config_groups=CONFIG_GROUPS, ignore=["lm_head"]),
                           dataset=calibration(), output_dir=out)
    ours = logits(model, ids)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["weights"]["actorder"] == "static"
    torch.save(ids, tmp_path / "ids.pt")
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()
with torch.inference_mode():
    torch.save(m(torch.load({str(tmp_path / 'ids.pt')!r})).logits, {str(tmp_path / 'stock.pt')!r})
assert "lowbit" not in sys.modules
"""
    run_python(code)
    assert rel_err(torch.load(tmp_path / "stock.pt"), ours) < 1e-4
    assert rel_err(logits(lowbit.load(out), ids), ours) < 1e-6


@pytest.mark.parametrize("scheme,layer", [("W8A8", "Int8DynamicLinear"), ("W4A8", "PackedLinear")])
def test_gptq_with_int8_activations(tmp_path, scheme, layer):
    """GPTQ on the weights, activations quantized per token at run time (llmcompressor's
    GPTQModifier(scheme="W8A8") / "W4A8"); saved int-quantized, loaded back exactly, and GPTQ
    beats RTN on the calibration data's layer outputs."""
    ids = fixed_ids()
    modifier = lowbit.GPTQModifier(scheme=scheme, ignore=["lm_head"])
    model = lowbit.oneshot(make_model("llama_h128"), modifier, dataset=calibration(), output_dir=tmp_path / "q")
    down = model.model.layers[0].mlp.down_proj
    assert type(down).__name__ == layer and (layer != "PackedLinear" or down.input_args is not None)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    assert rel_err(logits(lowbit.load(tmp_path / "q"), ids), logits(model, ids)) < 1e-6
    gptq, rtn = map(sum, zip(*modifier.layer_errors.values()))
    assert gptq < rtn


def test_group_actorder_saves_g_idx_and_lowbit_loads_it(tmp_path):
    ids = fixed_ids()
    out = tmp_path / "gptq-group"
    with pytest.warns(UserWarning, match="lowbit.load only"):  # compressed-tensors 0.19 dropped 'group'
        modifier = lowbit.GPTQModifier(config_groups=CONFIG_GROUPS, ignore=["lm_head"], actorder="group")
    model = lowbit.oneshot(make_model("llama"), modifier, dataset=calibration(), output_dir=out)
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        g_idx = f.get_tensor("model.layers.0.mlp.down_proj.weight_g_idx")
    assert g_idx.dtype == torch.int32 and g_idx.shape == (128,) and sorted(g_idx.bincount().tolist()) == [GROUP] * 4
    assert not torch.equal(g_idx, torch.arange(128, dtype=torch.int32) // GROUP)  # really reordered
    assert rel_err(logits(lowbit.load(out), ids), logits(model, ids)) < 1e-6


def test_yaml_recipe_as_llmcompressor_writes_it():
    recipe = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      ignore: [lm_head]
      block_size: 64
      dampening_frac: 0.05
      actorder: static
      offload_hessians: false
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 32,
                    observer: minmax, actorder: null}
"""
    (modifier,) = lowbit.parse_recipe(recipe)
    assert isinstance(modifier, lowbit.GPTQModifier)
    assert (modifier.block_size, modifier.dampening_frac, modifier.groups[0][1].weights.actorder) == (64, 0.05, "static")
    lowbit.oneshot(make_model("llama"), [modifier], dataset=calibration())
    assert all(g < r for g, r in modifier.layer_errors.values())


def test_gptq_needs_data(tmp_path):
    with pytest.raises(ValueError, match="GPTQModifier needs calibration data: pass dataset="):
        lowbit.oneshot(make_model("llama"), lowbit.GPTQModifier(config_groups=CONFIG_GROUPS), output_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_fewer_tokens_than_columns_warns():
    with pytest.warns(UserWarning, match=r"calibration tokens for 128 input columns; the Hessian is rank-deficient"):
        lowbit.oneshot(make_model("llama"), lowbit.GPTQModifier(config_groups=CONFIG_GROUPS, ignore=["lm_head"]),
                       dataset=torch.randint(4, 256, (1, 20)))


def test_nan_activations_name_the_layer():
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[5] = float("nan")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.(gate|up)_proj: inputs contain NaN or Inf"):
        lowbit.oneshot(model, lowbit.GPTQModifier(config_groups=CONFIG_GROUPS, ignore=["lm_head"]), dataset=calibration())


@pytest.mark.parametrize("kwargs,match", [
    (dict(dampening_frac=0), r"dampening_frac must be in \(0, 1\]"),
    (dict(block_size=0), r"block_size must be positive"),
    (dict(actorder="dynamic"), r"actorder must be None, 'static', 'weight' or 'group'"),
    (dict(scheme={"weights": {"num_bits": 4, "strategy": "group", "group_size": 32},
                  "input_activations": {"num_bits": 4, "strategy": "token", "dynamic": True}}),
     r"activations dynamically per token to symmetric int8"),
])
def test_bad_arguments(kwargs, match):
    kwargs.setdefault("config_groups", None if "scheme" in kwargs else CONFIG_GROUPS)
    with pytest.raises(ValueError, match=match):
        lowbit.GPTQModifier(**kwargs)


def test_output_error_of_a_tall_layer_is_measured_on_spaced_rows():
    """_output_error is exact up to ERROR_ROWS rows and, above, an estimate from evenly spaced rows
    within a few percent of the whole sum."""
    from lowbit.modifiers.gptq import ERROR_ROWS, GPTQModifier
    g = torch.Generator().manual_seed(3)
    x = torch.randn(512, 96, generator=g)
    h = 2 / 512 * x.t() @ x

    def exact(w, q):
        return ((x @ (w - q).t()).square().sum() / 256).sqrt().item()

    for rows in (ERROR_ROWS, 4 * ERROR_ROWS + 1):
        w = torch.randn(rows, 96, generator=g)
        q = w + 0.01 * torch.randn(rows, 96, generator=g)
        got = GPTQModifier._output_error(h, w, q)
        assert got == pytest.approx(exact(w, q), rel=1e-4 if rows <= ERROR_ROWS else 0.03)
