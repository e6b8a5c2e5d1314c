"""Fine-tune a MONAI 3D DenseNet converted with ``densenet_fast.convert`` on synthetic volumes.

    python examples/finetune_monai_3d.py      # small 3D DenseNet on 16^3 volumes: ~25 s (2 shared CPU cores)
    python examples/finetune_monai_3d.py --arch DenseNet121 --size 96 --batch 2 --steps 5

The model is MONAI's own ``DenseNet121`` (or a small one with the same classes); ``convert`` swaps its dense
blocks, transitions and head for the fused modules in place (same Parameters, same ``state_dict``). The
synthetic volumes carry a class-dependent blob, so the loss drops within a few steps. Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import densenet_fast  # noqa: F401
except ImportError:  # running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _optional import require  # noqa: E402  (examples/_optional.py)

from densenet_fast.convert import conversion_report, convert  # noqa: E402


def synthetic_batch(batch: int, size: int, classes: int, gen: torch.Generator):
    """[batch, 1, size, size, size] noise plus a bright cube whose octant is the label."""
    y = torch.randint(0, classes, (batch,), generator=gen)
    x = 0.5 * torch.randn(batch, 1, size, size, size, generator=gen)
    h = size // 2
    for i, c in enumerate(y.tolist()):
        d0, h0, w0 = (c >> 2 & 1) * h, (c >> 1 & 1) * h, (c & 1) * h
        x[i, 0, d0:d0 + h, h0:h0 + h, w0:w0 + h] += 1.5
    return x, y


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--arch", default="small", choices=["small", "DenseNet121"], help="MONAI model size")
    ap.add_argument("--size", type=int, default=16, help="volume edge (D = H = W)")
    ap.add_argument("--batch", type=int, default=4, help="volumes per step")
    ap.add_argument("--classes", type=int, default=4, help="at most 8 (octants)")
    ap.add_argument("--steps", type=int, default=30, help="optimiser steps")
    ap.add_argument("--lr", type=float, default=0.05, help="learning rate")
    args = ap.parse_args()
    if not 2 <= args.classes <= 8:
        ap.error(f"--classes: expected 2..8 (one octant per class), got {args.classes}")
    DenseNet121 = require("monai.networks.nets", "monai").DenseNet121
    torch.manual_seed(0)
    kw = dict(init_features=16, growth_rate=8, block_config=(2, 3, 2)) if args.arch == "small" else {}
    model = DenseNet121(spatial_dims=3, in_channels=1, out_channels=args.classes, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)  # built before convert: still valid
    convert(model)
    print(conversion_report(model))
    gen = torch.Generator().manual_seed(1)
    model.train()
    for step in range(args.steps):
        x, y = synthetic_batch(args.batch, args.size, args.classes, gen)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        print(f"step {step:3d}  loss {loss.item():.4f}  {1e3 * (time.perf_counter() - t0):.0f} ms")
    model.eval()
    with torch.no_grad():
        x, y = synthetic_batch(32, args.size, args.classes, gen)
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"eval accuracy on 32 fresh volumes: {acc:.2f} (chance: {1 / args.classes:.2f})")


if __name__ == "__main__":
    main()
