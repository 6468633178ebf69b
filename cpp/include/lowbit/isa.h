// The one place that decides which instruction set lowbit's kernels use. The CPU's features are
// read once; the active ISA is the best one the CPU supports, lowered by the LOWBIT_ISA
// environment variable (avx512 | avxvnni | avx2 | generic) or by set_isa(), so a machine with
// AVX-512 also runs, tests and times the AVX2 and the portable code. "avxvnni" is the AVX2 path
// with AVX-VNNI's 256-bit vpdpbusd for the int8 GEMM (Intel client CPUs from Alder Lake on,
// Sapphire Rapids, AMD Zen 5); every other kernel runs its AVX2 code there.
//
// Two kinds of kernel use it:
//   * plain loops written once (LOWBIT_VECTOR_LOOP helpers) are compiled three times by
//     run_for_isa(), which inlines them into a wrapper built for each ISA;
//   * hand-written intrinsics kernels (LOWBIT_TARGET_AVX2 / LOWBIT_TARGET_AVX512 functions) are
//     called when active_isa() is at least their level.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LOWBIT_X86 1
#define LOWBIT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2")))
#define LOWBIT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")))
#define LOWBIT_TARGET_AVX512_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c,bmi,bmi2")))
#define LOWBIT_TARGET_AVXVNNI __attribute__((target("avxvnni,avx2,fma,f16c,bmi,bmi2")))
#endif

// A loop body that run_for_isa() compiles once per ISA: it must be inlined into the wrapper.
#define LOWBIT_VECTOR_LOOP inline __attribute__((always_inline))

namespace lowbit {

enum class Isa : int { generic = 0, avx2 = 1, avx512 = 2 };
// The paths LOWBIT_ISA names, lowest first: an Isa, and for avxvnni the AVX2 Isa plus AVX-VNNI.
enum class IsaPath : int { generic = 0, avx2 = 1, avxvnni = 2, avx512 = 3 };

struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512vnni = false, avx512bf16 = false, avxvnni = false, amx_int8 = false;
};

const CpuFeatures& cpu_features();
std::vector<IsaPath> supported_paths();  // the paths this CPU (and OS) supports, best first
IsaPath detected_path();                 // the best of them
IsaPath active_path();                   // what the kernels use now
Isa active_isa();  // active_path()'s instruction set
// Lowers (or restores) the active path; throws c10::ValueError for a name that is unknown or
// not supported by the CPU.
void set_isa(const std::string& name);
const char* path_name(IsaPath path);
// The AVX-512 VNNI int8 kernel: the avx512 path and the CPU has VNNI.
inline bool use_vnni() { return active_isa() == Isa::avx512 && cpu_features().avx512vnni; }
// The AVX-VNNI int8 kernel (256-bit vpdpbusd): the avxvnni path.
inline bool use_avxvnni() { return active_path() == IsaPath::avxvnni; }
// bf16 GEMMs through ATen (oneDNN): the avx512 path and the CPU has AVX512-BF16 (or AMX).
inline bool use_bf16_gemm() { return active_isa() == Isa::avx512 && cpu_features().avx512bf16; }

#ifdef LOWBIT_X86
template <typename F>
__attribute__((flatten)) LOWBIT_TARGET_AVX512 void run_avx512(const F& f) { f(); }
template <typename F>
__attribute__((flatten)) LOWBIT_TARGET_AVX2 void run_avx2(const F& f) { f(); }
#endif
template <typename F>
__attribute__((flatten)) void run_generic(const F& f) { f(); }

// Calls f() compiled for the active ISA: f and everything it inlines (the LOWBIT_VECTOR_LOOP
// helpers) are vectorised for AVX-512, AVX2 or baseline x86-64. Call it inside a parallel
// loop's body, around the per-row work, so the wrappers hold numeric code only.
template <typename F>
void run_for_isa(const F& f) {
#ifdef LOWBIT_X86
  switch (active_isa()) {
    case Isa::avx512: return run_avx512(f);
    case Isa::avx2: return run_avx2(f);
    default: break;
  }
#endif
  run_generic(f);
}

}  // namespace lowbit
