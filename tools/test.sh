#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs the pinned NVRTC 13.0 + CUDA headers
# from PyPI if missing, then runs every test of the workspace. GPU tests print
# "skipped: no CUDA device" where there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash tools/setup_cuda.sh)"
cargo test --workspace --release -- --nocapture 2>&1 | tee "${OPENUNI_TEST_LOG:-/tmp/openuni-test.log}"
