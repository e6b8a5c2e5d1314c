"""Dense-block modules with torchvision's module trees and ``state_dict`` keys.

``DenseLayer``, ``DenseBlock`` and ``Transition`` mirror torchvision's ``_DenseLayer``,
``_DenseBlock`` and ``_Transition`` child for child. ``DenseBlock`` runs the whole block through the
fused operator ``torch.ops.densenet_fast.dense_block_forward`` (``impl="fused"``, the default) or
through the plain per-layer PyTorch path (``impl="reference"``), which is what torchvision computes.
"""
from __future__ import annotations

import warnings
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from densenet_fast.nn.batchnorm_stats import fusable_norms, update_running_stats
from densenet_fast.ops import dense_block as _block_ops
from densenet_fast.ops import tail as _tail_ops

IMPLS = ("fused", "reference")
_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return impl


def _fused_device_ok(x: Tensor) -> bool:
    """The fused kernels exist for CPU (float32/float64) and, when compiled in, CUDA."""
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.float64)
    if x.device.type == "cuda":
        return torch._C._dispatch_has_kernel_for_dispatch_key("densenet_fast::dense_block_forward", "CUDA")
    return False


def _autocast_dtype_fix(x: Tensor) -> Tensor:
    """Under autocast the fused block computes in float32 (BN precision rule); returns x cast to it."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return x.float()
    return x


def check_batch_for_training(x: Tensor, training: bool) -> None:
    # Same error (type and text) as nn.BatchNorm2d.
    if training and x.dim() == 4 and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


class DenseLayer(nn.Module):
    """One DenseNet-BC layer: BN-ReLU-conv1x1(bn_size*k)-BN-ReLU-conv3x3(k). Same children as torchvision.

    forward(input: Tensor [N, C, H, W] or list of Tensors to concatenate) -> [N, k, H, W] (reference path).
    """

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs: List[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def forward(self, input: Union[Tensor, List[Tensor]]) -> Tensor:
        prev_features = [input] if isinstance(input, Tensor) else input
        if self.memory_efficient and any(t.requires_grad for t in prev_features) and not torch.jit.is_scripting():
            bottleneck_output = cp.checkpoint(lambda *xs: self.bn_function(list(xs)), *prev_features,
                                              use_reentrant=False)
        else:
            bottleneck_output = self.bn_function(prev_features)
        new_features = self.conv2(self.relu2(self.norm2(bottleneck_output)))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(nn.ModuleDict):
    """A dense block (drop-in for torchvision's ``_DenseBlock``; children ``denselayer1..L``).

    forward(x: [N, C0, H, W]) -> [N, C0 + L*growth_rate, H, W]. With ``impl="fused"`` the output is
    the block's shared buffer, in channels_last memory format whatever the input's layout.
    """

    _version = 2

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0, memory_efficient: bool = False, impl: str = "fused") -> None:
        super().__init__()
        for name, value, low in (("num_layers", num_layers, 1), ("num_input_features", num_input_features, 1),
                                 ("bn_size", bn_size, 1), ("growth_rate", growth_rate, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        if not 0.0 <= float(drop_rate) < 1.0:
            raise ValueError(f"drop_rate: expected a value in [0, 1), got {drop_rate!r}")
        self.impl = check_impl(impl)
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                             bn_size, drop_rate, memory_efficient))

    # -- fused path -------------------------------------------------------------------------------
    def _layers(self) -> List[nn.Module]:
        return list(self.values())

    def can_fuse(self, x: Tensor) -> bool:
        """Whether forward(x) runs the fused operator; warns once when impl="fused" cannot be honoured."""
        if getattr(self, "impl", "fused") != "fused":
            return False
        layers = self._layers()
        norms = [m for layer in layers for m in (layer.norm1, layer.norm2)]
        reason = None
        if any(isinstance(bn, nn.SyncBatchNorm) for bn in norms):
            reason = ("its BatchNorms are nn.SyncBatchNorm (the fused kernels compute per-process batch statistics; "
                      "the reference path synchronises them across processes)")
        elif not fusable_norms(norms):
            reason = "its BatchNorms are not all affine with running statistics and one eps"
        elif len({bn.training for bn in norms}) != 1:
            reason = "its BatchNorms are in mixed train/eval modes"
        elif len({layer.drop_rate for layer in layers}) != 1:
            reason = "its layers have different drop rates"
        elif not _fused_device_ok(_autocast_dtype_fix(x)):
            reason = f"no fused kernel for {x.device.type} tensors of dtype {x.dtype}"
        if reason is not None:
            _warn_once(f"block:{reason}", f"densenet_fast.DenseBlock: using the reference PyTorch path because {reason}.")
            return False
        return True

    def block_params(self) -> _block_ops.BlockParams:
        layers = self._layers()
        return _block_ops.BlockParams(
            [l.norm1.weight for l in layers], [l.norm1.bias for l in layers], [l.conv1.weight for l in layers],
            [l.norm2.weight for l in layers], [l.norm2.bias for l in layers], [l.conv2.weight for l in layers],
            [l.norm1.running_mean for l in layers], [l.norm1.running_var for l in layers],
            [l.norm2.running_mean for l in layers], [l.norm2.running_var for l in layers])

    def fused_forward(self, x: Tensor) -> _block_ops.BlockOutput:
        """Runs the fused operator and updates every norm's running statistics once (training)."""
        layers = self._layers()
        first = layers[0].norm1
        if x.dim() != 4 or x.shape[1] != first.num_features:
            raise ValueError(f"input: expected a 4-D tensor with {first.num_features} channels [N, "
                             f"{first.num_features}, H, W], got shape {tuple(x.shape)}")
        training = first.training
        check_batch_for_training(x, training)
        x = _autocast_dtype_fix(x)
        with torch.autocast(x.device.type, enabled=False):
            out = _block_ops.fused_dense_block(x, self.block_params(), training=training, eps=first.eps,
                                         drop_rate=layers[0].drop_rate)
        if training:
            count = x.shape[0] * x.shape[2] * x.shape[3]
            widths = [l.norm1.num_features for l in layers]
            update_running_stats([l.norm1 for l in layers] + [l.norm2 for l in layers],
                                 [out.mean[:c] for c in widths] + list(out.mean2.unbind(0)),
                                 [out.var[:c] for c in widths] + list(out.var2.unbind(0)), count)
        return out

    # -- module API -------------------------------------------------------------------------------
    def forward(self, init_features: Tensor) -> Tensor:
        if self.can_fuse(init_features):
            return self.fused_forward(init_features).buffer
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def bn_stats(bn: nn.BatchNorm2d, x: Tensor, batch_mean: Optional[Tensor] = None,
             batch_var: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, bool]:
    """Statistics a BN reader of ``x`` uses: batch statistics (given, or computed here) in training,
    after updating ``bn``'s running statistics once; running statistics in eval."""
    if not bn.training:
        return bn.running_mean, bn.running_var, False
    check_batch_for_training(x, True)
    if batch_mean is None or batch_mean.numel() == 0:
        batch_mean, batch_var = _tail_ops.channel_moments(x.detach())
    update_running_stats([bn], [batch_mean], [batch_var], x.shape[0] * x.shape[2] * x.shape[3])
    return batch_mean, batch_var, True


class Transition(nn.Sequential):
    """DenseNet transition (children ``norm, relu, conv, pool`` as torchvision's ``_Transition``).

    forward(x: [N, C, H, W]) -> [N, C_out, H//2, W//2]. With ``impl="fused"`` BN-ReLU-conv1x1-avgpool is one
    operator that pools before the 1x1 conv and stores no BN/ReLU output.
    """

    def __init__(self, num_input_features: int, num_output_features: int, impl: str = "fused") -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.impl = check_impl(impl)

    def can_fuse(self, x: Tensor) -> bool:
        return (getattr(self, "impl", "fused") == "fused" and fusable_norms([self.norm])
                and _fused_device_ok(_autocast_dtype_fix(x)) and x.dim() == 4 and x.shape[2] >= 2 and x.shape[3] >= 2)

    def fused_forward(self, x: Tensor, batch_mean: Optional[Tensor] = None,
                      batch_var: Optional[Tensor] = None) -> Tensor:
        """``batch_mean``/``batch_var``: the input's batch statistics when already known (from the block)."""
        if x.shape[1] != self.norm.num_features:
            raise ValueError(f"input: expected {self.norm.num_features} channels, got shape {tuple(x.shape)}")
        x = _autocast_dtype_fix(x)
        with torch.autocast(x.device.type, enabled=False):
            mean, var, training = bn_stats(self.norm, x, batch_mean, batch_var)
            return _tail_ops.transition(x, mean, var, self.norm.weight, self.norm.bias, self.conv.weight,
                                        training=training, eps=self.norm.eps)

    def forward(self, x: Tensor) -> Tensor:
        if self.can_fuse(x):
            return self.fused_forward(x)
        return super().forward(x)


def fused_norm_relu_pool(bn: nn.BatchNorm2d, x: Tensor, batch_mean: Optional[Tensor] = None,
                         batch_var: Optional[Tensor] = None) -> Tensor:
    """flatten(adaptive_avg_pool2d(relu(bn(x)), 1)) as one operator: [N, C, H, W] -> [N, C]."""
    x = _autocast_dtype_fix(x)
    with torch.autocast(x.device.type, enabled=False):
        mean, var, training = bn_stats(bn, x, batch_mean, batch_var)
        return _tail_ops.norm_relu_pool(x, mean, var, bn.weight, bn.bias, training=training, eps=bn.eps)
