// LLM.int8() (Dettmers et al., 2022) as bitsandbytes computes it: vector-wise int8 quantization
// (per row absmax, codes round(v * (127 / absmax)) from float16 values), outlier decomposition
// (input columns holding any |x| >= threshold run in floating point), and a real int8 x int8 ->
// int32 matmul rescaled by the outer product of the row scales / 127^2.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "lowbit/common.h"

namespace lowbit {
namespace {

constexpr float kInvSquare127 = 6.200124e-05f;     // bitsandbytes' 1 / 127^2
constexpr double kInv127 = 7.874015718698502e-3;  // and its 1 / 127

// One row of float16 values (held as fp32): its absmax over the non-outlier elements
// (|v| >= threshold, threshold > 0, are outliers), the outlier columns it marks, and whether
// every value is finite (v - v is 0 only for finite v).
LOWBIT_VECTOR_LOOP float row_absmax(const float* row, int64_t K, float threshold, uint8_t* outlier, bool* finite) {
  float am = 0.0f, nonfinite = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float a = std::fabs(row[k]);
    const bool out = threshold > 0.0f && a >= threshold;
    outlier[k] |= out;
    am = std::max(am, out ? 0.0f : a);
    nonfinite += row[k] - row[k];
  }
  *finite = nonfinite == 0.0f;
  return am;
}

// Its int8 codes; the codes of every outlier column are 0.
LOWBIT_VECTOR_LOOP void quantize_row(const float* row, int64_t K, float am, const uint8_t* outlier, int8_t* codes) {
  // 127 / absmax as PyTorch evaluates a scalar over a tensor (bitsandbytes' expression):
  // the reciprocal, then the product. An all-zero row stores codes 0.
  const float inv = am > 0.0f ? (1.0f / am) * 127.0f : 0.0f;
  for (int64_t k = 0; k < K; ++k)
    codes[k] = outlier[k] ? 0 : static_cast<int8_t>(std::nearbyint(row[k] * inv));
}

void check_threshold(double threshold) {
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0.0, "lowbit: threshold must be a finite number >= 0 "
                    "(0 disables the outlier decomposition), got ", threshold);
}

// Inner dimensions beyond this could overflow the int32 accumulators (|a * b| <= 2^14 per term,
// and 2^15 in the VNNI kernel's unsigned form).
constexpr int64_t kMaxInt8K = 65536;

struct Int8Rows {
  at::Tensor codes, absmax, outlier;  // int8 [M, K], float32 [M], uint8 [K]
};

// x's rows rounded to float16 (LLM.int8() quantizes from float16), checked, and quantized:
// a first pass over the rows finds their absmax and the outlier columns (each thread marks its
// own copy, merged after), a second writes the codes.
Int8Rows quantize_rows(const at::Tensor& x, int64_t K, float threshold) {
  check_float(x, "x");
  const at::Tensor rounded = x.reshape({-1, K}).to(at::kHalf).to(at::kFloat).contiguous();
  const int64_t M = rounded.size(0);
  Int8Rows out{at::empty({M, K}, rounded.options().dtype(at::kChar)), at::empty({M}, rounded.options()),
               at::zeros({K}, rounded.options().dtype(at::kByte))};
  const float* xp = rounded.data_ptr<float>();
  uint8_t* op = out.outlier.data_ptr<uint8_t>();
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
  return out;
}

// -> (codes int8 [rows, K], absmax float32 [rows], outlier column indices int64)
std::tuple<at::Tensor, at::Tensor, at::Tensor> int8_quantize_rowwise(const at::Tensor& x, double threshold) {
  check_cpu(x, "x");
  check_threshold(threshold);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.numel() > 0, "lowbit: cannot quantize an empty tensor");
  Int8Rows q = quantize_rows(x, x.size(-1), static_cast<float>(threshold));
  return {q.codes.view(x.sizes()), q.absmax, q.outlier.nonzero().view({-1})};
}

// acc[m, n] = sum_k a[m, k] * b[n, k] (int32), a [M, K], b [N, K] row-major int8.
LOWBIT_VECTOR_LOOP void int8_dot_rows(const int8_t* a, const int8_t* b, int32_t* acc, int64_t M, int64_t N,
                                      int64_t K, int64_t begin, int64_t end) {
  for (int64_t n = begin; n < end; ++n)
    for (int64_t m = 0; m < M; ++m) {
      int32_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += static_cast<int32_t>(a[m * K + k]) * b[n * K + k];
      acc[m * N + n] = s;
    }
}

#ifdef LOWBIT_X86

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
    for (int i = 0; i < R; ++i) w[i] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, b + (n0 + i) * K + k), flip);
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

// Rows [begin, end) for all M tokens: for each tile of R weight rows (kept in cache), every
// group of up to 8 tokens; R x T <= 16 accumulators.
template <int T>
void int8_rows_vnni(const int8_t* a, const int8_t* b, const int32_t* a_sum, int32_t* acc, int64_t N, int64_t K,
                    int64_t n0, int64_t rows, int64_t m0) {
  constexpr int R = T <= 2 ? 8 : T <= 4 ? 4 : 2;
  int64_t n = n0;
  for (; n + R <= n0 + rows; n += R) int8_tile_vnni<R, T>(a, b, a_sum, acc, N, K, n, m0);
  for (; n < n0 + rows; ++n) int8_tile_vnni<1, T>(a, b, a_sum, acc, N, K, n, m0);
}

void int8_gemm_vnni(const int8_t* a, const int8_t* b, const int32_t* a_sum, int32_t* acc, int64_t M, int64_t N,
                    int64_t K, int64_t begin, int64_t end) {
  constexpr int64_t kRowTile = 8;
  for (int64_t n0 = begin; n0 < end; n0 += kRowTile) {
    const int64_t rows = std::min(kRowTile, end - n0);
    for (int64_t m0 = 0; m0 < M; m0 += 8) {
      switch (std::min<int64_t>(8, M - m0)) {
        case 1: int8_rows_vnni<1>(a, b, a_sum, acc, N, K, n0, rows, m0); break;
        case 2: int8_rows_vnni<2>(a, b, a_sum, acc, N, K, n0, rows, m0); break;
        case 3: int8_rows_vnni<3>(a, b, a_sum, acc, N, K, n0, rows, m0); break;
        case 4: int8_rows_vnni<4>(a, b, a_sum, acc, N, K, n0, rows, m0); break;
        case 5: int8_rows_vnni<5>(a, b, a_sum, acc, N, K, n0, rows, m0); break;
        case 6: int8_rows_vnni<6>(a, b, a_sum, acc, N, K, n0, rows, m0); break;
        case 7: int8_rows_vnni<7>(a, b, a_sum, acc, N, K, n0, rows, m0); break;
        default: int8_rows_vnni<8>(a, b, a_sum, acc, N, K, n0, rows, m0); break;
      }
    }
  }
}
#endif

// From this many tokens on, ATen's int8 GEMM (oneDNN, with AMX tiles on CPUs that have them)
// beats register tiles that re-read the activations for every few weight rows (measured
// crossover: 12 tokens on 4096x4096 and 11008x4096; below it these tiles take half its time).
constexpr int64_t kOneDnnTokens = 12;

// a [M, K] @ b [N, K]^T in int32: lowbit's VNNI tiles for few tokens, at::_int_mm for more
// (it needs K and N multiples of 8), a portable loop on CPUs without VNNI.
at::Tensor int8_matmul_impl(const at::Tensor& a, const at::Tensor& b) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, a.options().dtype(at::kInt));
  if (M >= kOneDnnTokens && K % 8 == 0 && N % 8 == 0) return at::_int_mm(a, b.t());
  at::Tensor acc = at::empty({M, N}, a.options().dtype(at::kInt));
  const int8_t *ap = a.data_ptr<int8_t>(), *bp = b.data_ptr<int8_t>();
  int32_t* cp = acc.data_ptr<int32_t>();
#ifdef LOWBIT_X86
  if (use_vnni()) {
    const at::Tensor a_sum = a.to(at::kInt).sum(1, false, at::kInt).contiguous();
    const int32_t* sp = a_sum.data_ptr<int32_t>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) { int8_gemm_vnni(ap, bp, sp, cp, M, N, K, begin, end); });
    return acc;
  }
#endif
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    run_for_isa([&] { int8_dot_rows(ap, bp, cp, M, N, K, begin, end); });
  });
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

// LLM.int8(): y = dequant(int8(x) @ w^T) + x[:, outliers] @ dequant(w[:, outliers])^T (+ bias),
// where int8(x) leaves the outlier columns out; returned in x's dtype.
at::Tensor int8_outlier_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale, double threshold,
                               const c10::optional<at::Tensor>& bias) {
  check_cpu(x, "x");
  check_cpu(w, "w");
  check_cpu(w_scale, "w_scale");
  check_cpu(bias, "bias");
  check_threshold(threshold);
  check_float(x, "x");
  check_dtype(w, at::kChar, "the weight w (int8 codes)");
  check_floating(w_scale, "w_scale");
  TORCH_CHECK_VALUE(w.dim() == 2, "lowbit: the weight must be 2-D [out, in], got shape ", w.sizes());
  const int64_t N = w.size(0), K = w.size(1);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == K, "lowbit: x must have ", K, " features in its last dimension, got ",
                    x.sizes());
  TORCH_CHECK_VALUE(w_scale.numel() == N && w_scale.dim() <= 2, "lowbit: the weight scale (SCB) must have shape [",
                    N, "], got ", w_scale.sizes());
  TORCH_CHECK_VALUE(K > 0 && K <= kMaxInt8K, "lowbit: in_features ", K, " must be in 1..", kMaxInt8K,
                    " (the int32 accumulator could overflow)");
  check_bias(bias, N);
  const Int8Rows q = quantize_rows(x, K, static_cast<float>(threshold));
  const int64_t M = q.codes.size(0);
  const at::Tensor wc = w.contiguous();
  const at::Tensor acc = int8_matmul_impl(q.codes, wc);
  const at::Tensor scb = w_scale.reshape(-1).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({M, N}, q.absmax.options());
  const int32_t* cp = acc.data_ptr<int32_t>();
  const float *rp = q.absmax.data_ptr<float>(), *sp = scb.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)  // bitsandbytes' order: acc * (row * col) * 1/127^2
      for (int64_t n = 0; n < N; ++n) op[m * N + n] = static_cast<float>(cp[m * N + n]) * (rp[m] * sp[n]) * kInvSquare127;
  });
  const at::Tensor idx = q.outlier.nonzero().view({-1});
  if (idx.numel() > 0) {  // the outlier columns in floating point, against the int8-dequantized weight
    const at::Tensor sub_x = x.reshape({M, K}).index_select(1, idx).to(at::kFloat);
    const at::Tensor sub_w = wc.index_select(1, idx).to(at::kFloat) * scb.unsqueeze(1) * kInv127;
    out.addmm_(sub_x, sub_w.t());
  }
  return finish_linear(out, bias, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("int8_quantize_rowwise", &int8_quantize_rowwise);
  m.impl("int8_matmul", &int8_matmul);
  m.impl("int8_outlier_matmul", &int8_outlier_matmul);
}

}  // namespace lowbit
