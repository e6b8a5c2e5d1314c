"""Fake kernels and autograd of the BN-ReLU readers that follow a dense block.

``transition_forward``: avg_pool2x2(conv1x1(relu(bn(x)))) -> [N, C_out, H//2, W//2] (channels_last); on
5-D input [N, C, D, H, W] the pool is 2x2x2 -> [N, C_out, D//2, H//2, W//2] (channels_last_3d);
``norm_relu_pool_forward``: mean over the spatial dimensions of relu(bn(x)) -> [N, C]. Both take the BN
statistics as inputs: with ``training=True`` these must be the batch statistics of ``x`` and the backward includes the
statistics' own gradient terms (``mean``/``var`` get no gradient); with ``training=False`` they are
running statistics (constants).
"""
from __future__ import annotations

import torch

from densenet_fast._extension import load_extension
from densenet_fast.ops.dense_block import _MAX_CHANNELS, _check, check_input_4d, check_tensor

load_extension()
_ops = torch.ops.densenet_fast


def _check_tail_args(input, mean, var, weight, bias, eps) -> None:
    """Python twin of ``dnf::check_tail_args`` (for the fake kernels)."""
    check_input_4d(input, "input", training=False)
    C = input.shape[1]
    for name, t in (("mean", mean), ("var", var), ("weight", weight), ("bias", bias)):
        check_tensor(t, name, input, [C], bn_tensor=True)
    _check(eps > 0.0, lambda: f"eps: expected a positive value, got {eps}")


def _check_transition_args(input, mean, var, weight, bias, conv_weight, eps) -> None:
    _check_tail_args(input, mean, var, weight, bias, eps)
    check_tensor(conv_weight, "conv_weight", input, None)
    C = input.shape[1]
    ones = ", ".join(["1"] * (input.dim() - 2))
    _check(conv_weight.dim() == input.dim() and conv_weight.shape[1] == C
           and all(s == 1 for s in conv_weight.shape[2:]), lambda: f"conv_weight: expected shape [C_out, {C}, "
           f"{ones}], got {list(conv_weight.shape)}")
    _check(1 <= conv_weight.shape[0] <= _MAX_CHANNELS, lambda: "conv_weight: expected between 1 and "
           f"{_MAX_CHANNELS} output channels, got shape {list(conv_weight.shape)}")
    if input.dim() == 5:
        D, H, W = input.shape[2:]
        _check(D >= 2 and H >= 2 and W >= 2, lambda: "input: the transition's 2x2x2 average pool needs D >= 2, "
               f"H >= 2 and W >= 2, got D={D}, H={H}, W={W}")
    _check(input.shape[-2] >= 2 and input.shape[-1] >= 2, lambda: "input: the transition's 2x2 average pool needs "
           f"H >= 2 and W >= 2, got H={input.shape[-2]}, W={input.shape[-1]}")


def _memory_format(x: torch.Tensor):
    return torch.channels_last_3d if x.dim() == 5 else torch.channels_last


def _pooled_shape(input: torch.Tensor, c_out: int) -> list:
    return [input.shape[0], c_out] + [s // 2 for s in input.shape[2:]]


@torch.library.register_fake("densenet_fast::transition_forward")
def _transition_forward_fake(input, mean, var, weight, bias, conv_weight, training, eps):
    _check_transition_args(input, mean, var, weight, bias, conv_weight, eps)
    return torch.empty(_pooled_shape(input, conv_weight.shape[0]), dtype=input.dtype, device=input.device,
                       memory_format=_memory_format(input))


@torch.library.register_fake("densenet_fast::transition_backward")
def _transition_backward_fake(grad_output, input, mean, var, weight, bias, conv_weight, training, eps):
    _check_transition_args(input, mean, var, weight, bias, conv_weight, eps)
    check_tensor(grad_output, "grad_output", input, _pooled_shape(input, conv_weight.shape[0]))
    return (torch.empty_like(input, memory_format=_memory_format(input)), torch.empty_like(weight),
            torch.empty_like(bias), torch.empty_like(conv_weight, memory_format=torch.contiguous_format))


@torch.library.register_fake("densenet_fast::norm_relu_pool_forward")
def _norm_relu_pool_forward_fake(input, mean, var, weight, bias, training, eps):
    _check_tail_args(input, mean, var, weight, bias, eps)
    return input.new_empty((input.shape[0], input.shape[1]))


@torch.library.register_fake("densenet_fast::norm_relu_pool_backward")
def _norm_relu_pool_backward_fake(grad_output, input, mean, var, weight, bias, training, eps):
    _check_tail_args(input, mean, var, weight, bias, eps)
    check_tensor(grad_output, "grad_output", input, [input.shape[0], input.shape[1]])
    return (torch.empty_like(input, memory_format=_memory_format(input)), torch.empty_like(weight),
            torch.empty_like(bias))


@torch.library.register_fake("densenet_fast::channel_moments")
def _channel_moments_fake(input):
    check_input_4d(input, "input", training=False)
    # BN statistics: float32 for float16/bfloat16 inputs, like every other BN tensor of the operators.
    sd = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
    return input.new_empty(input.shape[1], dtype=sd), input.new_empty(input.shape[1], dtype=sd)


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


# -- CPU bfloat16 inputs ------------------------------------------------------------------------------
# Under CPU bf16 autocast the fused block's buffer is bfloat16. The CPU tail kernels compute in float32,
# so these two ops run them on a transient float32 copy and save the bfloat16 input for the backward:
# the only saved tensor is the block buffer autograd already keeps, not a float32 twin of it.


@torch.library.custom_op("densenet_fast::transition_bf16", mutates_args=())
def transition_bf16(input: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, conv_weight: torch.Tensor, training: bool, eps: float) -> torch.Tensor:
    """``transition_forward`` of a bfloat16 input [N, C, (D,) H, W] with float32 BN and conv tensors; the
    output is bfloat16, as the 1x1 convolution's under autocast."""
    return _ops.transition_forward(input.float(), mean, var, weight, bias, conv_weight, training,
                                   eps).to(input.dtype)


@transition_bf16.register_fake
def _(input, mean, var, weight, bias, conv_weight, training, eps):
    return _ops.transition_forward(input.float(), mean, var, weight, bias, conv_weight, training,
                                   eps).to(input.dtype)


@torch.library.custom_op("densenet_fast::norm_relu_pool_bf16", mutates_args=())
def norm_relu_pool_bf16(input: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor, training: bool, eps: float) -> torch.Tensor:
    """``norm_relu_pool_forward`` of a bfloat16 input with float32 BN tensors -> bfloat16 [N, C]."""
    return _ops.norm_relu_pool_forward(input.float(), mean, var, weight, bias, training, eps).to(input.dtype)


@norm_relu_pool_bf16.register_fake
def _(input, mean, var, weight, bias, training, eps):
    return _ops.norm_relu_pool_forward(input.float(), mean, var, weight, bias, training, eps).to(input.dtype)


def _transition_bf16_backward(ctx, grad):
    input, *rest = ctx.saved_tensors
    gx, gw, gb, gc = _ops.transition_backward(grad.float(), input.float(), *rest, ctx.training, ctx.eps)
    return gx.to(input.dtype), None, None, gw, gb, gc, None, None


def _norm_relu_pool_bf16_backward(ctx, grad):
    input, *rest = ctx.saved_tensors
    gx, gw, gb = _ops.norm_relu_pool_backward(grad.float(), input.float(), *rest, ctx.training, ctx.eps)
    return gx.to(input.dtype), None, None, gw, gb, None, None


torch.library.register_autograd("densenet_fast::transition_bf16", _transition_bf16_backward, setup_context=_setup)
torch.library.register_autograd("densenet_fast::norm_relu_pool_bf16", _norm_relu_pool_bf16_backward,
                                setup_context=_setup)


def _cpu_bf16(input: torch.Tensor) -> bool:
    return input.device.type == "cpu" and input.dtype == torch.bfloat16


def transition(input: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor, conv_weight: torch.Tensor, *, training: bool, eps: float = 1e-5) -> torch.Tensor:
    """avg_pool(conv1x1(relu(batch_norm(input))), 2): [N, C, H, W] -> [N, C_out, H//2, W//2], or
    [N, C, D, H, W] -> [N, C_out, D//2, H//2, W//2]. A CPU bfloat16 input (float32 BN and conv tensors)
    computes in float32 and returns bfloat16."""
    if _cpu_bf16(input):
        return transition_bf16(input, mean, var, weight, bias, conv_weight, bool(training), float(eps))
    return _ops.transition_forward(input, mean, var, weight, bias, conv_weight, bool(training), float(eps))


def norm_relu_pool(input: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, *, training: bool, eps: float = 1e-5) -> torch.Tensor:
    """adaptive_avg_pool(relu(batch_norm(input)), 1).flatten(1): [N, C, (D,) H, W] -> [N, C]. A CPU
    bfloat16 input (float32 BN tensors) computes in float32 and returns bfloat16."""
    if _cpu_bf16(input):
        return norm_relu_pool_bf16(input, mean, var, weight, bias, bool(training), float(eps))
    return _ops.norm_relu_pool_forward(input, mean, var, weight, bias, bool(training), float(eps))


def channel_moments(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of [N, C, H, W] -> ([C], [C]); no gradient."""
    return _ops.channel_moments(input)
