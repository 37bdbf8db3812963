#!/usr/bin/env bash
# tools/gpu_session.sh — runs lancet's GPU checks on a GPU machine from a kit that
# tools/gpu_kit.sh packed elsewhere (.gpukit/ in the repository root). Run from the root:
#
#   tools/gpu_session.sh info        GPU, driver, libraries found, lancet --version
#   tools/gpu_session.sh tests [RE]  every test_gpu_* binary (gtest filter RE, default all)
#   tools/gpu_session.sh sanitize    compute-sanitizer memcheck over the kernel, conv/linear,
#                                    BatchNorm and optimizer tests, racecheck/synccheck over the
#                                    kernel tests
#   tools/gpu_session.sh bench       lancet vs PyTorch side by side (tools/reference/
#                                    side_by_side.py), 224x224, batch 256, per precision, both
#                                    channels_last (MEMORY_FORMAT=nchw for the other layout)
#   tools/gpu_session.sh lab [ARGS]  every kernel-lab binary (lab_*, kernels/lab/): each version
#                                    checked against the CPU twin, then timed (ARGS: e.g. --quick)
#   tools/gpu_session.sh sweep       lancet sweep on the GPU: fp32 / fp16 / bf16 x batch 64, 256
#                                    at 224 px (throughput, phases, peak memory per precision),
#                                    with the scaling model's projection to 8-64 GPUs
#   tools/gpu_session.sh data        the loader (issue 7): lancet bench data from a 224x224 CLAHE
#                                    pack and its PNG folder, 0-16 workers, pageable vs pinned
#                                    batches with the host->device copy timed; then a short
#                                    GPU training run from the pack for its data_wait share
#   tools/gpu_session.sh all         info, tests, bench
#
# Logs go to $OUT (the device tool's output folder) or LOG_DIR (default /tmp/lancet-gpu): one
# file per step (info.log, tests.log, sanitize.log, bench.md, bench_<precision>.json, lab.log,
# sweep.md/.csv/.log, data.log). Each
# step is bounded by `timeout` so that one hang cannot eat the session (STEP_TIMEOUT seconds,
# default 240 per binary). The exit status is non-zero when any test failed.
#
# The kit's binaries have the build machine's absolute paths compiled in (.gpukit/paths):
# when the source path does not exist here, it is made a symbolic link to this checkout.
# cuDNN, cuBLAS(Lt), NCCL and NVRTC come from this machine's Python `nvidia` packages
# (PyTorch's), found under every nvidia/*/lib folder of python3's site-packages.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOG=${OUT:-${LOG_DIR:-/tmp/lancet-gpu}}
mkdir -p "$LOG"
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
KIT=$ROOT/.gpukit
[[ -f $KIT/kit.tar.xz && -f $KIT/paths ]] || { echo "gpu_session: no kit in $KIT: run tools/gpu_kit.sh where lancet builds, and carry .gpukit" >&2; exit 2; }
kv() { sed -n "s/^$1=//p" "$KIT/paths"; }
SRC=$(kv source_dir)
BUILD=$(kv build_dir)

setup() {
  if [[ "$SRC" != "$ROOT" ]]; then
    if [[ -e "$SRC" && "$(realpath "$SRC")" != "$(realpath "$ROOT")" ]]; then
      echo "gpu_session: $SRC exists here and is not this checkout; the kit's compiled-in paths cannot be made to resolve" >&2
      exit 2
    fi
    mkdir -p "$(dirname "$SRC")"
    [[ -e "$SRC" ]] || ln -s "$ROOT" "$SRC"
  fi
  if [[ ! -x "$BUILD/bin/lancet" || "$KIT/kit.tar.xz" -nt "$BUILD/bin/lancet" ]]; then
    mkdir -p "$BUILD"
    if ! tar -C "$BUILD" -xJf "$KIT/kit.tar.xz" 2>/dev/null; then  # no xz here: Python's lzma
      python3 -c "import sys, tarfile; tarfile.open(sys.argv[1], 'r:xz').extractall(sys.argv[2])" \
        "$KIT/kit.tar.xz" "$BUILD" || { echo "gpu_session: cannot unpack the kit" >&2; exit 2; }
    fi
    touch "$BUILD/bin/lancet"
  fi
  local nv
  nv=$(python3 - <<'EOF' 2>/dev/null
import os, site
dirs = []
for sp in site.getsitepackages() + [site.getusersitepackages()]:
    root = os.path.join(sp, "nvidia")
    for dp, dn, fn in os.walk(root) if os.path.isdir(root) else []:
        if os.path.basename(dp) == "lib" and any(".so" in f for f in fn):
            dirs.append(dp)
print(":".join(dirs))
EOF
  )
  export LD_LIBRARY_PATH="$BUILD/kitlib${nv:+:$nv}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PATH="$BUILD/bin:$PATH"
  LANCET=$BUILD/bin/lancet
}

info() {
  {
    echo "== kit"; cat "$KIT/paths"
    echo "== machine"; uname -a; nproc; (. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME"); ldd --version | head -1
    echo "== nvidia-smi"; nvidia-smi 2>&1 | head -20
    echo "== libraries"; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    ldd "$LANCET" | grep -E "not found|cudnn|cublas|nccl|cudart|stdc\+\+" 
    echo "== lancet --version"; "$LANCET" --version
    echo "== tools"; command -v compute-sanitizer ncu nsys 2>&1
  } 2>&1 | tee "$LOG/info.log"
}

tests() {
  local filter=${1:-*} rc=0 t
  : >"$LOG/tests.log"
  local one=$LOG/.one.log
  for t in "$BUILD"/bin/test_gpu_*; do
    echo "== $(basename "$t") (filter $filter)" >>"$LOG/tests.log"
    timeout -k 10 "$STEP_TIMEOUT" "$t" --gtest_filter="$filter" --gtest_color=no >"$one" 2>&1
    local r=$?
    ((r == 124)) && echo "TIMED OUT after $STEP_TIMEOUT s" >>"$one"
    ((r != 0)) && rc=1
    cat "$one" >>"$LOG/tests.log"
    printf '%-24s exit %3d: %3d passed, %3d skipped, %3d failed%s\n' "$(basename "$t")" "$r" \
      "$(grep -c '^\[       OK \]' "$one")" "$(grep -c '^\[  SKIPPED \] [A-Za-z].*ms)$' "$one")" \
      "$(grep -c '^\[  FAILED  \] [A-Za-z].*(' "$one")" "$( ((r == 124)) && echo ' (timed out)')"
  done
  rm -f "$one"
  echo "== failed tests:"; grep -E "^\[  FAILED  \] [A-Za-z]" "$LOG/tests.log" | sort -u || echo "  none"
  return $rc
}

sanitize() {
  local rc=0 t
  command -v compute-sanitizer >/dev/null || { echo "gpu_session: no compute-sanitizer on PATH" | tee "$LOG/sanitize.log"; return 1; }
  : >"$LOG/sanitize.log"
  for t in test_gpu_kernels test_gpu_conv_linear test_gpu_batchnorm test_gpu_channels_last test_gpu_optim; do
    [[ -x "$BUILD/bin/$t" ]] || continue
    echo "== memcheck $t" | tee -a "$LOG/sanitize.log"
    timeout -k 10 "$STEP_TIMEOUT" compute-sanitizer --tool memcheck --leak-check full --error-exitcode 3 \
      "$BUILD/bin/$t" --gtest_color=no >>"$LOG/sanitize.log" 2>&1 || rc=1
    tail -n 3 "$LOG/sanitize.log" | sed "s|^|  |"
  done
  # The shared-memory reductions: block sums (kernels) and the channels_last column sums.
  for tool in racecheck synccheck; do
    for t in test_gpu_kernels test_gpu_channels_last; do
      echo "== $tool $t" | tee -a "$LOG/sanitize.log"
      timeout -k 10 "$STEP_TIMEOUT" compute-sanitizer --tool $tool --error-exitcode 3 \
        "$BUILD/bin/$t" --gtest_color=no >>"$LOG/sanitize.log" 2>&1 || rc=1
      tail -n 3 "$LOG/sanitize.log" | sed "s|^|  |"
    done
  done
  return $rc
}

bench() {
  local rc=0 p
  : >"$LOG/bench.md"
  for p in ${PRECISIONS:-fp32 fp16 bf16}; do
    echo "== $p" | tee -a "$LOG/bench.md"
    timeout -k 10 $((STEP_TIMEOUT * 2)) python3 tools/reference/side_by_side.py "$LANCET" --device cuda \
      --precision "$p" --batch-size "${BATCH:-256}" --image-size "${IMAGE:-224}" --threads "$(nproc)" \
      --rounds "${ROUNDS:-2}" --cudnn-autotune --torch-steps 20 --lancet-extra "--warmup 3 --steps 20" \
      --memory-format "${MEMORY_FORMAT:-channels_last}" \
      --json-out "$LOG/bench_$p.json" >>"$LOG/bench.md" 2>&1 || rc=1
    tail -n 20 "$LOG/bench.md" | grep -E "^\| [0-9]|WARNING|failed" | sed "s|^|  |"
  done
  # Pipeline stages on GPUs against the unpipelined model on one (issue 6's report): the one-GPU
  # mode, and both stages on their own GPUs where two are visible.
  local devs=("")
  (( $(nvidia-smi -L 2>/dev/null | wc -l) >= 2 )) && devs+=("--set pipeline.devices=[cuda:0,cuda:1]")
  for d in "${devs[@]}"; do
    echo "== pipeline ${d:-one GPU}" | tee -a "$LOG/bench.md"
    timeout -k 10 "$STEP_TIMEOUT" "$LANCET" bench train --device cuda --precision bf16 --batch-size "${BATCH:-256}" \
      --set data.image_size="${IMAGE:-224}" --set data.channels=3 --set pipeline.stages=2 \
      --set pipeline.micro_batches=4 --warmup 3 --steps 10 $d >>"$LOG/bench.md" 2>&1 || rc=1
    tail -n 6 "$LOG/bench.md" | sed "s|^|  |"
  done
  return $rc
}

lab() {
  local rc=0 t one=$LOG/.one.log
  : >"$LOG/lab.log"
  ls "$BUILD"/bin/lab_* >/dev/null 2>&1 || { echo "gpu_session: no lab_* binaries in the kit" | tee "$LOG/lab.log"; return 1; }
  for t in "$BUILD"/bin/lab_*; do
    echo "== $(basename "$t") $*" | tee -a "$LOG/lab.log"
    timeout -k 10 $((STEP_TIMEOUT * 2)) "$t" "$@" >"$one" 2>&1
    local r=$?
    ((r == 124)) && echo "TIMED OUT after $((STEP_TIMEOUT * 2)) s" >>"$one"
    ((r != 0)) && rc=1
    cat "$one" >>"$LOG/lab.log"
    grep -E "fastest for|FAILED|TIMED OUT|no CUDA device|^lab_" "$one" | sed "s|^|  |"
  done
  rm -f "$one"
  return $rc
}

sweep() {
  local dir=/tmp/lancet-sweep rc=0
  rm -rf "$dir"
  timeout -k 10 $((STEP_TIMEOUT * 2)) "$LANCET" sweep --device cuda --precision fp32,fp16,bf16 --ranks 1 \
    --threads "$(nproc)" --batch-size "${SWEEP_BATCH:-64,256}" --image-size "${IMAGE:-224}" --launcher none \
    --steps 20 --warmup 5 --predict --project 8,16,64 --set train.cudnn_autotune=true --out "$dir" \
    >"$LOG/sweep.log" 2>&1 || rc=1
  cp "$dir/sweep.md" "$LOG/sweep.md" 2>/dev/null; cp "$dir/sweep.csv" "$LOG/sweep.csv" 2>/dev/null
  tail -n 30 "$LOG/sweep.md" 2>/dev/null || tail -n 5 "$LOG/sweep.log"
  return $rc
}

data() {
  local dir=/tmp/lancet-data rc=0
  rm -rf "$dir" && mkdir -p "$dir"
  {
    "$LANCET" synth --out "$dir/synth" --train 2000 --val 200 --size 256 &&
      "$LANCET" prep --data "$dir/synth" --out "$dir/pack224.h5" --image-size 224 --threads "$(nproc)" \
        --set 'data.preprocess=[{op: clahe}]'
  } >"$LOG/data.log" 2>&1 || { tail -n 5 "$LOG/data.log"; return 1; }
  echo "== bench data" | tee -a "$LOG/data.log"
  timeout -k 10 $((STEP_TIMEOUT * 2)) "$LANCET" bench data --data-list "$dir/pack224.h5,$dir/synth" --image-size 224 \
    --channels 1 --batch-size 32 --set 'data.preprocess=[{op: clahe}]' --set data.augment.hflip=0.5 \
    --workers-list 0,1,2,4,8,16 --batches 60 --device cuda --batch-memory pageable,pinned >>"$LOG/data.log" 2>&1 || rc=1
  tail -n 30 "$LOG/data.log" | sed "s|^|  |"
  # The trainer's data-wait share on the GPU (the step-phase table at the end of the epoch).
  echo "== train from the pack, bf16, batch 256" | tee -a "$LOG/data.log"
  timeout -k 10 $((STEP_TIMEOUT * 2)) "$LANCET" train --device cuda --precision bf16 --data "$dir/pack224.h5" \
    --image-size 224 --batch-size 256 --epochs 1 --set data.channels=1 --set 'data.preprocess=[{op: clahe}]' \
    --set data.augment.hflip=0.5 --set data.workers=8 --out "$dir/run" >>"$LOG/data.log" 2>&1 || rc=1
  grep -E "^ *(phase|data_wait|h2d|forward|backward|optimizer|other|step) " "$LOG/data.log" | tail -n 10 | sed "s|^|  |"
  return $rc
}

setup
case "${1:-all}" in
  info) info ;;
  tests) tests "${2:-*}" ;;
  sanitize) sanitize ;;
  bench) bench ;;
  lab) shift; lab "$@" ;;
  sweep) sweep ;;
  data) data ;;
  all) info; tests; t=$?; bench; b=$?; exit $((t | b)) ;;
  *) echo "usage: tools/gpu_session.sh info|tests [FILTER]|sanitize|bench|lab [ARGS]|sweep|data|all" >&2; exit 2 ;;
esac
