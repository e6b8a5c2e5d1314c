"""Squeeze-and-excitation fwd+bwd: densenet_fast.SqueezeExcite vs timm's SEModule (eager and compiled).

One training step of the SE block (forward + backward, parameter gradients included), timed with
``benchmarks.timing.interleaved_times``: N=64, C=256, 56x56 bf16 on CUDA (N=8, C=128, 28x28 fp32 on
CPU). On CUDA each row also gives the achieved HBM bandwidth: ``7 x nbytes(x)`` per step (forward:
read x twice, write y; backward: read dy and x, read dy, write dx; the same nominal traffic for every
implementation) over the median time, and that as a fraction of the GPU's peak DRAM bandwidth.

Usage::

    python -m benchmarks.bench_se [--device cuda] [--full] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running from a source checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.timing import interleaved_times, summarize  # noqa: E402
from densenet_fast.nn.squeeze_excite import SqueezeExcite  # noqa: E402

__all__ = ["run_se_benchmark"]

_BYTES_PER_STEP = 7  # x-sized tensors moved per fwd+bwd step, see module docstring


def _train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(dy)
    return step


def run_se_benchmark(device: str | torch.device = "cuda", quick: bool = True,
                     layouts: Optional[tuple[str, ...]] = None) -> list[dict]:
    """SE fwd+bwd per (layout, implementation): dicts with ``impl, device, dtype, shape, layout,
    median_ms, min_ms, gbps, fraction_of_peak`` (None on CPU) and ``speedup_vs_timm``."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    shape, dtype = ((64, 256, 56, 56), torch.bfloat16) if cuda else ((8, 128, 28, 28), torch.float32)
    warmup, repeats = (3, 20) if quick else (10, 100)
    layouts = layouts or (("channels_last",) if quick else ("contiguous", "channels_last"))
    peak_gbs = None
    if cuda:
        from benchmarks.bench_cuda_block import peak_bandwidth_gbs

        peak_gbs = peak_bandwidth_gbs(device)
    try:
        from timm.layers.squeeze_excite import SEModule
    except ImportError:
        SEModule = None

    ours = SqueezeExcite(shape[1]).to(device, dtype)
    impls: dict[str, nn.Module] = {"densenet_fast": ours}
    if SEModule is not None:
        timm_se = SEModule(shape[1]).to(device, dtype)
        timm_se.load_state_dict(ours.state_dict())
        impls["timm"] = timm_se
        impls["timm+compile"] = torch.compile(timm_se)

    rows: list[dict] = []
    for layout in layouts:
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
        dy = torch.randn_like(x)
        errors: dict[str, str] = {}
        times = interleaved_times({n: _train_step(m, x, dy) for n, m in impls.items()}, repeats, warmup, device,
                                  on_error=lambda n, e: errors.__setitem__(n, f"{type(e).__name__}: {e}"))
        base = summarize(times.get("timm", []), shape[0])["ms_median"]
        for name in impls:
            s = summarize(times[name], shape[0])
            ms = s["ms_median"]
            gbps = _BYTES_PER_STEP * x.numel() * x.element_size() / (ms * 1e-3) / 1e9 if (cuda and ms) else None
            rows.append(dict(impl=name, device=str(device), dtype=str(dtype).split(".")[-1], shape=list(shape),
                             layout=layout, median_ms=ms, min_ms=s["ms_min"], gbps=gbps,
                             fraction_of_peak=(gbps / peak_gbs) if (gbps and peak_gbs) else None,
                             speedup_vs_timm=(base / ms) if (base and ms) else None, error=errors.get(name)))
    return rows


def _format(rows: list[dict]) -> str:
    head = f"{'impl':<14} {'layout':<14} {'dtype':<9} {'ms':>9} {'GB/s':>8} {'% peak':>7} {'x timm':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        def f(v, spec):
            return format(v, spec) if v is not None else "-".rjust(int(spec.split(".")[0]))
        lines.append(f"{r['impl']:<14} {r['layout']:<14} {r['dtype']:<9} {f(r['median_ms'], '9.3f')} "
                     f"{f(r['gbps'], '8.0f')} {f(r['fraction_of_peak'] and 100 * r['fraction_of_peak'], '7.0f')} "
                     f"{f(r['speedup_vs_timm'], '7.2f')}" + (f"  ERROR {r['error']}" if r["error"] else ""))
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--full", action="store_true", help="more repetitions, both layouts")
    parser.add_argument("--json", type=Path, help="also write the rows (and the device name) to this file")
    args = parser.parse_args(argv)
    dev = torch.device(args.device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    rows = run_se_benchmark(dev, quick=not args.full)
    print(f"# SE fwd+bwd on {name}, torch {torch.__version__}")
    print(_format(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "bench_se", "device": name, "rows": rows}, indent=1))
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
