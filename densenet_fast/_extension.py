"""Loads the compiled operator library and reports what it was built with."""
from __future__ import annotations

import importlib
import json
import warnings
from typing import Any

import torch

from densenet_fast import _switches
from densenet_fast._version import __version__

_REBUILD = "pip install --no-build-isolation -e . (from a densenet_fast checkout, with this torch installed)"


def _major_minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


# The oldest torch densenet_fast supports: the floor of pyproject.toml's dependencies, built and tested by CI
# (.ci/other_torch.sh); tests/test_torch_versions.py keeps the three in step.
MIN_TORCH = (2, 6)


def check_torch_version(version: str = torch.__version__) -> None:
    """Raises ImportError naming the installed and the oldest supported torch when ``version`` is older."""
    if _major_minor(version) < MIN_TORCH:
        raise ImportError(f"densenet_fast needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]}, but torch {version} is "
                          f"installed: pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}'")


def load_extension():
    """Imports ``densenet_fast._C`` (which registers ``torch.ops.densenet_fast.*``).

    Raises ImportError saying how to rebuild when the extension is missing or was compiled
    against another torch release (whose C++ ABI is not compatible).
    """
    check_torch_version()
    _switches.check_all()
    isa = _switches.requested("DNF_CPU_ISA")
    try:
        ext = importlib.import_module("densenet_fast._C")
    except ImportError as err:
        raise ImportError(
            f"densenet_fast: the compiled extension densenet_fast._C could not be loaded ({err}). "
            f"It is missing or was built against another torch than the installed {torch.__version__}. "
            f"Rebuild it with: {_REBUILD}") from err
    built = getattr(ext, "TORCH_VERSION", "unknown")
    if built != "unknown" and _major_minor(built) != _major_minor(torch.__version__):
        raise ImportError(
            f"densenet_fast: the compiled extension was built against torch {built} but torch "
            f"{torch.__version__} is installed. Rebuild it with: {_REBUILD}")
    if isa is not None and not getattr(load_extension, "_isa_checked", False):
        load_extension._isa_checked = True
        got = json.loads(torch.ops.densenet_fast.cpu_engine_report())["kernels_isa"]
        if got != isa:
            warnings.warn(f"DNF_CPU_ISA={isa}: this CPU does not support it; the CPU kernels run the {got} build",
                          stacklevel=2)
    return ext


def build_info() -> dict[str, Any]:
    """What the installed extension was compiled with.

    Returns a dict: ``version``, ``torch_built`` (torch version compiled against), ``torch_runtime``,
    ``cuda`` (CUDA kernels compiled in), ``cuda_archs``, ``openmp``, and ``cuda_kernels_registered``
    (whether the dispatcher holds CUDA kernels for the dense-block operator), ``cpu_engine``: the CPU GEMM
    engine per dtype (``{"float32": {"engine": "blas"|"aten", "how": ...}, ..., "bfloat16": {"engine":
    "blas"|"aten"|"brgemm", ...}, "amx_bf16": bool,
    "isa": torch's CPU capability, "kernels_isa": "base"|"avx2"|"avx512", the build of our element loops}``;
    the engine is chosen on first use, forced by ``DNF_CPU_GEMM=blas|aten|brgemm``; the loops' ISA at load, forced by
    ``DNF_CPU_ISA=base|avx2|avx512``); ``cpu_pool``: whether the CPU kernels' large activations come from
    densenet_fast's mapped pool (:mod:`densenet_fast.cpu_pool`; ``DNF_CPU_POOL=0`` turns it off).
    """
    ext = load_extension()
    return {
        "version": __version__,
        "torch_built": ext.TORCH_VERSION,
        "torch_runtime": torch.__version__,
        "cuda": bool(ext.WITH_CUDA),
        "cuda_archs": ext.CUDA_ARCHS,
        "openmp": bool(ext.WITH_OPENMP),
        "cuda_kernels_registered": torch._C._dispatch_has_kernel_for_dispatch_key(
            "densenet_fast::dense_block_forward", "CUDA"),
        "cuda_available": torch.cuda.is_available(),
        "cpu_engine": cpu_engine(),
        # large CPU activations from the mapped pool (densenet_fast/cpu_pool.py), or torch's allocator (DNF_CPU_POOL=0)
        "cpu_pool": bool(json.loads(torch.ops.densenet_fast.cpu_pool_stats())["enabled"]),
    }


def cpu_engine() -> dict[str, Any]:
    """The CPU GEMM engine per dtype, how it was chosen (measured rates, or forced by ``DNF_CPU_GEMM``),
    whether the CPU has AMX bf16 tiles, torch's CPU capability and the ISA build of our element loops
    (``kernels_isa``) and how its bfloat16 element loops narrow to bfloat16 (``bf16_rows``: ``"avx512_bf16"``
    on CPUs with that extension, else ``"portable"``) and whether the bfloat16 fused 1x1 stage (forward, and its
    backward recompute) runs on densenet_fast's own AMX kernel whatever the engine (``amx_kernel``: AMX and
    AVX512_BF16 CPUs; ``DNF_CPU_AMX_KERNEL=0`` turns it off), and whether the float32 fused 1x1 stage runs on its
    own AVX-512 kernel (``f32_kernel``: ``{"on": bool, "how": measured rates or forced}``; it runs where it
    measured faster than the float32 engine; ``DNF_CPU_F32_KERNEL=0|1`` forces it), the compute dtype of a bfloat16
    block's 1x1 stage (``bf16_gemm``: ``{"compute": "bfloat16" | "float32", "how": measured times or forced}``;
    ``DNF_CPU_BF16_GEMM=bf16|fp32`` forces it) and of its 3x3 passes (``bf16_conv``), and which engine runs a
    float32 block's 3x3 passes (``conv3x3``: ``{"how": ..., "shapes": {"2d 56x56 128->32": {"forward": ["own" |
    "onednn", oneDNN us, own us], "input_grad": ..., "weight_grad": ...}}}``, each shape measured on its first use;
    ``DNF_CPU_CONV3X3=own|onednn`` forces it; ``"bfloat16"`` says where a bfloat16 block's 3x3 forward and input
    gradient run on our AMX kernel). Runs the one-time choices."""
    load_extension()
    raw = json.loads(torch.ops.densenet_fast.cpu_engine_report())
    names = {"Float": "float32", "Double": "float64", "BFloat16": "bfloat16"}
    out: dict[str, Any] = {names[k]: {"engine": v[0], "how": v[1]} for k, v in raw.items() if k in names}
    out["amx_bf16"] = bool(raw["amx_bf16"])
    out["isa"] = torch.backends.cpu.get_cpu_capability()
    out["kernels_isa"] = raw["kernels_isa"]
    out["bf16_rows"] = raw["bf16_rows"]
    out["amx_kernel"] = bool(raw["amx_kernel"])
    out["f32_kernel"] = {"on": bool(raw["f32_kernel"][0]), "how": raw["f32_kernel"][1]}
    out["bf16_gemm"] = {"compute": raw["bf16_gemm"][0], "how": raw["bf16_gemm"][1]}
    out["bf16_conv"] = raw["bf16_conv"]
    out["conv3x3"] = json.loads(torch.ops.densenet_fast.own_conv3x3_report())
    return out
