"""Synchronised BatchNorm statistics: all-reduced moments and BN readers differentiable in their statistics.

SyncBatchNorm normalises with the statistics of the *global* batch (every rank of a process group). Here
that is split in two pieces that compose under autograd (docs/design.md §13):

* :func:`sync_moments` ``x -> (mean, var, count)``: each rank's per-channel sums (Σx, Σx²; float64) and
  value count are all-reduced in one collective; the backward all-reduces the incoming ``(dmean, dvar)``
  and returns ``dx = dmean/n + 2 (x - mean) dvar / n`` (n: the global count). Uneven batch sizes are
  exact (counts are summed, as ``SyncBatchNorm`` weighs each rank by its count).
* :func:`bn_reader` runs a fused BN reader (transition, final norm + pool, stem) with *given* statistics
  (its eval-mode kernel: identical output) and returns, besides the usual gradients, those of ``mean``
  and ``var``: ``dmean = -a·dβ``, ``dvar = -½·γ·invstd²·dγ`` (a = γ·invstd). A reader of a synchronised
  dense block hands these to the block, whose backward merges them into its own per-channel sums, so a
  reader of a block needs no collective of its own.

Every collective goes through ``torch.distributed.all_reduce`` (wrap it to count the traffic, as
``benchmarks/bench_sync_bn.py`` does). The functions are ``torch.compiler.disable``-d: under
``torch.compile`` a synchronised block is a graph break (documented rule).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from densenet_fast._extension import load_extension
from densenet_fast.ops.common import mark_fresh, stats_dtype
from densenet_fast.ops.stem import bn_relu_maxpool, bn_relu_maxpool_backward

load_extension()
_ops = torch.ops.densenet_fast

__all__ = ["all_reduce_", "moments_from_sums", "sync_moments", "bn_reader", "sync_bn_reader", "channel_sums",
           "bn_stats_grads"]


def all_reduce_(t: Tensor, group) -> Tensor:
    """Sums ``t`` over ``group`` in place (the one collective of the synchronised path)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def channel_sums(x: Tensor, other: Optional[Tensor] = None) -> Tensor:
    """[2, C] float64: per-channel Σx and Σx² of x [N, C, *] (with ``other``, same shape: Σx and Σx·other),
    accumulated in float64 without temporaries (channel slices of block buffers are read in place)."""
    return _ops.channel_sums(x, other)


def moments_from_sums(sums: Tensor, count: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Mean and biased variance ([C] in ``dtype``) from global float64 sums [2, C] over ``count`` values.

    var = Σx²/n - mean², in float64 from float64 sums (a float32 value's square is exact in float64): the
    cancellation costs ~1e-16·mean²/var relative, far below float32 resolution and the fp64 parity budget.
    """
    mean = sums[0] / count
    var = (sums[1] / count - mean * mean).clamp_min_(0.0)
    return mean.to(dtype), var.to(dtype)


def values_per_channel(x: Tensor) -> int:
    return x.numel() // x.shape[1]


def bn_stats_grads(weight: Tensor, var: Tensor, eps: float, grad_weight: Tensor,
                   grad_bias: Tensor) -> Tuple[Tensor, Tensor]:
    """Gradients of a BN(-ReLU) reader w.r.t. its (given) mean and var, from its dγ = Σ d·x̂ and dβ = Σ d."""
    invstd = torch.rsqrt(var + eps)
    w = weight.to(var.dtype)
    return -(w * invstd) * grad_bias, -0.5 * w * invstd * invstd * grad_weight


def _global_moments(x: Tensor, group) -> Tuple[Tensor, Tensor, int]:
    """(mean, var, count) of x [N, C, *] over ``group``: this rank's sums and count, one all-reduce."""
    C = x.shape[1]
    pack = torch.empty(2 * C + 1, dtype=torch.float64, device=x.device)
    pack[:2 * C].copy_(channel_sums(x).flatten())
    pack[2 * C] = values_per_channel(x)
    all_reduce_(pack, group)
    count = int(pack[2 * C].item())
    mean, var = moments_from_sums(pack[:2 * C].view(2, C), count, stats_dtype(x.dtype))
    return mean, var, count


def _moments_backward(x: Tensor, mean: Tensor, grad_mean: Optional[Tensor], grad_var: Optional[Tensor], group,
                      count: int, into: Optional[Tensor] = None) -> Tensor:
    """dx of the global moments: ``dmean/n + 2 (x - mean) dvar/n`` (n = count) with (dmean, dvar) all-reduced
    (every rank's loss depends on the global statistics); added in place to ``into`` when given."""
    C = x.shape[1]
    g = torch.zeros(2, C, dtype=mean.dtype, device=x.device)
    if grad_mean is not None:
        g[0].copy_(grad_mean)
    if grad_var is not None:
        g[1].copy_(grad_var)
    all_reduce_(g, group)
    shape = [1, C] + [1] * (x.dim() - 2)
    # dx = x·c1 + c0
    c1 = (2.0 * g[1] / count).view(shape).to(x.dtype)
    c0 = (g[0] / count - mean * (2.0 * g[1] / count)).view(shape).to(x.dtype)
    if into is None:
        return torch.addcmul(c0, x, c1)  # one allocation
    return into.addcmul_(x, c1).add_(c0)


class _SyncMoments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tuple[Tensor, Tensor, Tensor]:
        mean, var, count = _global_moments(x, group)
        ctx.group, ctx.count = group, count
        ctx.save_for_backward(x, mean)
        count_t = torch.tensor(count)
        ctx.mark_non_differentiable(count_t)
        return mean, var, count_t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mean: Optional[Tensor], grad_var: Optional[Tensor], _grad_count):
        x, mean = ctx.saved_tensors
        return _moments_backward(x, mean, grad_mean, grad_var, ctx.group, ctx.count), None


@torch.compiler.disable
def sync_moments(x: Tensor, group) -> Tuple[Tensor, Tensor, int]:
    """Global per-channel mean and biased variance of x [N, C, *] over ``group``, and the global count of
    values per channel (N·H·W summed over ranks). Differentiable in ``x`` (the backward all-reduces)."""
    mean, var, count = _SyncMoments.apply(x, group)
    return mean, var, int(count)


# -- BN readers with given statistics -------------------------------------------------------------------
# kind -> (forward(x, mean, var, weight, bias, extra, eps), backward(grad, x, mean, var, weight, bias, extra,
# eps) -> (dx, dweight, dbias, dextra)). The eval-mode kernels: normalise with the given statistics, and
# a backward without the statistics' terms (dx = a·d), which come back through dmean / dvar instead.
def _transition_fwd(x, mean, var, w, b, cw, eps):
    return _ops.transition_forward(x, mean, var, w, b, cw, False, eps)


def _transition_bwd(grad, x, mean, var, w, b, cw, eps):
    return _ops.transition_backward(grad, x, mean, var, w, b, cw, False, eps)[:4]  # no gate: its grad is empty


def _pool_fwd(x, mean, var, w, b, _cw, eps):
    return _ops.norm_relu_pool_forward(x, mean, var, w, b, False, eps)


def _pool_bwd(grad, x, mean, var, w, b, _cw, eps):
    return (*_ops.norm_relu_pool_backward(grad, x, mean, var, w, b, False, eps)[:3], None)  # no gate


def _stem_fwd(x, mean, var, w, b, _cw, eps):
    return bn_relu_maxpool(x, mean, var, w, b, False, eps)


def _stem_bwd(grad, x, mean, var, w, b, _cw, eps):
    return (*bn_relu_maxpool_backward(grad, x, mean, var, w, b, False, eps), None)


def _bn_fwd(x, mean, var, w, b, _cw, eps):
    return torch.batch_norm(x, w, b, mean, var, False, 0.0, eps, False)


def _bn_bwd(grad, x, mean, var, w, b, _cw, eps):
    return (*torch.ops.aten.native_batch_norm_backward(grad, x, w, mean, var, None, None, False, eps,
                                                       [True, True, True]), None)


_READERS = {"transition": (_transition_fwd, _transition_bwd), "norm_relu_pool": (_pool_fwd, _pool_bwd),
            "stem": (_stem_fwd, _stem_bwd), "bn": (_bn_fwd, _bn_bwd)}


class _BNReader(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kind: str, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
                extra: Optional[Tensor], eps: float, hand_over: bool) -> Tensor:
        ctx.kind, ctx.eps, ctx.hand_over = kind, eps, hand_over
        ctx.save_for_backward(x, mean, var, weight, bias, extra)
        return _READERS[kind][0](x, mean, var, weight, bias, extra, eps)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        x, mean, var, weight, bias, extra = ctx.saved_tensors
        dx, dw, db, dextra = _READERS[ctx.kind][1](grad.contiguous(), x, mean, var, weight, bias, extra, ctx.eps)
        if ctx.hand_over and dx is not grad:
            mark_fresh(dx)  # fresh: the block's backward may use it as its gradient buffer
        dmean, dvar = bn_stats_grads(weight, var, ctx.eps, dw, db)
        return None, dx, dmean, dvar, dw, db, dextra, None, None


@torch.compiler.disable
def bn_reader(kind: str, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
              extra: Optional[Tensor] = None, *, eps: float, hand_over: bool = False) -> Tensor:
    """A fused BN-ReLU reader of x with the statistics ``mean``/``var`` given, differentiable in them.

    kind: ``"transition"`` (extra: the 1x1 conv weight; [N, C, H, W] -> [N, C_out, H/2, W/2]),
    ``"norm_relu_pool"`` ([N, C, *] -> [N, C]), ``"stem"`` ([N, C, H, W] -> BN-ReLU-maxpool 3x3/2) or ``"bn"``
    (the BatchNorm alone, [N, C, *] -> [N, C, *]; torch's kernels).
    With statistics from :func:`sync_moments` (or a synchronised block) this is SyncBatchNorm's reader.
    ``hand_over``: x is a synchronised block's internal buffer (no other code holds it): x's gradient is
    tagged so that the block's backward may update it in place (``ops.common.owns_grad``) instead of copying it.
    """
    if kind not in _READERS:
        raise ValueError(f"kind: expected one of {sorted(_READERS)}, got {kind!r}")
    return _BNReader.apply(kind, x, mean, var, weight, bias, extra, float(eps), bool(hand_over))


class _SyncBNReader(torch.autograd.Function):
    """:func:`sync_moments` followed by :func:`bn_reader` as one autograd node: the same collectives and
    arithmetic, but the statistics' gradient terms are added to the reader's fresh dx in place, instead of
    autograd summing two input-sized gradients (the step's peak of a 3-D model is its stem's backward)."""

    @staticmethod
    def forward(ctx, kind: str, x: Tensor, weight: Tensor, bias: Tensor, extra: Optional[Tensor], eps: float,
                group):
        mean, var, count = _global_moments(x, group)
        ctx.kind, ctx.eps, ctx.group, ctx.count = kind, eps, group, count
        ctx.save_for_backward(x, mean, var, weight, bias, extra)
        out = _READERS[kind][0](x, mean, var, weight, bias, extra, eps)
        count_t = torch.tensor(count)
        ctx.mark_non_differentiable(mean, var, count_t)
        return out, mean, var, count_t

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor, _gm, _gv, _gc):
        x, mean, var, weight, bias, extra = ctx.saved_tensors
        dx, dw, db, dextra = _READERS[ctx.kind][1](grad.contiguous(), x, mean, var, weight, bias, extra, ctx.eps)
        dmean, dvar = bn_stats_grads(weight, var, ctx.eps, dw, db)
        if dx is grad:  # not the reader's own allocation: do not update it in place
            dx = dx.clone()
        dx = _moments_backward(x, mean, dmean, dvar, ctx.group, ctx.count, into=dx)
        return None, dx, dw, db, dextra, None, None


@torch.compiler.disable
def sync_bn_reader(kind: str, x: Tensor, weight: Tensor, bias: Tensor, extra: Optional[Tensor] = None, *,
                   group, eps: float) -> Tuple[Tensor, Tensor, Tensor, int]:
    """SyncBatchNorm's reader of x [N, C, *] over ``group``: ``bn_reader(kind, x, *sync_moments(x, group)[:2],
    ...)`` in one autograd node (same results and collectives, one input-sized gradient fewer in the backward).

    Returns (output, mean, var, count): the global statistics (not differentiable; for the running statistics).
    """
    if kind not in _READERS:
        raise ValueError(f"kind: expected one of {sorted(_READERS)}, got {kind!r}")
    out, mean, var, count = _SyncBNReader.apply(kind, x, weight, bias, extra, float(eps), group)
    return out, mean, var, int(count)
