"""Squeeze-and-excitation micro-benchmark: densenet_fast.SqueezeExcite vs timm's SEModule.

Times one training step of the SE block (forward + backward, parameter grads included) for

* ``densenet_fast``: our module (fused custom ops; Triton kernels on CUDA, PyTorch math on CPU),
* ``timm``: ``timm.layers.squeeze_excite.SEModule`` in eager mode,
* ``timm+compile``: the same module under ``torch.compile`` (inductor),

on a realistic stage: N=64, C=256, 56x56 in bf16 on CUDA; N=8, C=128, 28x28 in fp32 on CPU.
Reports the median time in ms and, on CUDA, the effective bandwidth: ``7 x nbytes(x)`` per step
(forward: read x twice, write y; backward: read dy and x, read dy, write dx) over the median
time, the same nominal traffic for every implementation.

Usage::

    python benchmarks/bench_se.py [--device cuda] [--full]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

try:
    import densenet_fast.nn.squeeze_excite  # noqa: F401
except ImportError:  # running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from densenet_fast.nn.squeeze_excite import SqueezeExcite  # noqa: E402

__all__ = ["run_se_benchmark"]

_BYTES_PER_STEP = 7  # x-sized tensors moved per fwd+bwd step, see module docstring


def _time_ms(step: Callable[[], None], device: torch.device, warmup: int, reps: int) -> float:
    """Median wall time of ``step`` in ms (CUDA events on GPU)."""
    for _ in range(warmup):
        step()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(dy)
    return step


def run_se_benchmark(device: str | torch.device = "cuda", quick: bool = True,
                     layouts: Optional[tuple[str, ...]] = None) -> list[dict]:
    """Benchmark SE fwd+bwd; returns one dict per (layout, implementation).

    Args:
        device: ``"cuda"`` (bf16, N=64, C=256, 56x56) or ``"cpu"`` (fp32, N=8, C=128, 28x28).
        quick: fewer repetitions (and only channels_last unless ``layouts`` is given).
        layouts: subset of ``("contiguous", "channels_last")``.

    Returns:
        dicts with keys ``impl, device, dtype, shape, layout, median_ms, gbps`` (None on CPU)
        and ``speedup_vs_timm`` (timm eager time / this time).
    """
    device = torch.device(device)
    if device.type == "cuda":
        shape, dtype = (64, 256, 56, 56), torch.bfloat16
        warmup, reps = (5, 20) if quick else (10, 100)
    else:
        shape, dtype = (8, 128, 28, 28), torch.float32
        warmup, reps = (2, 5) if quick else (3, 20)
    if layouts is None:
        layouts = ("channels_last",) if quick else ("contiguous", "channels_last")
    try:
        from timm.layers.squeeze_excite import SEModule
    except ImportError:
        SEModule = None

    channels = shape[1]
    ours = SqueezeExcite(channels).to(device, dtype)
    impls: dict[str, nn.Module] = {"densenet_fast": ours}
    if SEModule is not None:
        timm_se = SEModule(channels).to(device, dtype)
        timm_se.load_state_dict(ours.state_dict())
        impls["timm"] = timm_se
        impls["timm+compile"] = torch.compile(timm_se)

    rows: list[dict] = []
    for layout in layouts:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
        x.requires_grad_(True)
        dy = torch.randn_like(x)
        base: Optional[float] = None
        results = []
        for name, module in impls.items():
            ms = _time_ms(_train_step(module, x, dy), device, warmup, reps)
            if name == "timm":
                base = ms
            gbps = (_BYTES_PER_STEP * x.numel() * x.element_size() / (ms * 1e-3) / 1e9
                    if device.type == "cuda" else None)
            results.append(dict(impl=name, device=str(device), dtype=str(dtype).split(".")[-1],
                                shape=list(shape), layout=layout, median_ms=ms, gbps=gbps))
        for r in results:
            r["speedup_vs_timm"] = (base / r["median_ms"]) if base else None
        rows.extend(results)
    return rows


def _format(rows: list[dict]) -> str:
    head = f"{'impl':<14} {'layout':<14} {'dtype':<9} {'shape':<18} {'ms':>9} {'GB/s':>8} {'x timm':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        gbps = f"{r['gbps']:.0f}" if r["gbps"] is not None else "-"
        sp = f"{r['speedup_vs_timm']:.2f}" if r["speedup_vs_timm"] is not None else "-"
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"{r['impl']:<14} {r['layout']:<14} {r['dtype']:<9} {shape:<18} "
                     f"{r['median_ms']:>9.3f} {gbps:>8} {sp:>7}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full", action="store_true", help="more repetitions, both layouts")
    args = parser.parse_args()
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"# SE fwd+bwd on {name}, torch {torch.__version__}")
    print(_format(run_se_benchmark(dev, quick=not args.full)))
