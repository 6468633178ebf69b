// The op registry (one schema per op, CPU kernels live beside their code) and the pybind11
// module lowbit._C for the few helpers that are not tensor ops. This is the only file that
// includes <torch/extension.h>, to keep compile times short.
#include <torch/extension.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include "lowbit/isa.h"

TORCH_LIBRARY(lowbit, m) {
  // Per-group scale (weight dtype) and int8 zero point of a [rows, cols] weight; observer
  // "minmax", "mse" (shrink search over p = 1 - i/grid, i < maxshrink*grid, |err|^norm) or
  // "imatrix_mse" (the same search, each column's error weighted by importance[col]).
  m.def("quant_params(Tensor w, int bits, bool symmetric, int group_size, str observer='minmax', "
        "float maxshrink=0.8, int grid=100, float norm=2.4, Tensor? importance=None) -> (Tensor scale, Tensor zero_point)");
  // Signed int8 codes: round(clamp(w / scale + zero_point, qmin, qmax)).
  m.def("quantize(Tensor w, Tensor scale, Tensor? zero_point, int bits, int group_size) -> Tensor");
  // (codes - zero_point) * scale in the given dtype.
  m.def("dequantize(Tensor codes, Tensor scale, Tensor? zero_point, int group_size, ScalarType dtype) -> Tensor");
  // quantize then dequantize in one pass, in the weight's dtype.
  m.def("fake_quantize(Tensor w, Tensor scale, Tensor? zero_point, int bits, int group_size) -> Tensor");
  // int8 codes [rows, cols] -> int32 [rows, ceil(cols*bits/32)], compressed-tensors layout.
  m.def("pack(Tensor codes, int bits) -> Tensor");
  // The inverse of pack, for `cols` codes per row.
  m.def("unpack(Tensor packed, int bits, int cols) -> Tensor");
  // x [M, in] @ dequant(packed)^T (+ bias) with the unpacking fused into the matmul.
  m.def("packed_linear(Tensor x, Tensor packed, Tensor scale, Tensor? zero_point, int bits, "
        "int group_size, Tensor? bias) -> Tensor");
  // GPTQ Hessian, in place: running average of 2 x^T x over the rows of inputs [..., cols] in an
  // fp32 [cols, cols] accumulator (upper triangle only unless mirror) -> samples so far.
  m.def("gptq_hessian_(Tensor(a!) hessian, Tensor inputs, int num_samples, bool mirror=True) -> int");
  // Upper triangle of a square fp32 matrix copied onto the lower one, in place.
  m.def("hessian_mirror_(Tensor(a!) hessian) -> Tensor(a!)");
  // AWQ: sum of |x| per input channel into a float64 accumulator, in place -> rows seen so far.
  m.def("awq_channel_stats_(Tensor(a!) sum_abs, Tensor inputs, int count) -> int");
  // AWQ: lower Cholesky factor L of a Gram matrix G = X^T X (jittered if singular; NaN if G is not finite).
  m.def("awq_gram_factor(Tensor gram) -> Tensor");
  // AWQ scale search, one grid point: ||D L||^2 = sum((D G) * D), D = W - Q(W * s) / s.
  m.def("awq_scale_loss(Tensor weight, Tensor gram_factor, Tensor scales, int bits, int group_size, bool symmetric) -> float");
  // AWQ clip search: the best clipping bound of each (row, group) -> [rows, groups] float32.
  m.def("awq_clip(Tensor weight, Tensor gram, int bits, int group_size, bool symmetric, int n_grid, "
        "float max_shrink) -> Tensor");
  // NF4 / FP4 blockwise 4-bit quantization as bitsandbytes does it -> (packed uint8 [(n+1)/2, 1],
  // absmax float32 [blocks]); and its inverse -> a flat tensor of numel elements.
  m.def("nf4_quantize(Tensor weight, int blocksize, str quant_type) -> (Tensor, Tensor)");
  m.def("nf4_dequantize(Tensor packed, Tensor absmax, int blocksize, str quant_type, int numel, "
        "ScalarType dtype) -> Tensor");
  // x @ W^T (+ bias) with W [out_features, in] in NF4 / FP4 codes, decoded inside the loop;
  // absmax fp32, or uint8 codes into nested_code scaled by nested_absmax (256 blocks each) + offset (0-d).
  m.def("nf4_linear(Tensor x, Tensor packed, Tensor absmax, int blocksize, str quant_type, int out_features, "
        "Tensor? bias, Tensor? nested_absmax=None, Tensor? nested_code=None, Tensor? offset=None) -> Tensor");
  // 8-bit blockwise quantization against a 256-entry code, as bitsandbytes' CPU library does it
  // (double quantization) -> (codes uint8 [n], absmax float32 [blocks]); and its inverse (fp32).
  m.def("blockwise8_quantize(Tensor values, Tensor code, int blocksize) -> (Tensor, Tensor)");
  m.def("blockwise8_dequantize(Tensor codes, Tensor absmax, Tensor code, int blocksize) -> Tensor");
  // LLM.int8(): row-wise int8 codes of float16 values (outlier columns, |x| >= threshold, left
  // out) -> (codes int8, absmax float32 [rows], outlier columns int64); the int8 x int8 -> int32
  // product a @ b^T; and the decomposed matmul, returned in x's dtype.
  m.def("int8_quantize_rowwise(Tensor x, float threshold) -> (Tensor, Tensor, Tensor)");
  m.def("int8_matmul(Tensor a, Tensor b) -> Tensor");
  m.def("int8_outlier_matmul(Tensor x, Tensor w, Tensor w_scale, float threshold, Tensor? bias) -> Tensor");
  // W8A8 (Int8DynamicLinear): x quantized symmetric int8 per token (or with the static input_scale),
  // the int8 GEMM with w [out, in], rescaled by x_scale * w_scale [out] (+ bias), in x's dtype.
  m.def("int8_dynamic_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? input_scale, Tensor? bias) -> Tensor");
  // GPTQ blocked solve on the weight's columns in processing order perm (the hessian in the
  // original order), onto the integer grid or E4M3's (grid 'e4m3': codes are the FP8 bytes)
  // -> (codes, updated weight, loss, damping used or -1).
  m.def("gptq_solve(Tensor weight, Tensor hessian, Tensor perm, Tensor scale, Tensor zero_point, Tensor col_group, "
        "int bits, int block_size, float dampening_frac, str grid='int') -> (Tensor, Tensor, float, float)");
  // FP8 ('e4m3' = float8_e4m3fn, 'e5m2' = float8_e5m2) in block_rows x block_cols tiles of a
  // [rows, cols] tensor, element (i, j) scaled by scale[i / block_rows, j / block_cols]:
  // absmax / max of each tile (0 -> eps) in x's dtype -> [ceil(rows / block_rows), ceil(cols / block_cols)].
  m.def("fp8_scales(Tensor x, int block_rows, int block_cols, str format='e4m3') -> Tensor");
  // FP8 codes: clamp(x / scale, -max, max) rounded to nearest even (x / scale in fp32; NaN x raises).
  m.def("fp8_quantize(Tensor x, Tensor scale, int block_rows, int block_cols, str format='e4m3') -> Tensor");
  // float(q) * scale in fp32, cast to dtype.
  m.def("fp8_dequantize(Tensor q, Tensor scale, int block_rows, int block_cols, ScalarType dtype) -> Tensor");
  // fp8_quantize then fp8_dequantize in one pass, in x's dtype.
  m.def("fp8_fake_quantize(Tensor x, Tensor scale, int block_rows, int block_cols, str format='e4m3') -> Tensor");
  // x [..., in] @ dequant(weight)^T (+ bias) for an FP8 weight [out, in], decoded inside the matmul.
  m.def("fp8_linear(Tensor x, Tensor weight, Tensor weight_scale, int block_rows, int block_cols, "
        "Tensor? bias) -> Tensor");
  // SmoothQuant: running per-channel minimum / maximum (fp32 [C], in place) over the tokens of x [..., C].
  m.def("channel_range_(Tensor(a!) mins, Tensor(b!) maxs, Tensor x) -> ()");
  // GGUF (llama.cpp's ggml block formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K .. Q6_K, case-insensitive):
  // a [rows, cols] float weight -> uint8 [rows, row_bytes], ggml_quantize_chunk's bytes (its
  // importance-weighted quantizers when importance, llama.cpp's imatrix [cols] float32, is given).
  m.def("gguf_quantize(Tensor weight, str type, Tensor? importance=None) -> Tensor");
  // uint8 blocks [rows, row_bytes] -> [rows, cols] as ggml's dequantize_row_* computes it (fp32), cast to dtype.
  m.def("gguf_dequantize(Tensor blocks, str type, int cols, ScalarType dtype) -> Tensor");
  // Each sub-block's affine grid -> (scale, offset) float32 [rows, cols / sub]: value = scale * q + offset
  // for the unsigned code q in [0, 2^bits - 1] (sub 16 for Q2_K / Q3_K / Q6_K, else 32).
  m.def("gguf_grid(Tensor blocks, str type, int cols) -> (Tensor scale, Tensor offset)");
  // A copy of blocks with every element's code replaced by codes (uint8 [rows, cols], gguf_grid's
  // convention); the block headers (d, dmin, sub-block scales) are kept.
  m.def("gguf_encode(Tensor codes, Tensor blocks, str type) -> Tensor");
}

namespace {

pybind11::dict cpu_info() {
  try {
    lowbit::active_isa();
  } catch (const c10::ValueError& e) {  // a LOWBIT_ISA the CPU cannot honour
    throw pybind11::value_error(e.what_without_backtrace());
  }
  const lowbit::CpuFeatures& f = lowbit::cpu_features();
  pybind11::dict features;
  features["avx2"] = f.avx2;
  features["fma"] = f.fma;
  features["f16c"] = f.f16c;
  features["avx512f"] = f.avx512f;
  features["avx512bw"] = f.avx512bw;
  features["avx512vl"] = f.avx512vl;
  features["avx512dq"] = f.avx512dq;
  features["avx512vnni"] = f.avx512vnni;
  features["avx512bf16"] = f.avx512bf16;
  features["avxvnni"] = f.avxvnni;
  features["amx_int8"] = f.amx_int8;
  pybind11::dict info;
  info["detected"] = lowbit::path_name(lowbit::detected_path());
  info["active"] = lowbit::path_name(lowbit::active_path());
  pybind11::list supported;  // best first
  for (lowbit::IsaPath p : lowbit::supported_paths()) supported.append(lowbit::path_name(p));
  info["supported"] = supported;
  info["vnni_int8_kernel"] = lowbit::use_vnni() || lowbit::use_avxvnni();
  info["bf16_gemm"] = lowbit::use_bf16_gemm();
  info["features"] = features;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit's C++ core; the tensor ops are registered as torch.ops.lowbit.*";
  m.def("parallel_info", &at::get_parallel_info, "ATen's thread pool and OpenMP settings");
  m.def("cpu_info", &cpu_info, "The CPU features lowbit detected and the ISA its kernels use");
  m.def("set_isa",
        [](const std::string& name) {
          try {
            lowbit::set_isa(name);
          } catch (const c10::ValueError& e) {
            throw pybind11::value_error(e.what_without_backtrace());
          }
        },
        pybind11::arg("name"),
        "Force the kernels onto 'avx512', 'avxvnni', 'avx2' or 'generic' (one the CPU supports)");
}
