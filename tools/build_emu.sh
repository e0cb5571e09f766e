#!/usr/bin/env bash
# Builds the emulated GPU (crates/emu) and installs it as target/emu/lib/{libcuda.so.1,libcublasLt.so.13}.
#   eval "$(bash tools/build_emu.sh)"      # puts the emulated driver first on LD_LIBRARY_PATH
# The kernels are compiled for the CPU from kernels/*.cu, which needs the pinned CUDA headers: this script
# runs tools/setup_cuda.sh first when CUDA_INCLUDE_DIRS is unset. Build output goes to stderr; stdout is
# only the export lines. Programs that cannot set LD_LIBRARY_PATH (openuni --device emu) dlopen
# target/emu/lib/libcuda.so.1 and then target/emu/lib/libcublasLt.so.13 by absolute path before cudarc's
# first call: the sonames make cudarc's own dlopen calls return these.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -z "${CUDA_INCLUDE_DIRS:-}" ]; then
  eval "$(bash tools/setup_cuda.sh)"
fi
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"
cargo build --release -p openuni-emu >&2
LIB="$TARGET/release/libopenuni_emu.so"
OUT="$ROOT/target/emu/lib"
mkdir -p "$OUT"
# Copy then rename: a process that has the old library mapped keeps a consistent file.
cp "$LIB" "$OUT/.libcuda.so.1.tmp" && mv -f "$OUT/.libcuda.so.1.tmp" "$OUT/libcuda.so.1"
# libcublasLt.so.13: a stub whose only content is a dependency on libcuda.so.1 (found next to it), which
# defines the cublasLt* symbols; dlsym on the stub's handle searches its dependencies. Its own soname lets
# a dlopen by absolute path satisfy cudarc's later dlopen("libcublasLt.so.13").
${CC:-cc} -shared -o "$OUT/.libcublasLt.so.13.tmp" -Wl,-soname,libcublasLt.so.13 -Wl,--no-as-needed \
  -L"$OUT" -l:libcuda.so.1 -Wl,-rpath,'$ORIGIN' -x c /dev/null
mv -f "$OUT/.libcublasLt.so.13.tmp" "$OUT/libcublasLt.so.13"
CU_LIB=""
if [ -n "${OPENUNI_CUDA_DIR:-}" ] && [ -d "$OPENUNI_CUDA_DIR/nvidia/cu13/lib" ]; then
  CU_LIB=":$OPENUNI_CUDA_DIR/nvidia/cu13/lib"
fi
echo "built the emulated GPU: $OUT/libcuda.so.1, $OUT/libcublasLt.so.13" >&2
echo "export LD_LIBRARY_PATH='$OUT$CU_LIB'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
