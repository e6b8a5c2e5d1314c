"""MONAI-compatible DenseNets (2D and, the point of them, 3D) on the fused dense block.

``DenseNet3d`` takes MONAI ``DenseNet``'s constructor arguments and has its module tree and
``state_dict`` keys (``features.denseblock1.denselayer1.layers.norm1.weight``, ...,
``class_layers.out.weight``), so a MONAI checkpoint loads with ``strict=True`` and back. The blocks
run the fused operator on ``[N, C, D, H, W]`` volumes (3x3x3 convolutions, 2x2x2 transitions, the final
norm + ReLU + global pool fused); MONAI's own module classes are not needed.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from densenet_fast.models.densenet import check_input_channels, remap_legacy_keys
from densenet_fast.nn.concat_block import ConcatDenseBlock, MonaiDenseLayer
from densenet_fast.nn.converted import monai_pool_head
from densenet_fast.nn.dense_block import (
    CONV,
    NORM,
    DenseBlock,
    Transition,
    check_impl,
    check_int,
    check_spatial_dims,
)
from densenet_fast.nn.export_support import prepare_scriptable
from densenet_fast.nn.fused_features import FusedFeatures

__all__ = ["DenseNet3d", "load_pretrained", "densenet121_3d", "densenet169_3d", "densenet201_3d", "densenet264_3d"]

_MAX_POOL = {2: nn.MaxPool2d, 3: nn.MaxPool3d}
_ADAPTIVE_AVG = {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


# What to do with an act / norm the fused kernels do not compute: MONAI's own model, converted, runs such
# blocks on MONAI's modules (convert() leaves them alone and reports it).
_UNFUSED = ("build MONAI's own model (monai.networks.nets.DenseNet121(..., {arg}=...)) and pass it to "
            "densenet_fast.convert(): blocks it cannot fuse keep MONAI's modules, and conversion_report() says which")


def _check_act(act) -> None:
    """Only MONAI's ReLU activation is computed by the fused kernels."""
    name, kw = (act, {}) if isinstance(act, str) else (act[0], act[1] if len(act) > 1 else {})
    if str(name).lower() != "relu" or set(kw) - {"inplace"}:
        raise ValueError(f"act: expected 'relu' or ('relu', {{'inplace': bool}}) (the fused kernels compute "
                         f"BN + ReLU), got {act!r}; for other activations " + _UNFUSED.format(arg="act"))


# BatchNorm arguments MONAI's Norm factory passes on, and the values the fused kernels compute (None: any value)
_NORM_ARGS = {"eps": None, "momentum": None, "affine": True, "track_running_stats": True}


def _norm_kwargs(norm) -> dict:
    """eps/momentum of MONAI's ``norm="batch"`` / ``("batch", {...})``; anything else is refused."""
    name, kw = (norm, {}) if isinstance(norm, str) else (norm[0], dict(norm[1]) if len(norm) > 1 else {})
    bad = [k for k, v in kw.items() if k not in _NORM_ARGS or (_NORM_ARGS[k] is not None and v != _NORM_ARGS[k])]
    if str(name).lower() != "batch" or bad:
        raise ValueError(f"norm: expected 'batch' or ('batch', {{'eps': ..., 'momentum': ...}}) (the fused kernels "
                         f"compute an affine BatchNorm with running statistics), got {norm!r}; for other norms "
                         + _UNFUSED.format(arg="norm"))
    return {k: v for k, v in kw.items() if _NORM_ARGS[k] is None}


class DenseNet3d(nn.Module):
    """MONAI's ``DenseNet`` (same arguments, module tree and ``state_dict``) on densenet_fast's fused blocks.

    Args (MONAI's): spatial_dims (3; 2 also works), in_channels, out_channels, init_features, growth_rate,
        block_config, bn_size, act (ReLU only), norm (batch norm only; eps/momentum), dropout_prob (> 0 adds
        MONAI's channel dropout, which runs the per-layer path with a warning).
    Keyword-only: ``impl`` ("fused" or "reference"), ``sync_bn`` (every norm an ``nn.SyncBatchNorm``, as
    ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` makes it; blocks, transitions and the final norm then
    synchronise in distributed training, docs/design.md §13).

    forward(x: [N, in_channels, D, H, W]) -> logits [N, out_channels] ([N, in_channels, H, W] for spatial_dims=2).
    """

    __prepare_scriptable__ = prepare_scriptable  # torch.jit.script: densenet_fast.nn.torchscript

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, init_features: int = 64,
                 growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16), bn_size: int = 4,
                 act: Union[str, Tuple] = ("relu", {"inplace": True}), norm: Union[str, Tuple] = "batch",
                 dropout_prob: float = 0.0, *, impl: str = "fused", sync_bn: bool = False) -> None:
        super().__init__()
        d = check_spatial_dims(spatial_dims)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels),
                            ("init_features", init_features), ("growth_rate", growth_rate), ("bn_size", bn_size)):
            check_int(name, value)
        if isinstance(block_config, (str, bytes)) or not isinstance(block_config, Sequence) or not block_config:
            raise ValueError(f"block_config: expected a non-empty sequence of layer counts, got {block_config!r}")
        for i, n in enumerate(block_config):
            check_int(f"block_config[{i}]", n)
        _check_act(act)
        bn_kw = _norm_kwargs(norm)
        self.impl = check_impl(impl)

        def norm_layer(c: int) -> nn.Module:
            return NORM[d](c, **bn_kw)

        self.features = FusedFeatures(OrderedDict([
            ("conv0", CONV[d](in_channels, init_features, kernel_size=7, stride=2, padding=3, bias=False)),
            ("norm0", norm_layer(init_features)),
            ("relu0", nn.ReLU(inplace=True)),
            ("pool0", _MAX_POOL[d](kernel_size=3, stride=2, padding=1)),
        ]))
        channels = init_features
        for i, num_layers in enumerate(block_config):
            layers = OrderedDict()
            for j in range(num_layers):
                layer = MonaiDenseLayer(d, channels + j * growth_rate, growth_rate, bn_size, dropout_prob)
                for m in layer.layers:
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eps, m.momentum = bn_kw.get("eps", m.eps), bn_kw.get("momentum", m.momentum)
                layers[f"denselayer{j + 1}"] = layer
            block = ConcatDenseBlock.from_layers(layers)
            block.impl = impl
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * growth_rate
            if i == len(block_config) - 1:
                self.features.add_module("norm5", norm_layer(channels))
            else:
                trans = Transition(channels, channels // 2, impl=impl, spatial_dims=d)
                trans.norm.eps, trans.norm.momentum = bn_kw.get("eps", 1e-5), bn_kw.get("momentum", 0.1)
                self.features.add_module(f"transition{i + 1}", trans)
                channels //= 2
        self.features.impl = impl
        self.class_layers = nn.Sequential(OrderedDict([
            ("relu", nn.ReLU(inplace=True)),
            ("pool", _ADAPTIVE_AVG[d](1)),
            ("flatten", nn.Flatten(1)),
            ("out", nn.Linear(channels, out_channels)),
        ]))
        for m in self.modules():  # MONAI's initialisation
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)
        if not isinstance(sync_bn, bool):
            raise TypeError(f"sync_bn: expected a bool, got {type(sync_bn).__name__} {sync_bn!r}")
        if sync_bn:
            nn.SyncBatchNorm.convert_sync_batchnorm(self)

    def set_impl(self, impl: str) -> "DenseNet3d":
        """Switches every block, transition and the head between "fused" and "reference"; returns self."""
        self.impl = check_impl(impl)
        for m in self.modules():
            if isinstance(m, (DenseBlock, Transition, FusedFeatures)):
                m.impl = impl
        return self

    def forward(self, x: Tensor) -> Tensor:
        check_input_channels(x, self.features._modules.get("conv0"))
        if self.features.impl != "fused" or not monai_pool_head(self.class_layers):
            return self.class_layers(self.features(x))
        return self.class_layers.out(self.features.forward_pooled(x, relu=True))


# MONAI's pretrained 2-D weights: torchvision's ImageNet checkpoints (monai.networks.nets.densenet uses these URLs)
_PRETRAINED_URLS = {
    "densenet121": "https://download.pytorch.org/models/densenet121-a639ec97.pth",
    "densenet169": "https://download.pytorch.org/models/densenet169-b2777c0a.pth",
    "densenet201": "https://download.pytorch.org/models/densenet201-c1103571.pth",
}
_TV_LAYER_KEY = re.compile(r"^(.*denselayer\d+)\.((?:norm|relu|conv)[12]\.(?:weight|bias|running_mean|running_var))$")


def load_pretrained(model: DenseNet3d, arch: str, progress: bool = True) -> DenseNet3d:
    """MONAI's ``pretrained=True``: torchvision's ImageNet weights of ``arch`` loaded into a 2-D model as MONAI
    loads them (keys renamed to ``denselayerN.layers.*``; only tensors whose name and shape match are taken, so
    ``class_layers`` and a conv0 for other ``in_channels`` keep their initialisation)."""
    if arch not in _PRETRAINED_URLS:
        raise ValueError(f"pretrained: only 'densenet121', 'densenet169' and 'densenet201' have pretrained weights "
                         f"(as in MONAI), got {arch!r}")
    try:
        state = torch.hub.load_state_dict_from_url(_PRETRAINED_URLS[arch], progress=progress, weights_only=True)
    except Exception as err:  # no network, proxy, ...
        raise RuntimeError(f"pretrained: could not download {_PRETRAINED_URLS[arch]} ({type(err).__name__}: {err}). "
                           "Without network access, download it elsewhere, build the model with pretrained=False "
                           "and load the file with the same key renaming (densenet_fast.models.densenet3d."
                           "load_pretrained reads it through torch.hub's cache).") from err
    own = model.state_dict()
    renamed = {}
    for key, value in remap_legacy_keys(state).items():
        match = _TV_LAYER_KEY.match(key)
        key = f"{match.group(1)}.layers.{match.group(2)}" if match else key
        if key in own and own[key].shape == value.shape:
            renamed[key] = value
    own.update(renamed)
    model.load_state_dict(own)
    return model


def _factory(block_config: Tuple[int, ...], name: str):
    arch = name[:-3]

    def make(spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 2, init_features: int = 64,
             growth_rate: int = 32, block_config: Sequence[int] = block_config, pretrained: bool = False,
             progress: bool = True, **kwargs: Any) -> DenseNet3d:
        if not isinstance(pretrained, bool):
            raise TypeError(f"pretrained: expected a bool, got {type(pretrained).__name__} {pretrained!r}")
        if pretrained and spatial_dims > 2:  # MONAI's rule and exception type
            raise NotImplementedError(f"pretrained: there are no pretrained weights for spatial_dims={spatial_dims} "
                                      "(only 2-D ImageNet weights exist, as in MONAI)")
        model = DenseNet3d(spatial_dims, in_channels, out_channels, init_features, growth_rate, block_config,
                           **kwargs)
        return load_pretrained(model, arch, progress) if pretrained else model

    make.__name__ = make.__qualname__ = name
    make.__doc__ = (f"MONAI ``DenseNet{name[8:11]}`` (block_config={block_config}) on the fused block: MONAI's "
                    "arguments in MONAI's order (``pretrained=True``: torchvision's ImageNet weights for 2-D, as "
                    "MONAI; further keyword arguments go to :class:`DenseNet3d`), same ``state_dict``; "
                    "forward([N, in_channels, D, H, W]) -> [N, out_channels].")
    return make


densenet121_3d = _factory((6, 12, 24, 16), "densenet121_3d")
densenet169_3d = _factory((6, 12, 32, 32), "densenet169_3d")
densenet201_3d = _factory((6, 12, 48, 32), "densenet201_3d")
densenet264_3d = _factory((6, 12, 64, 48), "densenet264_3d")
