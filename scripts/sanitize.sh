#!/usr/bin/env bash
# Builds lowbit._C with sanitizers (default address,undefined) into build/sanitize -- the normal
# editable install is left alone -- and runs the kernel tests against it: Python imports a staged
# package (links to python/lowbit plus the sanitized _C) with libasan preloaded. Each sanitizer
# report is logged; the script prints how many there were and exits non-zero
# if there were any (or if a test failed). Slow (about 10 minutes on two cores); not part of CI.
#
#   bash scripts/sanitize.sh                    # build + run the kernel tests
#   bash scripts/sanitize.sh tests/test_pack.py # build + run just these
#   LOWBIT_SANITIZE=undefined bash scripts/sanitize.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SAN=${LOWBIT_SANITIZE:-address,undefined}
BUILD=$ROOT/build/sanitize
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run scripts/setup.sh first" >&2; exit 2; }

# 1. Build into build/sanitize and stage a package that imports the sanitized module.
STAGE=$(bash scripts/variant_build.sh sanitize -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLOWBIT_SANITIZE="$SAN")

# 2. Run under the sanitizer runtime.
LOGS=$BUILD/logs
rm -rf "$LOGS" && mkdir -p "$LOGS"
PRELOAD=""
case ",$SAN," in *,address,*) PRELOAD=$(g++ -print-file-name=libasan.so) ;; esac
case ",$SAN," in *,undefined,*) PRELOAD="$PRELOAD${PRELOAD:+ }$(g++ -print-file-name=libubsan.so)" ;; esac
run() {
  env PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}" LD_PRELOAD="$PRELOAD" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=0:log_path=$LOGS/asan:allocator_may_return_null=1" \
    UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    "$PY" "$@"
}
run -c "import lowbit._C as c, sys; assert c.__file__.startswith('$STAGE'), c.__file__; print('sanitized module:', c.__file__)"

if [ $# -gt 0 ]; then
  TESTS=("$@")
else
  TESTS=()
  for t in test_quantize test_pack test_packed_linear test_gptq test_awq test_nf4 test_int8 test_raw_ops test_fuzz; do
    [ -f "tests/$t.py" ] && TESTS+=("tests/$t.py")
  done
fi
OUT=$BUILD/pytest
rm -rf "$OUT" && mkdir -p "$OUT"
failed=()
for t in "${TESTS[@]}"; do  # one process per file: a sanitizer abort stops only that file
  echo "== $t"
  rc=0
  run -m pytest -q -s -p no:cacheprovider "$t" >"$OUT/$(basename "$t" .py).log" 2>&1 || rc=$?
  tail -n 2 "$OUT/$(basename "$t" .py).log"
  [ "$rc" = 0 ] || failed+=("$t (exit $rc)")
done

# ASan writes one file per report under $LOGS; UBSan (a separate runtime with GCC) ignores
# log_path and prints to stderr, which pytest -s leaves in the test logs (test_raw_ops.py
# echoes a crashed child's stderr).
findings=$(cat "$LOGS"/* "$OUT"/*.log 2>/dev/null | grep -cE "ERROR: (Address|Leak|Memory|Thread)Sanitizer|runtime error:" || true)
echo "sanitizer ($SAN) findings: $findings   (reports in $LOGS and $OUT)"
[ ${#failed[@]} = 0 ] || echo "test files with failures: ${failed[*]}"
[ "$findings" = 0 ] && [ ${#failed[@]} = 0 ]
