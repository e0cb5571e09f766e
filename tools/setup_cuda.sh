#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 NVRTC, runtime headers, CRT and CCCL from PyPI (no GPU, no toolkit needed)
# and prints the environment that the build, the tests and the program read.
#   eval "$(bash tools/setup_cuda.sh)"
# NVRTC is pinned to 13.0.x: newer NVRTC emits PTX that the R580 driver (CUDA 13.0) rejects (docs/architecture.md, "Numerics and toolchain").
set -euo pipefail
D="${OPENUNI_CUDA_DIR:-$HOME/.cache/openuni/cuda-13.0.2}"
CU="$D/nvidia/cu13"
if [ ! -f "$CU/lib/libnvrtc.so.13" ] || [ ! -f "$CU/include/cuda_bf16.h" ]; then
  python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore --target "$D" "cuda-toolkit[nvrtc,cudart,cccl,crt]==13.0.2" >&2
fi
echo "export OPENUNI_CUDA_DIR='$D'"
echo "export CUDA_INCLUDE_DIRS='$CU/include:$CU/include/cccl'"
echo "export LD_LIBRARY_PATH='$CU/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
