#!/usr/bin/env bash
# The one script for the GPU machine: runs every GPU test and benchmark from prebuilt executables.
#
# 1. Here (the CPU machine), build and collect the executables into .gpu/ (stripped, < 64 MiB):
#        bash tools/gpu_run.sh --build
#    which runs `cargo test --release --no-run` (tests/cuda_*.rs, tests/kernels_compile.rs and
#    crates/cuda/tests/*.rs) and `cargo bench --no-run` (benches/*.rs), copies the executables and the
#    `openuni` program into .gpu/, writes the three variants' configs for the PyTorch baseline
#    (.gpu/configs/), downloads the diffusers wheel the GPU image lacks (.gpu/whl/), and records the commit.
# 2. On the GPU machine (no Rust, no network; CUDA 13.0 in /usr/local/cuda), from the repo root:
#        bash tools/gpu_run.sh [kernels|pipeline|all]     # with the device tool: carry [".gpu"]
#    kernels: every kernel test (CUBIN, then PTX), sanitizers, kernel benchmarks.
#    pipeline: every reference case through `openuni verify --device cuda` (f32 and bf16), a batched
#    `openuni generate` of the tiny model, then `openuni bench` of b-512, l-512, l-1024 (batch 1, 8, 32, with
#    the per-op profile) and tools/bench_torch.py on the same shapes (eager and torch.compile), with ratios.
#    It prints nvidia-smi, points LD_LIBRARY_PATH (libnvrtc, libcublasLt) and CUDA_INCLUDE_DIRS at
#    /usr/local/cuda, runs every test executable (CUBIN kernels, then again with PTX kernels), the
#    compute-sanitizer memcheck/racecheck passes when the tool is there, then every benchmark, and
#    writes to $OUT (default ./gpu-out): summary.txt, tests.log, sanitizer.log, bench.log,
#    bench.jsonl, env.txt. The summary table is printed last. Exit status: non-zero if any test failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
GPU_DIR="$ROOT/.gpu"
TESTS=(kernels_compile cuda_norm cuda_elementwise cuda_linear_attention cuda_misc cuda_attention cuda_conv cuda_conv_sm90 cuda_attention_sm90 cuda_layout cuda_decode_attention cuda_pixel_shuffle backend executor)
BENCHES=(norm elementwise linear_attention attention conv conv_sm90 attention_sm90 layout misc decode_attention pixel_shuffle)
VARIANTS=(b-512 l-512 l-1024)

if [ "${1:-}" = "--build" ]; then
  set -e
  mkdir -p "$GPU_DIR"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || grep -qx '/.gpu/' .gitignore 2>/dev/null || echo /.gpu/ >> .git/info/exclude
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
  J="$(mktemp)"
  cargo test --release --no-run --message-format=json --test kernels_compile --test cuda_norm --test cuda_elementwise --test cuda_linear_attention --test cuda_misc --test cuda_attention --test cuda_conv --test cuda_layout --test cuda_decode_attention --test cuda_pixel_shuffle >> "$J"
  cargo test --release --no-run --message-format=json -p openuni-cuda --tests >> "$J"
  cargo bench --no-run --message-format=json --bench norm --bench elementwise --bench linear_attention --bench attention --bench conv --bench layout --bench misc --bench decode_attention --bench pixel_shuffle >> "$J"
  cargo build --release
  cp target/release/openuni "$GPU_DIR/openuni" && strip --strip-debug "$GPU_DIR/openuni"
  for v in "${VARIANTS[@]}"; do "$GPU_DIR/openuni" bench --variant "$v" --write-configs "$GPU_DIR/configs/$v" > /dev/null; done
  # The GPU image has torch and transformers but no diffusers (shared/GPU.md).
  [ -n "$(ls "$GPU_DIR"/whl/diffusers-*.whl 2>/dev/null)" ] || python3 -m pip download -q --no-deps -d "$GPU_DIR/whl" diffusers==0.42.1 importlib_metadata==8.7.0
  python3 - "$J" "$GPU_DIR" <<'PY'
import json, sys, shutil, os, subprocess
msgs, out = sys.argv[1], sys.argv[2]
for line in open(msgs):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") != "compiler-artifact" or not exe:
        continue
    kind = m["target"]["kind"][0]
    name = m["target"]["name"]
    if kind not in ("test", "bench"):
        continue
    dst = os.path.join(out, ("bench-" if kind == "bench" else "test-") + name)
    shutil.copyfile(exe, dst)
    os.chmod(dst, 0o755)
    subprocess.run(["strip", "--strip-debug", dst], check=False)
    print(f"{dst}: {os.path.getsize(dst) / 2**20:.1f} MiB")
PY
  rm -f "$J"
  git rev-parse --short=12 HEAD > "$GPU_DIR/COMMIT" 2>/dev/null || echo unknown > "$GPU_DIR/COMMIT"
  if ! git diff --quiet HEAD 2>/dev/null; then echo "$(cat "$GPU_DIR/COMMIT")+dirty" > "$GPU_DIR/COMMIT"; fi
  du -sh "$GPU_DIR"
  echo "now run on the GPU machine: bash tools/gpu_run.sh   (device tool: carry [\".gpu\"])"
  exit 0
fi

PHASE="${1:-all}"
case "$PHASE" in kernels|pipeline|all) ;; *) echo "usage: bash tools/gpu_run.sh [--build | kernels | pipeline | all]" >&2; exit 2;; esac
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
: > "$OUT/tests.log"
: > "$OUT/bench.log"
: > "$OUT/sanitizer.log"
rm -f "$OUT/bench.jsonl"

if [ ! -d "$GPU_DIR" ]; then
  echo "no .gpu/ folder: build the executables first with 'bash tools/gpu_run.sh --build' on the CPU machine" >&2
  exit 2
fi

CUDA="${CUDA_HOME:-/usr/local/cuda}"
export LD_LIBRARY_PATH="$CUDA/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_INCLUDE_DIRS="${CUDA_INCLUDE_DIRS:-$CUDA/include:$CUDA/include/cccl}"
export OPENUNI_KERNEL_CACHE="${OPENUNI_KERNEL_CACHE:-/tmp/openuni-kernel-cache}"
export OPENUNI_BENCH_JSON="$OUT/bench.jsonl"
export OPENUNI_GIT_COMMIT="$(cat "$GPU_DIR/COMMIT" 2>/dev/null || echo unknown)"
export RUST_BACKTRACE=1

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $OPENUNI_GIT_COMMIT"
  echo "host: $(uname -a)"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  echo "nvcc: $(command -v nvcc || echo none) $(nvcc --version 2>/dev/null | tail -1)"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "CUDA_INCLUDE_DIRS=$CUDA_INCLUDE_DIRS"
  ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|nvrtc|cublasLt' || true
  ls "$CUDA"/lib64/libnvrtc* "$CUDA"/lib64/libcublasLt* 2>&1 | head
  ls -d "$CUDA"/include/cuda_bf16.h "$CUDA"/include/cccl 2>&1
  ls -la "$GPU_DIR"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

printf "%-36s %-6s %7s %7s %8s %s\n" "step" "status" "passed" "failed" "seconds" "note" >> "$SUMMARY"
any_fail=0

# Runs one executable; appends its output to LOG and one row to the summary.
run_step() { # name log exe args...
  local name="$1" log="$2" exe="$3"; shift 3
  local t0 t1 rc out passed failed note status
  t0=$(date +%s.%N)
  out="$(mktemp)"
  { echo; echo "===== $name: $exe $*"; } >> "$log"
  timeout 540 "$exe" "$@" > "$out" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  cat "$out" >> "$log"
  passed=$(grep -Eo '[0-9]+ passed' "$out" | awk '{s+=$1} END {print s+0}')
  failed=$(grep -Eo '[0-9]+ failed' "$out" | awk '{s+=$1} END {print s+0}')
  note=""
  if grep -q "skipped: no CUDA device" "$out"; then note="SKIPPED: no CUDA device"; fi
  if grep -q "skipped: NVRTC not found" "$out"; then note="SKIPPED: NVRTC not found"; fi
  if [ $rc -eq 0 ]; then status=PASS; else status=FAIL; any_fail=1; fi
  [ $rc -eq 124 ] && note="timeout $note"
  printf "%-36s %-6s %7s %7s %8.1f %s\n" "$name" "$status" "$passed" "$failed" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" "$note" >> "$SUMMARY"
  rm -f "$out"
}

if [ "$PHASE" != pipeline ]; then
for t in "${TESTS[@]}"; do
  exe="$GPU_DIR/test-$t"
  [ -x "$exe" ] || { printf "%-36s %-6s\n" "test $t" "MISSING" >> "$SUMMARY"; any_fail=1; continue; }
  run_step "test $t" "$OUT/tests.log" "$exe" --nocapture --test-threads=1
done
for t in cuda_norm cuda_elementwise cuda_linear_attention cuda_misc executor; do
  exe="$GPU_DIR/test-$t"
  [ -x "$exe" ] || continue
  OPENUNI_KERNEL_FORMAT=ptx run_step "test $t (ptx)" "$OUT/tests.log" "$exe" --nocapture --test-threads=1
done

if command -v compute-sanitizer > /dev/null 2>&1; then
  for t in cuda_norm cuda_elementwise cuda_linear_attention cuda_misc; do
    exe="$GPU_DIR/test-$t"
    [ -x "$exe" ] || continue
    run_step "memcheck $t" "$OUT/sanitizer.log" compute-sanitizer --tool memcheck --error-exitcode 9 "$exe" --test-threads=1
  done
  [ -x "$GPU_DIR/test-cuda_norm" ] && run_step "racecheck cuda_norm" "$OUT/sanitizer.log" compute-sanitizer --tool racecheck --error-exitcode 9 "$GPU_DIR/test-cuda_norm" --test-threads=1
  [ -x "$GPU_DIR/test-cuda_norm" ] && run_step "synccheck cuda_norm" "$OUT/sanitizer.log" compute-sanitizer --tool synccheck --error-exitcode 9 "$GPU_DIR/test-cuda_norm" --test-threads=1
  [ -x "$GPU_DIR/test-cuda_linear_attention" ] && run_step "racecheck cuda_linear_attention" "$OUT/sanitizer.log" compute-sanitizer --tool racecheck --error-exitcode 9 "$GPU_DIR/test-cuda_linear_attention" --test-threads=1
  [ -x "$GPU_DIR/test-cuda_linear_attention" ] && run_step "synccheck cuda_linear_attention" "$OUT/sanitizer.log" compute-sanitizer --tool synccheck --error-exitcode 9 "$GPU_DIR/test-cuda_linear_attention" --test-threads=1
else
  printf "%-36s %-6s\n" "compute-sanitizer" "ABSENT" >> "$SUMMARY"
fi

for b in "${BENCHES[@]}"; do
  exe="$GPU_DIR/bench-$b"
  [ -x "$exe" ] || { printf "%-36s %-6s\n" "bench $b" "MISSING" >> "$SUMMARY"; any_fail=1; continue; }
  run_step "bench $b" "$OUT/bench.log" "$exe"
done

fi # kernels

if [ "$PHASE" != kernels ]; then
  OU="$GPU_DIR/openuni"
  for dtype in f32 bf16; do
    run_step "verify cases cuda $dtype" "$OUT/tests.log" "$OU" verify tests/fixtures/*/ --device cuda --dtype "$dtype"
  done
  printf 'a red fox\na lighthouse at dusk\na bowl of cherries\n' > "$OUT/prompts.txt"
  run_step "generate tiny --batch 3" "$OUT/tests.log" "$OU" generate --prompts "$OUT/prompts.txt" --batch 3 --device cuda --dtype bf16 --out "$OUT/images"
  SITE=/tmp/openuni-site
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$GPU_DIR"/whl/*.whl > "$OUT/pip.log" 2>&1 || echo "diffusers wheel install failed (see pip.log)"
  for v in "${VARIANTS[@]}"; do
    run_step "openuni bench $v" "$OUT/bench.log" "$OU" bench --variant "$v" --batch 1,8,32 --device cuda --dtype bf16 --iters 20 --profile --json "$OUT/ours-$v.json"
    PYTHONPATH="$SITE" run_step "torch bench $v" "$OUT/bench.log" python3 tools/bench_torch.py --configs "$GPU_DIR/configs/$v" --device cuda --dtype bf16 --batch 1,8,32 --iters 20 --compile --json "$OUT/torch-$v.json"
    [ -f "$OUT/ours-$v.json" ] && [ -f "$OUT/torch-$v.json" ] && python3 tools/bench_torch.py --compare "$OUT/ours-$v.json" "$OUT/torch-$v.json" | tee -a "$OUT/ratios.txt"
  done
  # Chat (docs/decode.md, "Measuring the GPU targets"): batch 1 at a 2k context (bandwidth) + the ViT, batch 64.
  for v in b-512 l-512; do
    # "batch prompt vit-tiles": the ViT of 13 tiles is timed with the batch-1 run.
    for shape in "1 2048 13" "64 512 0"; do
      set -- $shape
      run_step "openuni bench --chat $v b$1 p$2" "$OUT/bench.log" "$OU" bench --chat --variant "$v" --device cuda --dtype bf16 --batch "$1" --chat-prompt "$2" --vit-tiles "$3" --iters 50 --json "$OUT/ours-chat-$v-b$1.json"
      PYTHONPATH="$SITE" run_step "torch chat bench $v b$1 p$2" "$OUT/bench.log" python3 tools/bench_torch_chat.py --configs "$GPU_DIR/configs/$v" --device cuda --dtype bf16 --batch "$1" --prompt "$2" --vit-tiles "$3" --iters 50 --json "$OUT/torch-chat-$v-b$1.json"
    done
  done
fi

echo
echo "===== benchmark lines"
grep -E "GB/s|copy:" "$OUT/bench.log" || true
echo
echo "===== failures"
grep -E "panicked|FAILED|error:|ERROR SUMMARY: [1-9]" "$OUT/tests.log" "$OUT/sanitizer.log" | head -40 || true
echo
echo "===== summary ($OUT)"
cat "$SUMMARY"
exit $any_fail
