"""Tiny, seeded, randomly initialised causal LMs and an offline character-level tokenizer
for the oneshot / recipe / format tests. Nothing is downloaded: every model is built from a
config in-process, and the tokenizer from a vocabulary written here.

Every architecture has 2 decoder layers, a vocabulary of 256 and hidden / intermediate
sizes that are multiples of 32, so group_size 32 divides every Linear's input columns.
"""

from __future__ import annotations

import os
import string
import zlib

import torch

# Group size that divides every quantized layer's input columns of every tiny model.
GROUP = 32
VOCAB = 256

# name -> (config class name, config kwargs). hidden sizes are multiples of 64, except
# llama_h96 (96 = 3 * 32: not a multiple of 64 or 128).
ARCHS = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=256)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256, sliding_window=None)),
    "opt": ("OPTConfig", dict(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                              max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3)),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_inner=128, n_head=4, n_positions=256, bos_token_id=2,
                                eos_token_id=3)),
    "phi": ("PhiConfig", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                              max_position_embeddings=256, partial_rotary_factor=0.5)),
    "llama_h96": ("LlamaConfig", dict(hidden_size=96, intermediate_size=192, num_attention_heads=3,
                                      num_key_value_heads=3, max_position_embeddings=256)),
    # Wide enough for the presets' group_size 128.
    "llama_h128": ("LlamaConfig", dict(hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=256)),
}
# The six distinct architectures, plus a Llama whose width (96) is not a multiple of 64 / 128.
ARCH_NAMES = ["llama", "qwen2", "mistral", "opt", "gpt2", "phi", "llama_h96"]


def make_config(arch: str):
    import transformers

    cls_name, kwargs = ARCHS[arch]
    layers = {"n_layer": 2} if arch == "gpt2" else {"num_hidden_layers": 2}
    cfg = getattr(transformers, cls_name)(vocab_size=VOCAB, **layers, **kwargs)
    if arch != "gpt2" and arch != "opt":
        cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 2, 3
    return cfg


def make_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A tiny causal LM whose weights depend only on (arch, seed)."""
    return _seeded_model(make_config(arch), f"{arch}/{seed}", dtype)


def _seeded_model(cfg, key: str, dtype: torch.dtype):
    """The model of `cfg`, its weights depending only on `key`."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(key.encode()))
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        # transformers' default init is N(0, 0.02), with zero biases and unit norms; give the
        # biases and norms some spread so they matter, and enlarge the weights a little so
        # the logits are not all ~0.
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.data.add_(torch.randn_like(p) * 0.05)
            else:
                p.data.mul_(2.0)
    return model.eval()


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer(chat_template: bool = True):
    """A character-level tokenizer (printable ASCII plus 4 specials), built offline."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) < VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Quantization maps floating point weights to a small integer grid.",
    "Round to nearest picks the closest representable value for every weight.",
    "Calibration data is run through the model one decoder layer at a time.",
    "Packed int32 words hold eight four-bit codes each.",
    "A group of thirty-two columns shares one scale and one zero point.",
    "Hello world! 0123456789 and some punctuation: ;,.?",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit.",
]


def fixed_ids(n: int = 2, length: int = 24, seed: int = 1234) -> torch.Tensor:
    """Deterministic token ids [n, length] (valid for every tiny model)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, VOCAB, (n, length), generator=g)


def save_float(arch: str, path, seed: int = 0, tokenizer: bool = False) -> str:
    """Save the float tiny model (and optionally the tokenizer) to `path`."""
    path = os.fspath(path)
    make_model(arch, seed).save_pretrained(path)
    if tokenizer:
        make_tokenizer().save_pretrained(path)
    return path


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def w4_group_modifier(symmetric: bool = True, bits: int = 4, group_size: int = GROUP, strategy: str = "group",
                      **kw):
    """QuantizationModifier with a single config group (llmcompressor's config_groups form)."""
    import lowbit

    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": strategy,
               "group_size": group_size if strategy == "group" else None}
    return lowbit.QuantizationModifier(
        config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
        targets="Linear", ignore=kw.pop("ignore", ["lm_head"]), **kw)


def run_python(code: str, *args: str, timeout: float = 120):
    """Run `code` in a fresh interpreter (`python -c code args...`), single-threaded, and fail
    with its output if it exits non-zero."""
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"subprocess failed (rc {proc.returncode}):\n--- stdout\n{proc.stdout[-4000:]}"
                             f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def transformers_quantized(arch: str, bnb_kwargs: dict, dtype: torch.dtype, path) -> str:
    """The float tiny model quantized by transformers + bitsandbytes
    (BitsAndBytesConfig(**bnb_kwargs), e.g. load_in_4bit=True or load_in_8bit=True), saved to
    `path`/transformers; returns that directory."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    path = os.fspath(path)
    float_dir = os.path.join(path, "float")
    make_model(arch, dtype=dtype).save_pretrained(float_dir)
    compute = {"bnb_4bit_compute_dtype": dtype} if bnb_kwargs.get("load_in_4bit") else {}
    config = BitsAndBytesConfig(**{**compute, **bnb_kwargs})
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config, device_map="cpu", dtype=dtype)
    model.save_pretrained(os.path.join(path, "transformers"))
    return os.path.join(path, "transformers")


# Runs in a fresh interpreter that never imports lowbit: stock transformers + bitsandbytes load
# each directory; for every Linear4bit its dequantized weight (taken before the forward pass:
# bitsandbytes' CPU forward repacks the weight in place), for every Linear8bitLt its CB and SCB,
# and the logits on the given ids.
BNB_STOCK_READER = r"""
import json, sys, traceback
import torch
torch.set_num_threads(1)
import transformers, bitsandbytes
import bitsandbytes.functional as bnb_functional
from transformers import AutoModelForCausalLM
transformers.logging.set_verbosity_error()
cases, ids_path, out_path = json.loads(sys.argv[1])
ids = torch.load(ids_path)
results = {}
for name, path in cases.items():
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, device_map="cpu")
        model.eval()
        weights = {}
        with torch.inference_mode():
            for n, m in model.named_modules():
                if isinstance(m, bitsandbytes.nn.Linear4bit):
                    weights[n] = bnb_functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
                elif isinstance(m, bitsandbytes.nn.Linear8bitLt):
                    weights[n] = (m.weight.data.clone(), m.weight.SCB.clone())
            out = model(input_ids=ids).logits.float()
        results[name] = {"logits": out, "missing": sorted(info["missing_keys"]), "weights": weights,
                         "unexpected": sorted(info["unexpected_keys"])}
    except Exception:
        results[name] = {"error": traceback.format_exc()}
assert "lowbit" not in sys.modules, "the stock reader imported lowbit"
torch.save(results, out_path)
"""


def read_with_stock_bitsandbytes(dirs: dict, ids: torch.Tensor, workdir) -> dict:
    """name -> what BNB_STOCK_READER found in directory dirs[name] (or {"error": traceback})."""
    import json

    workdir = os.fspath(workdir)
    torch.save(ids, os.path.join(workdir, "stock_ids.pt"))
    out = os.path.join(workdir, "stock.pt")
    run_python(BNB_STOCK_READER, json.dumps([{n: os.fspath(d) for n, d in dirs.items()},
                                             os.path.join(workdir, "stock_ids.pt"), out]), timeout=300)
    return torch.load(out)


def stock_quantized_layers(stock: dict, model, kind) -> dict:
    """name -> the `kind` layers of lowbit's `model`, once checked that the stock reader loaded
    the directory without error, missing or unexpected keys, and quantized the same layers
    (all 14 Linears but lm_head of a tiny model)."""
    assert "error" not in stock, stock.get("error")
    assert stock["missing"] == [] and stock["unexpected"] == []
    layers = {n: m for n, m in model.named_modules() if isinstance(m, kind)}
    assert sorted(stock["weights"]) == sorted(layers) and len(layers) == 14
    return layers


# Tiny models for GGUF: rows of 256 columns (a K-quant super-block) and a byte-level BPE
# vocabulary, which llama.cpp's tokenizer reads. 2 decoder layers, GQA.
_GGUF_SIZES = dict(hidden_size=256, intermediate_size=512, max_position_embeddings=512)
GGUF_ARCHS = {
    **{arch: (ARCHS[arch][0], {**ARCHS[arch][1], **_GGUF_SIZES}) for arch in ("llama", "qwen2", "mistral")},
    "qwen3": ("Qwen3Config", {**ARCHS["qwen2"][1], **_GGUF_SIZES, "head_dim": 32}),
    # llama.cpp's per-tensor rules count layers (the first / last eighth, every third, the first
    # sixteenth) and fall back on rows that are not a multiple of 256 (288 columns here): 16
    # layers exercise every rule.
    "rules": ("LlamaConfig", dict(hidden_size=288, intermediate_size=512, num_attention_heads=9,
                                  num_key_value_heads=3, max_position_embeddings=512, num_hidden_layers=16)),
}
GGUF_VOCAB = 512


def make_bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2's pre-tokenizer, 512 tokens) trained offline on TEXTS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=GGUF_VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXTS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_gguf_model(arch: str = "llama", seed: int = 0, tie_word_embeddings: bool = False):
    """A tiny causal LM for GGUF export (see GGUF_ARCHS), weights depending only on (arch, seed)."""
    import transformers

    cls_name, kwargs = GGUF_ARCHS[arch]
    kwargs = {"num_hidden_layers": 2, **kwargs}
    cfg = getattr(transformers, cls_name)(vocab_size=GGUF_VOCAB, tie_word_embeddings=tie_word_embeddings, **kwargs)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    return _seeded_model(cfg, f"gguf/{arch}/{seed}", torch.float32)
