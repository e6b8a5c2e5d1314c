"""Squeeze-and-excitation fwd+bwd: densenet_fast.SqueezeExcite vs timm's SEModule (eager and compiled).

One training step of the SE block (forward + backward, parameter gradients included), timed by the
harness (``benchmarks.harness.time_impls``, interleaved): N=64, C=256, 56x56 bf16 on CUDA (N=8, C=128,
28x28 fp32 on CPU). On CUDA each row also gives the achieved HBM bandwidth: ``7 x nbytes(x)`` per step
(forward: read x twice, write y; backward: read dy and x, read dy, write dx; the same nominal traffic for
every implementation) over the median time, and that as a fraction of the GPU's peak DRAM bandwidth.

Usage::

    python -m benchmarks.bench_se [--device cuda] [--full] [--json PATH] [--impls densenet_fast,timm]
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running from a source checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402
from densenet_fast.nn.squeeze_excite import SqueezeExcite  # noqa: E402

__all__ = ["IMPLS", "setup_se", "run_se_benchmark"]

IMPLS = ("densenet_fast", "timm", "timm+compile")
_BYTES_PER_STEP = 7  # x-sized tensors moved per fwd+bwd step, see module docstring
COLUMNS = [("impl", "impl", ""), ("layout", "layout", ""), ("dtype", "dtype", ""), ("ms", "median_ms", ".3f"),
           ("GB/s", "gbps", ".0f"), ("% peak", lambda r: r["fraction_of_peak"] and 100 * r["fraction_of_peak"], ".0f"),
           ("x timm", "speedup_vs_timm", ".2f"), ("error", "error", "")]


def _train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).backward(dy)
    return step


def setup_se(device: torch.device, layout: str, impls: Sequence[str] = IMPLS):
    """The setup of one case: ``(steps, x)``, one fwd+bwd step per implementation (same weights) on the
    same input ``x`` [N, C, H, W] in ``layout`` (``contiguous`` or ``channels_last``); timm's rows are left out
    when timm is missing."""
    cuda = device.type == "cuda"
    shape, dtype = ((64, 256, 56, 56), torch.bfloat16) if cuda else ((8, 128, 28, 28), torch.float32)
    torch.manual_seed(0)
    ours = SqueezeExcite(shape[1]).to(device, dtype)
    modules: Dict[str, nn.Module] = {"densenet_fast": ours}
    try:
        from timm.layers.squeeze_excite import SEModule
    except ImportError:
        SEModule = None
    if SEModule is not None and any(n.startswith("timm") for n in impls):
        timm_se = SEModule(shape[1]).to(device, dtype)
        timm_se.load_state_dict(ours.state_dict())
        modules["timm"] = timm_se
        modules["timm+compile"] = torch.compile(timm_se)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(True)
    dy = torch.randn_like(x)
    return {n: _train_step(m, x, dy) for n, m in modules.items() if n in impls}, x


def run_se_benchmark(device: str | torch.device = "cuda", quick: bool = True,
                     layouts: Optional[tuple[str, ...]] = None, impls: Sequence[str] = IMPLS, repeats: int = 20,
                     warmup: int = 3) -> list[dict]:
    """SE fwd+bwd per (layout, implementation): dicts with ``impl, device, dtype, shape, layout, median_ms,
    min_ms, noisy, gbps, fraction_of_peak`` (None on CPU), ``speedup_vs_timm`` and ``error``. ``quick=False``:
    both layouts, 5x the repeats and warm-up rounds."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    if not quick:
        repeats, warmup = 5 * repeats, 5 * warmup
    layouts = layouts or (("channels_last",) if quick else ("contiguous", "channels_last"))
    peak_gbs = harness.peak_bandwidth_gbs(device) if cuda else None
    rows: list[dict] = []
    for layout in layouts:
        steps, x = setup_se(device, layout, impls)
        res = harness.time_impls(steps, x.shape[0], repeats, warmup, device)
        base = res.get("timm", {}).get("ms_median")
        for name, s in res.items():
            ms = s["ms_median"]
            gbps = _BYTES_PER_STEP * x.numel() * x.element_size() / (ms * 1e-3) / 1e9 if (cuda and ms) else None
            rows.append(dict(impl=name, device=str(device), dtype=str(x.dtype).split(".")[-1], shape=list(x.shape),
                             layout=layout, median_ms=ms, min_ms=s["ms_min"], noisy=s["noisy"], gbps=gbps,
                             fraction_of_peak=(gbps / peak_gbs) if (gbps and peak_gbs) else None,
                             speedup_vs_timm=(base / ms) if (base and ms) else None, error=s["error"]))
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    ap = harness.parser(__doc__, repeats=20, warmup=3, device=True)
    ap.add_argument("--full", action="store_true", help="both layouts, 5x --repeats and --warmup")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset")
    ap.add_argument("--json", type=Path, help="also write the rows (and the device name) to this file")
    args = ap.parse_args(argv)
    impls = [n for n in args.impls.split(",") if n]
    if not impls or set(impls) - set(IMPLS):
        ap.error(f"--impls: expected a subset of {','.join(IMPLS)}, got {args.impls!r}")
    dev = torch.device(args.device)
    rows = run_se_benchmark(dev, quick=not args.full, impls=impls, repeats=args.repeats, warmup=args.warmup)
    name = harness.device_name(dev)
    print(f"# SE fwd+bwd on {name}, torch {torch.__version__}")
    print(harness.table(rows, COLUMNS))
    for line in harness.noisy_lines(rows, lambda r: f"{r['impl']} {r['layout']}", "median_ms", "min_ms"):
        print(line)
    if args.json:
        harness.write_json(args.json, {"benchmark": "bench_se", "device": name, "rows": rows})
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
