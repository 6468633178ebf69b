"""Calibration data in any of llmcompressor's forms -> a list of tokenized samples
(dicts of input_ids / attention_mask, each [1, L])."""

from __future__ import annotations

import csv
import json
import os
import random
from typing import Dict, List

import torch

Sample = Dict[str, torch.Tensor]

# llmcompressor's default calibration length.
DEFAULT_MAX_SEQ_LENGTH = 384


def _texts_from_file(path: str, text_column: str) -> list:
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            # Paragraphs (blank-line separated) are the samples.
            return [p.strip() for p in f.read().split("\n\n") if p.strip()]
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, list) else data.get("data", [data])
    if path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"dataset file {path!r}: lowbit reads .txt (paragraphs), .jsonl, .json and .csv")


def _select_split(dataset, splits):
    """llmcompressor's `splits` ("train", "train[:5%]", ["train[10:20]"], {"calibration": "train"})
    applied to local data with datasets' own split grammar: a DatasetDict gives the named split,
    anything else is one split whose rows are sliced."""
    if splits is None:
        return dataset
    if isinstance(splits, dict):
        if len(splits) != 1:
            raise ValueError(f"splits={splits!r}: oneshot calibrates on one split; give one entry")
        splits = next(iter(splits.values()))
    if isinstance(splits, (list, tuple)):
        if len(splits) != 1:
            raise ValueError(f"splits={splits!r}: oneshot calibrates on one split; give one")
        splits = splits[0]
    if not isinstance(splits, str):
        raise TypeError(f"splits must be a split spec such as 'train[:5%]', got {splits!r}")
    from datasets import ReadInstruction

    is_dict = isinstance(dataset, dict)
    if is_dict:
        name = splits.split("[")[0]
        if name not in dataset:
            raise ValueError(f"splits={splits!r}: the dataset has the splits {sorted(dataset)}")
        lengths = {k: len(v) for k, v in dataset.items()}
    else:
        name = splits.split("[")[0] or "train"
        lengths = {name: len(dataset)}
    try:
        (part,) = ReadInstruction.from_spec(splits).to_absolute(lengths)
    except (ValueError, AssertionError) as e:
        raise ValueError(f"splits={splits!r} is not a split spec such as 'train' or 'train[:5%]': {e}") from None
    rows = dataset[part.splitname] if is_dict else dataset
    if hasattr(rows, "select"):
        return rows.select(range(part.from_, part.to))
    return list(rows)[part.from_:part.to]


def _record_text(record, text_column: str, tokenizer) -> str:
    """A record's text: a plain string, its text column, or chat messages rendered with the
    tokenizer's chat template."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if "messages" in record and text_column not in record:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ValueError("chat-message samples need a tokenizer with a chat template")
            return tokenizer.apply_chat_template(record["messages"], tokenize=False)
        if text_column in record:
            return record[text_column]
        raise ValueError(f"dataset records have no {text_column!r} column (columns: {sorted(record)}); "
                         "pass text_column=")
    raise TypeError(f"cannot read a calibration sample of type {type(record).__name__}")


def _from_ids(ids, max_seq_length: int, mask=None) -> List[Sample]:
    """Samples from token ids [N, L] or [L] (and an optional attention mask of that shape)."""
    ids = torch.as_tensor(ids)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token id tensors must be integer [N, L] or [L], got {ids.dtype} of shape {tuple(ids.shape)}")
    mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask).reshape(ids.shape)
    return [{"input_ids": row[None, :max_seq_length].long(), "attention_mask": m[None, :max_seq_length].long()}
            for row, m in zip(ids, mask) if row.numel()]


def _record_sample(record, tokenizer, text_column: str, max_seq_length: int):
    """One record (text, chat messages, token ids or a dict of them) as a sample, or None if
    it holds no tokens."""
    if isinstance(record, torch.Tensor) or (isinstance(record, dict) and "input_ids" in record):
        ids, mask = (record, None) if isinstance(record, torch.Tensor) else (record["input_ids"], record.get("attention_mask"))
        samples = _from_ids(ids, max_seq_length, mask)
        return samples[0] if samples else None
    text = _record_text(record, text_column, tokenizer)
    if tokenizer is None:
        raise ValueError("text calibration data needs a tokenizer: pass tokenizer= (or a model path that has one)")
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_seq_length)
    if enc["input_ids"].shape[-1] == 0:
        return None
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def check_calibration_args(num_calibration_samples, max_seq_length) -> None:
    for name, value, optional in (("num_calibration_samples", num_calibration_samples, False),
                                  ("max_seq_length", max_seq_length, True)):
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")


def check_token_ids(samples: List[Sample], vocab_size: int) -> None:
    """Token ids index the embedding: a negative one or one past the vocabulary would read
    outside it (or fail deep inside the model)."""
    for i, sample in enumerate(samples):
        ids = sample["input_ids"]
        if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"calibration sample {i} holds token id {int(ids.min() if ids.min() < 0 else ids.max())}, "
                             f"outside the model's vocabulary [0, {vocab_size}); tokenize with the model's own "
                             "tokenizer")


def prepare_calibration(dataset, tokenizer=None, *, num_calibration_samples: int = 512,
                        max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH, text_column: str = "text",
                        shuffle: bool = True, seed: int = 0, splits=None, concatenate: bool = False,
                        pad: bool = False) -> List[Sample]:
    """Tokenized calibration samples from a list of strings, a datasets.Dataset (a text
    column, chat messages, or input_ids) or DatasetDict (with `splits`), a .txt / .jsonl /
    .json / .csv path, a DataLoader (batches of dicts or tensors), or token id tensors.
    Records are visited in a seeded random order (shuffle=True) until num_calibration_samples
    non-empty samples are found. concatenate: the samples' tokens joined and cut into
    max_seq_length pieces; pad: each sample padded to max_seq_length (attention mask 0), as
    llmcompressor's concatenate_data and pad_to_max_length."""
    check_calibration_args(num_calibration_samples, max_seq_length)
    if isinstance(dataset, (str, os.PathLike)):
        path = os.fspath(dataset)
        if not os.path.isfile(path):
            raise ValueError(f"dataset {path!r} is not a local file. lowbit works offline, so Hugging Face Hub "
                             "dataset names (such as 'open_platypus') cannot be loaded: pass a local "
                             ".txt/.jsonl/.json/.csv file (dataset= or dataset_path=), a datasets.Dataset (for "
                             "example datasets.load_from_disk(...)), or a list of texts")
        dataset = _texts_from_file(path, text_column)
    dataset = _select_split(dataset, splits)
    if isinstance(dataset, dict) and dataset and all(hasattr(v, "column_names") for v in dataset.values()):
        raise ValueError(f"got a DatasetDict with splits {sorted(dataset)}: pass one split, e.g. dataset['train']")
    if isinstance(dataset, torch.Tensor):
        records = _from_ids(dataset, max_seq_length)
    elif isinstance(dataset, torch.utils.data.DataLoader):
        records = []
        for batch in dataset:
            if isinstance(batch, dict):
                records.extend(_from_ids(batch["input_ids"], max_seq_length, batch.get("attention_mask")))
            else:
                records.extend(_from_ids(batch[0] if isinstance(batch, (list, tuple)) else batch, max_seq_length))
    elif isinstance(dataset, dict) and "input_ids" in dataset:
        records = _from_ids(dataset["input_ids"], max_seq_length, dataset.get("attention_mask"))
    elif hasattr(dataset, "column_names") or isinstance(dataset, (list, tuple)):  # datasets.Dataset or records
        records = list(dataset)
    else:
        raise TypeError(f"unsupported dataset type {type(dataset).__name__}: pass a list of strings, a "
                        "datasets.Dataset, a .txt/.jsonl/.json path, a DataLoader or token id tensors")
    order = list(range(len(records)))
    if shuffle:
        random.Random(seed).shuffle(order)
    samples, tokens = [], 0
    # Concatenated samples are cut into max_seq_length pieces after joining: read them whole,
    # until the pieces are all there.
    length = None if concatenate else max_seq_length
    for i in order:
        sample = _record_sample(records[i], tokenizer, text_column, length)
        if sample is not None:
            samples.append(sample)
            tokens += int(sample["attention_mask"].sum())
            if (tokens >= num_calibration_samples * max_seq_length) if concatenate \
                    else len(samples) == num_calibration_samples:
                break
    if concatenate and samples:
        ids = torch.cat([s["input_ids"][s["attention_mask"].bool()][None] for s in samples], dim=1)[0]
        samples = _pieces(ids, max_seq_length)[:num_calibration_samples]
    if not samples:
        raise ValueError("the calibration dataset is empty (no sample has any tokens)")
    if pad:
        samples = [_padded(s, max_seq_length, tokenizer) for s in samples]
    return samples


def _pieces(ids: torch.Tensor, length: int) -> List[Sample]:
    """Token ids cut into consecutive pieces of `length` (the last one shorter)."""
    return [{"input_ids": p[None].long(), "attention_mask": torch.ones_like(p)[None].long()} for p in ids.split(length)]


def _padded(sample: Sample, length: int, tokenizer) -> Sample:
    """The sample padded on the right to `length` tokens with the pad token, masked out."""
    n = sample["input_ids"].shape[-1]
    if n >= length:
        return sample
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    if pad_id is None:
        raise ValueError("pad_to_max_length=True needs a tokenizer with a pad (or eos) token")
    extra = length - n
    return {"input_ids": torch.cat([sample["input_ids"], torch.full((1, extra), pad_id, dtype=torch.long)], 1),
            "attention_mask": torch.cat([sample["attention_mask"], torch.zeros(1, extra, dtype=torch.long)], 1)}
