"""Build script for densenet_fast's C++/CUDA extension (``densenet_fast._C``).

Environment switches:
  FORCE_CUDA=1            build the CUDA kernels even where torch has no CUDA runtime or no GPU is present
  FORCE_CPU=1             never build the CUDA kernels
  TORCH_CUDA_ARCH_LIST    CUDA archs (default "8.0;8.6;9.0+PTX": Ampere and Hopper, PTX for the newest)
  MAX_JOBS                parallel compile jobs (read by torch's build_ext)
  DEBUG=1                 -O0 -g, no NDEBUG
  DNF_BUILD_DIR           where compiled objects are kept between builds (default: build/ in the checkout;
                          ninja then recompiles only changed sources, also for `pip install -e .`, whose
                          own build directory is temporary)
"""
from __future__ import annotations

import glob
import os
import re
import sys
import sysconfig

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;9.0+PTX"


def read_version() -> str:
    """densenet_fast/_version.py, plus the wheel variant's local tag from DNF_LOCAL_VERSION
    (e.g. "cu130.torch2.14", set by tools/build_wheels.sh)."""
    with open(os.path.join(ROOT, "densenet_fast", "_version.py")) as f:
        version = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
    local = os.environ.get("DNF_LOCAL_VERSION", "").strip().lstrip("+")
    return f"{version}+{local}" if local else version


def want_cuda() -> bool:
    """CUDA sources are built when torch was built with CUDA and nvcc is found, or on FORCE_CUDA=1.

    Deliberately not ``torch.cuda.is_available()``: a build machine needs no GPU.
    """
    if os.environ.get("FORCE_CPU", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    home = cpp_extension.CUDA_HOME
    if torch.version.cuda is None or home is None:
        return False
    # torch guesses CUDA_HOME from the nvcc on PATH; a wrapper without a toolkit behind it is not enough.
    if not os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")):
        print(f"densenet_fast: no CUDA headers under CUDA_HOME={home}; building the CPU kernels only "
              "(set CUDA_HOME to a CUDA toolkit, or FORCE_CUDA=1)")
        return False
    return True


def extension():
    debug = os.environ.get("DEBUG", "0") == "1"
    with_cuda = want_cuda()
    sources = (["csrc/ops.cpp"] + sorted(glob.glob("csrc/autograd/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
               + sorted(glob.glob("csrc/cpu/isa/*.cpp")))
    archs = ""
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math: lets GCC if-convert the ReLU selects of the element loops (it must otherwise
    # assume a multiply in a not-taken branch may raise an FP exception, and keeps them scalar with a
    # data-dependent branch each). No value changes: only FP exception flags, which nothing reads.
    cxx = opt + ["-fopenmp", "-fno-trapping-math",
                 f'-DDNF_TORCH_VERSION="{torch.__version__}"',
                 f'-DDNF_CUDA_ARCHS="{archs}"',
                 f"-DDNF_WITH_CUDA={int(with_cuda)}"]
    if not debug:
        cxx.append("-DNDEBUG")
    extra = {"cxx": cxx}
    if with_cuda:
        extra["nvcc"] = opt + ["--expt-relaxed-constexpr", "-lineinfo",
                               "-DDNF_WITH_CUDA=1"]
    cls = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    return cls(
        name="densenet_fast._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )


class BuildExt(cpp_extension.BuildExtension):
    """torch's BuildExtension with a persistent object directory: pip builds in a fresh temporary
    directory every time, so without this every `pip install -e .` recompiles everything."""

    def finalize_options(self) -> None:
        super().finalize_options()
        cache = os.environ.get("DNF_BUILD_DIR", os.path.join(ROOT, "build"))
        tag = f"temp.{sysconfig.get_platform()}-cpython-{sys.version_info[0]}{sys.version_info[1]}"
        self.build_temp = os.path.join(os.path.abspath(cache), tag)


setup(
    version=read_version(),
    packages=find_packages(include=["densenet_fast", "densenet_fast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
)
