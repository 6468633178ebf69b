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
#include <cstdint>
#include <cstring>
#include <numeric>
#include <string>
#include <vector>

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

// The 256-entry code of 8-bit blockwise quantization: float [256] on the CPU.
void check_code256(const at::Tensor& code) {
  check_floating(code, "code");
  TORCH_CHECK_VALUE(code.dim() == 1 && code.size(0) == 256, "lowbit: the 8-bit code must have shape [256], got ",
                    code.sizes());
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
  check_cpu(w_in, "weight");
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
  check_cpu(packed_in, "packed");
  check_cpu(absmax_in, "absmax");
  check_blocksize(blocksize);
  const Codebook& c = codebook(quant_type);
  check_dtype(packed_in, at::kByte, "packed codes");
  check_floating(absmax_in, "absmax");
  TORCH_CHECK_VALUE(numel > 0 && packed_in.numel() == ceil_div(numel, 2), "lowbit: ", packed_in.numel(),
                    " packed bytes do not hold ", numel, " elements (need ", numel > 0 ? ceil_div(numel, 2) : 0, ")");
  const int64_t blocks = ceil_div(numel, blocksize);
  TORCH_CHECK_VALUE(absmax_in.dim() == 1 && absmax_in.numel() == blocks, "lowbit: absmax must have shape [", blocks,
                    "] (one entry per block of ", blocksize, "), got ", absmax_in.sizes());
  TORCH_CHECK_TYPE(is_float(dtype), "lowbit: dtype must be float32, float16 or bfloat16, got ", dtype_name(dtype));
  const at::Tensor packed = packed_in.reshape(-1).contiguous();
  const at::Tensor absmax = absmax_in.reshape(-1).to(at::kFloat).contiguous();
  at::Tensor out = at::empty({numel}, packed.options().dtype(dtype));
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* ap = absmax.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowbit_nf4_dequantize", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
      run_for_isa([&] {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t e0 = b * blocksize, e1 = std::min(numel, e0 + blocksize);
          scalar_t table[16];  // the block's 16 values, rounded once
          for (int i = 0; i < 16; ++i) table[i] = static_cast<scalar_t>(c.values[i] * ap[b]);
          int64_t e = e0;
          for (; e + 1 < e1; e += 2) {  // blocksize is even: a block starts on a byte
            const uint8_t byte = pp[e / 2];
            op[e] = table[byte >> 4];
            op[e + 1] = table[byte & 15];
          }
          if (e < e1) op[e] = table[pp[e / 2] >> 4];
        }
      });
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
  check_cpu(x_in, "values");
  check_cpu(code_in, "code");
  check_float(x_in, "values");
  check_code256(code_in);
  TORCH_CHECK_VALUE(blocksize > 0, "lowbit: blocksize must be positive, got ", blocksize);
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
  const int64_t n = x.numel(), blocks = ceil_div(n, blocksize);
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
  check_cpu(q_in, "codes");
  check_cpu(absmax_in, "absmax");
  check_cpu(code_in, "code");
  check_dtype(q_in, at::kByte, "8-bit codes");
  check_floating(absmax_in, "absmax");
  check_code256(code_in);
  TORCH_CHECK_VALUE(blocksize > 0, "lowbit: blocksize must be positive, got ", blocksize);
  const at::Tensor q = q_in.reshape(-1).contiguous();
  const int64_t n = q.numel(), blocks = ceil_div(n, blocksize);
  TORCH_CHECK_VALUE(absmax_in.dim() == 1 && absmax_in.numel() == blocks, "lowbit: nested absmax must have shape [",
                    blocks, "] for ", n, " codes in blocks of ", blocksize, ", got ", absmax_in.sizes());
  const at::Tensor absmax = absmax_in.reshape(-1).to(at::kFloat).contiguous();
  const at::Tensor code = code_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({n}, absmax.options());
  const uint8_t* qp = q.data_ptr<uint8_t>();
  const float *ap = absmax.data_ptr<float>(), *cp = code.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t e = 0; e < n; ++e) op[e] = cp[qp[e]] * ap[e / blocksize];
  return out;
}

// The absmax of block b: stored as fp32, or double-quantized (an 8-bit code into the dynamic
// map times the nested absmax of its 256 blocks, plus the offset), decoded here on the fly so
// the fp32 absmax is never materialised. The file is built with -ffp-contract=off: the multiply
// and the add round separately, as nf4_dequantize's decode does.
struct BlockScales {
  const float* plain = nullptr;
  const uint8_t* codes = nullptr;
  const float* nested = nullptr;
  const float* dyn = nullptr;
  float offset = 0.0f;
  float operator()(int64_t b) const { return plain ? plain[b] : dyn[codes[b]] * nested[b / 256] + offset; }
  // Scales of blocks [first, first + count): a view of the fp32 absmax, or decoded into buf.
  const float* span(int64_t first, int64_t count, float* buf) const {
    if (plain) return plain + first;
    for (int64_t b = 0; b < count; ++b) buf[b] = (*this)(first + b);
    return buf;
  }
};

// Weights of one block (blocksize codes from `bytes`, high nibble first) decoded through a
// 16-entry table code * absmax.
LOWBIT_VECTOR_LOOP void decode_block(const uint8_t* bytes, const float* table, float* out, int64_t blocksize) {
  for (int64_t j = 0; j < blocksize / 2; ++j) {
    out[2 * j] = table[bytes[j] >> 4];
    out[2 * j + 1] = table[bytes[j] & 15];
  }
}

// Row r's weights decoded to fp32 in natural column order.
LOWBIT_VECTOR_LOOP void decode_row_portable(const uint8_t* wp, const Codebook& c, const BlockScales& scales, int64_t r,
                                            int64_t K, int64_t blocksize, float* dst) {
  const int64_t blocks_per_row = K / blocksize;
  float table[16];
  for (int64_t b = 0; b < blocks_per_row; ++b) {
    const float am = scales(r * blocks_per_row + b);
    for (int i = 0; i < 16; ++i) table[i] = c.values[i] * am;
    decode_block(wp + (r * K + b * blocksize) / 2, table, dst + b * blocksize, blocksize);
  }
}

constexpr int64_t kTokenGroup = 8;  // tokens sharing one pass over a group of rows

// ---------------------------------------------------------------- portable fused kernel (SSE2)
// Baseline x86-64 has no byte shuffle to decode codes in registers: each byte's two weights come
// from a table of code pairs (256 x 2 floats, 2 KB, in L1), four columns per vector, and the
// block's absmax multiplies a vector of partial sums once per block.
#ifdef LOWBIT_X86
struct CodePairs {
  alignas(16) float pairs[256][2];
  explicit CodePairs(const float* codes) {
    for (int b = 0; b < 256; ++b) {
      pairs[b][0] = codes[b >> 4];  // the first column is the high nibble
      pairs[b][1] = codes[b & 15];
    }
  }
  __m128 four(const uint8_t* bytes) const {  // columns 2j .. 2j + 3 of bytes j, j + 1
    const __m128 lo = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(pairs[bytes[0]])));
    return _mm_loadh_pi(lo, reinterpret_cast<const __m64*>(pairs[bytes[1]]));
  }
};

// Rows [begin, end) for tokens [m0, m0 + T); K is a multiple of blocksize (itself of 16).
template <int T>
void nf4_rows_sse2(const uint8_t* wp, const BlockScales& scales, const CodePairs& table, const float* xp, float* op,
                   int64_t N, int64_t K, int64_t blocksize, int64_t begin, int64_t end, int64_t m0) {
  const int64_t blocks_per_row = K / blocksize;
  constexpr int A = T == 1 ? 4 : T == 2 ? 2 : 1;  // accumulators per token: independent add chains
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* row = wp + r * K / 2;
    __m128 total[T];
    for (int t = 0; t < T; ++t) total[t] = _mm_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      __m128 acc[T][A];
      for (int t = 0; t < T; ++t)
        for (int j = 0; j < A; ++j) acc[t][j] = _mm_setzero_ps();
      for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 16) {
        __builtin_prefetch(row + k / 2 + kPrefetchBytes);
        for (int i = 0; i < 4; ++i) {
          const __m128 w = table.four(row + k / 2 + 2 * i);
          for (int t = 0; t < T; ++t)
            acc[t][i % A] = _mm_add_ps(acc[t][i % A], _mm_mul_ps(w, _mm_loadu_ps(xp + (m0 + t) * K + k + 4 * i)));
        }
      }
      const __m128 am = _mm_set1_ps(scales(r * blocks_per_row + b));
      for (int t = 0; t < T; ++t) {
        __m128 sum = acc[t][0];
        for (int j = 1; j < A; ++j) sum = _mm_add_ps(sum, acc[t][j]);
        total[t] = _mm_add_ps(total[t], _mm_mul_ps(sum, am));
      }
    }
    for (int t = 0; t < T; ++t) {
      alignas(16) float v[4];
      _mm_store_ps(v, total[t]);
      op[(m0 + t) * N + r] = (v[0] + v[2]) + (v[1] + v[3]);
    }
  }
}

// Row r's weights decoded to fp32 in natural column order, four columns per step.
void decode_row_sse2(const uint8_t* wp, const BlockScales& scales, const CodePairs& table, int64_t r, int64_t K,
                     int64_t blocksize, float* dst) {
  const int64_t blocks_per_row = K / blocksize;
  const uint8_t* row = wp + r * K / 2;
  for (int64_t b = 0; b < blocks_per_row; ++b) {
    const __m128 am = _mm_set1_ps(scales(r * blocks_per_row + b));
    for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 4)
      _mm_storeu_ps(dst + k, _mm_mul_ps(table.four(row + k / 2), am));
  }
}

void nf4_fused_sse2(const uint8_t* wp, const BlockScales& scales, const CodePairs& table, const float* xp, float* op,
                    int64_t M, int64_t N, int64_t K, int64_t blocksize, int64_t begin, int64_t end) {
  constexpr int64_t kRowBlock = 16;  // rows whose codes stay in L1 across the token groups
  for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
    const int64_t r1 = std::min(end, r0 + kRowBlock);
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8) nf4_rows_sse2<8>(wp, scales, table, xp, op, N, K, blocksize, r0, r1, m0);
    if (m0 + 4 <= M) {
      nf4_rows_sse2<4>(wp, scales, table, xp, op, N, K, blocksize, r0, r1, m0);
      m0 += 4;
    }
    if (m0 + 2 <= M) {
      nf4_rows_sse2<2>(wp, scales, table, xp, op, N, K, blocksize, r0, r1, m0);
      m0 += 2;
    }
    if (m0 < M) nf4_rows_sse2<1>(wp, scales, table, xp, op, N, K, blocksize, r0, r1, m0);
  }
}
#endif

// Up to this many tokens every thread multiplies its rows straight from the codes; beyond, rows
// are decoded once into fp32 tiles for ATen's GEMM, which then reuses each weight enough.
int64_t fused_tokens(Isa isa) {
  switch (isa) {
    case Isa::avx512: return 32;
    case Isa::avx2: return 16;
    default: return 8;
  }
}

// x [M, K] as contiguous fp32 [M, Kp], read once whatever its dtype and strides, with each chunk of
// `chunk` columns stored in the order a vector kernel decodes that chunk's codes: position p of
// a chunk holds its column order[p]; Kp rounds K up to whole chunks, the padding 0. chunk 0:
// natural order, no padding.
at::Tensor prepare_x(const at::Tensor& x, int64_t chunk, const uint8_t* order) {
  if (chunk == 0) return x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), Kp = ceil_div(K, chunk) * chunk, sm = x.stride(0), sk = x.stride(1);
  at::Tensor out = at::empty({M, Kp}, x.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowbit_nf4_x", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, std::max<int64_t>(1, (1 << 16) / Kp), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* xrow = xp + m * sm;
        float* orow = op + m * Kp;
        int64_t c0 = 0;
        if (sk == 1)  // whole chunks of a contiguous row: a branch-free gather the compiler unrolls
          for (; c0 + chunk <= K; c0 += chunk)
            for (int64_t p = 0; p < chunk; ++p) orow[c0 + p] = static_cast<float>(xrow[c0 + order[p]]);
        for (; c0 < Kp; c0 += chunk)
          for (int64_t p = 0; p < chunk; ++p) {
            const int64_t col = c0 + order[p];
            orow[c0 + p] = col < K ? static_cast<float>(xrow[col * sk]) : 0.0f;
          }
      }
    });
  });
  return out;
}

// The AVX-512 kernels decode 32 columns (16 bytes) as 16 high nibbles (even columns), then 16
// low nibbles (odd columns).
constexpr std::array<uint8_t, 32> kOrderAvx512 = [] {
  std::array<uint8_t, 32> o{};
  for (int p = 0; p < 32; ++p) o[p] = static_cast<uint8_t>(p < 16 ? 2 * p : 2 * (p - 16) + 1);
  return o;
}();

// The AVX2 kernels decode 64 columns (32 bytes j) as high nibbles (column 2j), then low nibbles
// (2j + 1), each as 4 vectors q of 8 lanes e that the unpacks fill with j = 16 (e / 4) + 4 q + e % 4.
constexpr std::array<uint8_t, 64> kOrderAvx2 = [] {
  std::array<uint8_t, 64> o{};
  for (int p = 0; p < 64; ++p) {
    const int low = p / 32, q = p % 32 / 8, e = p % 8;
    o[p] = static_cast<uint8_t>(2 * (e / 4 * 16 + q * 4 + e % 4) + low);
  }
  return o;
}();

#ifdef LOWBIT_X86

// y[m0 + t, r0 + i] for R rows and T tokens, accumulated in R x T registers: each 16 bytes of
// codes are decoded with two permutes of a 16-entry table (code * absmax of the block), and
// every x vector loaded serves all R rows. R * T <= 16 keeps everything in the 32 registers.
// tile_scales: the R rows' block scales, [R, K / blocksize].
template <int R, int T>
LOWBIT_TARGET_AVX512 void nf4_tile_avx512(const uint8_t* wp, const float* tile_scales, const __m512 code_vec,
                                   const float* xr, float* op, int64_t N, int64_t K, int64_t blocksize, int64_t r0,
                                   int64_t m0) {
  __m512 acc[R][T];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) acc[i][t] = _mm512_setzero_ps();
  const int64_t blocks_per_row = K / blocksize;
  const float* x0 = xr + m0 * K;
  // Byte pointers per row, advanced 16 bytes per 32 columns: no per-load index arithmetic,
  // which would compete with the vector work for the same execution ports.
  const uint8_t* rows[R];
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i) rows[i] = wp + (r0 + i) * (K / 2);
  const int64_t next_tile = R * (K / 2);  // the same bytes of the next R rows, fetched while these run
  for (int64_t b = 0; b < blocks_per_row; ++b) {
    __m512 table[R];
#pragma GCC unroll 16
    for (int i = 0; i < R; ++i)
      table[i] = _mm512_mul_ps(code_vec, _mm512_set1_ps(tile_scales[i * blocks_per_row + b]));
    for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 32) {
      __m512 even[R], odd[R];
#pragma GCC unroll 16
      for (int i = 0; i < R; ++i) {
        __builtin_prefetch(rows[i] + next_tile);
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[i])));
        rows[i] += 16;
        even[i] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table[i]);
        odd[i] = _mm512_permutexvar_ps(v, table[i]);  // vpermps reads the low 4 bits only
      }
#pragma GCC unroll 16
      for (int t = 0; t < T; ++t) {
        const __m512 xe = _mm512_loadu_ps(x0 + t * K + k), xo = _mm512_loadu_ps(x0 + t * K + k + 16);
#pragma GCC unroll 16
        for (int i = 0; i < R; ++i) acc[i][t] = _mm512_fmadd_ps(odd[i], xo, _mm512_fmadd_ps(even[i], xe, acc[i][t]));
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 16
    for (int t = 0; t < T; ++t) op[(m0 + t) * N + r0 + i] = _mm512_reduce_add_ps(acc[i][t]);
}

// Scales of blocks [first, first + count): a view of the fp32 absmax, or decoded into buf 16
// at a time (gathers from the dynamic map and the nested absmax; the same multiply, then add).
LOWBIT_TARGET_AVX512 const float* scale_span_avx512(const BlockScales& s, int64_t first, int64_t count, float* buf) {
  if (s.plain) return s.plain + first;
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t b = 0;
  for (; b + 16 <= count && first + b + 16 <= INT32_MAX; b += 16) {
    const int64_t g = first + b;
    const __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s.codes + g)));
    const __m512i group = _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(g)), lane), 8);
    const __m512 scaled = _mm512_mul_ps(_mm512_i32gather_ps(code, s.dyn, 4), _mm512_i32gather_ps(group, s.nested, 4));
    _mm512_storeu_ps(buf + b, _mm512_add_ps(scaled, _mm512_set1_ps(s.offset)));
  }
  for (; b < count; ++b) buf[b] = s(first + b);
  return buf;
}

// Rows [begin, end) for T tokens from m0: 4 rows per pass for up to 4 tokens, 2 beyond (16
// accumulators either way), the last odd rows one at a time. Double-quantized scales are
// decoded once per row tile, outside the hot loop.
template <int T>
void nf4_rows_avx512(const uint8_t* wp, const BlockScales& scales, const __m512 code_vec, const float* xr, float* op,
                     int64_t N, int64_t K, int64_t blocksize, int64_t begin, int64_t end, int64_t m0) {
  constexpr int R = T <= 4 ? 4 : 2;
  const int64_t bpr = K / blocksize;
  std::vector<float> buf(scales.plain ? 0 : R * bpr);
  int64_t r = begin;
  for (; r + R <= end; r += R)
    nf4_tile_avx512<R, T>(wp, scale_span_avx512(scales, r * bpr, R * bpr, buf.data()), code_vec, xr, op, N, K,
                          blocksize, r, m0);
  for (; r < end; ++r)
    nf4_tile_avx512<1, T>(wp, scale_span_avx512(scales, r * bpr, bpr, buf.data()), code_vec, xr, op, N, K,
                          blocksize, r, m0);
}

LOWBIT_TARGET_AVX512 void nf4_fused_avx512(const uint8_t* wp, const BlockScales& scales, const float* codes,
                                    const float* xr, float* op, int64_t M, int64_t N, int64_t K, int64_t blocksize,
                                    int64_t begin, int64_t end) {
  const __m512 code_vec = _mm512_loadu_ps(codes);
  for (int64_t m0 = 0; m0 < M; m0 += kTokenGroup) {
    switch (std::min(kTokenGroup, M - m0)) {
      case 1: nf4_rows_avx512<1>(wp, scales, code_vec, xr, op, N, K, blocksize, begin, end, m0); break;
      case 2: nf4_rows_avx512<2>(wp, scales, code_vec, xr, op, N, K, blocksize, begin, end, m0); break;
      case 3: nf4_rows_avx512<3>(wp, scales, code_vec, xr, op, N, K, blocksize, begin, end, m0); break;
      case 4: nf4_rows_avx512<4>(wp, scales, code_vec, xr, op, N, K, blocksize, begin, end, m0); break;
      case 5: nf4_rows_avx512<5>(wp, scales, code_vec, xr, op, N, K, blocksize, begin, end, m0); break;
      case 6: nf4_rows_avx512<6>(wp, scales, code_vec, xr, op, N, K, blocksize, begin, end, m0); break;
      case 7: nf4_rows_avx512<7>(wp, scales, code_vec, xr, op, N, K, blocksize, begin, end, m0); break;
      default: nf4_rows_avx512<8>(wp, scales, code_vec, xr, op, N, K, blocksize, begin, end, m0); break;
    }
  }
}

// One row decoded into fp32 in prepare_x's column order (chunks of 32).
LOWBIT_TARGET_AVX512 void decode_row_avx512(const uint8_t* row, const BlockScales& scales, const float* codes, float* dst,
                                     int64_t K, int64_t blocksize, int64_t first_block) {
  const __m512 code_vec = _mm512_loadu_ps(codes);
  for (int64_t b = 0; b < K / blocksize; ++b) {
    const __m512 table = _mm512_mul_ps(code_vec, _mm512_set1_ps(scales(first_block + b)));
    for (int64_t k = b * blocksize; k < (b + 1) * blocksize; k += 32, row += 16) {
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      _mm512_storeu_ps(dst + k, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table));
      _mm512_storeu_ps(dst + k + 16, _mm512_permutexvar_ps(v, table));
    }
  }
}

// AVX2 has no 16-lane permute, and its 8-lane vpermps is slow on AMD: codes are decoded 64 at a
// time (32 bytes) with in-lane byte shuffles instead. Each code's fp32 value is assembled from
// four 16-entry tables, one per byte of the float (vpshufb), and the bytes interleaved into
// floats by unpacks, which leave the columns in kOrderAvx2. Times the block scale, that is the
// value nf4_dequantize computes.
struct BytePlanes {
  __m256i byte[4];
};

LOWBIT_TARGET_AVX2 BytePlanes byte_planes_avx2(const float* codes) {
  alignas(16) uint8_t planes[4][16];
  for (int i = 0; i < 16; ++i) {
    uint32_t u;
    std::memcpy(&u, codes + i, 4);
    for (int k = 0; k < 4; ++k) planes[k][i] = static_cast<uint8_t>(u >> (8 * k));
  }
  BytePlanes t;
  for (int k = 0; k < 4; ++k)
    t.byte[k] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(planes[k])));
  return t;
}

// The 32 weights of 32 nibbles (one per byte of idx) times scale, as 4 vectors in kOrderAvx2.
LOWBIT_TARGET_AVX2 inline void lookup32_avx2(const BytePlanes& t, __m256i idx, __m256 scale, __m256 out[4]) {
  const __m256i b0 = _mm256_shuffle_epi8(t.byte[0], idx), b1 = _mm256_shuffle_epi8(t.byte[1], idx);
  const __m256i b2 = _mm256_shuffle_epi8(t.byte[2], idx), b3 = _mm256_shuffle_epi8(t.byte[3], idx);
  const __m256i lo01 = _mm256_unpacklo_epi8(b0, b1), hi01 = _mm256_unpackhi_epi8(b0, b1);
  const __m256i lo23 = _mm256_unpacklo_epi8(b2, b3), hi23 = _mm256_unpackhi_epi8(b2, b3);
  out[0] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23)), scale);
  out[1] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23)), scale);
  out[2] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23)), scale);
  out[3] = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23)), scale);
}

LOWBIT_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 32 bytes of codes (16 when Half) -> high nibbles, low nibbles.
template <bool Half>
LOWBIT_TARGET_AVX2 inline void nibbles_avx2(const uint8_t* bytes, __m256i& hi, __m256i& lo) {
  const __m256i v = Half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)))
                         : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  const __m256i mask = _mm256_set1_epi8(15);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
  lo = _mm256_and_si256(v, mask);
}

// One 64-column chunk at k: consume(w, k) with the 32 weights of its high nibbles, then
// consume(w, k + 32) with those of its low nibbles (4 vectors each, in kOrderAvx2).
template <bool Half, typename Consume>
LOWBIT_TARGET_AVX2 inline void decode_chunk_avx2(const uint8_t* bytes, const BytePlanes& planes, __m256 scale,
                                                 int64_t k, const Consume& consume) {
  __m256i hi, lo;
  __builtin_prefetch(bytes + kPrefetchBytes);
  nibbles_avx2<Half>(bytes, hi, lo);
  __m256 w[4];
  lookup32_avx2(planes, hi, scale, w);
  consume(w, k);
  lookup32_avx2(planes, lo, scale, w);
  consume(w, k + 32);
}

// Decodes a row (its codes `row`, its block scales `rs`) 64 columns at a time, handing the
// weights to consume (decode_chunk_avx2): the lower lane decodes columns k..k+31, the upper
// k+32..k+63, which lie in two blocks when blocksize is 32. A row of 64 j + 32 columns ends with
// a half chunk whose upper lane is padding (scale 0, against zero x). No divisions in the loop.
template <typename Consume>
LOWBIT_TARGET_AVX2 inline void for_weights_avx2(const uint8_t* row, const float* rs, const BytePlanes& planes,
                                                int64_t K, int64_t blocksize, const Consume& consume) {
  if (blocksize >= 64) {
    for (int64_t k = 0; k < K; k += blocksize, ++rs) {
      const __m256 scale = _mm256_set1_ps(*rs);
      for (int64_t j = k; j < k + blocksize; j += 64) decode_chunk_avx2<false>(row + j / 2, planes, scale, j, consume);
    }
    return;
  }
  int64_t k = 0;
  for (; k + 64 <= K; k += 64, rs += 2)
    decode_chunk_avx2<false>(row + k / 2, planes, _mm256_setr_m128(_mm_set1_ps(rs[0]), _mm_set1_ps(rs[1])), k, consume);
  if (k < K)
    decode_chunk_avx2<true>(row + k / 2, planes, _mm256_setr_m128(_mm_set1_ps(rs[0]), _mm_setzero_ps()), k, consume);
}

// y[m0 + t, r] for T tokens (x prepared with row stride Kp, an FMA memory operand): each decoded
// weight vector serves the T tokens; A accumulators per token keep enough FMA chains in flight.
template <int T>
LOWBIT_TARGET_AVX2 void nf4_row_avx2(const uint8_t* row, const float* rs, const BytePlanes& planes, const float* x0,
                                     float* out, int64_t N, int64_t K, int64_t Kp, int64_t blocksize) {
  constexpr int A = T <= 4 ? 2 : 1;
  __m256 acc[T][A];
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t)
#pragma GCC unroll 2
    for (int a = 0; a < A; ++a) acc[t][a] = _mm256_setzero_ps();
  for_weights_avx2(row, rs, planes, K, blocksize, [&](const __m256* w, int64_t k) LOWBIT_TARGET_AVX2
                                                   __attribute__((always_inline)) {
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q)
        acc[t][q % A] = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(x0 + t * Kp + k + 8 * q), acc[t][q % A]);
  });
#pragma GCC unroll 8
  for (int t = 0; t < T; ++t) out[t * N] = hsum_avx2(A == 2 ? _mm256_add_ps(acc[t][0], acc[t][A - 1]) : acc[t][0]);
}

// Rows [begin, end) for T tokens from m0; double-quantized scales decoded once per row, outside
// the hot loop.
template <int T>
void nf4_rows_avx2(const uint8_t* wp, const BlockScales& scales, const BytePlanes& planes, const float* xr,
                   float* op, int64_t N, int64_t K, int64_t Kp, int64_t blocksize, int64_t begin, int64_t end,
                   int64_t m0) {
  const int64_t bpr = K / blocksize;
  std::vector<float> buf(scales.plain ? 0 : bpr);
  for (int64_t r = begin; r < end; ++r) {
    const float* rs = scales.span(r * bpr, bpr, buf.data());
    nf4_row_avx2<T>(wp + r * (K / 2), rs, planes, xr + m0 * Kp, op + m0 * N + r, N, K, Kp, blocksize);
  }
}

LOWBIT_TARGET_AVX2 void nf4_fused_avx2(const uint8_t* wp, const BlockScales& scales, const float* codes,
                                       const float* xr, float* op, int64_t M, int64_t N, int64_t K, int64_t Kp,
                                       int64_t blocksize, int64_t begin, int64_t end) {
  const BytePlanes planes = byte_planes_avx2(codes);
  for (int64_t m0 = 0; m0 < M; m0 += kTokenGroup) {
    switch (std::min(kTokenGroup, M - m0)) {
      case 1: nf4_rows_avx2<1>(wp, scales, planes, xr, op, N, K, Kp, blocksize, begin, end, m0); break;
      case 2: nf4_rows_avx2<2>(wp, scales, planes, xr, op, N, K, Kp, blocksize, begin, end, m0); break;
      case 3: nf4_rows_avx2<3>(wp, scales, planes, xr, op, N, K, Kp, blocksize, begin, end, m0); break;
      case 4: nf4_rows_avx2<4>(wp, scales, planes, xr, op, N, K, Kp, blocksize, begin, end, m0); break;
      case 5: nf4_rows_avx2<5>(wp, scales, planes, xr, op, N, K, Kp, blocksize, begin, end, m0); break;
      case 6: nf4_rows_avx2<6>(wp, scales, planes, xr, op, N, K, Kp, blocksize, begin, end, m0); break;
      case 7: nf4_rows_avx2<7>(wp, scales, planes, xr, op, N, K, Kp, blocksize, begin, end, m0); break;
      default: nf4_rows_avx2<8>(wp, scales, planes, xr, op, N, K, Kp, blocksize, begin, end, m0); break;
    }
  }
}

// One row decoded into fp32 [Kp] in kOrderAvx2 (the padding 0).
LOWBIT_TARGET_AVX2 void decode_row_avx2(const uint8_t* row, const float* rs, const BytePlanes& planes, float* dst,
                                        int64_t K, int64_t blocksize) {
  for_weights_avx2(row, rs, planes, K, blocksize, [&](const __m256* w, int64_t k) LOWBIT_TARGET_AVX2
                                                   __attribute__((always_inline)) {
    for (int q = 0; q < 4; ++q) _mm256_storeu_ps(dst + k + 8 * q, w[q]);
  });
}
#endif

// y [M, N] = x [M, K] @ W^T (+ bias), W [N, K] stored as 4-bit codes with per-block absmax
// (blocks along K: K % blocksize == 0), fp32 or double-quantized (absmax uint8 with
// nested_absmax, nested_code and offset). Up to fused_tokens(isa) tokens, every thread multiplies
// its rows straight from the codes (the weight is read once per 8 tokens). More tokens: tiles
// of rows are decoded into fp32 and multiplied with ATen's GEMM.
at::Tensor nf4_linear(const at::Tensor& x_in, const at::Tensor& packed_in, const at::Tensor& absmax_in,
                      int64_t blocksize, std::string quant_type, int64_t out_features,
                      const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& nested_absmax_in,
                      const c10::optional<at::Tensor>& nested_code_in, const c10::optional<at::Tensor>& offset) {
  check_cpu(x_in, "x");
  check_cpu(packed_in, "packed");
  check_cpu(absmax_in, "absmax");
  check_cpu(bias, "bias");
  check_cpu(nested_absmax_in, "nested_absmax");
  check_cpu(nested_code_in, "nested_code");
  check_cpu(offset, "offset");
  check_blocksize(blocksize);
  const Codebook& c = codebook(quant_type);
  check_float(x_in, "x");
  TORCH_CHECK_VALUE(x_in.dim() >= 1, "lowbit: x must have at least 1 dimension");
  check_dtype(packed_in, at::kByte, "packed codes");
  TORCH_CHECK_TYPE(absmax_in.scalar_type() == at::kByte || is_float(absmax_in.scalar_type()), "lowbit: absmax must be "
                   "float (or uint8 codes when double-quantized), got ", dtype_name(absmax_in.scalar_type()));
  const int64_t K = x_in.size(-1), N = out_features;
  TORCH_CHECK_VALUE(K > 0 && K % blocksize == 0, "lowbit: in_features ", K, " must be a positive multiple of the "
                    "blocksize ", blocksize, " for the fused 4-bit matmul");
  // N * K computed only once N is known to fit (N <= 2 * bytes / K): no overflow.
  TORCH_CHECK_VALUE(N >= 0 && N <= packed_in.numel() * 2 / K && packed_in.numel() * 2 == N * K, "lowbit: packed "
                    "codes (", packed_in.numel(), " bytes) do not hold a [", N, ", ", K, "] weight");
  check_bias(bias, N);
  const int64_t blocks = N * K / blocksize;
  TORCH_CHECK_VALUE(absmax_in.dim() == 1 && absmax_in.numel() == blocks, "lowbit: absmax must have shape [", blocks,
                    "], got ", absmax_in.sizes());
  const bool nested = absmax_in.scalar_type() == at::kByte;
  const bool any_nested = (nested_absmax_in.has_value() && nested_absmax_in->defined()) ||
                          (nested_code_in.has_value() && nested_code_in->defined()) ||
                          (offset.has_value() && offset->defined());
  TORCH_CHECK_VALUE(nested || !any_nested, "lowbit: nested_absmax, nested_code and offset go with uint8 "
                    "(double-quantized) absmax only; absmax is ", dtype_name(absmax_in.scalar_type()));
  at::Tensor absmax, nested_absmax, nested_code;
  BlockScales scales;
  if (nested) {
    TORCH_CHECK_VALUE(nested_absmax_in.has_value() && nested_absmax_in->defined() && nested_code_in.has_value() &&
                      nested_code_in->defined() && offset.has_value() && offset->defined(),
                      "lowbit: uint8 (double-quantized) absmax needs nested_absmax, nested_code and offset");
    check_floating(*offset, "offset");
    check_floating(*nested_absmax_in, "nested_absmax");
    TORCH_CHECK_VALUE(offset->dim() == 0, "lowbit: offset must be a 0-d tensor, got shape ", offset->sizes());
    TORCH_CHECK_VALUE(nested_absmax_in->dim() == 1 && nested_absmax_in->size(0) == ceil_div(blocks, 256),
                      "lowbit: nested_absmax must have shape [", ceil_div(blocks, 256), "], got ",
                      nested_absmax_in->sizes());
    check_floating(*nested_code_in, "nested_code");
    TORCH_CHECK_VALUE(nested_code_in->dim() == 1 && nested_code_in->size(0) == 256,
                      "lowbit: nested_code must have shape [256], got ", nested_code_in->sizes());
    absmax = absmax_in.reshape(-1).contiguous();
    nested_absmax = nested_absmax_in->reshape(-1).to(at::kFloat).contiguous();
    nested_code = nested_code_in->reshape(-1).to(at::kFloat).contiguous();
    scales.codes = absmax.data_ptr<uint8_t>();
    scales.nested = nested_absmax.data_ptr<float>();
    scales.dyn = nested_code.data_ptr<float>();
    scales.offset = offset->to(at::kFloat).item<float>();
  } else {
    absmax = absmax_in.reshape(-1).to(at::kFloat).contiguous();
    scales.plain = absmax.data_ptr<float>();
  }
  const Isa isa = active_isa();
  const at::Tensor x2 = x_in.reshape({-1, K});
  const int64_t M = x2.size(0), blocks_per_row = K / blocksize;
  const at::Tensor xs = isa == Isa::avx512 ? prepare_x(x2, 32, kOrderAvx512.data())
                        : isa == Isa::avx2 ? prepare_x(x2, 64, kOrderAvx2.data())
                                           : prepare_x(x2, 0, nullptr);
  const int64_t Kp = xs.size(1);
  const float* xp = xs.data_ptr<float>();
  const at::Tensor packed = packed_in.reshape(-1).contiguous();
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  at::Tensor out = at::empty({M, N}, xs.options());
  float* op = out.data_ptr<float>();
#ifdef LOWBIT_X86
  const CodePairs pairs(c.values);
#endif
  if (M <= fused_tokens(isa)) {
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
#ifdef LOWBIT_X86
      if (isa == Isa::avx512) return nf4_fused_avx512(wp, scales, c.values, xp, op, M, N, K, blocksize, begin, end);
      if (isa == Isa::avx2) return nf4_fused_avx2(wp, scales, c.values, xp, op, M, N, K, Kp, blocksize, begin, end);
      return nf4_fused_sse2(wp, scales, pairs, xp, op, M, N, K, blocksize, begin, end);
#endif
      std::vector<float> row(K);
      run_for_isa([&] {
        for (int64_t r = begin; r < end; ++r) {
          decode_row_portable(wp, c, scales, r, K, blocksize, row.data());
          for (int64_t m = 0; m < M; ++m) {
            float acc[16] = {0};
            dot_lanes<16>(row.data(), xp + m * K, K, acc);
            float sum = 0.0f;
            for (float a : acc) sum += a;
            op[m * N + r] = sum;
          }
        }
      });
    });
  } else {
    // Rows decoded to fp32 [Kp] in xs's column order, a tile at a time, for ATen's GEMM.
    tiled_matmul(xs, out, N, [&](int64_t begin, int64_t end, float* dst) {
#ifdef LOWBIT_X86
      if (isa == Isa::avx512) {
        for (int64_t r = begin; r < end; ++r)
          decode_row_avx512(wp + r * K / 2, scales, c.values, dst + (r - begin) * Kp, K, blocksize, r * blocks_per_row);
        return;
      }
      if (isa == Isa::avx2) {
        const BytePlanes planes = byte_planes_avx2(c.values);
        std::vector<float> row_scales(scales.plain ? 0 : blocks_per_row);
        for (int64_t r = begin; r < end; ++r)
          decode_row_avx2(wp + r * K / 2, scales.span(r * blocks_per_row, blocks_per_row, row_scales.data()), planes,
                          dst + (r - begin) * Kp, K, blocksize);
        return;
      }
      for (int64_t r = begin; r < end; ++r) decode_row_sse2(wp, scales, pairs, r, K, blocksize, dst + (r - begin) * Kp);
#else
      for (int64_t r = begin; r < end; ++r) decode_row_portable(wp, c, scales, r, K, blocksize, dst + (r - begin) * Kp);
#endif
    }, bf16_gemm(x_in));
  }
  return finish_linear(out, bias, x_in);
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
