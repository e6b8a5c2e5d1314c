"""Dense blocks whose norms are InstanceNorm (MONAI's ``norm="instance"``): when they run the fused operator.

``DenseBlock`` / ``ConcatDenseBlock`` call :func:`instance_block_problem` and :func:`instance_fused_forward` for a
block whose ``norm1``/``norm2`` are all ``nn.InstanceNorm2d`` / ``nn.InstanceNorm3d`` (docs/design.md §3,
"InstanceNorm blocks"). Fused: ``affine`` False or True (mixed too), no running statistics, one eps, ReLU or
LeakyReLU / PReLU activations, CPU float32 / float64 / bfloat16 (autocast), and CUDA where the extension was built
with its CUDA kernels (float32 / float64, float16 / bfloat16 under autocast or as a .half() / .bfloat16() model).
Everything else takes the reference path with a one-time warning that says why.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor, nn

from densenet_fast.ops import dense_block as _block_ops
from densenet_fast.ops import instance_block as _in_ops
from densenet_fast.ops.common import stats_dtype

_IN = nn.modules.instancenorm._InstanceNorm


def is_instance_block(units: List[nn.Module]) -> bool:
    """Whether every layer's norm1 and norm2 is an InstanceNorm (of any configuration)."""
    return len(units) > 0 and all(isinstance(getattr(u, n, None), _IN) for u in units for n in ("norm1", "norm2"))


def instance_norm_problem(norm: nn.Module, what: str, dims: int) -> Optional[str]:
    """Why one InstanceNorm is not what the fused block computes (None if it is)."""
    want = nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d
    if type(norm) is not want:
        return f"{what} is {type(norm).__name__}, not nn.{want.__name__}"
    if norm.track_running_stats:
        return (f"{what} is an InstanceNorm with track_running_stats=True (running statistics; the fused "
                "InstanceNorm block computes per-sample statistics only)")
    return None


def instance_layers_problem(units: List[nn.Module]) -> Optional[str]:
    """Why an InstanceNorm block's layers are not what the fused operator computes, whatever the input (None if
    they are; TorchScript copies decide this when scripted)."""
    from densenet_fast.nn.dense_block import block_activations, layer_drop_rate

    dims = units[0].conv1.weight.dim() - 2
    norms = [m for u in units for m in (u.norm1, u.norm2)]
    for i, u in enumerate(units):
        for name in ("norm1", "norm2"):
            p = instance_norm_problem(getattr(u, name), f"layer {i + 1} {name}", dims)
            if p:
                return p
    if len({m.eps for m in norms}) != 1:
        return "its InstanceNorms do not share one eps"
    if any(layer_drop_rate(u) > 0 for u in units):
        return "its layers use dropout, which the fused InstanceNorm block does not compute"
    acts = block_activations(units)
    if isinstance(acts, str):
        return acts
    return None


def instance_block_problem(units: List[nn.Module], x: Tensor) -> Optional[str]:
    """Why an InstanceNorm block cannot run the fused operator on ``x`` (None if it can)."""
    from densenet_fast.nn.dense_block import fused_device_ok

    problem = instance_layers_problem(units)
    if problem:
        return problem
    if not in_kernel_ok(x):
        return (f"its norms are InstanceNorm, which the {x.device.type} kernels do not fuse (CPU, and CUDA where "
                "the extension was built with CUDA; docs/medical.md)")
    if not fused_device_ok(x, block=True, dtype=_block_ops.cpu_autocast_dtype(x, "block")):
        return f"no fused kernel for {x.device.type} tensors of dtype {x.dtype}"
    return None


def in_kernel_ok(x: Tensor) -> bool:
    """Whether ``dense_block_in_forward`` has a kernel for ``x``'s device: CPU, and CUDA where the extension was built
    with its CUDA kernels."""
    return x.device.type == "cpu" or (x.device.type == "cuda" and torch._C._dispatch_has_kernel_for_dispatch_key(
        "densenet_fast::dense_block_in_forward", "CUDA"))


def _affine(norm: nn.Module, channels: int, dtype: torch.dtype, device: torch.device):
    """(weight, bias) of an InstanceNorm: its parameters, or ones and zeros for affine=False."""
    if norm.affine:
        return norm.weight, norm.bias
    return (torch.ones(channels, dtype=dtype, device=device), torch.zeros(channels, dtype=dtype, device=device))


def instance_fused_forward(units: List[nn.Module], x: Tensor) -> _in_ops.InstanceBlockOutput:
    """Runs an InstanceNorm block (``units``: the layers' norm1/conv1/norm2/conv2 holders) through
    ``dense_block_in_forward`` (CPU or CUDA); ``x`` [N, C0, (D,) H, W]. Nothing to update afterwards (no running
    statistics)."""
    from densenet_fast.nn.dense_block import _kernel_autocast, block_activations, block_slopes

    if x.device.type == "cpu":
        x = _block_ops.cpu_autocast_input(x, "block")
    sd = stats_dtype(x.dtype)
    n1 = [_affine(u.norm1, u.norm1.num_features, sd, x.device) for u in units]
    n2 = [_affine(u.norm2, u.norm2.num_features, sd, x.device) for u in units]
    bp = _block_ops.cast_block_params(_block_ops.BlockParams(
        [w for w, _ in n1], [b for _, b in n1], [u.conv1.weight for u in units],
        [w for w, _ in n2], [b for _, b in n2], [u.conv2.weight for u in units], [], [], [], []), x.dtype)
    params = _in_ops.InstanceBlockParams(*bp[:6])
    acts = block_activations(units)
    slopes = None if acts is None else block_slopes(units, acts, sd, x.device)
    with _kernel_autocast(x):
        return _in_ops.fused_instance_block(x, params, eps=units[0].norm1.eps, slopes=slopes)
