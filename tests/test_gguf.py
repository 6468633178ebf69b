"""GGUF export judged by llama.cpp: per-tensor types and bytes equal to llama-quantize's, files that
llama.cpp loads and runs (logits, tokenization, greedy text), importance matrices both ways, and
bad input. llama.cpp's tools come from scripts/build_llama_cpp.sh (cached after the first build)."""

from __future__ import annotations

import os
import subprocess

import gguf
import numpy as np
import pytest
import torch

import lowbit
from lowbit import ggml, ops
from lowbit.formats import gguf as lowbit_gguf

import tiny_models as tm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K_MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
PLAIN = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32"]
TEXT = "The quick brown fox jumps over the lazy dog. Quantization maps weights to a small grid!"


@pytest.fixture(scope="session")
def llama_bin():
    """llama.cpp's bin directory (built once by scripts/build_llama_cpp.sh, then cached)."""
    out = subprocess.run(["bash", os.path.join(REPO, "scripts", "build_llama_cpp.sh")], capture_output=True,
                         text=True)
    assert out.returncode == 0, f"scripts/build_llama_cpp.sh failed:\n{out.stderr[-2000:]}"
    return out.stdout.strip().splitlines()[-1]


def run(tool, *args, timeout=300):
    out = subprocess.run([tool, *map(str, args)], capture_output=True, timeout=timeout)
    assert out.returncode == 0, f"{os.path.basename(tool)} failed:\n{out.stderr.decode(errors='replace')[-2000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def tokenizer():
    return tm.make_bpe_tokenizer()


def tensors_of(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def shapes_of(path):
    return [(t.name, tuple(int(x) for x in reversed(t.shape))) for t in gguf.GGUFReader(path).tensors]


def llama_logits(llama_bin, path, ids):
    raw = run(os.path.join(llama_bin, "llama-logits"), path, *ids)
    return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).reshape(len(ids), -1).copy())


def dequantized_model(model, path):
    """`model` with every tensor replaced by lowbit's decoding of the GGUF file's blocks (q / k
    rows un-permuted): what the file says the model is."""
    stored = tensors_of(path)
    permute = ggml.architecture(model)[1]
    name_map = ggml.name_map(model)
    copy = type(model)(model.config).eval()
    state = {}
    for hf_name, tensor in copy.state_dict().items():
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name not in stored:  # tied lm_head
            continue
        t = stored[name]
        kind = t.tensor_type.name
        rows = np.asarray(t.data)
        if kind in ("F32", "F16"):
            values = torch.from_numpy(rows.astype(np.float32)).reshape(tensor.shape)
        elif kind == "BF16":
            values = torch.from_numpy(rows.view(np.uint16).astype(np.int32) << 16).view(torch.float32).reshape(
                tensor.shape)
        else:
            values = ops.gguf_dequantize(torch.from_numpy(rows.reshape(tensor.shape[0], -1).copy()), kind,
                                         tensor.shape[-1], torch.float32)
        if permute and hf_name.endswith(("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")):
            heads = model.config.num_attention_heads if "q_proj" in hf_name else model.config.num_key_value_heads
            values = values.reshape(heads, values.shape[0] // heads // 2, 2, *values.shape[1:]).swapaxes(1, 2) \
                .reshape(values.shape)
        state[hf_name] = values
    copy.load_state_dict(state, strict=False)
    copy.tie_weights()
    return copy


# ---------------------------------------------------------------- per-tensor types

@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tensor_types_are_llama_quantizes(llama_bin, tokenizer, tmp_path, tied):
    """Every file type's per-tensor choice (mix rules, fallbacks for 288-column rows, output /
    tied embedding) equals what llama-quantize picks from an F32 file of the same model."""
    model = tm.make_gguf_model("rules", tie_word_embeddings=tied)
    f32 = tmp_path / "f32.gguf"
    lowbit.save_gguf(model, f32, tokenizer=tokenizer, type="F32")
    shapes = shapes_of(f32)
    c = model.config
    for file_type in K_MIXES + PLAIN[:-1]:
        run(os.path.join(llama_bin, "llama-quantize"), f32, tmp_path / "q.gguf", file_type)
        theirs = {name: t.tensor_type.name for name, t in tensors_of(tmp_path / "q.gguf").items()}
        mine = ggml.tensor_types(shapes, file_type, n_layer=c.num_hidden_layers,
                                        n_gqa=c.num_attention_heads // c.num_key_value_heads)
        assert mine == theirs, file_type


# ---------------------------------------------------------------- bytes

@pytest.mark.parametrize("file_type", K_MIXES + ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
@pytest.mark.parametrize("arch", ["rules", "qwen2"])
def test_bytes_equal_llama_quantize(llama_bin, tokenizer, tmp_path, arch, file_type):
    """lowbit's direct export equals llama-quantize's output from lowbit's F32 file, tensor by
    tensor, byte for byte."""
    model = tm.make_gguf_model(arch)
    lowbit.save_gguf(model, tmp_path / "f32.gguf", tokenizer=tokenizer, type="F32")
    run(os.path.join(llama_bin, "llama-quantize"), tmp_path / "f32.gguf", tmp_path / "theirs.gguf", file_type)
    lowbit.save_gguf(model, tmp_path / "mine.gguf", tokenizer=tokenizer, type=file_type)
    theirs, mine = tensors_of(tmp_path / "theirs.gguf"), tensors_of(tmp_path / "mine.gguf")
    assert set(mine) == set(theirs)  # (llama-quantize moves output.weight first)
    for name in theirs:
        assert mine[name].tensor_type == theirs[name].tensor_type, name
        assert np.array_equal(np.asarray(mine[name].data), np.asarray(theirs[name].data)), \
            f"{name} ({theirs[name].tensor_type.name}) differs from llama-quantize's"


# ---------------------------------------------------------------- llama.cpp runs the files

LOGIT_TOLERANCE = {"F32": 2e-3, "F16": 2e-3, "BF16": 1e-2}  # else 5e-2: see test_llama_cpp_logits


@pytest.mark.parametrize("file_type", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_1", "Q4_K_M", "Q3_K_M", "Q2_K",
                                       "Q6_K"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral"])
def test_llama_cpp_logits(llama_bin, tokenizer, tmp_path, arch, file_type):
    """llama.cpp's logits for a lowbit GGUF file are those of the model the file describes
    (lowbit's decoding of its blocks, run by transformers), within 2e-3 relative for float
    files (llama.cpp keeps its KV cache in F16), 1e-2 for BF16 and 5e-2 for block types (llama.cpp
    also rounds the activations to 8-bit blocks before each quantized matmul)."""
    model = tm.make_gguf_model(arch)
    path = tmp_path / "model.gguf"
    lowbit.save_gguf(model, path, tokenizer=tokenizer, type=file_type)
    ids = tokenizer.encode(TEXT)
    theirs = llama_logits(llama_bin, path, ids)
    with torch.inference_mode():
        expected = dequantized_model(model, path)(torch.tensor([ids])).logits[0]
    assert tm.rel_err(theirs, expected) < LOGIT_TOLERANCE.get(file_type, 5e-2)


def test_llama_cpp_tokenizes_as_transformers(llama_bin, tokenizer, tmp_path):
    path = tmp_path / "model.gguf"
    lowbit.save_gguf(tm.make_gguf_model("llama"), path, tokenizer=tokenizer, type="F16")
    for text in tm.TEXTS + ["  leading spaces, 12345 digits\nnew line\ttab", "unicode: café, naïve, 東京"]:
        out = run(os.path.join(llama_bin, "llama-tokenize"), "-m", path, "-p", text, "--ids", "--log-disable",
                  "--no-bos")
        assert eval(out.decode().strip().splitlines()[-1]) == tokenizer.encode(text), text


def test_metadata(tokenizer, tmp_path):
    model = tm.make_gguf_model("qwen3", tie_word_embeddings=True)
    path = tmp_path / "model.gguf"
    lowbit.save_gguf(model, path, tokenizer=tokenizer, type="Q8_0")
    fields = gguf.GGUFReader(path).fields
    value = {k: f.contents() for k, f in fields.items() if k != "tokenizer.ggml.merges"}
    c = model.config
    assert value["general.architecture"] == "qwen3"
    assert value["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert value["qwen3.block_count"] == 2 and value["qwen3.embedding_length"] == c.hidden_size
    assert value["qwen3.attention.head_count_kv"] == c.num_key_value_heads
    assert value["qwen3.attention.key_length"] == c.head_dim == value["qwen3.rope.dimension_count"]
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    assert len(value["tokenizer.ggml.tokens"]) == c.vocab_size
    assert value["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert value["tokenizer.chat_template"] == tm.CHAT_TEMPLATE
    assert "output.weight" not in tensors_of(path)  # tied: llama.cpp reuses token_embd


# ---------------------------------------------------------------- the real model

def test_smollm2_q4_k_m_answers_as_transformers(llama_bin, smollm2, tmp_path):
    """SmolLM2 exported as Q4_K_M: llama.cpp's greedy continuation of the capital-of-France
    prompt is transformers' greedy continuation of the model the file describes."""
    model, tokenizer = smollm2
    path = tmp_path / "smollm2-Q4_K_M.gguf"
    lowbit.save_gguf(model, path, tokenizer=tokenizer, type="Q4_K_M")
    prompt = "The capital of France is"
    out = run(os.path.join(llama_bin, "llama-completion"), "-m", path, "-p", prompt, "-n", 8, "--temp", 0,
              "--top-k", 1, "-no-cnv", "--simple-io", "-t", 2, "--no-warmup", "--no-display-prompt").decode()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        generated = dequantized_model(model, path).generate(ids, max_new_tokens=8, do_sample=False)
    expected = tokenizer.decode(generated[0, ids.shape[1]:])
    assert "Paris" in expected
    assert out.strip() == expected.strip()


# ---------------------------------------------------------------- importance matrices

def test_imatrix_round_trip_and_llama_quantize_reads_it(llama_bin, tokenizer, tmp_path):
    model = tm.make_gguf_model("llama")
    imatrix = lowbit.imatrix(model, tm.TEXTS, tokenizer=tokenizer, num_calibration_samples=8)
    assert len(imatrix.sums) == 14 and all(c == imatrix.counts["model.layers.0.mlp.up_proj"]
                                           for c in imatrix.counts.values())
    lowbit.save_imatrix(imatrix, tmp_path / "imatrix.gguf", model)
    read = lowbit.load_imatrix(tmp_path / "imatrix.gguf")
    assert read.counts["blk.1.ffn_down.weight"] == imatrix.counts["model.layers.1.mlp.down_proj"]
    assert torch.equal(read.sums["blk.0.attn_q.weight"], imatrix.sums["model.layers.0.self_attn.q_proj"])
    lowbit.save_gguf(model, tmp_path / "f32.gguf", tokenizer=tokenizer, type="F32")
    run(os.path.join(llama_bin, "llama-quantize"), "--imatrix", tmp_path / "imatrix.gguf", tmp_path / "f32.gguf",
        tmp_path / "q.gguf", "Q4_K_M")


@pytest.mark.parametrize("file_type", ["Q4_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"])
def test_imatrix_bytes_equal_llama_quantize(llama_bin, tokenizer, tmp_path, file_type):
    """With an importance matrix, lowbit's weighted scale searches write llama-quantize
    --imatrix's bytes."""
    model = tm.make_gguf_model("rules")
    imatrix = lowbit.imatrix(model, tm.TEXTS, tokenizer=tokenizer, num_calibration_samples=8)
    lowbit.save_imatrix(imatrix, tmp_path / "imatrix.gguf", model)
    lowbit.save_gguf(model, tmp_path / "f32.gguf", tokenizer=tokenizer, type="F32")
    run(os.path.join(llama_bin, "llama-quantize"), "--imatrix", tmp_path / "imatrix.gguf", tmp_path / "f32.gguf",
        tmp_path / "theirs.gguf", file_type)
    lowbit.save_gguf(model, tmp_path / "mine.gguf", tokenizer=tokenizer, type=file_type, imatrix=imatrix)
    theirs, mine = tensors_of(tmp_path / "theirs.gguf"), tensors_of(tmp_path / "mine.gguf")
    for name in theirs:
        assert np.array_equal(np.asarray(mine[name].data), np.asarray(theirs[name].data)), name


def test_reads_llama_imatrix_files(llama_bin, tokenizer, tmp_path):
    """llama-imatrix's own file loads, names and counts intact, and weights lowbit's export."""
    model = tm.make_gguf_model("llama")
    lowbit.save_gguf(model, tmp_path / "f32.gguf", tokenizer=tokenizer, type="F32")
    (tmp_path / "calib.txt").write_text(" ".join(tm.TEXTS * 6))
    run(os.path.join(llama_bin, "llama-imatrix"), "-m", tmp_path / "f32.gguf", "-f", tmp_path / "calib.txt",
        "-o", tmp_path / "imatrix.gguf", "-c", 64, "-t", 2, "--no-ppl")
    read = lowbit.load_imatrix(tmp_path / "imatrix.gguf")
    assert "blk.0.attn_q.weight" in read.sums and read.counts["blk.0.attn_q.weight"] > 0
    types = lowbit.save_gguf(model, tmp_path / "q.gguf", tokenizer=tokenizer, type="Q4_K_M", imatrix=read)
    assert types["blk.0.attn_q.weight"] == "Q4_K"


# ---------------------------------------------------------------- bad input

def test_bad_input(tokenizer, tmp_path):
    model = tm.make_gguf_model("llama")
    with pytest.raises(ValueError, match="unknown GGUF type 'Q7_K'"):
        lowbit.save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, type="Q7_K")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        lowbit.save_gguf(model, tmp_path / "m.gguf", type="Q8_0")
    with pytest.raises(ValueError, match="is a directory"):
        lowbit.save_gguf(model, tmp_path, tokenizer=tokenizer, type="Q8_0")
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        lowbit.save_gguf(tm.make_model("gpt2"), tmp_path / "m.gguf", tokenizer=tokenizer, type="Q8_0")
    with pytest.raises(ValueError, match="byte-level BPE|pre-tokenizer"):
        lowbit.save_gguf(model, tmp_path / "m.gguf", tokenizer=tm.make_tokenizer(), type="Q8_0")
    quantized = lowbit.oneshot(tm.make_gguf_model("llama"), recipe="W4A16")
    with pytest.raises(ValueError, match="cannot re-express on a GGUF grid"):
        lowbit.save_gguf(quantized, tmp_path / "m.gguf", tokenizer=tokenizer, type="Q4_0")
    assert os.listdir(tmp_path) == []


def test_failed_export_leaves_no_file(tokenizer, tmp_path, monkeypatch):
    model = tm.make_gguf_model("llama")
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old file")

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(lowbit_gguf.ops, "gguf_quantize", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        lowbit.save_gguf(model, target, tokenizer=tokenizer, type="Q4_0")
    assert os.listdir(tmp_path) == ["m.gguf"] and target.read_bytes() == b"old file"


# ---------------------------------------------------------------- oneshot onto GGUF grids

@pytest.mark.parametrize("file_type", ["Q4_0", "Q3_K_M"])
def test_gptq_and_awq_onto_gguf_grids(llama_bin, tokenizer, tmp_path, file_type):
    """GPTQModifier / AWQModifier with a GGUF type as scheme: every targeted Linear holds ggml
    blocks of the type llama.cpp's rules give it; GPTQ's output error is below round-to-nearest's
    on the calibration data; the saved file is plain GGUF that llama.cpp runs as the model lowbit
    holds (its float tensors taking the same rules)."""
    data = tm.TEXTS * 4
    types = ggml.module_tensor_types(tm.make_gguf_model("llama"), file_type)
    gptq = lowbit.GPTQModifier(scheme=file_type, targets="Linear", ignore=["lm_head"])
    for recipe in (gptq, lowbit.AWQModifier(scheme=file_type, targets="Linear", ignore=["lm_head"])):
        model = lowbit.oneshot(tm.make_gguf_model("llama"), recipe=recipe, dataset=data, tokenizer=tokenizer,
                               num_calibration_samples=32, output_dir=tmp_path / type(recipe).__name__,
                               save_format="gguf")
        for name, module in model.named_modules():
            if name in types and name not in ("lm_head", "model.embed_tokens"):
                assert isinstance(module, lowbit.nn.GGUFLinear) and module.tensor_type == types[name], name
        path = tmp_path / type(recipe).__name__ / f"model-{file_type}.gguf"
        assert sorted(os.listdir(path.parent)) == [path.name, "recipe.yaml"]
        ids = tokenizer.encode(TEXT)
        with torch.inference_mode():
            expected = dequantized_model(model, path)(torch.tensor([ids])).logits[0]
            held = model(torch.tensor([ids])).logits[0]
        assert tm.rel_err(llama_logits(llama_bin, path, ids), expected) < 5e-2
        # the file's layers are the model's: only lm_head / the embedding, left float in the model, differ
        assert tm.rel_err(expected, held) < 0.5
    errors = gptq.layer_errors
    assert all(g < r for g, r in errors.values()), errors


def test_rtn_gguf_scheme_is_save_gguf_with_importance(tokenizer, tmp_path):
    """QuantizationModifier(scheme=<GGUF type>) with data = lowbit.save_gguf with lowbit.imatrix's
    importance, block for block (both quantize the float weights with ggml's weighted search)."""
    data = tm.TEXTS * 2
    model = lowbit.oneshot(tm.make_gguf_model("llama"), recipe="Q4_K_M", dataset=data, tokenizer=tokenizer,
                           num_calibration_samples=16, pipeline="basic")
    float_model = tm.make_gguf_model("llama")
    imatrix = lowbit.imatrix(float_model, data, tokenizer=tokenizer, num_calibration_samples=16)
    lowbit.save_gguf(float_model, tmp_path / "a.gguf", tokenizer=tokenizer, type="Q4_K_M", imatrix=imatrix)
    lowbit.save_gguf(model, tmp_path / "b.gguf", tokenizer=tokenizer, type="Q4_K_M", imatrix=imatrix)
    a, b = tensors_of(tmp_path / "a.gguf"), tensors_of(tmp_path / "b.gguf")
    for name in a:
        assert np.array_equal(np.asarray(a[name].data), np.asarray(b[name].data)), name


def test_gguf_recipe_in_yaml(tokenizer, tmp_path):
    recipe = """
quant_stage:
  quant_modifiers:
    GPTQModifier:
      targets: [Linear]
      ignore: [lm_head]
      scheme: Q4_K_M
"""
    lowbit.oneshot(tm.make_gguf_model("qwen2"), recipe=recipe, dataset=tm.TEXTS, tokenizer=tokenizer,
                   output_dir=tmp_path / "out", save_format="gguf")
    assert (tmp_path / "out" / "model-Q4_K_M.gguf").is_file()
    assert "scheme: Q4_K_M" in (tmp_path / "out" / "recipe.yaml").read_text()


def test_gguf_save_format_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="needs gguf_type"):
        lowbit.oneshot(tm.make_gguf_model("llama"), recipe="W4A16", output_dir=tmp_path / "a", save_format="gguf",
                       tokenizer=tokenizer)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        lowbit.oneshot(tm.make_model("gpt2"), recipe=tm.w4_group_modifier(), output_dir=tmp_path / "b",
                       save_format="gguf", gguf_type="Q8_0", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        lowbit.oneshot(tm.make_gguf_model("llama"), recipe="Q8_0", output_dir=tmp_path / "c", save_format="gguf")
    with pytest.raises(ValueError, match="cannot re-express on a GGUF grid"):  # W4A16's PackedLinear layers
        lowbit.oneshot(tm.make_gguf_model("llama"), recipe=tm.w4_group_modifier(), output_dir=tmp_path / "d",
                       save_format="gguf", gguf_type="Q4_0", tokenizer=tokenizer)
    model = lowbit.oneshot(tm.make_gguf_model("llama"), recipe="Q8_0")
    with pytest.raises(ValueError, match="no Hugging Face checkpoint format holds"):
        model.save_pretrained(tmp_path / "e")
    assert sorted(os.listdir(tmp_path)) == []


def test_cli_quantize_gguf(llama_bin, tokenizer, tmp_path):
    """`lowbit quantize --format gguf --type Q4_K_M` on a model directory: without data, the bytes
    llama-quantize writes from the same weights."""
    from lowbit import cli

    model = tm.make_gguf_model("llama")
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    cli.main(["quantize", "--model", str(tmp_path / "model"), "--format", "gguf", "--type", "Q4_K_M",
              "--output", str(tmp_path / "out")])
    lowbit.save_gguf(model, tmp_path / "f32.gguf", tokenizer=tokenizer, type="F32")
    run(os.path.join(llama_bin, "llama-quantize"), tmp_path / "f32.gguf", tmp_path / "theirs.gguf", "Q4_K_M")
    mine, theirs = tensors_of(tmp_path / "out" / "model-Q4_K_M.gguf"), tensors_of(tmp_path / "theirs.gguf")
    assert set(mine) == set(theirs)
    for name in theirs:
        assert np.array_equal(np.asarray(mine[name].data), np.asarray(theirs[name].data)), name
    with pytest.raises(SystemExit, match="--type is the GGUF type of --format gguf"):
        cli.main(["quantize", "--model", str(tmp_path / "model"), "--type", "Q4_0", "--output", str(tmp_path / "x")])


# ---------------------------------------------------------------- property: any shape, any type

from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=12, deadline=None, derandomize=True)
@given(arch=st.sampled_from(["LlamaConfig", "Qwen2Config"]), head_dim=st.sampled_from([16, 32, 48]),
       heads=st.sampled_from([(2, 1), (4, 2), (3, 3)]), layers=st.integers(1, 3),
       intermediate=st.sampled_from([96, 256, 272]), tied=st.booleans(),
       file_type=st.sampled_from(["Q4_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K", "BF16"]),
       pure=st.booleans())
def test_any_model_exports_and_runs(llama_bin, tokenizer, tmp_path_factory, arch, head_dim, heads, layers,
                                    intermediate, tied, file_type, pure):
    """Random small Llama / Qwen2 shapes (rows of 32 to 288 columns: K types fall back, 48-column
    rows fall back to F16), any type, pure or mixed: the file loads in llama.cpp, its tensor types are
    ggml.tensor_types', and llama.cpp's logits are the dequantized model's."""
    import transformers

    n_head, n_kv = heads
    config = getattr(transformers, arch)(vocab_size=tm.GGUF_VOCAB, hidden_size=head_dim * n_head,
                                         intermediate_size=intermediate, num_attention_heads=n_head,
                                         num_key_value_heads=n_kv, num_hidden_layers=layers,
                                         max_position_embeddings=128, tie_word_embeddings=tied)
    torch.manual_seed(layers * 1000 + intermediate)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp("any") / "model.gguf"
    types = lowbit.save_gguf(model, path, tokenizer=tokenizer, type=file_type, pure=pure)
    assert {n: t.tensor_type.name for n, t in tensors_of(path).items()} == types
    ids = tokenizer.encode(TEXT)[:24]
    with torch.inference_mode():
        expected = dequantized_model(model, path)(torch.tensor([ids])).logits[0]
    assert tm.rel_err(llama_logits(llama_bin, path, ids), expected) < LOGIT_TOLERANCE.get(file_type, 5e-2)
