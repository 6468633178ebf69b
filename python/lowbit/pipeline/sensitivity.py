"""lowbit.sensitivity: how much each Linear suffers under each candidate weight scheme."""

from __future__ import annotations

from ..modifiers.sensitivity import SensitivityGatherer, SensitivityReport
from .oneshot import oneshot


def sensitivity(model, dataset, options=("W2A16", "W3A16", "W4A16", "W8A16"), method: str = "rtn", *,
                group_size: int = None, targets="Linear", ignore=("lm_head",), num_calibration_samples: int = 512,
                max_seq_length: int = None, tokenizer=None, **kwargs) -> SensitivityReport:
    """Run `dataset` through `model` (forward and backward once for the loss gradients, then one
    decoder layer at a time; nothing is quantized, each layer is fed the float outputs of the one
    before) and score every targeted Linear under every option (weight-only integer schemes with
    group_size replacing their group size, or ggml block types) with method 'rtn'
    (round-to-nearest) or 'gptq' (GPTQ on the layer's Hessian): its stored bytes, the error it
    adds to the Linear's output on the calibration tokens, and the loss increase that error
    would cause (see SensitivityRow). -> SensitivityReport
    (to_markdown(), to_csv(), plot()); lowbit.allocate(report, budget) chooses from it. Other
    keyword arguments are oneshot's (text_column, seed, shuffle_calibration_samples, ...)."""
    gatherer = SensitivityGatherer(options, method=method, group_size=group_size, targets=targets, ignore=ignore)
    oneshot(model, recipe=[gatherer], dataset=dataset, num_calibration_samples=num_calibration_samples,
            max_seq_length=max_seq_length, tokenizer=tokenizer, **kwargs)
    return gatherer.report
