"""Recipes in all of llmcompressor's forms describe the same quantization: a preset name, a
QuantizationModifier, a list of modifiers, YAML text, a YAML file (str or Path), config_groups
(as a dict and as the YAML llmcompressor writes) all give byte-identical checkpoints; the
recipe.yaml oneshot writes rebuilds the same checkpoint."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch
import yaml

import lowbit
from lowbit.formats import compressed_state_dict
from tiny_models import make_model, w4_group_modifier

ARCH = "llama_h128"  # 128 / 256 input columns: the presets' group_size 128 divides them

PRESET_YAML = """
default_stage:
  default_modifiers:
    QuantizationModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: {scheme}
"""

# config_groups exactly as llmcompressor 0.14 writes them into recipe.yaml.
LLMC_GROUPS_YAML = """
default_stage:
  default_modifiers:
    QuantizationModifier:
      config_groups:
        group_0:
          targets: [Linear]
          weights:
            num_bits: {bits}
            type: int
            symmetric: {symmetric}
            group_size: {group_size}
            strategy: group
            block_structure: null
            dynamic: false
            actorder: null
            scale_dtype: null
            zp_dtype: {zp_dtype}
            observer: memoryless_minmax
            observer_kwargs: {{}}
          input_activations: null
          output_activations: null
          format: null
      targets: [Linear]
      ignore: [lm_head]
      bypass_divisibility_checks: false
      requires_calibration_data: false
"""


def _modifier(scheme="W4A16"):
    return lowbit.QuantizationModifier(scheme=scheme, targets="Linear", ignore=["lm_head"])


def _yaml_file(tmp_path, text, suffix=".yaml"):
    path = tmp_path / f"recipe{suffix}"
    path.write_text(text)
    return path


FORMS = {
    "preset": lambda tmp: "W4A16",
    "preset-lowercase": lambda tmp: "w4a16",
    "modifier": lambda tmp: _modifier(),
    "list": lambda tmp: [_modifier()],
    "yaml-string": lambda tmp: PRESET_YAML.format(scheme="W4A16"),
    "yaml-file-str": lambda tmp: str(_yaml_file(tmp, PRESET_YAML.format(scheme="W4A16"))),
    "yaml-file-path": lambda tmp: _yaml_file(tmp, PRESET_YAML.format(scheme="W4A16")),
    "yml-file": lambda tmp: str(_yaml_file(tmp, PRESET_YAML.format(scheme="W4A16"), ".yml")),
    "yaml-other-stage-names": lambda tmp: PRESET_YAML.format(scheme="W4A16").replace(
        "default_stage", "quant_stage").replace("default_modifiers", "quant_modifiers").replace(
        "quant_stage:\n", "quant_stage:\n  run_type: oneshot\n"),
    "scheme-dict": lambda tmp: lowbit.QuantizationModifier(scheme={"W4A16": ["Linear"]}, ignore=["lm_head"]),
    "scheme-object": lambda tmp: _modifier(lowbit.PRESET_SCHEMES["W4A16"]),
    "config-groups": lambda tmp: w4_group_modifier(group_size=128),
    "config-groups-llmcompressor-yaml": lambda tmp: LLMC_GROUPS_YAML.format(
        bits=4, symmetric="true", group_size=128, zp_dtype="null"),
}


def _run(recipe, out):
    model = lowbit.oneshot(make_model(ARCH), recipe, output_dir=out)
    return model, (out / "model.safetensors").read_bytes(), json.loads((out / "config.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "preset"
    model, data, config = _run("W4A16", out)
    return {"state": compressed_state_dict(model), "bytes": data, "qc": config["quantization_config"], "dir": out}


def _same_state(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("form", list(FORMS))
def test_recipe_forms_agree(reference, tmp_path, form):
    model, data, config = _run(FORMS[form](tmp_path), tmp_path / "out")
    _same_state(compressed_state_dict(model), reference["state"])
    assert data == reference["bytes"], "model.safetensors differs from the preset's"
    qc = config["quantization_config"]
    for key in ("quant_method", "format", "quantization_status", "ignore"):
        assert qc[key] == reference["qc"][key], key
    strip = lambda g: {k: v for k, v in g["weights"].items() if k != "observer"}  # noqa: E731
    assert [strip(g) for g in qc["config_groups"].values()] == \
        [strip(g) for g in reference["qc"]["config_groups"].values()]


@pytest.mark.parametrize("scheme", ["W4A16_ASYM", "W8A16", "W8A8"])
def test_other_presets_agree_across_forms(tmp_path, scheme):
    runs = {
        "preset": scheme,
        "modifier": _modifier(scheme),
        "yaml": PRESET_YAML.format(scheme=scheme),
    }
    states = {name: compressed_state_dict(lowbit.oneshot(make_model(ARCH), r)) for name, r in runs.items()}
    for name in ("modifier", "yaml"):
        _same_state(states[name], states["preset"])


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_llmcompressor_config_groups_yaml(tmp_path, symmetric):
    """config_groups YAML with every key llmcompressor writes; for asymmetric schemes
    llmcompressor 0.14 writes `zp_dtype: torch.int8` (see its recipe.yaml), which is
    compressed-tensors' default zero-point dtype, not an unsupported option."""
    text = LLMC_GROUPS_YAML.format(bits=4, symmetric=str(symmetric).lower(), group_size=32,
                                   zp_dtype="null" if symmetric else "torch.int8")
    a = compressed_state_dict(lowbit.oneshot(make_model("llama"), text))
    b = compressed_state_dict(lowbit.oneshot(make_model("llama"), w4_group_modifier(symmetric=symmetric)))
    _same_state(a, b)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_llmcompressor_config_groups_yaml_null_zp_dtype(tmp_path, symmetric):
    """The same with every optional key null (the brief form of that YAML)."""
    text = LLMC_GROUPS_YAML.format(bits=4, symmetric=str(symmetric).lower(), group_size=32, zp_dtype="null")
    a = compressed_state_dict(lowbit.oneshot(make_model("llama"), text))
    b = compressed_state_dict(lowbit.oneshot(make_model("llama"), w4_group_modifier(symmetric=symmetric)))
    _same_state(a, b)


ROUND_TRIP = {
    "preset": lambda: "W4A16",
    "config-groups-asym": lambda: w4_group_modifier(symmetric=False, group_size=64),
    "scheme-object": lambda: _modifier(lowbit.PRESET_SCHEMES["W4A16_ASYM"]),
    "scheme-dict": lambda: lowbit.QuantizationModifier(scheme={"W8A16": ["re:.*mlp.*"], "W4A16": ["re:.*self_attn.*"]},
                                                       ignore=["lm_head"]),
    "W8A8": lambda: "W8A8",
}


@pytest.mark.parametrize("form", list(ROUND_TRIP))
def test_written_recipe_yaml_round_trips(tmp_path, form):
    """recipe.yaml (llmcompressor's grammar) rebuilds a checkpoint byte-identical to the first."""
    lowbit.oneshot(make_model(ARCH), ROUND_TRIP[form](), output_dir=tmp_path / "a")
    doc = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    assert list(doc) == ["default_stage"] and list(doc["default_stage"]) == ["default_modifiers"]
    assert list(doc["default_stage"]["default_modifiers"]) == ["QuantizationModifier"]
    lowbit.oneshot(make_model(ARCH), tmp_path / "a" / "recipe.yaml", output_dir=tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (tmp_path / "a" / "recipe.yaml").read_text() == (tmp_path / "b" / "recipe.yaml").read_text()


def test_mixed_scheme_dict_quantizes_each_group(tmp_path):
    """{preset: targets}: MLP layers 8-bit, attention 4-bit; the config lists each group's modules."""
    model = lowbit.oneshot(make_model(ARCH), ROUND_TRIP["scheme-dict"](), output_dir=tmp_path / "out")
    for name, m in model.named_modules():
        if isinstance(m, lowbit.nn.PackedLinear):
            assert m.args.num_bits == (8 if ".mlp." in name else 4), name
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert len(qc["config_groups"]) == 2
    reloaded = lowbit.load(tmp_path / "out")
    ids = torch.arange(4, 40)[None]
    with torch.inference_mode():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_multiple_modifiers_in_one_recipe(tmp_path):
    """Two QuantizationModifiers in one list (attention 4-bit, MLP 8-bit) == the scheme dict."""
    recipe = [lowbit.QuantizationModifier(scheme="W4A16", targets=["re:.*self_attn.*"]),
              lowbit.QuantizationModifier(scheme="W8A16", targets=["re:.*mlp.*"])]
    a = compressed_state_dict(lowbit.oneshot(make_model(ARCH), recipe))
    b = compressed_state_dict(lowbit.oneshot(make_model(ARCH), ROUND_TRIP["scheme-dict"]()))
    _same_state(a, b)


def test_overlapping_modifiers_rejected():
    recipe = [_modifier("W4A16"), lowbit.QuantizationModifier(scheme="W8A16", targets=["re:.*mlp.*"])]
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.mlp\.\w+_proj' is targeted by two modifiers"):
        lowbit.oneshot(make_model(ARCH), recipe)


@pytest.mark.parametrize("recipe,exc,match", [
    (None, ValueError, r"oneshot needs a recipe"),
    ([], TypeError, r"a recipe list must hold lowbit modifiers"),
    (["W4A16"], TypeError, r"a recipe list must hold lowbit modifiers"),
    (42, TypeError, r"recipe must be a preset name, YAML, a path, a modifier"),
    ("missing-file.yaml", ValueError, r"recipe file 'missing-file\.yaml' does not exist"),
    ("- a\n- b: c\n", ValueError, r"a YAML recipe must be a mapping"),
    ("stage: {other: 1}", ValueError, r"holds no modifiers"),
])
def test_bad_recipes(recipe, exc, match):
    with pytest.raises(exc, match=match):
        lowbit.parse_recipe(recipe)


def test_modifier_needs_exactly_one_of_scheme_and_config_groups():
    with pytest.raises(ValueError, match=r"exactly one of scheme= .* or config_groups="):
        lowbit.QuantizationModifier()
    with pytest.raises(ValueError, match=r"exactly one of scheme="):
        lowbit.QuantizationModifier(scheme="W4A16", config_groups={"g": {"targets": ["Linear"], "weights": {}}})


def test_recipe_path_object(tmp_path):
    path = pathlib.Path(_yaml_file(tmp_path, PRESET_YAML.format(scheme="W8A8")))
    (mod,) = lowbit.parse_recipe(path)
    assert mod.scheme == "W8A8" and mod.ignore == ["lm_head"]

