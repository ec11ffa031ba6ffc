#!/usr/bin/env bash
# Compile-check the CUDA sources without a GPU or a CUDA build of torch.
#
# Every csrc/cuda/*.cu is compiled (not linked) with `nvcc -std=c++20 -c` against the include
# folders of the installed torch, with the flags torch's CUDAExtension passes to nvcc, into a
# temporary folder. The .cu files need only ATen's CPU-side headers, which every torch build
# ships. csrc/cuda/*.cpp (the c10/cuda registration) is syntax-checked too when the installed
# torch ships c10/cuda headers, and reported as skipped otherwise.
#
# One line per file; exit status 1 if any file fails. Without nvcc on PATH: one skip line, exit 0.
# Usage: .ci/compile_cuda.sh            (PYTHON=... to pick the interpreter that has torch)
set -euo pipefail

cd "$(dirname "$0")/.."

if ! command -v nvcc >/dev/null 2>&1; then
  echo "compile_cuda: SKIP: nvcc is not on PATH, CUDA sources not checked"
  exit 0
fi

PYTHON="${PYTHON:-python}"
mapfile -t TORCH_INCLUDES < <("$PYTHON" -c \
  'import torch.utils.cpp_extension as c; print("\n".join(c.include_paths()))')
mapfile -t TORCH_NVCC_FLAGS < <("$PYTHON" -c \
  'import torch.utils.cpp_extension as c; print("\n".join(c.COMMON_NVCC_FLAGS))')
INCLUDE_FLAGS=()
for dir in "${TORCH_INCLUDES[@]}"; do
  INCLUDE_FLAGS+=("-I$dir")
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

shopt -s nullglob
status=0
checked=0

# $1: file, $2..: extra nvcc arguments
check() {
  local src="$1"
  shift
  local log="$tmp/$(basename "$src").log"
  local start=$SECONDS
  if nvcc -std=c++20 -O0 "$@" "${TORCH_NVCC_FLAGS[@]}" "${INCLUDE_FLAGS[@]}" \
      -Xcompiler -fPIC -c "$src" -o "$tmp/$(basename "$src").o" >"$log" 2>&1; then
    echo "compile_cuda: OK   $src ($((SECONDS - start)) s)"
  else
    echo "compile_cuda: FAIL $src"
    cat "$log" >&2
    status=1
  fi
  checked=$((checked + 1))
}

for src in csrc/cuda/*.cu; do
  check "$src"
done

has_c10_cuda=0
for dir in "${TORCH_INCLUDES[@]}"; do
  # cuda_cmake_macros.h is generated only by CUDA builds; CPU wheels ship the rest of c10/cuda.
  [[ -f "$dir/c10/cuda/impl/cuda_cmake_macros.h" ]] && has_c10_cuda=1
done
for src in csrc/cuda/*.cpp; do
  if [[ $has_c10_cuda == 1 ]]; then
    check "$src"  # nvcc hands .cpp files to the host compiler, with CUDA include paths
  else
    echo "compile_cuda: SKIP $src (this torch is not a CUDA build: no c10/cuda/impl/cuda_cmake_macros.h)"
  fi
done

if [[ $checked == 0 ]]; then
  echo "compile_cuda: no CUDA sources found under csrc/cuda"
fi
exit $status
