"""Runs a DenseNet ``features`` Sequential with every dense block, transition and the final norm fused.

A fused block hands its buffer *and its batch statistics* to the reader that follows it (the
transition, or the final norm + ReLU + global pool), so no BN/ReLU output is stored anywhere
outside the stem and every channel's statistics are computed once.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_fast.nn.batchnorm_stats import fusable_norms
from densenet_fast.nn.dense_block import (DenseBlock, Transition, _autocast_dtype_fix, _fused_device_ok,
                                          fused_norm_relu_pool)
from densenet_fast.ops.dense_block import BlockOutput


def _final_norm_can_fuse(x: Tensor) -> bool:
    return x.dim() == 4 and _fused_device_ok(_autocast_dtype_fix(x))


def features_to_pooled(features: nn.Sequential, x: Tensor) -> Tensor:
    """``flatten(adaptive_avg_pool2d(relu(features(x)), 1))`` -> [N, C], fusing where possible.

    ``features``: torchvision-style Sequential (stem modules, ``DenseBlock``/``Transition`` pairs, and a
    final ``BatchNorm2d``). Modules that are not fusable run unchanged.
    """
    mods = list(features.children())
    pending: Optional[BlockOutput] = None  # a fused block's output not yet consumed
    for i, m in enumerate(mods):
        if pending is not None:
            last = i == len(mods) - 1
            if isinstance(m, Transition) and m.can_fuse(pending.buffer):
                x, pending = m.fused_forward(pending.buffer, pending.mean, pending.var), None
                continue
            if last and type(m) is nn.BatchNorm2d and fusable_norms([m]) and m.training == bool(pending.mean.numel()):
                return fused_norm_relu_pool(m, pending.buffer, pending.mean, pending.var)
            x, pending = pending.buffer, None
        if isinstance(m, DenseBlock) and m.can_fuse(x):
            pending = m.fused_forward(x)
            continue
        if i == len(mods) - 1 and type(m) is nn.BatchNorm2d and fusable_norms([m]) and _final_norm_can_fuse(x):
            # No block statistics to reuse (e.g. an SE gate ran in between): the fused reader computes them.
            return fused_norm_relu_pool(m, x)
        x = m(x)
    if pending is not None:
        x = pending.buffer
    return torch.flatten(F.adaptive_avg_pool2d(F.relu(x), (1, 1)), 1)
