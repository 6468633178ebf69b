"""A streamed oneshot (stream_weights=True: a checkpoint directory quantized one decoder layer at a
time) writes byte for byte the checkpoint the in-memory oneshot writes, for every modifier
and output format; it never holds two decoder layers' weights; it refuses what it cannot do
before any work and leaves nothing behind when it fails. The safetensors writer it uses
gives save_file's bytes."""

from __future__ import annotations

import filecmp
import importlib
import json
import os

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save, save_file

import lowbit
from lowbit.formats import files
from lowbit.pipeline import streaming
from tiny_models import TEXTS, make_model, make_tokenizer

RECIPES = {
    "rtn_w4a16": lambda: "W4A16",
    "gptq_w4a16": lambda: lowbit.GPTQModifier(scheme="W4A16", ignore=["lm_head"]),
    "awq": lambda: [lowbit.AWQModifier(), lowbit.QuantizationModifier(scheme="W4A16_ASYM", ignore=["lm_head"])],
    "smoothquant_w8a8": lambda: [lowbit.SmoothQuantModifier(smoothing_strength=0.8),
                                 lowbit.GPTQModifier(scheme="W8A8", ignore=["lm_head"])],
    "nf4": lambda: "NF4",
    "llm_int8": lambda: "INT8_OUTLIER",
    "fp8": lambda: "FP8",
    "lm_head_w8a16": lambda: lowbit.QuantizationModifier(scheme="W8A16"),
}


def _source(tmp_path, arch="llama_h128", dtype=torch.bfloat16, shard=None):
    path = tmp_path / "src"
    make_model(arch).to(dtype).save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    make_tokenizer().save_pretrained(path)
    return str(path)


def _same_directories(a, b, modes: bool = True):
    """The same files, byte for byte (and, for checkpoints lowbit wrote, the same permissions)."""
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b))
    differ = [n for n in names if not filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False)]
    assert not differ, differ
    if modes:
        found = {n: (os.stat(os.path.join(a, n)).st_mode, os.stat(os.path.join(b, n)).st_mode) for n in names}
        assert all(x == y for x, y in found.values()), found


def _both(src, tmp_path, recipe, **kwargs):
    out = {}
    for streamed in (False, True):
        out[streamed] = str(tmp_path / f"out-{streamed}")
        lowbit.oneshot(src, RECIPES[recipe](), dataset=TEXTS, max_seq_length=48, output_dir=out[streamed],
                       stream_weights=streamed, **kwargs)
    return out[False], out[True]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_streamed_bytes_equal_in_memory(tmp_path, recipe):
    _same_directories(*_both(_source(tmp_path), tmp_path, recipe))


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float32), ("qwen2", torch.float16), ("phi", torch.bfloat16),
                                        ("opt", torch.float32), ("gpt2", torch.float32)])
def test_streamed_bytes_equal_in_memory_per_architecture(tmp_path, arch, dtype):
    src = _source(tmp_path, arch, dtype, shard="40KB")  # a sharded source: layers read across files
    outs = []
    for streamed in (False, True):
        outs.append(str(tmp_path / f"out-{streamed}"))
        groups = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                            "strategy": "group", "group_size": 32}}}
        # GPT-2's Conv1D layers take RTN (GPTQ quantizes nn.Linear only)
        modifier = lowbit.QuantizationModifier if arch == "gpt2" else lowbit.GPTQModifier
        lowbit.oneshot(src, modifier(config_groups=groups, ignore=["lm_head"]), dataset=TEXTS, max_seq_length=48,
                       output_dir=outs[-1], stream_weights=streamed)
    _same_directories(*outs)


@pytest.mark.parametrize("options", [dict(save_compressed=False), dict(activations="disk"), dict(pipeline="datafree")])
def test_streamed_bytes_equal_in_memory_with_options(tmp_path, options):
    if options.get("pipeline") == "datafree":
        outs = []
        for streamed in (False, True):
            outs.append(str(tmp_path / f"out-{streamed}"))
            lowbit.oneshot(_source(tmp_path) if not streamed else str(tmp_path / "src"), "W4A16",
                           output_dir=outs[-1], stream_weights=streamed, **options)
        _same_directories(*outs)
        return
    _same_directories(*_both(_source(tmp_path), tmp_path, "gptq_w4a16", **options))


def test_streamed_result_loads_and_matches(tmp_path):
    mem, streamed = _both(_source(tmp_path), tmp_path, "gptq_w4a16")
    ids = torch.randint(4, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = lowbit.load(mem)(input_ids=ids).logits, lowbit.load(streamed)(input_ids=ids).logits
    assert torch.equal(a, b)


def test_one_decoder_layer_in_memory_at_a_time(tmp_path, monkeypatch):
    """At every read, at most one decoder layer holds real weights (the next is read only
    after the previous one was spilled and freed)."""
    src = _source(tmp_path)
    seen = []
    load = streaming.StreamedCheckpoint.load

    def counting(self, prefixes, exclude=()):
        load(self, prefixes, exclude)
        layers = self.model.model.layers
        seen.append(sum(any(p.device.type != "meta" for p in layer.parameters()) for layer in layers))

    monkeypatch.setattr(streaming.StreamedCheckpoint, "load", counting)
    model = lowbit.oneshot(src, RECIPES["gptq_w4a16"](), dataset=TEXTS, max_seq_length=48,
                           output_dir=str(tmp_path / "out"), stream_weights=True)
    assert seen and max(seen) == 1
    assert all(t.device.type == "meta" for t in model.state_dict().values())  # the skeleton is returned


def test_auto_streams_when_the_model_would_not_fit(tmp_path, monkeypatch, caplog):
    src = _source(tmp_path)
    monkeypatch.setattr(streaming, "available_memory", lambda: 1000)
    with caplog.at_level("INFO", logger="lowbit"):
        model = lowbit.oneshot(src, "W4A16", output_dir=str(tmp_path / "out"), pipeline="datafree")
    assert "streaming" in caplog.text
    assert all(t.device.type == "meta" for t in model.state_dict().values())
    caplog.clear()
    monkeypatch.setattr(streaming, "available_memory", lambda: 1 << 40)
    with caplog.at_level("INFO", logger="lowbit"):
        model = lowbit.oneshot(src, "W4A16", output_dir=str(tmp_path / "out2"), pipeline="datafree")
    assert "streaming" not in caplog.text
    assert all(t.device.type == "cpu" for t in model.state_dict().values())


@pytest.mark.parametrize("case,match", [
    ("loaded model", "pass the directory's path"),
    ("no output_dir", "pass output_dir"),
    ("gguf", "save_format='gguf'"),
    ("untied", "tie_word_embeddings=False"),
    ("mixed precision", "stream_weights=False"),
    ("bad value", "stream_weights must be"),
])
def test_refusals(tmp_path, case, match):
    src = _source(tmp_path)
    kwargs = dict(output_dir=str(tmp_path / "out"), stream_weights=True, dataset=TEXTS, max_seq_length=48)
    model, recipe = src, "W4A16"
    if case == "loaded model":
        model = make_model("llama_h128")
    elif case == "no output_dir":
        kwargs.pop("output_dir")
    elif case == "gguf":
        kwargs.update(save_format="gguf", gguf_type="Q8_0")
    elif case == "untied":
        kwargs.update(tie_word_embeddings=False)
    elif case == "mixed precision":
        recipe = lowbit.MixedPrecision(budget=6, options=["W4A16", "W8A16"])
    elif case == "bad value":
        kwargs.update(stream_weights="yes")
    with pytest.raises(ValueError, match=match):
        lowbit.oneshot(model, recipe, **kwargs)
    assert not os.path.exists(tmp_path / "out")
    assert [n for n in os.listdir(tmp_path) if n.startswith(files.TEMP_PREFIX)] == []


@pytest.mark.parametrize("change,match", [
    ("drop a shard", "does not exist"),
    ("index names a tensor no shard holds", "which no safetensors file holds"),
    ("index misplaces a tensor", "places it in"),
    ("truncated shard", "not a readable safetensors file"),
    ("config has more layers", "declares 3 decoder layers"),
    ("already quantized", "already quantized"),
    ("not a directory", "not a local directory"),
])
def test_bad_checkpoints_are_refused_with_nothing_written(tmp_path, change, match):
    src = _source(tmp_path, shard="40KB")
    index_file = os.path.join(src, files.INDEX_FILE)
    with open(index_file) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    if change == "drop a shard":
        os.remove(os.path.join(src, shards[-1]))
    elif change == "index names a tensor no shard holds":
        index["weight_map"]["model.layers.0.extra.weight"] = shards[0]
    elif change == "index misplaces a tensor":  # two tensors of different shards swap places
        first = next(k for k, v in index["weight_map"].items() if v == shards[0])
        second = next(k for k, v in index["weight_map"].items() if v == shards[1])
        index["weight_map"][first], index["weight_map"][second] = shards[1], shards[0]
    elif change == "truncated shard":
        path = os.path.join(src, shards[-1])
        os.truncate(path, os.path.getsize(path) - 64)
    elif change in ("config has more layers", "already quantized"):
        with open(os.path.join(src, "config.json")) as f:
            config = json.load(f)
        if change == "config has more layers":
            config["num_hidden_layers"] = 3
        else:
            config["quantization_config"] = {"quant_method": "compressed-tensors"}
        with open(os.path.join(src, "config.json"), "w") as f:
            json.dump(config, f)
    elif change == "not a directory":
        src = os.path.join(src, "nowhere")
    with open(index_file, "w") as f:
        json.dump(index, f)
    with pytest.raises(ValueError, match=match):
        lowbit.oneshot(src, "W4A16", output_dir=str(tmp_path / "out"), stream_weights=True, pipeline="datafree")
    assert not os.path.exists(tmp_path / "out")
    assert [n for n in os.listdir(tmp_path) if n.startswith(files.TEMP_PREFIX)] == []


@pytest.mark.parametrize("streamed", [True, False])
def test_not_enough_disk_is_refused_up_front(tmp_path, monkeypatch, streamed):
    src = _source(tmp_path)
    real = streaming.shutil.disk_usage
    monkeypatch.setattr(streaming.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    called = []
    monkeypatch.setattr(importlib.import_module("lowbit.pipeline.oneshot"), "_calibrate_and_quantize",
                        lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match=r"needs about .* GiB free beside output_dir"):
        lowbit.oneshot(src, "W4A16", dataset=TEXTS, output_dir=str(tmp_path / "out"), stream_weights=streamed)
    assert not called  # refused before any layer was calibrated
    assert not os.path.exists(tmp_path / "out")
    assert [n for n in os.listdir(tmp_path) if n.startswith(files.TEMP_PREFIX)] == []


def test_a_failure_mid_run_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    src = _source(tmp_path)
    out = str(tmp_path / "out")
    lowbit.oneshot(src, "W4A16", output_dir=out, stream_weights=True, pipeline="datafree")
    before = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    calls = []
    pipeline = importlib.import_module("lowbit.pipeline.oneshot")
    end = pipeline._LayerStream.end

    def failing(self, i, names):
        calls.append(i)
        if i == 1:
            raise RuntimeError("disk on fire")
        end(self, i, names)

    monkeypatch.setattr(pipeline._LayerStream, "end", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        lowbit.oneshot(src, "NF4", output_dir=out, stream_weights=True, pipeline="datafree", overwrite=True)
    assert calls == [0, 1]
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(files.TEMP_PREFIX)] == []


# ---------------------------------------------------------------- the streaming safetensors writer

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int8, torch.uint8, torch.int64,
           torch.float64, torch.int16, torch.bool, torch.float8_e4m3fn]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9_.]{0,12}", fullmatch=True),
                       st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), max_size=3)),
                       min_size=1, max_size=8))
def test_header_is_save_files(spec):
    tensors = {k: torch.zeros(shape, dtype=dtype) for k, (dtype, shape) in spec.items()}
    header, _ = files.safetensors_header(tensors)
    assert save(tensors, metadata=files.SAFETENSORS_METADATA)[:len(header)] == header


@pytest.mark.parametrize("max_shard_size", ["5GB", "2KB"])
def test_spill_writes_write_safetensors_bytes(tmp_path, max_shard_size):
    g = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.{kind}": torch.randn(17, 23, generator=g).to(dtype)
             for i in range(12) for kind, dtype in [("w", torch.bfloat16), ("s", torch.float32)]}
    state["codes"] = torch.randint(0, 255, (300,), dtype=torch.uint8, generator=g)
    direct, spilled = tmp_path / "direct", tmp_path / "spilled"
    direct.mkdir(), spilled.mkdir()
    files.write_safetensors(state, str(direct), max_shard_size)
    spill = files.TensorSpill(str(tmp_path))
    for key in reversed(list(state)):  # any order of production
        spill.put(key, state[key])
    spill.write_safetensors(str(spilled), max_shard_size)
    spill.close()
    assert not os.path.exists(spill.path)
    _same_directories(direct, spilled, modes=False)  # written here, not by a lowbit save
    assert (files.INDEX_FILE in os.listdir(direct)) == (max_shard_size == "2KB")
    save_file(state, str(tmp_path / "one.safetensors"), metadata=files.SAFETENSORS_METADATA)
    if max_shard_size == "5GB":
        assert filecmp.cmp(tmp_path / "one.safetensors", direct / files.SINGLE_FILE, shallow=False)


def test_generation_config_made_as_from_pretrained_makes_it(tmp_path):
    """A checkpoint without generation_config.json: both paths derive it from config.json."""
    src = _source(tmp_path)
    os.remove(os.path.join(src, "generation_config.json"))
    outs = []
    for streamed in (False, True):
        outs.append(str(tmp_path / f"out-{streamed}"))
        lowbit.oneshot(src, "W4A16", pipeline="datafree", output_dir=outs[-1], stream_weights=streamed)
    _same_directories(*outs)


def test_cli_streams_on_request(tmp_path):
    from lowbit import cli

    src = _source(tmp_path)
    cli.main(["quantize", "--model", src, "--recipe", "W4A16", "--output", str(tmp_path / "streamed"),
              "--stream-weights", "on"])
    cli.main(["quantize", "--model", src, "--recipe", "W4A16", "--output", str(tmp_path / "memory"),
              "--stream-weights", "off"])
    _same_directories(tmp_path / "streamed", tmp_path / "memory")
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path / "streamed"):  # ordinary files, not safetensors' private 0600
        assert os.stat(tmp_path / "streamed" / name).st_mode & 0o777 == 0o666 & ~umask, name


@settings(max_examples=12, deadline=None)
@given(hidden=st.sampled_from([32, 64, 96]), layers=st.integers(1, 3), tie=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), shard=st.sampled_from([None, "24KB"]),
       recipe=st.sampled_from(["rtn_g32", "gptq_g32", "NF4", "W8A8", "INT8_OUTLIER"]))
def test_property_streamed_equals_in_memory(tmp_path_factory, hidden, layers, tie, dtype, shard, recipe):
    """Any small Llama (width, depth, tied or not, dtype, sharded or not) and recipe: the streamed
    checkpoint is the in-memory one, byte for byte."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("prop")
    config = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 32, num_key_value_heads=1, tie_word_embeddings=tie,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(hidden * 10 + layers)
    LlamaForCausalLM(config).to(dtype).save_pretrained(tmp / "src", **({"max_shard_size": shard} if shard else {}))
    make_tokenizer().save_pretrained(tmp / "src")
    groups = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True,
                                                        "strategy": "group", "group_size": 32}}}
    recipes = {"rtn_g32": lambda: lowbit.QuantizationModifier(config_groups=groups),
               "gptq_g32": lambda: lowbit.GPTQModifier(config_groups=groups, ignore=["lm_head"])}
    outs = []
    for streamed in (False, True):
        outs.append(tmp / f"out-{streamed}")
        lowbit.oneshot(str(tmp / "src"), recipes.get(recipe, lambda: recipe)(), dataset=TEXTS, max_seq_length=32,
                       num_calibration_samples=4, output_dir=str(outs[-1]), stream_weights=streamed)
    _same_directories(*outs)
