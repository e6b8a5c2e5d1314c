"""Modules that :func:`densenet_fast.convert` puts into torchvision / timm models.

* :class:`FusedFeatures` replaces a model's ``features`` ``nn.Sequential``: same children, same
  names, same output as the Sequential, but a fused :class:`~densenet_fast.nn.DenseBlock` hands its
  buffer *and its batch statistics* to a following fused :class:`~densenet_fast.nn.Transition`.
  :meth:`FusedFeatures.forward_pooled` additionally fuses the final norm with the ReLU and the
  global average pool of the head (``densenet_fast::norm_relu_pool_forward``), so no BN/ReLU output
  of the final norm is stored.
* ``FusedTorchvisionDenseNet`` / ``FusedTimmDenseNet`` (created on first use, so that neither
  torchvision nor timm is imported unless needed) are subclasses of torchvision's / timm's
  ``DenseNet`` that only override ``forward`` to use ``forward_pooled``; ``convert`` swaps the
  ``__class__`` of an exact torchvision/timm ``DenseNet``. ``isinstance`` checks, attributes,
  ``forward_features``/``forward_head`` (timm), ``state_dict`` and pickling keep working.

Modules that carry forward/backward hooks are always called through ``__call__`` (so their hooks
fire) rather than through the fused pairing; they then fuse internally where they can.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_mod

from densenet_fast.nn.fused_features import FusedFeatures, has_hooks, norm_relu_kind  # noqa: F401  (re-exported)

__all__ = ["FusedFeatures", "has_hooks", "norm_relu_kind"]


# -- model classes (created lazily) --------------------------------------------------------------------


def _timm_avg_pool_head(gp: nn.Module) -> bool:
    """Whether timm's ``global_pool`` is a flattening global average pool (NCHW)."""
    if type(gp).__name__ != "SelectAdaptivePool2d" or has_hooks(gp):
        return False
    pool, flat = getattr(gp, "pool", None), getattr(gp, "flatten", None)
    if type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1)):
        return type(flat) is nn.Flatten and flat.start_dim == 1 and flat.end_dim == -1
    if type(pool).__name__ == "FastAdaptiveAvgPool":
        return pool.flatten is True and tuple(pool.dim) == (2, 3) and type(flat) is nn.Identity
    return False


def _make_torchvision_class():
    from torchvision.models.densenet import DenseNet as _TVDenseNet

    class FusedTorchvisionDenseNet(_TVDenseNet):
        """torchvision ``DenseNet`` after :func:`densenet_fast.convert`: forward fuses the final
        norm + ReLU + global pool when ``features`` is a :class:`FusedFeatures`."""

        def forward(self, x: Tensor) -> Tensor:
            features = self.features
            if not isinstance(features, FusedFeatures):
                return super().forward(x)
            return self.classifier(features.forward_pooled(x, relu=True))

    return FusedTorchvisionDenseNet


def _make_timm_class():
    from timm.models.densenet import DenseNet as _TimmDenseNet

    class FusedTimmDenseNet(_TimmDenseNet):
        """timm ``DenseNet`` after :func:`densenet_fast.convert`: ``forward`` fuses the final norm
        (BatchNormAct2d with ReLU) + global average pool when the head is a plain average pool;
        ``forward_features``/``forward_head`` are timm's."""

        def forward(self, x: Tensor) -> Tensor:
            features = self.features
            if not isinstance(features, FusedFeatures) or not _timm_avg_pool_head(self.global_pool):
                return super().forward(x)
            x = features.forward_pooled(x, relu=False)
            x = self.head_drop(x)
            return self.classifier(x)

    return FusedTimmDenseNet


_LAZY_CLASSES = {"FusedTorchvisionDenseNet": _make_torchvision_class, "FusedTimmDenseNet": _make_timm_class}


def __getattr__(name: str):  # PEP 562: pickle finds the lazily created classes here
    if name in _LAZY_CLASSES:
        cls = _LAZY_CLASSES[name]()
        cls.__module__ = __name__
        cls.__qualname__ = name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
