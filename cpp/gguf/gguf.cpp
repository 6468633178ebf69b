// GGUF block quantization: the block formats of llama.cpp's ggml (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and
// the K-quants Q2_K .. Q6_K), written byte for byte as ggml_quantize_chunk writes them.
//
// Without importance weights the types quantize as ggml's reference quantizers do; with an
// importance vector (llama.cpp's imatrix: one mean per input column) as its importance-weighted
// quantizers do (Q8_0 has none and ignores it). Every sum, product, division and comparison is
// done in float in ggml's order (this file is compiled with -ffp-contract=off, so no fused
// multiply-adds either): a scale search that flips one comparison picks other codes, so the
// bytes are only equal if the rounding is. Rounding to an integer is ggml's: x + 1.5 * 2^23 in
// float, whose low mantissa bits are round-half-even(x) (garbage, but the same garbage, beyond
// 2^22); half precision conversions are IEEE round-to-nearest-even.
//
// Codes (gguf_grid / gguf_encode): each element's unsigned code q in [0, 2^bits - 1] on the
// affine grid of its sub-block, value = scale * q + offset (ggml's dequantized value exactly:
// every such product and sum of an fp16 scale and a small integer is exact in float).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <tuple>

#include "lowbit/common.h"

namespace lowbit {
namespace {

// ---------------------------------------------------------------- the formats

enum class Kind { q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k };

struct GgufType {
  Kind kind;
  const char* name;
  int block;  // elements per block
  int bytes;  // bytes per block
  int sub;    // elements per sub-block (one affine grid)
  int bits;   // bits per code
};

// Block sizes as ggml-common.h lays the structs out (no padding: fp16 fields sit at even offsets).
constexpr GgufType kTypes[] = {
    {Kind::q8_0, "Q8_0", 32, 34, 32, 8},    {Kind::q4_0, "Q4_0", 32, 18, 32, 4},
    {Kind::q4_1, "Q4_1", 32, 20, 32, 4},    {Kind::q5_0, "Q5_0", 32, 22, 32, 5},
    {Kind::q5_1, "Q5_1", 32, 24, 32, 5},    {Kind::q2_k, "Q2_K", 256, 84, 16, 2},
    {Kind::q3_k, "Q3_K", 256, 110, 16, 3},  {Kind::q4_k, "Q4_K", 256, 144, 32, 4},
    {Kind::q5_k, "Q5_K", 256, 176, 32, 5},  {Kind::q6_k, "Q6_K", 256, 210, 16, 6},
};

const GgufType& gguf_type(const std::string& name) {
  std::string upper(name);
  for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  for (const GgufType& t : kTypes)
    if (upper == t.name) return t;
  TORCH_CHECK_VALUE(false, "lowbit: unknown GGUF type '", name,
                    "'; expected one of Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K "
                    "(case-insensitive)");
  return kTypes[0];  // not reached
}

// cols must be a positive multiple of the type's block -> blocks per row.
int64_t checked_blocks(const GgufType& t, int64_t cols) {
  TORCH_CHECK_VALUE(cols > 0 && cols % t.block == 0, "lowbit: GGUF ", t.name, " stores rows in blocks of ",
                    t.block, " values, so cols must be a positive multiple of ", t.block, ", got ", cols,
                    t.block == 256 ? " (rows that are only a multiple of 32 need a 32-value type, e.g. Q4_0 or Q8_0)"
                                   : "");
  return cols / t.block;
}

// ---------------------------------------------------------------- arithmetic as ggml does it

constexpr float kGroupEps = 1e-15f;  // below this maximum a group counts as all zero

inline int nearest_int(float v) {
  const float t = v + 12582912.f;  // 1.5 * 2^23: the sum's last mantissa bits are the rounded integer
  int32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  return (bits & 0x007fffff) - 0x00400000;
}

// clamp(nearest_int(v), lo, hi) as a float (exact: nearest_int's results are below 2^22 in
// magnitude), in a form the compiler vectorises.
inline float nearest_clamped(float v, float lo, float hi) {
  float l = static_cast<float>(nearest_int(v));
  l = l > hi ? hi : l;
  return l < lo ? lo : l;
}

// A C cast float -> (u)int8 as x86 compilers emit it: truncation to int32 (the "integer
// indefinite" INT32_MIN when out of range or NaN), then the low byte.
inline int32_t trunc_i32(float v) {
  return (v > -2147483904.0f && v < 2147483648.0f) ? static_cast<int32_t>(v) : INT32_MIN;
}
inline int trunc_i8(float v) { return static_cast<int8_t>(static_cast<uint8_t>(trunc_i32(v) & 0xff)); }
inline int trunc_u8(float v) { return static_cast<uint8_t>(trunc_i32(v) & 0xff); }

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}
inline void put_half(uint8_t* p, float f) {
  const uint16_t h = c10::Half(f).x;
  std::memcpy(p, &h, 2);
}

// The value of largest magnitude among x[0..n) (the first one on ties; 0 when all are 0), as
// ggml's searches pick it: the sign sets the direction of their symmetric grids.
inline float largest_magnitude(const float* x, int n) {
  float amax = 0, vmax = 0;
  for (int i = 0; i < n; ++i) {
    const float a = std::fabs(x[i]);
    if (a > amax) {
      amax = a;
      vmax = x[i];
    }
  }
  return vmax;
}

// Scale of a symmetric grid l in [-nmax, nmax) weighted by w (x^2 without w): the scale at
// -nmax / (the signed value of largest magnitude), improved over 18 nearby grids by the weighted
// least-squares fit. L gets l + nmax. (ggml's make_qx_quants, rmse_type 1.) The 19 grids are
// independent, so their sums run side by side (each still adds its terms in element order) and
// ggml's sequential choice of the best is replayed over them.
float search_symmetric(int n, int nmax, const float* x, const float* w_in, int8_t* L) {
  const float vmax = largest_magnitude(x, n);
  if (std::fabs(vmax) < kGroupEps) {
    std::memset(L, 0, n);
    return 0.f;
  }
  constexpr int C = 20;  // the first grid, 18 more (steps -9..-1, 1..9), one spare lane
  float isc[C], sx[C] = {}, s2[C] = {};
  isc[0] = -nmax / vmax;
  for (int c = 1; c < 19; ++c) {
    const int step = c < 10 ? c - 10 : c - 9;
    isc[c] = -(nmax + 0.1f * step) / vmax;
  }
  isc[19] = isc[0];
  for (int i = 0; i < n; ++i) {
    const float xi = x[i], wi = w_in ? w_in[i] : xi * xi, wx = wi * xi;
    for (int c = 0; c < C; ++c) {
      const float l = nearest_clamped(isc[c] * xi, static_cast<float>(-nmax), static_cast<float>(nmax - 1));
      sx[c] += wx * l;
      s2[c] += wi * l * l;
    }
  }
  float scale = s2[0] ? sx[0] / s2[0] : 0.0f;
  float best = scale * sx[0];
  int chosen = 0;
  for (int c = 1; c < 19; ++c)
    if (s2[c] > 0 && sx[c] * sx[c] > best * s2[c]) {
      scale = sx[c] / s2[c];
      best = scale * sx[c];
      chosen = c;
    }
  for (int i = 0; i < n; ++i)
    L[i] = static_cast<int8_t>(nmax + std::max(-nmax, std::min(nmax - 1, nearest_int(isc[chosen] * x[i]))));
  return scale;
}

// Q3_K's reference search (make_q3_quants with rmse): the grid l in [-nmax, nmax) at -nmax / max,
// then up to five passes moving single codes while the x^2-weighted fit improves. L gets l + nmax.
float search_q3(int n, int nmax, const float* x, int8_t* L) {
  const float vmax = largest_magnitude(x, n);
  if (std::fabs(vmax) < kGroupEps) {
    std::memset(L, 0, n);
    return 0.f;
  }
  const float iscale = -nmax / vmax;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::max(-nmax, std::min(nmax - 1, nearest_int(iscale * x[i])));
    L[i] = static_cast<int8_t>(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * L[i];
      if (slx > 0) {
        float sl2 = suml2 - w * L[i] * L[i];
        int nl = nearest_int(x[i] * sl2 / slx);
        nl = std::max(-nmax, std::min(nmax - 1, nl));
        if (nl != L[i]) {
          slx += w * x[i] * nl;
          sl2 += w * nl * nl;
          if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<int8_t>(nl);
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (!changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// Affine grid (scale, min <= 0) with codes in [0, nmax] minimizing the w-weighted error (|err|
// with mad, else err^2) of each of K groups of n values (group b: xs[b], ws[b]; codes into
// Ls[b]): the min-max grid, then nstep + 1 grids of nmax + rmin + rdelta * step steps over the
// range, each refitted by weighted least squares; a better fit also moves the range's minimum for
// the later steps. -> scale[b], neg_min[b] = -min. (ggml's make_qkx2_quants / make_qkx3_quants
// with weights, for one group at a time.) The K groups run in lockstep, lane b holding group b,
// so their sums, which ggml adds in element order, advance side by side.
template <int K>
void search_affine(int n, int nmax, const float* const* xs, const float* const* ws, uint8_t* const* Ls, float* scale,
                   float* neg_min, float rmin, float rdelta, int nstep, bool mad) {
  const float fmax = static_cast<float>(nmax);
  float x[32 * K], w[32 * K];  // [i][b]
  float L[32 * K], aux[32 * K];  // codes, as floats
  for (int b = 0; b < K; ++b)
    for (int i = 0; i < n; ++i) {
      x[i * K + b] = xs[b][i];
      w[i * K + b] = ws[b][i];
    }
  float lo[K], hi[K], sum_w[K], sum_x[K];
  for (int b = 0; b < K; ++b) {
    lo[b] = hi[b] = x[b];
    sum_w[b] = w[b];
    sum_x[b] = sum_w[b] * x[b];
  }
  for (int i = 1; i < n; ++i)
    for (int b = 0; b < K; ++b) {
      const float v = x[i * K + b];
      lo[b] = v < lo[b] ? v : lo[b];
      hi[b] = v > hi[b] ? v : hi[b];
      sum_w[b] += w[i * K + b];
      sum_x[b] += w[i * K + b] * v;
    }
  bool flat[K];
  float isc[K], sc[K], best[K];
  for (int b = 0; b < K; ++b) {
    if (lo[b] > 0) lo[b] = 0;
    flat[b] = hi[b] <= lo[b];
    isc[b] = nmax / (hi[b] - lo[b]);
    sc[b] = 1 / isc[b];
    best[b] = 0;
  }
  for (int i = 0; i < n; ++i)
    for (int b = 0; b < K; ++b) {
      const float v = x[i * K + b];
      const float l = nearest_clamped(isc[b] * (v - lo[b]), 0.f, fmax);
      L[i * K + b] = l;
      float diff = sc[b] * l + lo[b] - v;
      diff = mad ? std::fabs(diff) : diff * diff;
      best[b] += w[i * K + b] * diff;
    }
  for (int step = 0; step <= nstep; ++step) {
    float sl[K] = {}, sl2[K] = {}, sxl[K] = {}, s[K], m[K], err[K] = {};
    for (int b = 0; b < K; ++b) isc[b] = (rmin + rdelta * step + nmax) / (hi[b] - lo[b]);
    for (int i = 0; i < n; ++i)
      for (int b = 0; b < K; ++b) {
        const float v = x[i * K + b];
        const float l = nearest_clamped(isc[b] * (v - lo[b]), 0.f, fmax);
        aux[i * K + b] = l;
        const float wl = w[i * K + b] * l;
        sl[b] += wl;
        sl2[b] += wl * l;
        sxl[b] += wl * v;
      }
    bool take[K];
    for (int b = 0; b < K; ++b) {
      const float D = sum_w[b] * sl2[b] - sl[b] * sl[b];
      take[b] = D > 0 && !flat[b];
      const float sv = (sum_w[b] * sxl[b] - sum_x[b] * sl[b]) / D;
      const float mv = (sl2[b] * sum_x[b] - sl[b] * sxl[b]) / D;
      s[b] = mv > 0 ? sxl[b] / sl2[b] : sv;  // a positive minimum: none, and the scale refitted alone
      m[b] = mv > 0 ? 0.f : mv;
    }
    for (int i = 0; i < n; ++i)
      for (int b = 0; b < K; ++b) {
        float diff = s[b] * aux[i * K + b] + m[b] - x[i * K + b];
        diff = mad ? std::fabs(diff) : diff * diff;
        err[b] += w[i * K + b] * diff;
      }
    bool any = false;
    for (int b = 0; b < K; ++b) {
      take[b] = take[b] && err[b] < best[b];
      if (take[b]) {
        best[b] = err[b];
        sc[b] = s[b];
        lo[b] = m[b];
        any = true;
      }
    }
    if (any)
      for (int i = 0; i < n; ++i)
        for (int b = 0; b < K; ++b) L[i * K + b] = take[b] ? aux[i * K + b] : L[i * K + b];
  }
  for (int b = 0; b < K; ++b) {
    for (int i = 0; i < n; ++i) Ls[b][i] = flat[b] ? 0 : static_cast<uint8_t>(L[i * K + b]);
    scale[b] = flat[b] ? 0.f : sc[b];
    neg_min[b] = -lo[b];
  }
}

// Scale of non-negative values x on codes [0, nmax], w-weighted (the K-quants' importance path
// quantizes its sub-block scales and mins this way: ggml's make_qp_quants).
float search_positive(int n, int nmax, const float* x, uint8_t* L, const float* w) {
  float hi = 0;
  for (int i = 0; i < n; ++i) hi = hi > x[i] ? hi : x[i];
  if (hi < kGroupEps) {
    std::memset(L, 0, n);
    return 0.f;
  }
  float iscale = nmax / hi;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nearest_int(iscale * x[i]));
  const float scale = 1 / iscale;
  float best = 0;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale * L[i];
    best += w[i] * diff * diff;
  }
  for (int step = -4; step <= 4; ++step) {
    if (step == 0) continue;
    const float iscale_s = (0.1f * step + nmax) / hi;
    const float scale_s = 1 / iscale_s;
    float err = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::min(nmax, nearest_int(iscale_s * x[i]));
      const float diff = x[i] - scale_s * l;
      err += w[i] * diff * diff;
    }
    if (err < best) {
      best = err;
      iscale = iscale_s;
    }
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::min(nmax, nearest_int(iscale * x[i]));
    L[i] = static_cast<uint8_t>(l);
    sumlx += w[i] * x[i] * l;
    suml2 += w[i] * l * l;
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      float slx = sumlx - w[i] * x[i] * L[i];
      float sl2 = suml2 - w[i] * L[i] * L[i];
      if (slx > 0 && sl2 > 0) {
        const int nl = std::min(nmax, nearest_int(x[i] * sl2 / slx));
        if (nl != L[i]) {
          slx += w[i] * x[i] * nl;
          sl2 += w[i] * nl * nl;
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<uint8_t>(nl);
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (!changed) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// ---------------------------------------------------------------- code layout
// Field offsets inside one block (ggml-common.h):
//   Q8_0  d | qs[32] int8                 Q4_0  d | qs[16]         Q4_1  d m | qs[16]
//   Q5_0  d | qh[4] | qs[16]              Q5_1  d m | qh[4] | qs[16]
//   Q2_K  scales[16] | qs[64] | d dmin    Q3_K  hmask[32] | qs[64] | scales[12] | d
//   Q4_K  d dmin | scales[12] | qs[128]   Q5_K  d dmin | scales[12] | qh[32] | qs[128]
//   Q6_K  ql[128] | qh[64] | scales[16] int8 | d

// The codes of one block in element order.
void unpack_codes(Kind k, const uint8_t* b, uint8_t* q) {
  switch (k) {
    case Kind::q8_0:
      for (int i = 0; i < 32; ++i) q[i] = static_cast<uint8_t>(b[2 + i] ^ 0x80);
      break;
    case Kind::q4_0:
    case Kind::q4_1: {
      const uint8_t* qs = b + (k == Kind::q4_0 ? 2 : 4);
      for (int j = 0; j < 16; ++j) {
        q[j] = qs[j] & 0xF;
        q[j + 16] = qs[j] >> 4;
      }
      break;
    }
    case Kind::q5_0:
    case Kind::q5_1: {
      const uint8_t* p = b + (k == Kind::q5_0 ? 2 : 4);
      uint32_t qh;
      std::memcpy(&qh, p, 4);
      const uint8_t* qs = p + 4;
      for (int j = 0; j < 16; ++j) {
        q[j] = static_cast<uint8_t>((qs[j] & 0xF) | (((qh >> j) & 1) << 4));
        q[j + 16] = static_cast<uint8_t>((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
      }
      break;
    }
    case Kind::q2_k:
    case Kind::q3_k: {
      const uint8_t* qs = b + (k == Kind::q2_k ? 16 : 32);
      for (int e = 0; e < 256; ++e) q[e] = (qs[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3;
      if (k == Kind::q3_k)
        for (int e = 0; e < 256; ++e) q[e] = static_cast<uint8_t>(q[e] | (((b[e % 32] >> (e / 32)) & 1) << 2));
      break;
    }
    case Kind::q4_k:
    case Kind::q5_k: {
      const uint8_t* qs = b + (k == Kind::q4_k ? 16 : 48);
      for (int e = 0; e < 256; ++e) {
        const int c = e / 64, r = e % 64, l = r % 32;
        q[e] = r < 32 ? qs[c * 32 + l] & 0xF : qs[c * 32 + l] >> 4;
        if (k == Kind::q5_k) q[e] = static_cast<uint8_t>(q[e] | (((b[16 + l] >> (2 * c + r / 32)) & 1) << 4));
      }
      break;
    }
    case Kind::q6_k:
      for (int e = 0; e < 256; ++e) {
        const int c = e / 128, g = (e % 128) / 32, l = e % 32;
        const uint8_t lo = b[c * 64 + (g & 1) * 32 + l];
        const int hi = (b[128 + c * 32 + l] >> (2 * g)) & 3;
        q[e] = static_cast<uint8_t>((g < 2 ? lo & 0xF : lo >> 4) | (hi << 4));
      }
      break;
  }
}

// Writes the codes q (element order, each in [0, 2^bits)) into the block's code fields; the
// headers (d, dmin, m, sub-block scales) are not touched.
void pack_codes(Kind k, uint8_t* b, const uint8_t* q) {
  switch (k) {
    case Kind::q8_0:
      for (int i = 0; i < 32; ++i) b[2 + i] = static_cast<uint8_t>(q[i] ^ 0x80);
      break;
    case Kind::q4_0:
    case Kind::q4_1: {
      uint8_t* qs = b + (k == Kind::q4_0 ? 2 : 4);
      for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
      break;
    }
    case Kind::q5_0:
    case Kind::q5_1: {
      uint8_t* p = b + (k == Kind::q5_0 ? 2 : 4);
      uint32_t qh = 0;
      for (int j = 0; j < 16; ++j) {
        p[4 + j] = static_cast<uint8_t>((q[j] & 0xF) | ((q[j + 16] & 0xF) << 4));
        qh |= static_cast<uint32_t>((q[j] >> 4) & 1) << j;
        qh |= static_cast<uint32_t>((q[j + 16] >> 4) & 1) << (j + 16);
      }
      std::memcpy(p, &qh, 4);
      break;
    }
    case Kind::q2_k:
    case Kind::q3_k: {
      uint8_t* qs = b + (k == Kind::q2_k ? 16 : 32);
      for (int c = 0; c < 2; ++c)
        for (int l = 0; l < 32; ++l) {
          const uint8_t* s = q + c * 128 + l;
          qs[c * 32 + l] =
              static_cast<uint8_t>((s[0] & 3) | ((s[32] & 3) << 2) | ((s[64] & 3) << 4) | ((s[96] & 3) << 6));
        }
      if (k == Kind::q3_k) {
        std::memset(b, 0, 32);
        for (int e = 0; e < 256; ++e) b[e % 32] = static_cast<uint8_t>(b[e % 32] | (((q[e] >> 2) & 1) << (e / 32)));
      }
      break;
    }
    case Kind::q4_k:
    case Kind::q5_k: {
      uint8_t* qs = b + (k == Kind::q4_k ? 16 : 48);
      for (int c = 0; c < 4; ++c)
        for (int l = 0; l < 32; ++l)
          qs[c * 32 + l] = static_cast<uint8_t>((q[c * 64 + l] & 0xF) | ((q[c * 64 + 32 + l] & 0xF) << 4));
      if (k == Kind::q5_k) {
        uint8_t* qh = b + 16;
        std::memset(qh, 0, 32);
        for (int e = 0; e < 256; ++e) {
          const int c = e / 64, r = e % 64;
          qh[r % 32] = static_cast<uint8_t>(qh[r % 32] | (((q[e] >> 4) & 1) << (2 * c + r / 32)));
        }
      }
      break;
    }
    case Kind::q6_k:
      for (int c = 0; c < 2; ++c)
        for (int l = 0; l < 32; ++l) {
          const uint8_t* s = q + c * 128 + l;
          b[c * 64 + l] = static_cast<uint8_t>((s[0] & 0xF) | ((s[64] & 0xF) << 4));
          b[c * 64 + 32 + l] = static_cast<uint8_t>((s[32] & 0xF) | ((s[96] & 0xF) << 4));
          b[128 + c * 32 + l] = static_cast<uint8_t>(((s[0] >> 4) & 3) | (((s[32] >> 4) & 3) << 2) |
                                                     (((s[64] >> 4) & 3) << 4) | (((s[96] >> 4) & 3) << 6));
        }
      break;
  }
}

// The 6-bit scale and min of Q4_K / Q5_K sub-block j (of 8), packed in 12 bytes.
inline void k4_scale_min(int j, const uint8_t* s, int* sc, int* m) {
  if (j < 4) {
    *sc = s[j] & 63;
    *m = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}
inline void k4_put_scale_min(int j, uint8_t* s, uint8_t ls, uint8_t lm) {
  if (j < 4) {
    s[j] = ls;
    s[j + 4] = lm;
  } else {
    s[j + 4] = static_cast<uint8_t>((ls & 0xF) | ((lm & 0xF) << 4));
    s[j - 4] = static_cast<uint8_t>(s[j - 4] | ((ls >> 4) << 6));
    s[j] = static_cast<uint8_t>(s[j] | ((lm >> 4) << 6));
  }
}

// The signed 6-bit scale of Q3_K sub-block j (of 16): its stored value - 32.
inline int q3_scale(int j, const uint8_t* s) {
  const int lo = j < 8 ? s[j] & 0xF : s[j - 8] >> 4;
  return static_cast<int8_t>((lo | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) - 32);
}
// Stores sub-block j's 6-bit value l (0..63); the 12 bytes start zeroed.
inline void q3_put_scale(int j, uint8_t* s, int l) {
  if (j < 8) s[j] = static_cast<uint8_t>(l & 0xF);
  else s[j - 8] = static_cast<uint8_t>(s[j - 8] | ((l & 0xF) << 4));
  s[8 + j % 4] = static_cast<uint8_t>(s[8 + j % 4] | ((l >> 4) << (2 * (j / 4))));
}

// Each sub-block's grid: value = scale[s] * q + offset[s].
void block_grid(Kind k, const uint8_t* b, float* scale, float* offset) {
  switch (k) {
    case Kind::q8_0:
    case Kind::q4_0:
    case Kind::q5_0: {
      const float d = half_to_float(b);
      scale[0] = d;
      offset[0] = (k == Kind::q8_0 ? -128.0f : k == Kind::q4_0 ? -8.0f : -16.0f) * d;
      break;
    }
    case Kind::q4_1:
    case Kind::q5_1:
      scale[0] = half_to_float(b);
      offset[0] = half_to_float(b + 2);
      break;
    case Kind::q2_k: {
      const float d = half_to_float(b + 80), dmin = half_to_float(b + 82);
      for (int j = 0; j < 16; ++j) {
        scale[j] = d * (b[j] & 0xF);
        offset[j] = -(dmin * (b[j] >> 4));
      }
      break;
    }
    case Kind::q3_k: {
      const float d = half_to_float(b + 108);
      for (int j = 0; j < 16; ++j) {
        scale[j] = d * q3_scale(j, b + 96);
        offset[j] = -4.0f * scale[j];
      }
      break;
    }
    case Kind::q4_k:
    case Kind::q5_k: {
      const float d = half_to_float(b), dmin = half_to_float(b + 2);
      for (int j = 0; j < 8; ++j) {
        int sc, m;
        k4_scale_min(j, b + 4, &sc, &m);
        scale[j] = d * sc;
        offset[j] = -(dmin * m);
      }
      break;
    }
    case Kind::q6_k: {
      const float d = half_to_float(b + 208);
      for (int j = 0; j < 16; ++j) {
        scale[j] = d * static_cast<int8_t>(b[192 + j]);
        offset[j] = -32.0f * scale[j];
      }
      break;
    }
  }
}

// One block dequantized with ggml's dequantize_row_* arithmetic.
void dequantize_block(Kind k, const uint8_t* b, float* y) {
  uint8_t q[256];
  unpack_codes(k, b, q);
  switch (k) {
    case Kind::q8_0: {
      const float d = half_to_float(b);
      for (int i = 0; i < 32; ++i) y[i] = static_cast<int8_t>(b[2 + i]) * d;
      break;
    }
    case Kind::q4_0:
    case Kind::q5_0: {
      const float d = half_to_float(b);
      const int zero = k == Kind::q4_0 ? 8 : 16;
      for (int i = 0; i < 32; ++i) y[i] = (q[i] - zero) * d;
      break;
    }
    case Kind::q4_1:
    case Kind::q5_1: {
      const float d = half_to_float(b), m = half_to_float(b + 2);
      for (int i = 0; i < 32; ++i) y[i] = q[i] * d + m;
      break;
    }
    case Kind::q2_k: {
      const float d = half_to_float(b + 80), dmin = half_to_float(b + 82);
      for (int e = 0; e < 256; ++e) {
        const uint8_t sc = b[e / 16];
        const float dl = d * (sc & 0xF), ml = dmin * (sc >> 4);
        y[e] = dl * q[e] - ml;
      }
      break;
    }
    case Kind::q3_k: {
      const float d = half_to_float(b + 108);
      for (int e = 0; e < 256; ++e) y[e] = (d * q3_scale(e / 16, b + 96)) * (q[e] - 4);
      break;
    }
    case Kind::q4_k:
    case Kind::q5_k: {
      const float d = half_to_float(b), dmin = half_to_float(b + 2);
      for (int j = 0; j < 8; ++j) {
        int sc, m;
        k4_scale_min(j, b + 4, &sc, &m);
        const float d1 = d * sc, m1 = dmin * m;
        for (int i = 0; i < 32; ++i) y[32 * j + i] = d1 * q[32 * j + i] - m1;
      }
      break;
    }
    case Kind::q6_k: {
      const float d = half_to_float(b + 208);
      for (int e = 0; e < 256; ++e) y[e] = d * static_cast<int8_t>(b[192 + e / 16]) * (q[e] - 32);
      break;
    }
  }
}

// ---------------------------------------------------------------- quantizers
// Each quantizes one row x[0, n) (n a multiple of the block) into out; qw: the importance of
// each column, or null for ggml's reference quantizer.

float sum_squares(const float* x, int64_t n) {
  float s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}

void quantize_q8_0(const float* x, int64_t n, const float*, uint8_t* out) {
  for (int64_t ib = 0; ib < n / 32; ++ib, x += 32, out += 34) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) {
      const float a = std::fabs(x[j]);
      amax = amax > a ? amax : a;
    }
    const float d = amax / 127;
    const float id = d ? 1.0f / d : 0.0f;
    put_half(out, d);
    for (int j = 0; j < 32; ++j) out[2 + j] = static_cast<uint8_t>(trunc_i8(std::round(x[j] * id)));
  }
}

// Q4_0 / Q5_0 (nmax 8 / 16): the signed value of largest magnitude maps to -nmax.
void quantize_q40_q50(const float* x, int64_t n, const float* qw, uint8_t* out, int nmax) {
  const Kind k = nmax == 8 ? Kind::q4_0 : Kind::q5_0;
  const int bytes = nmax == 8 ? 18 : 22;
  uint8_t q[32];
  if (qw) {
    const float sigma2 = sum_squares(x, n) / n;
    float w[32];
    int8_t L[32];
    for (int64_t ib = 0; ib < n / 32; ++ib, x += 32, qw += 32, out += bytes) {
      for (int j = 0; j < 32; ++j) w[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
      put_half(out, search_symmetric(32, nmax, x, w, L));
      for (int j = 0; j < 32; ++j) q[j] = static_cast<uint8_t>(L[j]);
      pack_codes(k, out, q);
    }
    return;
  }
  for (int64_t ib = 0; ib < n / 32; ++ib, x += 32, out += bytes) {
    const float d = largest_magnitude(x, 32) / -nmax;
    const float id = d ? 1.0f / d : 0.0f;
    put_half(out, d);
    const float bias = nmax + 0.5f;  // 8.5f / 16.5f
    for (int j = 0; j < 32; ++j) q[j] = static_cast<uint8_t>(std::min(2 * nmax - 1, trunc_i8(x[j] * id + bias)));
    pack_codes(k, out, q);
  }
}

// Q4_1 / Q5_1 (nmax 15 / 31): codes over [min, max].
void quantize_q41_q51(const float* x, int64_t n, const float* qw, uint8_t* out, int nmax) {
  const Kind k = nmax == 15 ? Kind::q4_1 : Kind::q5_1;
  const int bytes = nmax == 15 ? 20 : 24;
  uint8_t q[32];
  if (qw) {
    // Eight blocks at a time through the lockstep search (a short last group repeats its first block).
    const float sigma2 = sum_squares(x, n) / n;
    const int64_t nb = n / 32;
    float w[8 * 32], d[8], neg_min[8];
    uint8_t codes[8 * 32];
    const float* xs[8];
    const float* ws[8];
    uint8_t* Ls[8];
    for (int64_t g = 0; g < nb; g += 8) {
      const int cnt = static_cast<int>(std::min<int64_t>(8, nb - g));
      for (int b = 0; b < 8; ++b) {
        const int64_t ib = g + (b < cnt ? b : 0);
        xs[b] = x + 32 * ib;
        ws[b] = w + 32 * b;
        Ls[b] = codes + 32 * b;
        for (int j = 0; j < 32; ++j) w[32 * b + j] = qw[32 * ib + j] * std::sqrt(sigma2 + xs[b][j] * xs[b][j]);
      }
      search_affine<8>(32, nmax, xs, ws, Ls, d, neg_min, -0.9f, 0.05f, 36, false);
      for (int b = 0; b < cnt; ++b) {
        uint8_t* o = out + (g + b) * bytes;
        put_half(o, d[b]);
        put_half(o + 2, -neg_min[b]);
        pack_codes(k, o, Ls[b]);
      }
    }
    return;
  }
  for (int64_t ib = 0; ib < n / 32; ++ib, x += 32, out += bytes) {
    float lo = FLT_MAX, hi = -FLT_MAX;
    for (int j = 0; j < 32; ++j) {
      if (x[j] < lo) lo = x[j];
      if (x[j] > hi) hi = x[j];
    }
    const float d = (hi - lo) / nmax;
    const float id = d ? 1.0f / d : 0.0f;
    put_half(out, d);
    put_half(out + 2, lo);
    for (int j = 0; j < 32; ++j) {
      const float v = (x[j] - lo) * id + 0.5f;
      // Q4_1 clamps to 15 as a signed byte; Q5_1 takes the unsigned byte's low five bits.
      q[j] = static_cast<uint8_t>(nmax == 15 ? std::min(15, trunc_i8(v)) : trunc_u8(v) & 31);
    }
    pack_codes(k, out, q);
  }
}

// Re-derives the codes of the sub-blocks whose stored scale is non-zero: l = round((x + m) / d)
// on [0, nmax] (Q2_K / Q4_K / Q5_K) from the scales as stored; the others keep the search's codes.
inline void requantize_affine(const float* x, int sub, int nmax, float d, float m, uint8_t* L) {
  if (!d) return;
  for (int i = 0; i < sub; ++i) L[i] = static_cast<uint8_t>(std::max(0, std::min(nmax, nearest_int((x[i] + m) / d))));
}
// ... and l = round(x / d) on [-half, half) stored as l + half (Q3_K / Q6_K).
inline void requantize_symmetric(const float* x, int sub, int half, float d, uint8_t* L) {
  if (!d) return;
  for (int i = 0; i < sub; ++i)
    L[i] = static_cast<uint8_t>(std::max(-half, std::min(half - 1, nearest_int(x[i] / d))) + half);
}

void quantize_q2_k(const float* x, int64_t n, const float* qw, uint8_t* out) {
  uint8_t L[256];
  float scales[16], mins[16], w[256];
  const float* xs[16];
  const float* ws[16];
  uint8_t* Lp[16];
  for (int j = 0; j < 16; ++j) {
    ws[j] = w + 16 * j;
    Lp[j] = L + 16 * j;
  }
  for (int64_t ib = 0; ib < n / 256; ++ib, x += 256, out += 84) {
    uint8_t* sc = out;
    for (int j = 0; j < 16; ++j) xs[j] = x + 16 * j;
    if (!qw) {
      float max_scale = 0, max_min = 0;
      for (int l = 0; l < 256; ++l) w[l] = std::fabs(x[l]);
      search_affine<16>(16, 3, xs, ws, Lp, scales, mins, -0.5f, 0.1f, 15, true);
      for (int j = 0; j < 16; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
      }
      if (max_scale > 0) {
        const float iscale = 15.f / max_scale;
        for (int j = 0; j < 16; ++j) sc[j] = static_cast<uint8_t>(nearest_int(iscale * scales[j]));
        put_half(out + 80, max_scale / 15.f);
      } else {
        std::memset(sc, 0, 16);
        put_half(out + 80, 0.f);
      }
      if (max_min > 0) {
        const float iscale = 15.f / max_min;
        for (int j = 0; j < 16; ++j) sc[j] = static_cast<uint8_t>(sc[j] | (nearest_int(iscale * mins[j]) << 4));
        put_half(out + 82, max_min / 15.f);
      } else {
        put_half(out + 82, 0.f);
      }
    } else {
      const float sigma2 = sum_squares(x, 256) / 256;
      const float* qb = qw + 256 * ib;
      float sw[16];
      uint8_t Ls[16], Lm[16];
      for (int j = 0; j < 16; ++j) {
        for (int l = 0; l < 16; ++l) w[16 * j + l] = qb[16 * j + l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
        sw[j] = 0;
        for (int l = 0; l < 16; ++l) sw[j] += w[16 * j + l];
      }
      search_affine<16>(16, 3, xs, ws, Lp, scales, mins, -0.9f, 0.05f, 36, false);
      const float dm = search_positive(16, 15, scales, Ls, sw);
      const float mm = search_positive(16, 15, mins, Lm, sw);
      put_half(out + 80, dm);
      put_half(out + 82, mm);
      for (int j = 0; j < 16; ++j) sc[j] = static_cast<uint8_t>(Ls[j] | (Lm[j] << 4));
    }
    const float d = half_to_float(out + 80), dmin = half_to_float(out + 82);
    for (int j = 0; j < 16; ++j)
      requantize_affine(x + 16 * j, 16, 3, d * (sc[j] & 0xF), dmin * (sc[j] >> 4), L + 16 * j);
    pack_codes(Kind::q2_k, out, L);
  }
}

void quantize_q3_k(const float* x, int64_t n, const float* qw, uint8_t* out) {
  int8_t L[256];
  float scales[16];
  for (int64_t ib = 0; ib < n / 256; ++ib, x += 256, out += 110) {
    uint8_t* sc = out + 96;
    std::memset(sc, 0, 12);
    if (!qw) {
      for (int j = 0; j < 16; ++j) scales[j] = search_q3(16, 4, x + 16 * j, L + 16 * j);
      const float max_scale = largest_magnitude(scales, 16);
      if (max_scale) {
        const float iscale = -32.f / max_scale;
        for (int j = 0; j < 16; ++j) {
          const int l = static_cast<int8_t>(nearest_int(iscale * scales[j]));
          q3_put_scale(j, sc, std::max(-32, std::min(31, l)) + 32);
        }
        put_half(out + 108, 1 / iscale);
      } else {
        put_half(out + 108, 0.f);
      }
    } else {
      const float sigma2 = 2 * sum_squares(x, 256) / 256;
      const float* qb = qw + 256 * ib;
      float w[16], sw[16];
      int8_t Ls[16];
      for (int j = 0; j < 16; ++j) {
        for (int l = 0; l < 16; ++l) w[l] = qb[16 * j + l] * std::sqrt(sigma2 + x[16 * j + l] * x[16 * j + l]);
        float sumw = 0;
        for (int l = 0; l < 16; ++l) sumw += w[l];
        sw[j] = sumw;
        scales[j] = search_symmetric(16, 4, x + 16 * j, w, L + 16 * j);
      }
      const float d_block = search_symmetric(16, 32, scales, sw, Ls);
      for (int j = 0; j < 16; ++j) q3_put_scale(j, sc, Ls[j]);
      put_half(out + 108, d_block);
    }
    const float d_all = half_to_float(out + 108);
    uint8_t q[256];
    for (int e = 0; e < 256; ++e) q[e] = static_cast<uint8_t>(L[e]);
    for (int j = 0; j < 16; ++j) requantize_symmetric(x + 16 * j, 16, 4, d_all * q3_scale(j, sc), q + 16 * j);
    pack_codes(Kind::q3_k, out, q);
  }
}

// Q4_K / Q5_K (nmax 15 / 31): 8 sub-blocks of 32 with 6-bit scales and mins.
void quantize_q4_q5_k(const float* x, int64_t n, const float* qw, uint8_t* out, int nmax) {
  const Kind k = nmax == 15 ? Kind::q4_k : Kind::q5_k;
  const int bytes = nmax == 15 ? 144 : 176;
  uint8_t L[256];
  float scales[8], mins[8], w[256];
  const float* xs[8];
  const float* ws[8];
  uint8_t* Lp[8];
  for (int j = 0; j < 8; ++j) {
    ws[j] = w + 32 * j;
    Lp[j] = L + 32 * j;
  }
  for (int64_t ib = 0; ib < n / 256; ++ib, x += 256, out += bytes) {
    uint8_t* sc = out + 4;
    for (int j = 0; j < 8; ++j) xs[j] = x + 32 * j;
    if (!qw) {
      float max_scale = 0, max_min = 0;
      for (int j = 0; j < 8; ++j) {
        const float av_x = std::sqrt(sum_squares(xs[j], 32) / 32);
        for (int l = 0; l < 32; ++l) w[32 * j + l] = av_x + std::fabs(xs[j][l]);
      }
      if (nmax == 15) search_affine<8>(32, 15, xs, ws, Lp, scales, mins, -1.f, 0.1f, 20, false);
      else search_affine<8>(32, 31, xs, ws, Lp, scales, mins, -0.5f, 0.1f, 15, false);
      for (int j = 0; j < 8; ++j) {
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
      }
      const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
      const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
      for (int j = 0; j < 8; ++j) {
        uint8_t ls = static_cast<uint8_t>(nearest_int(inv_scale * scales[j]));
        uint8_t lm = static_cast<uint8_t>(nearest_int(inv_min * mins[j]));
        ls = std::min<uint8_t>(63, ls);
        lm = std::min<uint8_t>(63, lm);
        k4_put_scale_min(j, sc, ls, lm);
      }
      put_half(out, max_scale / 63.f);
      put_half(out + 2, max_min / 63.f);
    } else {
      const float sigma2 = 2 * sum_squares(x, 256) / 256;
      const float* qb = qw + 256 * ib;
      float sw[8];
      uint8_t Ls[8], Lm[8];
      for (int j = 0; j < 8; ++j) {
        for (int l = 0; l < 32; ++l) w[32 * j + l] = qb[32 * j + l] * std::sqrt(sigma2 + x[32 * j + l] * x[32 * j + l]);
        float sumw = 0;
        for (int l = 0; l < 32; ++l) sumw += w[32 * j + l];
        sw[j] = sumw;
      }
      search_affine<8>(32, nmax, xs, ws, Lp, scales, mins, -0.9f, 0.05f, 36, false);
      const float d_block = search_positive(8, 63, scales, Ls, sw);
      const float m_block = search_positive(8, 63, mins, Lm, sw);
      for (int j = 0; j < 8; ++j) {
        // Q5_K clamps the codes to 63 here, Q4_K does not (the search never exceeds nmax 63 anyway).
        const uint8_t ls = nmax == 31 ? std::min<uint8_t>(63, Ls[j]) : Ls[j];
        const uint8_t lm = nmax == 31 ? std::min<uint8_t>(63, Lm[j]) : Lm[j];
        k4_put_scale_min(j, sc, ls, lm);
      }
      put_half(out, d_block);
      put_half(out + 2, m_block);
    }
    const float d = half_to_float(out), dmin = half_to_float(out + 2);
    for (int j = 0; j < 8; ++j) {
      int s, m;
      k4_scale_min(j, sc, &s, &m);
      requantize_affine(x + 32 * j, 32, nmax, d * s, dmin * m, L + 32 * j);
    }
    pack_codes(k, out, L);
  }
}

void quantize_q6_k(const float* x, int64_t n, const float* qw, uint8_t* out) {
  int8_t L[256];
  float scales[16];
  for (int64_t ib = 0; ib < n / 256; ++ib, x += 256, out += 210) {
    for (int j = 0; j < 16; ++j)
      scales[j] = search_symmetric(16, 32, x + 16 * j, qw ? qw + 256 * ib + 16 * j : nullptr, L + 16 * j);
    const float max_scale = largest_magnitude(scales, 16);
    if (std::fabs(max_scale) < kGroupEps) {
      std::memset(out, 0, 210);
      put_half(out + 208, 0.f);
      continue;
    }
    const float iscale = -128.f / max_scale;
    put_half(out + 208, 1 / iscale);
    for (int j = 0; j < 16; ++j) out[192 + j] = static_cast<uint8_t>(std::min(127, nearest_int(iscale * scales[j])));
    const float d = half_to_float(out + 208);
    uint8_t q[256];
    for (int e = 0; e < 256; ++e) q[e] = static_cast<uint8_t>(L[e]);
    for (int j = 0; j < 16; ++j)
      requantize_symmetric(x + 16 * j, 16, 32, d * static_cast<int8_t>(out[192 + j]), q + 16 * j);
    pack_codes(Kind::q6_k, out, q);
  }
}

void quantize_row(Kind k, const float* x, int64_t n, const float* qw, uint8_t* out) {
  switch (k) {
    case Kind::q8_0: return quantize_q8_0(x, n, qw, out);
    case Kind::q4_0: return quantize_q40_q50(x, n, qw, out, 8);
    case Kind::q5_0: return quantize_q40_q50(x, n, qw, out, 16);
    case Kind::q4_1: return quantize_q41_q51(x, n, qw, out, 15);
    case Kind::q5_1: return quantize_q41_q51(x, n, qw, out, 31);
    case Kind::q2_k: return quantize_q2_k(x, n, qw, out);
    case Kind::q3_k: return quantize_q3_k(x, n, qw, out);
    case Kind::q4_k: return quantize_q4_q5_k(x, n, qw, out, 15);
    case Kind::q5_k: return quantize_q4_q5_k(x, n, qw, out, 31);
    case Kind::q6_k: return quantize_q6_k(x, n, qw, out);
  }
}

// ---------------------------------------------------------------- ops

// x * 0 is NaN exactly for NaN and Inf, and a NaN survives the sum (a loop the compiler vectorises).
bool all_finite(const float* x, int64_t n) {
  float poison = 0.0f;
  for (int64_t i = 0; i < n; ++i) poison += x[i] * 0.0f;
  return poison == 0.0f;
}

// fn(r) for every row, in parallel tasks of about `work` elements each.
template <typename F>
void for_rows(int64_t rows, int64_t cols, int64_t work, const F& fn) {
  at::parallel_for(0, rows, std::max<int64_t>(1, work / std::max<int64_t>(cols, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) fn(r);
  });
}

// A [rows, row_bytes] uint8 block tensor for cols values per row -> blocks per row.
int64_t check_block_tensor(const at::Tensor& blocks, const GgufType& t, int64_t cols, const char* name) {
  check_cpu(blocks, name);
  check_dtype(blocks, at::kByte, name);
  TORCH_CHECK_VALUE(blocks.dim() == 2, "lowbit: ", name,
                    " must be 2-D [rows, row_bytes] (the GGUF bytes of each row), got shape ", blocks.sizes());
  const int64_t nb = checked_blocks(t, cols);
  TORCH_CHECK_VALUE(blocks.size(1) == nb * t.bytes, "lowbit: ", name, " must have ", nb * t.bytes,
                    " bytes per row for ", cols, " values of GGUF ", t.name, " (", nb, " blocks of ", t.bytes,
                    " bytes), got ", blocks.size(1));
  return nb;
}

at::Tensor gguf_quantize(const at::Tensor& weight, std::string type, const c10::optional<at::Tensor>& importance) {
  const GgufType& t = gguf_type(type);
  check_cpu(weight, "weight");
  check_float(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2, "lowbit: weight must be 2-D [rows, cols], got shape ", weight.sizes());
  const int64_t rows = weight.size(0), cols = weight.size(1);
  const int64_t nb = checked_blocks(t, cols);
  at::Tensor qw;
  if (importance.has_value() && importance->defined()) {
    check_cpu(*importance, "importance");
    check_dtype(*importance, at::kFloat, "importance");
    TORCH_CHECK_VALUE(importance->dim() == 1 && importance->size(0) == cols, "lowbit: importance must have shape [",
                      cols, "] (one value per input column), got ", importance->sizes());
    qw = importance->contiguous();
    TORCH_CHECK_VALUE(at::isfinite(qw).all().item<bool>() && (qw >= 0).all().item<bool>(),
                      "lowbit: importance must be finite and >= 0 (llama.cpp's imatrix means of squared activations)");
  }
  at::Tensor out = at::empty({rows, nb * t.bytes}, weight.options().dtype(at::kByte));
  if (rows == 0) return out;
  const at::Tensor x = weight.to(at::kFloat).contiguous();
  const float* xp = x.data_ptr<float>();
  const float* qp = qw.defined() ? qw.data_ptr<float>() : nullptr;
  uint8_t* op = out.data_ptr<uint8_t>();
  const int64_t row_bytes = nb * t.bytes;
  std::atomic<bool> finite{true};
  for_rows(rows, cols, 1 << 14, [&](int64_t r) {
    const float* xr = xp + r * cols;
    if (!all_finite(xr, cols)) finite = false;
    else quantize_row(t.kind, xr, cols, qp, op + r * row_bytes);
  });
  TORCH_CHECK_VALUE(finite, "lowbit: weight contains NaN or Inf values; GGUF blocks need finite values");
  return out;
}

at::Tensor gguf_dequantize(const at::Tensor& blocks_in, std::string type, int64_t cols, at::ScalarType dtype) {
  const GgufType& t = gguf_type(type);
  TORCH_CHECK_TYPE(is_float(dtype), "lowbit: dtype must be float32, float16 or bfloat16, got ", dtype_name(dtype));
  const int64_t nb = check_block_tensor(blocks_in, t, cols, "blocks");
  const int64_t rows = blocks_in.size(0);
  at::Tensor out = at::empty({rows, cols}, blocks_in.options().dtype(at::kFloat));
  if (rows > 0) {
    const at::Tensor blocks = blocks_in.contiguous();
    const uint8_t* bp = blocks.data_ptr<uint8_t>();
    float* op = out.data_ptr<float>();
    for_rows(rows, cols, 1 << 16, [&](int64_t r) {
      for (int64_t i = 0; i < nb; ++i)
        dequantize_block(t.kind, bp + (r * nb + i) * t.bytes, op + r * cols + i * t.block);
    });
  }
  return dtype == at::kFloat ? out : out.to(dtype);
}

std::tuple<at::Tensor, at::Tensor> gguf_grid(const at::Tensor& blocks_in, std::string type, int64_t cols) {
  const GgufType& t = gguf_type(type);
  const int64_t nb = check_block_tensor(blocks_in, t, cols, "blocks");
  const int64_t rows = blocks_in.size(0), subs = cols / t.sub, per_block = t.block / t.sub;
  at::Tensor scale = at::empty({rows, subs}, blocks_in.options().dtype(at::kFloat));
  at::Tensor offset = at::empty({rows, subs}, blocks_in.options().dtype(at::kFloat));
  if (rows > 0) {
    const at::Tensor blocks = blocks_in.contiguous();
    const uint8_t* bp = blocks.data_ptr<uint8_t>();
    float* sp = scale.data_ptr<float>();
    float* fp = offset.data_ptr<float>();
    for_rows(rows, cols, 1 << 16, [&](int64_t r) {
      for (int64_t i = 0; i < nb; ++i)
        block_grid(t.kind, bp + (r * nb + i) * t.bytes, sp + r * subs + i * per_block, fp + r * subs + i * per_block);
    });
  }
  return {scale, offset};
}

at::Tensor gguf_encode(const at::Tensor& codes_in, const at::Tensor& blocks_in, std::string type) {
  const GgufType& t = gguf_type(type);
  check_cpu(codes_in, "codes");
  check_dtype(codes_in, at::kByte, "codes");
  TORCH_CHECK_VALUE(codes_in.dim() == 2, "lowbit: codes must be 2-D [rows, cols], got shape ", codes_in.sizes());
  const int64_t rows = codes_in.size(0), cols = codes_in.size(1);
  const int64_t nb = check_block_tensor(blocks_in, t, cols, "blocks");
  TORCH_CHECK_VALUE(blocks_in.size(0) == rows, "lowbit: blocks must have one row per row of codes (", rows,
                    "), got ", blocks_in.size(0));
  at::Tensor out = blocks_in.contiguous().clone();
  if (rows == 0) return out;
  const at::Tensor codes = codes_in.contiguous();
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const int qmax = (1 << t.bits) - 1;
  if (t.bits < 8) {
    std::atomic<bool> bad{false};
    for_rows(rows, cols, 1 << 16, [&](int64_t r) {
      int m = 0;
      for (int64_t c = 0; c < cols; ++c) m = std::max<int>(m, cp[r * cols + c]);
      if (m > qmax) bad = true;
    });
    TORCH_CHECK_VALUE(!bad, "lowbit: codes must be in [0, ", qmax, "] for GGUF ", t.name, " (", t.bits,
                      "-bit unsigned codes, as gguf_grid's scale * q + offset), got ", codes.max().item<int>());
  }
  uint8_t* op = out.data_ptr<uint8_t>();
  for_rows(rows, cols, 1 << 16, [&](int64_t r) {
    for (int64_t i = 0; i < nb; ++i) pack_codes(t.kind, op + (r * nb + i) * t.bytes, cp + r * cols + i * t.block);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lowbit, CPU, m) {
  m.impl("gguf_quantize", &gguf_quantize);
  m.impl("gguf_dequantize", &gguf_dequantize);
  m.impl("gguf_grid", &gguf_grid);
  m.impl("gguf_encode", &gguf_encode);
}

}  // namespace lowbit
