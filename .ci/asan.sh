#!/usr/bin/env bash
# Run the op tests once under AddressSanitizer (not part of .ci/run: ~3 min plus a rebuild).
#
# Builds the extension with -fsanitize=address into a fresh clone of this repository (the
# installed package is left alone) and runs the op test files with libasan preloaded.
# libstdc++ is preloaded too: python does not link it, so libasan alone cannot intercept
# __cxa_throw and aborts at the first C++ exception (a TORCH_CHECK in a bad-input test)
# (google/sanitizers#934). Exit status: pytest's; ASan stops the process at its first error.
# Usage: .ci/asan.sh [pytest args]      (run inside the venv that has torch and the test extras)
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${ASAN_WORKDIR:-/tmp/mixda_fast_asan}"
rm -rf "$WORK"
git clone -q "$SRC" "$WORK"
cd "$WORK"
CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g" LDFLAGS="-fsanitize=address" MAX_JOBS=2 \
  python setup.py -q build_ext --inplace
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so)"
export ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0 PYTHONPATH="$WORK" OMP_NUM_THREADS=1
python -c 'import mixda_fast._C as c; print("ASan build:", c.__file__)'
python -m pytest -q -p no:cacheprovider tests/test_ops_combine.py tests/test_fused_ffn.py \
  tests/test_gate_mlp.py tests/test_packing.py tests/test_bad_input.py "$@"
