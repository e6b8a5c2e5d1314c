"""Dense-block modules with torchvision's module trees and ``state_dict`` keys.

``DenseLayer``, ``DenseBlock`` and ``Transition`` mirror torchvision's ``_DenseLayer``,
``_DenseBlock`` and ``_Transition`` child for child. ``DenseBlock`` runs the whole block through the
fused operator ``torch.ops.densenet_fast.dense_block_forward`` (``impl="fused"``, the default) or
through the plain per-layer PyTorch path (``impl="reference"``), which is what torchvision computes.
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from torch import Tensor, nn

from densenet_fast._warn import warn_once
from densenet_fast.nn.batchnorm_stats import fusable_norms, update_running_stats
from densenet_fast.nn.export_support import exporting_to_onnx, fx_leaf_call, prepare_scriptable
from densenet_fast.nn.instance_block import instance_block_problem, instance_fused_forward, is_instance_block
from densenet_fast.nn.sync_batchnorm import (
    refuse_empty_batch,
    sync_group,
    sync_input_problem,
    sync_problem,
    sync_reader,
)
from densenet_fast.ops import dense_block as _block_ops
from densenet_fast.ops import sync_block as _sync_ops
from densenet_fast.ops import tail as _tail_ops
from densenet_fast.ops.common import check_drop_rate, stats_dtype

IMPLS = ("fused", "reference")


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    return impl


_CUDA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def fused_device_ok(x: Tensor, block: bool = False, dtype: Optional[torch.dtype] = None) -> bool:
    """The fused kernels exist for CPU (float32/float64; bfloat16 for the dense block, ``block=True``) and,
    when compiled in, CUDA (float32/float64, float16/bfloat16: under autocast, or a .half()/.bfloat16()
    model whose BN tensors the kernels take in that dtype and compute with in float32, as torch's
    batch_norm does). ``dtype``: the dtype the operator computes in, where not x's (``cpu_autocast_dtype``)."""
    dtype = x.dtype if dtype is None else dtype
    if x.device.type == "cpu":
        # bfloat16: the dense block (block=True); the readers' bfloat16 rules are reader_device_ok's.
        return dtype in (torch.float32, torch.float64) or (block and dtype == torch.bfloat16)
    if x.device.type == "cuda":
        return dtype in _CUDA_DTYPES and torch._C._dispatch_has_kernel_for_dispatch_key(
            "densenet_fast::dense_block_forward", "CUDA")
    return False


def act_kernel_ok(x: Tensor) -> bool:
    """Whether ``dense_block_act_forward`` (LeakyReLU / PReLU blocks) has a kernel for ``x``'s device: CPU, and CUDA
    where the extension was built with its CUDA kernels."""
    return x.device.type == "cpu" or (x.device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(
        "densenet_fast::dense_block_act_forward", "CUDA"))


def cpu_bf16_reader_ok(x: Tensor, norm: nn.Module) -> bool:
    """A ``.bfloat16()`` model's BN reader (transition, final norm, stem) on CPU outside autocast: the reader
    kernels read the bfloat16 input and take its bfloat16 BN (and conv) tensors natively, with float32 BN math
    inside, as torch's batch_norm computes a bfloat16 input. (Under autocast ``cpu_autocast_input`` rules.)"""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and not torch.is_autocast_enabled("cpu")
            and getattr(norm, "weight", None) is not None and norm.weight.dtype == torch.bfloat16)


def reader_device_ok(x: Tensor, norm: nn.Module) -> bool:
    """Whether a fused BN reader (transition, final norm) has a kernel for ``x``: :func:`fused_device_ok` on the
    dtype it computes in under autocast, or a ``.bfloat16()`` model on CPU (:func:`cpu_bf16_reader_ok`)."""
    return fused_device_ok(x, dtype=_block_ops.cpu_autocast_dtype(x, "float32")) or cpu_bf16_reader_ok(x, norm)


def _check_module_input(x: Tensor, weight: Tensor, owner: str) -> None:
    """Errors no path of a fused module accepts (RuntimeError, as torch's own modules raise for these):
    a non-tensor, a device other than the parameters', a non-floating dtype, or (outside autocast) a
    dtype other than the parameters'. ``weight``: the module's first conv weight."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: input: expected a Tensor, got {type(x).__name__}")
    if x.device != weight.device:
        raise RuntimeError(f"{owner}: input: expected a tensor on {weight.device} (the device of the module's "
                           f"parameters), got {x.device}")
    if not x.dtype.is_floating_point:
        raise RuntimeError(f"{owner}: input: expected a floating-point dtype (float32, float64; float16/bfloat16 "
                           f"under autocast), got {x.dtype}")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise RuntimeError(f"{owner}: input: expected dtype {weight.dtype} (the dtype of the module's parameters; "
                           f"use torch.autocast for mixed precision), got {x.dtype}")


def check_int(name: str, value, low: int = 1) -> int:
    """TypeError unless ``value`` is an int (not a bool); ValueError unless it is >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an integer >= {low}, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    return value


def _kernel_autocast(x: Tensor):
    """Autocast state around the fused operators. CPU: disabled (the kernels run in the dtype of
    ops.dense_block.cpu_autocast_input). CUDA: left as it is, so the operators' AutocastCUDA kernels cast the input
    and conv weights to the autocast dtype and keep every BatchNorm tensor in float32."""
    if x.device.type == "cuda":
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)


def values_per_channel(x: Tensor) -> int:
    """N*H*W of [N, C, H, W], N*D*H*W of [N, C, D, H, W]: the count behind a BatchNorm's batch statistics."""
    return x.numel() // x.shape[1] if x.shape[1] else 0


def check_batch_for_training(x: Tensor, training: bool) -> None:
    # Same error (type and text) as nn.BatchNorm2d / nn.BatchNorm3d.
    if training and x.dim() in (4, 5) and x.shape[1] and values_per_channel(x) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


CONV = {2: nn.Conv2d, 3: nn.Conv3d}
NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
AVG_POOL = {2: nn.AvgPool2d, 3: nn.AvgPool3d}


def check_spatial_dims(spatial_dims) -> int:
    if isinstance(spatial_dims, bool) or spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims: expected 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def layer_drop_rate(layer: nn.Module) -> float:
    """Dropout probability of a dense layer (0 for layers without one, e.g. MONAI's without a dropout child)."""
    return float(getattr(layer, "drop_rate", 0.0))


_LEAKY = (nn.LeakyReLU, nn.PReLU)


def activation_problem(act: Optional[nn.Module], channels: int, what: str) -> Optional[str]:
    """Why ``act`` (a dense layer's ``relu1``/``relu2``; None: the norm applies it, as timm's BatchNormAct2d)
    is not an activation the fused block computes: ReLU, LeakyReLU, or PReLU with 1 or ``channels`` parameters."""
    if act is None or type(act) is nn.ReLU or type(act) is nn.LeakyReLU:
        return None
    if type(act) is nn.PReLU:
        if act.num_parameters not in (1, channels) or act.weight.dim() != 1:
            return f"{what} is a PReLU with {act.num_parameters} parameters for {channels} channels"
        return None
    return f"{what} is {type(act).__name__}, not ReLU, LeakyReLU or PReLU"


def block_activations(layers: List[nn.Module]) -> Union[str, List[Tuple[nn.Module, nn.Module]], None]:
    """The activations of a block's layers: None when they are all ReLU (the ReLU kernels), the list of
    ``(relu1, relu2)`` pairs when they are all LeakyReLU / PReLU (the slope kernels), else why not fusable."""
    acts = [(getattr(layer, "relu1", None), getattr(layer, "relu2", None)) for layer in layers]
    for i, (layer, (a1, a2)) in enumerate(zip(layers, acts)):
        p = (activation_problem(a1, layer.norm1.num_features, f"layer {i + 1} relu1")
             or activation_problem(a2, layer.norm2.num_features, f"layer {i + 1} relu2"))
        if p:
            return p
    leaky = {isinstance(a, _LEAKY) for pair in acts for a in pair}
    if leaky == {False}:
        return None
    if leaky != {True}:
        return "its layers mix ReLU with LeakyReLU / PReLU activations"
    return acts


def _slope(act: nn.Module, channels: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The per-channel slope of a LeakyReLU (a constant) or a PReLU (its weight, differentiable)."""
    if type(act) is nn.LeakyReLU:
        return torch.full((channels,), float(act.negative_slope), dtype=dtype, device=device)
    w = act.weight.to(dtype)
    return w.expand(channels) if w.numel() == 1 else w


def block_slopes(layers: List[nn.Module], acts: List[Tuple[nn.Module, nn.Module]], dtype: torch.dtype,
                 device: torch.device) -> Tensor:
    """The packed ``slopes`` of ``dense_block_act_forward`` for a block's LeakyReLU / PReLU activations."""
    return _block_ops.pack_slopes(
        [_slope(a1, layer.norm1.num_features, dtype, device) for layer, (a1, _) in zip(layers, acts)],
        [_slope(a2, layer.norm2.num_features, dtype, device) for layer, (_, a2) in zip(layers, acts)])


class DenseLayer(nn.Module):
    """One DenseNet-BC layer: BN-ReLU-conv1x1(bn_size*k)-BN-ReLU-conv3x3(k). Same children as torchvision.

    forward(input: Tensor [N, C, H, W] or list of Tensors to concatenate) -> [N, k, H, W] (reference path);
    with ``spatial_dims=3``: [N, C, D, H, W] -> [N, k, D, H, W] (BatchNorm3d, Conv3d 1x1x1 and 3x3x3).
    """

    __prepare_scriptable__ = prepare_scriptable

    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int, drop_rate: float,
                 memory_efficient: bool = False, spatial_dims: int = 2) -> None:
        super().__init__()
        check_int("num_input_features", num_input_features)
        check_int("growth_rate", growth_rate)
        check_int("bn_size", bn_size)
        check_drop_rate(drop_rate)
        conv, norm = CONV[check_spatial_dims(spatial_dims)], NORM[spatial_dims]
        self.norm1 = norm(num_input_features)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = conv(num_input_features, bn_size * growth_rate, kernel_size=1, stride=1, bias=False)
        self.norm2 = norm(bn_size * growth_rate)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = conv(bn_size * growth_rate, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)
        self.memory_efficient = memory_efficient

    def bn_function(self, inputs: List[Tensor]) -> Tensor:
        concated_features = torch.cat(inputs, 1)
        return self.conv1(self.relu1(self.norm1(concated_features)))

    def gate(self, new_features: Tensor) -> Tensor:
        """Applied to conv2's output before dropout: identity here, an SE gate in SE-DenseNet layers."""
        return new_features

    def forward(self, input: Union[Tensor, List[Tensor]]) -> Tensor:
        prev_features = [input] if isinstance(input, Tensor) else input
        if self.memory_efficient and any(t.requires_grad for t in prev_features) and not torch.jit.is_scripting():
            bottleneck_output = cp.checkpoint(lambda *xs: self.bn_function(list(xs)), *prev_features,
                                              use_reentrant=False)
        else:
            bottleneck_output = self.bn_function(prev_features)
        new_features = self.gate(self.conv2(self.relu2(self.norm2(bottleneck_output))))
        if self.drop_rate > 0:
            new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
        return new_features


class DenseBlock(nn.ModuleDict):
    """A dense block (drop-in for torchvision's ``_DenseBlock``; children ``denselayer1..L``).

    forward(x: [N, C0, H, W]) -> [N, C0 + L*growth_rate, H, W]. With ``impl="fused"`` the output is
    the block's shared buffer, in channels_last memory format whatever the input's layout.
    ``spatial_dims=3``: [N, C0, D, H, W] -> [N, C0 + L*growth_rate, D, H, W] (channels_last_3d), with
    3x3x3 convolutions.
    """

    _version = 2
    __prepare_scriptable__ = prepare_scriptable

    def __init__(self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int,
                 drop_rate: float = 0.0, memory_efficient: bool = False, impl: str = "fused",
                 spatial_dims: int = 2) -> None:
        super().__init__()
        for name, value in (("num_layers", num_layers), ("num_input_features", num_input_features),
                            ("bn_size", bn_size), ("growth_rate", growth_rate)):
            check_int(name, value)
        self.impl = check_impl(impl)  # drop_rate: checked by each DenseLayer
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                             bn_size, drop_rate, memory_efficient,
                                                             check_spatial_dims(spatial_dims)))

    # -- fused path -------------------------------------------------------------------------------
    def _layers(self) -> List[nn.Module]:
        return list(self.values())

    def can_fuse(self, x: Tensor) -> bool:
        """Whether forward(x) runs the fused operator; warns once when impl="fused" cannot be honoured.

        Raises (RuntimeError) for inputs no path accepts: wrong device, non-floating dtype, or a dtype
        other than the parameters' outside autocast. An empty batch runs the reference path (as
        torchvision: empty output, ``num_batches_tracked`` counted), without a warning.
        """
        if getattr(self, "impl", "fused") != "fused" or exporting_to_onnx():
            return False  # ONNX export: standard ATen ops (documented rule, no warning)
        layers = self._layers()
        _check_module_input(x, layers[0].conv1.weight, "DenseBlock")
        if x.dim() in (4, 5) and x.shape[0] == 0:
            refuse_empty_batch(x, [m for layer in layers for m in (layer.norm1, layer.norm2)], "DenseBlock")
            return False
        norms = [m for layer in layers for m in (layer.norm1, layer.norm2)]
        reason = sync_problem(norms)
        if is_instance_block(layers):  # InstanceNorm: the dense_block_in operator (nn/instance_block.py)
            reason = instance_block_problem(layers, x)
        elif reason is not None:
            pass
        elif not fusable_norms(norms):
            reason = "its BatchNorms are not all affine with running statistics and one eps"
        elif len({bn.training for bn in norms}) != 1:
            reason = "its BatchNorms are in mixed train/eval modes"
        elif len({layer_drop_rate(layer) for layer in layers}) != 1:
            reason = "its layers have different drop rates"
        elif layer_drop_rate(layers[0]) > 0 and {layer.training for layer in layers} != {norms[0].training}:
            reason = "dropout is active but its layers' train/eval mode differs from its BatchNorms' mode"
        elif not fused_device_ok(x, block=True, dtype=_block_ops.cpu_autocast_dtype(x, "block")):
            reason = f"no fused kernel for {x.device.type} tensors of dtype {x.dtype}"
        elif isinstance(block_activations(layers), str):
            reason = block_activations(layers)
        elif block_activations(layers) is not None and not act_kernel_ok(x):
            reason = f"its activations are LeakyReLU / PReLU, which the {x.device.type} kernels do not compute"
        elif block_activations(layers) is not None and sync_group(norms) is not None:
            reason = ("its activations are LeakyReLU / PReLU, which the synchronised (SyncBatchNorm) path does not "
                      "compute")
        elif sync_group(norms) is not None:
            reason = sync_input_problem(x)
        if reason is not None:
            warn_once(f"block:{reason}", "densenet_fast.DenseBlock: using the reference PyTorch path because "
                      f"{reason}.", stacklevel=2)
            return False
        return True

    def block_params(self) -> _block_ops.BlockParams:
        layers = self._layers()
        return _block_ops.BlockParams(
            [layer.norm1.weight for layer in layers], [layer.norm1.bias for layer in layers],
            [layer.conv1.weight for layer in layers],
            [layer.norm2.weight for layer in layers], [layer.norm2.bias for layer in layers],
            [layer.conv2.weight for layer in layers],
            [layer.norm1.running_mean for layer in layers], [layer.norm1.running_var for layer in layers],
            [layer.norm2.running_mean for layer in layers], [layer.norm2.running_var for layer in layers])

    def fused_forward(self, x: Tensor) -> _block_ops.BlockOutput:
        """Runs the fused operator and updates every norm's running statistics once (training)."""
        layers = self._layers()
        first = layers[0].norm1
        rank = layers[0].conv1.weight.dim()  # 4 (2-D block) or 5 (3-D block)
        if x.dim() != rank or x.shape[1] != first.num_features:
            dims = "D, H, W" if rank == 5 else "H, W"
            raise ValueError(f"input: expected a {rank}-D tensor with {first.num_features} channels [N, "
                             f"{first.num_features}, {dims}], got shape {tuple(x.shape)}")
        if is_instance_block(layers):
            return instance_fused_forward(layers, x)
        training = first.training
        group = sync_group(m for layer in layers for m in (layer.norm1, layer.norm2))
        if group is not None:
            return self._sync_forward(x, group)
        check_batch_for_training(x, training)
        params = self.block_params()
        if x.device.type == "cpu":
            # CPU: bf16 under bf16 autocast, fp32 under fp16 autocast; BN tensors in fp32 for a bf16 model.
            x = _block_ops.cpu_autocast_input(x, "block")
            params = _block_ops.cast_block_params(params, x.dtype)
        acts = block_activations(layers)  # LeakyReLU / PReLU: their slopes (can_fuse refused anything else)
        slopes = None if acts is None else block_slopes(layers, acts, stats_dtype(x.dtype), x.device)
        with _kernel_autocast(x):
            out = _block_ops.fused_dense_block(x, params, training=training, eps=first.eps,
                                               drop_rate=layer_drop_rate(layers[0]), slopes=slopes)
        if training:
            count = values_per_channel(x)
            widths = [layer.norm1.num_features for layer in layers]
            update_running_stats([layer.norm1 for layer in layers] + [layer.norm2 for layer in layers],
                                 [out.mean[:c] for c in widths] + list(out.mean2.unbind(0)),
                                 [out.var[:c] for c in widths] + list(out.var2.unbind(0)), count)
        return out

    def _sync_forward(self, x: Tensor, group) -> _sync_ops.SyncBlockOutput:
        """SyncBatchNorm in training over ``group``: global statistics (docs/design.md §13); every norm's
        running statistics are updated with the global batch (the same values on every rank)."""
        layers = self._layers()
        out = _sync_ops.sync_dense_block(x, self.block_params(), group=group, eps=layers[0].norm1.eps,
                                         drop_rate=layer_drop_rate(layers[0]))
        widths = [layer.norm1.num_features for layer in layers]
        update_running_stats([layer.norm1 for layer in layers] + [layer.norm2 for layer in layers],
                             [out.mean[:c] for c in widths] + list(out.mean2.unbind(0)),
                             [out.var[:c] for c in widths] + list(out.var2.unbind(0)), out.count)
        return out

    # -- module API -------------------------------------------------------------------------------
    def forward(self, init_features: Tensor) -> Tensor:
        # nn.BatchNorm2d counts num_batches_tracked before raising this error; check first, so a call
        # that raises leaves every buffer as it was, on the fused and on the reference path.
        leaf = fx_leaf_call(self, init_features)
        if leaf is not None:  # torch.fx tracing: one call_module node
            return leaf
        x = init_features
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if (isinstance(x, Tensor) and x.dim() in (4, 5) and x.shape[1] and values_per_channel(x) == 1
                and any(m.training for m in norms) and sync_group(norms) is None):
            check_batch_for_training(x, True)  # synchronised norms: the global batch counts (SyncBatchNorm's rule)
        if self.can_fuse(init_features):
            return self.fused_forward(init_features).buffer
        return self.reference_forward(init_features)

    def reference_forward(self, init_features: Tensor) -> Tensor:
        """The plain per-layer computation (torchvision's ``_DenseBlock.forward``)."""
        features = [init_features]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


def bn_stats(bn: nn.BatchNorm2d, x: Tensor, batch_mean: Optional[Tensor] = None,
             batch_var: Optional[Tensor] = None, update: bool = True) -> Tuple[Tensor, Tensor, bool]:
    """Statistics a BN reader of ``x`` uses: batch statistics (given, or computed here) in training,
    after updating ``bn``'s running statistics once (unless ``update=False``: then the caller calls
    :func:`commit_bn_stats` once its operator has succeeded); running statistics in eval."""
    if not bn.training:
        return bn.running_mean, bn.running_var, False
    check_batch_for_training(x, True)
    if batch_mean is None or batch_mean.numel() == 0:
        # (a CPU bfloat16 input is reduced as it is, with float32 moments)
        batch_mean, batch_var = _tail_ops.channel_moments(x.detach())
    if update:
        commit_bn_stats(bn, x, batch_mean, batch_var, True)
    return batch_mean, batch_var, True


def commit_bn_stats(bn: nn.BatchNorm2d, x: Tensor, mean: Tensor, var: Tensor, training: bool) -> None:
    """Running-statistics update of a BN reader whose operator has run (no-op in eval)."""
    if training:
        update_running_stats([bn], [mean], [var], values_per_channel(x))


class Transition(nn.Sequential):
    """DenseNet transition (children ``norm, relu, conv, pool`` as torchvision's ``_Transition``).

    forward(x: [N, C, H, W]) -> [N, C_out, H//2, W//2]. With ``impl="fused"`` BN-ReLU-conv1x1-avgpool is one
    operator that pools before the 1x1 conv and stores no BN/ReLU output. ``spatial_dims=3``:
    [N, C, D, H, W] -> [N, C_out, D//2, H//2, W//2] (BatchNorm3d, Conv3d, AvgPool3d).
    """

    def __init__(self, num_input_features: int, num_output_features: int, impl: str = "fused",
                 spatial_dims: int = 2) -> None:
        super().__init__()
        check_int("num_input_features", num_input_features)
        check_int("num_output_features", num_output_features)
        check_spatial_dims(spatial_dims)
        self.norm = NORM[spatial_dims](num_input_features)
        self.relu = nn.ReLU(inplace=True)
        self.conv = CONV[spatial_dims](num_input_features, num_output_features, kernel_size=1, stride=1, bias=False)
        self.pool = AVG_POOL[spatial_dims](kernel_size=2, stride=2)
        self.impl = check_impl(impl)

    __prepare_scriptable__ = prepare_scriptable

    def can_fuse(self, x: Tensor) -> bool:
        """Whether forward(x) runs the fused operator; warns once when impl="fused" cannot be honoured
        for the module's configuration. Inputs the fused operator rejects but torchvision's modules
        handle or report themselves (not of the conv's rank, empty batch, a spatial size < 2) take the
        reference path."""
        if getattr(self, "impl", "fused") != "fused" or exporting_to_onnx():
            return False  # ONNX export: standard ATen ops (documented rule, no warning)
        _check_module_input(x, self.conv.weight, "Transition")
        refuse_empty_batch(x, [self.norm], "Transition")
        if x.dim() != self.conv.weight.dim() or x.shape[0] == 0 or min(x.shape[2:]) < 2:
            return False
        reason = None
        if not fusable_norms([self.norm]):
            reason = "its BatchNorm is not affine with running statistics"
        elif not reader_device_ok(x, self.norm):
            reason = f"no fused kernel for {x.device.type} tensors of dtype {x.dtype}"
        elif sync_group([self.norm]) is not None:
            reason = sync_input_problem(x)
        if reason is not None:
            warn_once(f"transition:{reason}", "densenet_fast.Transition: using the reference PyTorch path because "
                      f"{reason}.", stacklevel=2)
            return False
        return True

    def fused_forward(self, x: Tensor, batch_mean: Optional[Tensor] = None,
                      batch_var: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                      count: Optional[int] = None) -> Tensor:
        """``batch_mean``/``batch_var``: the input's batch statistics when already known (from the block);
        ``count``: their global count when they are a synchronised block's global statistics.
        ``gate`` [N, C]: an SE gate folded into the prologue (the input is then ``gate * x``, and the batch
        statistics, required in training, are that product's; see :mod:`densenet_fast.nn.se_fold`)."""
        if x.shape[1] != self.norm.num_features:
            raise ValueError(f"input: expected {self.norm.num_features} channels, got shape {tuple(x.shape)}")
        group = sync_group([self.norm])
        if group is not None:
            if gate is not None:  # FusedFeatures never folds an SE into a synchronised reader
                raise ValueError("gate: an SE gate cannot be folded into a synchronised (SyncBatchNorm) transition")
            return sync_reader("transition", self.norm, x, group, batch_mean, batch_var, count, self.conv.weight)
        x = _block_ops.cpu_autocast_input(x, "tail")
        with _kernel_autocast(x):
            mean, var, training = bn_stats(self.norm, x, batch_mean, batch_var, update=False)
            out = _tail_ops.transition(x, mean, var, self.norm.weight, self.norm.bias, self.conv.weight,
                                       training=training, eps=self.norm.eps, gate=gate)
        commit_bn_stats(self.norm, x, mean, var, training)  # only once the operator has succeeded
        return out

    def forward(self, x: Tensor) -> Tensor:
        leaf = fx_leaf_call(self, x)
        if leaf is not None:  # torch.fx tracing: one call_module node
            return leaf
        if isinstance(x, Tensor) and self.norm.training and sync_group([self.norm]) is None:
            check_batch_for_training(x, True)  # before nn.BatchNorm2d would count the batch
        if self.can_fuse(x):
            return self.fused_forward(x)
        return super().forward(x)


def fused_norm_relu_pool(bn: nn.BatchNorm2d, x: Tensor, batch_mean: Optional[Tensor] = None,
                         batch_var: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                         count: Optional[int] = None) -> Tensor:
    """flatten(adaptive_avg_pool(relu(bn(x)), 1)) as one operator: [N, C, H, W] or [N, C, D, H, W] -> [N, C].

    ``gate`` [N, C]: an SE gate folded into the prologue (BN of ``gate * x``; see Transition.fused_forward).
    An empty batch (which the operator refuses) gets torchvision's computation and empty result. A
    synchronising ``nn.SyncBatchNorm`` uses the global statistics (given with their ``count`` by a
    synchronised block, or all-reduced here)."""
    if isinstance(x, Tensor) and x.dim() in (4, 5) and x.shape[0] == 0:
        refuse_empty_batch(x, [bn], "final norm")
        return torch.flatten(F.relu(bn(x)).mean(dim=tuple(range(2, x.dim())), keepdim=True), 1)
    group = sync_group([bn])
    if group is not None:
        if gate is not None:  # FusedFeatures never folds an SE into a synchronised reader
            raise ValueError("gate: an SE gate cannot be folded into a synchronised (SyncBatchNorm) final norm")
        if sync_input_problem(x) is not None:  # SyncBatchNorm's own synchronisation (callers warn)
            return torch.flatten(F.relu(bn(x)).mean(dim=tuple(range(2, x.dim())), keepdim=True), 1)
        return sync_reader("norm_relu_pool", bn, x, group, batch_mean, batch_var, count)
    x = _block_ops.cpu_autocast_input(x, "tail")
    with _kernel_autocast(x):
        mean, var, training = bn_stats(bn, x, batch_mean, batch_var, update=False)
        out = _tail_ops.norm_relu_pool(x, mean, var, bn.weight, bn.bias, training=training, eps=bn.eps, gate=gate)
    commit_bn_stats(bn, x, mean, var, training)  # only once the operator has succeeded
    return out
