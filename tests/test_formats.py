"""oneshot's checkpoints in compressed-tensors' format: stock transformers + compressed-tensors
(in a subprocess that never imports lowbit) and lowbit.load both read them back to the
logits of the model oneshot returned; the directory holds what llmcompressor writes, with
pack-quantized / int-quantized tensors in compressed-tensors' names, dtypes and shapes;
saving is deterministic.

Tolerances (relative Frobenius error over 2 x 24 fixed ids, fp32 models):
  * stock transformers + compressed-tensors vs lowbit's in-memory model, logits: 1e-4 for
    weight-only schemes (measured <= 5e-7; the 2/3/8-bit schemes exactly 0).
  * W8A8 and W4A8 logits: 1e-2. compressed-tensors fake-quantizes activations per token in float while
    lowbit runs an int8 x int8 -> int32 matmul; the ~1e-7 float differences flip the odd
    activation code at a rounding boundary in a later layer and the flips propagate: measured
    2.3e-3 on the test model, 2e-7 .. 5.4e-3 over 6 seeds x Llama / Qwen2 / Mistral / 96-wide
    Llama. Each quantized Linear is therefore also compared on identical inputs (its inputs in
    lowbit's model): 1e-5 (measured <= 2.1e-7). (OPT is left out of W8A8: it feeds fc1 / fc2
    2-D [tokens, hidden] inputs, on which compressed-tensors' "token" strategy reduces over
    no dimension and quantizes nothing, so its reference differs by ~1e-2 by design.)
  * half precision (bf16 / fp16 models): 3e-2 / 5e-3 (measured 7.8e-3 / 9.7e-4; both readers
    run the matmuls in the model's dtype but round differently).
  * lowbit.load vs in-memory: 1e-6 (measured exactly 0: the same modules and tensors).
"""

from __future__ import annotations

import functools
import json
import math
import os
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import lowbit
from tiny_models import (ARCH_NAMES, GROUP, fixed_ids, logits, make_model, make_tokenizer, rel_err, run_python,
                         w4_group_modifier)

WEIGHT_ONLY_TOL = 1e-4
W8A8_TOL = 1e-2
W8A8_MODULE_TOL = 1e-5
BF16_TOL = 3e-2
FP16_TOL = 5e-3
LOAD_TOL = 1e-6


def _w(**kw):
    return lambda: w4_group_modifier(**kw)


# case id -> (arch, recipe factory, tolerance vs stock transformers)
CASES = {
    **{f"{arch}-w4a16-g{GROUP}": (arch, _w(), WEIGHT_ONLY_TOL) for arch in ARCH_NAMES},
    "llama-w4a16_asym-g32": ("llama", _w(symmetric=False), WEIGHT_ONLY_TOL),
    "llama-w8a16-g32": ("llama", _w(bits=8), WEIGHT_ONLY_TOL),
    "llama-w8a16-channel": ("llama", _w(bits=8, strategy="channel"), WEIGHT_ONLY_TOL),
    "llama-w8a16_asym-g32": ("llama", _w(bits=8, symmetric=False), WEIGHT_ONLY_TOL),
    "llama-w3a16-g32": ("llama", _w(bits=3), WEIGHT_ONLY_TOL),
    "llama-w2a16_asym-g32": ("llama", _w(bits=2, symmetric=False), WEIGHT_ONLY_TOL),
    "llama-w4a16_asym-channel": ("llama", _w(symmetric=False, strategy="channel"), WEIGHT_ONLY_TOL),
    "llama-W8A8": ("llama", lambda: "W8A8", W8A8_TOL),
    # W4A8: packed 4-bit weights meet int8-quantized activations (saved int-quantized). As with
    # W8A8, float noise of 1e-7 flips a few activation codes between the two readers (the
    # logits then differ by ~5e-3); the per-module test below pins each layer exactly.
    "llama_h128-W4A8": ("llama_h128", lambda: "W4A8", W8A8_TOL),
    "llama-w4a8_asym-g32": ("llama", lambda: lowbit.QuantizationModifier(config_groups={"g": {
        "targets": ["Linear"], "weights": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32},
        "input_activations": {"num_bits": 8, "strategy": "token", "dynamic": True}}}, ignore=["lm_head"]),
        W8A8_TOL),
    "qwen2-W8A8": ("qwen2", lambda: "W8A8", W8A8_TOL),
    # The presets themselves (group_size 128 needs 128 input columns).
    "llama_h128-W4A16": ("llama_h128", lambda: "W4A16", WEIGHT_ONLY_TOL),
    "llama_h128-W4A16_ASYM": ("llama_h128", lambda: "W4A16_ASYM", WEIGHT_ONLY_TOL),
    "llama_h128-W8A16": ("llama_h128", lambda: "W8A16", WEIGHT_ONLY_TOL),
    # Partial targets: the config's ignore list must name every other Linear.
    "llama-mlp-only-w4a16-g32": ("llama", lambda: lowbit.QuantizationModifier(
        config_groups={"g": {"targets": ["re:.*mlp.*"], "weights": {"num_bits": 4, "group_size": GROUP}}}),
        WEIGHT_ONLY_TOL),
    # Several schemes: one config group per scheme, naming its modules.
    "llama_h128-mixed-W4A16-W8A16": ("llama_h128", lambda: lowbit.QuantizationModifier(
        scheme={"W8A16": ["re:.*mlp.*"], "W4A16": ["re:.*self_attn.*"]}, ignore=["lm_head"]), WEIGHT_ONLY_TOL),
    "llama_h128-mixed-W4A16-W8A8": ("llama_h128", lambda: lowbit.QuantizationModifier(
        scheme={"W8A8": ["re:.*mlp.*"], "W4A16": ["re:.*self_attn.*"]}, ignore=["lm_head"]), W8A8_TOL),
    # lm_head quantized too: untied (Llama) and tied to the embedding (OPT).
    "llama-w4a16-g32-lm_head": ("llama", _w(ignore=[]), WEIGHT_ONLY_TOL),
    "opt-w4a16-g32-lm_head": ("opt", _w(ignore=[]), WEIGHT_ONLY_TOL),
    # Half precision: both readers run the model in its dtype; their matmuls round
    # differently (measured 7.8e-3 in bf16, 9.7e-4 in fp16).
    "llama-w4a16-g32-bf16": ("llama", _w(), BF16_TOL, torch.bfloat16),
    "qwen2-w4a16_asym-g32-fp16": ("qwen2", _w(symmetric=False), FP16_TOL, torch.float16),
}

# Runs in a fresh interpreter: stock transformers + compressed-tensors only.
STOCK_CODE = r"""
import json, sys, traceback
import torch
torch.set_num_threads(1)
import transformers, compressed_tensors
from transformers import AutoModelForCausalLM
transformers.logging.set_verbosity_error()
cases, ids_path, out_path = json.loads(sys.argv[1])
ids = torch.load(ids_path)
results = {}
for name, (path, inputs_path) in cases.items():
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        model.eval()
        with torch.inference_mode():
            out = model(input_ids=ids).logits.float()
            # per-module outputs on the inputs each module saw in lowbit's model
            per_module = {n: model.get_submodule(n)(x) for n, x in torch.load(inputs_path).items()} \
                if inputs_path else {}
        quantized = sorted(n for n, m in model.named_modules() if getattr(m, "quantization_scheme", None) is not None)
        results[name] = {"logits": out, "missing": sorted(info["missing_keys"]), "per_module": per_module,
                         "unexpected": sorted(info["unexpected_keys"]), "quantized": quantized}
    except Exception:
        results[name] = {"error": traceback.format_exc()}
assert "lowbit" not in sys.modules, "the stock reader imported lowbit"
results["__modules__"] = sorted(m for m in sys.modules if m.split(".")[0] == "lowbit")
torch.save(results, out_path)
"""


def read_with_stock(cases: dict, root) -> dict:
    """STOCK_CODE in one fresh interpreter over cases {name: [directory, inputs file or None]}
    with the token ids in root / "ids.pt": name -> what stock transformers found."""
    run_python(STOCK_CODE, json.dumps([cases, str(root / "ids.pt"), str(root / "stock.pt")]), timeout=300)
    stock = torch.load(root / "stock.pt")
    assert stock.pop("__modules__") == []
    return stock


def quantizes_activations(module) -> bool:
    return isinstance(module, lowbit.nn.Int8DynamicLinear) or (
        isinstance(module, lowbit.nn.PackedLinear) and module.input_args is not None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Every case quantized with oneshot and saved; the in-memory logits, lowbit.load's logits,
    and (from one subprocess) stock transformers' logits."""
    root = tmp_path_factory.mktemp("ckpt")
    ids = fixed_ids()
    torch.save(ids, root / "ids.pt")
    out, args = {}, {}
    for name, (arch, recipe, tol, *dtype) in CASES.items():
        model = lowbit.oneshot(make_model(arch, dtype=dtype[0] if dtype else torch.float32), recipe(),
                               output_dir=root / name)
        inputs, outputs = {}, {}

        def record(module, args, output, name=None):
            inputs[name], outputs[name] = args[0].clone(), output.clone()

        if tol == W8A8_TOL:
            hooks = [m.register_forward_hook(functools.partial(record, name=n))
                     for n, m in model.named_modules() if quantizes_activations(m)]
        out[name] = {"dir": root / name, "arch": arch, "memory": logits(model, ids),
                     "loaded": logits(lowbit.load(root / name), ids), "module_outputs": outputs}
        if inputs:
            for h in hooks:
                h.remove()
            torch.save(inputs, root / f"{name}.inputs.pt")
        args[name] = [str(root / name), str(root / f"{name}.inputs.pt") if inputs else None]
    stock = read_with_stock(args, root)
    for name in out:
        out[name]["stock"] = stock[name]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_stock_transformers_reads_checkpoint(checkpoints, case):
    """A fresh interpreter with only transformers + compressed-tensors loads the directory,
    with no missing / unexpected keys, to the logits of lowbit's in-memory model."""
    c = checkpoints[case]
    stock = c["stock"]
    assert "error" not in stock, stock.get("error")
    assert stock["unexpected"] == [] and stock["missing"] == [], (
        f"stock transformers + compressed-tensors ignored checkpoint tensors {stock['unexpected'][:6]} and "
        f"left {stock['missing'][:6]} randomly initialised")
    # GPT-2's Conv1D layers are saved as grid-valued floats (no compressed-tensors layout).
    assert bool(stock["quantized"]) != case.startswith("gpt2"), "compressed-tensors applied the wrong schemes"
    err = rel_err(stock["logits"], c["memory"])
    assert err <= CASES[case][2], f"{case}: stock vs lowbit logits differ by {err:.3g} (relative)"


@pytest.mark.parametrize("case", [c for c, v in CASES.items() if v[2] == W8A8_TOL])
def test_stock_transformers_w8a8_per_module(checkpoints, case):
    """W8A8 / W4A8: each int-quantized Linear, run by compressed-tensors on the inputs it saw in
    lowbit's model, gives lowbit's output (Int8DynamicLinear, or PackedLinear with int8 inputs)."""
    c = checkpoints[case]
    per_module = c["stock"]["per_module"]
    assert set(per_module) == set(c["module_outputs"]) and len(per_module) in (6, 14)
    for name, ref in c["module_outputs"].items():
        assert ref.dim() == 3  # [batch, tokens, features]: compressed-tensors' per-token layout
        err = rel_err(per_module[name], ref)
        assert err <= W8A8_MODULE_TOL, f"{case} {name}: {err:.3g}"


@pytest.mark.parametrize("case", list(CASES))
def test_lowbit_load_matches_memory(checkpoints, case):
    c = checkpoints[case]
    err = rel_err(c["loaded"], c["memory"])
    assert err <= LOAD_TOL, f"{case}: lowbit.load vs in-memory logits differ by {err:.3g}"


def test_quantized_logits_differ_from_float(checkpoints):
    """Sanity: the comparisons above compare quantized models (not accidentally float ones)."""
    ids = fixed_ids()
    for case in ("llama-w4a16-g32", "llama-W8A8", "gpt2-w4a16-g32"):
        c = checkpoints[case]
        assert rel_err(c["memory"], logits(make_model(c["arch"]), ids)) > 1e-3, case


def test_gpt2_conv1d_layers_are_quantized(checkpoints):
    """GPT-2's Conv1D layers are targeted by "Linear" and quantized along their input rows,
    but compressed-tensors has no layout for Conv1D: they are saved as float weights that
    lie exactly on the int4 grid, and the config describes no compressed layer."""
    c = checkpoints["gpt2-w4a16-g32"]
    from transformers.pytorch_utils import Conv1D

    conv = [n for n, m in make_model("gpt2").named_modules() if isinstance(m, Conv1D)]
    assert len(conv) == 8
    with safe_open(c["dir"] / "model.safetensors", "pt") as f:
        for name in conv:
            w = f.get_tensor(f"{name}.weight")  # [in, out]
            groups = w.t().reshape(-1, 32)  # groups of 32 input rows per output column
            assert max(len(torch.unique(g)) for g in groups) <= 16, name  # 4-bit: at most 16 values
            assert not torch.equal(w, make_model("gpt2").get_submodule(name).weight.detach()), name
    assert "quantization_config" not in json.loads((c["dir"] / "config.json").read_text())


# ---------------------------------------------------------------- layout

LAYOUT_CASES = ["llama-w4a16-g32", "llama-w4a16_asym-g32", "llama-w8a16-g32", "llama-w8a16-channel",
                "llama-w8a16_asym-g32", "llama-w3a16-g32", "llama-w2a16_asym-g32", "llama-w4a16_asym-channel",
                "llama_h96-w4a16-g32", "llama_h128-W4A16_ASYM"]


def _weight_args(directory):
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    return group["weights"]


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_pack_quantized_tensor_layout(checkpoints, case):
    """Per quantized Linear: weight_packed int32 [out, in*bits/32], weight_scale [out, groups]
    (model dtype), weight_shape int64 [2] = [out, in], weight_zero_point int32
    [ceil(out*bits/32), groups] only when asymmetric; nothing else (no float weight)."""
    c = checkpoints[case]
    w = _weight_args(c["dir"])
    bits, sym = w["num_bits"], w["symmetric"]
    state = load_file(c["dir"] / "model.safetensors")
    float_model = make_model(c["arch"])
    linears = {n: m for n, m in float_model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert linears
    for name, lin in linears.items():
        out_f, in_f = lin.weight.shape
        groups = in_f // w["group_size"] if w["strategy"] == "group" else 1
        keys = {k[len(name) + 1:] for k in state if k.startswith(name + ".")}
        expected = {"weight_packed", "weight_scale", "weight_shape"} | ({"bias"} if lin.bias is not None else set())
        if not sym:
            expected.add("weight_zero_point")
        assert keys == expected, f"{name}: {sorted(keys)}"
        packed, scale, shape = (state[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape"))
        assert packed.dtype == torch.int32 and tuple(packed.shape) == (out_f, math.ceil(in_f * bits / 32)), name
        assert scale.dtype == torch.float32 and tuple(scale.shape) == (out_f, groups), name
        assert shape.dtype == torch.int64 and shape.tolist() == [out_f, in_f], name
        if not sym:
            zp = state[f"{name}.weight_zero_point"]
            assert zp.dtype == torch.int32 and tuple(zp.shape) == (math.ceil(out_f * bits / 32), groups), name
    # lm_head stays float, under its own name
    assert state["lm_head.weight"].dtype == torch.float32


@pytest.mark.parametrize("case", ["llama-W8A8", "qwen2-W8A8"])
def test_int_quantized_tensor_layout(checkpoints, case):
    """W8A8: compressed-tensors' int-quantized layout, weight int8 [out, in] and weight_scale
    [out, 1]; activations are dynamic (no stored input scale)."""
    c = checkpoints[case]
    state = load_file(c["dir"] / "model.safetensors")
    qc = json.loads((c["dir"] / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int-quantized"
    (group,) = qc["config_groups"].values()
    assert group["weights"]["num_bits"] == 8 and group["weights"]["strategy"] == "channel"
    assert group["input_activations"]["strategy"] == "token" and group["input_activations"]["dynamic"] is True
    for name, lin in make_model(c["arch"]).named_modules():
        if not isinstance(lin, torch.nn.Linear) or name == "lm_head":
            continue
        keys = {k[len(name) + 1:] for k in state if k.startswith(name + ".")}
        assert keys == {"weight", "weight_scale"} | ({"bias"} if lin.bias is not None else set()), name
        assert state[f"{name}.weight"].dtype == torch.int8
        assert state[f"{name}.weight"].shape == lin.weight.shape
        assert tuple(state[f"{name}.weight_scale"].shape) == (lin.weight.shape[0], 1)


# ---------------------------------------------------------------- directory contents

def test_output_directory_contents(tmp_path):
    """config.json with compressed-tensors' quantization_config, model.safetensors,
    recipe.yaml and the tokenizer files; no temporary directory left beside it."""
    out = tmp_path / "out"
    lowbit.oneshot(make_model("llama"), w4_group_modifier(), output_dir=out, tokenizer=make_tokenizer())
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json", "tokenizer_config.json"} <= files
    assert not any(n.startswith(".lowbit-") for n in os.listdir(tmp_path))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed"
    assert qc["ignore"] == ["lm_head"]
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy", "group_size")} == \
        {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}
    # the tokenizer round-trips (chat template included)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("hello world")["input_ids"] == make_tokenizer()("hello world")["input_ids"]
    assert tok.chat_template == make_tokenizer().chat_template
    # and the recipe rebuilds the same modifier
    (mod,) = lowbit.parse_recipe(str(out / "recipe.yaml"))
    assert isinstance(mod, lowbit.QuantizationModifier) and mod.ignore == ["lm_head"]


def test_no_tokenizer_files_without_tokenizer(tmp_path):
    lowbit.oneshot(make_model("llama"), w4_group_modifier(), output_dir=tmp_path / "out")
    assert not any(n.startswith("tokenizer") for n in os.listdir(tmp_path / "out"))


def test_saving_is_deterministic(tmp_path):
    """The same oneshot twice (fresh models from the same seed) writes byte-identical files."""
    for run in ("a", "b"):
        lowbit.oneshot(make_model("qwen2"), w4_group_modifier(symmetric=False), output_dir=tmp_path / run,
                       tokenizer=make_tokenizer())
    for name in ("model.safetensors", "config.json", "recipe.yaml"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_saving_with_calibration_data_matches_data_free(tmp_path):
    """RTN does not depend on the data: with a dataset (layer-sequential run) the file is
    byte-identical to the data-free one."""
    lowbit.oneshot(make_model("llama"), w4_group_modifier(), output_dir=tmp_path / "free")
    lowbit.oneshot(make_model("llama"), w4_group_modifier(), dataset=fixed_ids(4, 16), output_dir=tmp_path / "data")
    assert (tmp_path / "free" / "model.safetensors").read_bytes() == \
        (tmp_path / "data" / "model.safetensors").read_bytes()


def test_output_directory_permissions_follow_umask(tmp_path):
    """The output directory gets the permissions a normal mkdir would (as save_pretrained's
    does), not tempfile.mkdtemp's private 0700, so other users / a serving process can read it."""
    lowbit.oneshot(make_model("llama"), w4_group_modifier(), output_dir=tmp_path / "out")
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE(os.stat(tmp_path / "out").st_mode)
    assert mode == 0o777 & ~umask, f"output dir mode {oct(mode)}, expected {oct(0o777 & ~umask)}"


def test_tied_lm_head_saved_once(checkpoints):
    """OPT / GPT-2 tie lm_head to the embedding: the file holds the embedding only and both
    readers re-tie it (their logits matched above)."""
    for case in ("opt-w4a16-g32", "gpt2-w4a16-g32"):
        with safe_open(checkpoints[case]["dir"] / "model.safetensors", "pt") as f:
            assert "lm_head.weight" not in set(f.keys()), case


def test_partial_targets_config_and_tensors(checkpoints):
    """Only the MLP is quantized: the attention Linears stay float tensors and the config's
    ignore list names each of them (its targets are the class "Linear")."""
    c = checkpoints["llama-mlp-only-w4a16-g32"]
    qc = json.loads((c["dir"] / "config.json").read_text())["quantization_config"]
    attn = sorted(f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo")
    assert qc["ignore"] == sorted(attn + ["lm_head"])
    (group,) = qc["config_groups"].values()
    assert group["targets"] == ["Linear"]
    with safe_open(c["dir"] / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    for name in attn:
        assert f"{name}.weight" in keys and f"{name}.weight_packed" not in keys
    for i in range(2):
        for p in ("gate", "up", "down"):
            assert f"model.layers.{i}.mlp.{p}_proj.weight_packed" in keys


def test_mixed_schemes_config(checkpoints):
    """Two schemes: a config group each, targeting its modules by exact name; a pack-quantized
    and an int-quantized group together make the format "mixed-precision"."""
    for case, fmt in (("llama_h128-mixed-W4A16-W8A16", "pack-quantized"),
                      ("llama_h128-mixed-W4A16-W8A8", "mixed-precision")):
        qc = json.loads((checkpoints[case]["dir"] / "config.json").read_text())["quantization_config"]
        assert qc["format"] == fmt, case
        groups = list(qc["config_groups"].values())
        assert len(groups) == 2
        targets = sorted(t for g in groups for t in g["targets"])
        assert len(targets) == 14 and all(t.startswith("model.layers.") for t in targets)
        assert qc["ignore"] == ["lm_head"]
