"""lowbit.oneshot end to end: every calibration dataset form runs (layer-sequentially) and
gives the data-free RTN weights; prepare_calibration honours num_calibration_samples,
max_seq_length, shuffle and seed; targets / ignore follow llmcompressor's grammar; bad
inputs raise a clear exception and leave no output directory behind."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

import lowbit
from lowbit.formats import compressed_state_dict
from lowbit.pipeline import prepare_calibration
from tiny_models import TEXTS, fixed_ids, logits, make_config, make_model, make_tokenizer, rel_err, save_float, \
    w4_group_modifier

# ---------------------------------------------------------------- dataset forms

CHATS = [{"messages": [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]} for t in TEXTS]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _datasets():
    import datasets

    return datasets


DATASET_FORMS = {
    "list-of-strings": lambda tmp: TEXTS,
    "tuple-of-strings": lambda tmp: tuple(TEXTS),
    "hf-dataset-text": lambda tmp: _datasets().Dataset.from_dict({"text": TEXTS, "id": list(range(len(TEXTS)))}),
    "hf-dataset-chat": lambda tmp: _datasets().Dataset.from_list(CHATS),
    # llmcompressor's own examples tokenize the dataset first (map + remove_columns)
    "hf-dataset-pretokenized": lambda tmp: _datasets().Dataset.from_dict(
        {"input_ids": [make_tokenizer()(t)["input_ids"] for t in TEXTS],
         "attention_mask": [make_tokenizer()(t)["attention_mask"] for t in TEXTS]}),
    "list-of-records": lambda tmp: [{"text": t} for t in TEXTS],
    "txt-file": lambda tmp: _write(tmp, "calib.txt", "\n\n".join(TEXTS) + "\n"),
    "jsonl-file": lambda tmp: _write(tmp, "calib.jsonl", "\n".join(json.dumps({"text": t}) for t in TEXTS) + "\n"),
    "json-file": lambda tmp: _write(tmp, "calib.json", json.dumps([{"text": t} for t in TEXTS])),
    "json-file-data-key": lambda tmp: _write(tmp, "calib2.json", json.dumps({"data": [{"text": t} for t in TEXTS]})),
    "dataloader-tensors": lambda tmp: torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(fixed_ids(6, 20)), batch_size=4),
    "dataloader-dicts": lambda tmp: torch.utils.data.DataLoader(
        [{"input_ids": row} for row in fixed_ids(6, 20)], batch_size=3),
    "token-tensor-NxL": lambda tmp: fixed_ids(6, 20),
    "token-tensor-L": lambda tmp: fixed_ids(1, 20)[0],
    "list-of-token-tensors": lambda tmp: list(fixed_ids(3, 20)),
    "dict-input-ids": lambda tmp: {"input_ids": fixed_ids(5, 12)},
}


@pytest.fixture(scope="module")
def rtn_state():
    """The data-free reference: RTN does not depend on calibration data."""
    return compressed_state_dict(lowbit.oneshot(make_model("llama"), w4_group_modifier()))


@pytest.mark.parametrize("form", list(DATASET_FORMS))
def test_dataset_forms_run(tmp_path, caplog, rtn_state, form):
    dataset = DATASET_FORMS[form](tmp_path)
    samples = prepare_calibration(dataset, make_tokenizer(), num_calibration_samples=4, max_seq_length=16)
    assert 1 <= len(samples) <= 4
    for s in samples:
        assert s["input_ids"].dtype == torch.long and s["input_ids"].dim() == 2 and s["input_ids"].shape[0] == 1
        assert 0 < s["input_ids"].shape[1] <= 16
        assert s["attention_mask"].shape == s["input_ids"].shape
    caplog.set_level(logging.INFO, logger="lowbit")
    model = lowbit.oneshot(make_model("llama"), w4_group_modifier(), dataset=dataset, tokenizer=make_tokenizer(),
                           num_calibration_samples=4, max_seq_length=16)
    # the layer-sequential (calibrated) path ran, once per decoder layer, with finite errors
    errors = [r.getMessage() for r in caplog.records if "relative output error" in r.getMessage()]
    assert len(errors) == 2, errors
    state = compressed_state_dict(model)
    assert sorted(state) == sorted(rtn_state)
    for k in state:
        assert torch.equal(state[k], rtn_state[k]), k


def test_chat_messages_use_the_chat_template():
    tok = make_tokenizer()
    samples = prepare_calibration(_datasets().Dataset.from_list(CHATS), tok, shuffle=False)
    rendered = tok.apply_chat_template(CHATS[0]["messages"], tokenize=False)
    assert rendered.startswith("<|user|>")
    assert samples[0]["input_ids"][0].tolist() == tok(rendered)["input_ids"][:384]


def test_chat_messages_need_a_chat_template():
    with pytest.raises(ValueError, match="chat template"):
        prepare_calibration(CHATS, make_tokenizer(chat_template=False))


def test_text_needs_a_tokenizer():
    with pytest.raises(ValueError, match=r"needs a tokenizer: pass tokenizer="):
        lowbit.oneshot(make_model("llama"), w4_group_modifier(), dataset=TEXTS)


def test_text_column(tmp_path):
    ds = _datasets().Dataset.from_dict({"content": TEXTS})
    with pytest.raises(ValueError, match=r"no 'text' column .*'content'.*pass text_column="):
        prepare_calibration(ds, make_tokenizer())
    samples = prepare_calibration(ds, make_tokenizer(), text_column="content", shuffle=False)
    assert samples[0]["input_ids"][0].tolist() == make_tokenizer()(TEXTS[0])["input_ids"]


def test_txt_paragraphs_are_samples(tmp_path):
    path = _write(tmp_path, "c.txt", "first paragraph\nstill first\n\n\nsecond\n\nthird\n")
    samples = prepare_calibration(path, make_tokenizer(), shuffle=False)
    tok = make_tokenizer()
    assert [s["input_ids"][0].tolist() for s in samples] == \
        [tok(t)["input_ids"] for t in ("first paragraph\nstill first", "second", "third")]


@pytest.mark.parametrize("n", [1, 3, 8, 100])
def test_num_calibration_samples(n):
    tok = make_tokenizer()
    assert len(prepare_calibration(TEXTS, tok, num_calibration_samples=n)) == min(n, len(TEXTS))
    assert len(prepare_calibration(fixed_ids(10, 8), num_calibration_samples=n)) == min(n, 10)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(fixed_ids(10, 8)), batch_size=4)
    assert len(prepare_calibration(loader, num_calibration_samples=n)) == min(n, 10)


def test_num_calibration_samples_through_oneshot(monkeypatch):
    """oneshot passes num_calibration_samples / max_seq_length on, and runs that many samples."""
    import importlib

    oneshot_mod = importlib.import_module("lowbit.pipeline.oneshot")  # the module, not the function

    seen = {}
    real = oneshot_mod.capture_first_layer_inputs

    def spy(model, layers, samples):
        seen["samples"] = samples
        return real(model, layers, samples)

    monkeypatch.setattr(oneshot_mod, "capture_first_layer_inputs", spy)
    lowbit.oneshot(make_model("llama"), w4_group_modifier(), dataset=TEXTS, tokenizer=make_tokenizer(),
                   num_calibration_samples=3, max_seq_length=10)
    assert len(seen["samples"]) == 3
    assert all(s["input_ids"].shape[1] == 10 for s in seen["samples"])  # every text is longer than 10


def test_num_calibration_samples_skips_empty_texts():
    """Empty texts are skipped, but they must not eat into num_calibration_samples: with
    enough non-empty texts, exactly that many samples come back (wikitext-style data has
    many blank lines)."""
    tok = make_tokenizer()
    samples = prepare_calibration([""] * 6 + TEXTS, tok, shuffle=False, num_calibration_samples=4)
    assert [s["input_ids"][0].tolist() for s in samples] == [tok(t)["input_ids"] for t in TEXTS[:4]]
    samples = prepare_calibration(["", "", "", "", "hello"], tok, shuffle=False, num_calibration_samples=1)
    assert [s["input_ids"][0].tolist() for s in samples] == [tok("hello")["input_ids"]]


def test_dataset_dict_is_not_read_as_split_names():
    """datasets.load_dataset without split= returns a DatasetDict; its split names must not
    become the calibration text. Either its train split is used, or a clear error asks for
    a split."""
    tok = make_tokenizer()
    dd = _datasets().DatasetDict({"train": _datasets().Dataset.from_dict({"text": TEXTS})})
    try:
        samples = prepare_calibration(dd, tok, shuffle=False)
    except (ValueError, TypeError) as e:
        assert "split" in str(e)
        return
    assert [s["input_ids"][0].tolist() for s in samples] == [tok(t)["input_ids"] for t in TEXTS]


def test_dataloader_attention_mask_is_kept():
    """A DataLoader of padded batches: the padding (attention_mask 0) must not be calibrated
    as if it were text; each sample keeps its mask (or drops its padding)."""
    ids = fixed_ids(2, 8)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    loader = torch.utils.data.DataLoader([{"input_ids": i, "attention_mask": m} for i, m in zip(ids, mask)],
                                         batch_size=2)
    samples = prepare_calibration(loader, shuffle=False)
    assert len(samples) == 2
    for s, row_ids, row_mask in zip(samples, ids, mask):
        kept = s["input_ids"][0][s["attention_mask"][0].bool()]
        assert kept.tolist() == row_ids[row_mask.bool()].tolist()


@pytest.mark.parametrize("max_len", [1, 5, 16])
def test_max_seq_length(max_len):
    tok = make_tokenizer()
    for data in (TEXTS, fixed_ids(4, 20), list(fixed_ids(2, 20))):
        samples = prepare_calibration(data, tok, max_seq_length=max_len)
        assert all(s["input_ids"].shape[1] == max_len for s in samples)  # every sample is longer
    short = prepare_calibration(["abc"], tok, max_seq_length=16)
    assert short[0]["input_ids"].shape[1] == 3


def test_default_max_seq_length_is_384():
    samples = prepare_calibration(["x" * 1000], make_tokenizer())
    assert samples[0]["input_ids"].shape[1] == 384


@pytest.mark.parametrize("kind", ["texts", "tensor"])
def test_shuffle_and_seed(kind):
    tok = make_tokenizer()
    data = TEXTS if kind == "texts" else torch.arange(8)[:, None].repeat(1, 4) + 4

    def order(**kw):
        return [s["input_ids"][0].tolist() for s in prepare_calibration(data, tok, **kw)]

    plain = order(shuffle=False)
    expected = [tok(t)["input_ids"] for t in TEXTS] if kind == "texts" else data.tolist()
    assert plain == expected
    a, b, c = order(seed=0), order(seed=0), order(seed=1)
    assert a == b, "same seed, different order"
    assert a != plain and c != a, "shuffle did not shuffle / seed had no effect"
    assert sorted(a) == sorted(plain) == sorted(c)
    # subsets: the first n of the same permutation
    assert order(seed=0, num_calibration_samples=3) == a[:3]


def test_model_path_loads_its_tokenizer(tmp_path):
    """A model directory: oneshot loads the model and its tokenizer (used for text data and
    saved with the output)."""
    src = save_float("llama", tmp_path / "float", tokenizer=True)
    model = lowbit.oneshot(src, w4_group_modifier(), dataset=TEXTS, output_dir=tmp_path / "out",
                           num_calibration_samples=2)
    assert os.path.isfile(tmp_path / "out" / "tokenizer.json")
    ids = fixed_ids()
    ref = lowbit.oneshot(make_model("llama"), w4_group_modifier())
    assert torch.equal(logits(model, ids), logits(ref, ids))


# ---------------------------------------------------------------- targets / ignore

LLAMA_LINEARS = sorted(f"model.layers.{i}.{m}" for i in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def _quantized(model):
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, (lowbit.nn.PackedLinear, lowbit.nn.Int8DynamicLinear)))


@pytest.mark.parametrize("targets,ignore,expected", [
    ("Linear", ["lm_head"], LLAMA_LINEARS),
    (["Linear"], [], LLAMA_LINEARS + ["lm_head"]),
    ("Linear", ["lm_head", "model.layers.0.mlp.down_proj"],
     [n for n in LLAMA_LINEARS if n != "model.layers.0.mlp.down_proj"]),
    ("model.layers.1.self_attn.k_proj", [], ["model.layers.1.self_attn.k_proj"]),
    (["model.layers.1.self_attn.k_proj", "model.layers.0.mlp.up_proj"], [],
     ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.k_proj"]),
    ("re:.*mlp.*", [], [n for n in LLAMA_LINEARS if ".mlp." in n]),
    ("re:.*_proj$", ["re:.*\\.1\\..*"], [n for n in LLAMA_LINEARS if ".0." in n]),
    ("Linear", ["lm_head", "re:.*self_attn.*"], [n for n in LLAMA_LINEARS if ".mlp." in n]),
    ("re:model\\.layers\\.0\\.", ["lm_head"], [n for n in LLAMA_LINEARS if ".0." in n]),
])
def test_targets_and_ignore(targets, ignore, expected):
    model = lowbit.oneshot(make_model("llama"), lowbit.QuantizationModifier(scheme="W8A8", targets=targets,
                                                                            ignore=ignore))
    assert _quantized(model) == sorted(expected)


def test_config_group_targets_pick_the_modules():
    """config_groups' own targets select the modules (the first matching group wins)."""
    mod = lowbit.QuantizationModifier(config_groups={
        "attn": {"targets": ["re:.*self_attn.*"], "weights": {"num_bits": 4, "group_size": 32}},
        "rest": {"targets": ["Linear"], "weights": {"num_bits": 8, "strategy": "channel"}},
    }, ignore=["lm_head"])
    model = lowbit.oneshot(make_model("llama"), mod)
    bits = {n: m.args.num_bits for n, m in model.named_modules() if isinstance(m, lowbit.nn.PackedLinear)}
    assert sorted(bits) == LLAMA_LINEARS
    assert all(b == (4 if "self_attn" in n else 8) for n, b in bits.items())


def test_regex_uses_match_not_search():
    """'re:mlp' would match every MLP projection with re.search, but targets use re.match."""
    with pytest.raises(ValueError, match=r"target 're:mlp' matches no Linear layer"):
        lowbit.oneshot(make_model("llama"), lowbit.QuantizationModifier(scheme="W8A8", targets="re:mlp"))
    # an ignore that only re.search would match ignores nothing (and warns)
    with pytest.warns(UserWarning, match=r"ignore entry 're:down_proj' matches no module"):
        model = lowbit.oneshot(make_model("llama"), lowbit.QuantizationModifier(
            scheme="W8A8", targets="re:.*mlp.*", ignore=["re:down_proj"]))
    assert _quantized(model) == sorted(n for n in LLAMA_LINEARS if ".mlp." in n)


def test_target_matching_nothing_raises():
    with pytest.raises(ValueError, match=r"target 'Conv2d' matches no Linear layer of LlamaForCausalLM"):
        lowbit.oneshot(make_model("llama"), lowbit.QuantizationModifier(scheme="W8A8", targets=["Linear", "Conv2d"]))
    with pytest.raises(ValueError, match=r"target 'model.layers.7.mlp.up_proj' matches no Linear layer"):
        lowbit.oneshot(make_model("llama"), lowbit.QuantizationModifier(scheme="W8A8",
                                                                        targets="model.layers.7.mlp.up_proj"))


def test_target_matching_only_unquantizable_modules_raises(tmp_path):
    """'Embedding' names modules, but none lowbit can quantize: quantizing nothing must be an
    error, not a checkpoint with an empty quantization_config that lowbit.load then refuses."""
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"Embedding"):
        lowbit.oneshot(make_model("llama"), lowbit.QuantizationModifier(scheme="W8A8", targets="Embedding"),
                       output_dir=out)
    assert not out.exists()


def test_ignore_matching_nothing_warns():
    with pytest.warns(UserWarning, match=r"ignore entry 'model.layers.9.mlp' matches no module"):
        model = lowbit.oneshot(make_model("llama"), lowbit.QuantizationModifier(
            scheme="W8A8", ignore=["lm_head", "model.layers.9.mlp"]))
    assert _quantized(model) == LLAMA_LINEARS


def test_gpt2_linear_target_covers_conv1d():
    from transformers.pytorch_utils import Conv1D

    model = lowbit.oneshot(make_model("gpt2"), w4_group_modifier())
    conv = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert len(conv) == 8 and all(hasattr(m, "quantization_args") for m in conv)
    # quantized along the input rows: each group of 32 inputs of an output column holds <= 16 values
    assert all(max(len(torch.unique(g)) for g in m.weight.detach().t().reshape(-1, 32)) <= 16 for m in conv)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, lowbit.nn.PackedLinear)


# ---------------------------------------------------------------- bad inputs

class NeedsData(lowbit.QuantizationModifier):
    requires_calibration = True


def _bert():
    import transformers

    return transformers.BertModel(transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2,
                                                          num_attention_heads=4, intermediate_size=128))


def _llama_no_head():
    import transformers

    return transformers.LlamaModel(make_config("llama"))


BAD = {
    "no-dataset-for-calibrating-modifier": (
        lambda: dict(recipe=NeedsData(scheme="W8A8", ignore=["lm_head"])),
        ValueError, r"NeedsData needs calibration data: pass dataset="),
    "empty-dataset-list": (lambda: dict(recipe="W8A8", dataset=[], tokenizer=make_tokenizer()),
                           ValueError, r"calibration dataset is empty"),
    "empty-dataset-blank-string": (lambda: dict(recipe="W8A8", dataset=[""], tokenizer=make_tokenizer()),
                                   ValueError, r"calibration dataset is empty"),
    "empty-dataset-tensor": (lambda: dict(recipe="W8A8", dataset=torch.zeros(0, 8, dtype=torch.long)),
                             ValueError, r"calibration dataset is empty"),
    "unknown-preset": (lambda: dict(recipe="W5A5"), ValueError,
                       r"unknown recipe 'W5A5': valid preset schemes are W2A16, .*W4A16.*W4A16_ASYM, W8A8"),
    "unknown-scheme-yaml": (lambda: dict(recipe="s:\n  q_modifiers:\n    QuantizationModifier: {scheme: W5A5}\n"),
                            ValueError, r"unknown scheme 'W5A5'; valid presets: .*W4A16.*W8A8"),
    "unknown-modifier-yaml": (
        lambda: dict(recipe="s:\n  q_modifiers:\n    NotAModifier: {scheme: W4A16}\n"),
        ValueError, r"unknown modifier 'NotAModifier' in s\.q_modifiers; lowbit knows .*QuantizationModifier"),
    "target-matches-nothing": (lambda: dict(recipe=lowbit.QuantizationModifier(scheme="W8A8", targets="re:nothing")),
                               ValueError, r"target 're:nothing' matches no Linear layer"),
    "max-seq-length-zero": (lambda: dict(recipe="W8A8", dataset=TEXTS, tokenizer=make_tokenizer(), max_seq_length=0),
                            ValueError, r"max_seq_length must be positive, got 0"),
    "max-seq-length-negative": (lambda: dict(recipe="W8A8", dataset=TEXTS, tokenizer=make_tokenizer(),
                                             max_seq_length=-5), ValueError, r"max_seq_length must be positive"),
    "num-calibration-samples-zero": (lambda: dict(recipe="W8A8", dataset=TEXTS, tokenizer=make_tokenizer(),
                                                  num_calibration_samples=0),
                                     ValueError, r"num_calibration_samples must be positive"),
    "bert-model": (lambda: dict(model=_bert(), recipe="W8A8"), ValueError,
                   r"oneshot needs a causal language model .*got BertModel"),
    "llama-model-without-head": (lambda: dict(model=_llama_no_head(), recipe="W8A8"), ValueError,
                                 r"causal language model .*got LlamaModel"),
    "not-a-model": (lambda: dict(model=torch.nn.Linear(4, 4), recipe="W8A8"), ValueError,
                    r"causal language model .*got Linear"),
    "model-path-missing": (lambda: dict(model="/nonexistent/model/dir", recipe="W8A8"), ValueError,
                           r"model '/nonexistent/model/dir' is not a local directory"),
    "group-size-not-dividing": (lambda: dict(recipe=w4_group_modifier(group_size=48)), ValueError,
                                r"group size does not divide the input columns of model\.layers\.0\.self_attn\.q_proj "
                                r"\(64 columns, group_size 48\)"),
    "group-size-not-dividing-one-layer": (
        lambda: dict(recipe=w4_group_modifier(group_size=128)), ValueError,
        r"does not divide the input columns of model\.layers\.0\.self_attn\.q_proj \(64 columns, group_size 128\)"),
    "dataset-missing-file": (lambda: dict(recipe="W8A8", dataset="/nonexistent/calib.jsonl",
                                          tokenizer=make_tokenizer()),
                             ValueError, r"dataset '/nonexistent/calib.jsonl' is not a local file"),
    "dataset-bad-type": (lambda: dict(recipe="W8A8", dataset=3.5), TypeError, r"unsupported dataset type float"),
    "dataset-float-tensor": (lambda: dict(recipe="W8A8", dataset=torch.randn(2, 8)), ValueError,
                             r"token id tensors must be integer"),
    "w8a8-on-conv1d": (lambda: dict(model=make_model("gpt2"), recipe="W8A8"), ValueError,
                       r"activation quantization of Conv1D layers is not supported"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_and_write_nothing(tmp_path, case):
    make_kwargs, exc, match = BAD[case]
    kwargs = make_kwargs()
    model = kwargs.pop("model", None) or make_model("llama")
    out = tmp_path / "parent" / "out"
    with pytest.raises(exc, match=match):
        lowbit.oneshot(model, output_dir=out, **kwargs)
    assert not out.exists()
    parent = tmp_path / "parent"
    assert not parent.exists() or not any(n.startswith(".lowbit-") for n in os.listdir(parent))


def test_bad_input_leaves_the_model_unchanged():
    """Errors found before quantizing (here: a group size that does not fit a later layer)
    leave the caller's model untouched."""
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mod = lowbit.QuantizationModifier(config_groups={
        "a": {"targets": ["re:.*self_attn.*"], "weights": {"num_bits": 4, "group_size": 32}},
        "b": {"targets": ["re:.*down_proj"], "weights": {"num_bits": 4, "group_size": 64}},  # 128 columns: fine
        "c": {"targets": ["re:.*up_proj"], "weights": {"num_bits": 4, "group_size": 48}},  # 64 columns: no
    })
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.up_proj \(64 columns, group_size 48\)"):
        lowbit.oneshot(model, mod)
    assert _quantized(model) == []
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_calibrating_modifier_runs_with_data():
    model = lowbit.oneshot(make_model("llama"), NeedsData(scheme="W8A8", ignore=["lm_head"]), dataset=fixed_ids(2, 8))
    assert _quantized(model) == LLAMA_LINEARS


def test_non_empty_output_dir_refused_then_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match=r"output_dir .* is not empty; pass overwrite=True"):
        lowbit.oneshot(make_model("llama"), w4_group_modifier(), output_dir=out)
    assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "user data"
    assert not any(n.startswith(".lowbit-") for n in os.listdir(tmp_path))
    # overwrite=True replaces checkpoints only (a directory with a config.json), never other data
    with pytest.raises(ValueError, match=r"holds no checkpoint \(no config.json"):
        lowbit.oneshot(make_model("llama"), w4_group_modifier(), output_dir=out, overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    (out / "config.json").write_text("{}")
    lowbit.oneshot(make_model("llama"), w4_group_modifier(), output_dir=out, overwrite=True)
    assert "keep.txt" not in os.listdir(out) and (out / "model.safetensors").is_file()
    assert not any(n.startswith(".lowbit-") for n in os.listdir(tmp_path))
    # an empty existing directory is fine without overwrite
    (tmp_path / "empty").mkdir()
    lowbit.oneshot(make_model("llama"), w4_group_modifier(), output_dir=tmp_path / "empty")
    assert (tmp_path / "empty" / "model.safetensors").is_file()


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"exists and is not a directory"):
        lowbit.oneshot(make_model("llama"), w4_group_modifier(), output_dir=path, overwrite=True)
    assert path.read_text() == "x"


def test_failed_save_leaves_no_output(tmp_path, monkeypatch):
    """A failure while writing (here: the tokenizer) removes the temporary directory and
    leaves no output directory."""
    tok = make_tokenizer()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(tok, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        lowbit.oneshot(make_model("llama"), w4_group_modifier(), output_dir=tmp_path / "out", tokenizer=tok)
    assert os.listdir(tmp_path) == []


def test_oneshot_returns_the_same_model_quantized_in_place():
    model = make_model("llama")
    out = lowbit.oneshot(model, w4_group_modifier())
    assert out is model
    assert _quantized(model) == LLAMA_LINEARS
    assert model.config.quantization_config["quant_method"] == "compressed-tensors"


# ---------------------------------------------------------------- llmcompressor's keyword set

def test_unknown_keyword_is_a_type_error():
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['calibration_samples'\]"):
        lowbit.oneshot(make_model("llama"), "W4A16", calibration_samples=4)


def test_keywords_without_effect_warn_once_and_change_nothing():
    ids = fixed_ids(4, 16)
    plain = lowbit.oneshot(make_model("llama"), w4_group_modifier(), dataset=ids)
    with pytest.warns(UserWarning, match=r"no effect in lowbit: batch_size=8 .*; streaming=True") as record:
        moot = lowbit.oneshot(make_model("llama"), w4_group_modifier(), dataset=ids, batch_size=8, streaming=True,
                              clear_sparse_session=False, preprocessing_num_workers=None,
                              tracing_ignore=["_update_causal_mask"], quantization_aware_calibration=True)
    assert sum("no effect" in str(w.message) for w in record) == 1
    assert torch.equal(logits(moot, ids), logits(plain, ids))


def test_tokenizer_comes_from_the_model_directory(tmp_path):
    """As llmcompressor: text data with no tokenizer= uses the one saved beside the model."""
    from transformers import AutoModelForCausalLM

    save_float("llama", tmp_path / "m", tokenizer=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    given = lowbit.oneshot(make_model("llama"), lowbit.GPTQModifier(config_groups=_w4_groups(), ignore=["lm_head"]),
                           dataset=TEXTS, tokenizer=make_tokenizer(), num_calibration_samples=4)
    found = lowbit.oneshot(model, lowbit.GPTQModifier(config_groups=_w4_groups(), ignore=["lm_head"]),
                           dataset=TEXTS, num_calibration_samples=4)
    ids = fixed_ids()
    assert torch.equal(logits(found, ids), logits(given, ids))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        lowbit.oneshot(make_model("llama"), lowbit.GPTQModifier(config_groups=_w4_groups(), ignore=["lm_head"]),
                       dataset=TEXTS)


def _w4_groups():
    return {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 32}}}


def test_splits_pick_and_slice_local_data():
    ds = _datasets()
    dd = ds.DatasetDict({"train": ds.Dataset.from_list([{"text": t} for t in TEXTS]),
                         "test": ds.Dataset.from_list([{"text": "x"}])})
    tok = make_tokenizer()
    first_half = prepare_calibration(dd, tok, shuffle=False, splits="train[:50%]")
    assert [s["input_ids"].shape[-1] for s in first_half] == [len(t) for t in TEXTS[:4]]
    assert len(prepare_calibration(TEXTS, tok, shuffle=False, splits="train[2:5]")) == 3
    assert len(prepare_calibration(dd, tok, shuffle=False, splits={"calibration": "test"})) == 1
    with pytest.raises(ValueError, match=r"has the splits \['test', 'train'\]"):
        prepare_calibration(dd, tok, splits="validation")
    with pytest.raises(ValueError, match="not a split spec"):
        prepare_calibration(TEXTS, tok, splits="train[::2]")


def test_concatenate_and_pad():
    tok = make_tokenizer()
    pieces = prepare_calibration(TEXTS, tok, shuffle=False, max_seq_length=32, concatenate=True)
    total = sum(len(t) for t in TEXTS)
    assert [p["input_ids"].shape[-1] for p in pieces] == [32] * (total // 32) + ([total % 32] if total % 32 else [])
    assert torch.equal(torch.cat([p["input_ids"][0] for p in pieces]),
                       torch.cat([tok(t, return_tensors="pt")["input_ids"][0] for t in TEXTS]))
    padded = prepare_calibration(TEXTS[:2], tok, shuffle=False, max_seq_length=80, pad=True)
    for p, t in zip(padded, TEXTS[:2]):
        assert p["input_ids"].shape[-1] == 80 and int(p["attention_mask"].sum()) == len(t)
        assert (p["input_ids"][0, len(t):] == tok.pad_token_id).all()


def test_hub_names_are_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"'open_platypus' is not a local file.*works offline"):
        lowbit.oneshot(make_model("llama"), w4_group_modifier(), dataset="open_platypus", tokenizer=make_tokenizer())
    with pytest.raises(ValueError, match="not a local directory: lowbit works offline"):
        lowbit.oneshot("meta-llama/Meta-Llama-3-8B-Instruct", "W4A16")
    with pytest.raises(ValueError, match="model_revision='v2'"):
        lowbit.oneshot(make_model("llama"), "W4A16", model_revision="v2")


def test_pipelines():
    ids = fixed_ids(4, 16)
    gptq = lambda: lowbit.GPTQModifier(config_groups=_w4_groups(), ignore=["lm_head"])  # noqa: E731
    sequential = lowbit.oneshot(make_model("llama"), gptq(), dataset=ids, pipeline="sequential")
    independent = lowbit.oneshot(make_model("llama"), gptq(), dataset=ids, pipeline="independent")
    basic = lowbit.oneshot(make_model("llama"), gptq(), dataset=ids, pipeline="basic")
    probe = fixed_ids()
    assert torch.equal(logits(sequential, probe), logits(independent, probe))
    # basic: layer 1 calibrated on float layer-0 outputs, so its GPTQ result differs
    assert not torch.equal(logits(basic, probe), logits(sequential, probe))
    with pytest.raises(ValueError, match="pipeline='datafree', but GPTQModifier needs calibration data"):
        lowbit.oneshot(make_model("llama"), gptq(), dataset=ids, pipeline="datafree")
    with pytest.raises(ValueError, match="pipeline='magic'"):
        lowbit.oneshot(make_model("llama"), "W4A16", pipeline="magic")


def test_stage_recipe_args_and_log_dir(tmp_path):
    recipe = """
    first_stage:
        quant_modifiers:
            QuantizationModifier: {scheme: W8A16, targets: Linear, ignore: [lm_head]}
    second_stage:
        quant_modifiers:
            QuantizationModifier: {scheme: W4A16, targets: Linear, ignore: [lm_head]}
    """
    model = lowbit.oneshot(make_model("llama_h128"), recipe, stage="second_stage", recipe_args=["alpha=1"],
                           output_dir=tmp_path / "out", log_dir=tmp_path / "logs")
    assert model.model.layers[0].mlp.down_proj.args.num_bits == 4
    written = (tmp_path / "out" / "recipe.yaml").read_text()
    assert "alpha: '1'" in written and "W4A16" in written and "W8A16" not in written
    assert "oneshot: 14 modules quantized" in (tmp_path / "logs" / "oneshot.log").read_text()
    with pytest.raises(ValueError, match=r"stage='third' is not in the recipe"):
        lowbit.oneshot(make_model("llama_h128"), recipe, stage="third")
    with pytest.raises(ValueError, match="selects a stage of a YAML recipe"):
        lowbit.oneshot(make_model("llama_h128"), "W4A16", stage="x")
    with pytest.raises(ValueError, match="'key=value' strings"):
        lowbit.oneshot(make_model("llama_h128"), "W4A16", recipe_args=["alpha"])


def test_model_loading_arguments(tmp_path):
    save_float("llama", tmp_path / "m", tokenizer=True)
    bf16 = lowbit.oneshot(str(tmp_path / "m"), w4_group_modifier(), precision="bfloat16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    untied = lowbit.oneshot(make_model("llama"), w4_group_modifier(), tie_word_embeddings=False)
    assert untied.config.tie_word_embeddings is False
    with pytest.raises(ValueError, match=r"sequential_targets=\['MistralDecoderLayer'\].*LlamaDecoderLayer"):
        lowbit.oneshot(make_model("llama"), w4_group_modifier(), sequential_targets=["MistralDecoderLayer"])
    lowbit.oneshot(make_model("llama"), w4_group_modifier(), sequential_targets=["LlamaDecoderLayer"])
    with pytest.raises(ValueError, match="precision='int3'"):
        lowbit.oneshot(make_model("llama"), "W4A16", precision="int3")


def test_save_pretrained_writes_the_checkpoint(tmp_path):
    """model.save_pretrained after oneshot (and after lowbit.load) writes lowbit's checkpoint;
    save_compressed=False the decompressed float model, which loads as a plain model."""
    from transformers import AutoModelForCausalLM

    model = lowbit.oneshot(make_model("llama"), w4_group_modifier(symmetric=False))
    model.save_pretrained(tmp_path / "c", save_compressed=True)
    ids = fixed_ids()
    assert torch.equal(logits(lowbit.load(tmp_path / "c"), ids), logits(model, ids))
    lowbit.load(tmp_path / "c").save_pretrained(tmp_path / "c2")
    assert compressed_state_dict(lowbit.load(tmp_path / "c2")).keys() == compressed_state_dict(model).keys()
    model.save_pretrained(tmp_path / "d", save_compressed=False)
    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "d")
    assert getattr(dense.config, "quantization_config", None) is None
    assert rel_err(logits(dense, ids), logits(model, ids)) < 1e-5
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "e", safe_serialization=False)
    with pytest.raises(ValueError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "e", push_to_hub=True)
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError):  # never replaces a directory that is not a checkpoint
        model.save_pretrained(tmp_path / "f")
    assert (tmp_path / "f" / "notes.txt").read_text() == "mine"
