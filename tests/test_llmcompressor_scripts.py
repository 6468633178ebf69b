"""llmcompressor's published example scripts (examples/ in its repository), condensed, each run
as a user would run it: in its own interpreter, with only `from llmcompressor... import X`
changed to `from lowbit import X`, the model and dataset names pointed at local ones (a tiny
Llama saved with its tokenizer; local data files) and fewer samples and generated tokens. Each
saves through model.save_pretrained(dir, save_compressed=True); a second interpreter that never
imports lowbit loads the result with stock transformers + compressed-tensors, and its logits
must equal those of lowbit's model in the script's process.

Not here: the SmoothQuant (quantization_w8a8_int8) and FP8 scripts (quantization_w8a8_fp8, and
quantization_kv_cache, whose recipes quantize FP8 weights besides the cache), which need a
modifier and schemes lowbit does not have yet; kv_cache_scheme itself is tested in
test_kv_cache.py, in Python and YAML recipes.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

import lowbit
from test_formats import W8A8_TOL, WEIGHT_ONLY_TOL, read_with_stock
from tiny_models import TEXTS, fixed_ids, make_model, make_tokenizer, rel_err, run_python

# Appended to every script: lowbit's logits on fixed token ids, for the comparison.
HARNESS = """
import torch as _torch
with _torch.inference_mode():
    _torch.save(model(input_ids=_torch.load(IDS_PATH)).logits.float(), LOGITS_PATH)
"""

SCRIPTS = {
    # quantization_w4a16/llama3_example.py
    "quantization_w4a16": (WEIGHT_ONLY_TOL, """
        from compressed_tensors.offload import dispatch_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lowbit import oneshot
        from lowbit import GPTQModifier

        model_id = MODEL_DIR
        model = AutoModelForCausalLM.from_pretrained(model_id)
        tokenizer = AutoTokenizer.from_pretrained(model_id)

        recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])

        oneshot(
            model=model,
            dataset=TEXT_FILE,
            recipe=recipe,
            max_seq_length=64,
            num_calibration_samples=8,
        )

        dispatch_model(model)
        sample = tokenizer("Hello my name is", return_tensors="pt")
        sample = {key: value.to(model.device) for key, value in sample.items()}
        output = model.generate(**sample, max_new_tokens=8)
        print(tokenizer.decode(output[0]))

        model.save_pretrained(SAVE_DIR, save_compressed=True)
        tokenizer.save_pretrained(SAVE_DIR)
    """),
    # awq/llama_example.py: chat data rendered with the template; oneshot is given no tokenizer
    "awq": (WEIGHT_ONLY_TOL, """
        from datasets import load_dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lowbit import oneshot
        from lowbit import AWQModifier
        from lowbit import dispatch_for_generation

        MODEL_ID = MODEL_DIR
        model = AutoModelForCausalLM.from_pretrained(MODEL_ID, torch_dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(MODEL_ID, trust_remote_code=True)

        NUM_CALIBRATION_SAMPLES = 8
        MAX_SEQUENCE_LENGTH = 64

        ds = load_dataset("json", data_files=CHAT_FILE, split=f"train[:{NUM_CALIBRATION_SAMPLES}]")
        ds = ds.shuffle(seed=42)

        def preprocess(example):
            return {"text": tokenizer.apply_chat_template(example["messages"], tokenize=False)}

        ds = ds.map(preprocess)

        recipe = [
            AWQModifier(ignore=["lm_head"], scheme="W4A16_ASYM", targets=["Linear"], duo_scaling="both"),
        ]

        oneshot(
            model=model,
            dataset=ds,
            recipe=recipe,
            max_seq_length=MAX_SEQUENCE_LENGTH,
            num_calibration_samples=NUM_CALIBRATION_SAMPLES,
        )

        dispatch_for_generation(model)
        input_ids = tokenizer("Hello my name is", return_tensors="pt").input_ids.to(model.device)
        output = model.generate(input_ids, max_new_tokens=8)
        print(tokenizer.decode(output[0]))

        model.save_pretrained(SAVE_DIR, save_compressed=True)
        tokenizer.save_pretrained(SAVE_DIR)
    """),
    # quantization_non_uniform/quantization_int4_int8.py: 8-bit down_proj, 4-bit asymmetric rest
    "quantization_int4_int8": (WEIGHT_ONLY_TOL, """
        from compressed_tensors.offload import dispatch_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lowbit import oneshot

        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR)
        tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)

        recipe = \"\"\"
        quant_stage:
            quant_modifiers:
                GPTQModifier:
                    ignore: ["lm_head"]
                    config_groups:
                        group_0:
                            weights:
                                num_bits: 8
                                type: int
                                strategy: group
                                dynamic: false
                                symmetric: true
                                group_size: 128
                            targets: ["re:.*down_proj.*"]
                        group_1:
                            weights:
                                num_bits: 4
                                type: int
                                strategy: group
                                dynamic: false
                                symmetric: false
                                group_size: 128
                            targets: ["re:.*self_attn.k_proj.*", "re:.*self_attn.o_proj.*",
                                "re:.*self_attn.q_proj.*", "re:.*self_attn.v_proj.*",
                                "re:.*gate_proj.*", "re:.*up_proj.*"]
        \"\"\"
        oneshot(
            model=model,
            dataset=TEXT_FILE,
            recipe=recipe,
            max_seq_length=64,
            num_calibration_samples=8,
        )

        dispatch_model(model)
        input_ids = tokenizer("Hello my name is", return_tensors="pt").input_ids.to(model.device)
        output = model.generate(input_ids, max_new_tokens=8)
        print(tokenizer.decode(output[0]))

        model.save_pretrained(SAVE_DIR, save_compressed=True)
        tokenizer.save_pretrained(SAVE_DIR)
    """),
    # quantization_non_uniform/quantization_multiple_modifiers.py: GPTQ W8A8 attention, AWQ + W4A16 MLP
    "quantization_multiple_modifiers": (W8A8_TOL, """
        import argparse

        from compressed_tensors.offload import dispatch_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lowbit import oneshot
        from lowbit import GPTQModifier
        from lowbit import QuantizationModifier
        from lowbit import AWQMapping, AWQModifier

        def parse_args():
            parser = argparse.ArgumentParser(description="Quantization with multiple modifiers")
            parser.add_argument("--independent", action="store_true")
            return parser.parse_args()

        model_id = MODEL_DIR
        model = AutoModelForCausalLM.from_pretrained(model_id)
        tokenizer = AutoTokenizer.from_pretrained(model_id)

        recipe = [
            GPTQModifier(targets=r"re:.*self_attn\\.(k|q|o|v)_proj$", scheme="W8A8"),
            AWQModifier(
                mappings=[
                    AWQMapping("re:.*post_attention_layernorm$", ["re:.*gate_proj$", "re:.*up_proj$"]),
                    AWQMapping("re:.*up_proj$", ["re:.*down_proj$"]),
                ],
            ),
            QuantizationModifier(targets=r"re:.*mlp\\.(down|gate|up)_proj$", scheme="W4A16"),
        ]

        if __name__ == "__main__":
            args = parse_args()
            oneshot(
                model=model,
                dataset=TEXT_FILE,
                recipe=recipe,
                max_seq_length=64,
                num_calibration_samples=8,
                pipeline="independent" if args.independent else "sequential",
            )

            dispatch_model(model)
            sample = tokenizer("Hello my name is", return_tensors="pt")
            sample = {key: value.to(model.device) for key, value in sample.items()}
            output = model.generate(**sample, max_new_tokens=8)
            print(tokenizer.decode(output[0]))

            model.save_pretrained(SAVE_DIR, save_compressed=True)
            tokenizer.save_pretrained(SAVE_DIR)
    """),
    # imatrix/llama3_imatrix_example.py: compressed-tensors' own scheme object, imatrix_mse, splits
    "imatrix": (WEIGHT_ONLY_TOL, """
        from compressed_tensors.offload import dispatch_model
        from compressed_tensors.quantization import preset_name_to_scheme
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from lowbit import oneshot
        from lowbit import QuantizationModifier
        from lowbit import IMatrixGatherer

        model_id = MODEL_DIR
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")
        tokenizer = AutoTokenizer.from_pretrained(model_id)

        DATASET_ID = TEXT_FILE
        NUM_CALIBRATION_SAMPLES = 8
        MAX_SEQUENCE_LENGTH = 64

        scheme = preset_name_to_scheme("W4A16", ["Linear"])
        scheme.weights.observer = "imatrix_mse"

        recipe = [
            IMatrixGatherer(ignore=["lm_head"]),
            QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"]),
        ]

        oneshot(
            model=model,
            dataset=DATASET_ID,
            splits="train[:50%]",
            recipe=recipe,
            max_seq_length=MAX_SEQUENCE_LENGTH,
            num_calibration_samples=NUM_CALIBRATION_SAMPLES,
        )

        dispatch_model(model)
        sample = tokenizer("Hello my name is", return_tensors="pt")
        sample = {key: value.to(model.device) for key, value in sample.items()}
        output = model.generate(**sample, max_new_tokens=8)
        print(tokenizer.decode(output[0]))

        model.save_pretrained(SAVE_DIR, save_compressed=True)
        tokenizer.save_pretrained(SAVE_DIR)
    """),
}

# Every kind of config group in one recipe (bit widths, symmetric / asymmetric, group /
# channel, weight-only / W8A8), saved through save_pretrained as the scripts do.
MIXED_GROUPS = {
    "g8_sym_group": {"targets": ["re:.*self_attn\\.(q|k)_proj$"],
                     "weights": {"num_bits": 8, "symmetric": True, "strategy": "group", "group_size": 32}},
    "g4_asym_channel": {"targets": ["re:.*self_attn\\.(v|o)_proj$"],
                        "weights": {"num_bits": 4, "symmetric": False, "strategy": "channel"}},
    "g4_asym_group": {"targets": ["re:.*mlp\\.(gate|up)_proj$"],
                      "weights": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32}},
    "w8a8": {"targets": ["re:.*down_proj$"], "weights": {"num_bits": 8, "symmetric": True, "strategy": "channel"},
             "input_activations": {"num_bits": 8, "symmetric": True, "strategy": "token", "dynamic": True}},
    "g3_sym_lm_head": {"targets": ["lm_head"],
                       "weights": {"num_bits": 3, "symmetric": True, "strategy": "group", "group_size": 32}},
}

CHATS = [{"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": b}]}
         for a, b in zip(TEXTS[::2], TEXTS[1::2])] * 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every script run in its own interpreter; then one stock interpreter reads every result."""
    root = tmp_path_factory.mktemp("scripts")
    model_dir = root / "tiny-llama"
    make_model("llama_h128").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    (root / "calib.jsonl").write_text("".join(json.dumps({"text": t * 3}) + "\n" for t in TEXTS * 2))
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    torch.save(fixed_ids(), root / "ids.pt")
    out = {}
    for name, (_, body) in SCRIPTS.items():
        paths = {"MODEL_DIR": model_dir, "TEXT_FILE": root / "calib.jsonl", "CHAT_FILE": root / "chat.jsonl",
                 "SAVE_DIR": root / f"{name}-quantized", "IDS_PATH": root / "ids.pt",
                 "LOGITS_PATH": root / f"{name}.logits.pt"}
        prologue = "".join(f"{k} = {str(v)!r}\n" for k, v in paths.items())
        proc = run_python(prologue + textwrap.dedent(body) + HARNESS, timeout=300)
        out[name] = {"dir": paths["SAVE_DIR"], "lowbit": torch.load(paths["LOGITS_PATH"]), "stdout": proc.stdout}
    mixed = lowbit.oneshot(make_model("llama"), lowbit.QuantizationModifier(config_groups=MIXED_GROUPS))
    mixed.save_pretrained(root / "mixed", save_compressed=True)
    with torch.inference_mode():
        out["mixed"] = {"dir": root / "mixed", "lowbit": mixed(input_ids=fixed_ids()).logits.float()}
    cases = {name: [str(r["dir"]), None] for name, r in out.items()}
    stock = read_with_stock(cases, root)
    for name in out:
        out[name]["stock"] = stock[name]
    return out


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_script_runs_and_loads_in_stock_transformers(runs, name):
    run, tol = runs[name], SCRIPTS[name][0]
    stock = run["stock"]
    assert "error" not in stock, stock.get("error")
    assert stock["unexpected"] == [] and stock["missing"] == [], (stock["unexpected"][:6], stock["missing"][:6])
    assert stock["quantized"], "compressed-tensors applied no quantization scheme"
    err = rel_err(stock["logits"], run["lowbit"])
    assert err <= tol, f"{name}: stock transformers vs lowbit logits differ by {err:.3g} (relative)"
    assert (run["dir"] / "tokenizer_config.json").is_file() and (run["dir"] / "recipe.yaml").is_file()


def test_mixed_config_groups_load_in_stock_transformers(runs):
    """Each kind of group gets its compressed-tensors format (pack-quantized, int-quantized:
    mixed-precision) and stock transformers reads every one."""
    run = runs["mixed"]
    stock = run["stock"]
    assert "error" not in stock, stock.get("error")
    assert stock["unexpected"] == [] and stock["missing"] == [], (stock["unexpected"][:6], stock["missing"][:6])
    assert len(stock["quantized"]) == 2 * 7 + 1
    config = json.loads((run["dir"] / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    assert {g["format"] for g in config["config_groups"].values()} == {"pack-quantized", "int-quantized"}
    assert rel_err(stock["logits"], run["lowbit"]) <= W8A8_TOL
