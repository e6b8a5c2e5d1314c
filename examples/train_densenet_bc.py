"""Train densenet_fast's CIFAR DenseNet-BC (depth 100, k=12 by default) for a few steps on random data.

    python examples/train_densenet_bc.py                          # 4 steps, batch 8: ~25 s (2 shared CPU cores)
    python examples/train_densenet_bc.py --depth 190 --growth-rate 40 --batch-size 64 --steps 100

The data are random CIFAR-shaped tensors ([N, 3, 32, 32], 10 classes) with random labels, so the
printed loss only shows that the loop runs (it starts near log(10) ~ 2.3 and, with lr 0.1 on noise,
need not decrease); swap in a real DataLoader for real training. The
optimiser follows the paper (SGD, momentum 0.9, Nesterov, weight decay 1e-4, lr 0.1) with a cosine
schedule over ``--steps``. ``--impl reference`` runs the same model through the plain PyTorch path.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    import densenet_fast as dnf
except ImportError:  # running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import densenet_fast as dnf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=int, default=100, help="6n+4 (40, 100, 190, 250, ...)")
    p.add_argument("--growth-rate", type=int, default=12, help="k, new channels per layer")
    p.add_argument("--batch-size", type=int, default=8, help="samples per step")
    p.add_argument("--steps", type=int, default=4, help="optimiser steps (the cosine schedule spans them)")
    p.add_argument("--lr", type=float, default=0.1, help="initial learning rate")
    p.add_argument("--impl", default="fused", choices=["fused", "reference"], help="dense-block implementation")
    p.add_argument("--channels-last", action="store_true", help="channels_last inputs and weights")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the random data")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = dnf.densenet_bc(depth=args.depth, growth_rate=args.growth_rate, num_classes=10, impl=args.impl)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"DenseNet-BC depth {args.depth} k={args.growth_rate}: {n_params / 1e6:.2f} M parameters, "
          f"impl={args.impl}, {torch.get_num_threads()} threads")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps)

    gen = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch_size, 3, 32, 32, generator=gen).contiguous(memory_format=fmt)
        y = torch.randint(10, (args.batch_size,), generator=gen)
        t = time.perf_counter()
        lr = opt.param_groups[0]["lr"]  # the rate this step uses (sched.step() below moves to the next one)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        dt = time.perf_counter() - t
        print(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}  lr {lr:.4f}  "
              f"{dt:.2f} s  ({args.batch_size / dt:.1f} img/s)", flush=True)
    print(f"done: {args.steps} steps in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
