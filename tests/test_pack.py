"""Bit packing of int8 codes into int32 words (compressed-tensors' pack-quantized layout)."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit import functional as F
from lowbit import ops
from lowbit import reference as R

from conftest import make_generator, noncontig, num_threads, qrange, rand_codes

BITS = list(range(2, 9))
LENGTHS = [1, 7, 8, 129]


def words(n: int, bits: int) -> int:
    return math.ceil(n * bits / 32)


def bitstream_pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """An independent oracle with Python integers: each row is one little-endian bit stream,
    code i (stored as q + 2^(b-1)) at bit i*b, cut into 32-bit words."""
    rows, cols = codes.shape
    off = 1 << (bits - 1)
    out = []
    for row in codes.tolist():
        v = 0
        for i, q in enumerate(row):
            assert 0 <= q + off < (1 << bits)
            v |= (q + off) << (i * bits)
        ws = [(v >> (32 * k)) & 0xFFFFFFFF for k in range(words(cols, bits))]
        out.append([w - (1 << 32) if w >= 1 << 31 else w for w in ws])
    return torch.tensor(out, dtype=torch.int32).reshape(rows, words(cols, bits))


def u32(t: torch.Tensor) -> list:
    return [w & 0xFFFFFFFF for w in t.flatten().tolist()]


@pytest.mark.parametrize("packed_dim", [1, 0])
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("bits", BITS)
def test_pack_matches_reference_and_round_trips(bits, n, packed_dim, gen):
    other = 3
    shape = (other, n) if packed_dim == 1 else (n, other)
    codes = rand_codes(*shape, bits, gen)
    packed = F.pack(codes, bits, packed_dim)

    expected_shape = (other, words(n, bits)) if packed_dim == 1 else (words(n, bits), other)
    assert tuple(packed.shape) == expected_shape
    assert packed.dtype == torch.int32 and packed.is_contiguous()

    rows_view = codes if packed_dim == 1 else codes.t().contiguous()
    ref = R.pack(rows_view, bits)
    oracle = bitstream_pack(rows_view, bits)
    assert torch.equal(ref, oracle)  # the reference itself is right
    assert torch.equal(packed if packed_dim == 1 else packed.t(), oracle)
    if packed_dim == 1:
        assert torch.equal(ops.pack(codes, bits), oracle)
        assert torch.equal(ops.unpack(oracle, bits, n), codes)

    # round trips through lowbit and across lowbit / reference
    assert torch.equal(F.unpack(packed, bits, codes.shape, packed_dim), codes)
    assert torch.equal(R.unpack(oracle, bits, n), rows_view)
    assert torch.equal(F.unpack(oracle if packed_dim == 1 else oracle.t(), bits, codes.shape, packed_dim), codes)

    # non-contiguous inputs
    if codes.numel() > 1:
        assert torch.equal(F.pack(noncontig(codes), bits, packed_dim), packed)
    if packed.numel() > 1:
        assert torch.equal(F.unpack(noncontig(packed), bits, codes.shape, packed_dim), codes)


@pytest.mark.parametrize("bits", BITS)
def test_pack_wide_rows(bits, gen):
    codes = rand_codes(33, 4097, bits, gen)
    packed = F.pack(codes, bits)
    assert tuple(packed.shape) == (33, words(4097, bits))
    assert torch.equal(packed, R.pack(codes, bits))
    assert torch.equal(F.unpack(packed, bits, codes.shape), codes)
    assert torch.equal(R.unpack(packed, bits, 4097), codes)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_wide_along_dim0(bits, gen):
    codes = rand_codes(4097, 5, bits, gen)
    packed = F.pack(codes, bits, packed_dim=0)
    assert tuple(packed.shape) == (words(4097, bits), 5)
    assert torch.equal(packed, R.pack(codes.t().contiguous(), bits).t())
    assert torch.equal(F.unpack(packed, bits, codes.shape, packed_dim=0), codes)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_multithreaded_matches_serial(bits, gen):
    codes = rand_codes(257, 1031, bits, gen)
    serial = F.pack(codes, bits)
    with num_threads():
        parallel = F.pack(codes, bits)
        unpacked = F.unpack(serial, bits, codes.shape)
    assert torch.equal(parallel, serial)
    assert torch.equal(serial, R.pack(codes, bits))
    assert torch.equal(unpacked, codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("rows,groups", [(17, 5), (1, 1), (64, 3), (4097, 2)])
def test_zero_point_packed_along_dim0(rows, groups, bits, gen):
    zp = rand_codes(rows, groups, bits, gen)
    packed = F.pack(zp, bits, packed_dim=0)
    assert tuple(packed.shape) == (words(rows, bits), groups)
    if rows < 1000:
        assert torch.equal(packed.t(), bitstream_pack(zp.t(), bits))
    assert torch.equal(packed, R.pack(zp.t().contiguous(), bits).t())
    assert torch.equal(F.unpack(packed, bits, zp.shape, packed_dim=0), zp)


# ------------------------------------------------------------------- pinned bit patterns

def test_int4_pinned_words():
    low = torch.arange(-8, 0, dtype=torch.int8).reshape(1, 8)
    high = torch.arange(0, 8, dtype=torch.int8).reshape(1, 8)
    assert F.pack(low, 4).item() & 0xFFFFFFFF == 0x76543210
    assert F.pack(high, 4).item() & 0xFFFFFFFF == 0xFEDCBA98
    both = torch.cat([low, high], dim=1)
    assert u32(F.pack(both, 4)) == [0x76543210, 0xFEDCBA98]
    assert u32(F.pack(torch.cat([low, high]), 4)) == [0x76543210, 0xFEDCBA98]
    # along dim 0: the column [-8..-1] becomes one word
    assert u32(F.pack(low.t().contiguous(), 4, packed_dim=0)) == [0x76543210]
    assert torch.equal(F.unpack(F.pack(both, 4), 4, (1, 16)), both)


def test_int4_partial_word_pads_with_zero_bits():
    # 3 codes of 4 bits: 12 bits used; the 20 padding bits stay zero
    codes = torch.tensor([[7, -8, 0]], dtype=torch.int8)  # stored 15, 0, 8
    assert u32(F.pack(codes, 4)) == [0x80F]


def test_int8_pinned_word():
    codes = torch.tensor([[-128, -127, 0, 127]], dtype=torch.int8)  # bytes 00 01 80 FF
    packed = F.pack(codes, 8)
    assert packed.shape == (1, 1)
    assert packed.item() & 0xFFFFFFFF == 0xFF800100
    assert torch.equal(F.unpack(packed, 8, (1, 4)), codes)


@pytest.mark.parametrize("code10,word0,word1", [
    (2, 0x80000000, 0x1),   # stored 0b110: bit 30 = 0, bit 31 = 1, bit 32 (next word's bit 0) = 1
    (-1, 0xC0000000, 0x0),  # stored 0b011
    (1, 0x40000000, 0x1),   # stored 0b101
    (3, 0xC0000000, 0x1),   # stored 0b111
])
def test_int3_code_straddles_word_boundary(code10, word0, word1):
    codes = torch.full((1, 11), -4, dtype=torch.int8)  # stored 0
    codes[0, 10] = code10
    packed = F.pack(codes, 3)
    assert packed.shape == (1, 2)  # 33 bits
    assert u32(packed) == [word0, word1]
    assert torch.equal(F.unpack(packed, 3, (1, 11)), codes)


def test_int3_full_pinned_pattern():
    stored = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 7]
    codes = torch.tensor([[s - 4 for s in stored]], dtype=torch.int8)
    assert u32(F.pack(codes, 3)) == [0xC8FAC688, 0x1]
    assert torch.equal(F.unpack(F.pack(codes, 3), 3, (1, 11)), codes)


@pytest.mark.parametrize("bits", [3, 5, 6, 7])
def test_unpack_ignores_padding_bits(bits, gen):
    """Words written by another tool may leave garbage above the last code."""
    codes = rand_codes(4, 7, bits, gen)  # 7 * bits is never a multiple of 32 here
    packed = F.pack(codes, bits)
    used = 7 * bits - 32 * (packed.shape[1] - 1)
    assert 0 < used < 32
    mask = (0xFFFFFFFF << used) & 0xFFFFFFFF  # every bit above the last code
    dirty = packed.clone()
    dirty[:, -1] |= torch.tensor(mask - (1 << 32), dtype=torch.int32)  # bit 31 is set: negative
    assert not torch.equal(dirty, packed)
    assert torch.equal(F.unpack(dirty, bits, codes.shape), codes)
    assert torch.equal(R.unpack(dirty, bits, 7), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_extreme_codes_round_trip(bits):
    lo, hi = qrange(bits)
    codes = torch.tensor([[lo] * 40, [hi] * 40, [lo, hi] * 20], dtype=torch.int8)
    packed = F.pack(codes, bits)
    if 32 % bits == 0:
        assert set(u32(packed[0])) == {0}
        tail = 40 * bits % 32  # bits used in the last word
        assert u32(packed[1]) == [0xFFFFFFFF] * (40 * bits // 32) + ([(1 << tail) - 1] if tail else [])
    assert torch.equal(F.unpack(packed, bits, codes.shape), codes)


def test_empty_codes():
    for shape in [(3, 0), (0, 8)]:
        codes = torch.empty(shape, dtype=torch.int8)
        packed = F.pack(codes, 4)
        assert tuple(packed.shape) == (shape[0], words(shape[1], 4))
        assert tuple(F.unpack(packed, 4, shape).shape) == shape


# ---------------------------------------------------------------- compressed-tensors itself

def _compressed_tensors_helpers():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    except ImportError:
        from compressed_tensors.compressors.quantized_compressors.pack_quantized import (  # older layout
            pack_to_int32, unpack_from_int32)
    return pack_to_int32, unpack_from_int32


@pytest.mark.parametrize("packed_dim", [1, 0])
@pytest.mark.parametrize("bits", BITS)
def test_matches_compressed_tensors(bits, packed_dim):
    pack_to_int32, unpack_from_int32 = _compressed_tensors_helpers()
    gen = make_generator("compressed-tensors", bits, packed_dim)
    for n in LENGTHS + [4097]:
        shape = (5, n) if packed_dim == 1 else (n, 5)
        codes = rand_codes(*shape, bits, gen)
        ours = F.pack(codes, bits, packed_dim)
        theirs = pack_to_int32(codes, bits, packed_dim=packed_dim)
        assert torch.equal(ours, theirs), (bits, n, packed_dim)
        assert torch.equal(unpack_from_int32(ours, bits, codes.shape, packed_dim=packed_dim), codes)
        assert torch.equal(F.unpack(theirs.contiguous(), bits, codes.shape, packed_dim), codes)
