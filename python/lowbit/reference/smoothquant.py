"""Reference SmoothQuant activation statistic in plain PyTorch: the running minimum and maximum of
each input channel over the calibration tokens (llmcompressor's SmoothQuantModifier)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def channel_range(x: Tensor, mins: Optional[Tensor] = None, maxs: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(mins, maxs) float32 [C] updated with x [..., C] (new tensors; +inf / -inf to start)."""
    x2d = x.reshape(-1, x.shape[-1])
    lo, hi = x2d.amin(0).float(), x2d.amax(0).float()
    if mins is None:
        return lo, hi
    return torch.minimum(mins, lo), torch.maximum(maxs, hi)
