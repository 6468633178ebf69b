// SmoothQuant's activation statistic: the running minimum and maximum of each input channel over
// the calibration tokens (llmcompressor's SmoothQuantModifier keeps them per channel and smooths
// with max(|min|, |max|)).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <mutex>
#include <vector>

#include "lowbit/common.h"

namespace lowbit {
namespace {

// lo / hi of each of C channels over n rows of x (row stride ld), element-wise across the
// channels so it vectorises; poison[c] turns NaN where x held NaN or Inf (v * 0).
template <typename T>
LOWBIT_VECTOR_LOOP void range_rows(const T* x, int64_t n, int64_t C, int64_t ld, float* lo, float* hi,
                                   float* poison) {
  for (int64_t t = 0; t < n; ++t) {
    const T* row = x + t * ld;
    for (int64_t c = 0; c < C; ++c) {
      const float v = static_cast<float>(row[c]);
      lo[c] = v < lo[c] ? v : lo[c];
      hi[c] = v > hi[c] ? v : hi[c];
      poison[c] += v * 0.0f;
    }
  }
}

// mins / maxs (float32 [C], contiguous) updated in place with x [..., C]; unchanged if x holds
// NaN or Inf (ValueError).
void channel_range_(at::Tensor& mins, at::Tensor& maxs, const at::Tensor& x_in) {
  check_cpu(mins, "mins");
  check_cpu(maxs, "maxs");
  check_cpu(x_in, "x");
  check_float(x_in, "x");
  TORCH_CHECK_VALUE(x_in.dim() >= 1, "lowbit: x must be a [..., channels] tensor, got a 0-d tensor");
  const int64_t C = x_in.size(-1);
  auto check_accumulator = [&](const at::Tensor& t, const char* name) {
    check_dtype(t, at::kFloat, name);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, "lowbit: ", name, " must have shape [", C,
                      "] (one entry per channel of x), got ", t.sizes());
    check_contiguous(t, name);
  };
  check_accumulator(mins, "mins");
  check_accumulator(maxs, "maxs");
  TORCH_CHECK_VALUE(!mins.is_alias_of(maxs) && !mins.is_alias_of(x_in) && !maxs.is_alias_of(x_in),
                    "lowbit: mins, maxs and x must not share memory");
  if (x_in.numel() == 0) return;
  at::Tensor x = x_in.reshape({-1, C});
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t rows = x.size(0), ld = x.stride(0);
  std::vector<float> lo(C, INFINITY), hi(C, -INFINITY);
  bool finite = true;
  std::mutex mu;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lowbit_channel_range", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    // Chunks of tokens, each with its own ranges, merged once per chunk.
    at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 16) / C), [&](int64_t begin, int64_t end) {
      std::vector<float> l(C, INFINITY), h(C, -INFINITY), poison(C, 0.0f);
      run_for_isa([&] { range_rows(xp + begin * ld, end - begin, C, ld, l.data(), h.data(), poison.data()); });
      std::lock_guard<std::mutex> guard(mu);
      for (int64_t c = 0; c < C; ++c) {
        lo[c] = std::min(lo[c], l[c]);
        hi[c] = std::max(hi[c], h[c]);
        finite &= poison[c] == 0.0f;
      }
    });
  });
  TORCH_CHECK_VALUE(finite, "lowbit: x contains non-finite activations (NaN or Inf); check the calibration data and "
                    "the layers before");
  float *mp = mins.data_ptr<float>(), *xp = maxs.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    mp[c] = lo[c] < mp[c] ? lo[c] : mp[c];
    xp[c] = hi[c] > xp[c] ? hi[c] : xp[c];
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("channel_range_", &channel_range_); }

}  // namespace lowbit
