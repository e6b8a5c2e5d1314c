"""Convert torchxrayvision's chest X-ray DenseNet-121 with ``densenet_fast.convert`` and run it.

    python examples/xray_convert.py                 # random weights: ~15 s (2 shared CPU cores)
    python examples/xray_convert.py --weights model.pt --size 224

``--weights`` takes a state dict file of ``torchxrayvision.models.DenseNet`` (e.g. saved from a
``DenseNet(weights="densenet121-res224-all")`` on a machine with a network); nothing is downloaded here.
The script checks the converted model against an unconverted copy (eval outputs), then runs one training
step on a synthetic batch of 1-channel X-ray-sized images.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

try:
    import densenet_fast  # noqa: F401
except ImportError:  # running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _optional import require  # noqa: E402  (examples/_optional.py)

from densenet_fast.convert import conversion_report, convert  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--weights", default=None, help="a torchxrayvision DenseNet state dict file")
    ap.add_argument("--size", type=int, default=64, help="image edge (the pretrained models use 224)")
    ap.add_argument("--batch", type=int, default=2, help="images")
    args = ap.parse_args()
    xrv = require("torchxrayvision", "torchxrayvision")
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None)  # densenet121 layout, 18 pathologies, 1 input channel
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    ref = copy.deepcopy(model).eval()
    convert(model)
    print(conversion_report(model))
    # torchxrayvision's input range: [-1024, 1024]
    x = 1024 * torch.tanh(torch.randn(args.batch, 1, args.size, args.size))
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model(x)
        t1 = time.perf_counter()
        expected = ref(x)
    err = ((out - expected).abs().max() / expected.abs().max()).item()
    print(f"eval: logits {tuple(out.shape)} in {1e3 * (t1 - t0):.0f} ms; max relative difference to the "
          f"unconverted model {err:.1e}")
    if args.weights:
        print("pathology probabilities of the first image:")
        for name, p in zip(model.targets, torch.sigmoid(out[0]).tolist()):
            print(f"  {name:28s} {p:.3f}")
    else:
        print("random weights: no pathology probabilities shown (they would mean nothing); pass --weights FILE "
              "with a trained torchxrayvision DenseNet state dict to see them")
    model.train()
    t0 = time.perf_counter()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), torch.rand(args.batch, len(model.targets)))
    loss.backward()
    print(f"train step: loss {loss.item():.4f}, forward + backward {1e3 * (time.perf_counter() - t0):.0f} ms")


if __name__ == "__main__":
    main()
