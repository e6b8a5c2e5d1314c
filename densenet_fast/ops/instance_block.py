"""Python side of ``torch.ops.densenet_fast.dense_block_in_forward`` (the InstanceNorm dense block): fake kernels and
the entry point.

The CPU kernels are in csrc/cpu/dense_block_in_cpu.cpp, the CUDA ones in csrc/cuda/dense_block_in_impl.h (an
AutocastCUDA kernel too), the autograd in csrc/autograd/dense_block_in_autograd.cpp (docs/design.md §3,
"InstanceNorm blocks").
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from densenet_fast._extension import load_extension
from densenet_fast.ops.common import check_devices, empty_cl, stats_dtype
from densenet_fast.ops.dense_block import _block_geometry

load_extension()
_ops = torch.ops.densenet_fast


def _check_slopes(input: Tensor, L: int, k: int, inter: int, slopes: Optional[Tensor]) -> None:
    if slopes is None:
        return
    C0 = input.shape[1]
    want = L * (C0 + inter) + k * L * (L - 1) // 2
    torch._check(slopes.dim() == 1 and slopes.shape[0] == want,
                 lambda: f"slopes: expected shape [{want}] (per layer: C0 + l*growth_rate slopes of norm1's "
                 f"activation, then bn_size*growth_rate of norm2's), got {list(slopes.shape)}")


@torch.library.register_fake("densenet_fast::dense_block_in_forward")
def _dense_block_in_forward_fake(input, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias,
                                 conv2_weight, eps, slopes=None):
    L, k, inter = _block_geometry(input, norm1_weight, conv1_weight, conv2_weight)
    check_devices(input, dict(norm1_weight=norm1_weight, norm1_bias=norm1_bias, conv1_weight=conv1_weight,
                              norm2_weight=norm2_weight, norm2_bias=norm2_bias, conv2_weight=conv2_weight,
                              slopes=slopes))
    _check_slopes(input, L, k, inter, slopes)
    N, C0 = input.shape[:2]
    sd = stats_dtype(input.dtype)
    return (empty_cl((N, C0 + L * k, *input.shape[2:]), input), input.new_empty((N, C0 + L * k), dtype=sd),
            input.new_empty((N, C0 + L * k), dtype=sd), input.new_empty((L, N, inter), dtype=sd),
            input.new_empty((L, N, inter), dtype=sd))


@torch.library.register_fake("densenet_fast::dense_block_in_backward")
def _dense_block_in_backward_fake(grad_buffer, buffer, mean, var, mean2, var2, norm1_weight, norm1_bias,
                                  conv1_weight, norm2_weight, norm2_bias, conv2_weight, eps, num_input_features,
                                  slopes=None):
    torch._check(1 <= num_input_features < buffer.shape[1], lambda: "num_input_features: expected a value in "
                 f"[1, {buffer.shape[1]}), got {num_input_features}")
    check_devices(buffer, dict(grad_buffer=grad_buffer, mean=mean, var=var, mean2=mean2, var2=var2,
                               norm1_weight=norm1_weight, norm1_bias=norm1_bias, conv1_weight=conv1_weight,
                               norm2_weight=norm2_weight, norm2_bias=norm2_bias, conv2_weight=conv2_weight,
                               slopes=slopes), "buffer")
    like = lambda ts: [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]  # noqa: E731
    grad_slopes = (torch.empty_like(slopes, memory_format=torch.contiguous_format) if slopes is not None
                   else buffer.new_empty(0, dtype=stats_dtype(buffer.dtype)))
    return (empty_cl((buffer.shape[0], num_input_features, *buffer.shape[2:]), buffer), like(norm1_weight),
            like(norm1_bias), like(conv1_weight), like(norm2_weight), like(norm2_bias), like(conv2_weight),
            grad_slopes)


class InstanceBlockParams(NamedTuple):
    """Per-layer tensors of an InstanceNorm dense block (lists of length L); an ``affine=False`` norm's weight and
    bias are ones and zeros."""

    norm1_weight: Sequence[Tensor]
    norm1_bias: Sequence[Tensor]
    conv1_weight: Sequence[Tensor]
    norm2_weight: Sequence[Tensor]
    norm2_bias: Sequence[Tensor]
    conv2_weight: Sequence[Tensor]


class InstanceBlockOutput(NamedTuple):
    """Result of :func:`fused_instance_block`.

    buffer: [N, C0 + L*k, (D,) H, W] (channels_last / channels_last_3d), the input and every layer's output.
    mean, var: [N, C0 + L*k] per-sample mean / biased variance of the buffer.
    mean2, var2: [L, N, bn_size*k] per-sample statistics of every layer's norm2.
    """

    buffer: Tensor
    mean: Tensor
    var: Tensor
    mean2: Tensor
    var2: Tensor


def fused_instance_block(input: Tensor, params: InstanceBlockParams, *, eps: float = 1e-5,
                         slopes: Optional[Tensor] = None) -> InstanceBlockOutput:
    """A whole dense block with InstanceNorm (no running statistics: train and eval compute the same) as one fused
    operator (CPU or CUDA): input [N, C0, (D,) H, W] -> :class:`InstanceBlockOutput`. ``slopes`` (``pack_slopes``):
    LeakyReLU / PReLU activations instead of ReLU. Arguments are validated by the operator (RuntimeError naming the
    argument, ValueError for a single spatial element, as ``F.instance_norm``)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a Tensor, got {type(input).__name__}")
    if not isinstance(params, tuple) or len(params) != len(InstanceBlockParams._fields):
        raise TypeError(f"params: expected an InstanceBlockParams ({len(InstanceBlockParams._fields)} lists of "
                        f"per-layer tensors), got {type(params).__name__}")
    return InstanceBlockOutput(*_ops.dense_block_in_forward(input, *params, float(eps), slopes))
