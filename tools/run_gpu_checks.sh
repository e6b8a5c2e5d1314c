#!/usr/bin/env bash
# One verdict on densenet_fast's CUDA path, in phases that fit the device tool: each phase (or a few
# together) is one call of at most 10 minutes on the same warm machine; every call leaves exactly two
# files in $OUT: summary.txt (one screen, also printed last) and gpu_checks.tar.gz (every log, junit
# file and benchmark JSON so far). Logs and the build persist between calls in $LOG_DIR and build/.
#
# Phases (default: all, in this order; tools/README.md gives the device calls):
#   preflight  interpreter, nvidia-smi, torch/CUDA/cuDNN versions and the GPU, nvcc, Python headers,
#              ninja, test packages; a probe kernel built with nvcc runs plain and under compute-sanitizer
#              (an unsupported sanitizer is recorded, and the sanitizer phase reports it instead of failing).
#              Starts a new record: clears $LOG_DIR.
#   build      FORCE_CUDA=1 build for the visible GPU's arch (MAX_JOBS=16; ninja reuses build/'s objects),
#              then build-info (CUDA kernels registered, device code for this GPU). A failed build
#              reports its first compiler errors.
#   tests      tests/test_cuda_dense_block.py and the Triton SE tests (default 1x1 path), then the
#              half-precision ones with DNF_CUDA_BN_GEMM=fused; a skipped test counts as a failure
#   sanitizer  compute-sanitizer on `tools/gpu_checks.py smoke`, restricted to our kernels (dnf::cuda:
#              for_each_kernel, bn_relu_gemm_kernel, the statistics kernel): memcheck, then racecheck
#              and synccheck on bn_relu_gemm_kernel; odd channel counts reach its element-wise variant
#   bench      benchmarks/bench_cuda_block.py within what is left, then the SE benchmark
#
# Usage: tools/run_gpu_checks.sh [PHASE ...] [--prebuilt] [--dry-run] [--budget-s S] [--skip STEP,...]
#                                [--simulate STEP=STATUS,...]
#   --prebuilt    never build (tests/sanitizer/bench use the extension built by an earlier `build` call)
#   --dry-run     print the plan (steps, commands, time limits); runs nothing
#   --budget-s    this call's wall-clock budget, summary and archive included (default 540)
#   --skip        step names to leave out (see --dry-run), or a phase name for all of its steps
#   --simulate    run a canned stand-in for STEP ending in STATUS (ok, fail, timeout, unsupported): the
#                 script's own test (tests/test_cuda_gpu_checks.py) on machines without a GPU
# Exit code of a call: 0 every step of this call passed, 1 a step failed, 3 incomplete (a time limit,
# an unsupported tool; nothing failed), 2 bad arguments.
# Environment: PYTHON (default: the first of python3, python that imports torch), CUDA_HOME (default:
#   from nvcc on PATH, else /usr/local/cuda), MAX_JOBS (16), TORCH_CUDA_ARCH_LIST (default: the visible
#   GPU's), SANITIZER, LOG_DIR (default build/gpu_checks), OUT (default $LOG_DIR/out).
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ALL_PHASES=(preflight build tests sanitizer bench)
BUDGET_S=540 PREBUILT=0 DRY=0 SKIP="," SIMULATE="," PHASES=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    preflight|build|tests|sanitizer|bench) PHASES+=("$1") ;;
    all) PHASES+=("${ALL_PHASES[@]}") ;;
    --prebuilt) PREBUILT=1 ;;
    --build-only) PHASES+=(preflight build) ;;  # the old flag
    --dry-run) DRY=1 ;;
    --budget-s) BUDGET_S=${2:-}; shift ;;
    --skip) SKIP=",${2:-},"; shift ;;
    --simulate) SIMULATE=",${2:-},"; shift ;;
    -h|--help) sed -n '2,37p' "$0"; exit 0 ;;
    *) echo "run_gpu_checks.sh: unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
[[ $BUDGET_S =~ ^[0-9]+$ ]] || { echo "--budget-s: expected whole seconds, got '$BUDGET_S'" >&2; exit 2; }
(( ${#PHASES[@]} )) || PHASES=("${ALL_PHASES[@]}")
has_phase() { [[ " ${PHASES[*]} " == *" $1 "* ]]; }

START=$(date +%s)
DEADLINE=$((START + BUDGET_S))
FINAL_RESERVE=15  # summary + archive
LOG_DIR=${LOG_DIR:-build/gpu_checks}
RESULT_DIR=${OUT:-$LOG_DIR/out}
if [[ $DRY == 0 ]]; then
  has_phase preflight && rm -rf "$LOG_DIR"
  mkdir -p "$LOG_DIR" "$RESULT_DIR"
  touch "$LOG_DIR/steps.tsv"
fi
export LOG_DIR PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
unset DNF_CUDA_BN_GEMM  # the default path, unless a step sets it

# --- the interpreter: $PYTHON, else the first python3 / python that imports torch -------------------
find_python() {
  local c
  for c in ${PYTHON:-} python3 python /opt/torch/.venv/bin/python3; do
    command -v "$c" > /dev/null 2>&1 && "$c" -c "import torch" > /dev/null 2>&1 && { command -v "$c"; return 0; }
  done
  return 1
}
if ! PY=$(find_python); then
  msg="no Python interpreter that imports torch (tried: ${PYTHON:-} python3 python /opt/torch/.venv/bin/python3)"
  echo "run_gpu_checks.sh: $msg" >&2
  if [[ $DRY == 0 ]]; then  # the summary without Python
    printf 'GPU checks (%s)\n  FAILED   interpreter: %s\nVERDICT: FAIL\n' "${PHASES[*]}" "$msg" \
      | tee "$RESULT_DIR/summary.txt"
    tar czf "$RESULT_DIR/gpu_checks.tar.gz" --exclude ./out -C "$LOG_DIR" . 2> /dev/null
  fi
  exit 1
fi
export PY
if [[ -z ${CUDA_HOME:-} ]]; then
  NVCC=$(command -v nvcc || true)
  CUDA_HOME=${NVCC:+$(dirname "$(dirname "$NVCC")")}
  CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
fi
export CUDA_HOME PATH="$PATH:$CUDA_HOME/bin"
SAN=${SANITIZER:-$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")}
export SAN

CLOCK_SKEW=0  # --dry-run: each planned step advances the clock by its estimate
left() { echo $((DEADLINE - $(date +%s) - CLOCK_SKEW)); }
skipped() { [[ $SKIP == *",$1,"* || $SKIP == *",$2,"* ]]; }

# --- the plan: each step's estimate (seconds, tools/gpu_checks.py STEPS: measured CPU-side parts plus the
# GPU work) and its cap. A step's limit is min(cap, time left - FINAL_RESERVE - the estimates of this
# call's later steps), but not below its own estimate while time is left: a slow step shortens the later
# ones (the benchmark last) rather than the earlier ones.
declare -A EST CAP
while read -r name est cap; do EST[$name]=$est; CAP[$name]=$cap; done < <("$PY" tools/gpu_checks.py estimates)
PLAN=()
plan_step() { skipped "$1" "$2" || PLAN+=("$1"); }
for ph in "${PHASES[@]}"; do
  case $ph in
    preflight) plan_step environment preflight; plan_step sanitizer-probe preflight ;;
    build) (( PREBUILT )) || plan_step build build; plan_step build-info build ;;
    tests) plan_step tests tests; plan_step fused-tests tests ;;
    sanitizer) plan_step memcheck sanitizer; plan_step racecheck sanitizer; plan_step synccheck sanitizer ;;
    bench) plan_step bench bench; plan_step se bench ;;
  esac
done
later_estimates() {  # sum of the estimates of the planned steps after $1
  local s=0 seen=0 n
  for n in "${PLAN[@]}"; do
    (( seen )) && s=$((s + ${EST[$n]:-30}))
    [[ $n == "$1" ]] && seen=1
  done
  echo $s
}

# step NAME CMD...: runs CMD under its limit (SIGINT first, so pytest writes its junit file and the
# benchmark its rows; SIGKILL 15 s later), output to $LOG_DIR/NAME.log; records name, status, seconds,
# limit and log in steps.tsv. Status: ok, FAILED, TIMEOUT, UNSUPPORTED (tools/gpu_checks.py classify).
step() {
  local name=$1; shift
  local limit=${CAP[$name]:-60} est=${EST[$name]:-30} avail t0 rc status sim
  avail=$(( $(left) - $(later_estimates "$name") - FINAL_RESERVE ))
  (( avail < est )) && avail=$est
  (( avail > $(left) - FINAL_RESERVE )) && avail=$(( $(left) - FINAL_RESERVE ))
  (( avail < limit )) && limit=$avail
  if [[ $DRY == 1 ]]; then
    if (( limit < 5 )); then
      printf '[dry-run] %-16s not run: no time left (estimate %4ss)\n' "$name" "$est"
    else
      printf '[dry-run] %-16s timeout %4ss (estimate %4ss)  %s\n' "$name" "$limit" "$est" "$*"
    fi
    (( limit < est )) && echo "[dry-run]   WARNING: $name gets less than its estimate; give this call fewer phases"
    CLOCK_SKEW=$((CLOCK_SKEW + est))
    return 0
  fi
  if (( limit < 5 )); then
    printf '%s\tnot-run\t0\t0\t(time budget)\n' "$name" >> "$LOG_DIR/steps.tsv"
    echo "=== $name: not run (time budget spent)"
    return 1
  fi
  if [[ $SIMULATE == *",$name="* ]]; then  # a canned stand-in, stopped after 3 s when it simulates a timeout
    sim=${SIMULATE#*,"$name"=}; sim=${sim%%,*}
    set -- "$PY" tools/gpu_checks.py simulate "$name" "$sim"
    limit=3
  fi
  echo "=== $name (limit ${limit}s): $*"
  export STEP_LIMIT=$limit
  t0=$(date +%s)
  # bash -c: CMD may be one of the exported functions below
  timeout --signal=INT --kill-after=15 "$limit" bash -c '"$@"' bash "$@" > "$LOG_DIR/$name.log" 2>&1
  rc=$?
  status=$("$PY" tools/gpu_checks.py classify "$name" "$rc" "$LOG_DIR")
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" "$limit" "$name.log" >> "$LOG_DIR/steps.tsv"
  echo "--- $name: $status (rc $rc, $(( $(date +%s) - t0 )) s)"
  [[ $status == ok ]]
}

# --- step bodies (exported: step runs them under timeout in a child bash) --------------------------
environment() {
  echo "python: $PY ($("$PY" -V 2>&1))"
  nvidia-smi || echo "WARNING: nvidia-smi failed"
  "$PY" tools/gpu_checks.py preflight
}

sanitizer_probe() {
  # A kernel built by this toolkit for this GPU must run, plain and under compute-sanitizer.
  local d="$LOG_DIR/probe" cap
  mkdir -p "$d"
  cap=$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())") || return 1
  "$PY" tools/gpu_checks.py probe-source > "$d/probe.cu"
  nvcc -arch="sm_$cap" -o "$d/probe" "$d/probe.cu" || { echo "nvcc could not build the probe"; return 1; }
  "$d/probe" || { echo "the probe kernel failed without the sanitizer"; return 1; }
  [[ -x $SAN ]] || command -v "$SAN" > /dev/null || { echo "compute-sanitizer not found ($SAN): unsupported"; return 3; }
  "$SAN" --version | head -n 3
  "$SAN" --tool memcheck --error-exitcode 1 "$d/probe" || return $?
  # the kernel filter the sanitizer phase uses; without it that phase checks every kernel (slower)
  if ! "$SAN" --tool memcheck --error-exitcode 1 --kernel-name kns=probe "$d/probe"; then
    echo "WARNING: this compute-sanitizer refuses --kernel-name kns=...: the sanitizer phase runs unfiltered"
    touch "$LOG_DIR/sanitizer.nofilter"
  fi
}

build() {
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  fi
  echo "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=${MAX_JOBS:-16} CUDA_HOME=$CUDA_HOME"
  TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
    "$PY" setup.py build_ext --inplace
}

build_info() { "$PY" tools/gpu_checks.py build-info; }

# pytest with a junit file ($LOG_DIR/NAME.xml) whose skips count as failures (gpu_checks.py junit); a
# per-test limit where pytest-timeout is installed, so one hung test cannot take the whole step.
pytest_run() {
  local name=$1; shift
  local per_test=()
  "$PY" -c "import pytest_timeout" 2> /dev/null && per_test=(--timeout 120)
  "$PY" -m pytest -v -rs -p no:cacheprovider "${per_test[@]}" --junitxml="$LOG_DIR/$name.xml" "$@"
}

smoke() { "$PY" tools/gpu_checks.py smoke "$@"; }

# compute-sanitizer TOOL FILTER on the smoke workload; `kns=dnf` matches every kernel of namespace
# dnf::cuda (mangled or not) and nothing of cuBLAS/cuDNN.
sanitize() {
  local tool=$1 filter=$2; shift 2
  if [[ -f $LOG_DIR/sanitizer.unsupported ]]; then
    echo "compute-sanitizer unsupported on this device (preflight): $(cat "$LOG_DIR/sanitizer.unsupported")"
    return 3
  fi
  local extra=(--kernel-name "kns=$filter")
  [[ -f $LOG_DIR/sanitizer.nofilter ]] && extra=()  # the probe found the filter refused
  [[ $tool == memcheck ]] && extra+=(--leak-check no)
  [[ $tool == racecheck ]] && extra+=(--racecheck-report all)
  local env=()
  [[ $tool == memcheck ]] && env=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)  # every allocation exact: bounds checked
  "${env[@]}" "$SAN" --tool "$tool" --error-exitcode 1 "${extra[@]}" "$PY" tools/gpu_checks.py smoke "$@"
}

bench() {
  local budget=$(( STEP_LIMIT - 40 ))  # the benchmark's imports and its last row's teardown
  (( budget < 20 )) && budget=20
  "$PY" -m benchmarks.bench_cuda_block --budget-s "$budget" --out "$LOG_DIR"
}

export -f environment sanitizer_probe build build_info pytest_run smoke sanitize bench

CUDA_TESTS=(tests/test_cuda_dense_block.py tests/test_squeeze_excite.py -k "test_cuda_ or not test_squeeze_excite")
FUSED_K="autocast or half or stream or deterministic or opcheck or weight_grad or nonfinite"

echo "GPU checks: phases ${PHASES[*]} -> $LOG_DIR, results in $RESULT_DIR (budget ${BUDGET_S}s, python $PY)"
run_step() {  # NAME: the planned step's command
  case $1 in
    environment) step environment environment ;;
    sanitizer-probe) step sanitizer-probe sanitizer_probe ;;
    build) step build build ;;
    build-info) step build-info build_info ;;
    tests) step tests pytest_run tests "${CUDA_TESTS[@]}" ;;
    fused-tests) DNF_CUDA_BN_GEMM=fused step fused-tests pytest_run fused-tests tests/test_cuda_dense_block.py -k "$FUSED_K" ;;
    memcheck) step memcheck sanitize memcheck dnf ;;
    racecheck) step racecheck sanitize racecheck bn_relu_gemm_kernel --fused-only ;;
    synccheck) step synccheck sanitize synccheck bn_relu_gemm_kernel --fused-only ;;
    bench) step bench bench ;;
    se) step se "$PY" -m benchmarks.bench_se --json "$LOG_DIR/bench_se.json" ;;
  esac
}
for name in "${PLAN[@]}"; do
  run_step "$name"
  rc=$?
  # Nothing after a failed build can run; a failed preflight environment leaves the later phases to say why.
  if [[ $DRY == 0 && $name == build && $rc != 0 ]]; then echo "build failed: the later steps of this call are not run"; break; fi
done

if [[ $DRY == 1 ]]; then
  echo "[dry-run] then: $PY tools/gpu_checks.py summary $LOG_DIR --phases ${PHASES[*]} > $RESULT_DIR/summary.txt;" \
       "tar czf $RESULT_DIR/gpu_checks.tar.gz $LOG_DIR"
  exit 0
fi
echo "total $(( $(date +%s) - START )) s"
"$PY" tools/gpu_checks.py summary "$LOG_DIR" --phases "${PHASES[@]}" > "$RESULT_DIR/summary.txt"
rc=$?
tar czf "$RESULT_DIR/gpu_checks.tar.gz" --exclude "./out" --exclude "./probe" -C "$LOG_DIR" . \
  || echo "WARNING: could not write $RESULT_DIR/gpu_checks.tar.gz"
cat "$RESULT_DIR/summary.txt"
exit $rc
