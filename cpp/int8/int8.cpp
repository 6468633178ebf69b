// LLM.int8() (Dettmers et al., 2022) as bitsandbytes computes it: vector-wise int8 quantization
// (per row absmax, codes round(v * (127 / absmax)) from float16 values), outlier decomposition
// (input columns holding any |x| >= threshold run in floating point), and a real int8 x int8 ->
// int32 matmul rescaled by the outer product of the row scales / 127^2.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "lowbit/common.h"
#include "lowbit/intquant.h"

namespace lowbit {
namespace {

constexpr float kInvSquare127 = 6.200124e-05f;     // bitsandbytes' 1 / 127^2
constexpr double kInv127 = 7.874015718698502e-3;  // and its 1 / 127

// One row of float16 values (held as fp32): its absmax over the non-outlier elements
// (|v| >= threshold, threshold > 0, are outliers), the outlier columns it marks, and whether
// every value is finite (v - v is 0 only for finite v). Lanes of partial results let the
// compiler vectorise the reductions (max and a NaN test do not depend on the order).
LOWBIT_VECTOR_LOOP float row_absmax(const float* row, int64_t K, float threshold, uint8_t* outlier, bool* finite) {
  constexpr int kLanes = 16;
  float am[kLanes] = {}, nonfinite[kLanes] = {};
  const auto step = [&](int64_t k, int j) {
    const float a = std::fabs(row[k]);
    const bool out = threshold > 0.0f && a >= threshold;
    outlier[k] |= out;
    am[j] = std::max(am[j], out ? 0.0f : a);
    nonfinite[j] += row[k] - row[k];
  };
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes)
    for (int j = 0; j < kLanes; ++j) step(k + j, j);
  for (int j = 0; k < K; ++k, ++j) step(k, j);
  float m = 0.0f, bad = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    m = std::max(m, am[j]);
    bad += nonfinite[j];
  }
  *finite = bad == 0.0f;
  return m;
}

// Its int8 codes; the codes of every outlier column are 0.
LOWBIT_VECTOR_LOOP void quantize_row(const float* row, int64_t K, float am, const uint8_t* outlier, int8_t* codes) {
  // 127 / absmax as PyTorch evaluates a scalar over a tensor (bitsandbytes' expression):
  // the reciprocal, then the product. An all-zero row stores codes 0.
  const float inv = am > 0.0f ? (1.0f / am) * 127.0f : 0.0f;
  for (int64_t k = 0; k < K; ++k)
    codes[k] = outlier[k] ? 0 : static_cast<int8_t>(std::nearbyint(row[k] * inv));
}

// x rounded to float16 (to nearest even; Inf beyond its range) and back, exactly as ATen's casts.
LOWBIT_VECTOR_LOOP void round_through_half(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = round_through(x[i], at::kHalf);
}

void check_threshold(double threshold) {
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0.0, "lowbit: threshold must be a finite number >= 0 "
                    "(0 disables the outlier decomposition), got ", threshold);
}

// Inner dimensions beyond this could overflow the int32 accumulators (|a * b| <= 2^14 per term,
// and 2^15 in the VNNI kernel's unsigned form).
constexpr int64_t kMaxInt8K = 65536;

struct Int8Rows {
  at::Tensor codes, absmax;              // int8 [M, K], float32 [M]
  std::vector<int64_t> outlier_columns;  // ascending

  at::Tensor outlier_tensor() const {
    return at::tensor(outlier_columns, codes.options().dtype(at::kLong));
  }
};

// x's rows rounded to float16 (LLM.int8() quantizes from float16), checked, and quantized:
// a first pass over the rows finds their absmax and the outlier columns (each thread marks its
// own copy, merged after), a second writes the codes.
Int8Rows quantize_rows(const at::Tensor& x, int64_t K, float threshold) {
  check_float(x, "x");
  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  // One pass instead of ATen's two conversions (x.to(half).to(float)): 2 us of a one-token call.
  const at::Tensor rounded = at::empty_like(xf);
  at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / K), [&](int64_t begin, int64_t end) {
    run_for_isa([&] { round_through_half(xf.data_ptr<float>() + begin * K, (end - begin) * K,
                                         rounded.data_ptr<float>() + begin * K); });
  });
  Int8Rows out{at::empty({M, K}, rounded.options().dtype(at::kChar)), at::empty({M}, rounded.options())};
  const float* xp = rounded.data_ptr<float>();
  std::vector<uint8_t> outlier(K, 0);
  uint8_t* op = outlier.data();
  int8_t* cp = out.codes.data_ptr<int8_t>();
  float* ap = out.absmax.data_ptr<float>();
  std::mutex merge;
  bool all_finite = true;
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> marks(K, 0);
    bool finite = true;
    run_for_isa([&] {
      for (int64_t m = begin; m < end; ++m) {
        bool row_finite = true;
        ap[m] = row_absmax(xp + m * K, K, threshold, marks.data(), &row_finite);
        finite = finite && row_finite;
      }
    });
    std::lock_guard<std::mutex> lock(merge);
    all_finite = all_finite && finite;
    for (int64_t k = 0; k < K; ++k) op[k] |= marks[k];
  });
  TORCH_CHECK_VALUE(all_finite, "lowbit: the input holds NaN or Inf (or values beyond float16's range, which "
                    "LLM.int8() quantizes from): check the activations");
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    run_for_isa([&] {
      for (int64_t m = begin; m < end; ++m) quantize_row(xp + m * K, K, ap[m], op, cp + m * K);
    });
  });
  if (threshold > 0.0f)
    for (int64_t k = 0; k < K; ++k)
      if (op[k]) out.outlier_columns.push_back(k);
  return out;
}

// -> (codes int8 [rows, K], absmax float32 [rows], outlier column indices int64)
std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_quantize_rowwise(const at::Tensor& x, double threshold) {
  check_cpu(x, "x");
  check_threshold(threshold);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.numel() > 0, "lowbit: cannot quantize an empty tensor");
  Int8Rows q = quantize_rows(x, x.size(-1), static_cast<float>(threshold));
  return {q.codes.view(x.sizes()), q.absmax, q.outlier_tensor()};
}

// ---------------------------------------------------------------- int8 x int8 -> int32 GEMM
// c [M, N] = a [M, K] @ b [N, K]^T, a the activations (tokens), b the weight rows, both
// row-major. Every kernel streams the weight once per block of tokens: the token block's
// K block stays in L2 while tiles of weight rows (in L1) meet every token of it.
constexpr int64_t kKBlock = 4096;         // columns per K block (a multiple of 32)
constexpr int64_t kBlockBytes = 1 << 18;  // one token block's K block: half of a 512 KiB L2

struct Gemm {
  const int8_t* a;
  const int8_t* b;
  int32_t* c;
  int64_t M, N, K;
  // The AVX2 kernel's -128 codes of a (see prepare_avx2): token m's columns
  // fix_k[fix_ptr[m] .. fix_ptr[m + 1]) hold -127 in a and take b[n, k] off c[m, n].
  const int64_t* fix_ptr = nullptr;
  const int32_t* fix_k = nullptr;
};

// Calls tile(m0, tokens, n0, rows, k0, kc) over token blocks x K blocks x weight rows
// [n_begin, n_end) in steps of R, groups of up to T_MAX tokens (tile writes c on the first K
// block, adds after).
template <int R, int T_MAX, typename Tile>
void for_each_tile(const Gemm& g, int64_t n_begin, int64_t n_end, const Tile& tile) {
  const int64_t kb = g.K <= kKBlock + kKBlock / 2 ? g.K : kKBlock;
  const int64_t tb = std::max<int64_t>(T_MAX, kBlockBytes / kb / T_MAX * T_MAX);
  for (int64_t m0 = 0; m0 < g.M; m0 += tb) {
    const int64_t m1 = std::min(g.M, m0 + tb);
    for (int64_t k0 = 0; k0 < g.K; k0 += kb) {
      const int64_t kc = std::min(kb, g.K - k0);
      for (int64_t n0 = n_begin; n0 < n_end; n0 += R) {
        const int rows = static_cast<int>(std::min<int64_t>(R, n_end - n0));
        for (int64_t m = m0; m < m1; m += T_MAX)
          tile(m, static_cast<int>(std::min<int64_t>(T_MAX, m1 - m)), n0, rows, k0, kc);
      }
    }
  }
}

// Portable kernel: int16 products summed in int32 (exact for every int8, -128 included), plain
// loops that run_for_isa() vectorises (pmaddwd). The tokens are widened to int16 once per call,
// each tile's weight rows once per K block.
template <int R, int T>
LOWBIT_VECTOR_LOOP void dot_tile_i16(const int16_t* a, int64_t lda, const int16_t* w, int64_t ldw, int64_t kc,
                                     int32_t* out) {
  int32_t s[R * T] = {};
  for (int64_t k = 0; k < kc; ++k)
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) s[i * T + t] += static_cast<int32_t>(a[t * lda + k]) * w[i * ldw + k];
  for (int i = 0; i < R * T; ++i) out[i] = s[i];
}

LOWBIT_VECTOR_LOOP void widen(const int8_t* x, int64_t n, int16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = x[i];
}

// Weight rows per portable tile: R x T accumulators, R weight and one token vector fit the 16
// SSE registers of baseline x86-64.
constexpr int kGenericRows = 2;

template <int T>
LOWBIT_VECTOR_LOOP void tile_generic(const Gemm& g, const int16_t* a16, int16_t* w16, int64_t m0, int64_t n0,
                                     int rows, int64_t k0, int64_t kc) {
  constexpr int R = kGenericRows;
  int32_t s[R * T];
  for (int i = 0; i < rows; ++i) widen(g.b + (n0 + i) * g.K + k0, kc, w16 + i * kc);
  if (n0 + R + rows <= g.N)  // the next tile's rows, fetched while these are multiplied
    for (int i = 0; i < rows; ++i)
      for (int64_t c = 0; c < kc; c += 64) __builtin_prefetch(g.b + (n0 + R + i) * g.K + k0 + c);
  for (int i = rows; i < R; ++i) std::fill(w16 + i * kc, w16 + (i + 1) * kc, int16_t(0));
  dot_tile_i16<R, T>(a16 + m0 * g.K + k0, g.K, w16, kc, kc, s);
  for (int t = 0; t < T; ++t)
    for (int i = 0; i < rows; ++i) {
      int32_t& c = g.c[(m0 + t) * g.N + n0 + i];
      c = (k0 == 0 ? 0 : c) + s[i * T + t];
    }
}

void gemm_generic(const Gemm& g, const int16_t* a16, int64_t n_begin, int64_t n_end) {
  std::vector<int16_t> w16(kGenericRows * std::min(g.K, kKBlock + kKBlock / 2));
  run_for_isa([&] {
    for_each_tile<kGenericRows, 4>(g, n_begin, n_end, [&](int64_t m0, int t, int64_t n0, int rows, int64_t k0,
                                                          int64_t kc) {
      switch (t) {
        case 1: tile_generic<1>(g, a16, w16.data(), m0, n0, rows, k0, kc); break;
        case 2: tile_generic<2>(g, a16, w16.data(), m0, n0, rows, k0, kc); break;
        case 3: tile_generic<3>(g, a16, w16.data(), m0, n0, rows, k0, kc); break;
        default: tile_generic<4>(g, a16, w16.data(), m0, n0, rows, k0, kc); break;
      }
    });
  });
}

#ifdef LOWBIT_X86

LOWBIT_TARGET_AVX2 inline int32_t hsum_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// R weight rows x T tokens over one K block, llama.cpp's AVX2 int8 dot: vpmaddubsw multiplies
// |w| (unsigned, 128 for -128) by a carrying w's sign (vpsignb), vpmaddwd with ones widens
// the pairs to int32. Exact while a holds no -128 (its sign flip would wrap): |pair| <=
// 2 * 128 * 127 < 2^15, no saturation. A tail of K % 32 columns runs in scalar code.
template <int R, int T>
LOWBIT_TARGET_AVX2 void tile_avx2(const Gemm& g, int64_t m0, int64_t n0, int64_t k0, int64_t kc) {
  const int64_t K = g.K;
  const int8_t* a = g.a + m0 * K + k0;
  const int8_t* b = g.b + n0 * K + k0;
  __m256i acc[R][T];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[i][t] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  int64_t k = 0;
  for (; k + 32 <= kc; k += 32) {
    __m256i w[R], wa[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      w[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + i * K + k));
      __builtin_prefetch(b + (i + R) * K + k);  // the next tile's rows
      wa[i] = _mm256_abs_epi8(w[i]);
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + t * K + k));
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i)
        acc[i][t] = _mm256_add_epi32(
            acc[i][t], _mm256_madd_epi16(_mm256_maddubs_epi16(wa[i], _mm256_sign_epi8(x, w[i])), ones));
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      int32_t s = hsum_avx2(acc[i][t]);
      for (int64_t j = k; j < kc; ++j) s += static_cast<int32_t>(a[t * K + j]) * b[i * K + j];
      if (k0 == 0 && g.fix_ptr)
        for (int64_t f = g.fix_ptr[m0 + t]; f < g.fix_ptr[m0 + t + 1]; ++f) s -= g.b[(n0 + i) * K + g.fix_k[f]];
      int32_t& c = g.c[(m0 + t) * g.N + n0 + i];
      c = (k0 == 0 ? 0 : c) + s;
    }
}

template <int R>
void tile_avx2_tokens(const Gemm& g, int64_t m0, int t, int64_t n0, int64_t k0, int64_t kc) {
  switch (t) {
    case 1: return tile_avx2<R, 1>(g, m0, n0, k0, kc);
    case 2: return tile_avx2<R, 2>(g, m0, n0, k0, kc);
    case 3: return tile_avx2<R, 3>(g, m0, n0, k0, kc);
    default: return tile_avx2<R, 4>(g, m0, n0, k0, kc);
  }
}

void gemm_avx2(const Gemm& g, int64_t n_begin, int64_t n_end) {
  for_each_tile<2, 4>(g, n_begin, n_end, [&](int64_t m0, int t, int64_t n0, int rows, int64_t k0, int64_t kc) {
    if (rows == 2) tile_avx2_tokens<2>(g, m0, t, n0, k0, kc);
    else tile_avx2_tokens<1>(g, m0, t, n0, k0, kc);
  });
}

// The AVX2 kernel's operand: a -128 code becomes -127, its missing -b[n, k] a correction.
// Few per token (a W8A8 token's most negative value may quantize to -128) are listed and taken
// off in the tiles; a token holding many gets a second row instead, -1 at those columns, whose
// products are added to the token's afterwards.
struct Avx2Operand {
  at::Tensor codes;                      // [M + extra, K]: a with -128 -> -127, then the extra rows
  std::vector<int64_t> fix_ptr{};        // [M + extra + 1] (empty when a holds no -128)
  std::vector<int32_t> fix_k{};
  std::vector<int64_t> extra_of{};       // the token of each extra row
};

LOWBIT_VECTOR_LOOP int32_t sum_codes(const int8_t* x, int64_t n) {  // |sum| <= 128 * kMaxInt8K
  int32_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  return sum;
}

LOWBIT_VECTOR_LOOP int64_t count_min(const int8_t* x, int64_t n) {
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) count += x[i] == -128;
  return count;
}

Avx2Operand prepare_avx2(const at::Tensor& a) {
  const int64_t M = a.size(0), K = a.size(1);
  const int8_t* ap = a.data_ptr<int8_t>();
  std::vector<int64_t> counts(M);
  int64_t total = 0;
  run_for_isa([&] {
    for (int64_t m = 0; m < M; ++m) total += counts[m] = count_min(ap + m * K, K);
  });
  if (total == 0) return {a};
  const int64_t sparse = std::max<int64_t>(4, K / 64);  // list corrections cost ~1/8 of a token's tile work here
  std::vector<int64_t> extra_of;
  for (int64_t m = 0; m < M; ++m)
    if (counts[m] > sparse) extra_of.push_back(m);
  const int64_t E = static_cast<int64_t>(extra_of.size());
  Avx2Operand op{at::zeros({M + E, K}, a.options()), std::vector<int64_t>(M + E + 1, 0), {}, std::move(extra_of)};
  int8_t* cp = op.codes.data_ptr<int8_t>();
  std::copy(ap, ap + M * K, cp);
  for (int64_t m = 0, e = 0; m < M; ++m) {
    const bool dense = e < E && op.extra_of[e] == m;
    for (int64_t k = 0; k < K && counts[m] > 0; ++k) {
      if (cp[m * K + k] != -128) continue;
      cp[m * K + k] = -127;
      if (dense) cp[(M + e) * K + k] = -1;
      else op.fix_k.push_back(static_cast<int32_t>(k));
    }
    e += dense;
    op.fix_ptr[m + 1] = static_cast<int64_t>(op.fix_k.size());
  }
  for (int64_t m = M; m < M + E; ++m) op.fix_ptr[m + 1] = op.fix_ptr[m];
  return op;
}

// R weight rows x T tokens of int32 dot products with vpdpbusd (unsigned x signed bytes): the
// weight bytes are flipped to unsigned (w + 128, an xor) and each token's 128 * sum(a) is
// subtracted afterwards. A tail of K % 64 columns is loaded masked (zeros add nothing).
template <int R, int T>
LOWBIT_TARGET_AVX512_VNNI void int8_tile_vnni(const int8_t* a, const int8_t* b, const int32_t* a_sum, int32_t* acc,
                                              int64_t N, int64_t K, int64_t n0, int64_t m0) {
  __m512i sums[R][T];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) sums[i][t] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mask = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
    __m512i w[R];
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i) {
      w[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, b + (n0 + i) * K + k), flip);
      __builtin_prefetch(b + (n0 + i + R) * K + k);  // the next tile's rows
    }
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) {
      const __m512i x = _mm512_maskz_loadu_epi8(mask, a + (m0 + t) * K + k);
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) sums[i][t] = _mm512_dpbusd_epi32(sums[i][t], w[i], x);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t)
      acc[(m0 + t) * N + n0 + i] = _mm512_reduce_add_epi32(sums[i][t]) - 128 * a_sum[m0 + t];
}

// The same tile on AVX-VNNI: vpdpbusd on 256-bit vectors, 32 columns a step, R x T <= 8
// accumulators (16 ymm registers); a tail of K % 32 columns in scalar code, flipped as well.
template <int R, int T>
LOWBIT_TARGET_AVXVNNI void int8_tile_avxvnni(const int8_t* a, const int8_t* b, const int32_t* a_sum, int32_t* acc,
                                             int64_t N, int64_t K, int64_t n0, int64_t m0) {
  __m256i sums[R][T];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) sums[i][t] = _mm256_setzero_si256();
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i w[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      w[i] = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + (n0 + i) * K + k)), flip);
      __builtin_prefetch(b + (n0 + i + R) * K + k);  // the next tile's rows
    }
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + (m0 + t) * K + k));
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) sums[i][t] = _mm256_dpbusd_avx_epi32(sums[i][t], w[i], x);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      int32_t s = hsum_avx2(sums[i][t]);
      for (int64_t j = k; j < K; ++j) s += (b[(n0 + i) * K + j] + 128) * static_cast<int32_t>(a[(m0 + t) * K + j]);
      acc[(m0 + t) * N + n0 + i] = s - 128 * a_sum[m0 + t];
    }
}

// Rows [begin, end) for all M tokens with vpdpbusd (kWide: AVX-512 VNNI, else AVX-VNNI): for each
// tile of R weight rows (kept in cache), every group of up to 8 (4) tokens.
template <bool kWide, int T>
void int8_rows_dpbusd(const int8_t* a, const int8_t* b, const int32_t* a_sum, int32_t* acc, int64_t N, int64_t K,
                      int64_t n0, int64_t rows, int64_t m0) {
  constexpr int R = kWide ? (T <= 2 ? 8 : T <= 4 ? 4 : 2) : (T == 1 ? 8 : T == 2 ? 4 : 2);
  const auto tile = [&](auto r, int64_t n) {
    if constexpr (kWide) int8_tile_vnni<decltype(r)::value, T>(a, b, a_sum, acc, N, K, n, m0);
    else int8_tile_avxvnni<decltype(r)::value, T>(a, b, a_sum, acc, N, K, n, m0);
  };
  int64_t n = n0;
  for (; n + R <= n0 + rows; n += R) tile(std::integral_constant<int, R>(), n);
  for (; n < n0 + rows; ++n) tile(std::integral_constant<int, 1>(), n);
}

// int8_rows_dpbusd for a group of `tokens` (1..T) tokens, T chosen at compile time.
template <bool kWide, int T>
void int8_rows_for(int64_t tokens, const int8_t* a, const int8_t* b, const int32_t* a_sum, int32_t* acc, int64_t N,
                   int64_t K, int64_t n0, int64_t rows, int64_t m0) {
  if constexpr (T > 1)
    if (tokens < T) return int8_rows_for<kWide, T - 1>(tokens, a, b, a_sum, acc, N, K, n0, rows, m0);
  int8_rows_dpbusd<kWide, T>(a, b, a_sum, acc, N, K, n0, rows, m0);
}

template <bool kWide>
void int8_gemm_dpbusd(const int8_t* a, const int8_t* b, const int32_t* a_sum, int32_t* acc, int64_t M, int64_t N,
                      int64_t K, int64_t begin, int64_t end) {
  constexpr int64_t kRowTile = 8;
  constexpr int kTokens = kWide ? 8 : 4;
  for (int64_t n0 = begin; n0 < end; n0 += kRowTile) {
    const int64_t rows = std::min(kRowTile, end - n0);
    for (int64_t m0 = 0; m0 < M; m0 += kTokens)
      int8_rows_for<kWide, kTokens>(M - m0, a, b, a_sum, acc, N, K, n0, rows, m0);
  }
}
#endif

// On the avx512 path with VNNI, from this many tokens on ATen's int8 GEMM (oneDNN, with AMX
// tiles on CPUs that have them) beats the VNNI tiles (measured crossover: 12 tokens on 4096x4096
// and 11008x4096). Without VNNI it is far slower than lowbit's AVX2 kernel (86 ms against
// 13 ms of fp32 dense for 16x4096x4096), so no other path calls it.
constexpr int64_t kOneDnnTokens = 12;

// Below this many multiply-adds a GEMM runs on the calling thread (waking the pool costs more):
// 576x576 at one token (331K) takes 9 us on two threads against 13 on one (AVX2).
constexpr int64_t kParallelMacs = 1 << 16;
constexpr int64_t kParallelRescale = 1 << 16;  // outputs rescaled to float

// row(m) for the M rows of an [M, N] output, compiled for the active ISA, split across the
// threads for large outputs.
template <typename F>
void over_output_rows(int64_t M, int64_t N, const F& row) {
  const auto body = [&](int64_t begin, int64_t end) {
    run_for_isa([&] {
      for (int64_t m = begin; m < end; ++m) row(m);
    });
  };
  if (M * N < kParallelRescale) body(0, M);
  else at::parallel_for(0, M, 1, body);
}

// body(begin, end) over b's rows [0, N), split across the threads for large products.
template <typename F>
void over_rows(int64_t M, int64_t N, int64_t K, const F& body) {
  if (M * N * K < kParallelMacs) return body(0, N);
  at::parallel_for(0, N, 16, body);
}

// a [M, K] @ b [N, K]^T in int32, both row-major: the VNNI tiles (or at::_int_mm) on the
// avx512 path of a VNNI CPU, the AVX-VNNI tiles on the avxvnni path, the AVX2 kernel on avx2 and
// on avx512 without VNNI, the portable one otherwise. Parallel over b's rows.
at::Tensor int8_matmul_impl(const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, a.options().dtype(at::kInt));
#ifdef LOWBIT_X86
  if (use_vnni() && M >= kOneDnnTokens && K % 8 == 0 && N % 8 == 0) return at::_int_mm(a, b.t());
#endif
  at::Tensor acc = at::empty({M, N}, a.options().dtype(at::kInt));
  Gemm g{a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), acc.data_ptr<int32_t>(), M, N, K};
#ifdef LOWBIT_X86
  const bool wide = use_vnni();
  if (wide || use_avxvnni()) {
    std::vector<int32_t> a_sum(M);
    run_for_isa([&] {
      for (int64_t m = 0; m < M; ++m) a_sum[m] = sum_codes(g.a + m * K, K);
    });
    const int32_t* sp = a_sum.data();
    over_rows(M, N, K, [&](int64_t begin, int64_t end) {
      if (wide) int8_gemm_dpbusd<true>(g.a, g.b, sp, g.c, M, N, K, begin, end);
      else int8_gemm_dpbusd<false>(g.a, g.b, sp, g.c, M, N, K, begin, end);
    });
    return acc;
  }
  if (active_isa() >= Isa::avx2) {
    const Avx2Operand op = prepare_avx2(a);
    if (op.fix_ptr.empty()) {
      over_rows(M, N, K, [&](int64_t begin, int64_t end) { gemm_avx2(g, begin, end); });
      return acc;
    }
    const int64_t E = static_cast<int64_t>(op.extra_of.size());
    at::Tensor full = E ? at::empty({M + E, N}, acc.options()) : acc;
    const Gemm gf{op.codes.data_ptr<int8_t>(), g.b, full.data_ptr<int32_t>(), M + E, N, K, op.fix_ptr.data(),
                  op.fix_k.data()};
    over_rows(M + E, N, K, [&](int64_t begin, int64_t end) { gemm_avx2(gf, begin, end); });
    if (E == 0) return acc;
    full = full.narrow(0, 0, M).index_add_(0, at::tensor(op.extra_of, a.options().dtype(at::kLong)),
                                           full.narrow(0, M, E));
    return full.contiguous();
  }
#endif
  at::Tensor a16 = at::empty({M, K}, a.options().dtype(at::kShort));
  int16_t* a16p = a16.data_ptr<int16_t>();
  run_for_isa([&] { widen(g.a, M * K, a16p); });
  over_rows(M, N, K, [&](int64_t begin, int64_t end) { gemm_generic(g, a16p, begin, end); });
  return acc;
}

// The op: a [M, K] and b [N, K] int8 on the CPU (any strides: copied to row-major).
at::Tensor int8_matmul(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_cpu(a_in, "a");
  check_cpu(b_in, "b");
  check_dtype(a_in, at::kChar, "a");
  check_dtype(b_in, at::kChar, "b");
  check_dim(a_in, 2, "a ([M, K])");
  check_dim(b_in, 2, "b ([N, K])");
  TORCH_CHECK_VALUE(a_in.size(1) == b_in.size(1), "lowbit: a [M, K] and b [N, K] must have the same K, got ",
                    a_in.sizes(), " and ", b_in.sizes());
  TORCH_CHECK_VALUE(a_in.size(1) <= kMaxInt8K, "lowbit: K = ", a_in.size(1), " exceeds ", kMaxInt8K,
                    " (the int32 accumulator could overflow)");
  return int8_matmul_impl(a_in.contiguous(), b_in.contiguous());
}

// bitsandbytes' order: acc * (row * col) * 1/127^2.
LOWBIT_VECTOR_LOOP void rescale_row(const int32_t* acc, float row, const float* col, int64_t N, float* out) {
  for (int64_t n = 0; n < N; ++n) out[n] = static_cast<float>(acc[n]) * (row * col[n]) * kInvSquare127;
}

// The arguments of an int8 linear (x float [..., K], w int8 [N, K], a scale per output row, an
// optional bias [N]) -> K. scale_shape: how the op's weight scale is shaped, for the message.
int64_t checked_int8_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                            const c10::optional<at::Tensor>& bias, const char* scale_shape) {
  check_cpu(x, "x");
  check_cpu(w, "w");
  check_cpu(w_scale, "w_scale");
  check_cpu(bias, "bias");
  check_float(x, "x");
  check_dtype(w, at::kChar, "the weight w (int8 codes)");
  check_floating(w_scale, "w_scale");
  TORCH_CHECK_VALUE(w.dim() == 2, "lowbit: the weight must be 2-D [out, in], got shape ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "lowbit: x must have ", K, " features in its last dimension, got ",
                    x.sizes());
  TORCH_CHECK_VALUE(w_scale.numel() == N && w_scale.dim() <= 2, "lowbit: the weight scale ", scale_shape, " (N = ",
                    N, "), got ", w_scale.sizes());
  TORCH_CHECK_VALUE(K > 0 && K <= kMaxInt8K, "lowbit: in_features ", K, " must be in 1..", kMaxInt8K,
                    " (the int32 accumulator could overflow)");
  check_bias(bias, N);
  return K;
}

// LLM.int8(): y = dequant(int8(x) @ w^T) + x[:, outliers] @ dequant(w[:, outliers])^T (+ bias),
// where int8(x) leaves the outlier columns out; returned in x's dtype.
at::Tensor int8_outlier_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale, double threshold,
                               const c10::optional<at::Tensor>& bias) {
  check_threshold(threshold);
  const int64_t N = w.size(0), K = checked_int8_linear(x, w, w_scale, bias, "(SCB) must have shape [N]");
  const Int8Rows q = quantize_rows(x, K, static_cast<float>(threshold));
  const int64_t M = q.codes.size(0);
  const at::Tensor wc = w.contiguous();
  const at::Tensor acc = int8_matmul_impl(q.codes, wc);
  const at::Tensor scb = w_scale.reshape(-1).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, q.absmax.options());
  const int32_t* cp = acc.data_ptr<int32_t>();
  const float *rp = q.absmax.data_ptr<float>(), *sp = scb.data_ptr<float>();
  float* op = out.data_ptr<float>();
  over_output_rows(M, N, [&](int64_t m) { rescale_row(cp + m * N, rp[m], sp, N, op + m * N); });
  if (!q.outlier_columns.empty()) {  // the outlier columns in floating point, against the int8-dequantized weight
    const at::Tensor idx = q.outlier_tensor();
    const at::Tensor sub_x = x.reshape({M, K}).index_select(1, idx).to(at::kFloat);
    const at::Tensor sub_w = wc.index_select(1, idx).to(at::kFloat) * scb.unsqueeze(1) * kInv127;
    out.addmm_(sub_x, sub_w.t());
  }
  return finish_linear(out, bias, x);
}

LOWBIT_VECTOR_LOOP void rescale_w8a8_row(const int32_t* acc, float x_scale, const float* w_scale, int64_t N,
                                          float* out) {
  for (int64_t n = 0; n < N; ++n) out[n] = static_cast<float>(acc[n]) * x_scale * w_scale[n];
}

// W8A8 as Int8DynamicLinear computes it, in one call instead of its six ATen and lowbit ops (30 us
// of fixed cost at one token): each token quantized symmetric int8 with compressed-tensors'
// min-max scale (rounded to x's dtype, as quant_params stores it) or the static input_scale,
// the int8 GEMM, then acc * x_scale * w_scale [out] in fp32 (+ bias), returned in x's dtype.
at::Tensor int8_dynamic_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                               const c10::optional<at::Tensor>& input_scale, const c10::optional<at::Tensor>& bias) {
  check_cpu(input_scale, "input_scale");
  const int64_t N = w.size(0), K = checked_int8_linear(x, w, w_scale, bias, "must have shape [N, 1]");
  const bool is_static = input_scale.has_value() && input_scale->defined();
  if (is_static) {
    check_floating(*input_scale, "input_scale");
    TORCH_CHECK_VALUE(input_scale->numel() == 1, "lowbit: input_scale must hold one value, got shape ",
                      input_scale->sizes());
  }
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  const at::ScalarType sd = x2.scalar_type();
  // the static scale as Int8DynamicLinear casts it to x's dtype
  const float static_scale = is_static ? round_through(input_scale->to(at::kFloat).item<float>(), sd) : 0.0f;
  TORCH_CHECK_VALUE(!is_static || (std::isfinite(static_scale) && static_scale > 0.0f),
                    "lowbit: input_scale must be finite and > 0 in x's dtype, got ", static_scale);
  const at::Tensor codes = at::empty({M, K}, x2.options().dtype(at::kChar));
  std::vector<float> x_scale(M);
  std::atomic<bool> finite{true};
  const IntRange r(8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sd, "lowbit_int8_dynamic_linear", [&] {
    const scalar_t* xp = x2.data_ptr<scalar_t>();
    int8_t* cp = codes.data_ptr<int8_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / K), [&](int64_t begin, int64_t end) {
      std::vector<float> row(K);
      run_for_isa([&] {
        for (int64_t m = begin; m < end; ++m) {
          float lo, hi;
          if (!to_float_minmax(xp + m * K, K, row.data(), &lo, &hi)) {
            finite = false;
            return;
          }
          const float s = is_static ? static_scale : params_for_range(lo, hi, r, true, sd).scale;
          x_scale[m] = s;
          quantize_span(row.data(), cp + m * K, K, s, 0.0f, r.qmin, r.qmax);
        }
      });
    });
  });
  TORCH_CHECK_VALUE(finite, "lowbit: the input holds NaN or Inf: check the activations");
  const at::Tensor acc = int8_matmul_impl(codes, w.contiguous());
  const at::Tensor ws = w_scale.reshape(-1).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, x2.options().dtype(at::kFloat));
  const int32_t* ap = acc.data_ptr<int32_t>();
  const float* wp = ws.data_ptr<float>();
  float* op = out.data_ptr<float>();
  over_output_rows(M, N, [&](int64_t m) { rescale_w8a8_row(ap + m * N, x_scale[m], wp, N, op + m * N); });
  return finish_linear(out, bias, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int8_quantize_rowwise", &int8_quantize_rowwise);
  m.impl("int8_matmul", &int8_matmul);
  m.impl("int8_outlier_matmul", &int8_outlier_matmul);
  m.impl("int8_dynamic_linear", &int8_dynamic_linear);
}

}  // namespace lowbit
