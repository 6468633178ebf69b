// Hand-written AVX-512 kernels: compiled for that ISA function by function (LOWBIT_AVX512) and
// chosen at run time with __builtin_cpu_supports, so the binary still runs on any x86-64. A
// LOWBIT_PORTABLE build (CMake option) leaves them out, to test and time the portable code.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(LOWBIT_PORTABLE)
#include <immintrin.h>
#define LOWBIT_HAVE_AVX512_KERNEL 1
#define LOWBIT_AVX512 __attribute__((target("avx512f")))
#endif
