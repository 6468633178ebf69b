#!/usr/bin/env bash
# Runs a command as on a CPU whose best instruction set is $1 (avx512 | avxvnni | avx2 | generic): lowbit's
# kernels (LOWBIT_ISA) and the peers the benchmarks time them against (MKL's and oneDNN's GEMMs,
# ATen's vector kernels) are all capped there, so a machine with AVX-512 measures the ratios an
# AVX2-only CPU would show, or one without AVX2 (on those MKL runs its SSE4.2 code: it has
# dropped its AVX-only code). avxvnni: an AVX2 CPU with AVX-VNNI (Alder Lake and later clients).
#   scripts/as_cpu.sh avx2 python benchmarks/bench_primitives.py
set -euo pipefail
case "${1:-}" in
  avx512) export LOWBIT_ISA=avx512 ;;
  avxvnni) export LOWBIT_ISA=avxvnni MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2_VNNI ;;
  avx2) export LOWBIT_ISA=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ;;
  generic) export LOWBIT_ISA=generic MKL_ENABLE_INSTRUCTIONS=SSE4_2 ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 ;;
  *) echo "usage: $0 avx512|avxvnni|avx2|generic COMMAND [ARGS...]" >&2; exit 2 ;;
esac
shift
exec "$@"
