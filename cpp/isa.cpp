// CPU feature detection and the active ISA (see lowbit/isa.h).
#include "lowbit/isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace lowbit {
namespace {

CpuFeatures detect() {
  CpuFeatures f;
#ifdef LOWBIT_X86
  // libgcc's checks include the OS's support (XCR0) for the AVX and AVX-512 register state.
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
  f.avxvnni = __builtin_cpu_supports("avxvnni");
  f.amx_int8 = __builtin_cpu_supports("amx-int8");
#endif
  return f;
}

Isa best_isa(const CpuFeatures& f) {
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx2 && f.fma && f.f16c) return Isa::avx512;
  if (f.avx2 && f.fma && f.f16c) return Isa::avx2;
  return Isa::generic;
}

bool parse_isa(const std::string& name, Isa* out) {
  if (name == "avx512") *out = Isa::avx512;
  else if (name == "avx2") *out = Isa::avx2;
  else if (name == "generic") *out = Isa::generic;
  else return false;
  return true;
}

Isa checked_isa(const std::string& name) {
  Isa isa;
  TORCH_CHECK_VALUE(parse_isa(name, &isa), "lowbit: unknown ISA '", name,
                    "'; use one of avx512, avx2, generic (LOWBIT_ISA or lowbit.set_isa)");
  TORCH_CHECK_VALUE(static_cast<int>(isa) <= static_cast<int>(detected_isa()), "lowbit: ISA '", name,
                    "' is not supported by this CPU (best: ", isa_name(detected_isa()),
                    "); choose a lower one");
  return isa;
}

// The active ISA; LOWBIT_ISA is read once, when the first kernel asks.
std::atomic<int>& active() {
  static std::atomic<int> isa{[] {
    const char* env = std::getenv("LOWBIT_ISA");
    if (env == nullptr || *env == '\0') return static_cast<int>(detected_isa());
    return static_cast<int>(checked_isa(env));
  }()};
  return isa;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

Isa detected_isa() { return best_isa(cpu_features()); }

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

void set_isa(const std::string& name) { active().store(static_cast<int>(checked_isa(name))); }

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512: return "avx512";
    case Isa::avx2: return "avx2";
    default: return "generic";
  }
}

}  // namespace lowbit
