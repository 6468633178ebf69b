// GPTQ (Frantar et al., 2022): Hessian accumulation and the blocked solve.
//
// The solve's column loop never couples rows, so each thread walks its own rows through all
// columns of a 128-column block (quantize, error, rank-1 update of the rest of the block, all
// on one contiguous row segment), then one GEMM applies the block's errors to the columns on
// its right. No per-column Python loop, one parallel region per block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "lowbit/common.h"

namespace lowbit {
namespace {

constexpr int64_t kHessianBlock = 256;

// H <- H * n / (n + b) + 2 / (n + b) * X^T X for the b rows of x, computing the blocks on
// and above the diagonal only (H is symmetric). A given fp32 accumulator is updated in place;
// `mirror` copies the upper triangle onto the lower one, which a stream of batches needs
// only once, at the end.
int64_t gptq_hessian_(at::Tensor& h, const at::Tensor& x_in, int64_t num_samples, bool mirror) {
  check_float(x_in, "inputs");
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.numel() > 0, "lowbit: inputs must be a non-empty [..., columns] tensor");
  TORCH_CHECK_VALUE(num_samples >= 0, "lowbit: num_samples must be >= 0");
  const at::Tensor x = x_in.reshape({-1, x_in.size(-1)}).to(at::kFloat).contiguous();
  const int64_t cols = x.size(1), total = num_samples + x.size(0);
  TORCH_CHECK_VALUE(h.dim() == 2 && h.size(0) == cols && h.size(1) == cols, "lowbit: hessian must be [", cols,
                    ", ", cols, "], got ", h.sizes());
  TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat && h.is_contiguous(),
                   "lowbit: the hessian accumulator must be a contiguous float32 tensor");
  const double keep = static_cast<double>(num_samples) / total, add = 2.0 / total;
  for (int64_t i = 0; i < cols; i += kHessianBlock) {
    const int64_t bi = std::min(kHessianBlock, cols - i);
    at::Tensor strip = h.narrow(0, i, bi).narrow(1, i, cols - i);  // blocks on and right of the diagonal
    strip.addmm_(x.narrow(1, i, bi).t(), x.narrow(1, i, cols - i), keep, add);
  }
  if (mirror) {
    float* p = h.data_ptr<float>();
    at::parallel_for(0, cols, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t c = 0; c < r; ++c) p[r * cols + c] = p[c * cols + r];
    });
  }
  return total;
}

// Upper Cholesky factor of (H + damp I)^-1, doubling the damping until H is positive
// definite; an undefined tensor if even mean(diag H) of damping is not enough.
// With P the reversal permutation and P H P = M M^T (lower Cholesky), H^-1 = U^T U for the
// upper triangular U = P M^-1 P: one Cholesky and one triangular inverse (2n^3/3 flops)
// instead of Cholesky, inverse and a second Cholesky (5n^3/3).
std::tuple<at::Tensor, double> inverse_hessian_upper(const at::Tensor& h, double dampening_frac) {
  const double mean_diag = h.diagonal().mean().item<double>();
  const at::Tensor eye = at::eye(h.size(0), h.options());
  const at::Tensor flipped = h.flip({0, 1});
  for (double frac = dampening_frac;; frac = std::min(1.0, frac * 2)) {
    auto [low, info] = at::linalg_cholesky_ex(flipped + eye * (frac * mean_diag));
    if (info.item<int64_t>() == 0)
      return {at::linalg_solve_triangular(low, eye, /*upper=*/false).flip({0, 1}).contiguous(), frac};
    if (frac >= 1.0) return {at::Tensor(), -1.0};
  }
}

// One row through the columns [i1, i2) of a block: quantize each column with its group's
// parameters, spread the scaled error over the rest of the block, keep it for the GEMM.
LOWBIT_MULTIVERSION double solve_row(float* w, int8_t* codes, float* err, const float* u, int64_t cols, int64_t i1, int64_t i2,
                 const float* scale, const float* zero, const int64_t* col_group, float qmin, float qmax) {
  double loss = 0.0;
  for (int64_t i = i1; i < i2; ++i) {
    const int64_t g = col_group[i];
    const float x = w[i], s = scale[g], z = zero[g];
    const float q = round_even(clampf(x / s + z, qmin, qmax));
    codes[i] = static_cast<int8_t>(q);
    const float diff = x - (q - z) * s, d = u[i * cols + i];
    const float e = diff / d;
    loss += static_cast<double>(diff) * diff / (2.0 * d * d);
    err[i - i1] = e;
    const float* urow = u + i * cols;
    for (int64_t j = i + 1; j < i2; ++j) w[j] -= e * urow[j];
  }
  return loss;
}

// w: [rows, cols] fp32, columns already in processing order; scale / zero: [rows, groups];
// col_group: the group of each (permuted) column. Returns the int8 codes (permuted order),
// the weights as they were when each column was quantized, the loss, and the damping
// fraction used (-1: no damping made H positive definite, so plain RTN was applied).
std::tuple<at::Tensor, at::Tensor, double, double> gptq_solve(
    const at::Tensor& w_in, const at::Tensor& h_in, const at::Tensor& scale_in, const at::Tensor& zero_in,
    const at::Tensor& col_group_in, int64_t bits, int64_t block_size, double dampening_frac) {
  check_bits(bits);
  check_float(w_in, "weight");
  TORCH_CHECK_VALUE(w_in.dim() == 2, "lowbit: weight must be 2-D");
  const int64_t rows = w_in.size(0), cols = w_in.size(1);
  TORCH_CHECK_VALUE(h_in.dim() == 2 && h_in.size(0) == cols && h_in.size(1) == cols, "lowbit: hessian must be [",
                    cols, ", ", cols, "], got ", h_in.sizes());
  TORCH_CHECK_VALUE(block_size > 0, "lowbit: block_size must be positive");
  TORCH_CHECK_VALUE(dampening_frac > 0 && dampening_frac <= 1, "lowbit: dampening_frac must be in (0, 1]");
  TORCH_CHECK_VALUE(col_group_in.numel() == cols, "lowbit: col_group needs one entry per column");
  TORCH_CHECK_VALUE(scale_in.dim() == 2 && scale_in.size(0) == rows && zero_in.sizes() == scale_in.sizes(),
                    "lowbit: scale and zero_point must both be [rows, groups]");
  at::Tensor w = w_in.to(at::kFloat).contiguous().clone();
  const at::Tensor h = h_in.to(at::kFloat).contiguous();
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous(), zero = zero_in.to(at::kFloat).contiguous();
  const at::Tensor col_group = col_group_in.to(at::kLong).contiguous();
  const int64_t groups = scale.size(1);
  TORCH_CHECK_VALUE(col_group.min().item<int64_t>() >= 0 && col_group.max().item<int64_t>() < groups,
                    "lowbit: col_group entries must index the ", groups, " groups");

  auto [upper, damping] = inverse_hessian_upper(h, dampening_frac);
  if (!upper.defined()) upper = at::eye(cols, h.options());  // RTN: no error feedback
  const float* u = upper.data_ptr<float>();
  at::Tensor codes = at::empty({rows, cols}, w.options().dtype(at::kChar));
  at::Tensor err = at::empty({rows, std::min(block_size, cols)}, w.options());
  const IntRange r(bits);
  double loss = 0.0;
  for (int64_t i1 = 0; i1 < cols; i1 += block_size) {
    const int64_t i2 = std::min(cols, i1 + block_size), width = i2 - i1;
    std::vector<double> partial(at::get_num_threads(), 0.0);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      double sum = 0.0;
      for (int64_t row = begin; row < end; ++row)
        sum += solve_row(w.data_ptr<float>() + row * cols, codes.data_ptr<int8_t>() + row * cols,
                         err.data_ptr<float>() + row * err.size(1), u, cols, i1, i2,
                         scale.data_ptr<float>() + row * groups, zero.data_ptr<float>() + row * groups,
                         col_group.data_ptr<int64_t>(), r.qmin, r.qmax);
      partial[at::get_thread_num()] += sum;
    });
    for (double p : partial) loss += p;
    if (i2 < cols) {  // the lazy update: one GEMM carries the block's errors to the right, in place
      at::Tensor right = w.narrow(1, i2, cols - i2);
      right.addmm_(err.narrow(1, 0, width), upper.narrow(0, i1, width).narrow(1, i2, cols - i2), 1.0, -1.0);
    }
  }
  return {codes, w, loss, damping};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("gptq_hessian_", &gptq_hessian_);
  m.impl("gptq_solve", &gptq_solve);
}

}  // namespace lowbit
