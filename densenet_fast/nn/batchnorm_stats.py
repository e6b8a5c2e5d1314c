"""Running-statistics bookkeeping for BatchNorm modules whose batch statistics a fused operator computed.

The fused kernels return batch mean / biased variance; these helpers apply exactly the update
``nn.BatchNorm2d`` would (unbiased running_var, ``momentum=None`` = cumulative average,
``num_batches_tracked += 1``), once per forward.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

_FUSABLE_WARNING = "a BatchNorm needs affine=True and track_running_stats=True, and all norms of a block one eps"


@torch.no_grad()
def update_running_stats(norms: Sequence[nn.modules.batchnorm._BatchNorm], means: Sequence[Tensor],
                         variances: Sequence[Tensor], count: int) -> None:
    """Updates ``norms[i]`` with batch mean ``means[i]`` and biased variance ``variances[i]`` over ``count`` values."""
    bessel = count / (count - 1) if count > 1 else 1.0
    momenta = {bn.momentum for bn in norms}
    nbt = [bn.num_batches_tracked for bn in norms]
    torch._foreach_add_(nbt, 1)
    rms = [bn.running_mean for bn in norms]
    rvs = [bn.running_var for bn in norms]
    means = [m.detach() for m in means]
    variances = [v.detach() for v in variances]
    if len(momenta) == 1 and None not in momenta:
        (m,) = momenta
        # running = (1 - m) * running + m * batch (the unbiased variance: m * bessel * biased), with tensor-tensor
        # adds only: a CPU tensor times a Python float first copies the float into a 0-dim tensor of the
        # tensor's dtype (an aten::copy_ per norm, 363 in a densenet121 step).
        torch._foreach_add_(rms, rms, alpha=-m)
        torch._foreach_add_(rms, means, alpha=m)
        torch._foreach_add_(rvs, rvs, alpha=-m)
        torch._foreach_add_(rvs, variances, alpha=m * bessel)
        return
    unbiased = [v * bessel for v in variances]
    for bn, rm, rv, mean, var in zip(norms, rms, rvs, means, unbiased):
        # momentum=None: cumulative moving average with factor 1/num_batches_tracked (a tensor, no sync).
        factor = bn.momentum if bn.momentum is not None else 1.0 / bn.num_batches_tracked.to(rm.dtype)
        rm.mul_(1.0 - factor).add_(mean * factor)
        rv.mul_(1.0 - factor).add_(var * factor)


def fusable_norms(norms: Iterable[nn.Module]) -> bool:
    """Whether every norm is an affine BatchNorm2d (or, all of them, BatchNorm3d, or all nn.SyncBatchNorm)
    with running statistics and one shared eps."""
    norms = list(norms)
    kinds = (nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    if not any(all(isinstance(bn, kind) for bn in norms) for kind in kinds):
        return False
    if not all(bn.affine and bn.track_running_stats for bn in norms):
        return False
    return len({bn.eps for bn in norms}) == 1
