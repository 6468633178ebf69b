// pack / unpack ops: int8 codes <-> int32 words in compressed-tensors' layout (bitpack.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "lowbit/bitpack.h"
#include "lowbit/common.h"

namespace lowbit {
namespace {

at::Tensor pack(const at::Tensor& codes_in, int64_t bits) {
  check_bits(bits);
  check_cpu(codes_in, "codes");
  check_dtype(codes_in, at::kChar, "codes");
  check_dim(codes_in, 2, "codes");
  const at::Tensor codes = codes_in.contiguous();
  const int64_t rows = codes.size(0), cols = codes.size(1), words = packed_words(cols, bits);
  at::Tensor out = at::zeros({rows, words}, codes.options().dtype(at::kInt));
  const int8_t* qp = codes.data_ptr<int8_t>();
  auto* op = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const IntRange r(bits);
  std::atomic<bool> out_of_range{false};
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int8_t* q = qp + row * cols;
      int8_t lo = 127, hi = -128;
      for (int64_t i = 0; i < cols; ++i) {
        lo = q[i] < lo ? q[i] : lo;
        hi = q[i] > hi ? q[i] : hi;
      }
      if (cols > 0 && (lo < r.qmin || hi > r.qmax)) {
        out_of_range = true;
        return;
      }
      pack_row(q, cols, bits, op + row * words);
    }
  });
  TORCH_CHECK_VALUE(!out_of_range, "lowbit: codes must lie in [", r.qmin, ", ", r.qmax, "] for ", bits,
              "-bit packing");
  return out;
}

at::Tensor unpack(const at::Tensor& packed_in, int64_t bits, int64_t cols) {
  check_bits(bits);
  check_cpu(packed_in, "packed");
  check_dtype(packed_in, at::kInt, "packed");
  check_dim(packed_in, 2, "packed");
  TORCH_CHECK_VALUE(cols >= 0 && cols <= (int64_t{1} << 56), "lowbit: cols must be in 0..2^56, got ", cols);
  TORCH_CHECK_VALUE(packed_in.size(1) == packed_words(cols, bits), "lowbit: ", cols,
              " columns of ", bits, "-bit codes take ", packed_words(cols, bits),
              " words per row, but packed has ", packed_in.size(1));
  const at::Tensor packed = packed_in.contiguous();
  const int64_t rows = packed.size(0), words = packed.size(1);
  at::Tensor out = at::empty({rows, cols}, packed.options().dtype(at::kChar));
  const auto* ip = reinterpret_cast<const uint32_t*>(packed.data_ptr<int32_t>());
  int8_t* op = out.data_ptr<int8_t>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) unpack_row(ip + row * words, cols, bits, op + row * cols);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("pack", &pack);
  m.impl("unpack", &unpack);
}

}  // namespace lowbit
