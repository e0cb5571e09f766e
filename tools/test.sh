#!/usr/bin/env bash
# The project's test command (README, .ci/run):
#  1. installs the pinned NVRTC 13.0 + CUDA headers from PyPI if missing (tools/setup_cuda.sh), and the
#     system OpenBLAS (the CPU backend's sgemm; without it the gemm crate runs) from apt when root;
#  2. builds the emulated GPU (tools/build_emu.sh) and puts it first on LD_LIBRARY_PATH, so every
#     CUDA-backend and kernel test runs the real CUDA path on the CPU;
#  3. runs every test of the workspace in forward, then reverse thread order (a missing
#     __syncthreads shows in one order only);
#  4. runs the benchmarks once on the emulated GPU (a smoke run: CPU times, not speed) and once
#     with no GPU at all, where speed measurements print "skipped: no CUDA device".
set -euo pipefail
cd "$(dirname "$0")/.."
LOG="${OPENUNI_TEST_LOG:-/tmp/openuni-test.log}"
echo "== system OpenBLAS (the CPU backend's sgemm, loaded at run time; without it the gemm crate runs)"
if ! ldconfig -p | grep -q 'libopenblas\.so\.0'; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        (apt-get update -qq && apt-get install -y -qq libopenblas0) || echo "OpenBLAS not installed: the CPU backend uses the gemm crate"
    else
        echo "OpenBLAS not installed (no apt-get or not root): the CPU backend uses the gemm crate"
    fi
fi
eval "$(bash tools/setup_cuda.sh)"
eval "$(bash tools/build_emu.sh)"
export OPENUNI_EMU_MEMORY="${OPENUNI_EMU_MEMORY:-4GiB}"
export OPENUNI_KERNEL_CACHE="${OPENUNI_KERNEL_CACHE:-$PWD/target/kernel-cache}"
echo "== all tests (emulated GPU, forward thread order)"
cargo test --workspace --release -- --nocapture 2>&1 | tee "$LOG"
echo "== all tests again (emulated GPU, reverse thread order: a missing __syncthreads shows in one order only)"
OPENUNI_EMU_THREAD_ORDER=reverse cargo test --workspace --release -- --nocapture 2>&1 | tee -a "$LOG"
echo "== benchmarks: smoke run on the emulated GPU (the times are CPU times, not speed)"
cargo bench -p openuni 2>&1 | tee -a "$LOG"
echo "== a benchmark with no GPU at all: the real-GPU path says it is skipped"
LD_LIBRARY_PATH="$OPENUNI_CUDA_DIR/nvidia/cu13/lib" cargo bench -p openuni --bench norm 2>&1 | tee -a "$LOG"
