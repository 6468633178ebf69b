"""Perplexity and KL divergence of causal LMs over sliding windows of token ids."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

Texts = Union[str, Sequence[str], Tensor]


def _token_ids(texts_or_ids: Texts, tokenizer) -> Tensor:
    """1-D int64 token ids from a string, a list of strings (joined with a blank line, as
    HF's perplexity guide joins WikiText) or a 1-D / [1, N] id tensor."""
    if isinstance(texts_or_ids, Tensor):
        ids = texts_or_ids
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"token ids must be 1-D or [1, N], got shape {tuple(texts_or_ids.shape)}; "
                             "concatenate the documents into one sequence")
        ids = ids.long()
    else:
        if isinstance(texts_or_ids, str):
            text = texts_or_ids
        elif isinstance(texts_or_ids, (list, tuple)) and texts_or_ids and all(isinstance(t, str) for t in texts_or_ids):
            text = "\n\n".join(texts_or_ids)
        else:
            raise TypeError("texts_or_ids must be a string, a non-empty list of strings or a tensor of token ids, "
                            f"got {type(texts_or_ids).__name__}")
        if tokenizer is None:
            raise ValueError("text input needs a tokenizer: pass tokenizer=AutoTokenizer.from_pretrained(...) "
                             "or pass token ids instead")
        ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if ids.numel() < 2:
        raise ValueError(f"need at least 2 tokens to score a next-token prediction, got {ids.numel()}")
    return ids


def _check_windows(seq_len: int, stride: int) -> None:
    # A window needs one token of context and one to predict.
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an integer >= 2 (tokens per window), got {seq_len!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 0 < stride <= seq_len:
        raise ValueError(f"stride must be an integer in 1..seq_len ({seq_len}), got {stride!r}; "
                         "stride=None means seq_len (non-overlapping windows)")


def _windows(n: int, seq_len: int, stride: int) -> Iterator[Tuple[int, int, int]]:
    """(begin, end, first_scored) per window, as HF's perplexity guide slides them: windows
    of seq_len tokens start every `stride` tokens and score only the tokens the previous
    window did not reach; a window's first token has no context and is never scored."""
    begin = prev_end = 0
    while True:
        end = min(begin + seq_len, n)
        first = max(prev_end, begin + 1)
        if first < end:
            yield begin, end, first
        if end == n:
            return
        prev_end, begin = end, begin + stride


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _logits(model: nn.Module, ids: Tensor) -> Tensor:
    # No KV cache: each window is scored in one forward pass.
    out = model(input_ids=ids.to(_device(model)), use_cache=False)
    logits = getattr(out, "logits", None)
    if logits is None:
        raise ValueError(f"{type(model).__name__} returned no logits: pass a causal LM "
                         "(AutoModelForCausalLM), not a bare backbone or an encoder")
    if logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise ValueError(f"expected logits of shape [batch, seq, vocab] = [{ids.shape[0]}, {ids.shape[1]}, V], "
                         f"got {tuple(logits.shape)}")
    return logits


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """eval() inside; the caller's training flag is restored after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def perplexity(model: nn.Module, texts_or_ids: Texts, seq_len: int = 512, stride: Optional[int] = None,
               tokenizer=None, batch_size: int = 1) -> float:
    """exp(mean next-token NLL) of `model` over the text, in windows of `seq_len` tokens that
    advance by `stride` (default seq_len: non-overlapping). With overlap the earlier tokens
    of a window are context only (label -100), so every token is scored at most once.

    texts_or_ids: a string or list of strings (needs `tokenizer`) or 1-D / [1, N] token ids.
    batch_size windows of equal length go through the model together.
    """
    stride = seq_len if stride is None else stride
    _check_windows(seq_len, stride)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    ids = _token_ids(texts_or_ids, tokenizer)

    nll, count = 0.0, 0

    def score(batch):
        nonlocal nll, count
        inputs = torch.stack([ids[b:e] for b, e, _ in batch])
        labels = inputs.clone()
        for row, (b, _, first) in enumerate(batch):
            labels[row, :first - b] = -100
        logits = _logits(model, inputs)
        # Position i predicts token i + 1; float32 like HF's loss even for half-precision logits.
        targets = labels[:, 1:].to(logits.device)
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                               ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())

    with torch.inference_mode(), _eval_mode(model):
        batch = []
        for window in _windows(ids.numel(), seq_len, stride):
            if batch and (len(batch) == batch_size or window[1] - window[0] != batch[0][1] - batch[0][0]):
                score(batch)
                batch = []
            batch.append(window)
        score(batch)
    return math.exp(nll / count)


def kl_divergence(model: nn.Module, base_model: nn.Module, ids_or_texts: Texts, seq_len: int = 512,
                  tokenizer=None) -> float:
    """Mean over token positions of KL(base || model) between the two models' next-token
    distributions (float64 log-softmax), in non-overlapping windows of `seq_len` tokens.
    Every position of a window counts, the last included: each is a full distribution."""
    _check_windows(seq_len, seq_len)
    ids = _token_ids(ids_or_texts, tokenizer)
    total, count = 0.0, 0
    with torch.inference_mode(), _eval_mode(model), _eval_mode(base_model):
        for begin in range(0, ids.numel(), seq_len):
            window = ids[begin:begin + seq_len].unsqueeze(0)
            base = F.log_softmax(_logits(base_model, window)[0].double(), dim=-1)
            quant = F.log_softmax(_logits(model, window)[0].to(base.device, torch.float64), dim=-1)
            if quant.shape != base.shape:
                raise ValueError(f"the models' vocabularies differ ({quant.shape[-1]} vs base {base.shape[-1]}); "
                                 "compare a quantized model with the model it was quantized from")
            p = base.exp()
            # Where the base gives probability 0 the term is 0 even if the model's log-prob is -inf.
            total += torch.where(p > 0, p * (base - quant), 0.0).sum().item()
            count += window.shape[1]
    return total / count
