"""lowbit.imatrix: llama.cpp's importance matrix, gathered in lowbit's layer-sequential pass."""

from __future__ import annotations

from ..ggml import IMatrix
from ..modifiers.imatrix import IMatrixGatherer
from .oneshot import oneshot


def imatrix(model, dataset, *, targets="Linear", ignore=None, num_calibration_samples: int = 512,
            max_seq_length: int = None, tokenizer=None, **kwargs) -> IMatrix:
    """Run `dataset` through `model` one decoder layer at a time (nothing is quantized) and
    return llama.cpp's statistics of every targeted Linear in the decoder layers: the sum of x^2
    per input column and the token count. Pass it to lowbit.save_gguf(imatrix=...) or write it
    with lowbit.save_imatrix for llama-quantize --imatrix. Other keyword arguments are oneshot's
    (text_column, seed, shuffle_calibration_samples, ...)."""
    gatherer = IMatrixGatherer(targets=targets, ignore=ignore)
    oneshot(model, recipe=[gatherer], dataset=dataset, num_calibration_samples=num_calibration_samples,
            max_seq_length=max_seq_length, tokenizer=tokenizer, **kwargs)
    return gatherer.imatrix
