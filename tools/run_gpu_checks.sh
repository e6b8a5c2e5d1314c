#!/usr/bin/env bash
# GPU validation of densenet_fast's CUDA kernels, for a machine with an NVIDIA GPU:
#
#   1. build and install in place:   pip install --no-build-isolation -e .
#   2. check the build: CUDA kernels compiled, registered, a GPU visible
#   3. the whole test suite, then the CUDA tests again with the fused BN+GEMM path (DNF_CUDA_BN_GEMM=fused)
#   4. compute-sanitizer memcheck (allocator caching off, so out-of-bounds accesses are not hidden
#      inside pooled blocks) and racecheck (the shared-memory kernel) on a small block test,
#      forward + backward, fp32 and bf16, simple and fused paths, plus the tail operators
#   5. the CUDA benchmark (python -m benchmarks.bench_cuda_block), JSON into benchmarks/results/
#
# Usage: tools/run_gpu_checks.sh [--skip-build] [--skip-tests] [--skip-sanitizer] [--skip-bench]
# Environment: PYTHON (default python), MAX_JOBS (default 8), TORCH_CUDA_ARCH_LIST (default: the
# visible GPU's capability), SANITIZER (default compute-sanitizer on PATH or in $CUDA_HOME/bin),
# BENCH_ARGS (extra arguments for the benchmark, e.g. "--no-max-batch --repeats 10").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python}
SKIP_BUILD=0 SKIP_TESTS=0 SKIP_SAN=0 SKIP_BENCH=0
for arg in "$@"; do
  case "$arg" in
    --skip-build) SKIP_BUILD=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-sanitizer) SKIP_SAN=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    *) echo "unknown argument: $arg" >&2; exit 2 ;;
  esac
done
FAILED=()
step() { echo; echo "=== $* ==="; }
run() {  # run a step, remember failures, keep going
  if "$@"; then echo "--- ok: $*"; else echo "--- FAILED ($?): $*"; FAILED+=("$*"); fi
}

step "environment"
nvidia-smi || { echo "nvidia-smi failed: no usable GPU" >&2; exit 1; }
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); assert torch.cuda.is_available(); print(torch.cuda.get_device_name())"

if [[ $SKIP_BUILD == 0 ]]; then
  step "build (pip install --no-build-isolation -e .)"
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    export TORCH_CUDA_ARCH_LIST
  fi
  export MAX_JOBS=${MAX_JOBS:-8}
  start=$(date +%s)
  "$PY" -m pip install --no-build-isolation -e . 2>&1 | tail -n 20
  echo "build took $(( $(date +%s) - start )) s for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
fi

step "build info"
"$PY" - <<'EOF'
import densenet_fast as dnf
info = dnf.build_info()
print(info)
assert info["cuda"], "extension built without CUDA kernels"
assert info["cuda_kernels_registered"], "CUDA kernels not registered"
assert info["cuda_available"], "no GPU visible to torch"
EOF

if [[ $SKIP_TESTS == 0 ]]; then
  step "test suite"
  run "$PY" -m pytest -q -ra tests
  step "CUDA tests with the fused BN+GEMM path as default"
  run env DNF_CUDA_BN_GEMM=fused "$PY" -m pytest -q -ra tests/test_cuda_dense_block.py
fi

if [[ $SKIP_SAN == 0 ]]; then
  SAN=${SANITIZER:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}
  SMOKE=$(mktemp /tmp/dnf_smoke_XXXX.py)
  trap 'rm -f "$SMOKE"' EXIT
  cat > "$SMOKE" <<'EOF'
# Small dense block + tails, forward and backward, every dtype path: run under compute-sanitizer.
import os
import torch
import densenet_fast as dnf
from densenet_fast.ops import dense_block as block_ops

dev = torch.device("cuda")
torch.manual_seed(0)
for path in ("simple", "fused"):
    os.environ["DNF_CUDA_BN_GEMM"] = path
    for (N, C0, H, W, L, k, bs) in ((2, 5, 5, 3, 2, 3, 2), (2, 16, 6, 6, 2, 8, 4)):
        blk = dnf.DenseBlock(L, C0, bs, k, drop_rate=0.2).to(dev)
        for dtype in (torch.float32, torch.bfloat16):
            for training in (True, False):
                blk.train(training)
                x = torch.randn(N, C0, H, W, device=dev, requires_grad=True)
                with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
                    res = block_ops.fused_dense_block(x, blk.block_params(), training=training,
                                                      drop_rate=0.2 if training else 0.0)
                res.buffer.float().square().sum().backward()
x = torch.randn(2, 6, 5, 5, device=dev)
w = torch.ones(6, device=dev, requires_grad=True)
b = torch.zeros(6, device=dev, requires_grad=True)
cw = torch.randn(3, 6, 1, 1, device=dev, requires_grad=True)
for training in (True, False):
    mean, var = dnf.ops.channel_moments(x)
    xr = x.clone().requires_grad_()
    dnf.ops.transition(xr, mean, var, w, b, cw, training=training).sum().backward()
    dnf.ops.norm_relu_pool(xr, mean, var, w, b, training=training).sum().backward()
torch.cuda.synchronize()
print("smoke ok")
EOF
  step "compute-sanitizer memcheck"
  run env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 1 --leak-check no "$PY" "$SMOKE"
  step "compute-sanitizer racecheck (shared-memory kernels: bn_relu_gemm_kernel)"
  run "$SAN" --tool racecheck --error-exitcode 1 --racecheck-report all --kernel-name kns=bn_relu_gemm_kernel \
      "$PY" "$SMOKE"
  step "compute-sanitizer initcheck"
  run env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool initcheck --error-exitcode 1 \
      --kernel-name kns=dnf "$PY" "$SMOKE"
fi

if [[ $SKIP_BENCH == 0 ]]; then
  step "benchmark"
  # shellcheck disable=SC2086
  run "$PY" -m benchmarks.bench_cuda_block ${BENCH_ARGS:-}
fi

echo
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "FAILED steps:"; printf '  %s\n' "${FAILED[@]}"; exit 1
fi
echo "all GPU checks passed"
