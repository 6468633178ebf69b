"""Nothing lost: lowbit writes only where it may, replaces a checkpoint so that the old or the
new one is complete at every instant (kill -9 at any point of a save), and refuses checkpoint
files that disagree with their config.json before allocating anything for them."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lowbit
from lowbit.formats import checkpoint, files
from tiny_models import fixed_ids, logits, make_model, save_float, w4_group_modifier

IDS = fixed_ids(2, 16)


def _files(directory) -> dict:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))}


def _quantized(seed=0):
    return lowbit.oneshot(make_model("llama", seed), w4_group_modifier(bits=8))


# ---------------------------------------------------------------- where lowbit may write

@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory holding a file that must survive every refused save."""
    cwd = tmp_path / "home" / "user" / "project"
    cwd.mkdir(parents=True)
    (cwd / "notes.txt").write_text("keep me")
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "user"))
    return cwd


@pytest.mark.parametrize("output_dir,match", [
    ("", r"output_dir '' is empty"),
    ("   ", r"is empty"),
    (".", r"working directory or a directory above it"),
    ("./", r"working directory or a directory above it"),
    ("..", r"home directory"),
    ("../..", r"working directory or a directory above it"),
    ("/", r"root directory|working directory or a directory above it"),
    ("~", None),
])
def test_refuses_directories_it_must_not_replace(workdir, output_dir, match):
    model = make_model("llama")
    path = os.path.expanduser(output_dir) if output_dir == "~" else output_dir
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=match or r"home directory|working directory"):
            lowbit.oneshot(model, w4_group_modifier(), output_dir=path, overwrite=overwrite)
    assert (workdir / "notes.txt").read_text() == "keep me"
    assert os.listdir(workdir) == ["notes.txt"]
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # refused before any work


def test_cli_refuses_empty_output(workdir, tmp_path):
    from lowbit import cli

    model_dir = save_float("llama", tmp_path / "model")
    with pytest.raises(SystemExit, match=r"output_dir '' is empty"):
        cli.main(["quantize", "--model", model_dir, "--recipe", "W4A16", "--output", "", "--overwrite"])
    assert os.listdir(workdir) == ["notes.txt"]


def test_refuses_the_model_directory_and_its_parents(tmp_path):
    model_dir = save_float("llama", tmp_path / "models" / "llama")
    before = _files(tmp_path / "models" / "llama")
    for target in (model_dir, tmp_path / "models"):
        with pytest.raises(ValueError, match=r"directory the model was loaded from"):
            lowbit.oneshot(model_dir, w4_group_modifier(), output_dir=target, overwrite=True)
        # a model object loaded from there knows its directory too
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        with pytest.raises(ValueError, match=r"directory the model was loaded from"):
            lowbit.oneshot(model, w4_group_modifier(), output_dir=target, overwrite=True)
        with pytest.raises(ValueError, match=r"directory the model was loaded from"):
            lowbit.save_compressed(model, target, overwrite=True)
    assert _files(tmp_path / "models" / "llama") == before


def test_overwrite_replaces_only_checkpoints(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "thesis.tex").write_text("years of work")
    model = _quantized()
    with pytest.raises(ValueError, match=r"not empty; pass overwrite=True"):
        lowbit.save_compressed(model, data)
    with pytest.raises(ValueError, match=r"holds no checkpoint \(no config.json"):
        lowbit.save_compressed(model, data, overwrite=True)
    assert os.listdir(data) == ["thesis.tex"]
    # an empty directory, and a checkpoint with overwrite=True, are replaced
    (tmp_path / "empty").mkdir()
    lowbit.save_compressed(model, tmp_path / "empty")
    lowbit.save_compressed(_quantized(seed=1), tmp_path / "empty", overwrite=True)
    assert torch.equal(logits(lowbit.load(tmp_path / "empty"), IDS), logits(_quantized(seed=1), IDS))
    assert sorted(os.listdir(tmp_path)) == ["data", "empty"]  # no temporary directory left


def test_refuses_a_symlink_and_a_file(tmp_path):
    model = _quantized()
    lowbit.save_compressed(model, tmp_path / "real")
    os.symlink(tmp_path / "real", tmp_path / "link")
    with pytest.raises(ValueError, match=r"symbolic link"):
        lowbit.save_compressed(model, tmp_path / "link", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"exists and is not a directory"):
        lowbit.save_compressed(model, tmp_path / "file", overwrite=True)
    with pytest.raises(TypeError, match=r"output_dir must be a path"):
        lowbit.save_compressed(model, 3)


# ---------------------------------------------------------------- replacing atomically

def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_stale_temp_dirs_are_cleaned_or_restored(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / f".lowbit-{dead}-abc_1234").mkdir()
    (tmp_path / f".lowbit-{dead}-abc_1234" / "model.safetensors").write_bytes(b"partial")
    (tmp_path / f".lowbit-{alive}-xyz98765").mkdir()  # a save still running in another process
    (tmp_path / ".lowbit-notes").mkdir()  # not lowbit's naming: never touched
    # an old checkpoint moved aside by a save killed before it put the new one in place
    lowbit.save_compressed(_quantized(), tmp_path / f".lowbit-{dead}-old-previous")
    lowbit.save_compressed(_quantized(seed=1), tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == sorted([f".lowbit-{alive}-xyz98765", ".lowbit-notes", "new", "previous"])
    assert torch.equal(logits(lowbit.load(tmp_path / "previous"), IDS), logits(_quantized(), IDS))


@pytest.mark.parametrize("exchange", ["renameat2", "rename-aside"])
def test_overwrite_swaps_in_the_new_checkpoint(tmp_path, monkeypatch, exchange):
    if exchange == "rename-aside":  # file systems without RENAME_EXCHANGE
        monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    lowbit.save_compressed(_quantized(seed=0), tmp_path / "ckpt")
    lowbit.save_compressed(_quantized(seed=1), tmp_path / "ckpt", overwrite=True)
    assert torch.equal(logits(lowbit.load(tmp_path / "ckpt"), IDS), logits(_quantized(seed=1), IDS))
    assert os.listdir(tmp_path) == ["ckpt"]


def test_failed_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    lowbit.save_compressed(_quantized(seed=0), tmp_path / "ckpt")
    before = _files(tmp_path / "ckpt")

    def disk_full(state, directory, *args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        lowbit.save_compressed(_quantized(seed=1), tmp_path / "ckpt", overwrite=True)
    assert _files(tmp_path / "ckpt") == before
    assert os.listdir(tmp_path) == ["ckpt"]


def _forked_save(model, target, overwrite: bool, kill_after: float = None) -> float:
    """Save `model` to `target` in a forked process, killed with SIGKILL after `kill_after`
    seconds (None: let it finish); returns the seconds from fork to its end."""
    t0 = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # the child only writes files: no thread pool is needed
        try:
            lowbit.save_compressed(model, target, overwrite=overwrite)
        finally:
            os._exit(0)
    if kill_after is not None:
        time.sleep(kill_after)
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return time.perf_counter() - t0


def _kill_test_model(seed: int):
    """Large enough (about 20 MB of safetensors) that a save takes tens of milliseconds."""
    from transformers import AutoModelForCausalLM

    from tiny_models import make_config

    config = make_config("llama")
    config.update(dict(hidden_size=512, intermediate_size=1024, vocab_size=4096))
    torch.manual_seed(seed)
    return lowbit.oneshot(AutoModelForCausalLM.from_config(config).eval(), w4_group_modifier(bits=8))


@pytest.mark.parametrize("existing", [False, True], ids=["first-save", "overwrite"])
def test_kill_9_during_save_never_loses_a_checkpoint(tmp_path, existing):
    """20 kill points spread over a save (and past its end): the target is always absent
    (first save) or a complete checkpoint, old or new; the next save cleans up."""
    import shutil

    old, new = _kill_test_model(0), _kill_test_model(1)
    ids = torch.randint(0, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = {"old": logits(old, ids), "new": logits(new, ids)}
    target = tmp_path / "ckpt"
    duration = min(_forked_save(new, tmp_path / f"timing{i}", False) for i in range(2))
    outcomes = []
    for i in range(20):
        shutil.rmtree(target, ignore_errors=True)
        if existing:
            lowbit.save_compressed(old, target)
        _forked_save(new, target, overwrite=existing, kill_after=duration * i / 16)
        if not os.path.exists(target):
            assert not existing, f"kill point {i}: the old checkpoint was lost"
            outcomes.append("absent")
            continue
        got = logits(lowbit.load(target), ids)  # complete and loadable
        outcome = next((k for k, v in expected.items() if torch.equal(got, v)), None)
        assert outcome == "new" or (existing and outcome == "old"), f"kill point {i}: {outcome}"
        outcomes.append(outcome)
    files.remove_stale_temp_dirs(str(tmp_path))
    assert sorted(set(os.listdir(tmp_path)) - {"ckpt"}) == ["timing0", "timing1"]  # no temporary directory left
    print(f"kill -9 outcomes ({duration * 1e3:.0f} ms save): {outcomes}")
    # the kill points covered both sides of the swap
    assert outcomes.count("new") >= 2 and outcomes.count("old" if existing else "absent") >= 2, outcomes


# ---------------------------------------------------------------- checkpoints that disagree with config.json

@pytest.fixture
def w4_dir(tmp_path):
    """A pack-quantized asymmetric W4 checkpoint with g_idx (GPTQ actorder 'group')."""
    model = make_model("llama")
    recipe = lowbit.GPTQModifier(targets="Linear", ignore=["lm_head"], actorder="group",
                                 config_groups={"group_0": {"targets": ["Linear"], "weights": {
                                     "num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32,
                                     "actorder": "group"}}})
    lowbit.oneshot(model, recipe, dataset=fixed_ids(4, 32), output_dir=tmp_path / "w4")
    return tmp_path / "w4"


def _rewrite(directory, change) -> None:
    path = directory / "model.safetensors"
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def _edit_config(directory, change) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


KEY = "model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize("change,match", [
    (lambda s: s.update({f"{KEY}.weight_scale": s[f"{KEY}.weight_scale"].to(torch.int32)}),
     rf"'{KEY}.weight_scale' is stored as torch.int32, expected a float dtype"),
    (lambda s: s.update({f"{KEY}.weight_packed": s[f"{KEY}.weight_packed"].float()}),
     rf"'{KEY}.weight_packed' is stored as torch.float32, expected torch.int32"),
    (lambda s: s.update({f"{KEY}.weight_packed": s[f"{KEY}.weight_packed"].view(torch.float32),
                         f"{KEY}.weight_scale": s[f"{KEY}.weight_scale"].view(torch.int32)}),
     rf"'{KEY}.weight_packed' is stored as torch.float32"),
    (lambda s: s[f"{KEY}.weight_g_idx"].__setitem__(0, -1), rf"{KEY}.*g_idx"),
    (lambda s: s[f"{KEY}.weight_g_idx"].__setitem__(5, 1000), rf"{KEY}.*g_idx"),
    (lambda s: s.update({f"{KEY}.weight_shape": torch.tensor([64, 32])}), rf"{KEY}.weight_shape is \[64, 32\]"),
    (lambda s: s.update({f"{KEY}.weight_zero_point": s[f"{KEY}.weight_zero_point"][:, :1].contiguous()}),
     rf"{KEY}.weight_zero_point"),
    (lambda s: s.update({f"{KEY}.weight_scale": s[f"{KEY}.weight_scale"].t().contiguous()}),
     rf"'{KEY}.weight_scale' has shape"),
    (lambda s: s.pop(f"{KEY}.weight_scale"), rf"'{KEY}.weight_scale' is missing"),
    (lambda s: s.update({"model.layers.0.extra.weight": torch.zeros(3)}), r"'model.layers.0.extra.weight'.*no place"),
    (lambda s: s[f"{KEY}.weight_scale"].__setitem__((0, 0), float("nan")), rf"{KEY}.*scale"),
    (lambda s: s[f"{KEY}.weight_scale"].__setitem__((0, 0), 0.0), rf"{KEY}.*scale"),
])
def test_tampered_compressed_tensors_checkpoint(w4_dir, change, match):
    lowbit.load(w4_dir)  # loads before tampering
    _rewrite(w4_dir, change)
    with pytest.raises(ValueError, match=match):
        lowbit.load(w4_dir)


@pytest.mark.parametrize("change", [
    lambda c: c.pop("quantization_config"),
    lambda c: c.update(quantization_config=None),
], ids=["missing", "null"])
def test_quantized_files_without_quantization_config(w4_dir, change):
    _edit_config(w4_dir, change)
    with pytest.raises(ValueError, match=r"weight_g_idx'.*quantized tensors, but config.json has no quantization_config"):
        lowbit.load(w4_dir)


@pytest.mark.parametrize("value,exc,match", [
    ([1, 2], TypeError, r"quantization_config must be an object \(or absent\), got list"),
    ("compressed-tensors", TypeError, r"got str"),
    (3, TypeError, r"got int"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": []}, ValueError,
     r"config_groups must be a non-empty object"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": None}}}, ValueError,
     r"config_groups.group_0.weights must be an object"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"]}}}, ValueError, r"config_groups.group_0.weights"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"targets": [3], "weights": {"num_bits": 4}}}}, ValueError,
     r"targets must be a list of module names"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": "4"}}}}, ValueError,
     r"group_0: num_bits must be an integer"),
])
def test_malformed_quantization_config(w4_dir, value, exc, match):
    _edit_config(w4_dir, lambda c: c.update(quantization_config=value))
    with pytest.raises(exc, match=match):
        lowbit.load(w4_dir)


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_config_dtype_must_be_a_float_dtype(w4_dir, key):
    _edit_config(w4_dir, lambda c: c.update({key: "load"}))
    with pytest.raises(ValueError, match=rf"'{key}' must be float32, float16, bfloat16 or 'auto', got 'load'"):
        lowbit.load(w4_dir)


def test_config_json_not_json(w4_dir):
    (w4_dir / "config.json").write_text("{" * 100000)
    with pytest.raises(ValueError, match=r"config.json is not valid JSON"):
        lowbit.load(w4_dir)


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "w4"])
@pytest.mark.parametrize("change,match", [
    (lambda c: c.update(vocab_size=2_000_000, hidden_size=1024),
     r"'lm_head.weight' has shape \(256, 64\) in the files, but config.json makes it \(2000000, 1024\)"
     r"|weight_shape is \[64, 64\] \(torch.int64\), but the model's Linear is \[64, 1024\]"),
    (lambda c: c.update(num_hidden_layers=100_000), r"declares 100000 decoder layers"),
    (lambda c: c.update(intermediate_size=1 << 24), r"mlp.*(has shape|Linear is \[16777216, 64\])"),
])
def test_loading_is_bounded_by_the_files(tmp_path, w4_dir, quantized, change, match):
    directory = w4_dir if quantized else Path(save_float("llama", tmp_path / "float"))
    _edit_config(directory, change)
    rss = _peak_rss_mib()
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=match):
        lowbit.load(directory)
    assert time.perf_counter() - t0 < 30
    assert _peak_rss_mib() - rss < 1024  # nothing of the declared size (8 GB and more) was allocated


def test_float_checkpoint_missing_a_tensor(tmp_path):
    directory = Path(save_float("llama", tmp_path / "float"))
    _rewrite(directory, lambda s: s.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.down_proj.weight' is missing from the files"):
        lowbit.load(directory)


def _shard(directory) -> None:
    """Split model.safetensors into two shards with an index, as transformers writes them."""
    state = load_file(directory / "model.safetensors")
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, directory / name, metadata={"format": "pt"})
    (directory / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def _edit_index(directory, change) -> None:
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index)
    path.write_text(json.dumps(index))


def test_sharded_checkpoint_loads(w4_dir):
    expected = logits(lowbit.load(w4_dir), IDS)
    _shard(w4_dir)
    assert torch.equal(logits(lowbit.load(w4_dir), IDS), expected)


@pytest.mark.parametrize("change,match", [
    (lambda d: (d / "model.safetensors.index.json").write_text("{not json"), r"index.json is not valid JSON"),
    (lambda d: (d / "model.safetensors.index.json").write_text("[]"), r"needs a non-empty 'weight_map'"),
    (lambda d: (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": 3}}'), r"needs a non-empty"),
    (lambda d: (d / "model.safetensors.index.json").write_text("[" * 100000 + "]" * 100000), r"not valid JSON"),
    (lambda d: _edit_index(d, lambda i: i["weight_map"].update({"lm_head.weight": "../../etc/passwd"})),
     r"resolves to .* outside the checkpoint directory"),
    (lambda d: _edit_index(d, lambda i: i["weight_map"].update({"lm_head.weight": "/etc/hostname"})),
     r"outside the checkpoint directory"),
    (lambda d: _edit_index(d, lambda i: i["weight_map"].update({"lm_head.weight": "missing.safetensors"})),
     r"names 'missing.safetensors', which does not exist"),
    (lambda d: _edit_index(d, lambda i: i["weight_map"].update({"not.a.tensor": "model-00001-of-00002.safetensors"})),
     r"lists 'not.a.tensor', which no safetensors file holds"),
    (lambda d: _edit_index(d, lambda i: i["weight_map"].pop("lm_head.weight")),
     r"'lm_head.weight' is in .*, but model.safetensors.index.json places it in None"),
])
def test_malformed_index(w4_dir, change, match):
    _shard(w4_dir)
    change(w4_dir)
    with pytest.raises(ValueError, match=match):
        lowbit.load(w4_dir)


def test_symlinks_must_stay_inside(tmp_path, w4_dir):
    outside = tmp_path / "outside.safetensors"
    os.rename(w4_dir / "model.safetensors", outside)
    os.symlink(outside, w4_dir / "model.safetensors")
    with pytest.raises(ValueError, match=r"outside the checkpoint directory"):
        lowbit.load(w4_dir)
    os.unlink(w4_dir / "model.safetensors")
    os.rename(outside, w4_dir / "weights.bin")
    os.symlink("weights.bin", w4_dir / "model.safetensors")  # a link inside the directory is fine
    lowbit.load(w4_dir)


def test_deeply_nested_bitsandbytes_quant_state(tmp_path):
    model = lowbit.oneshot(make_model("llama"), "NF4", output_dir=tmp_path / "nf4")
    key = f"{KEY}.weight.quant_state.bitsandbytes__nf4"
    nested = ("[" * 100000 + "]" * 100000).encode()
    _rewrite(tmp_path / "nf4", lambda s: s.update({key: torch.frombuffer(bytearray(nested), dtype=torch.uint8)}))
    with pytest.raises(ValueError, match=r"quant state is not valid JSON \(RecursionError"):
        lowbit.load(tmp_path / "nf4")
    del model


def test_header_dtypes_are_read_without_loading(w4_dir):
    headers = files.read_headers(str(w4_dir))
    with safe_open(w4_dir / "model.safetensors", framework="pt") as f:
        assert sorted(headers) == sorted(f.keys())
    assert headers[f"{KEY}.weight_packed"].dtype == torch.int32
    assert headers[f"{KEY}.weight_packed"].device.type == "meta"


# ---------------------------------------------------------------- recipes and data that make no sense

@pytest.mark.parametrize("recipe,match", [
    (lambda: lowbit.QuantizationModifier(scheme="W8A16", ignore=["re:.*"]),
     r"quantizes no layer of LlamaForCausalLM: QuantizationModifier\(targets=\['Linear'\], ignore=\['re:\.\*'\]\)"),
    (lambda: lowbit.QuantizationModifier(scheme="W8A16", targets=["lm_head"], ignore=["lm_head"]),
     r"quantizes no layer"),
])
def test_recipe_that_quantizes_nothing(tmp_path, recipe, match):
    with pytest.raises(ValueError, match=match):
        lowbit.oneshot(make_model("llama"), recipe(), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make,exc,match", [
    (lambda: lowbit.QuantizationModifier(config_groups={}), ValueError, r"config_groups is empty"),
    (lambda: lowbit.QuantizationModifier(config_groups=["group_0"]), TypeError, r"config_groups must be a dict"),
    (lambda: lowbit.QuantizationModifier(config_groups="W4A16"), TypeError, r"config_groups must be a dict"),
    (lambda: lowbit.QuantizationModifier(config_groups={"g": {"targets": ["Linear"], "weights": None}}), ValueError,
     r"config_groups\['g'\] needs 'targets' and a 'weights' dict"),
    (lambda: lowbit.QuantizationModifier(config_groups={"g": {"targets": ["Linear"]}}), ValueError,
     r"needs 'targets' and a 'weights' dict"),
    (lambda: lowbit.QuantizationModifier(config_groups={"g": {"targets": [1], "weights": {"num_bits": 4}}}),
     TypeError, r"config_groups\['g'\]\['targets'\] must be a string or a list of strings"),
    (lambda: lowbit.QuantizationModifier(scheme="W4A16", targets=3), TypeError, r"targets must be a string or a list"),
    (lambda: lowbit.QuantizationModifier(scheme="W4A16", ignore=[None]), TypeError, r"ignore must be a string or a list"),
    (lambda: lowbit.QuantizationModifier(scheme={}), ValueError, r"scheme is an empty dict"),
    (lambda: lowbit.QuantizationModifier(scheme={"weights": None}), ValueError, r"needs a 'weights' entry"),
    (lambda: lowbit.QuantizationModifier(config_groups={"g": {"weights": {"num_bits": 4, "symmetric": "yes"}}}),
     TypeError, r"symmetric must be true or false"),
])
def test_malformed_modifier_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


@pytest.mark.parametrize("value,exc", [(1.5, TypeError), ("2", TypeError), (True, TypeError), (0, ValueError),
                                       (-3, ValueError), (None, TypeError)])
def test_num_calibration_samples_must_be_a_positive_int(value, exc):
    with pytest.raises(exc, match=r"num_calibration_samples must be"):
        lowbit.oneshot(make_model("llama"), w4_group_modifier(), dataset=fixed_ids(2, 8), num_calibration_samples=value)


@pytest.mark.parametrize("bad", [-1, 256, 10**6])
def test_token_ids_outside_the_vocabulary(bad):
    ids = fixed_ids(2, 8)
    ids[1, 3] = bad
    with pytest.raises(ValueError, match=rf"sample \d holds token id {bad}, outside the model's vocabulary \[0, 256\)"):
        lowbit.oneshot(make_model("llama"), w4_group_modifier(), dataset=ids, shuffle=False)


@pytest.mark.parametrize("text,match", [
    ("stage:\n  quant_modifiers:\n    QuantizationModifier: [W4A16]\n", r"QuantizationModifier must map argument names"),
    ("stage:\n  1: {}\n  quant_modifiers: {QuantizationModifier: {scheme: W4A16, targets: 3}}\n",
     r"targets must be a string or a list"),
    ("stage: {quant_modifiers: {QuantizationModifier: {scheme: W4A16}}\n", r"not valid YAML"),
])
def test_malformed_yaml_recipes(text, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lowbit.oneshot(make_model("llama"), text)
