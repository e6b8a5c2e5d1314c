"""The environment switches of densenet_fast: one table, one reader.

Every switch treats an unset, empty or blank value (and ``auto`` where it has one) as its default, and a bad
value gets a ``ValueError`` naming the variable, the values it accepts and the value it got. The CPU kernels
read the ``DNF_CPU_*`` switches in C++ (``csrc/cpu/switches.h``, same table); :func:`check_all` runs before the
library loads, so a bad value is refused with this message rather than ignored by a load-time choice.
"""
from __future__ import annotations

import os
from typing import Optional

# name -> (accepted values; the first is the default, what an unset or empty switch reads as)
SWITCHES: dict[str, tuple[str, ...]] = {
    # build of the CPU element loops (csrc/cpu/isa.h); the default is torch's own CPU capability
    "DNF_CPU_ISA": ("auto", "base", "avx2", "avx512"),
    # GEMM engine of the CPU kernels (csrc/cpu/gemm_engine.h)
    "DNF_CPU_GEMM": ("auto", "blas", "aten", "brgemm"),
    # densenet_fast's AMX kernel for the bfloat16 1x1 stage (csrc/cpu/amx_gemm.h)
    "DNF_CPU_AMX_KERNEL": ("auto", "0", "1"),
    # densenet_fast's AVX-512 kernel for the float32 1x1 stage (csrc/cpu/f32_gemm.h)
    "DNF_CPU_F32_KERNEL": ("auto", "0", "1"),
    # the float32 1x1 backward's products on that kernel too (1, where the forward's run there) or on the engine (0)
    "DNF_CPU_F32_BACKWARD": ("1", "0"),
    # bfloat16 narrowing of the element loops: AVX512_BF16 instructions or portable code (csrc/cpu/bf16_rows.h)
    "DNF_CPU_BF16_ROWS": ("auto", "native", "portable"),
    # compute dtype of a bfloat16 block's 1x1 stage (csrc/cpu/gemm_engine.h: bf16_gemm_compute)
    "DNF_CPU_BF16_GEMM": ("auto", "bf16", "fp32"),
    # compute dtype of a bfloat16 block's 3x3 convolution passes (csrc/cpu/conv3x3.h)
    "DNF_CPU_BF16_CONV": ("auto", "bf16", "fp32"),
    # engine of a float32 dense layer's 3x3 passes: measured per shape, or our AVX-512 kernel, or oneDNN
    # (csrc/cpu/conv3x3_own.h)
    "DNF_CPU_CONV3X3": ("auto", "own", "onednn"),
    # the CPU kernels' large activations from densenet_fast's mapped pool (1) or the default allocator (0)
    # (csrc/cpu/workspace.h)
    "DNF_CPU_POOL": ("1", "0"),
    # how the 3-D stem's backward recomputes conv0 (densenet_fast/ops/stem.py)
    "DNF_CONV_STEM_BACKWARD": ("batch", "sample"),
    # kernels of the SE ops (densenet_fast/ops/squeeze_excite.py)
    "DENSENET_FAST_SE_BACKEND": ("auto", "torch", "triton"),
}


def read(name: str) -> str:
    """The value of switch ``name`` (lower-cased, blanks stripped), its default when unset or empty.

    Raises ValueError naming the switch, the accepted values and the value found."""
    allowed = SWITCHES[name]
    raw = os.environ.get(name)
    value = (raw or "").strip().lower()
    if not value:
        return allowed[0]
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {', '.join(allowed)} (or unset), got {raw!r}")
    return value


def requested(name: str) -> Optional[str]:
    """The value of switch ``name`` when it asks for something other than its default, else None."""
    value = read(name)
    return None if value == SWITCHES[name][0] else value


def check_all() -> None:
    """Refuses any switch with a bad value (ValueError naming it)."""
    for name in SWITCHES:
        read(name)
