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
#    A device lease is short (15 minutes a session, start included), so the run is ordered by value and
#    bounded by a budget ($GPU_BUDGET_S seconds, default 420): each step gets at most what is left, a
#    step that no longer fits is listed as SKIPPED (out of time), and the results are re-packed after every
#    step, so a run cut short still brings back what it did. Order (all):
#      1. every kernel test with CUBIN kernels (real-hardware correctness first; the sm_90a ones first);
#      2. b-512: `openuni bench` (batch 1, 8, 32, per-op profile) and tools/bench_torch.py eager on the
#         same shapes, with the ratio table;
#      3. every reference case through `openuni verify --device cuda` (bf16, f32), a batched generate;
#      4. the sm_90a vs mma.sync kernel benchmarks, then the other kernel benchmarks;
#      5. torch.compile for b-512, the l-512 / l-1024 benches, chat benches, PTX re-runs, sanitizers.
#    kernels = steps 1, 4 and the PTX/sanitizer part of 5; pipeline = 2, 3 and the rest of 5; quick = the
#    kernel tests and benches named in $GPU_QUICK_TESTS / $GPU_QUICK_BENCHES, then b-512 batch 32 against
#    PyTorch eager (a re-check after a change, for the few device minutes a second call has; with
#    GPU_QUICK_VERIFY=1 first every reference case through `verify`, GPU_QUICK_L1024=1 then our l-1024
#    batch 32, GPU_QUICK_COMPILE=1 then the torch.compile'd step); measure = the
#    pipeline numbers after an earlier run's kernel tests passed (see the phase below for its order);
#    profile = Nsight Compute on the kernels named in $GPU_NCU.
#    It points LD_LIBRARY_PATH (libnvrtc, libcublasLt) and CUDA_INCLUDE_DIRS at /usr/local/cuda and writes
#    to $OUT (default ./gpu-out) at most 8 files: summary.txt (printed last), env.txt and results.tar.gz
#    (tests.log, bench.log, sanitizer.log, bench.jsonl, the JSON of both benches, ratios.txt, images).
#    Exit status: non-zero if any test failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
GPU_DIR="$ROOT/.gpu"
# The wgmma/TMA kernels first (the emulator's reading of the PTX ISA meets the hardware), then the rest.
# kernels_compile (NVRTC only, no device; CI runs it) goes last: it compiles everything twice, uncached.
TESTS=(cuda_conv_sm90 cuda_attention_sm90 cuda_attention cuda_conv cuda_mixffn_inverted_glu cuda_linear_attention cuda_norm cuda_norm_conv cuda_elementwise cuda_misc cuda_layout cuda_decode_attention cuda_pixel_shuffle backend executor gemm_choice)
# The sm_90a benches first: they compare the Hopper kernels with the mma.sync ones on the same shapes.
BENCHES=(conv_sm90 attention_sm90 mixffn_inverted_glu conv attention linear_attention norm_conv norm elementwise layout misc decode_attention pixel_shuffle)
VARIANTS=(b-512 l-512 l-1024)

if [ "${1:-}" = "--build" ]; then
  set -e
  mkdir -p "$GPU_DIR"
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || grep -qx '/.gpu/' .gitignore 2>/dev/null || echo /.gpu/ >> .git/info/exclude
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
  J="$(mktemp)"
  cargo test --release --no-run --message-format=json --test kernels_compile --test cuda_norm --test cuda_elementwise --test cuda_linear_attention --test cuda_misc --test cuda_attention --test cuda_conv --test cuda_layout --test cuda_decode_attention --test cuda_pixel_shuffle --test cuda_conv_sm90 --test cuda_attention_sm90 --test cuda_norm_conv --test cuda_mixffn_inverted_glu >> "$J"
  cargo test --release --no-run --message-format=json -p openuni-cuda --tests >> "$J"
  cargo bench --no-run --message-format=json --bench norm --bench elementwise --bench linear_attention --bench attention --bench conv --bench layout --bench misc --bench decode_attention --bench pixel_shuffle --bench conv_sm90 --bench attention_sm90 --bench norm_conv --bench mixffn_inverted_glu >> "$J"
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
  # What travels to the device machine (the working tree included) must stay under 64 MiB: the
  # executables go as one xz archive (about a quarter of their size), unpacked there before the run.
  (cd "$GPU_DIR" && tar -cf - openuni test-* bench-* | xz -9 -T0 > bin.tar.xz && rm -f openuni test-* bench-*)
  du -sh "$GPU_DIR"
  echo "now run on the GPU machine: bash tools/gpu_run.sh   (device tool: carry [\".gpu\"])"
  exit 0
fi

PHASE="${1:-all}"
case "$PHASE" in kernels|pipeline|all|quick|measure|profile) ;; *) echo "usage: bash tools/gpu_run.sh [--build | kernels | pipeline | all | quick | measure | profile]" >&2; exit 2;; esac
if [ ! -d "$GPU_DIR" ]; then
  echo "no .gpu/ folder: build the executables first with 'bash tools/gpu_run.sh --build' on the CPU machine" >&2
  exit 2
fi
if [ -f "$GPU_DIR/bin.tar.xz" ] && [ ! -x "$GPU_DIR/openuni" ]; then
  python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$GPU_DIR/bin.tar.xz" "$GPU_DIR" \
    || { echo "could not unpack $GPU_DIR/bin.tar.xz" >&2; exit 2; }
fi
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/gpu-run.XXXXXX)"   # the logs; packed into $OUT/results.tar.gz after every step
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
touch "$WORK/tests.log" "$WORK/bench.log" "$WORK/sanitizer.log" "$WORK/ncu.log"
BUDGET="${GPU_BUDGET_S:-420}"
T_START=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T_START) )); }
pack() { tar czf "$OUT/results.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"; }

CUDA="${CUDA_HOME:-/usr/local/cuda}"
export LD_LIBRARY_PATH="$CUDA/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CUDA_INCLUDE_DIRS="${CUDA_INCLUDE_DIRS:-$CUDA/include:$CUDA/include/cccl}"
export OPENUNI_KERNEL_CACHE="${OPENUNI_KERNEL_CACHE:-/tmp/openuni-kernel-cache}"
export OPENUNI_BENCH_JSON="$WORK/bench.jsonl"
export OPENUNI_GIT_COMMIT="$(cat "$GPU_DIR/COMMIT" 2>/dev/null || echo unknown)"
export RUST_BACKTRACE=1
export PYTHONUNBUFFERED=1

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $OPENUNI_GIT_COMMIT"
  echo "phase: $PHASE, budget ${BUDGET} s"
  echo "host: $(uname -a)"
  nvidia-smi 2>&1 || echo "nvidia-smi failed"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 || true
  echo "nvcc: $(command -v nvcc || echo none) $(nvcc --version 2>/dev/null | tail -1)"
  echo "python: $(python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1)"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  echo "CUDA_INCLUDE_DIRS=$CUDA_INCLUDE_DIRS"
  ldconfig -p 2>/dev/null | grep -E 'libcuda\.so|nvrtc|cublasLt' || true
  ls "$CUDA"/lib64/libnvrtc* "$CUDA"/lib64/libcublasLt* 2>&1 | head
  ls -d "$CUDA"/include/cuda_bf16.h "$CUDA"/include/cccl 2>&1
  nproc; free -g | head -2
  ls -la "$GPU_DIR"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

printf "%-40s %-7s %7s %7s %8s %s\n" "step" "status" "passed" "failed" "seconds" "note" >> "$SUMMARY"
any_fail=0

# Runs one command for at most MAX seconds (and never past the budget); appends its output to LOG and one
# row to the summary. A step that would get under 15 s is skipped and listed as such.
run_step() { # name log max_seconds exe args...
  local name="$1" log="$2" max="$3" exe="$4"; shift 4
  local t0 t1 rc out passed failed note status lim
  lim=$(left); lim=$(( lim - 5 )); [ "$lim" -gt "$max" ] && lim="$max"
  if [ "$lim" -lt 15 ]; then
    printf "%-40s %-7s\n" "$name" "SKIPPED (out of time)" >> "$SUMMARY"; return 0
  fi
  t0=$(date +%s.%N)
  out="$(mktemp)"
  { echo; echo "===== $name: $exe $* (limit ${lim} s)"; } >> "$log"
  timeout "$lim" "$exe" "$@" > "$out" 2>&1
  rc=$?
  t1=$(date +%s.%N)
  cat "$out" >> "$log"
  passed=$(grep -Eo '[0-9]+ passed' "$out" | awk '{s+=$1} END {print s+0}')
  failed=$(grep -Eo '[0-9]+ failed' "$out" | awk '{s+=$1} END {print s+0}')
  note=""
  if grep -q "skipped: no CUDA device" "$out"; then note="SKIPPED: no CUDA device"; fi
  if grep -q "skipped: NVRTC not found" "$out"; then note="SKIPPED: NVRTC not found"; fi
  if [ $rc -eq 0 ]; then status=PASS; else status=FAIL; any_fail=1; fi
  [ $rc -eq 124 ] && { status=TIMEOUT; note="limit ${lim} s $note"; }
  printf "%-40s %-7s %7s %7s %8.1f %s\n" "$name" "$status" "$passed" "$failed" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')" "$note" >> "$SUMMARY"
  rm -f "$out"
  pack
}

OU="$GPU_DIR/openuni"
SITE=/tmp/openuni-site
torch_ready=0
torch_site() {
  if [ $torch_ready = 0 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$GPU_DIR"/whl/*.whl > "$WORK/pip.log" 2>&1 || echo "diffusers wheel install failed (see pip.log)"
    torch_ready=1
  fi
}
bench_pair() { # variant batches iters compile(0/1)
  local v="$1" b="$2" it="$3" c="$4"
  local ours="$WORK/ours-$v-b${b//,/_}.json"  # one file per call: a later pair of the variant keeps this one
  run_step "openuni bench $v b$b" "$WORK/bench.log" 240 "$OU" bench --variant "$v" --batch "$b" --device cuda --dtype bf16 --iters "$it" --profile --json "$ours"
  torch_site
  local extra=(); [ "$c" = 1 ] && extra=(--compile)
  PYTHONPATH="$SITE" run_step "torch bench $v b$b${extra:+ compile}" "$WORK/bench.log" 300 python3 tools/bench_torch.py --configs "$GPU_DIR/configs/$v" --device cuda --dtype bf16 --batch "$b" --iters "$it" "${extra[@]}" --json "$WORK/torch-$v${extra:+-compile}.json"
  if [ -f "$ours" ] && [ -f "$WORK/torch-$v${extra:+-compile}.json" ]; then
    { echo "== $v (torch${extra:+ with compile})"; python3 tools/bench_torch.py --compare "$ours" "$WORK/torch-$v${extra:+-compile}.json"; } >> "$WORK/ratios.txt" 2>&1
  fi
  pack
}

# Kernel test executables, each NAME or NAME:FILTER (a test-name filter), at most 60 s each.
run_tests() { # names...
  local t f
  for t in "$@"; do
    f=""; [ "${t#*:}" != "$t" ] && f="${t#*:}" && t="${t%%:*}"
    run_step "test $t${f:+ ($f)}" "$WORK/tests.log" 60 "$GPU_DIR/test-$t" --nocapture --test-threads=1 $f
  done
}
# Kernel benchmark executables by name, at most 60 s each.
run_benches() { # names...
  local b
  for b in "$@"; do run_step "bench $b" "$WORK/bench.log" 60 "$GPU_DIR/bench-$b"; done
}
# Every reference case through `verify` on the device, bf16 then f32 (fuzz/ and pth/ hold no case).
verify_cases() { # max_seconds
  local d dtype cases=()
  for d in tests/fixtures/*/; do [ -f "$d/case.json" ] && cases+=("$d"); done
  for dtype in bf16 f32; do
    run_step "verify cases cuda $dtype" "$WORK/tests.log" "$1" "$OU" verify "${cases[@]}" --device cuda --dtype "$dtype"
  done
}

# The torch.compile'd b-512 batch-32 step against ours (OURS: an `openuni bench --json` of this run).
compiled_step() { # ours_json
  torch_site
  PYTHONPATH="$SITE" run_step "torch bench b-512 b32 compiled" "$WORK/bench.log" 200 python3 tools/bench_torch.py --configs "$GPU_DIR/configs/b-512" --device cuda --dtype bf16 --batch 32 --iters 10 --compiled-only --json "$WORK/torch-b-512-compiled.json"
  [ -f "$WORK/torch-b-512-compiled.json" ] && [ -f "$1" ] && { echo "== b-512 (torch.compile)"; python3 tools/bench_torch.py --compare "$1" "$WORK/torch-b-512-compiled.json"; } >> "$WORK/ratios.txt" 2>&1
  pack
}

# profile: Nsight Compute on one launch of each kernel named in $GPU_NCU ("bench:kernel-regex ..."), run
# from that kernel's benchmark executable: speed of light, memory and compute workload, occupancy, warp
# states, scheduler and instruction statistics and the hottest source lines, as text in ncu.log (what
# limits a kernel, before changing it again). $GPU_PROFILE_TESTS / $GPU_PROFILE_BENCHES run first;
# $GPU_NCU_EXTRA is added to ncu's options (e.g. --print-details all: the stall reasons by kind).
if [ "$PHASE" = profile ]; then
  run_tests ${GPU_PROFILE_TESTS:-}      # optional checks first, e.g. the kernels a profile is about
  run_benches ${GPU_PROFILE_BENCHES:-}
  if command -v ncu > /dev/null 2>&1; then
    for t in ${GPU_NCU:-mixffn_inverted_glu:mixffn_inverted_glu_bf16_wgmma mixffn_inverted_glu:silu_depthwise_conv3_glu_bf16 norm_conv:rmsnorm_relu_conv2d_bf16 conv_sm90:conv2d_bf16_wgmma}; do
      b="${t%%:*}"; k="${t#*:}"
      run_step "ncu $k" "$WORK/ncu.log" 90 ncu --target-processes all --kernel-name "regex:^$k\$" --launch-skip 3 --launch-count 1 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section Occupancy \
        --section LaunchStats --section WarpStateStats --section SchedulerStats --section InstructionStats --section SourceCounters ${GPU_NCU_EXTRA:-} "$GPU_DIR/bench-$b"
    done
  else
    printf "%-40s %-7s\n" "ncu" "ABSENT" >> "$SUMMARY"
  fi
  PHASE=done
fi

# quick: a short re-check after a change (what a few device minutes allow): the kernel tests and
# kernel benches named in $GPU_QUICK_TESTS / $GPU_QUICK_BENCHES, then b-512 batch 32 against PyTorch.
if [ "$PHASE" = quick ]; then
  run_tests ${GPU_QUICK_TESTS:-cuda_conv}
  run_benches ${GPU_QUICK_BENCHES:-conv}
  [ "${GPU_QUICK_VERIFY:-0}" = 1 ] && verify_cases 60   # every reference case, bf16 and f32 (seconds)
  bench_pair b-512 32 10 0
  # GPU_QUICK_L1024=1: then our l-1024 batch 32 alone (its images/s target; PyTorch's l-1024 run takes
  # 140 s, more than a short lease has: the ratio comes from a measure run).
  [ "${GPU_QUICK_L1024:-0}" = 1 ] && run_step "openuni bench l-1024 b32" "$WORK/bench.log" 150 "$OU" bench --variant l-1024 --batch 32 --device cuda --dtype bf16 --iters 3 --profile --json "$WORK/ours-l-1024-b32.json"
  [ "${GPU_QUICK_COMPILE:-0}" = 1 ] && compiled_step "$WORK/ours-b-512-b32.json"
  PHASE=done
fi

# measure: after the kernel tests of an earlier run passed (docs/gpu-results.md), the pipeline numbers a
# lease is for, in order of value: the kernel tests of kernels changed since ($GPU_MEASURE_TESTS), the
# benches of the kernels changed most ($GPU_MEASURE_FIRST_BENCHES), b-512
# batch 1 and 32 against PyTorch eager, every reference case through `verify` on the device, l-1024 batch 32
# against eager, the torch.compile'd b-512 step and decode, the changed kernels' benches
# ($GPU_MEASURE_BENCHES), then the sanitizers while time lasts.
if [ "$PHASE" = measure ]; then
  run_tests ${GPU_MEASURE_TESTS:-cuda_norm cuda_pixel_shuffle cuda_norm_conv cuda_conv:glu cuda_mixffn_inverted_glu cuda_linear_attention cuda_misc cuda_elementwise cuda_attention_sm90 cuda_conv_sm90 backend executor gemm_choice}
  run_benches ${GPU_MEASURE_FIRST_BENCHES:-norm_conv mixffn_inverted_glu}
  bench_pair b-512 1,32 10 0
  verify_cases 60
  bench_pair l-1024 32 5 0
  compiled_step "$WORK/ours-b-512-b1_32.json"
  run_benches ${GPU_MEASURE_BENCHES:-linear_attention misc conv}
  for t in cuda_linear_attention cuda_attention_sm90; do
    run_step "memcheck $t" "$WORK/sanitizer.log" 90 compute-sanitizer --tool memcheck --error-exitcode 9 "$GPU_DIR/test-$t" --test-threads=1
  done
  PHASE=done
fi

# 1. Kernel tests, CUBIN (real hardware: the first correctness check of every kernel on a GPU).
if [ "$PHASE" = kernels ] || [ "$PHASE" = all ]; then
  for t in "${TESTS[@]}"; do
    exe="$GPU_DIR/test-$t"
    [ -x "$exe" ] || { printf "%-40s %-7s\n" "test $t" "MISSING" >> "$SUMMARY"; any_fail=1; continue; }
    run_step "test $t" "$WORK/tests.log" 90 "$exe" --nocapture --test-threads=1
  done
fi

# 2. b-512 against PyTorch eager on the same shapes.
if [ "$PHASE" = pipeline ] || [ "$PHASE" = all ]; then
  bench_pair b-512 1,32 10 0
  # 3. Numerics of the whole pipeline on the GPU: every reference case, then a batched generate.
  verify_cases 90
  printf 'a red fox\na lighthouse at dusk\na bowl of cherries\n' > "$WORK/prompts.txt"
  run_step "generate tiny --batch 3" "$WORK/tests.log" 60 "$OU" generate --prompts "$WORK/prompts.txt" --batch 3 --device cuda --dtype bf16 --out "$WORK/images"
fi

# 4. Kernel benchmarks (the sm_90a vs mma.sync comparisons first).
if [ "$PHASE" = kernels ] || [ "$PHASE" = all ]; then
  for b in "${BENCHES[@]}"; do
    exe="$GPU_DIR/bench-$b"
    [ -x "$exe" ] || { printf "%-40s %-7s\n" "bench $b" "MISSING" >> "$SUMMARY"; continue; }
    run_step "bench $b" "$WORK/bench.log" 60 "$exe"
  done
fi

# 5. What is left, while time lasts.
if [ "$PHASE" = pipeline ] || [ "$PHASE" = all ]; then
  bench_pair b-512 32 10 1
  bench_pair l-1024 1,32 10 0
  bench_pair l-512 1,32 10 0
  for v in b-512 l-512; do
    for shape in "1 2048 13" "64 512 0"; do
      set -- $shape
      run_step "openuni bench --chat $v b$1 p$2" "$WORK/bench.log" 120 "$OU" bench --chat --variant "$v" --device cuda --dtype bf16 --batch "$1" --chat-prompt "$2" --vit-tiles "$3" --iters 50 --json "$WORK/ours-chat-$v-b$1.json"
      PYTHONPATH="$SITE" run_step "torch chat bench $v b$1 p$2" "$WORK/bench.log" 120 python3 tools/bench_torch_chat.py --configs "$GPU_DIR/configs/$v" --device cuda --dtype bf16 --batch "$1" --prompt "$2" --vit-tiles "$3" --iters 50 --json "$WORK/torch-chat-$v-b$1.json"
    done
  done
fi
if [ "$PHASE" = kernels ] || [ "$PHASE" = all ]; then
  [ -x "$GPU_DIR/test-kernels_compile" ] && run_step "test kernels_compile" "$WORK/tests.log" 120 "$GPU_DIR/test-kernels_compile" --nocapture --test-threads=1
  for t in cuda_norm cuda_elementwise cuda_linear_attention cuda_misc cuda_attention_sm90 cuda_conv_sm90; do
    exe="$GPU_DIR/test-$t"
    [ -x "$exe" ] || continue
    OPENUNI_KERNEL_FORMAT=ptx run_step "test $t (ptx)" "$WORK/tests.log" 90 "$exe" --test-threads=1
  done
  if command -v compute-sanitizer > /dev/null 2>&1; then
    for t in cuda_norm cuda_linear_attention cuda_attention_sm90; do
      exe="$GPU_DIR/test-$t"
      [ -x "$exe" ] || continue
      run_step "memcheck $t" "$WORK/sanitizer.log" 120 compute-sanitizer --tool memcheck --error-exitcode 9 "$exe" --test-threads=1
      run_step "racecheck $t" "$WORK/sanitizer.log" 120 compute-sanitizer --tool racecheck --error-exitcode 9 "$exe" --test-threads=1
    done
  else
    printf "%-40s %-7s\n" "compute-sanitizer" "ABSENT" >> "$SUMMARY"
  fi
fi

cp "$SUMMARY" "$WORK/summary.txt"
pack
echo
echo "===== benchmark lines"
grep -E "GB/s|TFLOP/s|copy:|speed-up|x " "$WORK/bench.log" | head -150 || true
if [ -s "$WORK/ncu.log" ]; then
  echo
  echo "===== ncu (the headline metrics; all of it in ncu.log)"
  grep -E '^  [a-z_0-9]+_(bf16|f32)|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per Thread|Issue Slots Busy|No Eligible|Warp Cycles Per Issued|ERR_' "$WORK/ncu.log" | head -80
fi
echo
echo "===== ratios"
cat "$WORK/ratios.txt" 2>/dev/null
echo
echo "===== failures"
grep -E "panicked|FAILED|error:|ERROR SUMMARY: [1-9]" "$WORK/tests.log" "$WORK/sanitizer.log" | head -40 || true
echo
echo "===== summary ($OUT; logs in results.tar.gz)"
cat "$SUMMARY"
exit $any_fail
