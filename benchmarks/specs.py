"""The benchmarked DenseNet architectures, built the same way by every implementation family."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Tuple

from torch import nn

__all__ = ["ModelSpec", "MODELS", "get_spec", "bc_spec", "cifar_stem"]


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


def bc_spec(depth: int, growth_rate: int = 12) -> ModelSpec:
    """DenseNet-BC for 32x32 inputs: three blocks of (depth - 4) / 6 layers, a 2k-channel 3x3 stem.

    Named ``densenet_bc<depth>`` for k = 12 and ``densenet_bc<depth>_k<k>`` otherwise.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"--model: DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth}")
    if growth_rate < 1:
        raise ValueError(f"--model: DenseNet-BC growth rate must be >= 1, got {growth_rate}")
    name = f"densenet_bc{depth}" + ("" if growth_rate == 12 else f"_k{growth_rate}")
    layers = (depth - 4) // 6
    return ModelSpec(name, growth_rate, (layers,) * 3, 2 * growth_rate, 10, 32, cifar=True)


MODELS: Dict[str, ModelSpec] = {s.name: s for s in (
    ModelSpec("densenet121", 32, (6, 12, 24, 16), 64, 1000, 224),
    ModelSpec("densenet169", 32, (6, 12, 32, 32), 64, 1000, 224),
    ModelSpec("densenet201", 32, (6, 12, 48, 32), 64, 1000, 224),
    ModelSpec("densenet161", 48, (6, 12, 36, 24), 96, 1000, 224),
    bc_spec(100, 12),
    bc_spec(250, 24),  # the memory-efficient DenseNet paper's largest CIFAR model (15.3M parameters)
    ModelSpec("monai_densenet121_3d", 32, (6, 12, 24, 16), 64, 2, 96, spatial_dims=3, in_channels=1),
)}
_ALIASES = {"bc100": "densenet_bc100", "densenet-bc-100": "densenet_bc100", "densenet_bc": "densenet_bc100",
            "bc250": "densenet_bc250_k24", "densenet-bc-250": "densenet_bc250_k24"}
_BC_NAME = re.compile(r"(?:densenet_?)?bc-?(\d+)(?:_k(\d+))?")


def get_spec(name: str) -> ModelSpec:
    """A spec from MODELS, an alias, or any DenseNet-BC written ``densenet_bc<depth>[_k<growth>]``."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key in MODELS:
        return MODELS[key]
    match = _BC_NAME.fullmatch(key)
    if match:
        return bc_spec(int(match.group(1)), int(match.group(2) or 12))
    raise ValueError(f"--model: expected one of {sorted(MODELS) + sorted(_ALIASES)} or "
                     f"densenet_bc<depth>[_k<growth>], got {name!r}")


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
