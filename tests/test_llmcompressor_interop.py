"""lowbit vs llmcompressor 0.14 on the same tiny float Llama (hidden 64), data-free RTN.

llmcompressor runs in a subprocess that never imports lowbit: it quantizes the model loaded
from a saved directory (its oneshot needs that), records the logits of its in-memory
quantized model on fixed ids, and saves with save_compressed=True. Then, here:

  * lowbit.load(llmcompressor's directory) gives llmcompressor's logits: relative error
    <= 1e-4 for W4A16 group 32, symmetric and asymmetric (measured 3.4e-7), <= 1e-2 for W8A8
    (dynamic per-token activations: llmcompressor fake-quantizes in float, lowbit runs int8
    matmuls, so rounding-boundary flips propagate; see test_formats.py);
  * lowbit's own oneshot of the same float model writes bit-identical tensors (measured:
    every weight_packed / weight_scale / weight_zero_point / int8 weight identical; a
    failure reports the fraction of differing elements);
  * the quantization_config agrees on every field that describes the quantization;
  * the recipe.yaml llmcompressor wrote is a valid lowbit recipe for the same weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lowbit
from tiny_models import fixed_ids, logits, rel_err, run_python, save_float, w4_group_modifier

WEIGHT_ONLY_TOL = 1e-4
W8A8_TOL = 1e-2

LLMC_CODE = r"""
import json, sys
import torch
torch.set_num_threads(1)
import transformers
transformers.logging.set_verbosity_error()
from transformers import AutoModelForCausalLM
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import QuantizationModifier

src, ids_path, root = sys.argv[1:4]
ids = torch.load(ids_path)

def group(sym):
    return {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": sym,
                                                           "strategy": "group", "group_size": 32}}}

recipes = {
    "w4a16-sym": lambda: QuantizationModifier(targets="Linear", ignore=["lm_head"], config_groups=group(True)),
    "w4a16-asym": lambda: QuantizationModifier(targets="Linear", ignore=["lm_head"], config_groups=group(False)),
    "w8a8": lambda: QuantizationModifier(targets="Linear", ignore=["lm_head"], scheme="W8A8"),
}
out = {}
for name, recipe in recipes.items():
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    oneshot(model=model, recipe=recipe())
    model.eval()
    with torch.inference_mode():
        out[name] = model(input_ids=ids).logits.float()
    model.save_pretrained(f"{root}/{name}", save_compressed=True)
torch.save(out, f"{root}/logits.pt")
assert "lowbit" not in sys.modules, "llmcompressor's run imported lowbit"
"""

LOWBIT_RECIPES = {
    "w4a16-sym": lambda: w4_group_modifier(symmetric=True),
    "w4a16-asym": lambda: w4_group_modifier(symmetric=False),
    "w8a8": lambda: "W8A8",
}
NAMES = list(LOWBIT_RECIPES)


@pytest.fixture(scope="module")
def llmc(tmp_path_factory):
    root = tmp_path_factory.mktemp("llmc")
    src = save_float("llama", root / "float")
    ids = fixed_ids()
    torch.save(ids, root / "ids.pt")
    run_python(LLMC_CODE, str(src), str(root / "ids.pt"), str(root), timeout=300)
    return {"root": root, "src": src, "ids": ids, "logits": torch.load(root / "logits.pt")}


@pytest.fixture(scope="module")
def lowbit_dirs(llmc):
    """lowbit's own oneshot of the same saved float model (loaded from the directory, as
    llmcompressor's was)."""
    dirs = {}
    for name, recipe in LOWBIT_RECIPES.items():
        dirs[name] = llmc["root"] / f"lowbit-{name}"
        lowbit.oneshot(str(llmc["src"]), recipe(), output_dir=dirs[name])
    return dirs


@pytest.mark.parametrize("name", NAMES)
def test_lowbit_loads_llmcompressor_checkpoint(llmc, name):
    model = lowbit.load(llmc["root"] / name)
    n_quant = sum(isinstance(m, (lowbit.nn.PackedLinear, lowbit.nn.Int8DynamicLinear)) for m in model.modules())
    assert n_quant == 14
    err = rel_err(logits(model, llmc["ids"]), llmc["logits"][name])
    tol = W8A8_TOL if name == "w8a8" else WEIGHT_ONLY_TOL
    assert err <= tol, f"{name}: lowbit.load(llmcompressor) vs llmcompressor in-memory logits: {err:.3g}"


@pytest.mark.parametrize("name", NAMES)
def test_lowbit_rtn_is_bit_identical_to_llmcompressor(llmc, lowbit_dirs, name):
    ours = load_file(lowbit_dirs[name] / "model.safetensors")
    theirs = load_file(llmc["root"] / name / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    report = {}
    for key in sorted(theirs):
        a, b = ours[key], theirs[key]
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{key}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if not torch.equal(a, b):
            report[key] = (a != b).float().mean().item()
    assert not report, "tensors differ from llmcompressor's (fraction of elements): " + \
        ", ".join(f"{k}: {v:.2%}" for k, v in list(report.items())[:8])


def _args_core(args):
    if args is None:
        return None
    return {k: args.get(k) for k in ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")}


@pytest.mark.parametrize("name", NAMES)
def test_quantization_config_agrees(llmc, lowbit_dirs, name):
    ours = json.loads((lowbit_dirs[name] / "config.json").read_text())["quantization_config"]
    theirs = json.loads((llmc["root"] / name / "config.json").read_text())["quantization_config"]
    for key in ("quant_method", "format", "quantization_status", "ignore", "kv_cache_scheme"):
        assert ours[key] == theirs[key], key
    assert len(ours["config_groups"]) == len(theirs["config_groups"]) == 1
    (a,), (b,) = ours["config_groups"].values(), theirs["config_groups"].values()
    assert a["targets"] == b["targets"] and a["format"] == b["format"]
    assert _args_core(a["weights"]) == _args_core(b["weights"])
    assert _args_core(a["input_activations"]) == _args_core(b["input_activations"])
    assert a["output_activations"] is None and b["output_activations"] is None


@pytest.mark.parametrize("name", NAMES)
def test_lowbit_reads_llmcompressor_recipe_yaml(llmc, lowbit_dirs, tmp_path, name):
    """The recipe.yaml llmcompressor saved (every key it writes) is a lowbit recipe for the
    same quantization: the checkpoint is byte-identical to lowbit's from the Python recipe."""
    recipe = llmc["root"] / name / "recipe.yaml"
    lowbit.oneshot(str(llmc["src"]), recipe, output_dir=tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == \
        (lowbit_dirs[name] / "model.safetensors").read_bytes()


def test_llmcompressor_logits_are_quantized(llmc):
    """Sanity: llmcompressor's logits are not the float model's."""
    from tiny_models import make_model

    ref = logits(make_model("llama"), llmc["ids"])
    for name in NAMES:
        assert rel_err(llmc["logits"][name], ref) > 1e-3, name
