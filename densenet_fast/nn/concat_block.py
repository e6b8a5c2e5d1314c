"""Dense blocks whose layers return ``torch.cat([x, new_features], 1)`` (MONAI, torchxrayvision).

MONAI's ``_DenseLayer`` keeps its BN-ReLU-conv children in a ``layers`` Sequential
(``layers.norm1, relu1, conv1, norm2, relu2, conv2[, dropout]``) and returns the concatenation;
torchxrayvision's ``_DenseLayer`` is itself a Sequential of those children (plus ``drop_rate``) and
also returns the concatenation. Their blocks are plain Sequentials of such layers.
:class:`ConcatDenseBlock` runs such a block through the fused operator (same children, names and
``state_dict``) and, on its reference path, calls the layers one after the other as the Sequential did.
:class:`MonaiDenseLayer` is a MONAI-shaped layer for densenet_fast's own 3D models.
"""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from densenet_fast._warn import warn_once
from densenet_fast.nn.dense_block import (
    CONV,
    NORM,
    DenseBlock,
    check_int,
    check_spatial_dims,
)
from densenet_fast.ops.common import check_drop_rate

__all__ = ["ConcatDenseBlock", "MonaiDenseLayer", "layer_unit"]


def layer_unit(layer: nn.Module) -> nn.Module:
    """The module holding a layer's ``norm1/conv1/norm2/conv2``: MONAI's ``layer.layers``, else the layer."""
    inner = layer._modules.get("layers")
    return inner if isinstance(inner, nn.Sequential) else layer


class MonaiDenseLayer(nn.Module):
    """MONAI's ``_DenseLayer`` (children ``layers.norm1, relu1, conv1, norm2, relu2, conv2[, dropout]``).

    forward(x: [N, C, (D,) H, W]) -> [N, C + growth_rate, (D,) H, W] (the input and the new features).
    ``dropout_prob > 0`` adds MONAI's channel dropout (``nn.Dropout2d``/``nn.Dropout3d``), which the fused
    block does not compute (it then runs this per-layer path, with a warning).
    """

    def __init__(self, spatial_dims: int, in_channels: int, growth_rate: int, bn_size: int,
                 dropout_prob: float = 0.0) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_int("in_channels", in_channels)
        check_int("growth_rate", growth_rate)
        check_int("bn_size", bn_size)
        check_drop_rate(dropout_prob)
        conv, norm, inter = CONV[spatial_dims], NORM[spatial_dims], bn_size * growth_rate
        self.layers = nn.Sequential()
        self.layers.add_module("norm1", norm(in_channels))
        self.layers.add_module("relu1", nn.ReLU(inplace=True))
        self.layers.add_module("conv1", conv(in_channels, inter, kernel_size=1, bias=False))
        self.layers.add_module("norm2", norm(inter))
        self.layers.add_module("relu2", nn.ReLU(inplace=True))
        self.layers.add_module("conv2", conv(inter, growth_rate, kernel_size=3, padding=1, bias=False))
        if dropout_prob > 0:
            self.layers.add_module("dropout", (nn.Dropout2d if spatial_dims == 2 else nn.Dropout3d)(dropout_prob))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.layers(x)], 1)


class ConcatDenseBlock(DenseBlock):
    """A dense block of concatenating layers: what ``densenet_fast.convert()`` makes of a MONAI or
    torchxrayvision ``_DenseBlock`` (and what ``densenet121_3d`` builds), named ``ConcatDenseBlock`` in the
    conversion report.

    Those libraries' layers return ``torch.cat([x, new_features], 1)``, where torchvision's return the new
    features only. The block holds the original layer modules (shared, not copied) as children
    ``denselayer1..L``, so parameters, buffers and ``state_dict`` keys are the original ones. ``impl="fused"``
    runs the whole block through the fused operator (it reads each layer's ``norm1/conv1/norm2/conv2``);
    the reference path calls the layers one after the other, as the original ``nn.Sequential`` did. Layers
    with channel dropout run the reference path, with a warning.

    forward(x: [N, C0, (D,) H, W]) -> [N, C0 + L*k, (D,) H, W], the same values as the Sequential it replaces.
    """

    @classmethod
    def from_layers(cls, layers: "dict[str, nn.Module]") -> "ConcatDenseBlock":
        """A block holding the *same* layer modules (shared, not copied) under the same names."""
        new = cls.__new__(cls)
        nn.ModuleDict.__init__(new, layers)
        new.impl = "fused"
        return new

    def _layers(self) -> List[nn.Module]:
        return [layer_unit(layer) for layer in self.values()]

    def can_fuse(self, x: Tensor) -> bool:
        if getattr(self, "impl", "fused") == "fused" and any("dropout" in u._modules for u in self._layers()):
            warn_once("block:channel-dropout", "densenet_fast.ConcatDenseBlock: using the reference PyTorch path "
                      "because its layers use channel dropout (Dropout2d/Dropout3d), which the fused block does "
                      "not compute.", stacklevel=2)
            return False
        return super().can_fuse(x)

    def reference_forward(self, init_features: Tensor) -> Tensor:
        x = init_features
        for layer in self.values():
            x = layer(x)
        return x
