// Bit packing of signed integer codes into int32 words, as compressed-tensors' pack-quantized
// format stores them: each code is stored unsigned (q + 2^(b-1)) and the codes of a row form
// one dense little-endian bit stream, code i at bit i*b, so a row of `cols` codes takes
// ceil(cols*b/32) words and a code may straddle two words when 32 % b != 0.
#pragma once

#include <cstdint>

namespace lowbit {

inline int64_t packed_words(int64_t cols, int64_t bits) { return (cols * bits + 31) / 32; }

// Eight 4-bit codes per word, the first in the lowest nibble.
inline void pack4_row(const int8_t* q, uint32_t* out, int64_t words) {
  for (int64_t w = 0; w < words; ++w) {
    uint32_t v = 0;
    for (int j = 0; j < 8; ++j) v |= static_cast<uint32_t>(q[8 * w + j] + 8) << (4 * j);
    out[w] = v;
  }
}

inline void pack_row(const int8_t* q, int64_t cols, int64_t bits, uint32_t* out) {
  const uint32_t offset = 1u << (bits - 1);
  if (bits == 4 && cols % 8 == 0) return pack4_row(q, out, cols / 8);
  uint64_t acc = 0;
  int filled = 0;
  int64_t w = 0;
  for (int64_t i = 0; i < cols; ++i) {
    acc |= static_cast<uint64_t>(static_cast<uint32_t>(q[i] + offset)) << filled;
    filled += bits;
    if (filled >= 32) {
      out[w++] = static_cast<uint32_t>(acc);
      acc >>= 32;
      filled -= 32;
    }
  }
  if (filled > 0) out[w] = static_cast<uint32_t>(acc);
}

inline void unpack4_row(const uint32_t* in, int8_t* q, int64_t words) {
  for (int64_t w = 0; w < words; ++w)
    for (int j = 0; j < 8; ++j) q[8 * w + j] = static_cast<int8_t>(((in[w] >> (4 * j)) & 0xF) - 8);
}

inline void unpack_row(const uint32_t* in, int64_t cols, int64_t bits, int8_t* q) {
  if (bits == 4 && cols % 8 == 0) return unpack4_row(in, q, cols / 8);
  const uint32_t mask = (1u << bits) - 1, offset = 1u << (bits - 1);
  for (int64_t i = 0; i < cols; ++i) {
    const int64_t bit = i * bits, w = bit >> 5;
    const int off = static_cast<int>(bit & 31);
    uint64_t v = in[w] >> off;
    if (off + bits > 32) v |= static_cast<uint64_t>(in[w + 1]) << (32 - off);
    q[i] = static_cast<int8_t>(static_cast<int32_t>(v & mask) - static_cast<int32_t>(offset));
  }
}

}  // namespace lowbit
