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

from typing import Optional

from torch import Tensor, nn

from densenet_fast.nn.export_support import prepare_scriptable
from densenet_fast.nn.fused_features import FusedFeatures, has_hooks

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

        __prepare_scriptable__ = prepare_scriptable  # torch.jit.script: densenet_fast.nn.torchscript

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

        __prepare_scriptable__ = prepare_scriptable  # torch.jit.script: densenet_fast.nn.torchscript

        def forward(self, x: Tensor) -> Tensor:
            features = self.features
            if not isinstance(features, FusedFeatures) or not _timm_avg_pool_head(self.global_pool):
                return super().forward(x)
            x = features.forward_pooled(x, relu=False)
            x = self.head_drop(x)
            return self.classifier(x)

    return FusedTimmDenseNet


def monai_pool_head(class_layers: nn.Module) -> bool:
    """Whether MONAI's ``class_layers`` is ReLU -> global average pool -> Flatten(1) -> ``out``, without hooks."""
    if type(class_layers) is not nn.Sequential or list(class_layers._modules) != ["relu", "pool", "flatten", "out"]:
        return False
    relu, pool, flat = class_layers.relu, class_layers.pool, class_layers.flatten
    pool_ok = (type(pool) in (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
               and pool.output_size in (1, (1, 1), (1, 1, 1)))
    flat_ok = type(flat) is nn.Flatten and flat.start_dim == 1 and flat.end_dim == -1
    return (type(relu) is nn.ReLU and pool_ok and flat_ok
            and not any(has_hooks(m) for m in (class_layers, relu, pool, flat)))


_MONAI_NAMES = ("DenseNet", "DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264")


def _make_monai_class(base_name: str):
    import monai.networks.nets.densenet as _monai

    base = getattr(_monai, base_name)

    def forward(self, x: Tensor) -> Tensor:
        features = self.features
        if not isinstance(features, FusedFeatures) or not monai_pool_head(self.class_layers):
            return base.forward(self, x)
        return self.class_layers.out(features.forward_pooled(x, relu=True))

    doc = (f"MONAI ``{base_name}`` after :func:`densenet_fast.convert`: forward fuses the final norm + the "
           "head's ReLU + global average pool when ``features`` is a :class:`FusedFeatures`.")
    return type(f"FusedMonai{base_name}", (base,), {"forward": forward, "__doc__": doc,
                                                "__prepare_scriptable__": prepare_scriptable})


def _make_xrv_class():
    from torchxrayvision import utils as _xrv_utils
    from torchxrayvision.models import DenseNet as _XRVDenseNet

    class FusedXRVDenseNet(_XRVDenseNet):
        """torchxrayvision ``DenseNet`` after :func:`densenet_fast.convert`: ``features2`` (the pooled
        features ``forward`` classifies) fuses the final norm + ReLU + global average pool."""

        __prepare_scriptable__ = prepare_scriptable  # torch.jit.script: densenet_fast.nn.torchscript

        def features2(self, x: Tensor) -> Tensor:
            features = self.features
            if not isinstance(features, FusedFeatures):
                return super().features2(x)
            if hasattr(self, "input_resolution"):
                x = _xrv_utils.fix_resolution(x, self.input_resolution, self)
                _xrv_utils.warn_normalization(x)
            return features.forward_pooled(x, relu=True)

    return FusedXRVDenseNet


_LAZY_CLASSES = {"FusedTorchvisionDenseNet": _make_torchvision_class, "FusedTimmDenseNet": _make_timm_class,
                 "FusedXRVDenseNet": _make_xrv_class}
_LAZY_CLASSES.update({f"FusedMonai{n}": (lambda n=n: _make_monai_class(n)) for n in _MONAI_NAMES})


def fused_head_class(cls: type) -> Optional[type]:
    """The fused-head subclass for an exact MONAI / torchxrayvision DenseNet class, ``None`` for other classes."""
    if cls.__module__ == "monai.networks.nets.densenet" and cls.__name__ in _MONAI_NAMES:
        import monai.networks.nets.densenet as _monai
        if getattr(_monai, cls.__name__) is cls:
            return __getattr__(f"FusedMonai{cls.__name__}")
    if cls.__module__ == "torchxrayvision.models" and cls.__name__ == "DenseNet":
        return __getattr__("FusedXRVDenseNet")
    return None


def __getattr__(name: str):  # PEP 562: pickle finds the lazily created classes here
    if name in globals():
        return globals()[name]
    if name in _LAZY_CLASSES:
        cls = _LAZY_CLASSES[name]()
        cls.__module__ = __name__
        cls.__qualname__ = name
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
