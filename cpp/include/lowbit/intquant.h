// Per-group integer quantization parameters, shared by the kernels that fake-quantize inside
// their loops (quantize.cpp, awq.cpp).
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

}  // namespace lowbit
