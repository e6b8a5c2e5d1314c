"""DenseNet models with torchvision's constructors, module trees and ``state_dict`` keys.

``DenseNet(...)`` takes torchvision's arguments; ``densenet121/161/169/201`` its factory signature;
``densenet_bc`` builds the CIFAR DenseNet-BC of Huang et al. Every dense block runs the fused
operator unless ``impl="reference"``.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_fast.nn.dense_block import DenseBlock, Transition, check_impl, check_int
from densenet_fast.nn.export_support import prepare_scriptable
from densenet_fast.nn.fused_features import FusedFeatures
from densenet_fast.nn.squeeze_excite import SqueezeExcite
from densenet_fast.nn.sync_batchnorm import sync_group

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "remap_legacy_keys",
           "load_weights"]

# Old torchvision checkpoints name layer children "norm.1", "conv.2", ...
_LEGACY_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def remap_legacy_keys(state_dict: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """Returns a copy of ``state_dict`` with legacy ``denselayerN.norm.1.weight`` keys renamed as torchvision does."""
    out = OrderedDict()
    for key, value in state_dict.items():
        match = _LEGACY_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


def check_input_channels(x: Tensor, conv0: Optional[nn.Module]) -> None:
    """RuntimeError (the type torch's convolution raises, with its wording first) before any module ran, for an
    image whose channel count is not the stem's ``in_channels``, naming the constructor argument that fixes it."""
    if not isinstance(x, Tensor) or not isinstance(conv0, nn.modules.conv._ConvNd) or x.dim() != conv0.weight.dim():
        return
    want, got = conv0.in_channels, x.shape[1]
    if got != want:
        hint = (f"; for {got}-channel inputs build the model with in_channels={got} (e.g. "
                f"densenet121(in_channels={got}, ...))" + (f" or repeat the channel: x.expand(-1, {want}, ...)"
                                                          if got == 1 else ""))
        raise RuntimeError(f"input: expected input{list(x.shape)} to have {want} channels, but got {got} channels "
                           f"(the model was built with in_channels={want}){hint}")


def positive_int(name: str, value: Any) -> int:
    """TypeError for a non-integer (or bool), ValueError for an integer < 1."""
    return check_int(name, value)


class DenseNet(nn.Module):
    """Densely connected network (Huang et al., 2017), torchvision-compatible.

    Args (torchvision's): growth_rate, block_config, num_init_features, bn_size, drop_rate, num_classes,
        memory_efficient (kept for compatibility; the fused path is memory efficient by construction and
        the reference path checkpoints as torchvision does).
    Keyword-only extras: ``impl`` ("fused" or "reference"), ``compression`` (transition width factor,
        0.5 in torchvision), ``stem`` ("imagenet": 7x7/2 conv + BN + ReLU + max-pool; "cifar": one 3x3 conv),
        ``in_channels``, ``sync_bn`` (every norm an ``nn.SyncBatchNorm`` of the default process group, as
        ``nn.SyncBatchNorm.convert_sync_batchnorm(model)`` makes it; the fused path then synchronises the
        statistics in distributed training, docs/design.md §13; same ``state_dict``).

    forward(x: [N, in_channels, H, W]) -> logits [N, num_classes].
    """

    __prepare_scriptable__ = prepare_scriptable  # torch.jit.script: densenet_fast.nn.torchscript

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0, num_classes: int = 1000,
                 memory_efficient: bool = False, *, impl: str = "fused", compression: float = 0.5,
                 stem: str = "imagenet", in_channels: int = 3, sync_bn: bool = False) -> None:
        super().__init__()
        positive_int("growth_rate", growth_rate)
        positive_int("num_init_features", num_init_features)
        positive_int("bn_size", bn_size)
        positive_int("num_classes", num_classes)
        positive_int("in_channels", in_channels)
        if isinstance(block_config, (str, bytes)) or not isinstance(block_config, Sequence):
            raise TypeError(f"block_config: expected a sequence of layer counts, got {type(block_config).__name__} "
                            f"{block_config!r}")
        if len(block_config) == 0:
            raise ValueError(f"block_config: expected a non-empty sequence of layer counts, got {block_config!r}")
        for i, n in enumerate(block_config):
            positive_int(f"block_config[{i}]", n)
        if isinstance(compression, bool) or not isinstance(compression, (int, float)):
            raise TypeError(
                f"compression: expected a float in (0, 1], got {type(compression).__name__} {compression!r}")
        if not 0.0 < float(compression) <= 1.0:
            raise ValueError(f"compression: expected a value in (0, 1], got {compression!r}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem: expected 'imagenet' or 'cifar', got {stem!r}")
        self.impl = check_impl(impl)

        if stem == "imagenet":
            self.features = FusedFeatures(OrderedDict([
                ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=7, stride=2, padding=3, bias=False)),
                ("norm0", nn.BatchNorm2d(num_init_features)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]))
        else:
            self.features = FusedFeatures(OrderedDict([
                ("conv0", nn.Conv2d(in_channels, num_init_features, kernel_size=3, stride=1, padding=1, bias=False)),
            ]))
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = DenseBlock(num_layers=num_layers, num_input_features=num_features, bn_size=bn_size,
                               growth_rate=growth_rate, drop_rate=drop_rate, memory_efficient=memory_efficient,
                               impl=impl)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features = num_features + num_layers * growth_rate
            if i != len(block_config) - 1:
                out_features = int(num_features * compression) if compression != 0.5 else num_features // 2
                self.features.add_module(f"transition{i + 1}", Transition(num_features, out_features, impl=impl))
                num_features = out_features
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.features.impl = impl
        self.classifier = nn.Linear(num_features, num_classes)

        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)
        self._register_load_state_dict_pre_hook(self._remap_legacy_keys_hook)
        if not isinstance(sync_bn, bool):
            raise TypeError(f"sync_bn: expected a bool, got {type(sync_bn).__name__} {sync_bn!r}")
        if sync_bn:
            nn.SyncBatchNorm.convert_sync_batchnorm(self)

    @staticmethod
    def _remap_legacy_keys_hook(state_dict, prefix, *args) -> None:
        for key in [k for k in state_dict if k.startswith(prefix)]:
            match = _LEGACY_KEY.match(key)
            if match:
                state_dict[match.group(1) + match.group(2)] = state_dict.pop(key)

    def set_impl(self, impl: str) -> "DenseNet":
        """Switches every block and transition between "fused" and "reference"; returns self."""
        self.impl = check_impl(impl)
        for m in self.modules():
            if isinstance(m, (DenseBlock, Transition, FusedFeatures)):
                m.impl = impl
        return self

    def _check_sizes(self, x: Tensor) -> None:
        """Rejects up front an input whose feature maps get too small for a training-mode BatchNorm (one
        value per channel) or a transition's 2x2 pool, before any module has updated its running
        statistics, with the errors torchvision raises midway (ValueError as nn.BatchNorm2d's; a
        RuntimeError naming the transition instead of the pooling kernel's "Output size is too small").
        Walks the stem (Conv2d/MaxPool2d/AvgPool2d/BatchNorm2d/ReLU), blocks and transitions; stops at
        any other module."""
        if x.dim() != 4:
            return
        check_input_channels(x, self.features._modules.get("conv0"))
        n, h, w = x.shape[0], x.shape[2], x.shape[3]

        def out_size(size: int, m: nn.Module, i: int) -> int:  # floor-mode output size along dim i
            def pick(v):
                return v[i] if isinstance(v, (tuple, list)) else v
            k, st, p, d = m.kernel_size, m.stride, m.padding, getattr(m, "dilation", 1)
            return (size + 2 * pick(p) - pick(d) * (pick(k) - 1) - 1) // pick(st) + 1

        def bn_check(bn: nn.Module) -> None:
            # nn.BatchNorm2d's rule (an empty batch is fine); a synchronising SyncBatchNorm counts the global batch.
            if bn.training and n * h * w == 1 and sync_group([bn]) is None:
                raise ValueError("Expected more than 1 value per channel when training, got input size "
                                 f"{torch.Size([n, bn.num_features, h, w])}")

        for m in self.features.children():
            if isinstance(m, DenseBlock):
                for layer in m.values():
                    bn_check(layer.norm1)
                    bn_check(layer.norm2)
            elif isinstance(m, Transition):
                bn_check(m.norm)
                if h < 2 or w < 2:
                    raise RuntimeError(f"input: a {tuple(x.shape[2:])} input leaves a {h}x{w} feature map at "
                                       "a transition, too small for its 2x2 average pool")
                h, w = h // 2, w // 2
            elif isinstance(m, nn.BatchNorm2d):
                bn_check(m)
            elif isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and not getattr(m, "ceil_mode", False):
                h, w = out_size(h, m, 0), out_size(w, m, 1)
                if h < 1 or w < 1:
                    return  # the module itself reports it, before any BatchNorm ran
            elif not isinstance(m, (nn.ReLU, SqueezeExcite)):  # those keep the size and hold no BatchNorm
                return

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, Tensor):  # not for a torch.fx Proxy (no sizes while tracing)
            self._check_sizes(x)
        if self.impl == "fused":
            out = self.features.forward_pooled(x)
        else:
            out = torch.flatten(F.adaptive_avg_pool2d(F.relu(self.features(x), inplace=True), (1, 1)), 1)
        return self.classifier(out)


WeightsLike = Union[None, str, "os.PathLike[str]", Mapping[str, Tensor], Any]


# torchvision's weights enum of each architecture (its names "DEFAULT", "IMAGENET1K_V1", ... are accepted too)
_TV_WEIGHTS = {"densenet121": "DenseNet121_Weights", "densenet161": "DenseNet161_Weights",
               "densenet169": "DenseNet169_Weights", "densenet201": "DenseNet201_Weights"}


def resolve_weights(weights: WeightsLike, arch: str) -> WeightsLike:
    """A string that is not a file but one of torchvision's weight names for ``arch`` ("DEFAULT",
    "IMAGENET1K_V1", "DenseNet121_Weights.IMAGENET1K_V1") -> that torchvision weights enum, as torchvision's
    own factories accept it; anything else is returned as is. FileNotFoundError for a string that is neither."""
    if not isinstance(weights, str) or os.path.isfile(weights) or arch not in _TV_WEIGHTS:
        return weights
    try:
        import torchvision.models as tvm
    except ImportError:
        raise FileNotFoundError(f"weights: {weights!r} is not a file; torchvision weight names such as 'DEFAULT' "
                                "need torchvision (pip install torchvision)") from None
    enum = getattr(tvm, _TV_WEIGHTS[arch])
    try:
        return enum.verify(weights)
    except (ValueError, KeyError, TypeError):
        names = ["DEFAULT"] + [w.name for w in enum]
        raise FileNotFoundError(f"weights: expected a path to a saved state dict or one of torchvision's "
                                f"{enum.__name__} names {names}, got {weights!r} (no such file, no such "
                                "weights)") from None


def load_weights(model: nn.Module, weights: WeightsLike, progress: bool = True) -> nn.Module:
    """Loads ``weights`` (a torchvision weights enum, a file path or a state dict) into ``model`` (strict)."""
    if weights is None:
        return model
    if isinstance(weights, (str, os.PathLike)):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"weights: expected a path to a saved state dict, got {os.fspath(weights)!r} "
                                    "(no such file)")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
    elif isinstance(weights, Mapping):
        state = weights
    elif hasattr(weights, "get_state_dict"):  # torchvision WeightsEnum
        try:
            state = weights.get_state_dict(progress=progress, check_hash=True)
        except Exception as err:  # no network, proxy, hash mismatch, ...
            raise RuntimeError(
                f"weights: could not download {weights} ({type(err).__name__}: {err}). Without network access, "
                "download the file elsewhere and pass its path, or pass a state dict.") from err
    else:
        raise TypeError("weights: expected None, a torchvision weights enum, a file path or a state dict, "
                        f"got {type(weights).__name__}")
    model.load_state_dict(remap_legacy_keys(state), strict=True)
    return model


def _densenet(arch: str, growth_rate: int, block_config: Sequence[int], num_init_features: int,
              weights: WeightsLike, progress: bool, **kwargs: Any) -> DenseNet:
    weights = resolve_weights(weights, arch)
    if weights is not None and hasattr(weights, "meta") and "categories" in getattr(weights, "meta", {}):
        kwargs.setdefault("num_classes", len(weights.meta["categories"]))
    model = DenseNet(growth_rate, block_config, num_init_features, **kwargs)
    return load_weights(model, weights, progress)


def densenet121(*, weights: WeightsLike = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-121 (k=32, blocks 6-12-24-16). ``weights``: a torchvision weights enum or name ("DEFAULT",
    "IMAGENET1K_V1"), a file path or a state dict."""
    return _densenet("densenet121", 32, (6, 12, 24, 16), 64, weights, progress, **kwargs)


def densenet161(*, weights: WeightsLike = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-161 (k=48, blocks 6-12-36-24, 96 stem features)."""
    return _densenet("densenet161", 48, (6, 12, 36, 24), 96, weights, progress, **kwargs)


def densenet169(*, weights: WeightsLike = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-169 (k=32, blocks 6-12-32-32)."""
    return _densenet("densenet169", 32, (6, 12, 32, 32), 64, weights, progress, **kwargs)


def densenet201(*, weights: WeightsLike = None, progress: bool = True, **kwargs: Any) -> DenseNet:
    """DenseNet-201 (k=32, blocks 6-12-48-32)."""
    return _densenet("densenet201", 32, (6, 12, 48, 32), 64, weights, progress, **kwargs)
