// W4A16 / W8A16 linear layer on packed compressed-tensors weights:
//   y[m, r] = sum_g scale[r, g] * sum_{k in g} (u[r, k] - z[r, g]) * x[m, k]   (+ bias)
// where u is the stored unsigned code and z = zero_point + 2^(b-1).
//
// Few tokens (decoding): an AVX-512 kernel dequantizes 16 weights per instruction or two
// (a per-group lookup table for 4 bits) and reuses them for up to 8 tokens, so the inner
// loop is decode + FMA only. Many tokens: tiles of rows are dequantized into a cache-sized
// fp32 buffer and multiplied with ATen's GEMM; other bit widths and CPUs without AVX-512
// take that path with a portable dequantizer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "lowbit/bitpack.h"
#include "lowbit/common.h"

namespace lowbit {
namespace {

// Above this many tokens the dequantize-tile + GEMM path wins.
constexpr int64_t kMaxDecodeTokens = 24;
constexpr int kTokenBlock = 8;

struct LinearArgs {
  int64_t M, N, K, ngroups, group_size, words, bits;
  const uint8_t* w;      // packed rows, words * 4 bytes each
  const float* scale;    // [N, ngroups]
  const float* zero;     // [N, ngroups] unsigned-domain zero point, or null: 2^(bits-1)
  float* out;            // [M, N]

  float zero_at(int64_t r, int64_t g) const {
    return zero ? zero[r * ngroups + g] : static_cast<float>(1 << (bits - 1));
  }
};

// ---------------------------------------------------------------- portable tile path
// Dequantizes rows [r0, r1) into dst [r1 - r0, K] (fp32, natural column order).
void dequantize_rows(const LinearArgs& a, int64_t r0, int64_t r1, float* dst) {
  std::vector<int8_t> codes(a.K);
  const float offset = static_cast<float>(1 << (a.bits - 1));
  for (int64_t r = r0; r < r1; ++r) {
    unpack_row(reinterpret_cast<const uint32_t*>(a.w) + r * a.words, a.K, a.bits, codes.data());
    float* row = dst + (r - r0) * a.K;
    for (int64_t g = 0; g < a.ngroups; ++g) {
      const float s = a.scale[r * a.ngroups + g], z = a.zero_at(r, g) - offset;
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k) row[k] = (codes[k] - z) * s;
    }
  }
}

using DequantizeRows = void (*)(const LinearArgs&, int64_t, int64_t, float*);

// out = x @ W^T, W dequantized a tile of rows at a time (about 4 MB of fp32, cache-sized)
// by `dequant`, in the column order that x is given in.
void tiled_linear(const LinearArgs& a, const at::Tensor& x, const at::Tensor& out, DequantizeRows dequant) {
  const int64_t tile = std::max<int64_t>(16, (1 << 20) / std::max<int64_t>(a.K, 1));
  at::Tensor buf = at::empty({std::min(tile, a.N), a.K}, x.options());
  float* bp = buf.data_ptr<float>();
  for (int64_t r0 = 0; r0 < a.N; r0 += tile) {
    const int64_t r1 = std::min(a.N, r0 + tile);
    at::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) { dequant(a, b, e, bp + (b - r0) * a.K); });
    out.narrow(1, r0, r1 - r0).copy_(at::mm(x, buf.narrow(0, 0, r1 - r0).t()));
  }
}

// ---------------------------------------------------------------- AVX-512 path
#ifdef LOWBIT_X86

// For 4 bits, byte j of a 32-column chunk holds column 2j (low nibble) and 2j+1 (high):
// x is reordered per chunk into [16 even columns, 16 odd columns] so both halves of a
// decoded byte vector meet contiguous x (a dot product does not care about the order, as
// long as x and the weights agree). For 8 bits the byte order is the column order.
at::Tensor prepare_x(const LinearArgs& a, const at::Tensor& x) {
  if (a.bits != 4) return x;
  return x.reshape({a.M, a.K / 32, 16, 2}).transpose(2, 3).contiguous().reshape({a.M, a.K});
}

inline LOWBIT_TARGET_AVX512 __m512i load16_u8(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Dequantizes the codes of one group. 4 bits: a 16-entry table (u - z) * s per group, looked
// up with one permute per 16 codes (vpermps reads only the low 4 bits of each index, so no
// masking). 8 bits: u * s - z * s after an int -> float conversion.
template <int BITS>
struct GroupDecoder {
  __m512 lut, s, zs;
  // Scale and zero point are read in place (broadcasts from memory use a load port, not a
  // vector ALU port); a null zero point is the symmetric 2^(bits-1).
  LOWBIT_TARGET_AVX512 GroupDecoder(const float* scale, const float* zero) {
    s = _mm512_set1_ps(*scale);
    if (BITS == 4) {
      const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512 centred = zero ? _mm512_sub_ps(iota, _mm512_set1_ps(*zero))
                                  : _mm512_sub_ps(iota, _mm512_set1_ps(8.0f));  // folded to a constant
      lut = _mm512_mul_ps(centred, s);
    } else {
      zs = _mm512_mul_ps(_mm512_set1_ps(zero ? *zero : 128.0f), s);
    }
  }
  // The 32 weights of columns [k, k + 32) of a row, in prepare_x's order (k >= 0: a shift,
  // not a signed division, keeps scalar work off the vector ports).
  LOWBIT_TARGET_AVX512 void decode32(const uint8_t* wrow, int64_t k, __m512& c0, __m512& c1) const {
    const uint8_t* p = wrow + ((k * BITS) >> 3);
    if (BITS == 4) {
      const __m512i v = load16_u8(p);
      c0 = _mm512_permutexvar_ps(v, lut);
      c1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
    } else {
      c0 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(load16_u8(p)), s, zs);
      c1 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(load16_u8(p + 16)), s, zs);
    }
  }
};

template <int BITS>
LOWBIT_TARGET_AVX512 void dequantize_rows_avx512(const LinearArgs& a, int64_t r0, int64_t r1, float* dst) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wrow = a.w + r * a.words * 4;
    float* row = dst + (r - r0) * a.K;
    for (int64_t g = 0; g < a.ngroups; ++g) {
      const GroupDecoder<BITS> dec(a.scale + r * a.ngroups + g, a.zero ? a.zero + r * a.ngroups + g : nullptr);
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; k += 32) {
        __m512 c0, c1;
        dec.decode32(wrow, k, c0, c1);
        _mm512_storeu_ps(row + k, c0);
        _mm512_storeu_ps(row + k + 16, c1);
      }
    }
  }
}

// Rows [r0, r1) x tokens [m0, m0 + MB) x groups [g0, g1), adding into acc_buf (2 x 16
// partial sums per row and token), so a caller can walk K in blocks whose x stays in L1.
template <int BITS, int MB>
LOWBIT_TARGET_AVX512 void decode_tile(const LinearArgs& a, const float* xp, int64_t m0, int64_t r0,
                               int64_t r1, int64_t g0, int64_t g1, float* acc_buf) {
  // Independent FMA chains hide the FMA latency: two per token, eight with a single token.
  constexpr int U = MB == 1 ? 4 : 1;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wrow = a.w + r * a.words * 4;
    float* ab = acc_buf + (r - r0) * kTokenBlock * 32;
    __m512 acc[2 * U][MB];
    for (int m = 0; m < MB; ++m) {
      acc[0][m] = _mm512_loadu_ps(ab + m * 32);
      acc[1][m] = _mm512_loadu_ps(ab + m * 32 + 16);
      for (int c = 2; c < 2 * U; ++c) acc[c][m] = _mm512_setzero_ps();
    }
    auto step = [&](const GroupDecoder<BITS>& dec, int64_t k, int u) LOWBIT_TARGET_AVX512 {
      __m512 c0, c1;
      dec.decode32(wrow, k, c0, c1);
      for (int m = 0; m < MB; ++m) {
        const float* x = xp + (m0 + m) * a.K + k;
        acc[2 * u][m] = _mm512_fmadd_ps(c0, _mm512_loadu_ps(x), acc[2 * u][m]);
        acc[2 * u + 1][m] = _mm512_fmadd_ps(c1, _mm512_loadu_ps(x + 16), acc[2 * u + 1][m]);
      }
    };
    for (int64_t g = g0; g < g1; ++g) {
      const GroupDecoder<BITS> dec(a.scale + r * a.ngroups + g, a.zero ? a.zero + r * a.ngroups + g : nullptr);
      int64_t k = g * a.group_size;
      const int64_t end = k + a.group_size;
      for (; k + 32 * U <= end; k += 32 * U)
        for (int u = 0; u < U; ++u) step(dec, k + 32 * u, u);
      for (; k < end; k += 32) step(dec, k, 0);
    }
    for (int m = 0; m < MB; ++m) {
      for (int c = 2; c < 2 * U; ++c) acc[c % 2][m] = _mm512_add_ps(acc[c % 2][m], acc[c][m]);
      _mm512_storeu_ps(ab + m * 32, acc[0][m]);
      _mm512_storeu_ps(ab + m * 32 + 16, acc[1][m]);
    }
  }
}

template <int BITS, int MB>
void decode_rows(const LinearArgs& a, const float* xp, int64_t m0, int64_t r0, int64_t r1, float* acc_buf) {
  std::fill(acc_buf, acc_buf + (r1 - r0) * kTokenBlock * 32, 0.0f);
  // K blocks whose MB rows of x take at most 32 KB, so x stays in L1 across the rows.
  const int64_t cols = (32 << 10) / (MB * 4);
  const int64_t groups_per_block = std::max<int64_t>(1, cols / a.group_size);
  for (int64_t g0 = 0; g0 < a.ngroups; g0 += groups_per_block)
    decode_tile<BITS, MB>(a, xp, m0, r0, r1, g0, std::min(a.ngroups, g0 + groups_per_block), acc_buf);
  for (int64_t r = r0; r < r1; ++r)
    for (int m = 0; m < MB; ++m) {
      const float* v = acc_buf + ((r - r0) * kTokenBlock + m) * 32;
      float sum = 0.0f;
      for (int l = 0; l < 32; ++l) sum += v[l];
      a.out[(m0 + m) * a.N + r] = sum;
    }
}

template <int BITS>
void decode_linear(const LinearArgs& a, const float* xp) {
  constexpr int64_t kRowBlock = 16;
  at::parallel_for(0, a.N, kRowBlock, [&](int64_t b, int64_t e) {
    std::vector<float> acc_buf(kRowBlock * kTokenBlock * 32);
    for (int64_t r0 = b; r0 < e; r0 += kRowBlock) {
      const int64_t r1 = std::min(e, r0 + kRowBlock);
      int64_t m0 = 0;
      for (; m0 + 8 <= a.M; m0 += 8) decode_rows<BITS, 8>(a, xp, m0, r0, r1, acc_buf.data());
      if (m0 + 4 <= a.M) { decode_rows<BITS, 4>(a, xp, m0, r0, r1, acc_buf.data()); m0 += 4; }
      if (m0 + 2 <= a.M) { decode_rows<BITS, 2>(a, xp, m0, r0, r1, acc_buf.data()); m0 += 2; }
      if (m0 < a.M) decode_rows<BITS, 1>(a, xp, m0, r0, r1, acc_buf.data());
    }
  });
}

// true when it handled the call: 4 or 8 bits, groups of whole 32-column chunks, AVX-512.
bool avx512_linear(const LinearArgs& a, const at::Tensor& x, const at::Tensor& out) {
  if (active_isa() != Isa::avx512 || (a.bits != 4 && a.bits != 8) || a.group_size % 32) return false;
  const at::Tensor xp = prepare_x(a, x);
  const bool four = a.bits == 4;
  if (a.M <= kMaxDecodeTokens) four ? decode_linear<4>(a, xp.data_ptr<float>()) : decode_linear<8>(a, xp.data_ptr<float>());
  else tiled_linear(a, xp, out, four ? &dequantize_rows_avx512<4> : &dequantize_rows_avx512<8>);
  return true;
}
#else
bool avx512_linear(const LinearArgs&, const at::Tensor&, const at::Tensor&) { return false; }
#endif

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const c10::optional<at::Tensor>& zero_point, int64_t bits,
                         int64_t group_size, const c10::optional<at::Tensor>& bias) {
  check_bits(bits);
  check_cpu(x, "x");
  check_cpu(packed, "packed");
  check_cpu(scale, "scale");
  check_cpu(zero_point, "zero_point");
  check_cpu(bias, "bias");
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "lowbit: x must have at least 1 dimension");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kInt, "lowbit: packed weight must be a 2-D int32 tensor, got ",
                   dtype_name(packed.scalar_type()));
  TORCH_CHECK_VALUE(packed.dim() == 2, "lowbit: packed weight must be a 2-D int32 tensor, got shape ", packed.sizes());
  check_float(scale, "scale");
  const bool has_zero = zero_point.has_value() && zero_point->defined();
  if (has_zero) check_integral(*zero_point, "zero_point");
  const int64_t K = x.size(-1), N = packed.size(0);
  TORCH_CHECK_VALUE(group_size > 0 && K % group_size == 0, "lowbit: group_size ", group_size,
              " must divide in_features ", K);
  TORCH_CHECK_VALUE(packed.size(1) == packed_words(K, bits), "lowbit: packed weight has ", packed.size(1),
              " words per row; ", K, " inputs at ", bits, " bits need ", packed_words(K, bits));
  const int64_t ngroups = K / group_size;
  check_shape(scale, {N, ngroups}, "scale ([out_features, in_features / group_size])");
  if (has_zero) check_shape(*zero_point, {N, ngroups}, "zero_point (the shape of scale)");
  check_bias(bias, N);

  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor wp = packed.contiguous();
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  const float offset = static_cast<float>(1 << (bits - 1));
  const at::Tensor zf = has_zero ? (zero_point->to(at::kFloat) + offset).contiguous() : at::Tensor();
  const int64_t M = xf.size(0);
  at::Tensor out = at::empty({M, N}, xf.options());
  LinearArgs a{M, N, K, ngroups, group_size, packed.size(1), bits,
               reinterpret_cast<const uint8_t*>(wp.data_ptr<int32_t>()), sf.data_ptr<float>(),
               has_zero ? zf.data_ptr<float>() : nullptr, out.data_ptr<float>()};
  if (M > 0 && N > 0 && !avx512_linear(a, xf, out)) tiled_linear(a, xf, out, &dequantize_rows);
  return finish_linear(out, bias, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("packed_linear", &packed_linear); }

}  // namespace lowbit
