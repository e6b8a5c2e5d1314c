"""``FusedFeatures``: a DenseNet ``features`` Sequential that runs its children fused where it can.

Same children, names and ``state_dict`` as the ``nn.Sequential`` it stands for, same outputs. It fuses

* the stem's BN -> ReLU -> 3x3/2 max-pool (3x3x3/2 for MONAI's 3-D stem) into one operator that stores only
  the stem conv's output;
* each fused dense block with the transition after it: the block hands over its buffer *and its batch
  statistics*, so every channel's statistics are computed once;
* (``forward_pooled``) the final norm with the head's ReLU and global average pool;
* an SE gate (``SqueezeExcite``) between a block and its transition or final norm into that reader's
  prologue (:mod:`densenet_fast.nn.se_fold`): the gated block output is never materialised.

So no BN/ReLU output is stored anywhere. Our own models use it as their ``features``; ``convert()``
puts it into torchvision / timm DenseNets. Modules carrying hooks are called through ``__call__`` (so
their hooks fire) instead of being paired.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules import module as _module_mod

from densenet_fast.nn.batchnorm_stats import fusable_norms, update_running_stats
from densenet_fast.nn.conv0_bf16 import conv0_in_float32, conv0_widened
from densenet_fast.nn.dense_block import (
    DenseBlock,
    Transition,
    bn_stats,
    commit_bn_stats,
    cpu_bf16_reader_ok,
    fused_device_ok,
    fused_norm_relu_pool,
    reader_device_ok,
)
from densenet_fast.nn.export_support import exporting_to_onnx, prepare_scriptable
from densenet_fast.nn.se_fold import can_fold, folded_transition, gate_and_stats
from densenet_fast.nn.sync_batchnorm import refuse_empty_batch, sync_group, sync_input_problem, sync_reader
from densenet_fast.ops.common import mark_sole_reader
from densenet_fast.ops.stem import bn_relu_maxpool, conv_bn_relu_maxpool
from densenet_fast.ops.sync_block import SyncBlockOutput

__all__ = ["FusedFeatures", "has_hooks", "norm_relu_kind"]


def has_hooks(m: nn.Module) -> bool:
    """Whether calling ``m`` would run hooks (its own or global module hooks)."""
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or _module_mod._global_forward_hooks or _module_mod._global_forward_pre_hooks
                or _module_mod._global_backward_hooks or _module_mod._global_backward_pre_hooks)


def norm_relu_kind(m: nn.Module) -> Optional[str]:
    """``"bn"`` for a plain ``nn.BatchNorm2d`` / ``nn.BatchNorm3d`` / ``nn.SyncBatchNorm``, ``"bn_relu"`` for timm's
    ``BatchNormAct2d`` / ``SyncBatchNormAct`` with a ReLU activation and no drop layer, ``None`` otherwise (or when
    the norm itself cannot be fused)."""
    if not isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)) or not fusable_norms([m]):
        return None
    if type(m) in (nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        return "bn"
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    if (type(m).__name__ in ("BatchNormAct2d", "SyncBatchNormAct") and type(act) is nn.ReLU
            and type(drop) is nn.Identity):
        return "bn_relu"
    return None
    if type(m) in (nn.BatchNorm2d, nn.BatchNorm3d):
        return "bn"
    act, drop = getattr(m, "act", None), getattr(m, "drop", None)
    if type(m).__name__ == "BatchNormAct2d" and type(act) is nn.ReLU and type(drop) is nn.Identity:
        return "bn_relu"
    return None


def _ntuple(v, n: int) -> Tuple[int, ...]:
    return (v,) * n if isinstance(v, int) else tuple(v)


_STEM_POOL = {nn.MaxPool2d: 2, nn.MaxPool3d: 3}  # exact class -> spatial dims
_STEM_NORM = {nn.MaxPool2d: nn.BatchNorm2d, nn.MaxPool3d: nn.BatchNorm3d}


def _is_stem_pool(m: nn.Module, norm: nn.Module) -> bool:
    """MaxPool2d / MaxPool3d(kernel 3, stride 2, padding 1), floor mode, no indices, of the norm's rank."""
    n = _STEM_POOL.get(type(m))
    return (n is not None and isinstance(norm, (_STEM_NORM[type(m)], nn.SyncBatchNorm))
            and _ntuple(m.kernel_size, n) == (3,) * n
            and _ntuple(m.stride, n) == (2,) * n and _ntuple(m.padding, n) == (1,) * n
            and _ntuple(m.dilation, n) == (1,) * n and not m.ceil_mode and not m.return_indices)


def stem_span(mods: List[nn.Module], i: int) -> int:
    """How many modules from ``mods[i]`` form BN -> ReLU -> MaxPool(3, 2, 1) (2-D, or MONAI's 3-D stem; timm:
    BN+act -> pool); 0 if none."""
    kind = norm_relu_kind(mods[i])
    span = {"bn": 3, "bn_relu": 2}.get(kind, 0)
    if span == 0 or i + span > len(mods):
        return 0
    if span == 3 and type(mods[i + 1]) is not nn.ReLU:
        return 0
    if not _is_stem_pool(mods[i + span - 1], mods[i]) or any(has_hooks(m) for m in mods[i:i + span]):
        return 0
    return span


def fused_stem(bn: nn.Module, x: Tensor) -> Tensor:
    """max_pool(relu(bn(x)), 3, 2, 1) over x [N, C, H, W] (BatchNorm2d) or [N, C, D, H, W] (BatchNorm3d), storing
    only ``x`` for the backward (float32/float64 CPU, CUDA). A synchronising ``nn.SyncBatchNorm`` normalises
    with all-reduced statistics."""
    group = sync_group([bn])
    if group is not None:
        return sync_reader("stem", bn, x, group)
    mean, var, training = bn_stats(bn, x, update=False)
    out = bn_relu_maxpool(x, mean, var, bn.weight, bn.bias, training, bn.eps)
    commit_bn_stats(bn, x, mean, var, training)  # only once the operator has succeeded
    return out


def conv_stem_fusable(conv: nn.Module, bn: nn.Module, x: Tensor) -> bool:
    """Whether a 3-D stem ``conv -> bn -> relu -> pool`` runs as :func:`fused_conv_stem` on ``x``: a plain
    Conv3d without bias (MONAI's conv0), a 5-D float32/float64 input, no autocast (the operator would run
    the convolution in the input's dtype). 2-D stems keep conv0 apart (its recompute would cost ~8% of a
    DenseNet-121 step for a smaller share of the memory)."""
    return (type(conv) is nn.Conv3d and isinstance(bn, nn.BatchNorm3d) and conv.bias is None and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and _ntuple(conv.dilation, 3) == (1, 1, 1) and not has_hooks(conv) and x.dim() == 5
            and x.shape[0] > 0 and x.dtype == conv.weight.dtype and fused_device_ok(x)
            and not torch.is_autocast_enabled(x.device.type) and sync_group([bn]) is None)


def fused_conv_stem(conv: nn.Conv3d, bn: nn.BatchNorm3d, x: Tensor) -> Tensor:
    """max_pool3d(relu(bn(conv(x))), 3, 2, 1) saving only the image ``x`` (conv recomputed in the backward)."""
    stride, padding = list(_ntuple(conv.stride, 3)), list(_ntuple(conv.padding, 3))
    training = bn.training
    rm, rv = (bn.running_mean, bn.running_var) if not training else (bn.weight.new_empty(0),) * 2
    out, mean, var = conv_bn_relu_maxpool(x, conv.weight, stride, padding, rm, rv, bn.weight, bn.bias, training,
                                          bn.eps)
    if training:
        k = _ntuple(conv.kernel_size, 3)
        spatial = [(s + 2 * p - kk) // st + 1 for s, p, kk, st in zip(x.shape[2:], padding, k, stride)]
        update_running_stats([bn], [mean], [var], x.shape[0] * spatial[0] * spatial[1] * spatial[2])
    return out


def _conv0_channels_last(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` [N, C, H, W] -> [N, C_out, H', W'] answered in channels_last: conv0 before a fused 2-D stem. The
    stem kernels vectorise over the channels in channels_last (the contiguous path takes ~10x the stem's time)
    and the first block takes it without a transpose. The weight in channels_last makes ATen run oneDNN in
    channels_last (the image's channels_last copy is then a transient of the convolution), while autograd
    keeps the image as given: nothing more is saved than for ``conv(x)``. Under CPU bfloat16 autocast on a CPU
    whose bfloat16 convolutions measured slower than float32: :mod:`densenet_fast.nn.conv0_bf16`."""
    if conv0_in_float32(conv, x):
        return conv0_widened(conv, x)
    return conv._conv_forward(x, conv.weight.contiguous(memory_format=torch.channels_last), conv.bias)


def _stem_can_fuse(bn: nn.Module, x: Tensor) -> bool:
    # CPU: float32/float64, or the bfloat16 conv0 output of CPU autocast (computed in float32).
    refuse_empty_batch(x, [bn], "stem")
    if sync_group([bn]) is not None and sync_input_problem(x) is not None:
        return False  # SyncBatchNorm's own synchronisation
    rank = 5 if isinstance(bn, nn.BatchNorm3d) else 4 if isinstance(bn, nn.BatchNorm2d) else x.dim()  # Sync: any
    return x.dim() == rank and x.shape[0] > 0 and (fused_device_ok(x) or _cpu_bf16_stem(bn, x))


def _cpu_bf16_stem(bn: nn.Module, x: Tensor) -> bool:
    # conv0's bfloat16 output under CPU autocast (fp32 BN module), or of a .bfloat16() model: the stem op reads
    # it natively.
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and bn.weight is not None and sync_group([bn]) is None
            and (bn.weight.dtype == torch.float32 or cpu_bf16_reader_ok(x, bn)))


def _stats_for(reader_norm: nn.Module, stats) -> tuple:
    """(mean, var, count) of a fused block's output for the reader normalised by ``reader_norm``, or Nones when
    the reader must compute its own: a synchronised block's global statistics serve a synchronising reader
    only, a block's per-process statistics a non-synchronising one only."""
    # by type, not getattr(stats, "count"): every NamedTuple has a tuple's count() method, which once made every
    # reader of an unsynchronised block recompute its statistics
    count = stats.count if isinstance(stats, SyncBlockOutput) else None
    if (count is not None) != (sync_group([reader_norm]) is not None):
        return None, None, None
    return stats.mean, stats.var, count


class FusedFeatures(nn.Sequential):
    """Drop-in for a DenseNet ``features`` Sequential (identical children and ``state_dict``).

    ``forward(x)`` returns exactly what the Sequential returns (the final norm's output).
    ``forward_pooled(x, relu)`` returns ``flatten(adaptive_avg_pool2d(relu(self(x)) if relu else self(x), 1), 1)``
    and also fuses the final norm (+ ReLU + pool) with the last block.
    """

    impl = "fused"  # "reference": run the children one after the other, as nn.Sequential does
    fold_se = True  # False: an SE before a transition / the final norm runs on its own (its gated output stored)
    __prepare_scriptable__ = prepare_scriptable

    def _run(self, x: Tensor, pool_relu: Optional[bool]):
        # torch.fx tracing records the fused stem and pooled head as nodes that compute what eager computes
        # (nn/fused_fx.py); ONNX export sees the children one by one (blocks/transitions then take their own
        # ONNX path), as nn.Sequential runs them.
        if isinstance(x, fx.Proxy) and self.impl == "fused":
            from densenet_fast.nn.fused_fx import trace_features

            return trace_features(self, x, pool_relu)
        if self.impl != "fused" or isinstance(x, fx.Proxy) or exporting_to_onnx():
            return super().forward(x), False
        mods = list(self._modules.values())
        pending = None  # a fused block's BlockOutput not yet consumed
        i = 0
        while i < len(mods):
            m, last = mods[i], i == len(mods) - 1
            if pending is not None:
                buf = pending.buffer
                if isinstance(m, Transition) and not has_hooks(m) and m.can_fuse(buf):
                    mean, var, count = _stats_for(m.norm, pending)
                    # its only reader: the block may take the transition's input gradient as its own (hand-over)
                    x, pending = m.fused_forward(mark_sole_reader(buf), mean, var, count=count), None
                    i += 1
                    continue
                x, stats, pending = buf, pending, None
            else:
                stats = None
            if self.fold_se and not last and not has_hooks(m) and can_fold(m, x):
                nxt = mods[i + 1]
                synced = sync_group([nxt.norm if isinstance(nxt, Transition) else nxt]) is not None
                if synced:
                    pass  # the SE runs on its own; its reader synchronises (no gate in the sync readers)
                elif isinstance(nxt, Transition) and not has_hooks(nxt) and nxt.can_fuse(x):
                    # SE -> transition, the gate in its prologue; a block's buffer: the block may take the
                    # transition's input gradient over (hand-over)
                    x = folded_transition(m, nxt, x, hand_over=stats is not None)
                    i += 2
                    continue
                elif i + 1 == len(mods) - 1 and self._fuses_final_norm(nxt, x, pool_relu):
                    # SE -> final norm (+ ReLU + pool); a block's buffer: hand-over, as for the transition
                    gate, mean, var = gate_and_stats(m, nxt, x)
                    x = mark_sole_reader(x) if stats is not None else x
                    return fused_norm_relu_pool(nxt, x, mean, var, gate=gate), True
            if last and self._fuses_final_norm(m, x, pool_relu):
                if stats is not None and m.training == bool(stats.mean.numel()):
                    mean, var, count = _stats_for(m, stats)
                    return fused_norm_relu_pool(m, mark_sole_reader(x), mean, var, count=count), True
                return fused_norm_relu_pool(m, x), True
            if isinstance(m, DenseBlock) and not has_hooks(m) and m.can_fuse(x):
                pending = m.fused_forward(x)
                if pending.mean.dim() == 2:  # an InstanceNorm block's per-sample statistics: no fused BN reader
                    x, pending = pending.buffer, None
                i += 1
                continue
            if stats is None and i + 1 < len(mods) and isinstance(m, nn.Conv3d):
                span = stem_span(mods, i + 1)
                if span and conv_stem_fusable(m, mods[i + 1], x):
                    x = fused_conv_stem(m, mods[i + 1], x)
                    i += 1 + span
                    continue
            if (stats is None and type(m) is nn.Conv2d and not has_hooks(m) and i + 1 < len(mods)
                    and stem_span(mods, i + 1) and x.dim() == 4 and x.device.type == "cpu"):
                x = _conv0_channels_last(m, x)
                i += 1
                continue
            span = stem_span(mods, i) if stats is None else 0
            if span and _stem_can_fuse(m, x):
                x = fused_stem(m, x)
                i += span
                continue
            group = sync_group([m]) if type(m) is nn.SyncBatchNorm and not has_hooks(m) else None
            if group is not None and sync_input_problem(x) is None:
                # A SyncBatchNorm no fused operator reads (e.g. a 3-D stem's): synchronised here, also on CPU.
                x = sync_reader("bn", m, x, group, *(_stats_for(m, stats) if stats is not None else ()))
            else:
                x = m(x)
            i += 1
        if pending is not None:
            x = pending.buffer
        return x, False

    @staticmethod
    def _fuses_final_norm(m: nn.Module, x: Tensor, pool_relu: Optional[bool]) -> bool:
        """Whether the last module ``m`` runs as the fused final norm (+ ReLU) + global pool (forward_pooled)."""
        if pool_relu is None or has_hooks(m):
            return False
        kind = norm_relu_kind(m)
        rank = 5 if isinstance(m, nn.BatchNorm3d) else 4 if isinstance(m, nn.BatchNorm2d) else x.dim()
        return ((kind == "bn_relu" or (kind == "bn" and pool_relu)) and x.dim() == rank
                and reader_device_ok(x, m))

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, None)[0]

    def forward_pooled(self, x: Tensor, relu: bool = True) -> Tensor:
        """[N, C_in, (D,) H, W] -> [N, C]: ``flatten(adaptive_avg_pool(relu?(self(x)), 1), 1)``."""
        out, pooled = self._run(x, bool(relu))
        if pooled:
            return out
        if relu:
            out = F.relu(out)
        # The rank from the modules, not from the tensor: torch.fx traces this method.
        if any(isinstance(m, (nn.Conv3d, nn.BatchNorm3d)) for m in self.children()):
            return torch.flatten(F.adaptive_avg_pool3d(out, 1), 1)
        return torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> "FusedFeatures":
        """A FusedFeatures holding the *same* child modules (shared, not copied) under the same names."""
        new = cls(OrderedDict(seq._modules))
        new.training = seq.training
        return new
