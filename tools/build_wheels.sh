#!/usr/bin/env bash
# Builds densenet_fast wheels against the installed torch: a CPU wheel and/or a CUDA wheel.
#
#   tools/build_wheels.sh [cpu|cuda|all]        (default: all)
#
# Environment:
#   PYTHON                 interpreter whose torch the wheels are built against (default: python3)
#   OUT                    output folder (default: <repo>/wheelhouse); wheels land in OUT/<local tag>/,
#                          e.g. wheelhouse/cpu.torch2.14/, wheelhouse/cu130.torch2.14/
#   SRC                    source checkout to build (default: this repository)
#   TORCH_CUDA_ARCH_LIST   CUDA wheel archs (default "8.0;8.6;9.0+PTX")
#   CUDA_HOME              CUDA toolkit for the CUDA wheel (default: /usr/local/cuda, else nvcc's)
#   MAX_JOBS               parallel compile jobs (default 2)
#
# Each wheel is built from a clean copy of the tracked (and untracked, not ignored) sources, so no
# in-place build (_C*.so, build/) leaks into it, with `pip wheel --no-build-isolation --no-deps`
# (the build uses the installed torch: the wheel's ABI is that torch's). The local version tag names
# the variant, e.g. 0.1.0+cpu.torch2.14 or 0.1.0+cu130.torch2.14: the script exports
# DNF_LOCAL_VERSION, which setup.py's read_version() appends to the version. Afterwards every wheel is checked to
# bundle no libtorch/libc10 (torch is a dependency, not a passenger). tools/check_wheel.py then
# installs a wheel into a fresh venv and tests it.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SRC=${SRC:-$ROOT}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$ROOT/wheelhouse}
TARGET=${1:-all}
export MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;8.6;9.0+PTX"}

case $TARGET in cpu|cuda|all) ;; *) echo "usage: $0 [cpu|cuda|all]" >&2; exit 2 ;; esac

log() { echo "[build_wheels] $*" >&2; }

WORK_DIRS=()
cleanup() { for d in ${WORK_DIRS[@]+"${WORK_DIRS[@]}"}; do rm -rf "$d"; done; }
trap cleanup EXIT  # also after a failed build

# torch2.14 from 2.14.1+cu130: wheels are ABI-bound to torch's major.minor.
TORCH_TAG=$("$PYTHON" -c 'import torch; v = torch.__version__.split("+")[0].split("."); print(f"torch{v[0]}.{v[1]}")')

cuda_home() {
  if [ -n "${CUDA_HOME:-}" ]; then echo "$CUDA_HOME"; return; fi
  if [ -x /usr/local/cuda/bin/nvcc ]; then echo /usr/local/cuda; return; fi
  local nvcc; nvcc=$(command -v nvcc || true)
  [ -n "$nvcc" ] && dirname "$(dirname "$(readlink -f "$nvcc")")"
}

# cu130 from the toolkit's nvcc (the compiler the kernels are built with).
cuda_tag() {
  "$1/bin/nvcc" --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/cu\1\2/p' | head -n 1
}

# Copies the sources that git knows (tracked + untracked-not-ignored) into $1.
copy_sources() {
  local dest=$1
  mkdir -p "$dest"
  if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (cd "$SRC" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -xf - -C "$dest"
  else  # a plain source tree: everything but build products
    (cd "$SRC" && tar --exclude=./build --exclude=./dist --exclude=./wheelhouse --exclude='*.so' \
      --exclude='*.egg-info' --exclude=__pycache__ -cf - .) | tar -xf - -C "$dest"
  fi
}

# Fails when the wheel carries torch's own libraries.
check_no_libtorch() {
  "$PYTHON" - "$1" <<'EOF'
import re, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
bad = [n for n in names if re.search(r"(^|/)lib(torch|c10|cuda|cudart|cublas|cudnn)[^/]*\.so", n)]
exts = [n for n in names if re.search(r"densenet_fast/_C[^/]*\.so$", n)]
if bad:
    sys.exit(f"{sys.argv[1]}: bundles torch/CUDA libraries: {bad}")
if not exts:
    sys.exit(f"{sys.argv[1]}: no densenet_fast/_C*.so extension inside")
print(f"ok: {len(names)} files, extension {exts[0]}, no libtorch*/libc10*/CUDA libraries")
EOF
}

build_one() {
  local variant=$1 local_tag=$2
  local work; work=$(mktemp -d "${TMPDIR:-/tmp}/dnf-wheel-$variant.XXXXXX")
  WORK_DIRS+=("$work")
  log "building the $variant wheel ($local_tag) from $SRC in $work"
  copy_sources "$work/src"
  mkdir -p "$work/out" "$OUT/$local_tag"
  (
    cd "$work/src"
    export DNF_LOCAL_VERSION=$local_tag
    if [ "$variant" = cpu ]; then
      export FORCE_CPU=1; unset FORCE_CUDA || true
    else
      export FORCE_CUDA=1 CUDA_HOME=$CUDA_DIR; unset FORCE_CPU || true
      export PATH="$CUDA_DIR/bin:$PATH"
      log "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST CUDA_HOME=$CUDA_HOME (this compile takes minutes)"
    fi
    "$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w "$work/out" . >&2
  )
  local whl; whl=$(ls "$work"/out/densenet_fast-*.whl)
  check_no_libtorch "$whl" >&2
  case $(basename "$whl") in
    *"+$local_tag-"*) ;;
    *) log "WARNING: $(basename "$whl") lacks the local version +$local_tag: this setup.py does not" \
           "append DNF_LOCAL_VERSION to the version" ;;
  esac
  mv -f "$whl" "$OUT/$local_tag/"
  log "wrote $OUT/$local_tag/$(basename "$whl")"
  echo "$OUT/$local_tag/$(basename "$whl")"
}

if [ "$TARGET" = cpu ] || [ "$TARGET" = all ]; then
  build_one cpu "cpu.$TORCH_TAG"
fi
if [ "$TARGET" = cuda ] || [ "$TARGET" = all ]; then
  CUDA_DIR=$(cuda_home)
  if [ -z "$CUDA_DIR" ] || [ ! -x "$CUDA_DIR/bin/nvcc" ]; then
    log "no CUDA toolkit found (set CUDA_HOME): cannot build the CUDA wheel"; exit 1
  fi
  if [ -z "$(ls "$SRC"/csrc/cuda/*.cu 2>/dev/null)" ]; then
    log "WARNING: $SRC/csrc/cuda has no .cu sources: the 'CUDA' wheel will hold CPU kernels only"
  fi
  build_one "$(cuda_tag "$CUDA_DIR")" "$(cuda_tag "$CUDA_DIR").$TORCH_TAG"
fi
