"""Reference NF4 / FP4 blockwise quantization (QLoRA, bitsandbytes), in plain PyTorch, as the
published algorithm states it: flatten, per block absmax, scale (full blocks by the
reciprocal, a final partial block by division), clamp to [-1, 1], nearest code by
bucketizing against the midpoints of the sorted codes, two codes per byte (high nibble
first, an odd count padded with the code of 0)."""

from __future__ import annotations

import torch
from torch import Tensor

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
FP4 = [v / 12 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3)] + [-v / 12 for v in (0, 0.0625, 8, 12, 4, 6, 2, 3)]


def code(quant_type: str) -> Tensor:
    return torch.tensor(NF4 if quant_type == "nf4" else FP4, dtype=torch.float32)


def quantize(w: Tensor, blocksize: int, quant_type: str):
    """(packed uint8 [(n + 1) // 2, 1], absmax float32 [blocks])."""
    values = code(quant_type)
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    midpoints = (sorted_values[:-1] + sorted_values[1:]) / 2
    x = w.reshape(-1).float()
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].reshape(-1, blocksize)
    absmax = blocks.abs().amax(1)
    scaled = [(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).reshape(-1)]
    if full < n:
        tail_max = x[full:].abs().amax().clamp(min=1e-38)  # kept clamped, unlike full blocks' absmax
        absmax = torch.cat([absmax, tail_max[None]])
        scaled.append(x[full:] / tail_max)
    scaled = torch.cat(scaled).clamp(-1, 1)
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    q = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    return ((q[0::2] << 4) | q[1::2])[:, None], absmax


def dequantize(packed: Tensor, absmax: Tensor, blocksize: int, quant_type: str, shape, dtype) -> Tensor:
    flat = packed.reshape(-1)
    q = torch.stack([flat >> 4, flat & 15], 1).reshape(-1).long()
    n = 1
    for d in shape:
        n *= d
    values = code(quant_type)[q[:n]]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).reshape(shape)
