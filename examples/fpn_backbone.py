"""An FPN backbone (as Mask R-CNN / RetinaNet use) from ``densenet_fast.densenet121``; no downloads.

    python examples/fpn_backbone.py            # ~20 s (2 shared CPU cores)

``torchvision.models.detection.backbone_utils.BackboneWithFPN`` takes the outputs of dense blocks 2-4
(strides 8, 16, 32) through ``IntermediateLayerGetter`` and adds a feature pyramid (plus a max-pooled
level). The dense blocks and transitions run their fused operators, so training the detector keeps
densenet_fast's memory savings. ``create_feature_extractor`` (torch.fx) works the same way: the fused
modules appear as single nodes of the traced graph. Pass ``--weights densenet121.pth`` (a torchvision
state dict downloaded elsewhere) for ImageNet weights; the backbone's ``out_channels`` is what
``torchvision.models.detection.MaskRCNN(backbone, num_classes=...)`` needs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

import torch

try:
    import densenet_fast as dnf
except ImportError:  # running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import densenet_fast as dnf

from torchvision.models.detection.backbone_utils import BackboneWithFPN  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool  # noqa: E402

# dense block -> FPN level name; densenet121's block outputs have 512, 1024 and 1024 channels
RETURN_LAYERS = {"denseblock2": "0", "denseblock3": "1", "denseblock4": "2"}


def build_backbone(weights: Optional[str] = None, out_channels: int = 256) -> BackboneWithFPN:
    """densenet121 features -> FPN: image [N, 3, H, W] -> {"0": stride 8, "1": 16, "2": 32, "pool": 64},
    each [N, out_channels, H/stride, W/stride]."""
    model = dnf.densenet121(weights=weights)
    blocks = [model.features.get_submodule(name) for name in RETURN_LAYERS]
    in_channels = [block.denselayer1.norm1.num_features + len(block) * block.denselayer1.conv2.out_channels
                   for block in blocks]
    return BackboneWithFPN(model.features, RETURN_LAYERS, in_channels, out_channels,
                           extra_blocks=LastLevelMaxPool())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--weights", default=None, help="torchvision densenet121 state dict file (None: random)")
    parser.add_argument("--image-size", type=int, default=64, help="input height = width")
    parser.add_argument("--batch", type=int, default=2, help="batch size")
    args = parser.parse_args()

    backbone = build_backbone(args.weights)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)

    start = time.perf_counter()
    feats = backbone.train()(x)  # a training step through the fused blocks
    sum(f.float().pow(2).mean() for f in feats.values()).backward()
    print(f"train step {time.perf_counter() - start:.2f} s")
    for name, f in feats.items():
        print(f"  level {name}: {tuple(f.shape)}")

    # The same multi-scale features through torch.fx (fused blocks are single nodes of the graph).
    model = dnf.densenet121().eval()
    extractor = create_feature_extractor(model, {f"features.{k}": v for k, v in RETURN_LAYERS.items()})
    with torch.no_grad():
        fx_feats = extractor(x)
    print("create_feature_extractor:", {k: tuple(v.shape) for k, v in fx_feats.items()})


if __name__ == "__main__":
    main()
