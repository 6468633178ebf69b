// GPTQ (Frantar et al., 2022): Hessian accumulation and the blocked solve.
//
// The solve's column loop never couples rows, so each thread walks its own rows through all
// columns of a 128-column block (quantize, residual, rank-1 update of the rest of the block, all
// on one contiguous row segment), then one GEMM applies the block's residuals to the columns on
// its right. No per-column Python loop, one parallel region per block.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "lowbit/common.h"
#include "lowbit/fp8.h"

namespace lowbit {
namespace {

constexpr int64_t kHessianLeaf = 256;
constexpr int64_t kMirrorTile = 64;

// The upper triangle of h[i:i+m, i:i+m] <- keep * h + add * x[:, i:i+m]^T x[:, i:i+m]: split in
// halves so that most of the work is one large off-diagonal GEMM per level (half the flops
// of x^T x at GEMM speed); leaves on the diagonal are computed whole.
void hessian_upper(at::Tensor& h, const at::Tensor& x, int64_t i, int64_t m, double keep, double add) {
  if (m <= kHessianLeaf) {
    h.narrow(0, i, m).narrow(1, i, m).addmm_(x.narrow(1, i, m).t(), x.narrow(1, i, m), keep, add);
    return;
  }
  const int64_t half = m / 2;
  h.narrow(0, i, half).narrow(1, i + half, m - half).addmm_(x.narrow(1, i, half).t(),
                                                              x.narrow(1, i + half, m - half), keep, add);
  hessian_upper(h, x, i, half, keep, add);
  hessian_upper(h, x, i + half, m - half, keep, add);
}

// Copies the upper triangle of a square fp32 matrix onto the lower one, in place, tile by
// tile so that the column-wise reads stay in cache.
// A square, contiguous fp32 accumulator on the CPU (written in place through its pointer).
void check_hessian_accumulator(const at::Tensor& h) {
  check_cpu(h, "hessian");
  TORCH_CHECK_TYPE(h.scalar_type() == at::kFloat, "lowbit: the hessian must be a square contiguous float32 tensor, "
                   "got ", dtype_name(h.scalar_type()));
  TORCH_CHECK_VALUE(h.dim() == 2 && h.size(0) == h.size(1), "lowbit: the hessian must be a square contiguous float32 "
                    "tensor, got shape ", h.sizes());
  check_contiguous(h, "hessian");
}

at::Tensor& hessian_mirror_(at::Tensor& h) {
  check_hessian_accumulator(h);
  float* p = h.data_ptr<float>();
  const int64_t cols = h.size(0), tiles = (cols + kMirrorTile - 1) / kMirrorTile;
  const auto mirror_tile_row = [&](int64_t tr) {
    for (int64_t tc = 0; tc <= tr; ++tc)
      for (int64_t r = tr * kMirrorTile; r < std::min(cols, (tr + 1) * kMirrorTile); ++r)
        for (int64_t c = tc * kMirrorTile; c < std::min(r, (tc + 1) * kMirrorTile); ++c)
          p[r * cols + c] = p[c * cols + r];
  };
  // Tile row k has k + 1 tiles: pairing k with tiles - 1 - k balances the threads.
  at::parallel_for(0, (tiles + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      mirror_tile_row(k);
      if (tiles - 1 - k != k) mirror_tile_row(tiles - 1 - k);
    }
  });
  return h;
}

// H <- H * n / (n + b) + 2 / (n + b) * X^T X for the b rows of x, computing the blocks on
// and above the diagonal only (H is symmetric). A given fp32 accumulator is updated in place;
// `mirror` copies the upper triangle onto the lower one, which a stream of batches needs
// only once, at the end.
int64_t gptq_hessian_(at::Tensor& h, const at::Tensor& x_in, int64_t num_samples, bool mirror) {
  check_cpu(x_in, "inputs");
  check_float(x_in, "inputs");
  TORCH_CHECK_VALUE(x_in.dim() >= 1 && x_in.numel() > 0, "lowbit: inputs must be a non-empty [..., columns] tensor");
  check_hessian_accumulator(h);
  const int64_t cols = x_in.size(-1), rows = x_in.numel() / cols;
  TORCH_CHECK_VALUE(h.size(0) == cols, "lowbit: hessian must be [", cols, ", ", cols, "], got ", h.sizes());
  TORCH_CHECK_VALUE(num_samples >= 0 && num_samples <= std::numeric_limits<int64_t>::max() - rows,
                    "lowbit: num_samples must be >= 0 (and the total must fit in int64), got ", num_samples);
  TORCH_CHECK_VALUE(!h.is_alias_of(x_in), "lowbit: inputs must not share memory with the hessian");
  const at::Tensor x = x_in.reshape({-1, cols}).to(at::kFloat).contiguous();
  const int64_t total = num_samples + rows;
  hessian_upper(h, x, 0, cols, static_cast<double>(num_samples) / total, 2.0 / total);
  if (mirror) hessian_mirror_(h);
  return total;
}

// LAPACK's Cholesky factorisation, from the LAPACK that torch itself links (and declares so).
extern "C" void spotrf_(char* uplo, int* n, float* a, int* lda, int* info);

// The solve runs on the factor R of H = R R^T (R upper triangular: the Cholesky factor of H
// with rows and columns in reverse order), for H in processing order `perm`, with dead inputs
// (zero diagonal) set to 1 and the damping doubled until H is positive definite. Returns R
// with each column j divided by R[j, j], plus diag(R); undefined tensors if even mean(diag H)
// of damping is not enough.
//
// Why R and not the textbook's upper Cholesky factor U of H^-1 (U = R^-1): GPTQ's result is
// W_q = W + sum_{k<j} (w_k - q_k) R[k, j] / R[j, j] column by column, with w_k the ORIGINAL
// column and q_k its dequantized codes (from W - Q = E U, E = (W - Q) R). So one Cholesky
// (n^3 / 3 flops) replaces the textbook's Cholesky, inverse and second Cholesky (4 n^3 / 3).
// Permutation, reversal and damping are one gather into the factorisation's buffer.
std::tuple<at::Tensor, at::Tensor, double> hessian_factor(const at::Tensor& h, const at::Tensor& perm,
                                                          double dampening_frac) {
  const int64_t n = h.size(0);
  TORCH_CHECK_VALUE(n < (int64_t{1} << 31) / n, "lowbit: the hessian is too large for LAPACK");
  const float* hp = h.data_ptr<float>();
  const int64_t* order = perm.data_ptr<int64_t>();
  std::vector<int64_t> rev(n);  // rev[i]: the column at reversed processing position i
  std::vector<float> diag(n);
  double mean_diag = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    rev[i] = order[n - 1 - i];
    const float d = hp[i * n + i];
    diag[i] = d == 0.0f ? 1.0f : d;
    mean_diag += diag[i];
  }
  mean_diag /= static_cast<double>(n);
  at::Tensor a = at::empty({n, n}, h.options());
  float* ap = a.data_ptr<float>();
  double frac = dampening_frac;
  for (;; frac = std::min(1.0, frac * 2)) {
    const float damp = static_cast<float>(frac * mean_diag);
    std::atomic<bool> finite{true};
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {  // the lower triangle is all LAPACK reads
      float sum = 0.0f;  // NaN or Inf anywhere make it non-finite
      for (int64_t i = begin; i < end; ++i) {
        const float* src = hp + rev[i] * n;
        float* dst = ap + i * n;
        for (int64_t j = 0; j < i; ++j) sum += 0.0f * (dst[j] = src[rev[j]]);
        dst[i] = diag[rev[i]] + damp;
        sum += 0.0f * dst[i];
      }
      if (!std::isfinite(sum)) finite = false;
    });
    TORCH_CHECK_VALUE(finite, "lowbit: hessian contains NaN or Inf values; check the calibration activations");
    char uplo = 'U';  // column-major upper = row-major lower: A = L L^T, L in the lower triangle
    int dim = static_cast<int>(n), info = 0;
    spotrf_(&uplo, &dim, ap, &dim, &info);
    if (info == 0) break;
    if (frac >= 1.0) return {at::Tensor(), at::Tensor(), -1.0};
  }
  // R[i][j] = L[n-1-i][n-1-j]: the row-major buffer reversed, in place (a second n x n matrix
  // would be the solve's largest allocation: 0.77 GiB for an 8B model's down_proj, 3 GiB at 70B).
  // Then the lower triangle (LAPACK left it unset) zeroed and column j divided by R[j][j].
  const int64_t elements = n * n;
  at::parallel_for(0, elements / 2, 1 << 16, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) std::swap(ap[k], ap[elements - 1 - k]);
  });
  at::Tensor rdiag = at::empty({n}, h.options());
  float* rd = rdiag.data_ptr<float>();
  for (int64_t j = 0; j < n; ++j) rd[j] = ap[j * n + j];
  at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* row = ap + i * n;
      for (int64_t j = 0; j < i; ++j) row[j] = 0.0f;
      for (int64_t j = i; j < n; ++j) row[j] /= rd[j];
    }
  });
  return {a, rdiag, frac};
}

// One row through the columns [i1, i2) of a block: quantize each column with its group's
// parameters, carry its residual (original weight minus dequantized code) to the rest of the
// block, keep the residual for the GEMM. FP8: the E4M3 grid (q = E4M3 value of x / s clamped
// to +-448, the code its byte, no zero point), else the integer grid [qmin, qmax].
template <bool FP8>
LOWBIT_VECTOR_LOOP double solve_row(float* w, const float* w_orig, int8_t* codes, float* res, const float* rn,
                                    const float* rdiag, int64_t cols, int64_t i1, int64_t i2, const float* scale,
                                    const float* zero, const int64_t* col_group, float qmin, float qmax) {
  double loss = 0.0;
  for (int64_t i = i1; i < i2; ++i) {
    const int64_t g = col_group[i];
    const float x = w[i], s = scale[g], z = FP8 ? 0.0f : zero[g];
    float q;
    if constexpr (FP8) {
      q = fp8_round<3, 7>(clampf(x / s, -kE4M3.max, kE4M3.max));
      codes[i] = static_cast<int8_t>(fp8_encode<3, 7>(q));
    } else {
      q = round_even(clampf(x / s + z, qmin, qmax));
      codes[i] = static_cast<int8_t>(q);
    }
    const float deq = (q - z) * s, diff = x - deq, r = w_orig[i] - deq;
    loss += 0.5 * static_cast<double>(diff) * diff * rdiag[i] * rdiag[i];  // diff^2 / (2 U_ii^2)
    res[i - i1] = r;
    const float* rn_row = rn + i * cols;
    for (int64_t j = i + 1; j < i2; ++j) w[j] += r * rn_row[j];
  }
  return loss;
}

// w: [rows, cols] fp32, columns already in processing order; h: [cols, cols] in the original
// order, perm: the processing order; scale / zero: [rows, groups]; col_group: the group of
// each (permuted) column; grid: "int" (bits wide) or "e4m3" (FP8; zero_point unused). Returns
// the codes (permuted order; int8, or E4M3 bytes in an int8 tensor),
// the weights as they were when each column was quantized, the loss, and the damping
// fraction used (-1: no damping made H positive definite, so plain RTN was applied).
std::tuple<at::Tensor, at::Tensor, double, double> gptq_solve(
    const at::Tensor& w_in, const at::Tensor& h_in, const at::Tensor& perm_in, const at::Tensor& scale_in,
    const at::Tensor& zero_in, const at::Tensor& col_group_in, int64_t bits, int64_t block_size, double dampening_frac,
    const std::string& grid) {
  TORCH_CHECK_VALUE(grid == "int" || grid == "e4m3", "lowbit: grid must be 'int' or 'e4m3' (FP8), got '", grid, "'");
  const bool fp8 = grid == "e4m3";
  if (!fp8) check_bits(bits);
  check_cpu(w_in, "weight");
  check_cpu(h_in, "hessian");
  check_cpu(perm_in, "perm");
  check_cpu(scale_in, "scale");
  check_cpu(zero_in, "zero_point");
  check_cpu(col_group_in, "col_group");
  check_float(w_in, "weight");
  check_dtype(h_in, at::kFloat, "hessian");
  check_dtype(perm_in, at::kLong, "perm");
  check_dtype(col_group_in, at::kLong, "col_group");
  check_float(scale_in, "scale");
  // Integer zero points (compressed-tensors' grids) or float32 ones (GGUF's grids, whose offsets
  // are not a whole number of steps).
  if (zero_in.scalar_type() != at::kFloat) check_integral(zero_in, "zero_point");
  check_dim(w_in, 2, "weight");
  const int64_t rows = w_in.size(0), cols = w_in.size(1);
  TORCH_CHECK_VALUE(cols > 0, "lowbit: the weight has no columns");
  check_shape(h_in, {cols, cols}, "hessian");
  TORCH_CHECK_VALUE(block_size > 0, "lowbit: block_size must be positive, got ", block_size);
  TORCH_CHECK_VALUE(dampening_frac > 0 && dampening_frac <= 1, "lowbit: dampening_frac must be in (0, 1], got ",
                    dampening_frac);
  check_shape(col_group_in, {cols}, "col_group (one entry per column)");
  check_shape(perm_in, {cols}, "perm (one entry per column)");
  TORCH_CHECK_VALUE(scale_in.dim() == 2 && scale_in.size(0) == rows && scale_in.size(1) > 0,
                    "lowbit: scale must be [rows, groups] = [", rows, ", groups], got ", scale_in.sizes());
  check_shape(zero_in, scale_in.sizes(), "zero_point (the shape of scale)");
  const at::Tensor w_orig = w_in.to(at::kFloat).contiguous();
  at::Tensor w = w_orig.clone();
  const at::Tensor h = h_in.to(at::kFloat).contiguous();
  const at::Tensor scale = scale_in.to(at::kFloat).contiguous(), zero = zero_in.to(at::kFloat).contiguous();
  const at::Tensor col_group = col_group_in.contiguous();
  const at::Tensor perm = perm_in.contiguous();
  TORCH_CHECK_VALUE(std::get<0>(at::sort(perm)).equal(at::arange(cols, perm.options())),
                    "lowbit: perm must be a permutation of the columns");
  const int64_t groups = scale.size(1);
  TORCH_CHECK_VALUE(col_group.min().item<int64_t>() >= 0 && col_group.max().item<int64_t>() < groups,
                    "lowbit: col_group entries must index the ", groups, " groups");

  auto [rn, rdiag, damping] = hessian_factor(h, perm, dampening_frac);
  if (!rn.defined()) {  // RTN: no error feedback
    rn = at::eye(cols, h.options());
    rdiag = at::ones({cols}, h.options());
  }
  at::Tensor codes = at::empty({rows, cols}, w.options().dtype(at::kChar));
  at::Tensor res = at::empty({rows, std::min(block_size, cols)}, w.options());
  const IntRange r(fp8 ? 8 : bits);
  double loss = 0.0;
  for (int64_t i1 = 0; i1 < cols; i1 += block_size) {
    const int64_t i2 = std::min(cols, i1 + block_size), width = i2 - i1;
    std::vector<double> partial(at::get_num_threads(), 0.0);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      double sum = 0.0;
      float *wp = w.data_ptr<float>(), *resp = res.data_ptr<float>();
      const float *op = w_orig.data_ptr<float>(), *rnp = rn.data_ptr<float>(), *rdp = rdiag.data_ptr<float>();
      const float *sp = scale.data_ptr<float>(), *zp = zero.data_ptr<float>();
      const int64_t* cg = col_group.data_ptr<int64_t>();
      int8_t* cp = codes.data_ptr<int8_t>();
      run_for_isa([&] {
        for (int64_t row = begin; row < end; ++row) {
          auto solve = fp8 ? solve_row<true> : solve_row<false>;
          sum += solve(wp + row * cols, op + row * cols, cp + row * cols, resp + row * res.size(1), rnp, rdp, cols,
                       i1, i2, sp + row * groups, zp + row * groups, cg, r.qmin, r.qmax);
        }
      });
      partial[at::get_thread_num()] += sum;
    });
    for (double p : partial) loss += p;
    if (i2 < cols) {  // the lazy update: one GEMM carries the block's residuals to the right, in place
      at::Tensor right = w.narrow(1, i2, cols - i2);
      right.addmm_(res.narrow(1, 0, width), rn.narrow(0, i1, width).narrow(1, i2, cols - i2));
    }
  }
  return {codes, w, loss, damping};
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("gptq_hessian_", &gptq_hessian_);
  m.impl("hessian_mirror_", &hessian_mirror_);
  m.impl("gptq_solve", &gptq_solve);
}

}  // namespace lowbit
