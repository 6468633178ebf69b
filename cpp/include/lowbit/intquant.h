// Per-group integer quantization parameters and codes, shared by the kernels that quantize
// inside their loops (quantize.cpp, awq.cpp, int8.cpp's W8A8 linear).
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "lowbit/common.h"

namespace lowbit {

struct GroupParams {
  float scale;
  float zero;  // integer valued
};

inline float dtype_eps(at::ScalarType st) {
  switch (st) {
    case at::kHalf: return 0.0009765625f;    // torch.finfo(float16).eps
    case at::kBFloat16: return 0.0078125f;   // torch.finfo(bfloat16).eps
    default: return std::numeric_limits<float>::epsilon();
  }
}

// Scale and zero point that cover [lo, hi] (widened to include 0), as compressed-tensors
// computes them; the scale is rounded to its storage dtype and never zero.
inline GroupParams params_for_range(float lo, float hi, const IntRange& r, bool symmetric,
                                    at::ScalarType scale_dtype) {
  lo = std::min(lo, 0.0f);
  hi = std::max(hi, 0.0f);
  float scale = symmetric ? std::max(-lo, hi) / ((r.qmax - r.qmin) / 2.0f)
                          : (hi - lo) / static_cast<float>(r.qmax - r.qmin);
  scale = round_through(scale, scale_dtype);
  if (scale == 0.0f) scale = dtype_eps(scale_dtype);
  float zero = symmetric ? 0.0f : round_even(clampf(r.qmin - lo / scale, r.qmin, r.qmax));
  return {scale, zero};
}

inline float quantize_one(float x, float scale, float zero, float qmin, float qmax) {
  return round_even(clampf(x / scale + zero, qmin, qmax));
}

// Copies a group to fp32 and finds its range; returns false if it holds NaN or Inf
// (v * 0 is NaN exactly for those, and NaN survives the sum).
template <typename T>
LOWBIT_VECTOR_LOOP bool to_float_minmax(const T* x, int64_t n, float* out, float* lo, float* hi) {
  float mn = std::numeric_limits<float>::infinity(), mx = -mn, poison = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float v = static_cast<float>(x[i]);
    out[i] = v;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
    poison += v * 0.0f;
  }
  *lo = mn;
  *hi = mx;
  return poison == 0.0f;
}

template <typename T>
LOWBIT_VECTOR_LOOP void quantize_span(const T* x, int8_t* out, int64_t n, float scale, float zero,
                                       float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i)
    out[i] = static_cast<int8_t>(quantize_one(static_cast<float>(x[i]), scale, zero, qmin, qmax));
}

}  // namespace lowbit
