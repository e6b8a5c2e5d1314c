#!/usr/bin/env bash
# One verdict on densenet_fast's CUDA path, from a bare GPU machine, in at most BUDGET_S seconds
# (default 540 = 9 minutes) including the build. The exit code is the verdict (0: every step passed).
#
#   1. environment: nvidia-smi, torch/CUDA versions, the GPU
#   2. build for the visible GPU's architecture only (MAX_JOBS=16), in place  [--prebuilt: skip]
#   3. the CUDA tests (tests/test_cuda_dense_block.py, default 1x1 path) and the Triton SE tests
#      (tests/test_squeeze_excite.py -k test_cuda_); a skipped test counts as a failure
#   4. the CUDA tests that exercise half precision again with DNF_CUDA_BN_GEMM=fused as the default
#   5. compute-sanitizer memcheck (all kernels), racecheck and synccheck (the shared-memory kernel
#      bn_relu_gemm_kernel) on `tools/gpu_checks.py smoke`: tree reductions, grid.y > 1, fp16/bf16
#   6. the GPU benchmark (benchmarks/bench_cuda_block.py) with a hard time budget: densenet121 and
#      densenet201, ours vs torchvision / memory_efficient / torch.compile; JSON rows written as they
#      finish, under benchmarks/results/ with the GPU named
#   7. the SE kernels vs timm's SEModule (fwd+bwd time, achieved HBM bandwidth)
#   8. a one-screen summary (tools/gpu_checks.py summary), with the issue's targets
#
# Usage: tools/run_gpu_checks.sh [--prebuilt] [--build-only] [--dry-run] [--budget-s S] [--skip STEP,...]
#   --prebuilt    use the extension already built in place (densenet_fast/_C*.so), see tools/README.md
#   --build-only  build, check the build, stop
#   --dry-run     print the plan (steps, commands, time limits) and check the helpers; runs nothing on a GPU
#   --skip        comma-separated step names to leave out: tests, fused-tests, sanitizer, bench, se
# Environment: PYTHON (default python), CUDA_HOME (default /usr/local/cuda), MAX_JOBS (default 16),
#   TORCH_CUDA_ARCH_LIST (default: the visible GPU's), SANITIZER (default compute-sanitizer on PATH or in
#   $CUDA_HOME/bin), LOG_DIR (default benchmarks/results/gpu_checks_<GPU>_<time>).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
BUDGET_S=540 PREBUILT=0 BUILD_ONLY=0 DRY=0 SKIP=","
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prebuilt) PREBUILT=1 ;;
    --build-only) BUILD_ONLY=1 ;;
    --dry-run) DRY=1 ;;
    --budget-s) BUDGET_S=$2; shift ;;
    --skip) SKIP=",$2,"; shift ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "run_gpu_checks.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $BUDGET_S =~ ^[0-9]+$ ]] || { echo "--budget-s: expected whole seconds, got $BUDGET_S" >&2; exit 2; }

START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
GPU=$( (nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || echo no_gpu) | head -n1 | tr -c 'A-Za-z0-9\n' '_')
LOG_DIR=${LOG_DIR:-benchmarks/results/gpu_checks_${GPU}_$(date -u +%Y%m%d_%H%M%S)}
mkdir -p "$LOG_DIR"
: > "$LOG_DIR/steps.tsv"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
unset DNF_CUDA_BN_GEMM  # the default path, unless a step sets it

left() { echo $((DEADLINE - $(date +%s))); }
skipped() { [[ $SKIP == *",$1,"* ]]; }

# step NAME LIMIT_S RESERVE_S CMD...: runs CMD with a timeout of min(LIMIT_S, time left - RESERVE_S),
# output to $LOG_DIR/NAME.log, and records name, status, seconds and log in steps.tsv.
step() {
  local name=$1 limit=$2 reserve=$3; shift 3
  local log="$LOG_DIR/$name.log" t0 rc status avail
  avail=$(( $(left) - reserve ))
  (( avail < limit )) && limit=$avail
  if [[ $DRY == 1 ]]; then
    printf '[dry-run] %-28s timeout %4ss  %s\n' "$name" "$limit" "$*"
    return 0
  fi
  if (( limit < 5 )); then
    printf '%s\tnot-run\t0\t(time budget)\n' "$name" >> "$LOG_DIR/steps.tsv"
    echo "=== $name: not run (time budget spent)"
    return 1
  fi
  echo "=== $name (limit ${limit}s): $*"
  t0=$(date +%s)
  # bash -c: CMD may be one of the exported functions below
  timeout --signal=TERM --kill-after=10 "$limit" bash -c '"$@"' bash "$@" > "$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT ;;
    *) status=FAILED ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$log" >> "$LOG_DIR/steps.tsv"
  echo "--- $name: $status (rc $rc, $(( $(date +%s) - t0 )) s)"
  [[ $status == ok ]] || tail -n 25 "$log"
  return $rc
}

# pytest with a junit file whose skips count as failures (tools/gpu_checks.py junit).
pytest_step() {
  local name=$1 limit=$2 reserve=$3; shift 3
  step "$name" "$limit" "$reserve" bash -c '
    "$0" -m pytest -q -rs -p no:cacheprovider --junitxml="$1" "${@:3}"; rc=$?
    "$0" tools/gpu_checks.py junit "$1" || rc=1
    exit $rc' "$PY" "$LOG_DIR/$name.xml" "$name" "$@"
}

environment() {
  nvidia-smi || return 1
  "$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "torch sees no GPU"
p = torch.cuda.get_device_properties(0)
print(f"GPU {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB); torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
EOF
}

build() {
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  fi
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16} CUDA_HOME=$CUDA_HOME"
  TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py build_ext --inplace
}

build_info() {
  "$PY" - <<'EOF'
import torch
import densenet_fast as dnf
info = dnf.build_info()
print(info)
assert info["cuda"], "extension built without CUDA kernels"
assert info["cuda_kernels_registered"], "CUDA kernels not registered"
cap = "%d.%d" % torch.cuda.get_device_capability()
archs = str(info.get("cuda_archs", ""))
assert cap in archs or cap.replace(".", "") in archs, f"no device code for this GPU (sm {cap}) in {archs!r}"
EOF
}

export -f environment build build_info
export PY LOG_DIR
echo "GPU checks -> $LOG_DIR (budget ${BUDGET_S}s)"
if [[ $DRY == 1 ]]; then
  echo "[dry-run] helpers:"; "$PY" tools/gpu_checks.py --help > /dev/null && echo "[dry-run]   tools/gpu_checks.py ok"
fi

step environment 30 0 environment
(( DRY == 0 )) && { "$PY" -c "import torch; print(torch.cuda.get_device_name())" > "$LOG_DIR/environment.txt" 2>&1;
                    tail -n 1 "$LOG_DIR/environment.log" >> "$LOG_DIR/environment.txt" 2>/dev/null; }
if [[ $PREBUILT == 0 ]]; then
  step build 300 240 build
fi
step build-info 30 0 build_info
if [[ $BUILD_ONLY == 1 ]]; then
  "$PY" tools/gpu_checks.py summary "$LOG_DIR"; exit $?
fi

CUDA_TESTS=(tests/test_cuda_dense_block.py tests/test_squeeze_excite.py -k "test_cuda_ or not test_squeeze_excite")
skipped tests || pytest_step tests 150 200 "${CUDA_TESTS[@]}"
skipped fused-tests || DNF_CUDA_BN_GEMM=fused pytest_step fused-tests 50 170 tests/test_cuda_dense_block.py \
  -k "autocast or half or stream or deterministic or opcheck or weight_grad or nonfinite"

SAN=${SANITIZER:-$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")}
SMOKE=("$PY" tools/gpu_checks.py smoke)
if ! skipped sanitizer; then
  step memcheck 90 130 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 1 \
    --leak-check no "${SMOKE[@]}"
  step racecheck 45 100 "$SAN" --tool racecheck --error-exitcode 1 --racecheck-report all \
    --kernel-name kns=bn_relu_gemm_kernel "${SMOKE[@]}" --fused-only
  step synccheck 45 80 "$SAN" --tool synccheck --error-exitcode 1 --kernel-name kns=bn_relu_gemm_kernel \
    "${SMOKE[@]}" --fused-only
fi

if ! skipped bench; then
  BENCH_S=$(( $(left) - 40 ))
  (( BENCH_S < 30 )) && BENCH_S=30
  step bench $((BENCH_S + 30)) 30 "$PY" -m benchmarks.bench_cuda_block --budget-s "$BENCH_S" --out "$LOG_DIR"
fi
skipped se || step se 35 0 "$PY" -m benchmarks.bench_se --json "$LOG_DIR/bench_se.json"

if [[ $DRY == 1 ]]; then
  echo "[dry-run] summary: $PY tools/gpu_checks.py summary $LOG_DIR"
  rm -rf "$LOG_DIR"
  exit 0
fi
echo "total $(( $(date +%s) - START )) s"
"$PY" tools/gpu_checks.py summary "$LOG_DIR"
