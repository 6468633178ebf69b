// CPU feature detection and the active ISA (see lowbit/isa.h).
#include "lowbit/isa.h"

#include <c10/util/Exception.h>

#include <algorithm>
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

bool has_avx512(const CpuFeatures& f) {
  return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx2 && f.fma && f.f16c;
}
bool has_avx2(const CpuFeatures& f) { return f.avx2 && f.fma && f.f16c; }

const char* const kPathNames[] = {"generic", "avx2", "avxvnni", "avx512"};

bool parse_path(const std::string& name, IsaPath* out) {
  for (int i = 0; i < 4; ++i)
    if (name == kPathNames[i]) {
      *out = static_cast<IsaPath>(i);
      return true;
    }
  return false;
}

IsaPath checked_path(const std::string& name) {
  IsaPath path;
  TORCH_CHECK_VALUE(parse_path(name, &path), "lowbit: unknown ISA '", name,
                    "'; use one of avx512, avxvnni, avx2, generic (LOWBIT_ISA or lowbit.set_isa)");
  const std::vector<IsaPath> supported = supported_paths();
  TORCH_CHECK_VALUE(std::find(supported.begin(), supported.end(), path) != supported.end(), "lowbit: ISA '", name,
                    "' is not supported by this CPU (best: ", path_name(supported.front()), "); choose a lower one",
                    path == IsaPath::avxvnni ? " (avxvnni needs the CPU's AVX-VNNI)" : "");
  return path;
}

// The active path; LOWBIT_ISA is read once, when the first kernel asks.
std::atomic<int>& active() {
  static std::atomic<int> path{[] {
    const char* env = std::getenv("LOWBIT_ISA");
    if (env == nullptr || *env == '\0') return static_cast<int>(detected_path());
    return static_cast<int>(checked_path(env));
  }()};
  return path;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

std::vector<IsaPath> supported_paths() {
  const CpuFeatures& f = cpu_features();
  std::vector<IsaPath> paths;
  if (has_avx512(f)) paths.push_back(IsaPath::avx512);
  if (has_avx2(f) && f.avxvnni) paths.push_back(IsaPath::avxvnni);
  if (has_avx2(f)) paths.push_back(IsaPath::avx2);
  paths.push_back(IsaPath::generic);
  return paths;
}

IsaPath detected_path() { return supported_paths().front(); }

IsaPath active_path() { return static_cast<IsaPath>(active().load(std::memory_order_relaxed)); }

Isa active_isa() {
  switch (active_path()) {
    case IsaPath::avx512: return Isa::avx512;
    case IsaPath::avxvnni:
    case IsaPath::avx2: return Isa::avx2;
    default: return Isa::generic;
  }
}

void set_isa(const std::string& name) { active().store(static_cast<int>(checked_path(name))); }

const char* path_name(IsaPath path) { return kPathNames[static_cast<int>(path)]; }

}  // namespace lowbit
