"""``torch.fx`` symbolic tracing of :class:`~densenet_fast.nn.fused_features.FusedFeatures` (docs/design.md §10).

Eager, ``FusedFeatures`` runs a stem (``conv0 -> norm0 -> relu0 -> pool0``) and the final norm with the head's
ReLU and global pool (``forward_pooled``) as fused operators, which round differently from the modules one by
one. A graph that ran the modules one by one would differ from eager by ~1 ulp; timm's model tests require
``torch.all(fx_out == out)``. So a traced graph calls the same computation as eager:

* the stem and the pooled head are one ``call_function`` node each (:func:`run_stem`, :func:`run_pooled_head`),
  taking the modules they read as ``get_attr`` nodes; at run time each makes eager's choice for the tensor it gets
  (fused operator where eager fuses, the modules one by one where eager does);
* dense blocks, transitions and SE modules stay single ``call_module`` nodes (their own leaf call,
  ``export_support.fx_leaf_call``); every other module is an ordinary ``call_module`` node.

Feature extraction (torchvision's ``create_feature_extractor``, timm's) names nodes by module path. In a graph
traced in eval mode the stem's and the final norm's own modules are also recorded, on a side branch that nothing
downstream reads: ``features.norm0``, ``features.pool0``, ``features.norm5``... stay extractable (with their own
modules' values, equal to the fused path's to float32 roundoff), and an extractor that does not return them
drops them. A graph traced in training mode records the stem and the final norm as their modules one by one,
as before (a side branch would update their running statistics a second time): its outputs equal eager's to
float32 roundoff, not bitwise.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

__all__ = ["trace_features", "run_stem", "run_pooled_head"]


def _plain(m: nn.Module, x: Tensor) -> Tensor:
    """One module as ``FusedFeatures`` runs it when nothing fuses: a SyncBatchNorm no fused operator reads
    synchronises here (also on CPU), anything else is called."""
    from densenet_fast.nn.fused_features import has_hooks
    from densenet_fast.nn.sync_batchnorm import sync_group, sync_input_problem, sync_reader

    group = sync_group([m]) if type(m) is nn.SyncBatchNorm and not has_hooks(m) else None
    if group is not None and sync_input_problem(x) is None:
        return sync_reader("bn", m, x, group)
    return m(x)


def run_stem(x: Tensor, conv: Optional[nn.Module], *span: nn.Module) -> Tensor:
    """``span`` (BN -> ReLU -> max-pool, or timm's BN+act -> max-pool) after ``conv`` (or alone), as eager
    ``FusedFeatures`` runs it on ``x``: the fused 3-D conv stem, conv0 in channels_last before the fused 2-D
    stem, the fused stem, or the modules one by one."""
    from densenet_fast.nn import fused_features as ff

    bn = span[0]
    if conv is not None:
        if isinstance(conv, nn.Conv3d) and ff.conv_stem_fusable(conv, bn, x):
            return ff.fused_conv_stem(conv, bn, x)
        if type(conv) is nn.Conv2d and x.dim() == 4 and x.device.type == "cpu":
            x = ff._conv0_channels_last(conv, x)
        else:
            x = conv(x)
    if ff._stem_can_fuse(bn, x):
        return ff.fused_stem(bn, x)
    for m in span:
        x = _plain(m, x)
    return x


def run_pooled_head(x: Tensor, norm: nn.Module, relu: bool, volume: bool) -> Tensor:
    """``flatten(adaptive_avg_pool(relu?(norm(x)), 1), 1)`` [N, C] as eager ``FusedFeatures.forward_pooled`` runs
    it: the fused norm + ReLU + pool operator where eager fuses, else the norm module, ReLU and pool."""
    from densenet_fast.nn.dense_block import fused_norm_relu_pool
    from densenet_fast.nn.fused_features import FusedFeatures

    if FusedFeatures._fuses_final_norm(norm, x, relu):
        return fused_norm_relu_pool(norm, x)
    out = _plain(norm, x)
    if relu:
        out = F.relu(out)
    if volume:
        return torch.flatten(F.adaptive_avg_pool3d(out, 1), 1)
    return torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1)


def _attr(tracer: fx.Tracer, m: nn.Module) -> fx.Proxy:
    # Not named after the module path: torchvision's NodePathTracer matches node names against module paths as
    # regular expressions ("features.conv0" would match a node "features_conv0").
    return tracer.create_proxy("get_attr", tracer.path_of_module(m), (), {}, name="dnf_module")


def trace_features(features: nn.Sequential, x: fx.Proxy, pool_relu: Optional[bool]) -> Tuple[fx.Proxy, bool]:
    """Records ``features`` (a FusedFeatures) on the tracer of ``x``: ``(output, pooled)`` as ``FusedFeatures._run``
    returns them (``pooled``: the output is the pooled head's [N, C])."""
    from densenet_fast.nn.fused_features import has_hooks, norm_relu_kind, stem_span

    tracer = x.tracer
    mods: List[nn.Module] = list(features._modules.values())
    volume = any(isinstance(m, (nn.Conv3d, nn.BatchNorm3d)) for m in mods)
    eval_graph = not features.training
    i = 0
    while i < len(mods):
        m, last = mods[i], i == len(mods) - 1
        has_conv = (type(m) in (nn.Conv2d, nn.Conv3d) and not has_hooks(m) and i + 1 < len(mods)
                    and stem_span(mods, i + 1) > 0)
        span = stem_span(mods, i + 1 if has_conv else i)
        if span and eval_graph:
            group = mods[i:i + int(has_conv) + span]
            out = tracer.create_proxy("call_function", run_stem,
                                      (x, _attr(tracer, m) if has_conv else None,
                                       *[_attr(tracer, s) for s in group[int(has_conv):]]), {})
            side = x
            for s in group:  # the modules' own values, for feature extraction
                side = s(side)
            x = out
            i += len(group)
            continue
        if (last and pool_relu is not None and eval_graph and not has_hooks(m)
                and (norm_relu_kind(m) == "bn_relu" or (norm_relu_kind(m) == "bn" and pool_relu))):
            m(x)  # the final norm's own value, for feature extraction
            return tracer.create_proxy("call_function", run_pooled_head, (x, _attr(tracer, m), pool_relu, volume),
                                       {}), True
        x = m(x)
        i += 1
    return x, False
