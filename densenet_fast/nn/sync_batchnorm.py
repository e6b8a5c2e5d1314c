"""``nn.SyncBatchNorm`` in the fused modules: when norms synchronise, and the synchronised BN readers.

A block, transition, final norm or stem whose norms are ``nn.SyncBatchNorm`` (``convert_sync_batchnorm``
before or after :func:`densenet_fast.convert`, or a model built with ``sync_bn=True``) runs

* the ordinary fused kernels when the norms compute plain batch norm, exactly where ``SyncBatchNorm``
  itself does: in eval, or without an initialised process group, or in a group of one process;
* the synchronised fused path (docs/design.md §13) in training over a process group of two or more
  processes (``process_group`` of the norms, else the default group): global statistics, every rank's
  batch weighed by its size, running statistics updated with the global batch on every rank.

The synchronised path computes in float32/float64 without autocast (else the module takes its reference
path with a one-time warning, where torch's ``SyncBatchNorm`` synchronises) and, unlike torch's
``SyncBatchNorm``, also runs on CPU tensors (gloo).
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from densenet_fast.nn.batchnorm_stats import update_running_stats
from densenet_fast.ops.sync_stats import bn_reader, sync_bn_reader

__all__ = ["is_sync_bn", "sync_problem", "sync_group", "sync_input_problem", "sync_reader", "refuse_empty_batch",
           "DistributedDataParallel"]


def is_sync_bn(m: nn.Module) -> bool:
    return isinstance(m, nn.SyncBatchNorm)


def sync_problem(norms: Iterable[nn.Module]) -> Optional[str]:
    """Why norms that must run as one fused operator cannot synchronise together (None if they can)."""
    norms = list(norms)
    kinds = {is_sync_bn(bn) for bn in norms}
    if len(kinds) > 1:
        return "it mixes nn.SyncBatchNorm and BatchNorm"
    if kinds == {True} and len({id(bn.process_group) for bn in norms}) > 1:
        return "its SyncBatchNorms have different process groups"
    return None


def sync_group(norms: Iterable[nn.Module]):
    """The process group over which ``norms`` (all ``nn.SyncBatchNorm``) synchronise now, or None when they
    compute plain batch norm: eval mode, no initialised process group, or a group of one process (the
    rule of ``nn.SyncBatchNorm.forward``)."""
    norms = list(norms)
    if not norms or not all(is_sync_bn(bn) and bn.training for bn in norms):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = norms[0].process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def sync_input_problem(x: Tensor) -> Optional[str]:
    """Why the synchronised fused path cannot take ``x`` (None if it can)."""
    if x.dtype not in (torch.float32, torch.float64):
        return f"the synchronised fused path computes in float32/float64, got {x.dtype}"
    if torch.is_autocast_enabled(x.device.type):
        return "the synchronised fused path does not run under autocast"
    if x.device.type not in ("cpu", "cuda"):
        return f"no synchronised fused path for {x.device.type} tensors"
    return None


def refuse_empty_batch(x: Tensor, norms: Iterable[nn.Module], owner: str) -> None:
    """ValueError for an empty batch on this rank while ``norms`` synchronise: the fused path cannot join the
    other ranks' collectives with no data (torch's SyncBatchNorm, which can, uses different collectives, so
    mixing the two would hang the process group)."""
    if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] == 0 and sync_group(norms) is not None:
        raise ValueError(f"{owner}: input: expected a non-empty batch on every rank with synchronised "
                         f"SyncBatchNorm (the fused synchronised path), got shape {tuple(x.shape)}")


def sync_reader(kind: str, bn: nn.modules.batchnorm._BatchNorm, x: Tensor, group, mean: Optional[Tensor] = None,
                var: Optional[Tensor] = None, count: Optional[int] = None, extra: Optional[Tensor] = None) -> Tensor:
    """A fused BN reader (``"transition"``, ``"norm_relu_pool"``, ``"stem"``) of x with SyncBatchNorm ``bn``.

    ``mean``/``var``/``count``: the global statistics of x when a synchronised block already computed them
    (their gradients then flow back into the block); otherwise they are all-reduced here. Updates ``bn``'s
    running statistics with the global batch once the operator has run.
    """
    if mean is None or var is None or count is None:
        out, mean, var, count = sync_bn_reader(kind, x, bn.weight, bn.bias, extra, group=group, eps=bn.eps)
    else:  # a block's buffer, internal to FusedFeatures: its gradient is handed over to the block's backward
        out = bn_reader(kind, x, mean, var, bn.weight, bn.bias, extra, eps=bn.eps, hand_over=True)
    update_running_stats([bn], [mean], [var], count)
    return out


class DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """``torch.nn.parallel.DistributedDataParallel`` that also accepts ``nn.SyncBatchNorm`` in a CPU module.

    torch's DDP refuses SyncBatchNorm layers in CPU modules because torch's own SyncBatchNorm cannot run on
    CPU tensors; densenet_fast's fused modules (blocks, transitions, final norm, stem) synchronise them on
    CPU over gloo. Everything else is torch's DDP (a SyncBatchNorm that no fused module reads still raises
    torch's error when it runs on CPU). On CUDA, torch's DDP and this class are the same.
    """

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        if self.device_type != "cpu":
            super()._passing_sync_batchnorm_handle(module)
