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

K_MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
PLAIN = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "BF16", "F32"]
TEXT = "The quick brown fox jumps over the lazy dog. Quantization maps weights to a small grid!"


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


@pytest.mark.parametrize("arch,kv_heads", [("LlamaConfig", 1), ("LlamaConfig", 2), ("Qwen2Config", 2)],
                         ids=["llama-gqa", "llama-mha", "qwen2-mha"])
def test_seventy_b_rule_is_llama_quantizes(llama_bin, tokenizer, tmp_path, arch, kv_heads):
    """llama.cpp's 70B class (80 layers: a Llama with grouped-query attention, any Qwen2) gives
    attn_v more bits; a Llama without GQA (LLaMA 65B) does not."""
    import transformers

    config = getattr(transformers, arch)(vocab_size=tm.GGUF_VOCAB, hidden_size=256, intermediate_size=256,
                                         num_attention_heads=2, num_key_value_heads=kv_heads, num_hidden_layers=80,
                                         max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    lowbit.save_gguf(model, tmp_path / "f32.gguf", tokenizer=tokenizer, type="F32")
    run(os.path.join(llama_bin, "llama-quantize"), tmp_path / "f32.gguf", tmp_path / "q.gguf", "Q3_K_M")
    theirs = {name: t.tensor_type.name for name, t in tensors_of(tmp_path / "q.gguf").items()}
    mine = ggml.model_tensor_types(model, shapes_of(tmp_path / "f32.gguf"), "Q3_K_M")
    assert mine == theirs
    assert (theirs["blk.40.attn_v.weight"] == "Q5_K") == (kv_heads == 1 or arch == "Qwen2Config")


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


def test_rope_settings(tokenizer, tmp_path):
    """rope theta and linear scaling reach the file, from transformers 5's rope_parameters or 4.x's
    rope_theta / rope_scaling; scalings llama.cpp needs more keys for are refused."""
    from types import SimpleNamespace

    model = tm.make_gguf_model("llama")
    model.config.rope_parameters = {"rope_type": "linear", "factor": 4.0, "rope_theta": 12345.0}
    lowbit.save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, type="F16")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert fields["llama.rope.freq_base"].contents() == 12345.0
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == 4.0
    transformers4 = SimpleNamespace(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0})
    assert lowbit_gguf._rope(transformers4) == (500000.0, "linear", 2.0)
    assert lowbit_gguf._rope(SimpleNamespace(rope_theta=1e6, rope_scaling=None)) == (1e6, "default", None)
    model.config.rope_parameters = {"rope_type": "yarn", "factor": 8.0, "rope_theta": 5e5}
    with pytest.raises(ValueError, match="rope_type 'yarn' is not written"):
        lowbit.save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, type="F16")


def test_llama3_rope_scaling_runs_in_llama_cpp(llama_bin, tokenizer, tmp_path):
    """Llama 3's rope scaling (Llama 3.1 / 3.2 / 3.3) travels as llama.cpp's rope_freqs tensor:
    llama.cpp's logits are transformers' for a model whose every frequency band is scaled."""
    import transformers

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    config = transformers.LlamaConfig(vocab_size=tm.GGUF_VOCAB, hidden_size=128, intermediate_size=256,
                                      num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                      max_position_embeddings=128, rope_parameters=rope)
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path / "m.gguf"
    lowbit.save_gguf(model, path, tokenizer=tokenizer, type="F32")
    factors = np.asarray(tensors_of(path)["rope_freqs.weight"].data)
    assert factors.shape == (16,) and factors.min() == 1.0 and factors.max() == 8.0
    ids = tokenizer.encode(TEXT)
    with torch.inference_mode():
        expected = model(torch.tensor([ids])).logits[0]
    assert tm.rel_err(llama_logits(llama_bin, path, ids), expected) < 2e-3
    plain = transformers.LlamaConfig(**{**config.to_dict(), "rope_parameters": {"rope_type": "default",
                                                                                 "rope_theta": 10000.0}})
    unscaled = transformers.AutoModelForCausalLM.from_config(plain).eval()
    unscaled.load_state_dict(model.state_dict())
    with torch.inference_mode():  # the scaling matters: unscaled, the same weights are further off than the tolerance
        assert tm.rel_err(unscaled(torch.tensor([ids])).logits[0], expected) > 2 * 2e-3


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


def test_imatrix_statistics_are_llama_imatrixs(llama_bin, tokenizer, tmp_path):
    """lowbit.imatrix on the token chunks llama-imatrix evaluates gives its mean squares per input
    column and its token counts, tensor for tensor."""
    model = tm.make_gguf_model("qwen2")
    lowbit.save_gguf(model, tmp_path / "f32.gguf", tokenizer=tokenizer, type="F32")
    text = " ".join(tm.TEXTS * 6)
    (tmp_path / "calib.txt").write_text(text)
    n_ctx = 64
    run(os.path.join(llama_bin, "llama-imatrix"), "-m", tmp_path / "f32.gguf", "-f", tmp_path / "calib.txt",
        "-o", tmp_path / "imatrix.gguf", "-c", n_ctx, "-t", 2, "--no-ppl")
    theirs = lowbit.load_imatrix(tmp_path / "imatrix.gguf")
    # llama-imatrix's tokens: the text tokenized with its special tokens, cut into n_ctx chunks
    # whose first token becomes BOS when the vocabulary adds one
    out = run(os.path.join(llama_bin, "llama-tokenize"), "-m", tmp_path / "f32.gguf", "-f", tmp_path / "calib.txt",
              "--ids", "--log-disable")
    ids = torch.tensor(eval(out.decode().strip().splitlines()[-1]))
    chunks = ids[:len(ids) // n_ctx * n_ctx].reshape(-1, n_ctx).clone()
    if ids[0] == tokenizer.bos_token_id:
        chunks[:, 0] = tokenizer.bos_token_id
    mine = lowbit.imatrix(model, {"input_ids": chunks}, num_calibration_samples=len(chunks), max_seq_length=n_ctx,
                          shuffle_calibration_samples=False)
    name_map = ggml.name_map(model)
    assert len(mine.sums) == 14
    for module_name, means in mine.means().items():
        name = ggml.gguf_name(name_map, f"{module_name}.weight")
        assert mine.counts[module_name] == theirs.counts[name] == chunks.numel(), name
        # (llama.cpp keeps its KV cache in F16: attention outputs, so attn_output's inputs, differ by ~2e-4)
        assert tm.rel_err(means, theirs.means()[name]) < 1e-3, name


def test_imatrix_guard_rule_through_oneshot(llama_bin, tokenizer, tmp_path):
    """RTN onto Q4_0 with calibration data is llama-quantize --imatrix: the first eighth of the
    ffn_down layers (2 of 16) are Q4_1, and every decoder tensor has its bytes."""
    data = tm.TEXTS * 2
    model = lowbit.oneshot(tm.make_gguf_model("rules"), recipe="Q4_0", dataset=data, tokenizer=tokenizer,
                           num_calibration_samples=16, pipeline="basic", output_dir=tmp_path / "out",
                           save_format="gguf")
    assert model.model.layers[1].mlp.down_proj.tensor_type == "Q4_1"
    assert model.model.layers[2].mlp.down_proj.tensor_type == "Q4_0"
    float_model = tm.make_gguf_model("rules")
    imatrix = lowbit.imatrix(float_model, data, tokenizer=tokenizer, num_calibration_samples=16)
    lowbit.save_imatrix(imatrix, tmp_path / "imatrix.gguf", float_model)
    lowbit.save_gguf(float_model, tmp_path / "f32.gguf", tokenizer=tokenizer, type="F32")
    run(os.path.join(llama_bin, "llama-quantize"), "--imatrix", tmp_path / "imatrix.gguf", tmp_path / "f32.gguf",
        tmp_path / "theirs.gguf", "Q4_0")
    mine, theirs = tensors_of(tmp_path / "out" / "model-Q4_0.gguf"), tensors_of(tmp_path / "theirs.gguf")
    assert {n: t.tensor_type.name for n, t in mine.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    for name in [n for n in theirs if n.startswith("blk.")]:
        assert np.array_equal(np.asarray(mine[name].data), np.asarray(theirs[name].data)), name


def test_gguf_scheme_leaves_rows_no_block_fits_float(llama_bin, tokenizer, tmp_path):
    """A Linear whose rows no block type divides (272 columns: not a multiple of 32) stays float
    under a GGUF scheme, and the file stores it as F16, as llama-quantize does."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=tm.GGUF_VOCAB, hidden_size=64, intermediate_size=272,
                                      num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2,
                                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = lowbit.oneshot(transformers.AutoModelForCausalLM.from_config(config).eval(), recipe="Q4_0",
                           output_dir=tmp_path / "out", save_format="gguf", tokenizer=tokenizer)
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, lowbit.nn.GGUFLinear)
    path = tmp_path / "out" / "model-Q4_0.gguf"
    assert tensors_of(path)["blk.0.ffn_down.weight"].tensor_type.name == "F16"
    ids = tokenizer.encode(TEXT)
    with torch.inference_mode():
        expected = dequantized_model(model, path)(torch.tensor([ids])).logits[0]
    assert tm.rel_err(llama_logits(llama_bin, path, ids), expected) < 5e-2


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
    for scheme, match in [("F16", "float GGUF type, not a quantization scheme"), ("Q9_K", "unknown GGUF type")]:
        with pytest.raises(ValueError, match=match):
            lowbit.GGUFScheme(scheme)
    with pytest.raises(ValueError, match="not one of ggml's block types"):
        lowbit.GGUFScheme("Q4_K_M", "Q4_X")
    assert os.listdir(tmp_path) == []


def test_bad_imatrix(tokenizer, tmp_path):
    """An importance matrix that does not fit the model, or holds no mean squares, is refused
    before anything is written."""
    model = tm.make_gguf_model("llama")
    good = lowbit.imatrix(model, tm.TEXTS, tokenizer=tokenizer, num_calibration_samples=4)
    q = "model.layers.0.self_attn.q_proj"
    cols = good.sums[q].numel()
    cases = [({q: torch.ones(cols + 1)}, "has shape \\(257,\\), but the tensor has 256 columns"),
             ({q: torch.full((cols,), float("nan"))}, "NaN, Inf or negative"),
             ({q: -torch.ones(cols)}, "NaN, Inf or negative"),
             ({"blk.9.attn_q.weight": torch.ones(cols)}, "names no matrix"),
             ({"model.layers.0.self_attn.nothing": torch.ones(cols)}, "names no tensor")]
    for imatrix, match in cases:
        with pytest.raises(ValueError, match=match):
            lowbit.save_gguf(model, tmp_path / "m.gguf", tokenizer=tokenizer, type="Q4_K_M", imatrix=imatrix)
    bad_count = lowbit.IMatrix(dict(good.sums), {**good.counts, q: -1})
    with pytest.raises(ValueError, match="needs a token count"):
        lowbit.save_imatrix(bad_count, tmp_path / "i.gguf", model)
    bad_sums = lowbit.IMatrix({**good.sums, q: good.sums[q][:-1]}, dict(good.counts))
    with pytest.raises(ValueError, match="but the tensor has 256 columns"):
        lowbit.save_imatrix(bad_sums, tmp_path / "i.gguf", model)
    with pytest.raises(TypeError, match="IMatrix"):
        lowbit.save_imatrix({q: good.sums[q]}, tmp_path / "i.gguf", model)
    assert os.listdir(tmp_path) == []
    writer = gguf.GGUFWriter(tmp_path / "nan.gguf", "llama")  # a file whose counts are NaN
    writer.add_type("imatrix")
    writer.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, cols), np.float32))
    writer.add_tensor("blk.0.attn_q.weight.counts", np.array([[np.nan]], np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="not a token count"):
        lowbit.load_imatrix(tmp_path / "nan.gguf")


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
    # a GGUFScheme object as the scheme writes the same recipe, which parses back to it
    lowbit.oneshot(tm.make_gguf_model("qwen2"), recipe=lowbit.GPTQModifier(scheme=lowbit.GGUFScheme("q4_k_m"),
                                                                           ignore=["lm_head"]),
                   dataset=tm.TEXTS, tokenizer=tokenizer, output_dir=tmp_path / "obj", save_format="gguf")
    written = (tmp_path / "obj" / "recipe.yaml").read_text()
    assert "scheme: Q4_K_M" in written
    (parsed,) = lowbit.parse_recipe(written)
    assert parsed.groups[0][1] == lowbit.GGUFScheme("Q4_K_M")


def test_gguf_save_format_errors(tokenizer, tmp_path):
    two_types = lowbit.QuantizationModifier(config_groups={"a": {"targets": ["re:.*q_proj"], "gguf": "Q4_K"},
                                                           "b": {"targets": ["re:.*k_proj"], "gguf": "Q6_K"}})
    with pytest.raises(ValueError, match="needs gguf_type"):
        lowbit.oneshot(tm.make_gguf_model("llama"), recipe=two_types, output_dir=tmp_path / "a", save_format="gguf",
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
    with pytest.raises(ValueError, match="writes into output_dir"):
        lowbit.oneshot(tm.make_gguf_model("llama"), recipe="Q8_0", save_format="gguf", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="options of save_format='gguf'"):
        lowbit.oneshot(tm.make_gguf_model("llama"), recipe="Q8_0", gguf_type="Q8_0", output_dir=tmp_path / "f")
    assert sorted(os.listdir(tmp_path)) == []


def test_gguf_output_checked_before_calibration(tokenizer, tmp_path, monkeypatch):
    """A GGUF export oneshot cannot write (a tokenizer or rope scaling lowbit cannot convert) is
    refused before the calibration data is even read."""
    import sys

    oneshot_module = sys.modules["lowbit.pipeline.oneshot"]

    def never(*args, **kwargs):
        raise AssertionError("calibration started")

    monkeypatch.setattr(oneshot_module, "prepare_calibration", never)
    gptq = lowbit.GPTQModifier(scheme="Q4_K_M", ignore=["lm_head"])
    with pytest.raises(ValueError, match="pre-tokenizer|byte-level BPE"):
        lowbit.oneshot(tm.make_gguf_model("llama"), recipe=gptq, dataset=tm.TEXTS, output_dir=tmp_path / "a",
                       save_format="gguf", tokenizer=tm.make_tokenizer())
    model = tm.make_gguf_model("llama")
    model.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        lowbit.oneshot(model, recipe=gptq, dataset=tm.TEXTS, output_dir=tmp_path / "b", save_format="gguf",
                       tokenizer=tokenizer)
    assert os.listdir(tmp_path) == []


def test_gguf_output_dir_overwrite(tokenizer, tmp_path):
    """overwrite=True replaces a GGUF output directory lowbit wrote (model-<type>.gguf and
    recipe.yaml) and nothing else."""
    out = tmp_path / "out"
    lowbit.oneshot(tm.make_gguf_model("llama"), recipe="Q8_0", output_dir=out, save_format="gguf", tokenizer=tokenizer)
    with pytest.raises(ValueError, match="not empty; pass overwrite=True"):
        lowbit.oneshot(tm.make_gguf_model("llama"), recipe="Q4_0", output_dir=out, save_format="gguf",
                       tokenizer=tokenizer)
    lowbit.oneshot(tm.make_gguf_model("llama"), recipe="Q4_0", output_dir=out, save_format="gguf", tokenizer=tokenizer,
                   overwrite=True)
    assert sorted(os.listdir(out)) == ["model-Q4_0.gguf", "recipe.yaml"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds no checkpoint"):
        lowbit.oneshot(tm.make_gguf_model("llama"), recipe="Q8_0", output_dir=out, save_format="gguf",
                       tokenizer=tokenizer, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


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
    cli.main(["quantize", "--model", str(tmp_path / "model"), "--format", "gguf", "--type", "f16",
              "--output", str(tmp_path / "f16")])
    lowbit.save_gguf(model, tmp_path / "f16.gguf", tokenizer=tokenizer, type="F16")
    mine, theirs = tensors_of(tmp_path / "f16" / "model-F16.gguf"), tensors_of(tmp_path / "f16.gguf")
    assert set(mine) == set(theirs)
    for name in theirs:
        assert mine[name].tensor_type == theirs[name].tensor_type
        assert np.array_equal(np.asarray(mine[name].data), np.asarray(theirs[name].data)), name


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
