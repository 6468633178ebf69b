// FP8 (E4M3 / E5M2) quantization as compressed-tensors' float-quantized format computes it, and
// the FP8 linear layer.
//
// One layout for every strategy: a [rows, cols] tensor is cut into block_rows x block_cols tiles
// (partial tiles at the edges), element (i, j) scaled by scale[i / block_rows, j / block_cols]:
// per tensor (rows, cols), per channel or token (1, cols), per token group (1, g), FP8_BLOCK
// (128, 128).
//   scale = absmax / max in fp32, rounded once to x's dtype (what torch's division in that dtype
//           gives: fp32 holds more than twice the bits of fp16 / bf16), 0 -> finfo(dtype).eps;
//   code  = fp8(clamp(x / scale, -max, max)), round to nearest even, x / scale in fp32 (torch
//           divides fp16 / bf16 tensors in their own dtype, so a quotient rounded onto a midpoint
//           between two codes can take the other one); NaN x raises, +-Inf saturates;
//   value = float(code) * scale in fp32, cast to the requested dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "lowbit/common.h"
#include "lowbit/fp8.h"
#include "lowbit/intquant.h"

namespace lowbit {
namespace {

constexpr float kFloatMax = std::numeric_limits<float>::max();

// ---------------------------------------------------------------- arguments

void check_blocks(int64_t br, int64_t bc) {
  TORCH_CHECK_VALUE(br > 0 && bc > 0, "lowbit: block_rows and block_cols must be positive, got ", br, " and ", bc);
}

// A checked scale of a [rows, cols] tensor in br x bc tiles, as contiguous fp32.
struct Scales {
  at::Tensor t;
  const float* p;
  int64_t cols;  // tiles per row of the tensor
  float max;     // the largest scale
  const float* row(int64_t r, int64_t br) const { return p + (r / br) * cols; }
};

Scales checked_scales(const at::Tensor& scale, int64_t rows, int64_t cols, int64_t br, int64_t bc, const char* name) {
  check_cpu(scale, name);
  check_float(scale, name);
  check_blocks(br, bc);
  const int64_t sr = ceil_div(rows, br), sc = ceil_div(cols, bc);
  TORCH_CHECK_VALUE(scale.dim() == 2 && scale.size(0) == sr && scale.size(1) == sc, "lowbit: ", name,
                    " must have shape [", sr, ", ", sc, "] for a [", rows, ", ", cols, "] tensor in ", br, " x ", bc,
                    " blocks, got ", scale.sizes());
  Scales s{scale.to(at::kFloat).contiguous(), nullptr, sc, 0.0f};
  s.p = s.t.data_ptr<float>();
  for (int64_t i = 0; i < s.t.numel(); ++i) {
    TORCH_CHECK_VALUE(s.p[i] > 0.0f && s.p[i] <= kFloatMax, "lowbit: ", name,
                      " must be finite and > 0 everywhere, got ", s.p[i]);
    s.max = std::max(s.max, s.p[i]);
  }
  return s;
}

// fn(std::true_type) for E5M2, fn(std::false_type) for E4M3: the format as a compile-time constant.
template <typename F>
void dispatch_fp8(const Fp8Format& f, const F& fn) {
  if (f.e5m2) fn(std::true_type{});
  else fn(std::false_type{});
}

// fn(r) for every row, in parallel tasks of about 64K elements, each compiled for the active ISA.
template <typename F>
void for_rows(int64_t rows, int64_t cols, const F& fn) {
  at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(cols, 1)), [&](int64_t b, int64_t e) {
    run_for_isa([&] {
      for (int64_t r = b; r < e; ++r) fn(r);
    });
  });
}

// ---------------------------------------------------------------- quantization

// The spans below are plain loops that run_for_isa() compiles for each ISA. x * 0 is NaN exactly
// for NaN and Inf, and a NaN survives the sum.
LOWBIT_VECTOR_LOOP bool absmax_span(const float* x, int64_t n, float* out) {
  float m = 0.0f, poison = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    m = a > m ? a : m;
    poison += x[i] * 0.0f;
  }
  *out = m;
  return poison == 0.0f;
}

// Returns true if x held a NaN.
template <int M, int B>
LOWBIT_VECTOR_LOOP bool quantize_span(const float* x, uint8_t* q, int64_t n, float s, float max) {
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    nan |= x[i] != x[i];
    q[i] = fp8_encode<M, B>(clampf(x[i] / s, -max, max));
  }
  return nan != 0;
}

template <int M, int B>
LOWBIT_VECTOR_LOOP bool fake_quantize_span(const float* x, float* out, int64_t n, float s, float max) {
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) {
    nan |= x[i] != x[i];
    out[i] = fp8_round<M, B>(clampf(x[i] / s, -max, max)) * s;
  }
  return nan != 0;
}

LOWBIT_VECTOR_LOOP void dequantize_span(const uint8_t* q, const float* values, float* out, int64_t n, float s) {
  for (int64_t i = 0; i < n; ++i) out[i] = values[q[i]] * s;
}

// -> scale [ceil(rows / br), ceil(cols / bc)] in x's dtype.
at::Tensor fp8_scales(const at::Tensor& x_in, int64_t br, int64_t bc, std::string format) {
  check_cpu(x_in, "x");
  check_float(x_in, "x");
  check_dim(x_in, 2, "x");
  check_blocks(br, bc);
  const Fp8Format& f = fp8_format(format);
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t rows = x.size(0), cols = x.size(1), sr = ceil_div(rows, br), sc = ceil_div(cols, bc);
  // Each row's absmax per column block, then the maximum over the block's rows.
  at::Tensor row_max = at::empty({rows, sc}, x.options());
  const float* xp = x.data_ptr<float>();
  float* rm = row_max.data_ptr<float>();
  std::atomic<bool> finite{true};
  for_rows(rows, cols, [&](int64_t r) {
    bool ok = true;
    for (int64_t c0 = 0, b = 0; c0 < cols; c0 += bc, ++b)
      ok &= absmax_span(xp + r * cols + c0, std::min(bc, cols - c0), rm + r * sc + b);
    if (!ok) finite = false;
  });
  TORCH_CHECK_VALUE(finite, "lowbit: x contains NaN or Inf values; FP8 scales need finite values");
  const at::ScalarType st = x_in.scalar_type();
  at::Tensor scale = at::empty({sr, sc}, x.options());
  float* sp = scale.data_ptr<float>();
  for (int64_t i = 0; i < sr; ++i)
    for (int64_t j = 0; j < sc; ++j) {
      float am = 0.0f;
      for (int64_t r = i * br; r < std::min(rows, i * br + br); ++r) am = std::max(am, rm[r * sc + j]);
      const float s = round_through(am / f.max, st);
      sp[i * sc + j] = s == 0.0f ? dtype_eps(st) : s;
    }
  return scale.to(st);
}

at::Tensor fp8_quantize(const at::Tensor& x_in, const at::Tensor& scale, int64_t br, int64_t bc, std::string format) {
  check_cpu(x_in, "x");
  check_float(x_in, "x");
  check_dim(x_in, 2, "x");
  const Fp8Format& f = fp8_format(format);
  const int64_t rows = x_in.size(0), cols = x_in.size(1);
  const Scales s = checked_scales(scale, rows, cols, br, bc, "scale");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor q = at::empty({rows, cols}, x.options().dtype(f.dtype));
  const float* xp = x.data_ptr<float>();
  uint8_t* qp = static_cast<uint8_t*>(q.data_ptr());
  std::atomic<bool> nan{false};
  dispatch_fp8(f, [&](auto e5m2) {
    constexpr int M = decltype(e5m2)::value ? 2 : 3, B = decltype(e5m2)::value ? 15 : 7;
    for_rows(rows, cols, [&](int64_t r) {
      const float* srow = s.row(r, br);
      bool bad = false;
      for (int64_t c0 = 0, b = 0; c0 < cols; c0 += bc, ++b)
        bad |= quantize_span<M, B>(xp + r * cols + c0, qp + r * cols + c0, std::min(bc, cols - c0), srow[b], f.max);
      if (bad) nan = true;
    });
  });
  TORCH_CHECK_VALUE(!nan, "lowbit: x contains NaN values, which would be stored as FP8 NaN codes");
  return q;
}

// quantize then dequantize, in x's dtype.
at::Tensor fp8_fake_quantize(const at::Tensor& x_in, const at::Tensor& scale, int64_t br, int64_t bc,
                             std::string format) {
  check_cpu(x_in, "x");
  check_float(x_in, "x");
  check_dim(x_in, 2, "x");
  const Fp8Format& f = fp8_format(format);
  const int64_t rows = x_in.size(0), cols = x_in.size(1);
  const Scales s = checked_scales(scale, rows, cols, br, bc, "scale");
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({rows, cols}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::atomic<bool> nan{false};
  dispatch_fp8(f, [&](auto e5m2) {
    constexpr int M = decltype(e5m2)::value ? 2 : 3, B = decltype(e5m2)::value ? 15 : 7;
    for_rows(rows, cols, [&](int64_t r) {
      const float* srow = s.row(r, br);
      bool bad = false;
      for (int64_t c0 = 0, b = 0; c0 < cols; c0 += bc, ++b)
        bad |= fake_quantize_span<M, B>(xp + r * cols + c0, op + r * cols + c0, std::min(bc, cols - c0), srow[b],
                                        f.max);
      if (bad) nan = true;
    });
  });
  TORCH_CHECK_VALUE(!nan, "lowbit: x contains NaN values, which FP8 cannot quantize");
  return out.to(x_in.scalar_type());
}

// ---------------------------------------------------------------- decoding FP8 weights
// A weight [N, K] of codes with its checked scales; the vector kernels decode 16 codes at a time
// and need whole blocks of such chunks along K (bc a multiple of 32, or one block per row).
struct Fp8Weight {
  const uint8_t* w;
  Scales s;
  int64_t N, K, br, bc;
  const Fp8Format* f;
  // One block along K: the scale multiplies a row's sums once, at the end.
  bool one_block() const { return s.cols == 1; }
  // The AVX kernels: chunk-aligned blocks, and scale * 256 (E4M3's decode factor) finite.
  bool vector_ok() const { return (one_block() || bc % 32 == 0) && s.max <= kFloatMax / 256; }
};

// Whether any code is E4M3's NaN (0x7F or 0xFF): a byte-wise maximum, which vectorises.
LOWBIT_VECTOR_LOOP bool has_nan_code(const uint8_t* p, int64_t n) {
  uint8_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max<uint8_t>(m, p[i] & 0x7F);
  return m == 0x7F;
}

inline void patch_nan_codes(const uint8_t* row, int64_t K, float* dst) {
  for (int64_t j = 0; j < K; ++j)
    if ((row[j] & 0x7F) == 0x7F) dst[j] = std::numeric_limits<float>::quiet_NaN();
}

// E4M3 without the table: the code sign-extended and shifted under fp32's fields ((int8) code << 20,
// masked to the sign, 4 exponent and 3 mantissa bits) is the fp32 pattern of value / 2^120, normals
// and subnormals alike. One multiply by scale * 2^120 then gives exactly the table's value * scale
// (the same real product, rounded once). A plain loop that vectorises on SSE2, where the table is a
// gather of scalar loads. It misreads E4M3's NaN (0x7F -> 480), which the caller patches.
constexpr float kE4M3Unbias = 0x1p120f;

LOWBIT_VECTOR_LOOP float e4m3_over_2_120(uint8_t code) {
  const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(static_cast<int8_t>(code))) << 20 & 0x87F00000u;
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

LOWBIT_VECTOR_LOOP void decode_e4m3_span(const uint8_t* q, float* out, int64_t n, float scale_unbiased) {
  for (int64_t i = 0; i < n; ++i) out[i] = e4m3_over_2_120(q[i]) * scale_unbiased;
}

// The arithmetic decode needs E4M3, every scale * 2^120 finite, and subnormal inputs honoured: a
// thread with DAZ set (torch.set_flush_denormal) would read the subnormal patterns as 0.
bool e4m3_arithmetic_ok(const Fp8Weight& W) {
#ifdef LOWBIT_X86
  constexpr unsigned kDenormalsAreZero = 1u << 6;
  return !W.f->e5m2 && W.s.max <= kFloatMax / kE4M3Unbias && !(_mm_getcsr() & kDenormalsAreZero);
#else
  return false;
#endif
}

// Rows [begin, end) of float(code) * scale into dst (row stride K), any tiles: E4M3 by arithmetic
// where it is exact, else through the value table.
void decode_rows_portable(const Fp8Weight& W, int64_t begin, int64_t end, float* dst) {
  const float* values = fp8_values(*W.f).data();
  const bool arithmetic = e4m3_arithmetic_ok(W);
  run_for_isa([&] {
    for (int64_t r = begin; r < end; ++r) {
      const float* srow = W.s.row(r, W.br);
      for (int64_t c0 = 0, b = 0; c0 < W.K; c0 += W.bc, ++b) {
        const uint8_t* q = W.w + r * W.K + c0;
        float* out = dst + (r - begin) * W.K + c0;
        const int64_t n = std::min(W.bc, W.K - c0);
        if (!arithmetic) {
          dequantize_span(q, values, out, n, srow[b]);
          continue;
        }
        decode_e4m3_span(q, out, n, srow[b] * kE4M3Unbias);
        if (has_nan_code(q, n)) patch_nan_codes(q, n, out);
      }
    }
  });
}

#ifdef LOWBIT_X86
// E4M3 decodes through fp16: its sign, then its 7 exponent and mantissa bits shifted under fp16's
// (vpmovsxbw, shift 7, clear the sign copy at bit 14) is the fp16 pattern of value / 256, normals
// and subnormals alike (fp16's exponent bias is 8 more), which vcvtph2ps widens exactly. E5M2 is
// the top byte of its fp16 value. The one value this gets wrong is E4M3's NaN (0x7F -> 480 / 256):
// the kernels keep the byte-wise maximum of code & 0x7F and patch the rows that hold 0x7F.
constexpr float kE4M3Factor = 256.0f;

template <bool E5M2>
LOWBIT_TARGET_AVX2 inline __m256i fp16_bits(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (E5M2) return _mm256_slli_epi16(_mm256_cvtepu8_epi16(b), 8);
  const __m256i clear_bit14 = _mm256_set1_epi16(static_cast<short>(0xBFFF));
  return _mm256_and_si256(_mm256_slli_epi16(_mm256_cvtepi8_epi16(b), 7), clear_bit14);
}

LOWBIT_TARGET_AVX2 inline __m256i nan_max(__m256i acc, const uint8_t* p) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_max_epu8(acc, _mm256_and_si256(v, _mm256_set1_epi8(0x7F)));
}

LOWBIT_TARGET_AVX2 inline bool nan_seen(__m256i acc) {
  return _mm256_movemask_epi8(_mm256_cmpeq_epi8(acc, _mm256_set1_epi8(0x7F))) != 0;
}

// The kernels walk a row in blocks of `width` columns (bc, a multiple of 32, or the whole row) and
// each block in chunks of 32 codes; the K % 32 codes past a row's last whole chunk come from a
// zero-padded Tail (zero codes against zero x).
struct Tail {
  alignas(32) uint8_t bytes[32];
  const uint8_t* operator()(const uint8_t* src, int64_t n) {
    std::memset(bytes, 0, 32);
    std::memcpy(bytes, src, n);
    return bytes;
  }
};

template <bool E5M2>
LOWBIT_TARGET_AVX512 inline __m512 fp8x16_avx512(const uint8_t* p) {
  return _mm512_cvtph_ps(fp16_bits<E5M2>(p));
}

template <bool E5M2>
LOWBIT_TARGET_AVX2 inline void fp8x16_avx2(const uint8_t* p, __m256& lo, __m256& hi) {
  const __m256i h = fp16_bits<E5M2>(p);
  lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
  hi = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
}

// Rows exactly as float(code) * scale (times 256, then the scale: both exact) into dst.
template <bool E5M2>
LOWBIT_TARGET_AVX512 void decode_rows_avx512(const Fp8Weight& W, int64_t begin, int64_t end, float* dst) {
  const int64_t width = W.one_block() ? W.K : W.bc;
  const __m512 f = _mm512_set1_ps(E5M2 ? 1.0f : kE4M3Factor);
  Tail tail;
  for (int64_t r = begin; r < end; ++r, dst += W.K) {
    const uint8_t* row = W.w + r * W.K;
    const float* srow = W.s.row(r, W.br);
    __m256i nan = _mm256_setzero_si256();
    for (int64_t k0 = 0, b = 0; k0 < W.K; k0 += width, ++b) {
      const int64_t k1 = std::min(W.K, k0 + width);
      const __m512 s = _mm512_set1_ps(srow[b]);
      for (int64_t k = k0; k < k1; k += 32) {
        const int64_t n = std::min<int64_t>(32, k1 - k);
        const uint8_t* p = n == 32 ? row + k : tail(row + k, n);
        if (!E5M2) nan = nan_max(nan, p);
        const __m512 lo = _mm512_mul_ps(_mm512_mul_ps(fp8x16_avx512<E5M2>(p), f), s);
        const __m512 hi = _mm512_mul_ps(_mm512_mul_ps(fp8x16_avx512<E5M2>(p + 16), f), s);
        const __mmask16 mlo = n >= 16 ? 0xFFFF : (1u << n) - 1;
        const __mmask16 mhi = n >= 32 ? 0xFFFF : n <= 16 ? 0 : (1u << (n - 16)) - 1;
        _mm512_mask_storeu_ps(dst + k, mlo, lo);
        _mm512_mask_storeu_ps(dst + k + 16, mhi, hi);
      }
    }
    if (!E5M2 && nan_seen(nan)) patch_nan_codes(row, W.K, dst);
  }
}

template <bool E5M2>
LOWBIT_TARGET_AVX2 void decode_rows_avx2(const Fp8Weight& W, int64_t begin, int64_t end, float* dst) {
  const int64_t width = W.one_block() ? W.K : W.bc;
  const __m256 f = _mm256_set1_ps(E5M2 ? 1.0f : kE4M3Factor);
  Tail tail;
  alignas(32) float buf[32];
  for (int64_t r = begin; r < end; ++r, dst += W.K) {
    const uint8_t* row = W.w + r * W.K;
    const float* srow = W.s.row(r, W.br);
    __m256i nan = _mm256_setzero_si256();
    for (int64_t k0 = 0, b = 0; k0 < W.K; k0 += width, ++b) {
      const int64_t k1 = std::min(W.K, k0 + width);
      const __m256 s = _mm256_set1_ps(srow[b]);
      for (int64_t k = k0; k < k1; k += 32) {
        const int64_t n = std::min<int64_t>(32, k1 - k);
        const uint8_t* p = n == 32 ? row + k : tail(row + k, n);
        if (!E5M2) nan = nan_max(nan, p);
        float* out = n == 32 ? dst + k : buf;
        for (int h = 0; h < 2; ++h) {
          __m256 lo, hi;
          fp8x16_avx2<E5M2>(p + 16 * h, lo, hi);
          _mm256_storeu_ps(out + 16 * h, _mm256_mul_ps(_mm256_mul_ps(lo, f), s));
          _mm256_storeu_ps(out + 16 * h + 8, _mm256_mul_ps(_mm256_mul_ps(hi, f), s));
        }
        if (n < 32) std::memcpy(dst + k, buf, n * sizeof(float));
      }
    }
    if (!E5M2 && nan_seen(nan)) patch_nan_codes(row, W.K, dst);
  }
}
#endif

// Rows [begin, end) of the dequantized weight into dst (row stride K), on the active ISA.
void decode_rows(const Fp8Weight& W, int64_t begin, int64_t end, float* dst) {
#ifdef LOWBIT_X86
  const Isa isa = active_isa();
  if (isa != Isa::generic && W.vector_ok()) {
    const bool e5 = W.f->e5m2;
    if (isa == Isa::avx512) return e5 ? decode_rows_avx512<true>(W, begin, end, dst)
                                      : decode_rows_avx512<false>(W, begin, end, dst);
    return e5 ? decode_rows_avx2<true>(W, begin, end, dst) : decode_rows_avx2<false>(W, begin, end, dst);
  }
#endif
  decode_rows_portable(W, begin, end, dst);
}

Fp8Weight checked_weight(const at::Tensor& w, const at::Tensor& scale, int64_t br, int64_t bc, const char* name,
                         at::Tensor& contiguous) {
  check_cpu(w, name);
  const Fp8Format& f = fp8_format_of(w, name);
  check_dim(w, 2, name);
  const int64_t N = w.size(0), K = w.size(1);
  Scales s = checked_scales(scale, N, K, br, bc, "scale");
  contiguous = w.contiguous();
  return Fp8Weight{static_cast<const uint8_t*>(contiguous.data_ptr()), std::move(s), N, K, br, bc, &f};
}

at::Tensor fp8_dequantize(const at::Tensor& q, const at::Tensor& scale, int64_t br, int64_t bc, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(is_float(dtype), "lowbit: dtype must be float32, float16 or bfloat16, got ", dtype_name(dtype));
  at::Tensor qc;
  const Fp8Weight W = checked_weight(q, scale, br, bc, "q", qc);
  at::Tensor out = at::empty({W.N, W.K}, scale.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  at::parallel_for(0, W.N, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(W.K, 1)),
                   [&](int64_t b, int64_t e) { decode_rows(W, b, e, op + b * W.K); });
  return out.to(dtype);
}

// ---------------------------------------------------------------- the FP8 linear layer
// y [M, N] = x [M, K] @ W^T. Up to fused_tokens(isa) tokens every thread streams its rows of codes
// once per group of up to 8 tokens (a row block of codes stays in L2 across the groups), decoding
// them in registers; x is read from a zero-padded fp32 copy [M, Kp], Kp a multiple of 32. More
// tokens: tiles of rows decoded to fp32 for ATen's GEMM (tiled_matmul; bf16 x in bf16 where bf16_gemm).
struct Fused {
  const Fp8Weight* W;
  const float* x;
  int64_t Kp;
  float* out;
};

constexpr int64_t kRowBlock = 16;

// A row's sum times its scale and E4M3's factor (one block per row), or the sum itself (the
// weights were scaled block by block).
inline float finish_row(const Fp8Weight& W, int64_t r, float sum, bool blocked, float factor) {
  return blocked ? sum : static_cast<float>(static_cast<double>(sum) * factor * W.s.row(r, W.br)[0]);
}

inline void mark_nan_rows(const Fp8Weight& W, const Fused& F, int64_t r0, int R, int64_t m0, int T) {
  for (int i = 0; i < R; ++i)
    if (has_nan_code(W.w + (r0 + i) * W.K, W.K))
      for (int t = 0; t < T; ++t) F.out[(m0 + t) * W.N + r0 + i] = std::numeric_limits<float>::quiet_NaN();
}

#ifdef LOWBIT_X86
// y[m0 + t, r0 + i] for R rows and T tokens in R x T accumulators: each 32 codes of a row
// become 2 vectors of weights (times the block's scale when a row has several blocks) that
// every token's x meets in an FMA.
template <bool E5M2, bool Blocked, int R, int T>
LOWBIT_TARGET_AVX512 void tile_avx512(const Fused& F, int64_t r0, int64_t m0) {
  const Fp8Weight& W = *F.W;
  const float factor = E5M2 ? 1.0f : kE4M3Factor;
  __m512 acc[R][T];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  const uint8_t* rows[R];
  const float* srow[R];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i) rows[i] = W.w + (r0 + i) * W.K, srow[i] = W.s.row(r0 + i, W.br);
  const float* x0 = F.x + m0 * F.Kp;
  __m256i nan = _mm256_setzero_si256();
  Tail tail[R];
  const int64_t width = Blocked ? W.bc : W.K;
  for (int64_t k0 = 0, b = 0; k0 < W.K; k0 += width, ++b) {
    const int64_t k1 = std::min(W.K, k0 + width);
    __m512 s[R];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) s[i] = _mm512_set1_ps(Blocked ? srow[i][b] * factor : 1.0f);
    for (int64_t k = k0; k < k1; k += 32) {
      const int64_t n = std::min<int64_t>(32, k1 - k);
      __m512 w[R][2];
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const uint8_t* p = n == 32 ? rows[i] + k : tail[i](rows[i] + k, n);
        // A single row streams on; a tile fetches the same bytes of the next R rows.
        __builtin_prefetch(rows[i] + k + (R == 1 ? kPrefetchBytes : R * W.K));
        if (!E5M2) nan = nan_max(nan, p);
        w[i][0] = fp8x16_avx512<E5M2>(p);
        w[i][1] = fp8x16_avx512<E5M2>(p + 16);
        if (Blocked) w[i][0] = _mm512_mul_ps(w[i][0], s[i]), w[i][1] = _mm512_mul_ps(w[i][1], s[i]);
      }
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const __m512 xl = _mm512_loadu_ps(x0 + t * F.Kp + k), xh = _mm512_loadu_ps(x0 + t * F.Kp + k + 16);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i) acc[i][t] = _mm512_fmadd_ps(w[i][1], xh, _mm512_fmadd_ps(w[i][0], xl, acc[i][t]));
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
      F.out[(m0 + t) * W.N + r0 + i] = finish_row(W, r0 + i, _mm512_reduce_add_ps(acc[i][t]), Blocked, factor);
  if (!E5M2 && nan_seen(nan)) mark_nan_rows(W, F, r0, R, m0, T);
}

// Rows [begin, end) for T tokens from m0: 4 rows per pass for up to 2 tokens, 2 beyond (R x T
// accumulators, R x 2 weight vectors and R scales within the 32 registers), odd rows one by one.
template <bool E5M2, bool Blocked, int T>
LOWBIT_TARGET_AVX512 void rows_avx512(const Fused& F, int64_t begin, int64_t end, int64_t m0) {
  constexpr int R = T <= 2 ? 4 : 2;
  int64_t r = begin;
  for (; r + R <= end; r += R) tile_avx512<E5M2, Blocked, R, T>(F, r, m0);
  for (; r < end; ++r) tile_avx512<E5M2, Blocked, 1, T>(F, r, m0);
}

LOWBIT_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

// One row for T tokens: its 32 codes per chunk become 4 vectors of weights; A accumulators per
// token keep enough FMA chains in flight (x is an FMA memory operand).
template <bool E5M2, bool Blocked, int T>
LOWBIT_TARGET_AVX2 void row_avx2(const Fused& F, int64_t r, int64_t m0) {
  const Fp8Weight& W = *F.W;
  const float factor = E5M2 ? 1.0f : kE4M3Factor;
  constexpr int A = T == 1 ? 4 : T <= 4 ? 2 : 1;
  __m256 acc[T][A];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
    for (int a = 0; a < A; ++a) acc[t][a] = _mm256_setzero_ps();
  const uint8_t* row = W.w + r * W.K;
  const float* srow = W.s.row(r, W.br);
  const float* x0 = F.x + m0 * F.Kp;
  __m256i nan = _mm256_setzero_si256();
  Tail tail;
  const int64_t width = Blocked ? W.bc : W.K;
  for (int64_t k0 = 0, b = 0; k0 < W.K; k0 += width, ++b) {
    const int64_t k1 = std::min(W.K, k0 + width);
    const __m256 s = _mm256_set1_ps(Blocked ? srow[b] * factor : 1.0f);
    for (int64_t k = k0; k < k1; k += 32) {
      const int64_t n = std::min<int64_t>(32, k1 - k);
      const uint8_t* p = n == 32 ? row + k : tail(row + k, n);
      __builtin_prefetch(row + k + kPrefetchBytes);
      if (!E5M2) nan = nan_max(nan, p);
      __m256 w[4];
      fp8x16_avx2<E5M2>(p, w[0], w[1]);
      fp8x16_avx2<E5M2>(p + 16, w[2], w[3]);
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q)
        if (Blocked) w[q] = _mm256_mul_ps(w[q], s);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q)
          acc[t][q % A] = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(x0 + t * F.Kp + k + 8 * q), acc[t][q % A]);
    }
  }
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) {
    __m256 v = acc[t][0];
#pragma GCC unroll 4
    for (int a = 1; a < A; ++a) v = _mm256_add_ps(v, acc[t][a]);
    F.out[(m0 + t) * W.N + r] = finish_row(W, r, hsum_avx2(v), Blocked, factor);
  }
  if (!E5M2 && nan_seen(nan)) mark_nan_rows(W, F, r, 1, m0, T);
}

// Two rows for 2 <= T <= 4 tokens: each 16 codes of a row become 2 vectors, and every x vector
// loaded serves both rows (long rows read x from L2); A accumulators per row and token keep 8 FMA
// chains in flight, within the 16 registers with the 4 weight vectors and one x.
template <bool E5M2, bool Blocked, int T>
LOWBIT_TARGET_AVX2 void pair_avx2(const Fused& F, int64_t r0, int64_t m0) {
  const Fp8Weight& W = *F.W;
  const float factor = E5M2 ? 1.0f : kE4M3Factor;
  constexpr int A = T <= 2 ? 2 : 1;
  __m256 acc[2][T][A];
#pragma GCC unroll 4
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 2
    for (int a = 0; a < A; ++a) acc[0][t][a] = acc[1][t][a] = _mm256_setzero_ps();
  const uint8_t* rows[2] = {W.w + r0 * W.K, W.w + (r0 + 1) * W.K};
  const float* srow[2] = {W.s.row(r0, W.br), W.s.row(r0 + 1, W.br)};
  const float* x0 = F.x + m0 * F.Kp;
  __m256i nan = _mm256_setzero_si256();
  Tail tail[2];
  const int64_t width = Blocked ? W.bc : W.K;
  for (int64_t k0 = 0, b = 0; k0 < W.K; k0 += width, ++b) {
    const int64_t k1 = std::min(W.K, k0 + width);
    const __m256 s[2] = {_mm256_set1_ps(Blocked ? srow[0][b] * factor : 1.0f),
                         _mm256_set1_ps(Blocked ? srow[1][b] * factor : 1.0f)};
    for (int64_t k = k0; k < k1; k += 32) {
      const int64_t n = std::min<int64_t>(32, k1 - k);
      const uint8_t* p[2];
#pragma GCC unroll 2
      for (int i = 0; i < 2; ++i) {
        p[i] = n == 32 ? rows[i] + k : tail[i](rows[i] + k, n);
        __builtin_prefetch(rows[i] + k + 2 * W.K);  // the next pair's
        if (!E5M2) nan = nan_max(nan, p[i]);
      }
#pragma GCC unroll 2
      for (int h = 0; h < 32; h += 16) {
        __m256 w[2][2];
#pragma GCC unroll 2
        for (int i = 0; i < 2; ++i) {
          fp8x16_avx2<E5M2>(p[i] + h, w[i][0], w[i][1]);
          if (Blocked) w[i][0] = _mm256_mul_ps(w[i][0], s[i]), w[i][1] = _mm256_mul_ps(w[i][1], s[i]);
        }
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t)
#pragma GCC unroll 2
          for (int q = 0; q < 2; ++q) {
            const __m256 xv = _mm256_loadu_ps(x0 + t * F.Kp + k + h + 8 * q);
            acc[0][t][q % A] = _mm256_fmadd_ps(w[0][q], xv, acc[0][t][q % A]);
            acc[1][t][q % A] = _mm256_fmadd_ps(w[1][q], xv, acc[1][t][q % A]);
          }
      }
    }
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i)
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) {
      const __m256 v = A == 2 ? _mm256_add_ps(acc[i][t][0], acc[i][t][A - 1]) : acc[i][t][0];
      F.out[(m0 + t) * W.N + r0 + i] = finish_row(W, r0 + i, hsum_avx2(v), Blocked, factor);
    }
  if (!E5M2 && nan_seen(nan)) mark_nan_rows(W, F, r0, 2, m0, T);
}

// Rows [begin, end) for T tokens from m0: one at a time for one token (4 FMA chains per row: 20 GB/s
// of codes at batch 1 on 4096 x 4096 against 16.5 in pairs), pairs of rows for more.
template <bool E5M2, bool Blocked, int T>
LOWBIT_TARGET_AVX2 void rows_avx2(const Fused& F, int64_t begin, int64_t end, int64_t m0) {
  int64_t r = begin;
  if (T > 1)
    for (; r + 2 <= end; r += 2) pair_avx2<E5M2, Blocked, T>(F, r, m0);
  for (; r < end; ++r) row_avx2<E5M2, Blocked, T>(F, r, m0);
}

// Rows [begin, end) for all M tokens, in row blocks whose codes stay in L2 across the token
// groups (of 8, 4, 2 and 1 tokens; AVX2 takes 4 at most).
template <bool Avx512, bool E5M2, bool Blocked>
void fused_rows(const Fused& F, int64_t M, int64_t begin, int64_t end) {
  auto group = [&](auto tokens, int64_t r0, int64_t r1, int64_t m0) {
    constexpr int T = decltype(tokens)::value;
    if (Avx512) rows_avx512<E5M2, Blocked, T>(F, r0, r1, m0);
    else rows_avx2<E5M2, Blocked, T <= 4 ? T : 4>(F, r0, r1, m0);
  };
  for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
    const int64_t r1 = std::min(end, r0 + kRowBlock);
    int64_t m0 = 0;
    if (Avx512)
      for (; m0 + 8 <= M; m0 += 8) group(std::integral_constant<int, 8>{}, r0, r1, m0);
    for (; m0 + 4 <= M; m0 += 4) group(std::integral_constant<int, 4>{}, r0, r1, m0);
    if (m0 + 2 <= M) group(std::integral_constant<int, 2>{}, r0, r1, m0), m0 += 2;
    if (m0 < M) group(std::integral_constant<int, 1>{}, r0, r1, m0);
  }
}

template <bool Avx512>
void fused_vec(const Fused& F, int64_t M, int64_t begin, int64_t end) {
  const bool e5 = F.W->f->e5m2, blocked = !F.W->one_block();
  if (e5 && blocked) fused_rows<Avx512, true, true>(F, M, begin, end);
  else if (e5) fused_rows<Avx512, true, false>(F, M, begin, end);
  else if (blocked) fused_rows<Avx512, false, true>(F, M, begin, end);
  else fused_rows<Avx512, false, false>(F, M, begin, end);
}
#endif

// Row r of T tokens (T <= 2: their accumulators fit baseline x86-64's 16 registers), its E4M3
// codes decoded by arithmetic (decode_e4m3_span) in registers rather than into a row buffer.
template <int T>
LOWBIT_VECTOR_LOOP void e4m3_row_tokens(const Fused& F, int64_t r, int64_t m0) {
  constexpr int L = 16;
  const Fp8Weight& W = *F.W;
  const uint8_t* q = W.w + r * W.K;
  const float* x = F.x + m0 * F.Kp;
  const float* srow = W.s.row(r, W.br);
  float acc[T][L] = {};
  for (int64_t c0 = 0, b = 0; c0 < W.K; c0 += W.bc, ++b) {
    const int64_t c1 = std::min(W.K, c0 + W.bc);
    const float scale_unbiased = srow[b] * kE4M3Unbias;
    int64_t k = c0;
    for (; k + L <= c1; k += L)
      for (int j = 0; j < L; ++j) {
        const float w = e4m3_over_2_120(q[k + j]) * scale_unbiased;
        for (int t = 0; t < T; ++t) acc[t][j] += w * x[t * F.Kp + k + j];
      }
    for (; k < c1; ++k) {
      const float w = e4m3_over_2_120(q[k]) * scale_unbiased;
      for (int t = 0; t < T; ++t) acc[t][0] += w * x[t * F.Kp + k];
    }
  }
  for (int t = 0; t < T; ++t) {
    float sum = 0.0f;
    for (float a : acc[t]) sum += a;
    F.out[(m0 + t) * W.N + r] = sum;
  }
}

// Portable: one or two tokens meet each E4M3 row as it is decoded (where the arithmetic decode is
// exact and the row holds no NaN code); otherwise each row is decoded into fp32, then one dot
// product per token.
void fused_portable(const Fused& F, int64_t M, int64_t begin, int64_t end) {
  const Fp8Weight& W = *F.W;
  std::vector<float> row(W.K);
  const bool in_registers = M <= 2 && e4m3_arithmetic_ok(W);
  for (int64_t r = begin; r < end; ++r) {
    if (in_registers && !has_nan_code(W.w + r * W.K, W.K)) {
      run_for_isa([&] { M == 1 ? e4m3_row_tokens<1>(F, r, 0) : e4m3_row_tokens<2>(F, r, 0); });
      continue;
    }
    decode_rows_portable(W, r, r + 1, row.data());
    run_for_isa([&] {
      for (int64_t m = 0; m < M; ++m) {
        float acc[16] = {0};
        dot_lanes<16>(row.data(), F.x + m * F.Kp, W.K, acc);
        float sum = 0.0f;
        for (float a : acc) sum += a;
        F.out[m * W.N + r] = sum;
      }
    });
  }
}

// Up to this many tokens the fused kernels win (AVX-512, measured on 4096 x 4096, 11008 x 4096 and
// 4096 x 11008, AMD EPYC Zen 4: 0.6-0.95x the time of the tiled GEMM path at 64 tokens, which is
// ATen's GEMM at its own speed beyond). The AVX2 one, against an AVX2 GEMM (scripts/as_cpu.sh
// avx2 on a Xeon): 0.98-1.06x dense at 32 tokens, 1.29-1.52x at 64, where the tiles take
// 0.92-0.99x. The portable one does without FMA, and the GEMM path's GEMM does not.
int64_t fused_tokens(Isa isa) { return isa == Isa::generic ? 8 : isa == Isa::avx2 ? 16 : 64; }

at::Tensor fp8_linear(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& weight_scale, int64_t br,
                      int64_t bc, const c10::optional<at::Tensor>& bias) {
  check_cpu(x_in, "x");
  check_cpu(bias, "bias");
  check_float(x_in, "x");
  TORCH_CHECK_VALUE(x_in.dim() >= 1, "lowbit: x must have at least 1 dimension");
  at::Tensor wc;
  const Fp8Weight W = checked_weight(weight, weight_scale, br, bc, "weight", wc);
  TORCH_CHECK_VALUE(x_in.size(-1) == W.K, "lowbit: x has ", x_in.size(-1), " features in its last dimension but the "
                    "weight [", W.N, ", ", W.K, "] takes ", W.K);
  check_bias(bias, W.N);
  int64_t M = 1;  // tokens: the leading dimensions (reshape cannot infer them when K is 0)
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) M *= x_in.size(d);
  const at::Tensor x2 = x_in.reshape({M, W.K});
  const int64_t N = W.N, K = W.K;
  const Isa isa = active_isa();
  at::Tensor out;
  if (M == 0 || N == 0 || K == 0) {
    out = at::zeros({M, N}, x2.options().dtype(at::kFloat));
  } else if (M <= fused_tokens(isa)) {
    const int64_t Kp = ceil_div(K, 32) * 32;
    at::Tensor xs = at::zeros({M, Kp}, x2.options().dtype(at::kFloat));
    xs.narrow(1, 0, K).copy_(x2);
    out = at::empty({M, N}, xs.options());
    const Fused F{&W, xs.data_ptr<float>(), Kp, out.data_ptr<float>()};
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
#ifdef LOWBIT_X86
      if (isa != Isa::generic && W.vector_ok())
        return isa == Isa::avx512 ? fused_vec<true>(F, M, begin, end) : fused_vec<false>(F, M, begin, end);
#endif
      fused_portable(F, M, begin, end);
    });
  } else {
    const at::Tensor xf = x2.to(at::kFloat).contiguous();
    out = at::empty({M, N}, xf.options());
    tiled_matmul(xf, out, N, [&](int64_t begin, int64_t end, float* dst) { decode_rows(W, begin, end, dst); },
                 bf16_gemm(x_in));
  }
  return finish_linear(out, bias, x_in);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("fp8_scales", &fp8_scales);
  m.impl("fp8_quantize", &fp8_quantize);
  m.impl("fp8_dequantize", &fp8_dequantize);
  m.impl("fp8_fake_quantize", &fp8_fake_quantize);
  m.impl("fp8_linear", &fp8_linear);
}

}  // namespace lowbit
