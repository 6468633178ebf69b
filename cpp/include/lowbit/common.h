// Small helpers shared by every lowbit kernel: input checks, integer ranges, rounding.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "lowbit/isa.h"

namespace lowbit {

// Signed integer grid of compressed-tensors: [-2^(b-1), 2^(b-1) - 1].
struct IntRange {
  int qmin;
  int qmax;
  explicit IntRange(int64_t bits)
      : qmin(-(1 << (bits - 1))), qmax((1 << (bits - 1)) - 1) {}
};

// ---------------------------------------------------------------- argument checks
// Every op checks each argument before it touches memory: a direct torch.ops.lowbit call must
// raise, never crash or read out of bounds, whatever it is given. Argument errors surface in
// Python as ValueError / TypeError (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE).

inline void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, "lowbit: bits must be in 2..8, got ", bits);
}

// A defined, dense (strided) CPU tensor: the CPU kernels read raw pointers.
inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "lowbit: ", name, " is undefined");
  TORCH_CHECK_VALUE(t.device().is_cpu(), "lowbit: ", name, " is on ", t.device(),
                    ", but this kernel runs on the CPU: all tensors must be on the same device (cpu)");
  TORCH_CHECK_VALUE(t.layout() == at::kStrided, "lowbit: ", name, " must be a dense (strided) tensor, got ",
                    t.layout());
}
inline void check_cpu(const c10::optional<at::Tensor>& t, const char* name) {
  if (t.has_value() && t->defined()) check_cpu(*t, name);
}

// Python's name of a dtype, for messages ("torch.int8" rather than ATen's "Char").
inline std::string dtype_name(at::ScalarType st) {
  switch (st) {
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kHalf: return "torch.float16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(st);
  }
}

inline void check_dtype(const at::Tensor& t, at::ScalarType st, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == st, "lowbit: ", name, " must be ", dtype_name(st), ", got ",
                   dtype_name(t.scalar_type()));
}

inline bool is_float(at::ScalarType st) { return st == at::kFloat || st == at::kHalf || st == at::kBFloat16; }

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), "lowbit: ", name, " must be float32, float16 or bfloat16, got ",
                   dtype_name(t.scalar_type()));
}

// float32 / float16 / bfloat16, or float64 where the kernel converts to fp32 first.
inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(is_float(t.scalar_type()) || t.scalar_type() == at::kDouble, "lowbit: ", name,
                   " must be a floating-point tensor, got ",
                   dtype_name(t.scalar_type()));
}

// An integer tensor (zero points: any width, converted to fp32 by the kernels).
inline void check_integral(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), "lowbit: ", name,
                   " must be an integer tensor, got ",
                   dtype_name(t.scalar_type()));
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == dim, "lowbit: ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef shape, const char* name) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "lowbit: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// In-place accumulators are written through their pointer: no copies allowed.
inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "lowbit: ", name, " must be contiguous (it is updated in place)");
}

inline void check_finite_nonneg(double v, const char* name) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0.0, "lowbit: ", name, " must be a finite number >= 0, got ", v);
}

// How far ahead of its reads a streaming kernel prefetches a row's codes (one row after another, a
// few bytes per weight): the hardware prefetchers alone left the fused AVX2 kernels at half their
// in-cache speed with the weights in memory (measured with 512 to 4096 bytes on a Xeon: 2048 and
// 4096 reach the in-cache speed, 512 does not).
constexpr int64_t kPrefetchBytes = 2048;

// This thread's tile buffer of at least n elements of `dtype` (fp32 or bf16), kept between calls:
// a fresh multi-megabyte allocation is fresh pages, and their faults cost a small layer more than
// its GEMM.
inline at::Tensor tile_buffer(int64_t n, at::ScalarType dtype = at::kFloat) {
  thread_local at::Tensor buffers[2];
  at::Tensor& buf = buffers[dtype == at::kFloat ? 0 : 1];
  if (!buf.defined() || buf.numel() < n) buf = at::empty({n}, at::TensorOptions().dtype(dtype));
  return buf.narrow(0, 0, n);
}

// True when a many-token product with x runs in bf16: x is bf16 and the active ISA has bf16
// arithmetic (AVX512-BF16, AMX), where ATen's bf16 GEMM is about 5x its fp32 one (512 x 4096 x
// 4096, 2-core Xeon with AMX: 11 ms against 63). The decoded weight tile is rounded to bf16 too:
// the product a bf16 model computes with its dequantized weight (transformers on a decompressed
// checkpoint, llmcompressor's fake quantization), the output rounded to bf16 once.
inline bool bf16_gemm(const at::Tensor& x) { return x.scalar_type() == at::kBFloat16 && use_bf16_gemm(); }

// out [M, N] = x [M, K] @ W^T for a weight held in a compressed form (the many-token path of the
// linear kernels). Every thread decodes tiles of its own rows with decode(begin, end, dst) -- rows
// [begin, end) as fp32 into dst, row `begin` first, in x's column order -- into its own buffer and
// multiplies each with ATen's GEMM, which runs single-threaded inside the parallel region: one fork
// for the whole product, no barrier per tile (a thread slowed by another process holds up no
// other), and each tile meets the GEMM while it is still in cache. x is packed once per tile, hence
// tiles of at least 256 rows and 8 MB (FP8 at 512 tokens on 4096 x 11008: 0.99x dense with 64 rows,
// 0.83x with 256; 16 MB tiles from 128 tokens measured no better on a Xeon, 4096 x 11008 worse).
// x is fp32; with in_bf16 (bf16_gemm of the caller's input) x and each tile are multiplied in bf16.
template <typename Decode>
void tiled_matmul(const at::Tensor& x, const at::Tensor& out, int64_t N, const Decode& decode, bool in_bf16 = false) {
  const int64_t K = x.size(1), tile = std::max<int64_t>(256, (2 << 20) / std::max<int64_t>(K, 1));
  const at::Tensor xg = in_bf16 ? x.to(at::kBFloat16) : x;  // exact: x came from bf16
  const at::ThreadLocalState caller;  // inference mode and the rest of the caller's state, for the workers
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard guard(caller);
    const at::AutoDispatchBelowADInplaceOrView below;  // a kernel's own GEMM: no autograd (x may require grad)
    const int64_t rows = std::min(tile, end - begin);
    const at::Tensor buf = tile_buffer(rows * K);
    const at::Tensor buf16 = in_bf16 ? tile_buffer(rows * K, at::kBFloat16) : at::Tensor();
    for (int64_t r0 = begin; r0 < end; r0 += tile) {
      const int64_t r1 = std::min(end, r0 + tile);
      decode(r0, r1, buf.data_ptr<float>());
      const at::Tensor w = buf.narrow(0, 0, (r1 - r0) * K).view({r1 - r0, K});
      at::Tensor o = out.narrow(1, r0, r1 - r0);
      if (in_bf16) {
        const at::Tensor w16 = buf16.narrow(0, 0, (r1 - r0) * K).view({r1 - r0, K});
        w16.copy_(w);
        o.copy_(at::mm(xg, w16.t()));
      } else {
        at::mm_out(o, xg, w.t());
      }
    }
  });
}

// ceil(n / d) for n >= 0, d > 0, without the overflow of (n + d - 1) / d.
inline int64_t ceil_div(int64_t n, int64_t d) { return n == 0 ? 0 : (n - 1) / d + 1; }

// Bias of a linear layer with N outputs: a float [N] tensor on the CPU, or absent.
inline void check_bias(const c10::optional<at::Tensor>& bias, int64_t N) {
  if (!bias.has_value() || !bias->defined()) return;
  check_cpu(*bias, "bias");
  check_floating(*bias, "bias");
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "lowbit: bias must have shape [", N, "], got ",
                    bias->sizes());
}

// A linear kernel's fp32 product [M, N], plus bias, in x's dtype and leading dimensions.
inline at::Tensor finish_linear(at::Tensor out, const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  const int64_t N = out.size(1);
  if (bias.has_value() && bias->defined()) {
    check_bias(bias, N);
    out.add_(bias->to(at::kFloat).reshape({1, N}));
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.to(x.scalar_type()).reshape(shape);
}

// A [rows, cols] weight split into groups of `group_size` columns.
inline int64_t check_groups(const at::Tensor& w, int64_t group_size) {
  TORCH_CHECK_VALUE(w.dim() == 2, "lowbit: expected a 2-D [rows, cols] tensor, got shape ", w.sizes());
  TORCH_CHECK_VALUE(group_size > 0 && w.size(1) % group_size == 0, "lowbit: group_size ", group_size,
              " must divide the ", w.size(1), " columns");
  return w.size(1) / group_size;
}

// acc[0..L) += w[k] * x[k] over n elements: L independent lanes the compiler keeps in vector
// registers (a float reduction it may not reorder would stay scalar); a tail of n % L elements
// goes to lane 0.
template <int L>
LOWBIT_VECTOR_LOOP void dot_lanes(const float* w, const float* x, int64_t n, float* acc) {
  int64_t k = 0;
  for (; k + L <= n; k += L)
    for (int j = 0; j < L; ++j) acc[j] += w[k + j] * x[k + j];
  for (; k < n; ++k) acc[0] += w[k] * x[k];
}

// Round half to even, the rounding of torch.round (the default FP environment).
inline float round_even(float x) { return std::nearbyint(x); }

inline float clampf(float x, float lo, float hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Round a float through a storage dtype, so a kernel computes with the scale it will save.
inline float round_through(float x, at::ScalarType st) {
  switch (st) {
    case at::kHalf: return static_cast<float>(static_cast<at::Half>(x));
    case at::kBFloat16: return static_cast<float>(static_cast<at::BFloat16>(x));
    default: return x;
  }
}

}  // namespace lowbit
