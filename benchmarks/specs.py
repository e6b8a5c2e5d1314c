"""The benchmarked DenseNet architectures, built the same way by every implementation family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

from torch import nn

__all__ = ["ModelSpec", "MODELS", "get_spec", "cifar_stem"]


@dataclass(frozen=True)
class ModelSpec:
    """One DenseNet configuration (torchvision's constructor arguments plus the input it expects)."""

    name: str
    growth_rate: int
    block_config: Tuple[int, ...]
    num_init_features: int
    num_classes: int
    size: int  # default input height = width
    cifar: bool = False  # 3x3 stride-1 stem without norm/pool (DenseNet-BC for 32x32 inputs)
    spatial_dims: int = 2  # 3: MONAI-layout volumes [N, in_channels, size, size, size] (weights from MONAI)
    in_channels: int = 3


MODELS: Dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("densenet121", 32, (6, 12, 24, 16), 64, 1000, 224),
    ModelSpec("densenet169", 32, (6, 12, 32, 32), 64, 1000, 224),
    ModelSpec("densenet201", 32, (6, 12, 48, 32), 64, 1000, 224),
    ModelSpec("densenet161", 48, (6, 12, 36, 24), 96, 1000, 224),
    ModelSpec("densenet_bc100", 12, (16, 16, 16), 24, 10, 32, cifar=True),
    ModelSpec("monai_densenet121_3d", 32, (6, 12, 24, 16), 64, 2, 96, spatial_dims=3, in_channels=1),
)}
_ALIASES = {"bc100": "densenet_bc100", "densenet-bc-100": "densenet_bc100", "densenet_bc": "densenet_bc100"}


def get_spec(name: str) -> ModelSpec:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in MODELS:
        raise ValueError(f"--model: expected one of {sorted(MODELS) + sorted(_ALIASES)}, got {name!r}")
    return MODELS[key]


def cifar_stem(model: nn.Module, spec: ModelSpec) -> nn.Module:
    """Turns a torchvision/timm ImageNet DenseNet into DenseNet-BC's CIFAR layout in place.

    torchvision and timm have no CIFAR DenseNet, so their stem (7x7/2 conv, norm, ReLU, max-pool) is
    replaced by one 3x3 conv, exactly as ``densenet_fast.densenet_bc``; the module tree and
    ``state_dict`` keys then match it.
    """
    features = model.features
    in_ch = features.conv0.in_channels
    features.conv0 = nn.Conv2d(in_ch, spec.num_init_features, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(features.conv0.weight)
    for name in ("norm0", "relu0", "pool0"):
        if hasattr(features, name):
            delattr(features, name)
    return model
