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

from densenet_fast.nn.batchnorm_stats import fusable_norms
from densenet_fast.nn.dense_block import (DenseBlock, Transition, _autocast_dtype_fix, _fused_device_ok,
                                          fused_norm_relu_pool)

__all__ = ["FusedFeatures", "has_hooks", "norm_relu_kind"]


def has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` would run hooks (its own or global module hooks)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or _module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks
                or _module_mod._global_backward_hooks or _module_mod._global_backward_pre_hooks)


def norm_relu_kind(m: nn.Module) -> Optional[str]:
    """``"bn"`` for a plain ``nn.BatchNorm2d``, ``"bn_relu"`` for timm's ``BatchNormAct2d`` with a ReLU
    activation and no drop layer, ``None`` otherwise (or when the norm itself cannot be fused)."""
    if not isinstance(m, nn.BatchNorm2d) or not fusable_norms([m]):
        return None
    if type(m) is nn.BatchNorm2d:
        return "bn"
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    if type(m).__name__ == "BatchNormAct2d" and type(act) is nn.ReLU and type(drop) is nn.Identity:
        return "bn_relu"
    return None


class FusedFeatures(nn.Sequential):
    """Drop-in for a DenseNet ``features`` Sequential (identical children and ``state_dict``).

    ``forward(x)`` returns exactly what the Sequential returns (the final norm's output), fusing
    each dense block with the transition that follows it. ``forward_pooled(x, relu)`` returns
    ``flatten(adaptive_avg_pool2d(relu(self(x)) if relu else self(x), 1), 1)`` and also fuses the
    final norm (+ ReLU + pool) with the last block.
    """

    impl = "fused"  # "reference": run the children one after the other, as nn.Sequential does

    def _run(self, x: Tensor, pool_relu: Optional[bool]):
        if self.impl != "fused":
            return super().forward(x), False
        mods = list(self._modules.values())
        pending = None  # a fused block's BlockOutput not yet consumed
        for i, m in enumerate(mods):
            last = i == len(mods) - 1
            if pending is not None:
                buf = pending.buffer
                if isinstance(m, Transition) and not has_hooks(m) and m.can_fuse(buf):
                    x, pending = m.fused_forward(buf, pending.mean, pending.var), None
                    continue
                x, stats, pending = buf, pending, None
            else:
                stats = None
            if last and pool_relu is not None and not has_hooks(m):
                kind = norm_relu_kind(m)
                if (kind == "bn_relu" or (kind == "bn" and pool_relu)) and x.dim() == 4 \
                        and _fused_device_ok(_autocast_dtype_fix(x)):
                    if stats is not None and m.training == bool(stats.mean.numel()):
                        return fused_norm_relu_pool(m, x, stats.mean, stats.var), True
                    return fused_norm_relu_pool(m, x), True
            if isinstance(m, DenseBlock) and not has_hooks(m) and m.can_fuse(x):
                pending = m.fused_forward(x)
                continue
            x = m(x)
        if pending is not None:
            x = pending.buffer
        return x, False

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)[0]

    def forward_pooled(self, x: Tensor, relu: bool = True) -> Tensor:
        """[N, C_in, H, W] -> [N, C]: ``flatten(adaptive_avg_pool2d(relu?(self(x)), 1), 1)``."""
        out, pooled = self._run(x, bool(relu))
        if pooled:
            return out
        if relu:
            out = F.relu(out)
        return torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "FusedFeatures":
        """A FusedFeatures holding the *same* child modules (shared, not copied) under the same names."""
        new = cls(OrderedDict(seq._modules))
        new.training = seq.training
        return new


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
