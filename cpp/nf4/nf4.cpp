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

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("blockwise8_quantize", &blockwise8_quantize);
  m.impl("blockwise8_dequantize", &blockwise8_dequantize);
  m.impl("nf4_quantize", &nf4_quantize);
  m.impl("nf4_dequantize", &nf4_dequantize);
}

}  // namespace lowbit
