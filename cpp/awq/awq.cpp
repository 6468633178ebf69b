// AWQ (Lin et al., 2023): activation statistics, the scale search's loss and the clip search.
//
// Both searches score a weight error D through the Gram matrix G = X^T X of the layer's
// calibration inputs: ||X D^T||^2 = sum((D G) * D). A candidate then costs rows * cols^2
// flops however many tokens were seen, and uses every token instead of a sample.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "lowbit/common.h"
#include "lowbit/intquant.h"

namespace lowbit {
namespace {

constexpr int64_t kStatColumns = 256;  // columns per thread task in the statistics pass
constexpr int64_t kLossRows = 32;      // weight rows per GEMM in the scale loss

// sum_abs[c] += sum over the rows of x of |x[., c]| (float64 accumulators); returns the number
// of rows seen so far.
int64_t awq_channel_stats_(at::Tensor& sum_abs, const at::Tensor& x_in, int64_t count) {
  check_float(x_in, "inputs");
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.numel() > 0, "lowbit: inputs must be a non-empty [..., columns] tensor");
  TORCH_CHECK_VALUE(count >= 0, "lowbit: count must be >= 0");
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)}).to(at::kFloat).contiguous();
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK_TYPE(sum_abs.scalar_type() == at::kDouble && sum_abs.is_contiguous() && sum_abs.dim() == 1 &&
                       sum_abs.size(0) == cols,
                   "lowbit: the statistics accumulator must be a contiguous float64 tensor of ", cols, " entries");
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

// One row of D = W - Q(W * s) / s, group by group (min-max parameters of each scaled group).
template <typename T>
void scaled_quant_error(const T* w, const float* s, float* d, float* buf, int64_t cols, int64_t group_size,
                        const IntRange& r, bool symmetric, at::ScalarType sd) {
  for (int64_t g0 = 0; g0 < cols; g0 += group_size) {
    float lo = INFINITY, hi = -INFINITY;
    for (int64_t c = 0; c < group_size; ++c) {
      const float v = static_cast<float>(w[g0 + c]) * s[g0 + c];
      buf[c] = v;
      lo = std::min(lo, v);
      hi = std::max(hi, v);
    }
    const GroupParams p = params_for_range(lo, hi, r, symmetric, sd);
    for (int64_t c = 0; c < group_size; ++c) {
      const float q = (quantize_one(buf[c], p.scale, p.zero, r.qmin, r.qmax) - p.zero) * p.scale;
      d[g0 + c] = static_cast<float>(w[g0 + c]) - q / s[g0 + c];
    }
  }
}

// The scale search's loss for one grid point: sum((D G) * D) with D = W - Q(W * s) / s, D
// built kLossRows rows at a time (no scaled copy of the weight is ever materialised).
double awq_scale_loss(const at::Tensor& w_in, const at::Tensor& gram_in, const at::Tensor& scales_in, int64_t bits,
                      int64_t group_size, bool symmetric) {
  check_bits(bits);
  check_float(w_in, "weight");
  check_groups(w_in, group_size);
  const int64_t rows = w_in.size(0), cols = w_in.size(1);
  TORCH_CHECK_VALUE(gram_in.dim() == 2 && gram_in.size(0) == cols && gram_in.size(1) == cols, "lowbit: gram must be [",
                    cols, ", ", cols, "], got ", gram_in.sizes());
  TORCH_CHECK_VALUE(scales_in.dim() == 1 && scales_in.size(0) == cols, "lowbit: scales must have ", cols, " entries");
  const at::Tensor w = w_in.contiguous();
  const at::Tensor gram = gram_in.to(at::kFloat).contiguous();
  const at::Tensor scales = scales_in.to(at::kFloat).contiguous();
  const float* s = scales.data_ptr<float>();
  const IntRange r(bits);
  const int64_t blocks = (rows + kLossRows - 1) / kLossRows;
  std::vector<double> partial(blocks, 0.0);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "lowbit_awq_scale_loss", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      at::Tensor d = at::empty({kLossRows, cols}, gram.options());
      std::vector<float> buf(group_size);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r0 = b * kLossRows, n = std::min(kLossRows, rows - r0);
        float* dp = d.data_ptr<float>();
        for (int64_t i = 0; i < n; ++i)
          scaled_quant_error(wp + (r0 + i) * cols, s, dp + i * cols, buf.data(), cols, group_size, r, symmetric,
                             w.scalar_type());
        const at::Tensor di = d.narrow(0, 0, n);
        partial[b] = at::mm(di, gram).mul_(di).sum(at::kDouble).item<double>();
      }
    });
  });
  double loss = 0.0;
  for (double p : partial) loss += p;  // fixed order: the same inputs give the same loss
  return loss;
}

// Clip search: for each (row, group), the clipping bound absmax * (1 - i / n_grid),
// i < max_shrink * n_grid, whose clamped and quantized group has the smallest output error
// d^T G_gg d (G_gg: the group's diagonal block of the Gram matrix). Returns the bounds
// [rows, groups] in float32.
at::Tensor awq_clip(const at::Tensor& w_in, const at::Tensor& gram_in, int64_t bits, int64_t group_size,
                    bool symmetric, int64_t n_grid, double max_shrink) {
  check_bits(bits);
  check_float(w_in, "weight");
  const int64_t groups = check_groups(w_in, group_size);
  const int64_t rows = w_in.size(0), cols = w_in.size(1);
  TORCH_CHECK_VALUE(gram_in.dim() == 2 && gram_in.size(0) == cols && gram_in.size(1) == cols, "lowbit: gram must be [",
                    cols, ", ", cols, "], got ", gram_in.sizes());
  TORCH_CHECK_VALUE(n_grid > 0 && max_shrink >= 0 && max_shrink < 1, "lowbit: clip search needs n_grid > 0 and "
                    "0 <= max_shrink < 1");
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
      for (int64_t row = begin; row < end; ++row) {
        const float* x = wp + row * cols + g0;
        float absmax = 0.0f;
        for (int64_t c = 0; c < group_size; ++c) absmax = std::max(absmax, std::fabs(x[c]));
        for (int64_t i = 0; i < cands; ++i) {
          const float bound = absmax * static_cast<float>(1.0 - static_cast<double>(i) / n_grid);
          float lo = INFINITY, hi = -INFINITY;
          for (int64_t c = 0; c < group_size; ++c) {
            const float v = clampf(x[c], -bound, bound);
            lo = std::min(lo, v);
            hi = std::max(hi, v);
          }
          const GroupParams p = params_for_range(lo, hi, r, symmetric, sd);
          float* out = dp + (row * cands + i) * group_size;
          for (int64_t c = 0; c < group_size; ++c) {
            const float v = clampf(x[c], -bound, bound);
            out[c] = x[c] - (quantize_one(v, p.scale, p.zero, r.qmin, r.qmax) - p.zero) * p.scale;
          }
        }
      }
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
  m.impl("awq_scale_loss", &awq_scale_loss);
  m.impl("awq_clip", &awq_clip);
}

}  // namespace lowbit
