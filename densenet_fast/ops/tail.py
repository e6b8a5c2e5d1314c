"""Fake kernels and autograd of the BN-ReLU readers that follow a dense block.

``transition_forward``: avg_pool2x2(conv1x1(relu(bn(x)))) -> [N, C_out, H//2, W//2] (channels_last);
``norm_relu_pool_forward``: mean_hw(relu(bn(x))) -> [N, C]. Both take the BN statistics as inputs:
with ``training=True`` these must be the batch statistics of ``x`` and the backward includes the
statistics' own gradient terms (``mean``/``var`` get no gradient); with ``training=False`` they are
running statistics (constants).
"""
from __future__ import annotations

import torch

from densenet_fast._extension import load_extension

load_extension()
_ops = torch.ops.densenet_fast


@torch.library.register_fake("densenet_fast::transition_forward")
def _transition_forward_fake(input, mean, var, weight, bias, conv_weight, training, eps):
    N, _, H, W = input.shape
    return torch.empty((N, conv_weight.shape[0], H // 2, W // 2), dtype=input.dtype, device=input.device,
                       memory_format=torch.channels_last)


@torch.library.register_fake("densenet_fast::transition_backward")
def _transition_backward_fake(grad_output, input, mean, var, weight, bias, conv_weight, training, eps):
    return (torch.empty_like(input, memory_format=torch.channels_last), torch.empty_like(weight),
            torch.empty_like(bias), torch.empty_like(conv_weight, memory_format=torch.contiguous_format))


@torch.library.register_fake("densenet_fast::norm_relu_pool_forward")
def _norm_relu_pool_forward_fake(input, mean, var, weight, bias, training, eps):
    return input.new_empty((input.shape[0], input.shape[1]))


@torch.library.register_fake("densenet_fast::norm_relu_pool_backward")
def _norm_relu_pool_backward_fake(grad_output, input, mean, var, weight, bias, training, eps):
    return (torch.empty_like(input, memory_format=torch.channels_last), torch.empty_like(weight),
            torch.empty_like(bias))


@torch.library.register_fake("densenet_fast::channel_moments")
def _channel_moments_fake(input):
    return input.new_empty(input.shape[1]), input.new_empty(input.shape[1])


def _setup(ctx, inputs, output):
    *tensors, training, eps = inputs
    ctx.training, ctx.eps = training, eps
    ctx.save_for_backward(*tensors)


def _transition_backward(ctx, grad):
    gx, gw, gb, gc = _ops.transition_backward(grad, *ctx.saved_tensors, ctx.training, ctx.eps)
    return gx, None, None, gw, gb, gc, None, None


def _norm_relu_pool_backward(ctx, grad):
    gx, gw, gb = _ops.norm_relu_pool_backward(grad, *ctx.saved_tensors, ctx.training, ctx.eps)
    return gx, None, None, gw, gb, None, None


torch.library.register_autograd("densenet_fast::transition_forward", _transition_backward, setup_context=_setup)
torch.library.register_autograd("densenet_fast::norm_relu_pool_forward", _norm_relu_pool_backward,
                                setup_context=_setup)


def transition(input: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor, conv_weight: torch.Tensor, *, training: bool, eps: float = 1e-5) -> torch.Tensor:
    """avg_pool2d(conv1x1(relu(batch_norm(input))), 2): [N, C, H, W] -> [N, C_out, H//2, W//2]."""
    return _ops.transition_forward(input, mean, var, weight, bias, conv_weight, bool(training), float(eps))


def norm_relu_pool(input: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, *, training: bool, eps: float = 1e-5) -> torch.Tensor:
    """adaptive_avg_pool2d(relu(batch_norm(input)), 1).flatten(1): [N, C, H, W] -> [N, C]."""
    return _ops.norm_relu_pool_forward(input, mean, var, weight, bias, bool(training), float(eps))


def channel_moments(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of [N, C, H, W] -> ([C], [C]); no gradient."""
    return _ops.channel_moments(input)
