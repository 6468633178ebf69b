"""Reference GPTQ (Frantar et al., 2022): a plain transcription with a Python loop per column.

lowbit's choices, which the C++ solve follows exactly:
- Quantization parameters are computed up front from the (dead-column-zeroed) weight, as
  llmcompressor does, not at each group's first column from the error-updated weights.
- actorder None: natural column order. "static" / "weight": columns processed in descending
  diag(H) order, each using its original group's parameters (no g_idx needed). "group":
  groups formed in that permuted order; g_idx maps each original column to its group.
- The solve is the textbook one: upper Cholesky factor U of H^-1, per-column errors
  (w - q) / U[i, i] spread over the later columns of the block, one update per block for the
  columns to its right. The C++ solve computes the same result another way (no inverse).
- The damping starts at dampening_frac * mean(diag(H)); when the Cholesky factorisation
  fails it doubles, up to mean(diag(H)) itself; after that the caller falls back to RTN.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .quant import quant_params


def hessian(inputs: Tensor, h: Optional[Tensor] = None, num_samples: int = 0):
    """Running average of 2 x^T x over the rows of `inputs` [n, cols]: (H, num_samples)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    n = x.shape[0]
    if h is None:
        h = torch.zeros(x.shape[1], x.shape[1])
    total = num_samples + n
    h = h * (num_samples / total) + (x.t() @ x) * (2.0 / total)
    return h, total


def damping_steps(dampening_frac: float):
    frac = dampening_frac
    while frac < 1.0:
        yield frac
        frac *= 2
    yield 1.0


def inverse_hessian_upper(h: Tensor, dampening_frac: float) -> Optional[Tensor]:
    """The reference algorithm's upper Cholesky factor of (H + damping)^-1: Cholesky of H, its
    inverse, then the upper Cholesky factor; None if no damping makes H positive definite.
    (The C++ solve needs neither the inverse nor the second factorisation: see gptq.cpp.)"""
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for frac in damping_steps(dampening_frac):
        low, info = torch.linalg.cholesky_ex(h + eye * (frac * mean_diag))
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True)
    return None


def column_groups(h: Tensor, cols: int, group_size: int, actorder: Optional[str]):
    """(perm, group of each permuted column, g_idx of each original column, parameter order)."""
    natural = torch.arange(cols)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if actorder else natural
    if actorder == "group":
        group_of_position = natural // group_size
        g_idx = torch.empty(cols, dtype=torch.int32)
        g_idx[perm] = group_of_position.to(torch.int32)
        return perm, group_of_position, g_idx, perm
    return perm, perm // group_size, (natural // group_size).to(torch.int32), natural


def gptq(weight: Tensor, h: Tensor, *, bits: int, group_size: int, symmetric: bool,
         actorder: Optional[str], block_size: int = 128, dampening_frac: float = 0.01,
         compute_dtype: torch.dtype = torch.float32):
    """(codes int8 [rows, cols], scale [rows, groups], zero int8 [rows, groups], g_idx int32
    [cols], loss, updated weight fp32 [rows, cols]); codes are plain RTN if no damping made H
    positive definite. compute_dtype float64 gives the exact answer to compare against where
    H is ill-conditioned (real activations): the textbook's explicit inverse loses ~1e-4 of
    relative accuracy in float32 there, the C++ solve (no inverse) about 1e-6."""
    w = weight.to(compute_dtype).clone()
    h = h.to(compute_dtype).clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm, col_group, g_idx, param_order = column_groups(h, cols, group_size, actorder)
    scale, zero = quant_params(w[:, param_order].to(weight.dtype), bits, symmetric, group_size)
    s, z = scale.to(compute_dtype), zero.to(compute_dtype)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    w, h = w[:, perm], h[perm][:, perm]
    upper = inverse_hessian_upper(h, dampening_frac)
    codes = torch.empty(rows, cols, dtype=torch.int8)
    loss = torch.zeros((), dtype=torch.float64)
    if upper is None:
        upper = torch.eye(cols, dtype=compute_dtype)  # RTN: no error feedback
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col, g = i1 + i, col_group[i1 + i]
            x = w1[:, i]
            q = torch.round(torch.clamp(x / s[:, g] + z[:, g], qmin, qmax))
            codes[:, col] = q.to(torch.int8)
            deq = (q - z[:, g]) * s[:, g]
            d = upper[col, col]
            err = (x - deq) / d
            loss += ((x - deq) ** 2).sum().double() / (2 * d.double() ** 2)
            w1[:, i + 1:] -= err[:, None] * upper[col, i1 + i + 1:i2][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
        w[:, i1:i2] = w1
    inverse = torch.argsort(perm)
    return codes[:, inverse], scale, zero, g_idx, loss.item(), w[:, inverse].float()
