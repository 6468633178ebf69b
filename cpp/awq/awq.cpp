// AWQ (Lin et al., 2023): activation statistics, the scale search's loss and the clip search.
//
// Both searches score a weight error D through the Gram matrix G = X^T X of the layer's
// calibration inputs: ||X D^T||^2 = sum((D G) * D) = ||D L||^2 with G = L L^T. A candidate then
// costs about rows * cols^2 flops however many tokens were seen, and uses every token instead
// of a sample.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "lowbit/common.h"
#include "lowbit/intquant.h"

namespace lowbit {
namespace {

constexpr int64_t kStatColumns = 256;  // columns per thread task in the statistics pass
constexpr int64_t kLossRows = 1024;     // weight rows per block of D in the scale loss
constexpr int64_t kFactorCols = 128;    // columns of the Gram factor per GEMM
constexpr int64_t kMaxClipGrid = 10000;  // the clip search holds rows x candidates x group_size errors

// sum_abs[c] += sum over the rows of x of |x[., c]| (float64 accumulators); returns the number
// of rows seen so far.
int64_t awq_channel_stats_(at::Tensor& sum_abs, const at::Tensor& x_in, int64_t count) {
  check_cpu(sum_abs, "sum_abs");
  check_cpu(x_in, "inputs");
  check_float(x_in, "inputs");
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.numel() > 0, "lowbit: inputs must be a non-empty [..., columns] tensor");
  const int64_t cols = x_in.size(-1), rows = x_in.numel() / cols;
  TORCH_CHECK_VALUE(count >= 0 && count <= std::numeric_limits<int64_t>::max() - rows,
                    "lowbit: count must be >= 0 (and the total must fit in int64), got ", count);
  TORCH_CHECK_TYPE(sum_abs.scalar_type() == at::kDouble, "lowbit: the statistics accumulator sum_abs must be a "
                   "contiguous float64 tensor, got ", dtype_name(sum_abs.scalar_type()));
  TORCH_CHECK_VALUE(sum_abs.dim() == 1 && sum_abs.size(0) == cols, "lowbit: the statistics accumulator sum_abs must "
                    "have shape [", cols, "], got ", sum_abs.sizes());
  check_contiguous(sum_abs, "sum_abs");
  TORCH_CHECK_VALUE(!sum_abs.is_alias_of(x_in), "lowbit: inputs must not share memory with sum_abs");
  const at::Tensor x = x_in.reshape({-1, cols}).to(at::kFloat).contiguous();
  const float* xp = x.data_ptr<float>();
  double* acc = sum_abs.data_ptr<double>();
  at::parallel_for(0, (cols + kStatColumns - 1) / kStatColumns, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t c0 = blk * kStatColumns, c1 = std::min(cols, c0 + kStatColumns);
      std::vector<double> local(c1 - c0, 0.0);
      for (int64_t r = 0; r < rows; ++r) {
        const float* row = xp + r * cols;
        for (int64_t c = c0; c < c1; ++c) local[c - c0] += std::fabs(row[c]);
      }
      for (int64_t c = c0; c < c1; ++c) acc[c] += local[c - c0];
    }
  });
  return count + rows;
}

// The span helpers below are plain loops that run_for_isa() compiles for each ISA;
// `v < lo ? v : lo` is the form that maps onto vminps.

// out = w * s over one group; [lo, hi] its range.
template <typename T>
LOWBIT_VECTOR_LOOP void scaled_minmax(const T* w, const float* s, float* out, int64_t n, float* lo, float* hi) {
  float mn = INFINITY, mx = -INFINITY;
  for (int64_t c = 0; c < n; ++c) {
    const float v = static_cast<float>(w[c]) * s[c];
    out[c] = v;
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  *lo = mn;
  *hi = mx;
}

// d = w - (Q(scaled) - zero) * scale / s over one group.
template <typename T>
LOWBIT_VECTOR_LOOP void unscaled_error(const T* w, const float* scaled, const float* s, float* d, int64_t n,
                                        float scale, float zero, float qmin, float qmax) {
  for (int64_t c = 0; c < n; ++c)
    d[c] = static_cast<float>(w[c]) - (quantize_one(scaled[c], scale, zero, qmin, qmax) - zero) * scale / s[c];
}

// One row of D = W - Q(W * s) / s, group by group (min-max parameters of each scaled group).
template <typename T>
void scaled_quant_error(const T* w, const float* s, float* d, float* buf, int64_t cols, int64_t group_size,
                        const IntRange& r, bool symmetric, at::ScalarType sd) {
  for (int64_t g0 = 0; g0 < cols; g0 += group_size) {
    float lo, hi;
    scaled_minmax(w + g0, s + g0, buf, group_size, &lo, &hi);
    const GroupParams p = params_for_range(lo, hi, r, symmetric, sd);
    unscaled_error(w + g0, buf, s + g0, d + g0, group_size, p.scale, p.zero, r.qmin, r.qmax);
  }
}

// The range of x clamped to [-bound, bound].
LOWBIT_VECTOR_LOOP void clamped_minmax(const float* x, float bound, int64_t n, float* lo, float* hi) {
  float mn = INFINITY, mx = -INFINITY;
  for (int64_t c = 0; c < n; ++c) {
    const float v = clampf(x[c], -bound, bound);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  *lo = mn;
  *hi = mx;
}

// out = x - dequantized(Q(clamp(x, -bound, bound))).
LOWBIT_VECTOR_LOOP void clamped_error(const float* x, float bound, float* out, int64_t n, float scale, float zero,
                                       float qmin, float qmax) {
  for (int64_t c = 0; c < n; ++c)
    out[c] = x[c] - (quantize_one(clampf(x[c], -bound, bound), scale, zero, qmin, qmax) - zero) * scale;
}

// Lower Cholesky factor L of the Gram matrix (G = L L^T), so a loss d^T G d is ||d L||^2 with a
// triangular product: half the flops of d G. A singular G (fewer tokens than columns, dead
// channels) gets a jitter of 1e-7, 1e-6, ... of its mean diagonal; NaN or Inf give a NaN factor
// (every loss is then NaN and the search keeps identity scales).
at::Tensor awq_gram_factor(const at::Tensor& gram_in) {
  check_cpu(gram_in, "gram");
  check_floating(gram_in, "gram");
  TORCH_CHECK_VALUE(gram_in.dim() == 2 && gram_in.size(0) == gram_in.size(1) && gram_in.size(0) > 0,
                    "lowbit: gram must be a square [cols, cols] matrix, got ", gram_in.sizes());
  const at::Tensor gram = gram_in.to(at::kFloat);
  const int64_t n = gram.size(0);
  if (!at::isfinite(gram).all().item<bool>()) return at::full({n, n}, NAN, gram.options());
  const double mean_diag = std::max(gram.diagonal().mean().item<double>(), 1e-30);
  for (double jitter = 0.0; jitter <= 1.0; jitter = jitter == 0.0 ? 1e-7 : jitter * 10) {
    auto [factor, info] = at::linalg_cholesky_ex(
        jitter == 0.0 ? gram : gram + at::eye(n, gram.options()) * (jitter * mean_diag));
    if (info.item<int>() == 0) return factor.contiguous();
  }
  return at::full({n, n}, NAN, gram.options());
}

// The scale search's loss for one grid point: ||D L||^2 = sum((D G) * D) with
// D = W - Q(W * s) / s, built kLossRows rows at a time (no scaled copy of the weight is ever
// materialised) and multiplied by L one column block at a time (the block's rows above its
// first column are zero).
double awq_scale_loss(const at::Tensor& w_in, const at::Tensor& factor_in, const at::Tensor& scales_in, int64_t bits,
                      int64_t group_size, bool symmetric) {
  check_bits(bits);
  check_cpu(w_in, "weight");
  check_cpu(factor_in, "gram_factor");
  check_cpu(scales_in, "scales");
  check_float(w_in, "weight");
  check_floating(factor_in, "gram_factor");
  check_floating(scales_in, "scales");
  check_groups(w_in, group_size);
  const int64_t rows = w_in.size(0), cols = w_in.size(1);
  TORCH_CHECK_VALUE(factor_in.dim() == 2 && factor_in.size(0) == cols && factor_in.size(1) == cols,
                    "lowbit: the Gram factor must be [", cols, ", ", cols, "], got ", factor_in.sizes());
  TORCH_CHECK_VALUE(scales_in.dim() == 1 && scales_in.size(0) == cols, "lowbit: scales must have shape [", cols,
                    "], got ", scales_in.sizes());
  const at::Tensor w = w_in.contiguous();
  const at::Tensor factor = factor_in.to(at::kFloat).contiguous();
  const at::Tensor scales = scales_in.to(at::kFloat).contiguous();
  const float* s = scales.data_ptr<float>();
  const IntRange r(bits);
  // D is built in parallel one kLossRows block at a time; each block then meets L in a few
  // large, multithreaded GEMMs (small per-thread GEMMs would waste the triangle's savings).
  at::Tensor d = at::empty({std::min(kLossRows, rows), cols}, factor.options());
  double loss = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "lowbit_awq_scale_loss", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    float* dp = d.data_ptr<float>();
    for (int64_t r0 = 0; r0 < rows; r0 += kLossRows) {
      const int64_t n = std::min(kLossRows, rows - r0);
      at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
        std::vector<float> buf(group_size);
        run_for_isa([&] {
          for (int64_t i = begin; i < end; ++i)
            scaled_quant_error(wp + (r0 + i) * cols, s, dp + i * cols, buf.data(), cols, group_size, r, symmetric,
                               w.scalar_type());
        });
      });
      for (int64_t j0 = 0; j0 < cols; j0 += kFactorCols) {
        const int64_t width = std::min(kFactorCols, cols - j0);
        const at::Tensor out = at::mm(d.narrow(0, 0, n).narrow(1, j0, cols - j0),
                                      factor.narrow(0, j0, cols - j0).narrow(1, j0, width));
        const float* op = out.data_ptr<float>();
        for (int64_t i = 0; i < n * width; ++i) loss += static_cast<double>(op[i]) * op[i];
      }
    }
  });
  return loss;
}

// Clip search: for each (row, group), the clipping bound absmax * (1 - i / n_grid),
// i < max_shrink * n_grid, whose clamped and quantized group has the smallest output error
// d^T G_gg d (G_gg: the group's diagonal block of the Gram matrix). Returns the bounds
// [rows, groups] in float32.
at::Tensor awq_clip(const at::Tensor& w_in, const at::Tensor& gram_in, int64_t bits, int64_t group_size,
                    bool symmetric, int64_t n_grid, double max_shrink) {
  check_bits(bits);
  check_cpu(w_in, "weight");
  check_cpu(gram_in, "gram");
  check_float(w_in, "weight");
  check_floating(gram_in, "gram");
  const int64_t groups = check_groups(w_in, group_size);
  const int64_t rows = w_in.size(0), cols = w_in.size(1);
  TORCH_CHECK_VALUE(gram_in.dim() == 2 && gram_in.size(0) == cols && gram_in.size(1) == cols, "lowbit: gram must be [",
                    cols, ", ", cols, "], got ", gram_in.sizes());
  TORCH_CHECK_VALUE(n_grid > 0 && n_grid <= kMaxClipGrid && max_shrink >= 0 && max_shrink < 1,
                    "lowbit: clip search needs 0 < n_grid <= ", kMaxClipGrid, " and 0 <= max_shrink < 1, got n_grid ",
                    n_grid, ", max_shrink ", max_shrink);
  const int64_t cands = std::max<int64_t>(1, static_cast<int64_t>(max_shrink * n_grid));
  const at::ScalarType sd = w_in.scalar_type();
  const at::Tensor w = w_in.to(at::kFloat).contiguous();
  const at::Tensor gram = gram_in.to(at::kFloat).contiguous();
  const float* wp = w.data_ptr<float>();
  const IntRange r(bits);
  at::Tensor best = at::empty({rows, groups}, w.options());
  float* bp = best.data_ptr<float>();
  at::Tensor d = at::empty({rows, cands, group_size}, w.options());
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t g0 = g * group_size;
    float* dp = d.data_ptr<float>();
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      run_for_isa([&] {
        for (int64_t row = begin; row < end; ++row) {
          const float* x = wp + row * cols + g0;
          float absmax = 0.0f;
          for (int64_t c = 0; c < group_size; ++c) absmax = std::max(absmax, std::fabs(x[c]));
          for (int64_t i = 0; i < cands; ++i) {
            const float bound = absmax * static_cast<float>(1.0 - static_cast<double>(i) / n_grid);
            float lo, hi;
            clamped_minmax(x, bound, group_size, &lo, &hi);
            const GroupParams p = params_for_range(lo, hi, r, symmetric, sd);
            clamped_error(x, bound, dp + (row * cands + i) * group_size, group_size, p.scale, p.zero, r.qmin, r.qmax);
          }
        }
      });
    });
    const at::Tensor block = gram.narrow(0, g0, group_size).narrow(1, g0, group_size);
    const at::Tensor flat = d.view({rows * cands, group_size});
    const at::Tensor err = at::mm(flat, block).mul_(flat).sum(1).view({rows, cands}).contiguous();
    const float* ep = err.data_ptr<float>();
    at::parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        int64_t pick = 0;  // strictly smaller wins: ties keep the wider bound
        for (int64_t i = 1; i < cands; ++i)
          if (ep[row * cands + i] < ep[row * cands + pick]) pick = i;
        float absmax = 0.0f;
        for (int64_t c = 0; c < group_size; ++c) absmax = std::max(absmax, std::fabs(wp[row * cols + g0 + c]));
        bp[row * groups + g] = absmax * static_cast<float>(1.0 - static_cast<double>(pick) / n_grid);
      }
    });
  }
  return best;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("awq_channel_stats_", &awq_channel_stats_);
  m.impl("awq_gram_factor", &awq_gram_factor);
  m.impl("awq_scale_loss", &awq_scale_loss);
  m.impl("awq_clip", &awq_clip);
}

}  // namespace lowbit
