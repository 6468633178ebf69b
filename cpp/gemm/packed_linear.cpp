// W4A16 / W8A16 linear layer on packed compressed-tensors weights:
//   y[m, r] = sum_g scale[r, g] * sum_{k in g} (u[r, k] - z[r, g]) * x[m, k]   (+ bias)
// where u is the stored unsigned code and z = zero_point + 2^(b-1).
//
// Few tokens (decoding): an AVX-512 kernel decodes 16 codes per instruction and reuses them
// for up to 8 tokens; the zero point is folded out with per-group sums of x, so the inner
// loop is decode + FMA only. Many tokens, other bit widths or CPUs without AVX-512: tiles of
// rows are dequantized into a cache-sized fp32 buffer and multiplied with ATen's GEMM.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LOWBIT_HAVE_AVX512_KERNEL 1
#endif

#include <vector>

#include "lowbit/bitpack.h"
#include "lowbit/common.h"

namespace lowbit {
namespace {

// Above this many tokens the dequantize-tile + GEMM path wins.
constexpr int64_t kMaxDecodeTokens = 32;
constexpr int kTokenBlock = 8;

struct LinearArgs {
  int64_t M, N, K, ngroups, group_size, words, bits;
  const uint8_t* w;      // packed rows, words * 4 bytes each
  const float* scale;    // [N, ngroups]
  const float* zero;     // [N, ngroups], unsigned-domain zero point
  float* out;            // [M, N]
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
      const float s = a.scale[r * a.ngroups + g], z = a.zero[r * a.ngroups + g] - offset;
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
#ifdef LOWBIT_HAVE_AVX512_KERNEL
#define LOWBIT_AVX512 __attribute__((target("avx512f")))

// For 4 bits, byte j of a 32-column chunk holds column 2j (low nibble) and 2j+1 (high):
// x is reordered per chunk into [16 even columns, 16 odd columns] so both halves of a
// decoded byte vector meet contiguous x (a dot product does not care about the order, as
// long as x and the weights agree). For 8 bits the byte order is the column order.
// xsum gets, per token and group, 16 lane-wise partial sums of x for the zero-point term.
at::Tensor prepare_x(const LinearArgs& a, const at::Tensor& x, std::vector<float>& xsum) {
  at::Tensor xp = a.bits == 4 ? x.reshape({a.M, a.K / 32, 16, 2}).transpose(2, 3).contiguous().reshape({a.M, a.K})
                              : x;
  const float* px = xp.data_ptr<float>();
  xsum.assign(a.M * a.ngroups * 16, 0.0f);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t g = 0; g < a.ngroups; ++g) {
      float* s = xsum.data() + (m * a.ngroups + g) * 16;
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k) s[k % 16] += px[m * a.K + k];
    }
  return xp;
}

inline LOWBIT_AVX512 __m512i load16_u8(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// The 32 codes of columns [k, k + 32) of a row, as floats in prepare_x's order.
inline LOWBIT_AVX512 void decode32(const uint8_t* wrow, int64_t k, int64_t bits, __m512& c0, __m512& c1) {
  if (bits == 4) {
    const __m512i v = load16_u8(wrow + k / 2);
    c0 = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
    c1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  } else {
    c0 = _mm512_cvtepi32_ps(load16_u8(wrow + k));
    c1 = _mm512_cvtepi32_ps(load16_u8(wrow + k + 16));
  }
}

LOWBIT_AVX512 void dequantize_rows_avx512(const LinearArgs& a, int64_t r0, int64_t r1, float* dst) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wrow = a.w + r * a.words * 4;
    float* row = dst + (r - r0) * a.K;
    for (int64_t g = 0; g < a.ngroups; ++g) {
      const __m512 s = _mm512_set1_ps(a.scale[r * a.ngroups + g]);
      const __m512 zs = _mm512_set1_ps(a.zero[r * a.ngroups + g] * a.scale[r * a.ngroups + g]);
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; k += 32) {
        __m512 c0, c1;
        decode32(wrow, k, a.bits, c0, c1);
        _mm512_storeu_ps(row + k, _mm512_fmsub_ps(c0, s, zs));
        _mm512_storeu_ps(row + k + 16, _mm512_fmsub_ps(c1, s, zs));
      }
    }
  }
}

// Rows [r0, r1) x tokens [m0, m0 + MB) x groups [g0, g1), adding into acc (16 floats per
// row and token), so a caller can walk K in blocks whose x stays in L1.
template <int MB>
LOWBIT_AVX512 void decode_tile(const LinearArgs& a, const float* xp, const float* xsum, int64_t m0,
                               int64_t r0, int64_t r1, int64_t g0, int64_t g1, float* acc_buf) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wrow = a.w + r * a.words * 4;
    float* ab = acc_buf + (r - r0) * kTokenBlock * 16;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_loadu_ps(ab + m * 16);
    for (int64_t g = g0; g < g1; ++g) {
      __m512 ga[MB], gb[MB];
      for (int m = 0; m < MB; ++m) ga[m] = gb[m] = _mm512_setzero_ps();
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; k += 32) {
        __m512 c0, c1;
        decode32(wrow, k, a.bits, c0, c1);
        for (int m = 0; m < MB; ++m) {
          const float* x = xp + (m0 + m) * a.K + k;
          ga[m] = _mm512_fmadd_ps(c0, _mm512_loadu_ps(x), ga[m]);
          gb[m] = _mm512_fmadd_ps(c1, _mm512_loadu_ps(x + 16), gb[m]);
        }
      }
      const __m512 s = _mm512_set1_ps(a.scale[r * a.ngroups + g]);
      const __m512 z = _mm512_set1_ps(a.zero[r * a.ngroups + g]);
      for (int m = 0; m < MB; ++m) {
        const __m512 xs = _mm512_loadu_ps(xsum + ((m0 + m) * a.ngroups + g) * 16);
        acc[m] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, _mm512_add_ps(ga[m], gb[m])), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) _mm512_storeu_ps(ab + m * 16, acc[m]);
  }
}

template <int MB>
void decode_rows(const LinearArgs& a, const float* xp, const float* xsum, int64_t m0, int64_t r0,
                 int64_t r1, float* acc_buf) {
  std::fill(acc_buf, acc_buf + (r1 - r0) * kTokenBlock * 16, 0.0f);
  // K blocks of about 512 columns: 8 tokens of x take 16 KB, well inside L1.
  const int64_t groups_per_block = std::max<int64_t>(1, 512 / a.group_size);
  for (int64_t g0 = 0; g0 < a.ngroups; g0 += groups_per_block)
    decode_tile<MB>(a, xp, xsum, m0, r0, r1, g0, std::min(a.ngroups, g0 + groups_per_block), acc_buf);
  for (int64_t r = r0; r < r1; ++r)
    for (int m = 0; m < MB; ++m) {
      const float* v = acc_buf + ((r - r0) * kTokenBlock + m) * 16;
      float sum = 0.0f;
      for (int l = 0; l < 16; ++l) sum += v[l];
      a.out[(m0 + m) * a.N + r] = sum;
    }
}

void decode_linear(const LinearArgs& a, const float* xp, const float* xsum) {
  constexpr int64_t kRowBlock = 16;
  at::parallel_for(0, a.N, kRowBlock, [&](int64_t b, int64_t e) {
    std::vector<float> acc_buf(kRowBlock * kTokenBlock * 16);
    for (int64_t r0 = b; r0 < e; r0 += kRowBlock) {
      const int64_t r1 = std::min(e, r0 + kRowBlock);
      int64_t m0 = 0;
      for (; m0 + 8 <= a.M; m0 += 8) decode_rows<8>(a, xp, xsum, m0, r0, r1, acc_buf.data());
      if (m0 + 4 <= a.M) { decode_rows<4>(a, xp, xsum, m0, r0, r1, acc_buf.data()); m0 += 4; }
      if (m0 + 2 <= a.M) { decode_rows<2>(a, xp, xsum, m0, r0, r1, acc_buf.data()); m0 += 2; }
      if (m0 < a.M) decode_rows<1>(a, xp, xsum, m0, r0, r1, acc_buf.data());
    }
  });
}

// true when it handled the call: 4 or 8 bits, groups of whole 32-column chunks, AVX-512.
bool avx512_linear(const LinearArgs& a, const at::Tensor& x, const at::Tensor& out) {
  static const bool have_avx512 = __builtin_cpu_supports("avx512f");
  if (!have_avx512 || (a.bits != 4 && a.bits != 8) || a.group_size % 32) return false;
  std::vector<float> xsum;
  const at::Tensor xp = prepare_x(a, x, xsum);
  if (a.M <= kMaxDecodeTokens) decode_linear(a, xp.data_ptr<float>(), xsum.data());
  else tiled_linear(a, xp, out, &dequantize_rows_avx512);
  return true;
}
#else
bool avx512_linear(const LinearArgs&, const at::Tensor&, const at::Tensor&) { return false; }
#endif

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const c10::optional<at::Tensor>& zero_point, int64_t bits,
                         int64_t group_size, const c10::optional<at::Tensor>& bias) {
  check_bits(bits);
  check_float(x, "x");
  TORCH_CHECK(x.dim() >= 1, "lowbit: x must have at least 1 dimension");
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 2,
              "lowbit: packed weight must be a 2-D int32 tensor");
  const int64_t K = x.size(-1), N = packed.size(0);
  TORCH_CHECK(group_size > 0 && K % group_size == 0, "lowbit: group_size ", group_size,
              " must divide in_features ", K);
  TORCH_CHECK(packed.size(1) == packed_words(K, bits), "lowbit: packed weight has ", packed.size(1),
              " words per row; ", K, " inputs at ", bits, " bits need ", packed_words(K, bits));
  const int64_t ngroups = K / group_size;
  TORCH_CHECK(scale.numel() == N * ngroups, "lowbit: scale must have [", N, ", ", ngroups, "] elements");
  TORCH_CHECK(!zero_point || zero_point->numel() == N * ngroups, "lowbit: zero_point must have [",
              N, ", ", ngroups, "] elements");
  TORCH_CHECK(!bias || bias->numel() == N, "lowbit: bias must have ", N, " elements");

  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor wp = packed.contiguous();
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  const float offset = static_cast<float>(1 << (bits - 1));
  const at::Tensor zf = (zero_point ? zero_point->to(at::kFloat) + offset
                                    : at::full_like(sf, offset)).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor out = at::empty({M, N}, xf.options());
  LinearArgs a{M, N, K, ngroups, group_size, packed.size(1), bits,
               reinterpret_cast<const uint8_t*>(wp.data_ptr<int32_t>()), sf.data_ptr<float>(),
               zf.data_ptr<float>(), out.data_ptr<float>()};
  if (M > 0 && N > 0 && !avx512_linear(a, xf, out)) tiled_linear(a, xf, out, &dequantize_rows);
  if (bias) out.add_(bias->to(at::kFloat).reshape({1, N}));
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return out.to(x.scalar_type()).reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("packed_linear", &packed_linear); }

}  // namespace lowbit
