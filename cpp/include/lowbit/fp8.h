// FP8 formats as torch stores them: E4M3 (torch.float8_e4m3fn: bias 7, no infinities, NaN
// 0x7F / 0xFF, largest 448) and E5M2 (torch.float8_e5m2: bias 15, IEEE-like, largest 57344).
// The encoder rounds to nearest even bit for bit as c10's float -> float8 conversion does, for
// values its callers have clamped to [-max, max] first, as compressed-tensors clamps them (past
// the range c10 saturates E4M3 but sends E5M2 to Inf).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <string>

#include "lowbit/common.h"

namespace lowbit {

struct Fp8Format {
  bool e5m2;
  at::ScalarType dtype;
  float max;
  const char* name;
};

constexpr Fp8Format kE4M3{false, at::kFloat8_e4m3fn, 448.0f, "e4m3"};
constexpr Fp8Format kE5M2{true, at::kFloat8_e5m2, 57344.0f, "e5m2"};

// 'e4m3' or 'e5m2' (ValueError otherwise).
inline const Fp8Format& fp8_format(const std::string& name) {
  TORCH_CHECK_VALUE(name == "e4m3" || name == "e5m2", "lowbit: format must be 'e4m3' (torch.float8_e4m3fn) or "
                    "'e5m2' (torch.float8_e5m2), got '", name, "'");
  return name == "e4m3" ? kE4M3 : kE5M2;
}

// The format of an FP8 tensor (TypeError for any other dtype).
inline const Fp8Format& fp8_format_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat8_e4m3fn || t.scalar_type() == at::kFloat8_e5m2, "lowbit: ", name,
                   " must be torch.float8_e4m3fn or torch.float8_e5m2, got ", dtype_name(t.scalar_type()));
  return t.scalar_type() == at::kFloat8_e4m3fn ? kE4M3 : kE5M2;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// f (finite, |f| <= the format's max) -> FP8 byte, round to nearest even. M mantissa bits,
// exponent bias B. Written without branches so the loops that call it vectorise: below the
// smallest normal, adding 2^(23 - M - B + 1) leaves the subnormal code in the low bits of the
// sum (the FPU rounds); above, the mantissa is rounded in the integer bits.
template <int M, int B>
LOWBIT_VECTOR_LOOP uint8_t fp8_encode(float f) {
  constexpr uint32_t min_normal = static_cast<uint32_t>(127 - B + 1) << 23;
  constexpr uint32_t denorm_magic = static_cast<uint32_t>(127 + 23 - M - B + 1) << 23;
  const uint32_t bits = float_bits(f);
  const uint32_t sign = (bits >> 24) & 0x80u;
  const uint32_t a = bits & 0x7FFFFFFFu;
  const uint32_t sub = float_bits(bits_float(a) + bits_float(denorm_magic)) - denorm_magic;
  const uint32_t odd = (a >> (23 - M)) & 1u;
  const uint32_t normal = (a + (static_cast<uint32_t>(B - 127) << 23) + ((1u << (22 - M)) - 1u) + odd) >> (23 - M);
  return static_cast<uint8_t>((a < min_normal ? sub : normal) | sign);
}

// f (finite, |f| <= the format's max) rounded to the nearest FP8 value (ties to even), as fp32:
// the value fp8_encode's code stands for. Adding and subtracting 2^(e + 23 - M), e the exponent
// of |f| (at least the smallest normal's), leaves |f| rounded to a multiple of its FP8 spacing.
template <int M, int B>
LOWBIT_VECTOR_LOOP float fp8_round(float f) {
  constexpr uint32_t min_normal = static_cast<uint32_t>(127 - B + 1) << 23;
  const uint32_t bits = float_bits(f);
  const uint32_t e = bits & 0x7F800000u;
  const float magic = bits_float((e > min_normal ? e : min_normal) + (static_cast<uint32_t>(23 - M) << 23));
  const float r = (bits_float(bits & 0x7FFFFFFFu) + magic) - magic;
  return bits_float(float_bits(r) | (bits & 0x80000000u));
}

// The 256 values of a format's codes as fp32 (exact; E4M3 0x7F / 0xFF and E5M2's NaNs are NaN).
// Baseline x86-64 (SSE2) has no byte shuffle or fp16 conversion: a lookup per code is its
// fastest decode.
inline const std::array<float, 256>& fp8_values(const Fp8Format& f) {
  static const std::array<float, 256> e4m3 = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = static_cast<float>(c10::Float8_e4m3fn(b, c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  static const std::array<float, 256> e5m2 = [] {
    std::array<float, 256> t{};
    for (int b = 0; b < 256; ++b) t[b] = static_cast<float>(c10::Float8_e5m2(b, c10::Float8_e5m2::from_bits()));
    return t;
  }();
  return f.e5m2 ? e5m2 : e4m3;
}

}  // namespace lowbit
