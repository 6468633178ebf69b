// Integer quantization of a [rows, cols] weight in groups of columns (compressed-tensors'
// signed grid): quantization parameters (min-max or MSE shrink search), quantize,
// dequantize and fake-quantize. All arithmetic is fp32; scales are rounded through the
// weight's dtype before use, so the codes match the scales that get saved.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <limits>
#include <vector>

#include "lowbit/common.h"
#include "lowbit/intquant.h"
#include "lowbit/isa.h"

namespace lowbit {
namespace {

// The per-group loops below are the hot paths: plain loops that run_for_isa() compiles for
// each ISA.
template <typename T>
LOWBIT_VECTOR_LOOP void dequantize_span(const int8_t* codes, T* out, int64_t n, float scale,
                                         float zero) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>((codes[i] - zero) * scale);
}

template <typename T>
LOWBIT_VECTOR_LOOP void fake_quantize_span(const T* x, T* out, int64_t n, float scale, float zero,
                                            float qmin, float qmax) {
  for (int64_t i = 0; i < n; ++i) {
    float q = quantize_one(static_cast<float>(x[i]), scale, zero, qmin, qmax);
    out[i] = static_cast<T>((q - zero) * scale);
  }
}

// Sum of w_i |fake_quant(x_i) - x_i|^norm over one group (w = 1 without importance weights);
// norm 2 avoids powf.
LOWBIT_VECTOR_LOOP float group_error(const float* x, const float* importance, int64_t n, float scale, float zero,
                                      float qmin, float qmax, float norm) {
  float err = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float d = (quantize_one(x[i], scale, zero, qmin, qmax) - zero) * scale - x[i];
    const float e = norm == 2.0f ? d * d : std::pow(std::fabs(d), norm);
    err += importance ? importance[i] * e : e;
  }
  return err;
}

// MSE observer: shrink the range by p = 1 - i/grid, i < maxshrink*grid, and keep the
// candidate with the smallest (importance-weighted) error (strictly smaller wins, so ties
// keep the wider range).
GroupParams mse_search(const float* x, const float* importance, int64_t n, float lo, float hi, const IntRange& r,
                       bool symmetric, at::ScalarType sd, double maxshrink, int64_t grid, double norm) {
  GroupParams best = params_for_range(lo, hi, r, symmetric, sd);
  float best_err = group_error(x, importance, n, best.scale, best.zero, r.qmin, r.qmax, norm);
  const int64_t steps = static_cast<int64_t>(maxshrink * grid);
  for (int64_t i = 1; i < steps; ++i) {
    const float p = static_cast<float>(1.0 - static_cast<double>(i) / grid);  // as Python's 1 - i/grid
    GroupParams cand = params_for_range(p * lo, p * hi, r, symmetric, sd);
    float err = group_error(x, importance, n, cand.scale, cand.zero, r.qmin, r.qmax, norm);
    if (err < best_err) {
      best_err = err;
      best = cand;
    }
  }
  return best;
}

// The MSE search walks maxshrink * grid candidates per group: a bound keeps a call finite.
constexpr int64_t kMaxGrid = 100000;

std::tuple<at::Tensor, at::Tensor> quant_params(const at::Tensor& w_in, int64_t bits,
                                                bool symmetric, int64_t group_size,
                                                c10::string_view observer, double maxshrink,
                                                int64_t grid, double norm,
                                                const c10::optional<at::Tensor>& importance_in) {
  check_bits(bits);
  check_cpu(w_in, "weight");
  check_float(w_in, "weight");
  const int64_t ngroups = check_groups(w_in, group_size);
  const bool imatrix = observer == "imatrix_mse";
  const bool mse = observer == "mse" || imatrix;
  TORCH_CHECK_VALUE(mse || observer == "minmax", "lowbit: observer must be 'minmax', 'mse' or 'imatrix_mse', got '",
              std::string(observer), "'");
  const bool has_importance = importance_in.has_value() && importance_in->defined();
  TORCH_CHECK_VALUE(imatrix == has_importance, "lowbit: the 'imatrix_mse' observer takes importance weights (E[x^2] "
                    "per input column) and the other observers none; got observer '", std::string(observer), "' ",
                    has_importance ? "with" : "without", " importance");
  at::Tensor importance;
  if (imatrix) {
    check_cpu(*importance_in, "importance");
    check_floating(*importance_in, "importance");
    TORCH_CHECK_VALUE(importance_in->dim() == 1 && importance_in->size(0) == w_in.size(1), "lowbit: importance must "
                      "have shape [", w_in.size(1), "] (one weight per input column), got ", importance_in->sizes());
    importance = importance_in->to(at::kFloat).contiguous();
    TORCH_CHECK_VALUE(importance.numel() == 0 || (importance.isfinite().all().item<bool>() &&
                                                  importance.min().item<float>() >= 0.0f),
                      "lowbit: importance weights must be finite and >= 0");
  }
  const float* imp = imatrix ? importance.data_ptr<float>() : nullptr;
  TORCH_CHECK_VALUE(!mse || (grid > 0 && grid <= kMaxGrid && maxshrink > 0 && maxshrink <= 1 && norm > 0 &&
                             std::isfinite(norm)),
                    "lowbit: mse observer needs 0 < grid <= ", kMaxGrid, ", 0 < maxshrink <= 1 and a finite norm > 0, "
                    "got grid ", grid, ", maxshrink ", maxshrink, ", norm ", norm);
  const at::Tensor w = w_in.contiguous();
  const int64_t rows = w.size(0);
  const at::ScalarType sd = w.scalar_type();
  at::Tensor scale = at::empty({rows, ngroups}, w.options().dtype(at::kFloat));
  at::Tensor zero = at::empty({rows, ngroups}, w.options().dtype(at::kChar));
  float* scale_p = scale.data_ptr<float>();
  int8_t* zero_p = zero.data_ptr<int8_t>();
  const IntRange r(bits);
  std::atomic<bool> finite{true};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sd, "lowbit_quant_params", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / group_size);
    at::parallel_for(0, rows * ngroups, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(group_size);
      run_for_isa([&] {
        for (int64_t t = begin; t < end; ++t) {
          float lo, hi;
          if (!to_float_minmax(wp + t * group_size, group_size, buf.data(), &lo, &hi)) {
            finite = false;
            return;
          }
          // group t covers columns (t % ngroups) * group_size onwards of its row
          const float* group_importance = imp ? imp + (t % ngroups) * group_size : nullptr;
          GroupParams p = mse ? mse_search(buf.data(), group_importance, group_size, lo, hi, r, symmetric, sd,
                                           maxshrink, grid, norm)
                              : params_for_range(lo, hi, r, symmetric, sd);
          scale_p[t] = p.scale;
          zero_p[t] = static_cast<int8_t>(p.zero);
        }
      });
    });
  });
  TORCH_CHECK_VALUE(finite, "lowbit: the weight contains NaN or Inf values; fix the model weights before quantizing");
  return {scale.to(sd), zero};
}

// Parallel walk over the groups of a row-major weight: group t starts at element t * group_size
// and uses scale[t] and zero[t].
template <typename F>
void for_each_group(int64_t rows, int64_t ngroups, int64_t group_size, F&& body) {
  const int64_t grain = std::max<int64_t>(1, 32768 / group_size);
  at::parallel_for(0, rows * ngroups, grain, [&](int64_t begin, int64_t end) {
    run_for_isa([&] {
      for (int64_t t = begin; t < end; ++t) body(t, t * group_size);
    });
  });
}

// Validated per-group parameters of a [rows, cols] tensor, as contiguous fp32 (zero point 0
// when absent).
struct Params {
  int64_t ngroups;
  at::Tensor scale, zero;
  const float* s() const { return scale.data_ptr<float>(); }
  const float* z() const { return zero.data_ptr<float>(); }
};

// scale: float [rows, groups]; zero_point: an integer tensor of the same shape, or absent.
Params float_params(const at::Tensor& x, const at::Tensor& scale_in, const c10::optional<at::Tensor>& zero_in,
                    int64_t group_size) {
  const int64_t ngroups = check_groups(x, group_size), rows = x.size(0);
  check_cpu(scale_in, "scale");
  check_float(scale_in, "scale");
  check_shape(scale_in, {rows, ngroups}, "scale ([rows, cols / group_size])");
  if (zero_in.has_value() && zero_in->defined()) {
    check_cpu(*zero_in, "zero_point");
    check_integral(*zero_in, "zero_point");
    check_shape(*zero_in, {rows, ngroups}, "zero_point (the shape of scale)");
  }
  at::Tensor scale = scale_in.to(at::kFloat).contiguous();
  at::Tensor zero = zero_in.has_value() && zero_in->defined() ? zero_in->to(at::kFloat).contiguous()
                                                              : at::zeros_like(scale);
  return {ngroups, scale, zero};
}

at::Tensor quantize(const at::Tensor& w_in, const at::Tensor& scale_in,
                    const c10::optional<at::Tensor>& zero_in, int64_t bits, int64_t group_size) {
  check_bits(bits);
  check_cpu(w_in, "weight");
  check_float(w_in, "weight");
  const at::Tensor w = w_in.contiguous();
  const Params p = float_params(w, scale_in, zero_in, group_size);
  at::Tensor codes = at::empty(w.sizes(), w.options().dtype(at::kChar));
  const float *sp = p.s(), *zp = p.z();
  int8_t* out = codes.data_ptr<int8_t>();
  const IntRange r(bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "lowbit_quantize", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    for_each_group(w.size(0), p.ngroups, group_size, [&](int64_t t, int64_t off) {
      quantize_span(wp + off, out + off, group_size, sp[t], zp[t], r.qmin, r.qmax);
    });
  });
  return codes;
}

at::Tensor dequantize(const at::Tensor& codes_in, const at::Tensor& scale_in,
                      const c10::optional<at::Tensor>& zero_in, int64_t group_size,
                      at::ScalarType dtype) {
  check_cpu(codes_in, "codes");
  check_dtype(codes_in, at::kChar, "codes");
  TORCH_CHECK_TYPE(is_float(dtype), "lowbit: dtype must be float32, float16 or bfloat16, got ", dtype);
  const at::Tensor codes = codes_in.contiguous();
  const Params p = float_params(codes, scale_in, zero_in, group_size);
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(dtype));
  const float *sp = p.s(), *zp = p.z();
  const int8_t* cp = codes.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lowbit_dequantize", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_group(codes.size(0), p.ngroups, group_size, [&](int64_t t, int64_t off) {
      dequantize_span(cp + off, op + off, group_size, sp[t], zp[t]);
    });
  });
  return out;
}

at::Tensor fake_quantize(const at::Tensor& w_in, const at::Tensor& scale_in,
                         const c10::optional<at::Tensor>& zero_in, int64_t bits,
                         int64_t group_size) {
  check_bits(bits);
  check_cpu(w_in, "weight");
  check_float(w_in, "weight");
  const at::Tensor w = w_in.contiguous();
  const Params p = float_params(w, scale_in, zero_in, group_size);
  at::Tensor out = at::empty_like(w);
  const float *sp = p.s(), *zp = p.z();
  const IntRange r(bits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "lowbit_fake_quantize", [&] {
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_each_group(w.size(0), p.ngroups, group_size, [&](int64_t t, int64_t off) {
      fake_quantize_span(wp + off, op + off, group_size, sp[t], zp[t], r.qmin, r.qmax);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("quant_params", &quant_params);
  m.impl("quantize", &quantize);
  m.impl("dequantize", &dequantize);
  m.impl("fake_quantize", &fake_quantize);
}

}  // namespace lowbit
