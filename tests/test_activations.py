"""Calibration activations between decoder layers (oneshot's activations=): spilled to disk they
give the in-memory bytes; in bf16 they stay within bf16 rounding; "auto" spills when they would
not fit; the spill files never outlive the run; a disk too small is refused up front."""

from __future__ import annotations

import glob
import os
from collections import namedtuple

import pytest
import torch

import lowbit
from lowbit.formats import compressed_state_dict
from lowbit.pipeline import activations
from tiny_models import TEXTS, make_model, make_tokenizer, rel_err, w4_group_modifier

RECIPES = {
    "gptq": lambda: lowbit.GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}}, ignore=["lm_head"]),
    "awq": lambda: [lowbit.AWQModifier(),
                    lowbit.QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": {
                        "num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}}},
                        ignore=["lm_head"])],
    "w8a8": lambda: "W8A8",
}


def _quantize(recipe, arch="llama", **kwargs):
    model = make_model(arch)
    lowbit.oneshot(model, RECIPES[recipe](), dataset=TEXTS, tokenizer=make_tokenizer(), max_seq_length=48, **kwargs)
    return compressed_state_dict(model)


def _spill_files(directory):
    return glob.glob(os.path.join(directory, "lowbit-activations-*"))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_disk_gives_the_in_memory_bytes(tmp_path, caplog, recipe, arch):
    memory = _quantize(recipe, arch, activations="memory")
    with caplog.at_level("INFO", logger="lowbit"):
        disk = _quantize(recipe, arch, activations="disk", spill_dir=str(tmp_path))
    assert "calibration activations: disk" in caplog.text
    assert memory.keys() == disk.keys()
    for name in memory:
        assert torch.equal(memory[name], disk[name]), name
    assert _spill_files(tmp_path) == []


def test_bf16_activations_stay_close():
    memory, bf16 = _quantize("gptq", activations="memory"), _quantize("gptq", activations="bf16")
    scales = [n for n in memory if n.endswith("weight_scale")]
    assert scales and max(rel_err(bf16[n].float(), memory[n].float()) for n in scales) < 0.02


def test_auto_spills_when_memory_is_short(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(activations, "available_memory", lambda: 1000)
    monkeypatch.setattr(activations.tempfile, "tempdir", str(tmp_path))
    opened = []
    real = activations.ActivationStore.__init__

    def spy(self, mode, nbytes, spill_dir=None):
        real(self, mode, nbytes, spill_dir)
        opened.append(self._file)
    monkeypatch.setattr(activations.ActivationStore, "__init__", spy)
    with caplog.at_level("INFO", logger="lowbit"):
        auto = _quantize("gptq")
    assert "calibration activations: disk" in caplog.text
    assert opened and all(f is not None and f.startswith(str(tmp_path)) for f in opened)
    assert _spill_files(tmp_path) == []
    memory = _quantize("gptq", activations="memory")
    assert all(torch.equal(auto[n], memory[n]) for n in memory)


def test_disk_too_small_is_refused_before_calibration(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda d: usage(10**6, 10**6 - 100, 100))
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"needs 0\.\d+ GiB on disk, but .* has 0\.00 GiB free: pass spill_dir="):
        lowbit.oneshot(model, RECIPES["gptq"](), dataset=TEXTS, tokenizer=make_tokenizer(), activations="disk",
                       spill_dir=str(tmp_path))
    # with an output_dir the checkpoint's own room is checked first, also before any calibration
    with pytest.raises(ValueError, match=r"the checkpoint needs about 0\.\d+ GiB free beside output_dir"):
        lowbit.oneshot(model, RECIPES["gptq"](), dataset=TEXTS, tokenizer=make_tokenizer(), activations="disk",
                       spill_dir=str(tmp_path), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and _spill_files(tmp_path) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kwargs, match", [
    (dict(activations="ram"), r"activations must be one of \('auto', 'memory', 'bf16', 'disk'\), got 'ram'"),
    (dict(activations="disk", spill_dir="/nonexistent/spill"), r"spill_dir '/nonexistent/spill' is not a directory"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lowbit.oneshot(make_model("llama"), w4_group_modifier(), dataset=TEXTS, tokenizer=make_tokenizer(), **kwargs)


def test_a_failing_layer_removes_the_spill_files(tmp_path, monkeypatch):
    model = make_model("llama")

    def fail(module, args, output):
        raise RuntimeError("layer failed")
    model.model.layers[1].register_forward_hook(fail)
    with pytest.raises(RuntimeError, match="layer failed"):
        lowbit.oneshot(model, RECIPES["gptq"](), dataset=TEXTS, tokenizer=make_tokenizer(), activations="disk",
                       spill_dir=str(tmp_path))
    assert _spill_files(tmp_path) == []


@pytest.mark.parametrize("mode", ["memory", "bf16", "disk"])
def test_store_round_trip_and_sizes(tmp_path, mode):
    """Property: whatever the shapes and dtypes, a store gives back what it was given (bf16: to
    bf16 rounding) and refuses a tensor of another size."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(20):
        shapes = [(1, int(torch.randint(1, 9, (1,), generator=gen)), int(torch.randint(1, 17, (1,), generator=gen)))
                  for _ in range(int(torch.randint(1, 5, (1,), generator=gen)))]
        dtype = [torch.float32, torch.float16, torch.bfloat16][trial % 3]
        tensors = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        store = activations.ActivationStore(mode, [t.numel() * t.element_size() for t in tensors], str(tmp_path))
        for i, t in enumerate(tensors):
            store.put(i, t.transpose(1, 2).contiguous().transpose(1, 2) if trial % 2 else t)
        for i, t in enumerate(tensors):
            got = store.get(i)
            assert got.dtype == dtype and got.shape == t.shape
            if mode == "bf16":
                torch.testing.assert_close(got, t.to(torch.bfloat16).to(dtype), rtol=0, atol=0)
            else:
                assert torch.equal(got, t)
        with pytest.raises(ValueError, match="changed size between decoder layers"):
            store.put(0, torch.zeros(tensors[0].numel() + 1, dtype=dtype))
        store.close()
    assert _spill_files(tmp_path) == []
