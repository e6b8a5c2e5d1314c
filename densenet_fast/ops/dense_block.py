"""Python side of ``torch.ops.densenet_fast.dense_block_forward``: fake (meta) kernel and autograd.

The C++ kernels (csrc/cpu, csrc/cuda) implement the forward and the recompute-based backward; this
module makes the operator traceable by ``torch.compile`` and differentiable.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from densenet_fast._extension import load_extension

load_extension()
_ops = torch.ops.densenet_fast
_CL = torch.channels_last


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of BN parameters and statistics for an input dtype (float32 for float16/bfloat16)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _empty_cl(shape, like: Tensor) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=_CL)


@torch.library.register_fake("densenet_fast::dense_block_forward")
def _dense_block_forward_fake(input, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias,
                              conv2_weight, rm1, rv1, rm2, rv2, dropout_mask, drop_rate, training, eps):
    N, C0, H, W = input.shape
    L, k, inter = len(conv2_weight), conv2_weight[0].shape[0], conv1_weight[0].shape[0]
    Ct = C0 + L * k
    n_stats, sd = (Ct if training else 0), stats_dtype(input.dtype)
    return (_empty_cl((N, Ct, H, W), input), input.new_empty(n_stats, dtype=sd), input.new_empty(n_stats, dtype=sd),
            input.new_empty((L if training else 0, inter), dtype=sd),
            input.new_empty((L if training else 0, inter), dtype=sd))


@torch.library.register_fake("densenet_fast::dense_block_backward")
def _dense_block_backward_fake(grad_buffer, buffer, mean, var, mean2, var2, norm1_weight, norm1_bias,
                               conv1_weight, norm2_weight, norm2_bias, conv2_weight, rm1, rv1, rm2, rv2,
                               dropout_mask, drop_rate, training, eps, num_input_features):
    N, _, H, W = buffer.shape
    like = lambda ts: [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]  # noqa: E731
    # The kernel returns the 3x3 conv weight gradients as ATen's convolution_backward lays them out for a
    # channels_last input: channels_last (torch.compile asserts the real strides match these).
    like_cl = lambda ts: [torch.empty_like(t, memory_format=torch.channels_last) for t in ts]  # noqa: E731
    return (_empty_cl((N, num_input_features, H, W), buffer), like(norm1_weight), like(norm1_bias),
            like(conv1_weight), like(norm2_weight), like(norm2_bias), like_cl(conv2_weight))


_N_LISTS = 10  # tensor-list arguments of dense_block_forward


def _setup_context(ctx, inputs, output):
    (input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, drop_rate, training, eps) = inputs
    buffer, mean, var, mean2, var2 = output
    ctx.L = len(g1)
    ctx.n_running = len(rm1)
    ctx.num_input_features = input.shape[1]
    ctx.drop_rate, ctx.training, ctx.eps = drop_rate, training, eps
    ctx.has_mask = mask is not None
    extra = [mask] if mask is not None else []
    # Saved: the block buffer, the statistics, the parameters (and running stats in eval). The
    # running stats are not saved in training: they are updated in place after the forward.
    ctx.save_for_backward(buffer, mean, var, mean2, var2, *g1, *b1, *w1, *g2, *b2, *w2,
                          *rm1, *rv1, *rm2, *rv2, *extra)


def _backward(ctx, grad_buffer, _gm, _gv, _gm2, _gv2):
    saved = ctx.saved_tensors
    buffer, mean, var, mean2, var2 = saved[:5]
    L, R = ctx.L, ctx.n_running
    params = [list(saved[5 + i * L:5 + (i + 1) * L]) for i in range(6)]
    off = 5 + 6 * L
    running = [list(saved[off + i * R:off + (i + 1) * R]) for i in range(4)]
    mask = saved[-1] if ctx.has_mask else None
    if grad_buffer is None:
        grad_buffer = torch.zeros_like(buffer)
    grad_input, *grads = _ops.dense_block_backward(
        grad_buffer, buffer, mean, var, mean2, var2, *params, *running, mask, ctx.drop_rate,
        ctx.training, ctx.eps, ctx.num_input_features)
    no_grad_running = [[None] * R for _ in range(4)]  # running stats: no gradient
    return (grad_input, *grads, *no_grad_running, None, None, None, None)


torch.library.register_autograd("densenet_fast::dense_block_forward", _backward, setup_context=_setup_context)


class BlockParams(NamedTuple):
    """Per-layer tensors of a dense block, in layer order (lists of length L)."""

    norm1_weight: Sequence[Tensor]
    norm1_bias: Sequence[Tensor]
    conv1_weight: Sequence[Tensor]
    norm2_weight: Sequence[Tensor]
    norm2_bias: Sequence[Tensor]
    conv2_weight: Sequence[Tensor]
    norm1_running_mean: Sequence[Tensor]
    norm1_running_var: Sequence[Tensor]
    norm2_running_mean: Sequence[Tensor]
    norm2_running_var: Sequence[Tensor]


class BlockOutput(NamedTuple):
    """Result of :func:`fused_dense_block`.

    buffer: [N, C0 + L*k, H, W] (channels_last), the concatenation of the input and every layer's output.
    mean, var: [C0 + L*k] batch mean / biased variance of the buffer (training; empty in eval).
    mean2, var2: [L, bn_size*k] batch statistics of every layer's norm2 (training; empty in eval).
    """

    buffer: Tensor
    mean: Tensor
    var: Tensor
    mean2: Tensor
    var2: Tensor


def fused_dense_block(input: Tensor, params: BlockParams, *, training: bool, eps: float = 1e-5,
                drop_rate: float = 0.0, dropout_mask: Optional[Tensor] = None) -> BlockOutput:
    """Runs a whole dense block as one fused operator.

    Args:
        input: [N, C0, H, W] block input (any layout).
        params: the layers' parameters; running statistics are read only in eval.
        training: batch statistics (training) or running statistics (eval).
        drop_rate: dropout probability applied to each layer's new features (training only).
        dropout_mask: bool [N, L*k, H, W], True = keep; drawn here when None and dropout is active.
    """
    L = len(params.conv2_weight)
    if training and drop_rate > 0 and dropout_mask is None:
        N, _, H, W = input.shape
        k = params.conv2_weight[0].shape[0]
        dropout_mask = torch.empty((N, L * k, H, W), device=input.device).bernoulli_(1.0 - drop_rate).bool()
    if not (training and drop_rate > 0):
        dropout_mask, drop_rate = None, 0.0
    running = list(params[6:]) if not training else [[], [], [], []]
    out = _ops.dense_block_forward(input, *params[:6], *running, dropout_mask, float(drop_rate),
                                   bool(training), float(eps))
    return BlockOutput(*out)
