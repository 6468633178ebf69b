// NF4 / FP4 blockwise 4-bit quantization (QLoRA), bit for bit as bitsandbytes produces it:
// the tensor is flattened, each block of `blocksize` elements is scaled by its absmax (full
// blocks multiply by the reciprocal, a final partial block divides, as bitsandbytes does),
// clamped to [-1, 1], and mapped to the nearest code by counting the midpoints of the sorted
// codes below it (a value on a midpoint takes the lower code, as torch.bucketize does). Two
// codes per byte, the first in the high nibble; an odd count is padded with the code of 0.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "lowbit/avx512.h"
#include "lowbit/common.h"

namespace lowbit {
namespace {

constexpr float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                            -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                            0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                            0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                            0.7229568362236023f, 1.0f};
// FP4 (sign, 2 exponent bits, 1 mantissa bit): codes 0..7 are {0, 0.0625, 8, 12, 4, 6, 2, 3} / 12,
// codes 8..15 the same negated (bitsandbytes stores code 8 as +0).
constexpr float kFP4[16] = {0.0f, 0.0625f / 12, 8.0f / 12, 1.0f, 4.0f / 12, 6.0f / 12, 2.0f / 12, 3.0f / 12,
                            0.0f, -0.0625f / 12, -8.0f / 12, -1.0f, -4.0f / 12, -6.0f / 12, -2.0f / 12, -3.0f / 12};

struct Codebook {
  const float* values;
  std::array<float, 15> midpoints;  // of the codes in ascending order, computed in fp32
  std::array<uint8_t, 16> order;    // sorted position -> code (a stable sort, as bitsandbytes')
};

const Codebook& codebook(const std::string& quant_type) {
  auto build = [](const float* values) {
    Codebook c{values, {}, {}};
    std::array<int, 16> idx;
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return values[a] < values[b]; });
    for (int i = 0; i < 16; ++i) c.order[i] = static_cast<uint8_t>(idx[i]);
    for (int i = 0; i < 15; ++i) c.midpoints[i] = (values[idx[i]] + values[idx[i + 1]]) / 2.0f;
    return c;
  };
  static const Codebook nf4 = build(kNF4), fp4 = build(kFP4);
  TORCH_CHECK_VALUE(quant_type == "nf4" || quant_type == "fp4", "lowbit: quant_type must be 'nf4' or 'fp4', got '",
                    quant_type, "'");
  return quant_type == "nf4" ? nf4 : fp4;
}

void check_blocksize(int64_t blocksize) {
  TORCH_CHECK_VALUE(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
                    "lowbit: blocksize must be a power of two from 32 to 4096, got ", blocksize);
}

inline uint8_t nearest_code(float v, const Codebook& c) {
  int below = 0;  // midpoints strictly below v: torch.bucketize(v, midpoints)
  for (int i = 0; i < 15; ++i) below += v > c.midpoints[i];
  return c.order[below];
}

// -> (packed uint8 [(n + 1) / 2, 1], absmax float32 [ceil(n / blocksize)])
std::tuple<at::Tensor, at::Tensor> nf4_quantize(const at::Tensor& w_in, int64_t blocksize, std::string quant_type) {
  check_float(w_in, "weight");
  check_blocksize(blocksize);
  const Codebook& c = codebook(quant_type);
  TORCH_CHECK_VALUE(w_in.numel() > 0, "lowbit: cannot quantize an empty tensor");
  const at::Tensor w = w_in.reshape(-1).to(at::kFloat).contiguous();
  const int64_t n = w.numel(), blocks = (n + blocksize - 1) / blocksize;
  at::Tensor packed = at::zeros({(n + 1) / 2, 1}, w.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, w.options());
  const float* wp = w.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  const uint8_t pad = nearest_code(0.0f, c);
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t e0 = b * blocksize, e1 = std::min(n, e0 + blocksize);
      float am = 0.0f;
      for (int64_t e = e0; e < e1; ++e) am = std::max(am, std::fabs(wp[e]));
      const float clamped = std::max(am, 1e-38f);
      const bool partial = e1 - e0 < blocksize;
      ap[b] = partial ? clamped : am;  // bitsandbytes stores the partial block's absmax clamped
      const float inv = 1.0f / clamped;
      for (int64_t e = e0; e < e1; e += 2) {  // blocks start at even elements: bytes never straddle
        const float v0 = partial ? wp[e] / clamped : wp[e] * inv;
        const uint8_t hi = nearest_code(clampf(v0, -1.0f, 1.0f), c);
        uint8_t lo = pad;
        if (e + 1 < e1) lo = nearest_code(clampf(partial ? wp[e + 1] / clamped : wp[e + 1] * inv, -1.0f, 1.0f), c);
        pp[e / 2] = static_cast<uint8_t>(hi << 4 | lo);
      }
    }
  });
  return {packed, absmax};
}

// code[nibble] * absmax[block] in fp32, cast to `dtype` -> a flat tensor of `numel` elements.
at::Tensor nf4_dequantize(const at::Tensor& packed_in, const at::Tensor& absmax_in, int64_t blocksize,
                          std::string quant_type, int64_t numel, at::ScalarType dtype) {
  check_blocksize(blocksize);
  const Codebook& c = codebook(quant_type);
  TORCH_CHECK_TYPE(packed_in.scalar_type() == at::kByte, "lowbit: packed codes must be uint8, got ",
                   packed_in.scalar_type());
  TORCH_CHECK_VALUE(numel > 0 && packed_in.numel() == (numel + 1) / 2, "lowbit: ", packed_in.numel(),
                    " packed bytes do not hold ", numel, " elements (need ", (numel + 1) / 2, ")");
  const int64_t blocks = (numel + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(absmax_in.numel() == blocks, "lowbit: absmax has ", absmax_in.numel(), " entries, expected ",
                    blocks, " (one per block of ", blocksize, ")");
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "lowbit: dtype must be float32, float16 or bfloat16");
  const at::Tensor packed = packed_in.reshape(-1).contiguous();
  const at::Tensor absmax = absmax_in.reshape(-1).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowbit_nf4_dequantize", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t e0 = b * blocksize, e1 = std::min(numel, e0 + blocksize);
        for (int64_t e = e0; e < e1; ++e) {
          const uint8_t byte = pp[e / 2];
          op[e] = static_cast<scalar_t>(c.values[(e & 1) ? byte & 15 : byte >> 4] * ap[b]);
        }
      }
    });
  });
  return out;
}

// 8-bit blockwise quantization against a sorted 256-entry code (double quantization of the
// absmax values), as bitsandbytes' CPU library does it: v = clamp(x * (1 / absmax), -1, 1) is
// mapped to one of 65536 equal bins, round((v + 1) / 2 * 65535) with a single rounding, and
// each bin holds the code whose midpoints lie below the bin's left edge. This is not always
// the nearest code (a value within half a bin of a midpoint may take the neighbour), but it
// is bit for bit what bitsandbytes stores. An all-zero block stores code 0 and absmax 0.
std::tuple<at::Tensor, at::Tensor> blockwise8_quantize(const at::Tensor& x_in, const at::Tensor& code_in,
                                                       int64_t blocksize) {
  check_float(x_in, "values");
  TORCH_CHECK_VALUE(code_in.numel() == 256, "lowbit: the 8-bit code must have 256 entries");
  TORCH_CHECK_VALUE(blocksize > 0, "lowbit: blocksize must be positive");
  const at::Tensor x = x_in.reshape(-1).to(at::kFloat).contiguous();
  const at::Tensor code = code_in.to(at::kFloat).contiguous();
  const float* cp = code.data_ptr<float>();
  std::array<float, 255> mid;
  for (int j = 0; j < 255; ++j) mid[j] = (cp[j] + cp[j + 1]) * 0.5f;
  std::vector<uint8_t> lut(65536);
  for (int i = 0, j = 0; i < 65536; ++i) {
    const float edge = static_cast<float>(i + i) / 65535.0f - 1.0f;
    while (j < 255 && mid[j] < edge) ++j;
    lut[i] = static_cast<uint8_t>(j);
  }
  const int64_t n = x.numel(), blocks = (n + blocksize - 1) / blocksize;
  at::Tensor out = at::zeros({n}, x.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* op = out.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t e0 = b * blocksize, e1 = std::min(n, e0 + blocksize);
      float am = 0.0f;
      for (int64_t e = e0; e < e1; ++e) am = std::max(am, std::fabs(xp[e]));
      ap[b] = am;
      if (am == 0.0f) continue;
      const float inv = 1.0f / am;
      for (int64_t e = e0; e < e1; ++e) {
        const float t = (clampf(xp[e] * inv, -1.0f, 1.0f) + 1.0f) * 0.5f;
        op[e] = lut[static_cast<uint16_t>(static_cast<int32_t>(std::fma(t, 65535.0f, 0.5f)))];
      }
    }
  });
  return {out, absmax};
}

// code[q] * absmax[block] in fp32.
at::Tensor blockwise8_dequantize(const at::Tensor& q_in, const at::Tensor& absmax_in, const at::Tensor& code_in,
                                 int64_t blocksize) {
  TORCH_CHECK_TYPE(q_in.scalar_type() == at::kByte, "lowbit: 8-bit codes must be uint8, got ", q_in.scalar_type());
  TORCH_CHECK_VALUE(code_in.numel() == 256, "lowbit: the 8-bit code must have 256 entries");
  TORCH_CHECK_VALUE(blocksize > 0, "lowbit: blocksize must be positive");
  const at::Tensor q = q_in.reshape(-1).contiguous();
  const int64_t n = q.numel(), blocks = (n + blocksize - 1) / blocksize;
  TORCH_CHECK_VALUE(absmax_in.numel() == blocks, "lowbit: nested absmax has ", absmax_in.numel(),
                    " entries, expected ", blocks, " for ", n, " codes in blocks of ", blocksize);
  const at::Tensor absmax = absmax_in.reshape(-1).to(at::kFloat).contiguous();
  const at::Tensor code = code_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({n}, absmax.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *ap = absmax.data_ptr<float>(), *cp = code.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t e = 0; e < n; ++e) op[e] = cp[qp[e]] * ap[e / blocksize];
  return out;
}

// Weights of one block (blocksize codes from `bytes`, high nibble first) decoded through a
// 16-entry table code * absmax.
LOWBIT_MULTIVERSION void decode_block(const uint8_t* bytes, const float* table, float* out, int64_t blocksize) {
  for (int64_t j = 0; j < blocksize / 2; ++j) {
    out[2 * j] = table[bytes[j] >> 4];
    out[2 * j + 1] = table[bytes[j] & 15];
  }
}

// acc[0..16) += w[k] * x[k] over n (a multiple of 16) elements: 16 independent lanes, which the
// compiler keeps in one vector register (no reordered float reduction needed).
LOWBIT_MULTIVERSION void dot16(const float* w, const float* x, int64_t n, float* acc) {
  for (int64_t k = 0; k < n; k += 16)
    for (int j = 0; j < 16; ++j) acc[j] += w[k + j] * x[k + j];
}

constexpr int64_t kGemvTokens = 8;  // up to this many tokens decode each block once for all

#ifdef LOWBIT_HAVE_AVX512_KERNEL
// x [M, K] reordered per 32-column chunk into [16 even columns, 16 odd columns]: byte j of a
// chunk holds columns 2j (high nibble) and 2j + 1 (low nibble), so the two decoded halves of
// 16 bytes meet contiguous x.
at::Tensor deinterleave_chunks(const at::Tensor& x) {
  const int64_t M = x.size(0), K = x.size(1);
  return x.view({M, K / 32, 16, 2}).transpose(2, 3).contiguous().view({M, K});
}

// Rows [begin, end) of y for up to kGemvTokens tokens: each 16-byte group of codes is decoded
// with two permutes of a 16-entry table (code * absmax of its block) and used for every token.
LOWBIT_AVX512 void nf4_gemv_avx512(const uint8_t* wp, const float* ap, const float* codes, const float* xr,
                                   float* op, int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t begin,
                                   int64_t end) {
  const __m512 code_vec = _mm512_loadu_ps(codes);
  const int64_t blocks_per_row = K / blocksize;
  for (int64_t r = begin; r < end; ++r) {
    __m512 acc[kGemvTokens];
    for (int64_t m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* row = wp + r * K / 2;
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const __m512 table = _mm512_mul_ps(code_vec, _mm512_set1_ps(ap[r * blocks_per_row + b]));
      for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 32) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k / 2)));
        const __m512 even = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
        const __m512 odd = _mm512_permutexvar_ps(v, table);  // vpermps reads the low 4 bits only
        for (int64_t m = 0; m < M; ++m) {
          acc[m] = _mm512_fmadd_ps(even, _mm512_loadu_ps(xr + m * K + k), acc[m]);
          acc[m] = _mm512_fmadd_ps(odd, _mm512_loadu_ps(xr + m * K + k + 16), acc[m]);
        }
      }
    }
    for (int64_t m = 0; m < M; ++m) op[m * N + r] = _mm512_reduce_add_ps(acc[m]);
  }
}
#endif

// y [M, N] = x [M, K] @ W^T (+ bias), W [N, K] stored as 4-bit codes with per-block absmax
// (blocks along K: K % blocksize == 0). Few tokens: every thread decodes its rows block by
// block into L1 and multiplies all tokens with them (the weight is read once). More tokens:
// tiles of rows are decoded into fp32 and multiplied with ATen's GEMM.
at::Tensor nf4_linear(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& absmax_in,
                      int64_t blocksize, std::string quant_type, int64_t out_features,
                      const c10::optional<at::Tensor>& bias) {
  check_blocksize(blocksize);
  const Codebook& c = codebook(quant_type);
  check_float(x_in, "x");
  const int64_t K = x_in.size(-1), N = out_features;
  TORCH_CHECK_VALUE(K % blocksize == 0, "lowbit: in_features ", K, " must be a multiple of the blocksize ", blocksize,
                    " for the fused 4-bit matmul");
  TORCH_CHECK_VALUE(packed_in.scalar_type() == at::kByte && packed_in.numel() * 2 == N * K, "lowbit: packed codes (",
                    packed_in.numel(), " bytes) do not hold a [", N, ", ", K, "] weight");
  TORCH_CHECK_VALUE(absmax_in.numel() == N * K / blocksize, "lowbit: absmax has ", absmax_in.numel(),
                    " entries, expected ", N * K / blocksize);
  const at::Tensor x = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor packed = packed_in.reshape(-1).contiguous();
  const at::Tensor absmax = absmax_in.reshape(-1).to(at::kFloat).contiguous();
  const int64_t M = x.size(0), blocks_per_row = K / blocksize;
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  auto decode_row = [&](int64_t r, float* dst) {
    float table[16];
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const float am = ap[r * blocks_per_row + b];
      for (int i = 0; i < 16; ++i) table[i] = c.values[i] * am;
      decode_block(wp + (r * K + b * blocksize) / 2, table, dst + b * blocksize, blocksize);
    }
  };
  at::Tensor out = at::empty({M, N}, x.options());
#ifdef LOWBIT_HAVE_AVX512_KERNEL
  static const bool have_avx512 = __builtin_cpu_supports("avx512f");
  if (M <= kGemvTokens && have_avx512) {
    const at::Tensor xr = deinterleave_chunks(x);
    const float* xrp = xr.data_ptr<float>();
    float* op = out.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      nf4_gemv_avx512(wp, ap, c.values, xrp, op, M, N, K, blocksize, begin, end);
    });
  } else
#endif
  if (M <= kGemvTokens) {
    float* op = out.data_ptr<float>();
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(K);
      for (int64_t r = begin; r < end; ++r) {
        decode_row(r, row.data());
        for (int64_t m = 0; m < M; ++m) {
          float acc[16] = {0};
          dot16(row.data(), xp + m * K, K, acc);
          float sum = 0.0f;
          for (float a : acc) sum += a;
          op[m * N + r] = sum;
        }
      }
    });
  } else {
    const int64_t tile = std::max<int64_t>(16, (1 << 20) / K);
    at::Tensor buf = at::empty({std::min(tile, N), K}, x.options());
    float* bp = buf.data_ptr<float>();
    for (int64_t r0 = 0; r0 < N; r0 += tile) {
      const int64_t r1 = std::min(N, r0 + tile);
      at::parallel_for(r0, r1, 16, [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r) decode_row(r, bp + (r - r0) * K);
      });
      out.narrow(1, r0, r1 - r0).copy_(at::mm(x, buf.narrow(0, 0, r1 - r0).t()));
    }
  }
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->numel() == N, "lowbit: bias must have ", N, " entries");
    out.add_(bias->to(at::kFloat).reshape({1, N}));
  }
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = N;
  return out.to(x_in.scalar_type()).reshape(shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("nf4_linear", &nf4_linear);
  m.impl("blockwise8_quantize", &blockwise8_quantize);
  m.impl("blockwise8_dequantize", &blockwise8_dequantize);
  m.impl("nf4_quantize", &nf4_quantize);
  m.impl("nf4_dequantize", &nf4_dequantize);
}

}  // namespace lowbit
