"""Reference GGUF block quantization (llama.cpp's ggml formats) in plain PyTorch: the tests'
oracle for lowbit.ops.gguf_quantize / gguf_dequantize / gguf_grid / gguf_encode (same
signatures).

Every quantity is a float32 tensor op over all blocks (or sub-blocks) at once; loops run only
over the elements of one block where ggml accumulates a sum in order (float addition is not
associative, and a search that compares two sums picks other codes if one of them rounds
differently), over search steps and over refinement passes. Each expression keeps ggml's
operation order: ``w * x * l`` is ``(w * x) * l``, ``a * b - c * d`` two rounded products.

Rounding to an integer is ggml's nearest_int: x + 1.5 * 2^23 in float32, whose low mantissa
bits hold round-half-even(x) (the same garbage beyond 2^22); fp16 is round-to-nearest-even."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

# name -> (elements per block, bytes per block, elements per sub-block, bits per code)
TYPES = {
    "Q8_0": (32, 34, 32, 8), "Q4_0": (32, 18, 32, 4), "Q4_1": (32, 20, 32, 4), "Q5_0": (32, 22, 32, 5),
    "Q5_1": (32, 24, 32, 5), "Q2_K": (256, 84, 16, 2), "Q3_K": (256, 110, 16, 3), "Q4_K": (256, 144, 32, 4),
    "Q5_K": (256, 176, 32, 5), "Q6_K": (256, 210, 16, 6),
}

# Each block's fields in byte order (ggml-common.h); the code-bearing ones are qs, qh, ql, hmask.
LAYOUT: Dict[str, List[Tuple[str, int]]] = {
    "Q8_0": [("d", 2), ("qs", 32)],
    "Q4_0": [("d", 2), ("qs", 16)],
    "Q4_1": [("d", 2), ("m", 2), ("qs", 16)],
    "Q5_0": [("d", 2), ("qh", 4), ("qs", 16)],
    "Q5_1": [("d", 2), ("m", 2), ("qh", 4), ("qs", 16)],
    "Q2_K": [("scales", 16), ("qs", 64), ("d", 2), ("dmin", 2)],
    "Q3_K": [("hmask", 32), ("qs", 64), ("scales", 12), ("d", 2)],
    "Q4_K": [("d", 2), ("dmin", 2), ("scales", 12), ("qs", 128)],
    "Q5_K": [("d", 2), ("dmin", 2), ("scales", 12), ("qh", 32), ("qs", 128)],
    "Q6_K": [("ql", 128), ("qh", 64), ("scales", 16), ("d", 2)],
}
CODE_FIELDS = ("qs", "qh", "ql", "hmask")
GROUP_MAX_EPS = 1e-15

F32 = torch.float32


def F(v) -> Tensor:
    """A float32 constant (so that every operation rounds in float32, as C's float does)."""
    return torch.tensor(v, dtype=F32)


def gguf_type(name: str) -> str:
    upper = name.upper()
    if upper not in TYPES:
        raise ValueError(f"unknown GGUF type {name!r}; expected one of {', '.join(TYPES)}")
    return upper


def row_bytes(type: str, cols: int) -> int:
    block, nbytes, _, _ = TYPES[gguf_type(type)]
    return cols // block * nbytes


# ---------------------------------------------------------------- ggml's arithmetic

def nearest_int(v: Tensor) -> Tensor:
    """ggml's nearest_int of float32 values -> int64."""
    t = (v + F(12582912.0)).contiguous()
    return ((t.view(torch.int32) & 0x7FFFFF) - 0x400000).long()


def _trunc_i32(v: Tensor) -> Tensor:
    """C's float -> int32 truncation as x86 does it (out of range or NaN: INT32_MIN)."""
    ok = (v > F(-2147483904.0)) & (v < F(2147483648.0))
    return torch.where(ok, torch.where(ok, v, F(0.0)).trunc().long(), torch.tensor(-(2 ** 31)))


def _trunc_i8(v: Tensor) -> Tensor:
    return ((_trunc_i32(v) & 0xFF) ^ 0x80) - 0x80


def _trunc_u8(v: Tensor) -> Tensor:
    return _trunc_i32(v) & 0xFF


def _round_away(v: Tensor) -> Tensor:
    """C's roundf (halves away from zero), exactly: trunc(v) + sign(v) where |frac| >= 0.5."""
    t = v.trunc()
    return t + torch.where((v - t).abs() >= F(0.5), torch.sign(v), F(0.0))


def _i8(v: Tensor) -> Tensor:
    """An int stored into an int8_t."""
    return ((v & 0xFF) ^ 0x80) - 0x80


def fp16(v: Tensor) -> Tensor:
    """The float32 value of v stored as fp16 (round to nearest even)."""
    return v.to(torch.float16).float()


def _half_bytes(v: Tensor) -> Tensor:
    """float32 [B] -> its fp16 bytes [B, 2] (little-endian)."""
    return v.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2).long()


def sqrt(a: Tensor) -> Tensor:
    """Correctly rounded float32 sqrt (C's sqrtf). torch.sqrt may be off by an ulp (MKL's vector
    math), so its result r is corrected against the exact midpoints to its neighbours: r^2 and
    the squared midpoints are exact in float64."""
    r = torch.sqrt(a)
    lo = torch.nextafter(r, F(-float("inf")))
    hi = torch.nextafter(r, F(float("inf")))
    ad, rd = a.double(), r.double()
    m_lo, m_hi = (lo.double() + rd) / 2, (rd + hi.double()) / 2
    r = torch.where(ad < m_lo * m_lo, lo, torch.where(ad > m_hi * m_hi, hi, r))
    return torch.where(a == 0, a, r)


def _seqsum(p: Tensor) -> Tensor:
    """Sum over the last dimension in order, from 0, as a C loop accumulates a float."""
    s = torch.zeros(p.shape[:-1], dtype=F32)
    for i in range(p.shape[-1]):
        s = s + p[..., i]
    return s


def _first_absmax(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(largest |x|, the signed value where it first occurs) over the last dimension, starting
    from 0 (an all-zero group gives +0.0)."""
    amax = torch.zeros(x.shape[:-1], dtype=F32)
    vmax = torch.zeros(x.shape[:-1], dtype=F32)
    for i in range(x.shape[-1]):
        a = x[..., i].abs()
        upd = a > amax
        amax = torch.where(upd, a, amax)
        vmax = torch.where(upd, x[..., i], vmax)
    return amax, vmax


def _max_from_zero(x: Tensor) -> Tensor:
    """max(0, x...) over the last dimension as `if (v > m) m = v` from m = 0."""
    m = torch.zeros(x.shape[:-1], dtype=F32)
    for i in range(x.shape[-1]):
        m = torch.where(x[..., i] > m, x[..., i], m)
    return m


# ---------------------------------------------------------------- searches (over [B, n] groups)

def search_symmetric(x: Tensor, nmax: int, w: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """ggml's make_qx_quants (rmse_type 1): -> (scale [B], codes [B, n] = l + nmax)."""
    amax, vmax = _first_absmax(x)
    zero = amax < F(GROUP_MAX_EPS)
    w = x * x if w is None else w
    wx = w * x

    def fit(iscale):
        l = nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        lf = l.float()
        return l, _seqsum(wx * lf), _seqsum((w * lf) * lf)

    l, sumlx, suml2 = fit(F(-nmax) / vmax)
    codes = l + nmax
    scale = torch.where(suml2 != 0, sumlx / suml2, F(0.0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        l, sx, s2 = fit(-(F(nmax) + F(0.1) * F(step)) / vmax)
        upd = (s2 > 0) & (sx * sx > best * s2)
        codes = torch.where(upd[:, None], l + nmax, codes)
        scale = torch.where(upd, sx / s2, scale)
        best = torch.where(upd, scale * sx, best)
    return torch.where(zero, F(0.0), scale), torch.where(zero[:, None], 0, codes)


def search_q3(x: Tensor, nmax: int) -> Tuple[Tensor, Tensor]:
    """ggml's make_q3_quants with rmse: -> (scale [B], codes [B, n] = l + nmax)."""
    amax, vmax = _first_absmax(x)
    zero = amax < F(GROUP_MAX_EPS)
    l = nearest_int((F(-nmax) / vmax)[:, None] * x).clamp(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * l.float())
    suml2 = _seqsum((w * l.float()) * l.float())
    for _ in range(5):  # a pass that changes nothing would change nothing again: no early exit needed
        for i in range(x.shape[1]):
            li = l[:, i].float()
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - (w[:, i] * li) * li
            nl = nearest_int((x[:, i] * sl2) / slx).clamp(-nmax, nmax - 1)
            nlf = nl.float()
            slx2 = slx + wx[:, i] * nlf
            sl22 = sl2 + (w[:, i] * nlf) * nlf
            upd = (slx > 0) & (nl != l[:, i]) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            l[:, i] = torch.where(upd, nl, l[:, i])
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, F(0.0))
    return torch.where(zero, F(0.0), scale), torch.where(zero[:, None], 0, l + nmax)


def search_affine(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                  mad: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """ggml's make_qkx2_quants / make_qkx3_quants: -> (scale [B], -min [B], codes [B, n] in [0, nmax])."""
    lo, hi = x[:, 0].clone(), x[:, 0].clone()
    sum_w = w[:, 0].clone()
    sum_x = sum_w * x[:, 0]
    for i in range(1, x.shape[1]):
        lo = torch.where(x[:, i] < lo, x[:, i], lo)
        hi = torch.where(x[:, i] > hi, x[:, i], hi)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    lo = torch.where(lo > 0, F(0.0), lo)
    flat = hi <= lo

    def error(scale, m, lf):
        diff = (scale[:, None] * lf + m[:, None]) - x
        return _seqsum(w * (diff.abs() if mad else diff * diff))

    iscale = F(nmax) / (hi - lo)
    scale = F(1.0) / iscale
    codes = nearest_int(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)
    best = error(scale, lo, codes.float())
    for step in range(nstep + 1):
        iscale = ((F(rmin) + F(rdelta) * F(step)) + F(nmax)) / (hi - lo)  # lo moves with each better fit
        l = nearest_int(iscale[:, None] * (x - lo[:, None])).clamp(0, nmax)
        lf = l.float()
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        s = (sum_w * sum_xl - sum_x * sum_l) / D
        m = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = m > 0
        m = torch.where(pos, F(0.0), m)
        s = torch.where(pos, sum_xl / sum_l2, s)
        upd = ~flat & (D > 0)
        upd = upd & (error(s, m, lf) < best)
        codes = torch.where(upd[:, None], l, codes)
        best = torch.where(upd, error(s, m, lf), best)
        scale = torch.where(upd, s, scale)
        lo = torch.where(upd, m, lo)
    return torch.where(flat, F(0.0), scale), -lo, torch.where(flat[:, None], 0, codes)


def search_positive(x: Tensor, nmax: int, w: Tensor) -> Tuple[Tensor, Tensor]:
    """ggml's make_qp_quants: -> (scale [B], codes [B, n]: ints stored in uint8)."""
    hi = torch.zeros(x.shape[0], dtype=F32)
    for i in range(x.shape[1]):
        hi = torch.where(hi > x[:, i], hi, x[:, i])
    zero = hi < F(GROUP_MAX_EPS)
    iscale = F(nmax) / hi
    L = nearest_int(iscale[:, None] * x) & 0xFF
    scale = F(1.0) / iscale

    def mse(scale, lf):
        diff = x - scale[:, None] * lf
        return _seqsum((w * diff) * diff)

    best = mse(scale, L.float())
    for step in range(-4, 5):
        if step == 0:
            continue
        isc = (F(0.1) * F(step) + F(nmax)) / hi
        err = mse(F(1.0) / isc, nearest_int(isc[:, None] * x).clamp(max=nmax).float())
        upd = err < best
        best = torch.where(upd, err, best)
        iscale = torch.where(upd, isc, iscale)
    l = nearest_int(iscale[:, None] * x).clamp(max=nmax)
    L = l & 0xFF
    wx = w * x
    sumlx = _seqsum(wx * l.float())
    suml2 = _seqsum((w * l.float()) * l.float())
    for _ in range(5):
        for i in range(x.shape[1]):
            li = L[:, i].float()
            slx = sumlx - wx[:, i] * li
            sl2 = suml2 - (w[:, i] * li) * li
            nl = nearest_int((x[:, i] * sl2) / slx).clamp(max=nmax)
            nlf = nl.float()
            slx2 = slx + wx[:, i] * nlf
            sl22 = sl2 + (w[:, i] * nlf) * nlf
            upd = (slx > 0) & (sl2 > 0) & (nl != L[:, i]) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            L[:, i] = torch.where(upd, nl & 0xFF, L[:, i])
            sumlx = torch.where(upd, slx2, sumlx)
            suml2 = torch.where(upd, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / suml2, F(0.0))
    return torch.where(zero, F(0.0), scale), torch.where(zero[:, None], 0, L)


# ---------------------------------------------------------------- block layout

def _assemble(t: str, fields: Dict[str, Tensor]) -> Tensor:
    """Fields (int tensors [B, length] of byte values) -> uint8 blocks [B, bytes]."""
    return torch.cat([fields[name] for name, _ in LAYOUT[t]], 1).to(torch.uint8)


def _field(t: str, blocks: Tensor, name: str) -> Tensor:
    start = 0
    for n, length in LAYOUT[t]:
        if n == name:
            return blocks[:, start:start + length].long()
        start += length
    raise KeyError(name)


def _bits_to_bytes(bits: Tensor, nbytes: int) -> Tensor:
    """[B, 8 * nbytes] of 0/1, bit i of a little-endian integer -> [B, nbytes]."""
    b = bits.reshape(bits.shape[0], nbytes, 8)
    return (b << torch.arange(8)).sum(-1)


def code_fields(t: str, codes: Tensor) -> Dict[str, Tensor]:
    """Codes [B, block] (element order, unsigned) -> the block's code-bearing fields."""
    c = codes.long()
    B = c.shape[0]
    if t == "Q8_0":
        return {"qs": c ^ 0x80}
    if t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        out = {"qs": (c[:, :16] & 0xF) | ((c[:, 16:] & 0xF) << 4)}
        if t in ("Q5_0", "Q5_1"):
            out["qh"] = _bits_to_bytes((c >> 4) & 1, 4)
        return out
    if t in ("Q2_K", "Q3_K"):
        g = c.reshape(B, 2, 4, 32)
        out = {"qs": sum((g[:, :, k] & 3) << (2 * k) for k in range(4)).reshape(B, 64)}
        if t == "Q3_K":
            h = ((c >> 2) & 1).reshape(B, 8, 32)  # bit k of hmask[l]: element 32 k + l
            out["hmask"] = sum(h[:, k] << k for k in range(8))
        return out
    if t in ("Q4_K", "Q5_K"):
        g = c.reshape(B, 4, 2, 32)
        out = {"qs": ((g[:, :, 0] & 0xF) | ((g[:, :, 1] & 0xF) << 4)).reshape(B, 128)}
        if t == "Q5_K":
            h = ((c >> 4) & 1).reshape(B, 8, 32)  # bit 2 c + half of qh[l]
            out["qh"] = sum(h[:, k] << k for k in range(8))
        return out
    g = c.reshape(B, 2, 4, 32)  # Q6_K: (128-chunk, group of 32, l)
    ql = torch.stack([(g[:, :, 0] & 0xF) | ((g[:, :, 2] & 0xF) << 4),
                      (g[:, :, 1] & 0xF) | ((g[:, :, 3] & 0xF) << 4)], 2)
    qh = sum(((g[:, :, k] >> 4) & 3) << (2 * k) for k in range(4))
    return {"ql": ql.reshape(B, 128), "qh": qh.reshape(B, 64)}


def unpack_codes(t: str, blocks: Tensor) -> Tensor:
    """uint8 blocks [B, bytes] -> codes [B, block] (int64, element order, unsigned)."""
    t = gguf_type(t)
    B = blocks.shape[0]
    if t == "Q8_0":
        return _field(t, blocks, "qs") ^ 0x80
    qs = _field(t, blocks, "ql" if t == "Q6_K" else "qs")
    if t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        c = torch.cat([qs & 0xF, qs >> 4], 1)
        if t in ("Q5_0", "Q5_1"):
            qh = _field(t, blocks, "qh")
            bits = (qh[:, :, None] >> torch.arange(8)) & 1
            c = c | (bits.reshape(B, 32) << 4)
        return c
    if t in ("Q2_K", "Q3_K"):
        q = qs.reshape(B, 2, 1, 32)
        c = ((q >> (2 * torch.arange(4))[None, None, :, None]) & 3).reshape(B, 256)
        if t == "Q3_K":
            h = _field(t, blocks, "hmask")
            c = c | ((((h[:, None, :] >> torch.arange(8)[None, :, None]) & 1).reshape(B, 256)) << 2)
        return c
    if t in ("Q4_K", "Q5_K"):
        q = qs.reshape(B, 4, 32)
        c = torch.stack([q & 0xF, q >> 4], 2).reshape(B, 256)
        if t == "Q5_K":
            h = _field(t, blocks, "qh")
            c = c | ((((h[:, None, :] >> torch.arange(8)[None, :, None]) & 1).reshape(B, 256)) << 4)
        return c
    ql = qs.reshape(B, 2, 2, 32)
    qh = _field(t, blocks, "qh").reshape(B, 2, 1, 32)
    lo = torch.stack([ql[:, :, 0] & 0xF, ql[:, :, 1] & 0xF, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], 2)
    hi = (qh >> (2 * torch.arange(4))[None, None, :, None]) & 3
    return (lo | (hi << 4)).reshape(B, 256)


def _k4_pack(ls: Tensor, lm: Tensor) -> Tensor:
    """Q4_K / Q5_K: 8 scales and 8 mins (ints, stored as uint8) -> the 12 scale bytes."""
    ls, lm = ls & 0xFF, lm & 0xFF
    s = torch.zeros(ls.shape[0], 12, dtype=torch.long)
    s[:, 0:4] = ls[:, 0:4]
    s[:, 4:8] = lm[:, 0:4]
    s[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    s[:, 0:4] = (s[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)) & 0xFF
    s[:, 4:8] = (s[:, 4:8] | ((lm[:, 4:8] >> 4) << 6)) & 0xFF
    return s


def _k4_unpack(s: Tensor) -> Tuple[Tensor, Tensor]:
    """The 12 scale bytes -> (scales [B, 8], mins [B, 8]), 6-bit ints."""
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
    return sc, m


def _q3_pack(l: Tensor) -> Tensor:
    """Q3_K: 16 six-bit values [B, 16] -> the 12 scale bytes."""
    low = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    high = l.reshape(-1, 4, 4) >> 4  # [B, j // 4, j % 4]
    high = sum((high[:, k] & 3) << (2 * k) for k in range(4))
    return torch.cat([low, high], 1) & 0xFF


def _q3_unpack(s: Tensor) -> Tensor:
    """The 12 scale bytes -> the 16 signed scales (stored value - 32)."""
    low = torch.cat([s[:, :8] & 0xF, s[:, :8] >> 4], 1)
    high = ((s[:, None, 8:12] >> (2 * torch.arange(4))[None, :, None]) & 3).reshape(-1, 16)
    return _i8((low | (high << 4)) - 32)


# ---------------------------------------------------------------- quantizers

def _legacy(t: str, x: Tensor, qw: Optional[Tensor]) -> Tensor:
    R, C = x.shape
    xb = x.reshape(-1, 32)
    if t == "Q8_0":
        amax = xb.abs().amax(1)
        d = amax / F(127.0)
        iv = torch.where(d != 0, F(1.0) / d, F(0.0))
        q = _trunc_i8(_round_away(xb * iv[:, None]))
        return _assemble(t, {"d": _half_bytes(d), **code_fields(t, q + 128)})
    nmax = {"Q4_0": 8, "Q5_0": 16, "Q4_1": 15, "Q5_1": 31}[t]
    if qw is not None:
        sigma2 = _seqsum(x * x) / F(float(C))
        w = (qw[None, :] * sqrt(sigma2[:, None] + x * x)).reshape(-1, 32)
        if t in ("Q4_0", "Q5_0"):
            d, codes = search_symmetric(xb, nmax, w)
            return _assemble(t, {"d": _half_bytes(d), **code_fields(t, codes)})
        d, neg_min, codes = search_affine(xb, w, nmax, -0.9, 0.05, 36, False)
        return _assemble(t, {"d": _half_bytes(d), "m": _half_bytes(-neg_min), **code_fields(t, codes)})
    if t in ("Q4_0", "Q5_0"):
        _, vmax = _first_absmax(xb)
        d = vmax / F(float(-nmax))
        iv = torch.where(d != 0, F(1.0) / d, F(0.0))
        codes = _trunc_i8(xb * iv[:, None] + F(nmax + 0.5)).clamp(max=2 * nmax - 1)
        return _assemble(t, {"d": _half_bytes(d), **code_fields(t, codes)})
    lo = torch.full((xb.shape[0],), 3.4028234663852886e38, dtype=F32)
    hi = -lo
    for i in range(32):
        lo = torch.where(xb[:, i] < lo, xb[:, i], lo)
        hi = torch.where(xb[:, i] > hi, xb[:, i], hi)
    d = (hi - lo) / F(float(nmax))
    iv = torch.where(d != 0, F(1.0) / d, F(0.0))
    v = (xb - lo[:, None]) * iv[:, None] + F(0.5)
    codes = _trunc_i8(v).clamp(max=15) if t == "Q4_1" else _trunc_u8(v) & 31
    return _assemble(t, {"d": _half_bytes(d), "m": _half_bytes(lo), **code_fields(t, codes)})


def _requant_affine(xs: Tensor, d: Tensor, m: Tensor, nmax: int, codes: Tensor) -> Tensor:
    """Sub-blocks [S, sub] with a non-zero stored scale d: round((x + m) / d) on [0, nmax]."""
    new = nearest_int((xs + m[:, None]) / d[:, None]).clamp(0, nmax)
    return torch.where((d != 0)[:, None], new, codes)


def _requant_symmetric(xs: Tensor, d: Tensor, half: int, codes: Tensor) -> Tensor:
    new = nearest_int(xs / d[:, None]).clamp(-half, half - 1) + half
    return torch.where((d != 0)[:, None], new, codes)


def _kquant(t: str, x: Tensor, qw: Optional[Tensor]) -> Tensor:
    R, C = x.shape
    xs = x.reshape(-1, 256)  # super-blocks [S, 256]
    S = xs.shape[0]
    qs = None if qw is None else qw.reshape(1, -1, 256).expand(R, -1, -1).reshape(S, 256)
    if qw is not None:
        sumx2 = _seqsum(xs * xs)
        sigma2 = sumx2 / F(256.0) if t == "Q2_K" else (F(2.0) * sumx2) / F(256.0)
        w_all = qs * sqrt(sigma2[:, None] + xs * xs)

    if t == "Q2_K":
        sub = xs.reshape(-1, 16)
        if qw is None:
            scales, mins, L = search_affine(sub, sub.abs(), 3, -0.5, 0.1, 15, True)
            scales, mins = scales.reshape(S, 16), mins.reshape(S, 16)
            max_scale, max_min = _max_from_zero(scales), _max_from_zero(mins)
            pos_s, pos_m = max_scale > 0, max_min > 0
            ls = torch.where(pos_s[:, None], nearest_int((F(15.0) / max_scale)[:, None] * scales), 0)
            lm = torch.where(pos_m[:, None], nearest_int((F(15.0) / max_min)[:, None] * mins), 0)
            sc = (ls | (lm << 4)) & 0xFF
            d = torch.where(pos_s, max_scale / F(15.0), F(0.0))
            dmin = torch.where(pos_m, max_min / F(15.0), F(0.0))
        else:
            w = w_all.reshape(-1, 16)
            sw = _seqsum(w).reshape(S, 16)
            scales, mins, L = search_affine(sub, w, 3, -0.9, 0.05, 36, False)
            d, Ls = search_positive(scales.reshape(S, 16), 15, sw)
            dmin, Lm = search_positive(mins.reshape(S, 16), 15, sw)
            sc = (Ls | (Lm << 4)) & 0xFF
        dl = (fp16(d)[:, None] * (sc & 0xF).float()).reshape(-1)
        ml = (fp16(dmin)[:, None] * (sc >> 4).float()).reshape(-1)
        L = _requant_affine(sub, dl, ml, 3, L).reshape(S, 256)
        return _assemble(t, {"scales": sc, "d": _half_bytes(d), "dmin": _half_bytes(dmin), **code_fields(t, L)})

    if t == "Q3_K":
        sub = xs.reshape(-1, 16)
        if qw is None:
            scales, L = search_q3(sub, 4)
            scales = scales.reshape(S, 16)
            _, max_scale = _first_absmax(scales)
            nz = max_scale != 0
            iscale = F(-32.0) / max_scale
            l = _i8(nearest_int(iscale[:, None] * scales)).clamp(-32, 31) + 32
            sbytes = torch.where(nz[:, None], _q3_pack(l), 0)
            d = torch.where(nz, F(1.0) / iscale, F(0.0))
        else:
            w = w_all.reshape(-1, 16)
            sw = _seqsum(w).reshape(S, 16)
            scales, L = search_symmetric(sub, 4, w)
            d, Ls = search_symmetric(scales.reshape(S, 16), 32, sw)
            sbytes = _q3_pack(Ls)
        dl = (fp16(d)[:, None] * _q3_unpack(sbytes).float()).reshape(-1)
        L = _requant_symmetric(sub, dl, 4, L).reshape(S, 256)
        return _assemble(t, {"scales": sbytes, "d": _half_bytes(d), **code_fields(t, L)})

    if t in ("Q4_K", "Q5_K"):
        nmax = 15 if t == "Q4_K" else 31
        sub = xs.reshape(-1, 32)
        if qw is None:
            av_x = sqrt(_seqsum(sub * sub) / F(32.0))
            w = av_x[:, None] + sub.abs()
            args = (-1.0, 0.1, 20) if t == "Q4_K" else (-0.5, 0.1, 15)
            scales, mins, L = search_affine(sub, w, nmax, *args, False)
            scales, mins = scales.reshape(S, 8), mins.reshape(S, 8)
            max_scale, max_min = _max_from_zero(scales), _max_from_zero(mins)
            inv_s = torch.where(max_scale > 0, F(63.0) / max_scale, F(0.0))
            inv_m = torch.where(max_min > 0, F(63.0) / max_min, F(0.0))
            ls = (nearest_int(inv_s[:, None] * scales) & 0xFF).clamp(max=63)
            lm = (nearest_int(inv_m[:, None] * mins) & 0xFF).clamp(max=63)
            d, dmin = max_scale / F(63.0), max_min / F(63.0)
        else:
            w = w_all.reshape(-1, 32)
            sw = _seqsum(w).reshape(S, 8)
            scales, mins, L = search_affine(sub, w, nmax, -0.9, 0.05, 36, False)
            d, ls = search_positive(scales.reshape(S, 8), 63, sw)
            dmin, lm = search_positive(mins.reshape(S, 8), 63, sw)
            if t == "Q5_K":
                ls, lm = ls.clamp(max=63), lm.clamp(max=63)
        sbytes = _k4_pack(ls, lm)
        sc, m = _k4_unpack(sbytes)
        dl = (fp16(d)[:, None] * sc.float()).reshape(-1)
        ml = (fp16(dmin)[:, None] * m.float()).reshape(-1)
        L = _requant_affine(sub, dl, ml, nmax, L).reshape(S, 256)
        return _assemble(t, {"d": _half_bytes(d), "dmin": _half_bytes(dmin), "scales": sbytes, **code_fields(t, L)})

    # Q6_K
    sub = xs.reshape(-1, 16)
    scales, L = search_symmetric(sub, 32, None if qw is None else qs.reshape(-1, 16))
    scales = scales.reshape(S, 16)
    max_abs, max_scale = _first_absmax(scales)
    zero = max_abs < F(GROUP_MAX_EPS)
    iscale = F(-128.0) / max_scale
    d = torch.where(zero, F(0.0), F(1.0) / iscale)
    sc = _i8(nearest_int(iscale[:, None] * scales).clamp(max=127))
    sc = torch.where(zero[:, None], 0, sc)
    dl = (fp16(d)[:, None] * sc.float()).reshape(-1)
    L = _requant_symmetric(sub, dl, 32, L).reshape(S, 256)
    out = _assemble(t, {"scales": sc & 0xFF, "d": _half_bytes(d), **code_fields(t, L)})
    return torch.where(zero[:, None], torch.zeros((), dtype=torch.uint8), out)


def quantize(weight: Tensor, type: str, importance: Optional[Tensor] = None) -> Tensor:
    """weight [rows, cols] float -> uint8 [rows, row_bytes]: ggml_quantize_chunk's bytes."""
    t = gguf_type(type)
    block, nbytes, _, _ = TYPES[t]
    rows, cols = weight.shape
    if cols <= 0 or cols % block:
        raise ValueError(f"GGUF {t}: cols must be a positive multiple of {block}, got {cols}")
    if rows == 0:
        return torch.empty(0, cols // block * nbytes, dtype=torch.uint8)
    x = weight.float().contiguous()
    qw = None if importance is None or t == "Q8_0" else importance.float().contiguous()
    blocks = _legacy(t, x, qw) if block == 32 else _kquant(t, x, qw)
    return blocks.reshape(rows, -1)


# ---------------------------------------------------------------- dequantize / grid / encode

def _blocks(blocks: Tensor, type: str, cols: int) -> Tuple[str, Tensor]:
    t = gguf_type(type)
    block, nbytes, _, _ = TYPES[t]
    if cols <= 0 or cols % block or blocks.shape[1] != cols // block * nbytes:
        raise ValueError(f"GGUF {t}: blocks [rows, {cols // block * nbytes}] for {cols} values per row expected")
    return t, blocks.reshape(-1, nbytes)


def grid(blocks: Tensor, type: str, cols: int) -> Tuple[Tensor, Tensor]:
    """-> (scale, offset) float32 [rows, cols / sub]: value = scale * q + offset."""
    t, b = _blocks(blocks, type, cols)
    rows = blocks.shape[0]
    if t in ("Q8_0", "Q4_0", "Q5_0"):
        d = fp16_field(t, b, "d")
        scale, offset = d, F({"Q8_0": -128.0, "Q4_0": -8.0, "Q5_0": -16.0}[t]) * d
    elif t in ("Q4_1", "Q5_1"):
        scale, offset = fp16_field(t, b, "d"), fp16_field(t, b, "m")
    elif t == "Q2_K":
        sc = _field(t, b, "scales")
        scale = fp16_field(t, b, "d")[:, None] * (sc & 0xF).float()
        offset = -(fp16_field(t, b, "dmin")[:, None] * (sc >> 4).float())
    elif t == "Q3_K":
        scale = fp16_field(t, b, "d")[:, None] * _q3_unpack(_field(t, b, "scales")).float()
        offset = F(-4.0) * scale
    elif t in ("Q4_K", "Q5_K"):
        sc, m = _k4_unpack(_field(t, b, "scales"))
        scale = fp16_field(t, b, "d")[:, None] * sc.float()
        offset = -(fp16_field(t, b, "dmin")[:, None] * m.float())
    else:
        scale = fp16_field(t, b, "d")[:, None] * _i8(_field(t, b, "scales")).float()
        offset = F(-32.0) * scale
    n = cols // TYPES[t][2]
    return scale.reshape(rows, n), offset.reshape(rows, n)


def fp16_field(t: str, b: Tensor, name: str) -> Tensor:
    """A block's fp16 field as float32 [B]."""
    f = _field(t, b, name)
    bits16 = ((f[:, 0] | (f[:, 1] << 8)) ^ 0x8000) - 0x8000  # little-endian, as a signed 16-bit int
    return bits16.to(torch.int16).contiguous().view(torch.float16).float()


def dequantize(blocks: Tensor, type: str, cols: int, dtype: torch.dtype) -> Tensor:
    """uint8 [rows, row_bytes] -> [rows, cols] as ggml's dequantize_row_* computes it, cast to dtype."""
    t, b = _blocks(blocks, type, cols)
    rows = blocks.shape[0]
    _, _, sub, _ = TYPES[t]
    q = unpack_codes(t, b)
    B, nsub = b.shape[0], TYPES[t][0] // sub
    if t in ("Q8_0", "Q4_0", "Q5_0"):
        zero = {"Q8_0": 128, "Q4_0": 8, "Q5_0": 16}[t]
        y = (q - zero).float() * fp16_field(t, b, "d")[:, None]
    elif t in ("Q4_1", "Q5_1"):
        y = q.float() * fp16_field(t, b, "d")[:, None] + fp16_field(t, b, "m")[:, None]
    elif t in ("Q2_K", "Q4_K", "Q5_K"):
        scale, offset = grid(b, t, TYPES[t][0])  # dl * q - ml with dl, ml as ggml forms them
        y = scale.reshape(B, nsub, 1) * q.reshape(B, nsub, sub).float() - (-offset).reshape(B, nsub, 1)
    elif t == "Q3_K":
        dl = fp16_field(t, b, "d")[:, None] * _q3_unpack(_field(t, b, "scales")).float()
        y = dl.reshape(B, nsub, 1) * (q - 4).reshape(B, nsub, sub).float()
    else:
        dl = fp16_field(t, b, "d")[:, None] * _i8(_field(t, b, "scales")).float()
        y = dl.reshape(B, nsub, 1) * (q - 32).reshape(B, nsub, sub).float()
    return y.reshape(rows, cols).to(dtype)


def encode(codes: Tensor, blocks: Tensor, type: str) -> Tensor:
    """blocks with every element's code replaced by codes [rows, cols] (headers kept)."""
    t, b = _blocks(blocks, type, codes.shape[1])
    block, nbytes, _, bits = TYPES[t]
    if codes.numel() and int(codes.max()) > (1 << bits) - 1:
        raise ValueError(f"GGUF {t}: codes must be in [0, {(1 << bits) - 1}]")
    out = b.long().clone()
    fields = code_fields(t, codes.reshape(-1, block))
    start = 0
    for name, length in LAYOUT[t]:
        if name in fields:
            out[:, start:start + length] = fields[name]
        start += length
    return out.to(torch.uint8).reshape(blocks.shape)


def unpack(blocks: Tensor, type: str, cols: int) -> Tensor:
    """uint8 [rows, row_bytes] -> the codes uint8 [rows, cols] (gguf_grid's convention)."""
    t, b = _blocks(blocks, type, cols)
    return unpack_codes(t, b).to(torch.uint8).reshape(blocks.shape[0], cols)
