#!/usr/bin/env bash
# Installs what is missing, builds with -Werror, runs every test through CTest (and
# the no-service configuration's with clang, and the GPU tests on cudasim, the CUDA
# backend's CPU emulation), then builds again under
# AddressSanitizer + UndefinedBehaviorSanitizer and runs the tests once more, and
# last runs the libFuzzer targets for a bounded count. Exits non-zero if anything
# fails.
# Usage: bash tools/run-tests.sh [--no-sanitizers]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash tools/install-deps.sh clang # the second compiler of the no-service build
jobs="$(nproc)"
if [ ! -d "$root/../shared/models" ]; then
  echo "run-tests: ../shared/models is missing beside the checkout ($root/../shared)" >&2
  exit 1
fi
echo "== build (RelWithDebInfo, -Werror; the CUDA backend too where nvcc is)"
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPD_WERROR=ON > /dev/null
cmake --build build -j"$jobs"
echo "== tests"
ctest --test-dir build --output-on-failure -j"$jobs"
echo "== build without the service (what a GPU host with only CUDA, CMake and Python builds), with clang"
# the engine, its kernels and pdctl generate must not need ZeroMQ, UCX, libuv or
# protobuf-c (issue 6): build them with PD_BUILD_SERVICE=OFF, check that pdctl links
# none of those libraries, and generate a few tokens with it. This build uses clang
# (-Werror too) so that the code keeps building with both of Debian's C compilers;
# the tests that need no service run on it as well.
# (a build-noservice left configured for gcc by an older run-tests.sh is redone)
if [ -f build-noservice/CMakeCache.txt ] &&
   ! grep -q '^CMAKE_C_COMPILER:[A-Z]*=.*clang' build-noservice/CMakeCache.txt; then
  rm -rf build-noservice
fi
CC=clang cmake -S . -B build-noservice -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPD_WERROR=ON \
      -DPD_BUILD_SERVICE=OFF -DPD_CUDA=OFF > /dev/null
cmake --build build-noservice -j"$jobs"
ctest --test-dir build-noservice --output-on-failure -j"$jobs"
if ldd build-noservice/bin/pdctl | grep -E "libzmq|libucp|libucs|libuv|libprotobuf-c"; then
  echo "run-tests: pdctl without the service links a service library (above)" >&2
  exit 1
fi
build-noservice/bin/pdctl generate --model "$root/../shared/models/stories260K.gguf" \
  --prompt "Once upon a time" --max-tokens 8 > /dev/null
echo "== the CUDA backend on cudasim (its kernels and host code on the CPU): the GPU tests"
# tools/cudasim/README.md: kernels/cuda/*.cu and the backend's host code, unchanged,
# built as C++ against a CPU implementation of the CUDA runtime and cuBLAS, so that
# tests/gpu's programs and scripts run without a GPU (ctest -L cudasim). This checks
# the code's logic, not its speed; `-LE long` leaves out the ~5-minute golden run
# with --cuda-graphs (test_cuda_graphs and the cluster test cover graphs).
cmake -S . -B build-cudasim -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPD_WERROR=ON \
      -DPD_CUDA_SIM=ON -DPD_BUILD_TESTS=OFF > /dev/null
cmake --build build-cudasim -j"$jobs"
ctest --test-dir build-cudasim --output-on-failure -L cudasim -LE long -j"$jobs"
if [ "${1:-}" != "--no-sanitizers" ]; then
  echo "== build (ASan + UBSan)"
  # without the CUDA backend: it cannot run here (no GPU), the plain build above
  # compiled it, and the CUDA runtime's own start-up allocations are not ours to check
  cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPD_WERROR=ON \
        -DPD_ASAN=ON -DPD_UBSAN=ON -DPD_CUDA=OFF > /dev/null
  cmake --build build-asan -j"$jobs"
  echo "== tests under ASan + UBSan"
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    ctest --test-dir build-asan --output-on-failure -j"$jobs"
  echo "== fuzz targets (clang libFuzzer + ASan + UBSan), a bounded run of each"
  # the loader, the tokenizer and the frame checks on mutated inputs (tests/*/fuzz_*.c;
  # seeds and counts in tests/support/runfuzz.py); only their targets are built
  CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPD_WERROR=ON \
        -DPD_FUZZ=ON -DPD_ASAN=ON -DPD_UBSAN=ON -DPD_CUDA=OFF > /dev/null
  cmake --build build-fuzz -j"$jobs" --target pdfuzzers
  ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build-fuzz --output-on-failure -L fuzz \
    -j"$jobs"
fi
echo "== all tests passed"
