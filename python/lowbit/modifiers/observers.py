"""Static activation scales: the range of a Linear's input on the calibration data, observed as
llmcompressor's observers do it for input activations (one update per calibration sample)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..schemes import FP8_MAX, QuantizationArgs

# llmcompressor's moving-average observers ("minmax", "mse"): each sample moves the range by 1%.
AVERAGING_CONSTANT = 0.01
# Its activation MSE search: shrink factors 1 - i / GRID for i < MAXSHRINK * GRID, |error|^NORM.
MSE_SEARCH = {"maxshrink": 0.20, "grid": 100, "norm": 2.4}


class ActivationRange:
    """The running (min, max) of one Linear's input for a static per-tensor scale.

    observer "static_minmax": min and max over all samples; "minmax": a moving average of
    each sample's min and max; "mse" the same of each sample's MSE-searched range;
    "memoryless_minmax" / "memoryless_mse": the last sample's. The scale is
    max(|min|, |max|) / 127.5 for int8 (compressed-tensors' symmetric range) or / 448 for FP8.
    """

    def __init__(self, args: QuantizationArgs, name: str):
        self.args, self.name = args, name
        # each sample's (min, max), folded in sample order by scale(): a distributed run gathers the
        # ranks' records into the single-process order (reduce) and folds the same sequence
        self.records = []

    def update(self, x: Tensor) -> None:
        x = x.detach().reshape(1, -1).float()
        if x.numel() == 0:
            return
        low, high = x.min(), x.max()
        if not (torch.isfinite(low) and torch.isfinite(high)):
            raise ValueError(f"{self.name}: non-finite activations (NaN or Inf) in the calibration pass; the static "
                             "activation scale cannot be calibrated. Check the model and data (fp16 overflow? use "
                             "float32 or bfloat16)")
        if self.args.observer in ("mse", "memoryless_mse"):
            absmax = torch.maximum(-low, high).clamp_min(1e-30)
            scale, _ = ops.quant_params(x, self.args.num_bits, True, x.shape[1], "mse", **MSE_SEARCH)
            shrink = scale.reshape(()) * ((1 << self.args.num_bits) - 1) / 2 / absmax
            low, high = low * shrink, high * shrink
        self.records.append((low, high))

    def reduce(self, group) -> None:
        """Every rank's records, in global sample order (distributed calibration)."""
        self.records = group.interleave(group.gather(self.records, f"{self.name} activation range"))

    def _fold(self):
        low, high = self.records[0]
        for x_low, x_high in self.records[1:]:
            if self.args.observer.startswith("memoryless"):
                low, high = x_low, x_high
            elif self.args.observer == "static_minmax":
                low, high = torch.minimum(low, x_low), torch.maximum(high, x_high)
            else:
                low, high = torch.lerp(low, x_low, AVERAGING_CONSTANT), torch.lerp(high, x_high, AVERAGING_CONSTANT)
        return low, high

    def scale(self, dtype: torch.dtype) -> Tensor:
        """The input_scale [1] in `dtype` (a zero range gets the dtype's eps, as compressed-tensors)."""
        if not self.records:
            raise ValueError(f"{self.name} saw no calibration data: its static activation scale needs the layer to "
                             "run on the dataset")
        low, high = self._fold()
        absmax = torch.maximum(-low.clamp_max(0), high.clamp_min(0))
        levels = FP8_MAX if self.args.type == "float" else ((1 << self.args.num_bits) - 1) / 2
        scale = (absmax / levels).to(dtype).reshape(1)
        return torch.where(scale == 0, torch.finfo(dtype).eps, scale)


def _total_count(group, n: int, what: str) -> int:
    """A per-rank count summed over the ranks."""
    return int(group.sum_(torch.tensor([float(n)], dtype=torch.float64), what).item())


def reduce_sum_pair(group, pair: tuple, what: str) -> tuple:
    """(sum tensor, count) summed over the ranks (E[x^2] sums)."""
    total, n = pair
    count = _total_count(group, n, what)
    return group.sum_(total, what), count


def reduce_average_pair(group, pair: tuple, what: str) -> tuple:
    """(running average, count) -> the average over every rank's rows: sum_r avg_r * n_r / N
    (GPTQ's Hessians, AWQ's Gram matrices), updated in place."""
    average, n = pair
    count = _total_count(group, n, what)
    group.sum_(average.mul_(n), what).div_(max(count, 1))
    return average, count


def add_squares(totals: dict, name: str, x: Tensor) -> None:
    """totals[name] = (sum of x^2 per input column in float64, tokens seen), one calibration input
    x [..., columns] added: E[x^2] for imatrix_mse, llama.cpp's importance matrix, GGUF schemes."""
    x2d = x.detach().reshape(-1, x.shape[-1])
    total, n = totals.get(name, (0.0, 0))
    totals[name] = (x2d.double().pow(2).sum(0) + total, n + x2d.shape[0])
