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
  const float* x;        // [M, K] fp32
  const uint8_t* w;      // packed rows, words * 4 bytes each
  const float* scale;    // [N, ngroups]
  const float* zero;     // [N, ngroups], unsigned-domain zero point
  float* out;            // [M, N]
};

// ---------------------------------------------------------------- portable tile path
void dequantize_rows(const LinearArgs& a, int64_t r0, int64_t r1, float* dst) {
  at::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) {
    std::vector<int8_t> codes(a.K);
    const float offset = static_cast<float>(1 << (a.bits - 1));
    for (int64_t r = b; r < e; ++r) {
      unpack_row(reinterpret_cast<const uint32_t*>(a.w) + r * a.words, a.K, a.bits, codes.data());
      float* row = dst + (r - r0) * a.K;
      for (int64_t g = 0; g < a.ngroups; ++g) {
        const float s = a.scale[r * a.ngroups + g], z = a.zero[r * a.ngroups + g] - offset;
        for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k) row[k] = (codes[k] - z) * s;
      }
    }
  });
}

void tiled_linear(const LinearArgs& a, const at::Tensor& x, const at::Tensor& out) {
  // About 4 MB of fp32 weights per tile: in cache for the GEMM, small beside the model.
  const int64_t tile = std::max<int64_t>(16, (1 << 20) / std::max<int64_t>(a.K, 1));
  at::Tensor buf = at::empty({std::min(tile, a.N), a.K}, x.options());
  for (int64_t r0 = 0; r0 < a.N; r0 += tile) {
    const int64_t r1 = std::min(a.N, r0 + tile);
    dequantize_rows(a, r0, r1, buf.data_ptr<float>());
    out.narrow(1, r0, r1 - r0).copy_(at::mm(x, buf.narrow(0, 0, r1 - r0).t()));
  }
}

// ---------------------------------------------------------------- AVX-512 decode path
#ifdef LOWBIT_HAVE_AVX512_KERNEL
#define LOWBIT_AVX512 __attribute__((target("avx512f")))

// For 4 bits, byte j of a 32-column chunk holds column 2j (low nibble) and 2j+1 (high):
// x is reordered per chunk into [16 even columns, 16 odd columns] so both halves of a
// decoded byte vector meet contiguous x. For 8 bits the byte order is the column order.
// Also returns, per group, 16 lane-wise partial sums of x for the zero-point term.
void prepare_x(const LinearArgs& a, std::vector<float>& xp, std::vector<float>& xsum) {
  xp.resize(a.M * a.K);
  xsum.assign(a.M * a.ngroups * 16, 0.0f);
  for (int64_t m = 0; m < a.M; ++m) {
    const float* x = a.x + m * a.K;
    float* dst = xp.data() + m * a.K;
    if (a.bits == 4) {
      for (int64_t c = 0; c < a.K; c += 32)
        for (int l = 0; l < 16; ++l) {
          dst[c + l] = x[c + 2 * l];
          dst[c + 16 + l] = x[c + 2 * l + 1];
        }
    } else {
      std::copy(x, x + a.K, dst);
    }
    for (int64_t g = 0; g < a.ngroups; ++g) {
      float* s = xsum.data() + (m * a.ngroups + g) * 16;
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k) s[k % 16] += dst[k];
    }
  }
}

inline LOWBIT_AVX512 __m512 decode_lo4(__m512i v) {
  return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xF)));
}
inline LOWBIT_AVX512 __m512 decode_hi4(__m512i v) {
  return _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}

// Rows [r0, r1) x tokens [m0, m0 + MB).
template <int MB>
LOWBIT_AVX512 void decode_block(const LinearArgs& a, const float* xp, const float* xsum,
                                int64_t m0, int64_t r0, int64_t r1) {
  const int64_t row_bytes = a.words * 4;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wrow = a.w + r * row_bytes;
    __m512 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < a.ngroups; ++g) {
      __m512 ga[MB], gb[MB];
      for (int m = 0; m < MB; ++m) ga[m] = gb[m] = _mm512_setzero_ps();
      const int64_t k0 = g * a.group_size, k1 = k0 + a.group_size;
      if (a.bits == 4) {
        for (int64_t k = k0; k < k1; k += 32) {
          const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + k / 2)));
          const __m512 lo = decode_lo4(v), hi = decode_hi4(v);
          for (int m = 0; m < MB; ++m) {
            const float* x = xp + (m0 + m) * a.K + k;
            ga[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(x), ga[m]);
            gb[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(x + 16), gb[m]);
          }
        }
      } else {
        for (int64_t k = k0; k < k1; k += 32) {
          const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + k))));
          const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + k + 16))));
          for (int m = 0; m < MB; ++m) {
            const float* x = xp + (m0 + m) * a.K + k;
            ga[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x), ga[m]);
            gb[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + 16), gb[m]);
          }
        }
      }
      const __m512 s = _mm512_set1_ps(a.scale[r * a.ngroups + g]);
      const __m512 z = _mm512_set1_ps(a.zero[r * a.ngroups + g]);
      for (int m = 0; m < MB; ++m) {
        const __m512 xs = _mm512_loadu_ps(xsum + ((m0 + m) * a.ngroups + g) * 16);
        acc[m] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, _mm512_add_ps(ga[m], gb[m])), acc[m]);
      }
    }
    for (int m = 0; m < MB; ++m) a.out[(m0 + m) * a.N + r] = _mm512_reduce_add_ps(acc[m]);
  }
}

void decode_linear(const LinearArgs& a) {
  std::vector<float> xp, xsum;
  prepare_x(a, xp, xsum);
  // Blocks of rows small enough that their codes stay in L2 across token blocks.
  const int64_t rows_per_task = std::max<int64_t>(4, (64 << 10) / std::max<int64_t>(a.words * 4, 1));
  at::parallel_for(0, a.N, rows_per_task, [&](int64_t b, int64_t e) {
    for (int64_t r0 = b; r0 < e; r0 += rows_per_task) {
      const int64_t r1 = std::min(e, r0 + rows_per_task);
      int64_t m0 = 0;
      for (; m0 + 8 <= a.M; m0 += 8) decode_block<8>(a, xp.data(), xsum.data(), m0, r0, r1);
      if (m0 + 4 <= a.M) { decode_block<4>(a, xp.data(), xsum.data(), m0, r0, r1); m0 += 4; }
      if (m0 + 2 <= a.M) { decode_block<2>(a, xp.data(), xsum.data(), m0, r0, r1); m0 += 2; }
      if (m0 < a.M) decode_block<1>(a, xp.data(), xsum.data(), m0, r0, r1);
    }
  });
}

bool decode_kernel_applies(const LinearArgs& a) {
  static const bool avx512 = __builtin_cpu_supports("avx512f");
  return avx512 && a.M <= kMaxDecodeTokens && (a.bits == 4 || a.bits == 8) && a.group_size % 32 == 0;
}
#else
bool decode_kernel_applies(const LinearArgs&) { return false; }
void decode_linear(const LinearArgs&) {}
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
  LinearArgs a{M, N, K, ngroups, group_size, packed.size(1), bits, xf.data_ptr<float>(),
               reinterpret_cast<const uint8_t*>(wp.data_ptr<int32_t>()), sf.data_ptr<float>(),
               zf.data_ptr<float>(), out.data_ptr<float>()};
  if (M > 0 && N > 0) {
    if (decode_kernel_applies(a)) decode_linear(a);
    else tiled_linear(a, xf, out);
  }
  if (bias) out.add_(bias->to(at::kFloat).reshape({1, N}));
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return out.to(x.scalar_type()).reshape(sizes);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("packed_linear", &packed_linear); }

}  // namespace lowbit
