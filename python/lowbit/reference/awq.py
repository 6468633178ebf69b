"""Reference AWQ (Lin et al., 2023) kernels, in plain PyTorch: the activation statistic, the
scale search's loss for one grid point and the clip search, as lowbit.ops computes them.

Losses are the output error ||X D^T||^2 of a weight error D, written with the Gram matrix
G = X^T X as sum((D G) * D) (a test checks the identity against X itself)."""

from __future__ import annotations

import torch
from torch import Tensor

from .quant import _fake, _params


def channel_stats(inputs: Tensor, sum_abs: Tensor = None, count: int = 0):
    """(sum over tokens of |x| per input channel, float64; tokens so far)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    total = x.abs().sum(0, dtype=torch.float64)
    return (total if sum_abs is None else sum_abs + total), count + x.shape[0]


def _group_fake_quant(w: Tensor, bits: int, group_size: int, symmetric: bool, dtype: torch.dtype) -> Tensor:
    rows, cols = w.shape
    x = w.reshape(rows, cols // group_size, group_size)
    scale, zero = _params(x.amin(-1), x.amax(-1), bits, symmetric, dtype)
    return _fake(x, scale[..., None], zero[..., None], bits).reshape(rows, cols)


def scale_loss(weight: Tensor, gram: Tensor, scales: Tensor, bits: int, group_size: int, symmetric: bool) -> float:
    """sum((D G) * D) for D = W - Q(W * s) / s."""
    w = weight.float()
    s = scales.float()[None, :]
    d = w - _group_fake_quant(w * s, bits, group_size, symmetric, weight.dtype) / s
    return ((d @ gram.float()) * d).sum(dtype=torch.float64).item()


def clip(weight: Tensor, gram: Tensor, bits: int, group_size: int, symmetric: bool, n_grid: int = 20,
         max_shrink: float = 0.5) -> Tensor:
    """Per (row, group), the bound absmax * (1 - i / n_grid), i < max_shrink * n_grid, whose
    clamped, quantized group has the smallest d^T G_gg d; float32 [rows, groups]."""
    w = weight.float()
    rows, cols = w.shape
    groups = cols // group_size
    x = w.reshape(rows, groups, group_size)
    absmax = x.abs().amax(-1)
    best_err = torch.full((rows, groups), float("inf"))
    best = absmax.clone()
    for i in range(max(1, int(max_shrink * n_grid))):
        bound = absmax * (1 - i / n_grid)
        c = torch.maximum(torch.minimum(x, bound[..., None]), -bound[..., None])
        scale, zero = _params(c.amin(-1), c.amax(-1), bits, symmetric, weight.dtype)
        d = x - _fake(c, scale[..., None], zero[..., None], bits)
        err = torch.stack([(d[:, g] @ gram[g * group_size:(g + 1) * group_size, g * group_size:(g + 1) * group_size]
                            * d[:, g]).sum(-1) for g in range(groups)], dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, bound, best)
    return best


def weight_mean(weight: Tensor, group_size: int) -> Tensor:
    """|w| over its group's absmax (+1e-6), averaged over output rows."""
    rows, cols = weight.shape
    w = weight.float().abs().reshape(rows, cols // group_size, group_size)
    return (w / (w.amax(-1, keepdim=True) + 1e-6)).reshape(rows, cols).mean(0, dtype=torch.float64).float()


def search(weight: Tensor, gram: Tensor, x_mean: Tensor, bits: int, group_size: int, symmetric: bool,
           duo_scaling: bool = True, n_grid: int = 20):
    """llmcompressor's grid walk, scored by scale_loss: (scales, ratio, duo, losses). With
    duo_scaling the grid is the identity-like point (0, plain) then n_grid - 1 duo points."""
    if duo_scaling:
        grid = [(0.0, False)] + [(i / (n_grid - 2), True) for i in range(n_grid - 1)]
    else:
        grid = [(i / (n_grid - 1), False) for i in range(n_grid)]
    w_mean = weight_mean(weight, group_size)
    x = x_mean.float()
    best, losses = None, []
    for ratio, duo in grid:
        s = x.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4) if duo else x.pow(ratio)
        s = s.clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s[~torch.isfinite(s)] = 1
        losses.append(scale_loss(weight, gram, s, bits, group_size, symmetric))
        if best is None or losses[-1] < best[3]:
            best = (s, ratio, duo, losses[-1])
    return best[0], best[1], best[2], losses
