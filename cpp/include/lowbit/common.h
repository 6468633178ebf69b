// Small helpers shared by every lowbit kernel: input checks, integer ranges, rounding.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <vector>

// Hot loops are compiled for AVX-512, AVX2 and baseline x86-64; the loader picks the best
// clone the CPU supports, so no -march flag is needed and the binary runs anywhere.
#if defined(__x86_64__) && defined(__GNUC__)
#define LOWBIT_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LOWBIT_MULTIVERSION
#endif

namespace lowbit {

// Signed integer grid of compressed-tensors: [-2^(b-1), 2^(b-1) - 1].
struct IntRange {
  int qmin;
  int qmax;
  explicit IntRange(int64_t bits)
      : qmin(-(1 << (bits - 1))), qmax((1 << (bits - 1)) - 1) {}
};

// Argument errors surface in Python as ValueError / TypeError (TORCH_CHECK_VALUE / _TYPE).
inline void check_bits(int64_t bits) {
  TORCH_CHECK_VALUE(bits >= 2 && bits <= 8, "lowbit: bits must be in 2..8, got ", bits);
}

// A linear kernel's fp32 product [M, N], plus bias, in x's dtype and leading dimensions.
inline at::Tensor finish_linear(at::Tensor out, const c10::optional<at::Tensor>& bias, const at::Tensor& x) {
  const int64_t N = out.size(1);
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK_VALUE(bias->numel() == N, "lowbit: bias must have ", N, " entries");
    out.add_(bias->to(at::kFloat).reshape({1, N}));
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  return out.to(x.scalar_type()).reshape(shape);
}

inline void check_float(const at::Tensor& t, const char* name) {
  auto st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16, "lowbit: ", name,
              " must be float32, float16 or bfloat16, got ", st);
}

// A [rows, cols] weight split into groups of `group_size` columns.
inline int64_t check_groups(const at::Tensor& w, int64_t group_size) {
  TORCH_CHECK_VALUE(w.dim() == 2, "lowbit: expected a 2-D [rows, cols] tensor, got ", w.dim(), " dims");
  TORCH_CHECK_VALUE(group_size > 0 && w.size(1) % group_size == 0, "lowbit: group_size ", group_size,
              " must divide the ", w.size(1), " columns");
  return w.size(1) / group_size;
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
