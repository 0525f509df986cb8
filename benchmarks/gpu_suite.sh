#!/usr/bin/env bash
# The GPU check of a change, in one call on a CUDA machine (CI has no GPU):
#   build from source -> CUDA test suite -> demo -> benchmark -> compute-sanitizer.
# Usage: benchmarks/gpu_suite.sh [build] [tests] [demo] [bench] [sanitize]   (default: all)
# Logs and results go to $OUT (default /tmp/fused_conv_gpu); a summary prints last.
# Wheels in .whl/ (e.g. pytest for a machine without it) are installed to /tmp/site first.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/fused_conv_gpu}
mkdir -p "$OUT"
steps=${*:-build tests demo bench sanitize}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a} MAX_JOBS=${MAX_JOBS:-16} FORCE_CUDA=1
export PYTHONUNBUFFERED=1
# Build with the system compiler when the machine's default is a wrapper that links
# libstdc++ statically (seen on the H100 machine: /opt/gcc/bin/g++): a private libstdc++
# copy inside _C.so crashes when a TORCH_CHECK message is formatted.
if [ -x /usr/bin/g++ ]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
PY=${PYTHON:-python3}
summary=()
note() { summary+=("$1"); echo "== $1"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader \
  | tee "$OUT/gpu.txt"

# Tests run from a copy outside the source tree, against the installed package.
TESTS=/tmp/fused_conv_tests
rm -rf "$TESTS" && mkdir -p "$TESTS" && cp -r tests examples pyproject.toml "$TESTS"/
pytest_args=(-q -p no:cacheprovider --import-mode=importlib -rfE tests)

for step in $steps; do
  start=$SECONDS
  case $step in
    build)
      if $PY -m pip install --no-build-isolation --no-deps --force-reinstall . >"$OUT/build.log" 2>&1; then
        note "build: ok ($((SECONDS - start)) s)"
      else
        tail -40 "$OUT/build.log"; note "build: FAILED"; break
      fi
      (cd /tmp && $PY -m fused_conv info) >"$OUT/info.json" 2>&1
      ;;
    tests)
      # One process per file: a crash in one file still leaves the others' results.
      : >"$OUT/pytest.log"
      for file in "$TESTS"/tests/test_*.py; do
        (cd "$TESTS" && $PY -m pytest "${pytest_args[@]/#tests/tests/$(basename "$file")}") \
          >>"$OUT/pytest.log" 2>&1
        note "tests $(basename "$file"): rc=$? $(tail -1 "$OUT/pytest.log")"
      done
      note "tests: $((SECONDS - start)) s"
      ;;
    demo)
      (cd /tmp && $PY -m fused_conv demo) >"$OUT/demo.log" 2>&1
      note "demo: rc=$? ($((SECONDS - start)) s)"
      ;;
    bench)
      (cd /tmp && $PY -m fused_conv bench --json "$OUT/bench.json" --markdown "$OUT/bench.md") \
        >"$OUT/bench.log" 2>&1
      note "bench: rc=$? ($((SECONDS - start)) s)"
      ;;
    sanitize)
      # A reduced CUDA run: the kernel-specific tests (small shapes) under memcheck and racecheck.
      for tool in memcheck racecheck; do
        (cd "$TESTS" && FUSED_CONV_SANITIZE=1 compute-sanitizer --tool $tool --error-exitcode 99 \
          $PY -m pytest "${pytest_args[@]}" -x -k "sanitize and not (float16 or bfloat16 or nhwc)") >"$OUT/$tool.log" 2>&1
        note "$tool: rc=$? $(grep -E 'ERROR SUMMARY' "$OUT/$tool.log" | tail -1) $(tail -1 "$OUT/$tool.log")"
      done
      ;;
    *) note "unknown step $step" ;;
  esac
done

echo; echo "==== demo"; cat "$OUT/demo.log" 2>/dev/null | tail -8
echo "==== bench (tail)"; tail -45 "$OUT/bench.log" 2>/dev/null
echo "==== failures"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" 2>/dev/null | head -40
echo "==== summary"; printf '%s\n' "${summary[@]}"
