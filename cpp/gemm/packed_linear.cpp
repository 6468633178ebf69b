// W4A16 / W8A16 linear layer on packed compressed-tensors weights:
//   y[m, r] = sum_g scale[r, g] * sum_{k in g} (u[r, k] - z[r, g]) * x[m, k]   (+ bias)
// where u is the stored unsigned code and z = zero_point + 2^(b-1).
//
// Few tokens (decoding): fused kernels decode the codes in registers and reuse each decoded
// vector for several tokens, so the inner loop is decode + multiply-add only. AVX-512: a
// per-group lookup table (x reordered to the nibble order); AVX2 and baseline x86-64: one
// vector-type kernel (fused_tile) over a decoder per ISA, the zero point applied per group
// through sum(x). Other bit widths and group sizes: each row dequantized into L1 and reused.
// Many tokens: tiles of rows are dequantized into a cache-sized fp32 buffer and multiplied with
// ATen's GEMM (in bf16 for bf16 x where the CPU has bf16 arithmetic: bf16_gemm). The path follows
// lowbit's active ISA (isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "lowbit/bitpack.h"
#include "lowbit/common.h"

namespace lowbit {
namespace {

// Above this many tokens the dequantize-tile + GEMM path wins (AVX-512 kernel; row-at-a-time
// portable kernel).
constexpr int64_t kMaxDecodeTokens = 24;
constexpr int64_t kMaxFusedTokensPortable = 4;
constexpr int kTokenBlock = 8;
// Multiply-adds per thread below which a call stays on fewer threads: waking a second thread
// and joining it costs more than it saves on a 64x64 layer at one token, not on SmolLM2's (weights
// in L3, AVX2, one token: 576x576 34 us on one thread, 22 us on two; 192x576 17 and 14 us).
constexpr int64_t kParallelMacs = 1 << 16;

struct LinearArgs {
  int64_t M, N, K, ngroups, group_size, words, bits;
  const uint8_t* w;      // packed rows, words * 4 bytes each
  const float* scale;    // [N, ngroups]
  const int8_t* zero;    // [N, ngroups] signed zero point as stored, or null (symmetric)
  float* out;            // [M, N]
  bool in_bf16;          // the many-token path multiplies in bf16 (bf16_gemm)

  // The zero point in the unsigned code domain: zero_point + 2^(bits-1).
  float zero_at(int64_t r, int64_t g) const {
    return static_cast<float>((zero ? zero[r * ngroups + g] : 0) + (1 << (bits - 1)));
  }
};

// Rows per task of the fused kernels' parallel loop.
int64_t fused_grain(const LinearArgs& a) { return std::max<int64_t>(16, kParallelMacs / (a.K * a.M)); }

// ---------------------------------------------------------------- portable tile path
// Dequantizes rows [r0, r1) into dst [r1 - r0, K] (fp32, natural column order).
LOWBIT_VECTOR_LOOP void dequantize_rows(const LinearArgs& a, int64_t r0, int64_t r1, float* dst) {
  thread_local std::vector<int8_t> codes;  // per thread, reused across calls
  codes.resize(a.K);
  const float offset = static_cast<float>(1 << (a.bits - 1));
  for (int64_t r = r0; r < r1; ++r) {
    unpack_row(reinterpret_cast<const uint32_t*>(a.w) + r * a.words, a.K, a.bits, codes.data());
    float* row = dst + (r - r0) * a.K;
    for (int64_t g = 0; g < a.ngroups; ++g) {
      const float s = a.scale[r * a.ngroups + g], z = a.zero_at(r, g) - offset;
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k) row[k] = (codes[k] - z) * s;
    }
  }
}

void dequantize_rows_portable(const LinearArgs& a, int64_t r0, int64_t r1, float* dst) {
  run_for_isa([&] { dequantize_rows(a, r0, r1, dst); });
}

// Few tokens, any bit width and ISA: each row is dequantized once into an L1-sized buffer and
// multiplied with every token there, so the weights are read once and never written out.
void fused_linear_portable(const LinearArgs& a, const float* xp) {
  at::parallel_for(0, a.N, fused_grain(a), [&](int64_t b, int64_t e) {
    std::vector<float> row(a.K);
    run_for_isa([&] {
      for (int64_t r = b; r < e; ++r) {
        dequantize_rows(a, r, r + 1, row.data());
        for (int64_t m = 0; m < a.M; ++m) {
          float acc[8] = {0};
          dot_lanes<8>(row.data(), xp + m * a.K, a.K, acc);
          a.out[m * a.N + r] = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        }
      }
    });
  });
}

using DequantizeRows = void (*)(const LinearArgs&, int64_t, int64_t, float*);

// out = x @ W^T through tiled_matmul, the rows dequantized by `dequant` in x's column order.
void tiled_linear(const LinearArgs& a, const at::Tensor& x, const at::Tensor& out, DequantizeRows dequant) {
  tiled_matmul(x, out, a.N, [&](int64_t begin, int64_t end, float* dst) { dequant(a, begin, end, dst); }, a.in_bf16);
}

// ---------------------------------------------------------------- fused kernel, AVX2 and portable
// One source for both paths, on GCC vector types: a decoder turns the codes of W consecutive
// columns into their unsigned values u (exact in fp32), and the zero point is applied once per
// group through the group's sum of x:
//   sum_k (u_k - z) x_k = sum_k u_k x_k - z * xsum_g,
// so the inner loop is decode + multiply-add, and the group's scale multiplies a vector of
// partial sums once per group. Columns stay in their natural order (x is used as given).

typedef float F8 __attribute__((vector_size(32)));
typedef uint32_t U8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
typedef float F4 __attribute__((vector_size(16)));

// A vector of floats from unaligned memory.
template <typename V>
LOWBIT_VECTOR_LOOP V load_floats(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// AVX2 (compiled under run_avx2): one word broadcast and shifted lane by lane (vpsrlvd), masked
// and converted: five instructions per 8 weights.
template <int BITS>
struct ShiftDecoder {
  using V = F8;
  static constexpr int W = 8, kBits = BITS;
  static constexpr bool kSplit = false;
  // The 8 codes starting at byte p: one word (4 bits) or two (8 bits).
  LOWBIT_VECTOR_LOOP static V decode(const uint8_t* p) {
    uint32_t w[2];
    std::memcpy(w, p, BITS);
    // Converted from signed lanes (the values fit), which is one instruction.
    if (BITS == 4) return __builtin_convertvector((I8)(((U8){} + w[0]) >> (U8){0, 4, 8, 12, 16, 20, 24, 28} & 15), F8);
    const U8 words = {w[0], w[0], w[0], w[0], w[1], w[1], w[1], w[1]};
    return __builtin_convertvector((I8)(words >> (U8){0, 8, 16, 24, 0, 8, 16, 24} & 255), F8);
  }
  LOWBIT_VECTOR_LOOP static float hsum(V v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
  }
};

// AVX2, 4 bits, the fused kernel's decoder: 16 codes from 8 bytes, each byte widened to a lane
// (vpmovzxbd), its low nibbles (even columns) and high nibbles (odd columns) converted: five
// vector instructions per 16 weights besides the multiply-adds, against eight for two
// ShiftDecoder calls. The lanes come out as [8 even, 8 odd] columns of each 16, so x is
// reordered to match (split_even_odd<16>); a dot product does not care about the order.
#ifdef LOWBIT_X86
struct SplitNibbleDecoder {
  using V = F8;
  static constexpr int W = 8, kBits = 4;
  static constexpr bool kSplit = true;
  // The widening is written as one instruction: GCC 12 widens a vector of 8 bytes lane by lane in
  // scalar code, and an intrinsic would need this generic template compiled for AVX2.
  LOWBIT_VECTOR_LOOP static void decode16(const uint8_t* p, V& even, V& odd) {
    I8 lanes;
    asm("vpmovzxbd %1, %0" : "=x"(lanes) : "m"(*reinterpret_cast<const uint64_t*>(p)));
    even = __builtin_convertvector(lanes & 15, F8);
    odd = __builtin_convertvector(lanes >> 4, F8);
  }
  LOWBIT_VECTOR_LOOP static float hsum(V v) { return ShiftDecoder<4>::hsum(v); }
};

// x with each CHUNK columns reordered to [CHUNK / 2 even, CHUNK / 2 odd] (n a multiple of CHUNK):
// the order in which the nibble decoders' lanes come out (SplitNibbleDecoder: 16, AVX-512: 32).
template <int CHUNK>
void split_even_odd(const float* x, int64_t n, float* out) {
  for (int64_t c = 0; c < n; c += CHUNK)
    for (int j = 0; j < CHUNK / 2; ++j) {
      out[c + j] = x[c + 2 * j];
      out[c + CHUNK / 2 + j] = x[c + 2 * j + 1];
    }
}
#endif

// Baseline x86-64 (SSE2, no variable shifts): 4 bits through a table of the two values in each
// byte (2 KB, in L1), 8 bits by unpacking bytes against zero.
struct NibblePairs {
  alignas(16) float pairs[256][2];
  NibblePairs() {
    for (int b = 0; b < 256; ++b) {
      pairs[b][0] = static_cast<float>(b & 15);
      pairs[b][1] = static_cast<float>(b >> 4);
    }
  }
};
const NibblePairs kNibblePairs;

template <int BITS>
struct TableDecoder {
  using V = F4;
  static constexpr int W = 4, kBits = BITS;
  static constexpr bool kSplit = false;
#ifdef LOWBIT_X86
  LOWBIT_VECTOR_LOOP static V decode(const uint8_t* p) {  // the 4 codes starting at byte p
    if (BITS == 4) {
      const __m128 lo = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(kNibblePairs.pairs[p[0]])));
      return _mm_loadh_pi(lo, reinterpret_cast<const __m64*>(kNibblePairs.pairs[p[1]]));
    }
    int32_t w;
    std::memcpy(&w, p, 4);
    const __m128i zero = _mm_setzero_si128();
    const __m128i bytes = _mm_unpacklo_epi8(_mm_cvtsi32_si128(w), zero);
    return _mm_cvtepi32_ps(_mm_unpacklo_epi16(bytes, zero));
  }
#else
  LOWBIT_VECTOR_LOOP static V decode(const uint8_t* p) {
    if (BITS == 4) return V{float(p[0] & 15), float(p[0] >> 4), float(p[1] & 15), float(p[1] >> 4)};
    return V{float(p[0]), float(p[1]), float(p[2]), float(p[3])};
  }
#endif
  LOWBIT_VECTOR_LOOP static float hsum(V v) { return (v[0] + v[2]) + (v[1] + v[3]); }
};

template <class D>
LOWBIT_VECTOR_LOOP void dequantize_rows_vec(const LinearArgs& a, int64_t r0, int64_t r1, float* dst) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wrow = a.w + r * a.words * 4;
    float* row = dst + (r - r0) * a.K;
    for (int64_t g = 0; g < a.ngroups; ++g) {
      const float s = a.scale[r * a.ngroups + g], zs = a.zero_at(r, g) * s;
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; k += D::W) {
        const typename D::V v = D::decode(wrow + ((k * D::kBits) >> 3)) * s - zs;
        std::memcpy(row + k, &v, sizeof v);
      }
    }
  }
}

// Per-row running state of the fused kernel across K blocks: partial sums and the zero-point
// correction per token.
template <class D>
struct RowSums {
  typename D::V sums[kTokenBlock];
  float correction[kTokenBlock];
};

// Rows [r0, r1) x tokens [m0, m0 + MB) x groups [g0, g1), 32 columns per step. Each decoded
// vector feeds MB tokens; with few tokens, more accumulators per token keep enough
// multiply-add chains in flight. CHUNKS: 32-column steps per group when known at compile time
// (groups of 64 and 128), else 0.
template <class D, int MB, int CHUNKS>
LOWBIT_VECTOR_LOOP void fused_tile(const LinearArgs& a, const float* xp, const float* xsum, int64_t m0, int64_t r0,
                                   int64_t r1, int64_t g0, int64_t g1, RowSums<D>* state) {
  using V = typename D::V;
  constexpr int kSteps = 32 / D::W;                   // decodes per 32 columns
  constexpr int kChunkBytes = 32 * D::kBits / 8;      // packed bytes of 32 columns
  constexpr int A = MB == 1 ? 4 : MB == 2 ? 2 : 1;  // accumulators per token
  const int64_t chunks = CHUNKS ? CHUNKS : a.group_size / 32;
  const int64_t group_bytes = chunks * kChunkBytes;
  const float offset = static_cast<float>(1 << (a.bits - 1));
  // Pointers stepped through the loops (not indices recomputed from k): the hot loop then needs
  // no address arithmetic beyond its increments, which keeps its registers free. The weights
  // are prefetched once per row, not per group: small groups' bookkeeping costs vector-port time.
  const float* x0 = xp + m0 * a.K + g0 * a.group_size;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wp = a.w + r * a.words * 4 + g0 * group_bytes;
    const float* scale = a.scale + r * a.ngroups + g0;
    const int8_t* zero = a.zero ? a.zero + r * a.ngroups + g0 : nullptr;
    const float* xg = x0;
    RowSums<D>& st = state[r - r0];
    for (int64_t g = g0; g < g1; ++g, ++scale) {
      V acc[MB][A] = {};
      for (int64_t line = 0; line < group_bytes; line += 64) __builtin_prefetch(wp + line + kPrefetchBytes);
      for (int64_t c = 0; c < chunks; ++c, wp += kChunkBytes, xg += 32) {
        if constexpr (D::kSplit) {  // 16 codes per decode, in split order
          for (int i = 0; i < kSteps; i += 2) {
            V even, odd;
            D::decode16(wp + i * D::W * D::kBits / 8, even, odd);
            for (int m = 0; m < MB; ++m) {
              acc[m][i % A] += even * load_floats<V>(xg + m * a.K + i * D::W);
              acc[m][(i + 1) % A] += odd * load_floats<V>(xg + m * a.K + (i + 1) * D::W);
            }
          }
        } else {
          for (int i = 0; i < kSteps; ++i) {
            const V code = D::decode(wp + i * D::W * D::kBits / 8);
            for (int m = 0; m < MB; ++m) acc[m][i % A] += code * load_floats<V>(xg + m * a.K + i * D::W);
          }
        }
      }
      const float s = *scale, zs = (zero ? *zero++ + offset : offset) * s;
      for (int m = 0; m < MB; ++m) {
        V sum = acc[m][0];
        for (int j = 1; j < A; ++j) sum += acc[m][j];
        st.sums[m] += sum * s;
        st.correction[m] += zs * xsum[(m0 + m) * a.ngroups + g];
      }
    }
  }
}

template <class D, int MB>
LOWBIT_VECTOR_LOOP void fused_rows(const LinearArgs& a, const float* xp, const float* xsum, int64_t m0, int64_t r0,
                                   int64_t r1, RowSums<D>* state) {
  for (int64_t r = r0; r < r1; ++r) state[r - r0] = RowSums<D>{};
  // Several tokens: K blocks whose MB rows of x take at most 32 KB, so x stays in L1 across the
  // rows. One token: whole rows (x up to 256 KB, in L2), so the weights stream sequentially
  // (4096x11008 at one token: 17% faster than in 32 KB blocks; 5% slower with 8 tokens).
  const int64_t x_budget = MB == 1 ? 256 << 10 : 32 << 10;
  const int64_t groups_per_block = std::max<int64_t>(1, x_budget / (MB * 4) / a.group_size);
  for (int64_t g0 = 0; g0 < a.ngroups; g0 += groups_per_block)
  {
    const int64_t g1 = std::min(a.ngroups, g0 + groups_per_block);
    if (a.group_size == 64) fused_tile<D, MB, 2>(a, xp, xsum, m0, r0, r1, g0, g1, state);
    else if (a.group_size == 128) fused_tile<D, MB, 4>(a, xp, xsum, m0, r0, r1, g0, g1, state);
    else fused_tile<D, MB, 0>(a, xp, xsum, m0, r0, r1, g0, g1, state);
  }
  for (int64_t r = r0; r < r1; ++r)
    for (int m = 0; m < MB; ++m)
      a.out[(m0 + m) * a.N + r] = D::hsum(state[r - r0].sums[m]) - state[r - r0].correction[m];
}

template <class D>
LOWBIT_VECTOR_LOOP void fused_rows_all_tokens(const LinearArgs& a, const float* xp, const float* xsum, int64_t b,
                                              int64_t e) {
  constexpr int64_t kRowBlock = 16;
  RowSums<D> state[kRowBlock];
  for (int64_t r0 = b; r0 < e; r0 += kRowBlock) {
    const int64_t r1 = std::min(e, r0 + kRowBlock);
    int64_t m0 = 0;
    for (; m0 + 8 <= a.M; m0 += 8) fused_rows<D, 8>(a, xp, xsum, m0, r0, r1, state);
    if (m0 + 4 <= a.M) {
      fused_rows<D, 4>(a, xp, xsum, m0, r0, r1, state);
      m0 += 4;
    }
    if (m0 + 2 <= a.M) {
      fused_rows<D, 2>(a, xp, xsum, m0, r0, r1, state);
      m0 += 2;
    }
    if (m0 < a.M) fused_rows<D, 1>(a, xp, xsum, m0, r0, r1, state);
  }
}

// Few tokens, 4 or 8 bits, groups of whole 32-column chunks.
template <int BITS>
void fused_linear(const LinearArgs& a, const float* xp, Isa isa) {
  // Sum of x over each group, [M, ngroups].
  std::vector<float> xsum(a.M * a.ngroups);
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t g = 0; g < a.ngroups; ++g) {
      float sum = 0.0f;
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k) sum += xp[m * a.K + k];
      xsum[m * a.ngroups + g] = sum;
    }
  at::Tensor xs;  // x in SplitNibbleDecoder's order (AVX2, 4 bits), 64-byte aligned as xp is
#ifdef LOWBIT_X86
  if (BITS == 4 && isa != Isa::generic) {
    xs = at::empty({a.M * a.K}, at::TensorOptions().dtype(at::kFloat));
    split_even_odd<16>(xp, a.M * a.K, xs.data_ptr<float>());
  }
#endif
  // Small layers stay on fewer threads: a thread's share must outweigh waking it.
  at::parallel_for(0, a.N, fused_grain(a), [&](int64_t b, int64_t e) {
#ifdef LOWBIT_X86
    if (BITS == 4 && isa != Isa::generic)
      return run_avx2(
          [&] { fused_rows_all_tokens<SplitNibbleDecoder>(a, xs.data_ptr<float>(), xsum.data(), b, e); });
    if (isa != Isa::generic)
      return run_avx2([&] { fused_rows_all_tokens<ShiftDecoder<BITS>>(a, xp, xsum.data(), b, e); });
#endif
    run_generic([&] { fused_rows_all_tokens<TableDecoder<BITS>>(a, xp, xsum.data(), b, e); });
  });
}

template <int BITS>
void dequantize_rows_fast(const LinearArgs& a, int64_t r0, int64_t r1, float* dst) {
#ifdef LOWBIT_X86
  if (active_isa() != Isa::generic) return run_avx2([&] { dequantize_rows_vec<ShiftDecoder<BITS>>(a, r0, r1, dst); });
#endif
  run_generic([&] { dequantize_rows_vec<TableDecoder<BITS>>(a, r0, r1, dst); });
}

// Above this many tokens the dequantize-tile + GEMM path wins (measured on the three large shapes,
// g128, weights cold: AVX2 fused 0.6-0.75x dense at 16 tokens against 0.8-0.94x for tiles, 1.4x
// at 32 against 0.82x; the SSE2 code 0.6x at 8 tokens against 0.7-1.6x for tiles, and even with
// them at 16).
int64_t max_fused_tokens(Isa isa) { return isa == Isa::generic ? 8 : 16; }

// true when it handled the call: 4 or 8 bits, groups of whole 32-column chunks.
bool vector_linear(const LinearArgs& a, const at::Tensor& x, const at::Tensor& out, Isa isa) {
  if ((a.bits != 4 && a.bits != 8) || a.group_size % 32) return false;
  const bool four = a.bits == 4;
  if (a.M <= max_fused_tokens(isa)) four ? fused_linear<4>(a, x.data_ptr<float>(), isa) : fused_linear<8>(a, x.data_ptr<float>(), isa);
  else tiled_linear(a, x, out, four ? &dequantize_rows_fast<4> : &dequantize_rows_fast<8>);
  return true;
}

// ---------------------------------------------------------------- AVX-512 path
#ifdef LOWBIT_X86

// For 4 bits, byte j of a 32-column chunk holds column 2j (low nibble) and 2j+1 (high):
// x is reordered per chunk into [16 even columns, 16 odd columns] so both halves of a
// decoded byte vector meet contiguous x (a dot product does not care about the order, as
// long as x and the weights agree). For 8 bits the byte order is the column order.
// A plain loop over x (contiguous fp32, K a multiple of 32): the view-transpose-copy it replaces
// cost four ATen calls, a few microseconds on every small layer's call.
at::Tensor prepare_x(const LinearArgs& a, const at::Tensor& x) {
  if (a.bits != 4) return x;
  at::Tensor xp = at::empty({a.M, a.K}, x.options());
  const float* src = x.data_ptr<float>();
  float* dst = xp.data_ptr<float>();
  at::parallel_for(0, a.M * a.K / 32, 4096, [&](int64_t begin, int64_t end) {
    split_even_odd<32>(src + begin * 32, (end - begin) * 32, dst + begin * 32);
  });
  return xp;
}

inline LOWBIT_TARGET_AVX512 __m512i load16_u8(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Dequantizes the codes of one group. 4 bits: a 16-entry table (u - z) * s per group, looked
// up with one permute per 16 codes (vpermps reads only the low 4 bits of each index, so no
// masking). 8 bits: u * s - z * s after an int -> float conversion.
template <int BITS>
struct GroupDecoder {
  __m512 lut, s, zs;
  // Scale and zero point are read in place (broadcasts from memory use a load port, not a
  // vector ALU port); a null zero point is the symmetric 2^(bits-1).
  LOWBIT_TARGET_AVX512 GroupDecoder(const float* scale, const int8_t* zero) {
    constexpr float kOffset = 1 << (BITS - 1);
    s = _mm512_set1_ps(*scale);
    if (BITS == 4) {
      const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512 centred = zero ? _mm512_sub_ps(iota, _mm512_set1_ps(*zero + kOffset))
                                  : _mm512_sub_ps(iota, _mm512_set1_ps(kOffset));  // folded to a constant
      lut = _mm512_mul_ps(centred, s);
    } else {
      zs = _mm512_mul_ps(_mm512_set1_ps(zero ? *zero + kOffset : kOffset), s);
    }
  }
  // The 32 weights whose codes start at byte p, in prepare_x's order.
  LOWBIT_TARGET_AVX512 void decode32(const uint8_t* p, __m512& c0, __m512& c1) const {
    if (BITS == 4) {
      const __m512i v = load16_u8(p);
      c0 = _mm512_permutexvar_ps(v, lut);
      c1 = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
    } else {
      c0 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(load16_u8(p)), s, zs);
      c1 = _mm512_fmsub_ps(_mm512_cvtepi32_ps(load16_u8(p + 16)), s, zs);
    }
  }
};

template <int BITS>
LOWBIT_TARGET_AVX512 void dequantize_rows_avx512(const LinearArgs& a, int64_t r0, int64_t r1, float* dst) {
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wrow = a.w + r * a.words * 4;
    float* row = dst + (r - r0) * a.K;
    for (int64_t g = 0; g < a.ngroups; ++g) {
      const GroupDecoder<BITS> dec(a.scale + r * a.ngroups + g, a.zero ? a.zero + r * a.ngroups + g : nullptr);
      for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; k += 32) {
        __m512 c0, c1;
        dec.decode32(wrow + ((k * BITS) >> 3), c0, c1);
        _mm512_storeu_ps(row + k, c0);
        _mm512_storeu_ps(row + k + 16, c1);
      }
    }
  }
}

// Rows [r0, r1) x tokens [m0, m0 + MB) x groups [g0, g1), adding into acc_buf (2 x 16
// partial sums per row and token), so a caller can walk K in blocks whose x stays in L1.
// Pointers are stepped through the loops and the weights prefetched once per row: with the
// per-group bounds and prefetch loop of an index-based loop, groups of 64 ran at a third of
// the vector ports' rate (the scalar bookkeeping outnumbered the 12 vector instructions).
template <int BITS, int MB, int STEPS>
LOWBIT_TARGET_AVX512 void decode_tile(const LinearArgs& a, const float* xp, int64_t m0, int64_t r0,
                               int64_t r1, int64_t g0, int64_t g1, float* acc_buf) {
  // Few tokens: two sets of accumulators taken in turn, so enough FMA chains are in flight.
  constexpr int S = MB <= 2 ? 2 : 1;
  constexpr int64_t kStepBytes = 32 * BITS / 8;  // the codes of 32 columns
  const int64_t steps = STEPS ? STEPS : a.group_size / 32, K = a.K;
  const int64_t group_bytes = steps * kStepBytes;
  const float* x0 = xp + m0 * K + g0 * a.group_size;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* wp = a.w + r * a.words * 4 + g0 * group_bytes;
    const float* scale = a.scale + r * a.ngroups + g0;
    const int8_t* zero = a.zero ? a.zero + r * a.ngroups + g0 : nullptr;
    float* ab = acc_buf + (r - r0) * kTokenBlock * 32;
    __m512 acc[S][2][MB];
    for (int m = 0; m < MB; ++m) {
      acc[0][0][m] = g0 ? _mm512_loadu_ps(ab + m * 32) : _mm512_setzero_ps();
      acc[0][1][m] = g0 ? _mm512_loadu_ps(ab + m * 32 + 16) : _mm512_setzero_ps();
      for (int u = 1; u < S; ++u) acc[u][0][m] = acc[u][1][m] = _mm512_setzero_ps();
    }
    auto step = [&](const GroupDecoder<BITS>& dec, const float* x, int u) LOWBIT_TARGET_AVX512 {
      __m512 c0, c1;
      dec.decode32(wp, c0, c1);
      for (int m = 0; m < MB; ++m) {
        acc[u][0][m] = _mm512_fmadd_ps(c0, _mm512_loadu_ps(x + m * K), acc[u][0][m]);
        acc[u][1][m] = _mm512_fmadd_ps(c1, _mm512_loadu_ps(x + m * K + 16), acc[u][1][m]);
      }
      wp += kStepBytes;
    };
    const float* x = x0;
    for (int64_t g = g0; g < g1; ++g) {
      const GroupDecoder<BITS> dec(scale++, zero ? zero++ : nullptr);
      for (int64_t line = 0; line < group_bytes; line += 64) __builtin_prefetch(wp + line + kPrefetchBytes);
      int64_t s = 0;
      for (; s + S <= steps; s += S)
        for (int u = 0; u < S; ++u, x += 32) step(dec, x, u);
      for (; s < steps; ++s, x += 32) step(dec, x, 0);
    }
    for (int m = 0; m < MB; ++m) {
      for (int u = 1; u < S; ++u) {
        acc[0][0][m] = _mm512_add_ps(acc[0][0][m], acc[u][0][m]);
        acc[0][1][m] = _mm512_add_ps(acc[0][1][m], acc[u][1][m]);
      }
      _mm512_storeu_ps(ab + m * 32, acc[0][0][m]);
      _mm512_storeu_ps(ab + m * 32 + 16, acc[0][1][m]);
    }
  }
}

// The 32 partial sums of a row and token, added as a tree: a plain loop is a chain of 32
// dependent scalar adds per row, about as long as a 576-column row's multiply-adds at one token.
LOWBIT_TARGET_AVX512 inline float sum32(const float* v) {
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(v), _mm512_loadu_ps(v + 16)));
}

template <int BITS, int MB>
void decode_rows(const LinearArgs& a, const float* xp, int64_t m0, int64_t r0, int64_t r1, float* acc_buf) {
  // K blocks whose MB rows of x take at most 32 KB, so x stays in L1 across the rows.
  const int64_t cols = (32 << 10) / (MB * 4);
  const int64_t groups_per_block = std::max<int64_t>(1, cols / a.group_size);
  for (int64_t g0 = 0; g0 < a.ngroups; g0 += groups_per_block)
    {const int64_t g1 = std::min(a.ngroups, g0 + groups_per_block);
    if (a.group_size == 64) decode_tile<BITS, MB, 2>(a, xp, m0, r0, r1, g0, g1, acc_buf);
    else if (a.group_size == 128) decode_tile<BITS, MB, 4>(a, xp, m0, r0, r1, g0, g1, acc_buf);
    else decode_tile<BITS, MB, 0>(a, xp, m0, r0, r1, g0, g1, acc_buf);}
  for (int64_t r = r0; r < r1; ++r)
    for (int m = 0; m < MB; ++m) a.out[(m0 + m) * a.N + r] = sum32(acc_buf + ((r - r0) * kTokenBlock + m) * 32);
}

template <int BITS>
void decode_linear(const LinearArgs& a, const float* xp) {
  constexpr int64_t kRowBlock = 16;
  at::parallel_for(0, a.N, fused_grain(a), [&](int64_t b, int64_t e) {
    alignas(64) float acc_buf[kRowBlock * kTokenBlock * 32];  // on the stack: no allocation per call
    for (int64_t r0 = b; r0 < e; r0 += kRowBlock) {
      const int64_t r1 = std::min(e, r0 + kRowBlock);
      int64_t m0 = 0;
      for (; m0 + 8 <= a.M; m0 += 8) decode_rows<BITS, 8>(a, xp, m0, r0, r1, acc_buf);
      if (m0 + 4 <= a.M) { decode_rows<BITS, 4>(a, xp, m0, r0, r1, acc_buf); m0 += 4; }
      if (m0 + 2 <= a.M) { decode_rows<BITS, 2>(a, xp, m0, r0, r1, acc_buf); m0 += 2; }
      if (m0 < a.M) decode_rows<BITS, 1>(a, xp, m0, r0, r1, acc_buf);
    }
  });
}

// true when it handled the call: 4 or 8 bits, groups of whole 32-column chunks, AVX-512.
bool avx512_linear(const LinearArgs& a, const at::Tensor& x, const at::Tensor& out) {
  if ( (a.bits != 4 && a.bits != 8) || a.group_size % 32) return false;
  const at::Tensor xp = prepare_x(a, x);
  const bool four = a.bits == 4;
  if (a.M <= kMaxDecodeTokens) four ? decode_linear<4>(a, xp.data_ptr<float>()) : decode_linear<8>(a, xp.data_ptr<float>());
  else tiled_linear(a, xp, out, four ? &dequantize_rows_avx512<4> : &dequantize_rows_avx512<8>);
  return true;
}
#endif

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                         const c10::optional<at::Tensor>& zero_point, int64_t bits,
                         int64_t group_size, const c10::optional<at::Tensor>& bias) {
  check_bits(bits);
  check_cpu(x, "x");
  check_cpu(packed, "packed");
  check_cpu(scale, "scale");
  check_cpu(zero_point, "zero_point");
  check_cpu(bias, "bias");
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() >= 1, "lowbit: x must have at least 1 dimension");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kInt, "lowbit: packed weight must be a 2-D int32 tensor, got ",
                   dtype_name(packed.scalar_type()));
  TORCH_CHECK_VALUE(packed.dim() == 2, "lowbit: packed weight must be a 2-D int32 tensor, got shape ", packed.sizes());
  check_float(scale, "scale");
  const bool has_zero = zero_point.has_value() && zero_point->defined();
  if (has_zero) check_integral(*zero_point, "zero_point");
  const int64_t K = x.size(-1), N = packed.size(0);
  TORCH_CHECK_VALUE(group_size > 0 && K % group_size == 0, "lowbit: group_size ", group_size,
              " must divide in_features ", K);
  TORCH_CHECK_VALUE(packed.size(1) == packed_words(K, bits), "lowbit: packed weight has ", packed.size(1),
              " words per row; ", K, " inputs at ", bits, " bits need ", packed_words(K, bits));
  const int64_t ngroups = K / group_size;
  check_shape(scale, {N, ngroups}, "scale ([out_features, in_features / group_size])");
  if (has_zero) check_shape(*zero_point, {N, ngroups}, "zero_point (the shape of scale)");
  check_bias(bias, N);

  const at::Tensor xf = x.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor wp = packed.contiguous();
  const at::Tensor sf = scale.to(at::kFloat).contiguous();
  // Zero points are read in place as int8 (PackedLinear's buffer: no per-call conversion of
  // N x ngroups values), converted only when given wider; those of <= 8-bit codes fit in int8.
  at::Tensor z8;
  if (has_zero) {
    z8 = zero_point->contiguous();
    if (z8.scalar_type() != at::kChar) {
      TORCH_CHECK_VALUE(z8.numel() == 0 || (z8.min().item<int64_t>() >= -128 && z8.max().item<int64_t>() <= 127),
                        "lowbit: zero_point values must fit in int8 ([-128, 127]; the ", bits, "-bit grid is [",
                        -(1 << (bits - 1)), ", ", (1 << (bits - 1)) - 1, "]), got ", z8.min().item<int64_t>(),
                        " .. ", z8.max().item<int64_t>());
      z8 = z8.to(at::kChar);
    }
  }
  const int64_t M = xf.size(0);
  at::Tensor out = at::empty({M, N}, xf.options());
  LinearArgs a{M, N, K, ngroups, group_size, packed.size(1), bits,
               reinterpret_cast<const uint8_t*>(wp.data_ptr<int32_t>()), sf.data_ptr<float>(),
               has_zero ? z8.data_ptr<int8_t>() : nullptr, out.data_ptr<float>(), bf16_gemm(x)};
  if (M == 0 || N == 0) return finish_linear(out, bias, x);
  const Isa isa = active_isa();
  bool done = false;
#ifdef LOWBIT_X86
  if (isa == Isa::avx512) done = avx512_linear(a, xf, out);
#endif
  if (!done) done = vector_linear(a, xf, out, isa);
  if (!done && M <= kMaxFusedTokensPortable) fused_linear_portable(a, xf.data_ptr<float>());
  else if (!done) tiled_linear(a, xf, out, &dequantize_rows_portable);
  return finish_linear(out, bias, x);
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) { m.impl("packed_linear", &packed_linear); }

}  // namespace lowbit
