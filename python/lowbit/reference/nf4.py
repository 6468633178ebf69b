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
# FP4: sign bit 3, then 2 exponent bits and 1 mantissa bit, divided by 12 in float32; code 8
# is +0 (bitsandbytes' table, which its checkpoints store as quant_map).
FP4_TIMES_12 = [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3]


def code(quant_type: str) -> Tensor:
    """The 16 code values (bitsandbytes' quant_map), float32."""
    if quant_type == "nf4":
        return torch.tensor(NF4, dtype=torch.float32)
    return torch.tensor(FP4_TIMES_12, dtype=torch.float32) / 12


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


def dynamic_map() -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted values in [-0.99297, 1]): for each of
    7 decades, the means of 2^i + 1 evenly spaced fractions in [0.1, 1], both signs, plus 0 and 1."""
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def blockwise8_quantize(x: Tensor, code: Tensor, blocksize: int):
    """bitsandbytes' CPU 8-bit blockwise rule: 65536 bins over [-1, 1], each holding the code
    whose midpoints lie below the bin's left edge; (codes uint8 [n], absmax float32 [blocks])."""
    c = code.float()
    mid = (c[:-1] + c[1:]) * 0.5
    i = torch.arange(65536, dtype=torch.float32)
    lut = torch.searchsorted(mid, (i + i) / 65535.0 - 1.0).to(torch.uint8)
    flat = x.reshape(-1).float()
    n = flat.numel()
    pad = (-n) % blocksize
    blocks = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, blocksize)
    absmax = blocks.abs().amax(1)
    v = (blocks * (1.0 / absmax)[:, None]).clamp(-1, 1)
    t = (v + 1.0) * 0.5
    k = (t.double() * 65535.0 + 0.5).float().long() & 0xFFFF  # one rounding, as the FMA the library uses
    q = torch.where(absmax[:, None] == 0, torch.zeros_like(k), lut[k].long()).to(torch.uint8)
    return q.reshape(-1)[:n], absmax


def double_quantize(absmax: Tensor, blocksize: int = 256):
    """(uint8 codes of absmax - mean, nested absmax, the mean as a float32 0-d tensor)."""
    offset = absmax.mean()
    q, nested = blockwise8_quantize(absmax - offset, dynamic_map(), blocksize)
    return q, nested, offset
