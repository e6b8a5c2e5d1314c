"""SE-DenseNet: DenseNet with squeeze-and-excitation gating (Hu et al., 2018) on dense-block outputs or layers.

Two placements (``se_placement``):

* ``"block"`` (default): a :class:`~densenet_fast.nn.SqueezeExcite` on every dense block's output,
  registered in ``features`` right after its block as ``se1``, ``se2``, ... (``features.denseblock1,
  features.se1, features.transition1, ..., features.denseblock4, features.se4, features.norm5``).
  Every dense block runs the fused C++ operator, and each SE is *folded* into the transition / final
  norm that follows it (:mod:`densenet_fast.nn.se_fold`, docs/design.md §5): the SE computes only its
  gate ``g [N, C]`` from the block buffer, the reader applies it in its BN-ReLU prologue
  (``relu((a*g)*x + b)``), with the batch statistics of ``g*x`` combined from per-sample moments of the
  buffer. The gated block output is never materialised; a gate costs ``N*C`` saved values.
* ``"layer"``: a SqueezeExcite (child ``se``) on the k new channels of every dense layer
  (``features.denseblockB.denselayerL.se``), applied after ``conv2`` and before the layer's dropout,
  like an SE on a residual branch. **Rule:** the fused block operator runs a whole block at once and
  cannot run an SE between its layers, so with this placement the dense blocks always run the
  per-layer reference PyTorch path (what torchvision computes, O(L²) memory per block), whatever
  ``impl`` says; a ``RuntimeWarning`` is issued once per process when ``impl="fused"`` is asked for.
  Transitions, the final norm and the SE gates still run their fused operators. Why the gate is not
  folded into the block operator (it would need the SE weights and their gradients as per-layer
  operator arguments, the excitation MLP in C++ on CPU and CUDA, and the ungated conv2 output in the
  backward -- an extra 3x3 convolution per layer or an unstable division by the gate): docs/design.md §5.

The SE hidden width is ``make_divisible(channels * se_ratio, 8, round_limit=0)``, as timm's
``SEModule(channels, rd_ratio=se_ratio)``; ``state_dict`` keys of the SE modules are timm's
(``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``). The SE modules keep PyTorch's default
``Conv2d`` initialisation (as timm's SEModule); every other module is initialised as torchvision's
DenseNet.
"""
from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from typing import Any, Sequence

from torch import Tensor, nn

from densenet_fast._warn import warn_once
from densenet_fast.models.densenet import DenseNet, WeightsLike, load_weights
from densenet_fast.nn.dense_block import DenseBlock, DenseLayer
from densenet_fast.nn.fused_features import FusedFeatures
from densenet_fast.nn.squeeze_excite import SqueezeExcite

__all__ = ["SEDenseNet", "SEDenseBlock", "SEDenseLayer", "se_densenet121", "se_densenet169", "se_densenet201",
           "SE_PLACEMENTS", "check_se_ratio", "check_se_placement"]

SE_PLACEMENTS = ("block", "layer")
_LAYER_RULE = ("se_placement='layer': the fused dense-block operator cannot run squeeze-and-excitation between "
               "the layers of a block, so the dense blocks run the per-layer reference PyTorch path "
               "(transitions, final norm and SE gates stay fused). Use se_placement='block' to keep the "
               "blocks fused.")


def check_se_ratio(se_ratio: Any) -> float:
    """Returns ``se_ratio`` as a float; ValueError unless it is a real number with 0 < se_ratio <= 1."""
    if (isinstance(se_ratio, bool) or not isinstance(se_ratio, numbers.Real) or not math.isfinite(se_ratio)
            or not 0.0 < float(se_ratio) <= 1.0):
        raise ValueError(f"se_ratio: expected a number in (0, 1] (SE hidden width = channels * se_ratio), "
                         f"got {se_ratio!r}")
    return float(se_ratio)


def check_se_placement(se_placement: Any) -> str:
    if not isinstance(se_placement, str) or se_placement not in SE_PLACEMENTS:
        raise ValueError(f"se_placement: expected one of {SE_PLACEMENTS}, got {se_placement!r}")
    return se_placement


class SEDenseLayer(DenseLayer):
    """A :class:`DenseLayer` whose k new channels are gated by a SqueezeExcite (child ``se``).

    ``new = dropout(se(conv2(relu2(norm2(conv1(relu1(norm1(cat(inputs))))))))``: the SE comes after
    ``conv2`` and before the dropout, so dropout stays the layer's last op as in torchvision.
    forward(input: Tensor [N, C, H, W] or list of Tensors to concatenate) -> [N, k, H, W].
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = False, *, se_ratio: float = 1.0 / 16) -> None:
        super().__init__(num_input_features, growth_rate, bn_size, drop_rate, memory_efficient)
        self.se = SqueezeExcite(growth_rate, rd_ratio=check_se_ratio(se_ratio))

    @classmethod
    def from_layer(cls, layer: DenseLayer, se_ratio: float = 1.0 / 16) -> "SEDenseLayer":
        """An SEDenseLayer that *shares* ``layer``'s modules (and parameters), with a new SE."""
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        for name, child in layer.named_children():
            obj.add_module(name, child)
        obj.drop_rate = layer.drop_rate
        obj.memory_efficient = layer.memory_efficient
        obj.se = SqueezeExcite(layer.conv2.out_channels, rd_ratio=check_se_ratio(se_ratio))
        obj.train(layer.training)
        return obj

    def gate(self, new_features: Tensor) -> Tensor:
        return self.se(new_features)


class SEDenseBlock(DenseBlock):
    """A dense block of :class:`SEDenseLayer` (children ``denselayer1..L``, each with an ``se``).

    Always runs the per-layer reference path (see the module docstring for why); ``impl="fused"`` is
    accepted, for ``DenseNet.set_impl``, but warns once and computes the same thing.
    forward(x: [N, C0, H, W]) -> [N, C0 + L*growth_rate, H, W].
    """

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0, memory_efficient: bool = False, impl: str = "fused", *,
                 se_ratio: float = 1.0 / 16) -> None:
        se_ratio = check_se_ratio(se_ratio)
        super().__init__(num_layers, num_input_features, bn_size, growth_rate, drop_rate, memory_efficient, impl)
        for name, layer in list(self.items()):
            self[name] = SEDenseLayer.from_layer(layer, se_ratio)

    @classmethod
    def from_block(cls, block: DenseBlock, se_ratio: float = 1.0 / 16) -> "SEDenseBlock":
        """An SEDenseBlock that *shares* ``block``'s layers' modules (and parameters), adding an SE per layer."""
        se_ratio = check_se_ratio(se_ratio)
        obj = cls.__new__(cls)
        nn.ModuleDict.__init__(obj)
        obj.impl = block.impl
        for name, layer in block.items():
            obj.add_module(name, SEDenseLayer.from_layer(layer, se_ratio))
        obj.train(block.training)
        return obj

    def can_fuse(self, x: Tensor) -> bool:
        if getattr(self, "impl", "fused") == "fused":
            warn_once("se-densenet:layer", f"densenet_fast.SEDenseBlock: {_LAYER_RULE}", stacklevel=2)
        return False


class SEDenseNet(DenseNet):
    """DenseNet with squeeze-and-excitation (SE-DenseNet). Same arguments as :class:`DenseNet`, plus:

    Args:
        se_ratio: SE reduction ratio in (0, 1]; hidden width ``make_divisible(C * se_ratio, 8, round_limit=0)``.
        se_placement: ``"block"`` (SE on each dense block's output, modules ``features.se1..``; blocks stay
            fused) or ``"layer"`` (SE on each dense layer's k new channels, child ``se`` of every
            ``denselayer``; the dense blocks then always run the per-layer reference path, because the
            fused block cannot run an SE between its layers; warns once when ``impl="fused"``).
        **kwargs: DenseNet's keyword extras (``impl``, ``compression``, ``stem``, ``in_channels``).

    forward(x: [N, in_channels, H, W]) -> logits [N, num_classes].
    """

    def __init__(self, growth_rate: int = 32, block_config: Sequence[int] = (6, 12, 24, 16),
                 num_init_features: int = 64, bn_size: int = 4, drop_rate: float = 0, num_classes: int = 1000,
                 memory_efficient: bool = False, *, se_ratio: float = 1.0 / 16, se_placement: str = "block",
                 **kwargs: Any) -> None:
        se_ratio = check_se_ratio(se_ratio)
        se_placement = check_se_placement(se_placement)
        super().__init__(growth_rate, block_config, num_init_features, bn_size, drop_rate, num_classes,
                         memory_efficient, **kwargs)
        self.se_ratio = se_ratio
        self.se_placement = se_placement
        if se_placement == "layer" and self.impl == "fused":
            warn_once("se-densenet:layer", f"densenet_fast.SEDenseNet: {_LAYER_RULE}", stacklevel=2)
        children = OrderedDict()
        for name, module in self.features.named_children():
            if isinstance(module, DenseBlock) and se_placement == "layer":
                module = SEDenseBlock.from_block(module, se_ratio)
            children[name] = module
            if isinstance(module, DenseBlock) and se_placement == "block":
                index = name[len("denseblock"):]
                last = module[f"denselayer{len(module)}"]
                width = last.norm1.num_features + last.conv2.out_channels
                children[f"se{index}"] = SqueezeExcite(width, rd_ratio=se_ratio)
        self.features = FusedFeatures(children)
        self.features.impl = self.impl

    def extra_repr(self) -> str:
        return f"se_ratio={self.se_ratio}, se_placement={self.se_placement!r}"


def _se_densenet(growth_rate: int, block_config: Sequence[int], num_init_features: int, weights: WeightsLike,
                 progress: bool, se_ratio: float, se_placement: str, **kwargs: Any) -> SEDenseNet:
    if weights is not None and hasattr(weights, "meta") and "categories" in getattr(weights, "meta", {}):
        kwargs.setdefault("num_classes", len(weights.meta["categories"]))
    model = SEDenseNet(growth_rate, block_config, num_init_features, se_ratio=se_ratio, se_placement=se_placement,
                       **kwargs)
    return load_weights(model, weights, progress)


_FACTORY_DOC = """SE-DenseNet-{depth} (k={k}, blocks {blocks}).

    ``weights``: an SE-DenseNet state dict or a path to one (loaded strictly; torchvision publishes no
    SE-DenseNet weights -- to start from plain DenseNet weights, load them with
    ``model.load_state_dict(sd, strict=False)``). ``se_ratio``, ``se_placement``: see :class:`SEDenseNet`
    (``"layer"`` placement runs the dense blocks on the per-layer reference path). ``**kwargs``: DenseNet's.
    """


def se_densenet121(*, weights: WeightsLike = None, progress: bool = True, se_ratio: float = 1.0 / 16,
                   se_placement: str = "block", **kwargs: Any) -> SEDenseNet:
    return _se_densenet(32, (6, 12, 24, 16), 64, weights, progress, se_ratio, se_placement, **kwargs)


def se_densenet169(*, weights: WeightsLike = None, progress: bool = True, se_ratio: float = 1.0 / 16,
                   se_placement: str = "block", **kwargs: Any) -> SEDenseNet:
    return _se_densenet(32, (6, 12, 32, 32), 64, weights, progress, se_ratio, se_placement, **kwargs)


def se_densenet201(*, weights: WeightsLike = None, progress: bool = True, se_ratio: float = 1.0 / 16,
                   se_placement: str = "block", **kwargs: Any) -> SEDenseNet:
    return _se_densenet(32, (6, 12, 48, 32), 64, weights, progress, se_ratio, se_placement, **kwargs)


se_densenet121.__doc__ = _FACTORY_DOC.format(depth=121, k=32, blocks="6-12-24-16")
se_densenet169.__doc__ = _FACTORY_DOC.format(depth=169, k=32, blocks="6-12-32-32")
se_densenet201.__doc__ = _FACTORY_DOC.format(depth=201, k=32, blocks="6-12-48-32")
