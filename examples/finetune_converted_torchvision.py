"""Fine-tune a torchvision DenseNet converted with ``densenet_fast.convert`` on a small synthetic dataset.

    python examples/finetune_converted_torchvision.py                    # small DenseNet: ~25 s (2 shared CPU cores)
    python examples/finetune_converted_torchvision.py --arch densenet121 --image-size 224 --steps 50
    python examples/finetune_converted_torchvision.py --arch densenet121 --weights densenet121.pth

``--weights`` takes a torchvision state dict file (e.g. ``densenet121-a639ec97.pth`` downloaded elsewhere);
nothing is downloaded here. The classifier is replaced for ``--num-classes`` classes, the model is converted
in place (its Parameters are shared, so the optimizer can be built before or after), the backbone gets a
10x smaller learning rate than the new head, and the synthetic images carry a class-dependent colour
pattern, so the loss visibly drops in a few steps.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import densenet_fast  # noqa: F401
except ImportError:  # running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torchvision  # noqa: E402

from densenet_fast.convert import conversion_report, convert  # noqa: E402


def build_model(arch: str, num_classes: int, weights: str | None) -> nn.Module:
    if arch == "small":  # a DenseNet-BC with torchvision's classes, small enough for a CPU demo
        model = torchvision.models.DenseNet(growth_rate=12, block_config=(4, 6, 4), num_init_features=24)
    else:
        model = getattr(torchvision.models, arch)()
    if weights:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    return model


def synthetic_batch(batch: int, num_classes: int, size: int, generator: torch.Generator):
    """Random images plus a class-dependent colour offset: learnable, but not trivially."""
    y = torch.randint(num_classes, (batch,), generator=generator)
    palette = torch.linspace(-1, 1, num_classes * 3).view(num_classes, 3)
    x = torch.randn(batch, 3, size, size, generator=generator) + palette[y].view(batch, 3, 1, 1)
    return x, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="small", choices=["small", "densenet121", "densenet161", "densenet169",
                                                       "densenet201"])
    p.add_argument("--weights", default=None, help="torchvision state dict file to start from")
    p.add_argument("--num-classes", type=int, default=5, help="classes of the new head")
    p.add_argument("--image-size", type=int, default=32, help="edge of the square synthetic images")
    p.add_argument("--batch-size", type=int, default=16, help="samples per step")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    args = p.parse_args()

    torch.manual_seed(args.seed)
    model = build_model(args.arch, args.num_classes, args.weights)
    head = list(model.classifier.parameters())
    backbone = [p for n, p in model.named_parameters() if not n.startswith("classifier.")]
    # built before the conversion on purpose: convert() keeps the same Parameter objects
    opt = torch.optim.SGD([{"params": backbone, "lr": args.lr / 10}, {"params": head, "lr": args.lr}],
                          momentum=0.9, weight_decay=1e-4, nesterov=True)
    convert(model)
    print(conversion_report(model))

    gen = torch.Generator().manual_seed(args.seed + 1)
    model.train()
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = synthetic_batch(args.batch_size, args.num_classes, args.image_size, gen)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(1) == y).float().mean().item()
        print(f"step {step:3d}/{args.steps}  loss {loss.item():.4f}  acc {acc:5.1%}  "
              f"{(time.perf_counter() - t0) / step:.2f} s/step", flush=True)

    model.eval()
    with torch.inference_mode():
        x, y = synthetic_batch(256, args.num_classes, args.image_size, gen)
        acc = (model(x).argmax(1) == y).float().mean().item()
    print(f"held-out synthetic accuracy: {acc:.1%} (chance {1 / args.num_classes:.1%})")
    # The converted model's state dict loads into a plain torchvision model (and vice versa).
    plain = build_model(args.arch, args.num_classes, None)
    plain.load_state_dict(model.state_dict(), strict=True)
    print("state dict loads into an unconverted torchvision model: ok")


if __name__ == "__main__":
    main()
