"""Eval-mode forward time: torchvision, torch.compile'd torchvision, densenet_fast fused, and
``dnf.fold_for_inference`` (BN2 folded into conv1, stem BN into conv0), all with the same weights.

    python -m benchmarks.bench_inference [--model densenet121] [--size 224] [--batch 8] [--repeats 7]

Timed by the harness (``benchmarks.harness.time_impls``: one forward of every implementation per round,
interleaved), under ``torch.inference_mode``, after warm-up (and compilation); prints min and median per
implementation and the ratio to torchvision's median. Outputs are checked against torchvision's first.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running from a source checkout
    sys.path.insert(0, str(ROOT))

import densenet_fast as dnf  # noqa: E402
from benchmarks import harness  # noqa: E402

__all__ = ["setup_inference", "main"]


def setup_inference(model_name: str, num_classes: int = 1000, compile: bool = True) -> Dict[str, torch.nn.Module]:
    """The setup: every implementation in eval mode with torchvision's weights (and non-trivial BN statistics,
    so folding has something to fold); ``compile=False`` leaves the torch.compile'd ones out."""
    tv = getattr(torchvision.models, model_name)(num_classes=num_classes).eval()
    with torch.no_grad():
        for m in tv.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    fused = getattr(dnf, model_name)(num_classes=num_classes)
    fused.load_state_dict(tv.state_dict())
    fused.eval()
    impls = {
        "torchvision": tv,
        "torchvision + torch.compile": torch.compile(copy.deepcopy(tv)),
        "densenet_fast fused": fused,
        "densenet_fast fold_for_inference": dnf.fold_for_inference(fused),
        "fold_for_inference + torch.compile": torch.compile(dnf.fold_for_inference(fused)),
    }
    return {n: m for n, m in impls.items() if compile or "compile" not in n}


def _forward(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return model(x)
    return call


def main(argv: Optional[List[str]] = None) -> int:
    ap = harness.parser(__doc__, repeats=7, warmup=2)
    ap.add_argument("--model", default="densenet121", help="torchvision architecture name")
    ap.add_argument("--size", type=int, default=224, help="input height = width")
    ap.add_argument("--batch", type=int, default=8, help="batch size")
    ap.add_argument("--no-compile", action="store_true", help="leave the torch.compile'd implementations out")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    impls = setup_inference(args.model, compile=not args.no_compile)
    x = torch.randn(args.batch, 3, args.size, args.size)
    fns = {name: _forward(model, x) for name, model in impls.items()}
    ref = fns["torchvision"]()
    for name, fn in fns.items():  # the first call compiles the compiled ones: its time, and the check
        start = time.perf_counter()
        out = fn()
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        print(f"{name}: first call {time.perf_counter() - start:.1f} s, max rel. difference to torchvision {err:.1e}")
    res = harness.time_impls(fns, args.batch, args.repeats, args.warmup, torch.device("cpu"))
    rows = [{"impl": n, **r} for n, r in res.items()]
    base = res["torchvision"]["ms_median"]
    print(f"\n{args.model}, {args.size}x{args.size}, batch {args.batch}, float32, eval, {torch.get_num_threads()} "
          f"threads, median (min) of {args.repeats} interleaved repeats on {harness.device_name('cpu')}\n")
    columns = [("Implementation", "impl", ""),
               ("Eval time", lambda r: r["ms_median"] and f"{r['ms_median']:.0f} ms ({r['ms_min']:.0f} ms)", ""),
               ("vs torchvision", lambda r: r["ms_median"] and base and f"{r['ms_median'] / base:.2f}x", "")]
    print(harness.table(rows, columns + [("error", "error", "")] * any(r["error"] for r in rows), markdown=True))
    for line in harness.noisy_lines(rows, lambda r: r["impl"]):
        print(line)
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
