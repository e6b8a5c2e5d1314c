"""Eval-mode forward time: torchvision, torch.compile'd torchvision, densenet_fast fused, and
``dnf.fold_for_inference`` (BN2 folded into conv1, stem BN into conv0), all with the same weights.

    python -m benchmarks.bench_inference [--model densenet121] [--size 224] [--batch 8] [--repeats 7]

Timed interleaved (one forward of every implementation per round), under ``torch.inference_mode``,
after warm-up (and compilation); prints min and median per implementation and the ratio to
torchvision's median. Outputs are checked against torchvision's first.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torchvision

import densenet_fast as dnf


def build(model_name: str, num_classes: int = 1000):
    tv = getattr(torchvision.models, model_name)(num_classes=num_classes).eval()
    with torch.no_grad():  # non-trivial BN statistics, so folding has something to fold
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
    return impls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="densenet121", help="torchvision architecture name")
    parser.add_argument("--size", type=int, default=224, help="input height = width")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    args = parser.parse_args()

    torch.manual_seed(0)
    impls = build(args.model)
    x = torch.randn(args.batch, 3, args.size, args.size)
    times = {name: [] for name in impls}
    with torch.inference_mode():
        ref = impls["torchvision"](x)
        for name, model in impls.items():
            start = time.perf_counter()
            for _ in range(args.warmup):
                out = model(x)
            err = ((out - ref).abs().max() / ref.abs().max()).item()
            print(f"{name}: warm-up {time.perf_counter() - start:.1f} s, max rel. difference to torchvision {err:.1e}")
        for _ in range(args.repeats):
            for name, model in impls.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["torchvision"])
    print(f"\n{args.model}, {args.size}x{args.size}, batch {args.batch}, float32, eval, {torch.get_num_threads()} "
          f"threads, median (min) of {args.repeats} interleaved repeats\n")
    print("| Implementation | Eval time | vs torchvision |\n|---|---|---|")
    for name, t in times.items():
        med = statistics.median(t)
        print(f"| {name} | {med * 1e3:.0f} ms ({min(t) * 1e3:.0f} ms) | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
