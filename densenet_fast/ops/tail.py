"""Fake kernels and entry points of the BN-ReLU readers that follow a dense block.

``transition_forward``: avg_pool2x2(conv1x1(relu(bn(x)))) -> [N, C_out, H//2, W//2] (channels_last); on
5-D input [N, C, D, H, W] the pool is 2x2x2 -> [N, C_out, D//2, H//2, W//2] (channels_last_3d);
``norm_relu_pool_forward``: mean over the spatial dimensions of relu(bn(x)) -> [N, C]. Both take the BN
statistics as inputs: with ``training=True`` these must be the batch statistics of ``x`` and the backward includes the
statistics' own gradient terms (``mean``/``var`` get no gradient); with ``training=False`` they are
running statistics (constants).

Both take an optional SE gate ``gate [N, C]`` (docs/design.md §5): the BN input is then ``y = gate[n, c] * x``,
folded into the prologue (``relu((a*gate)*x + b)``), so ``y`` is never materialised; the statistics are those of
``y`` (:func:`gated_channel_moments`) and the backward returns the gate's gradient ``sum_hw x * dL/dy``.
``sample_moments`` gives the per-sample channel mean (the SE squeeze, differentiable) and variance of ``x``.

Their autograd is C++ (csrc/autograd/readers_autograd.cpp), the double-backward error included.
"""
from __future__ import annotations

from typing import Optional

import torch

from densenet_fast._extension import load_extension
from densenet_fast.ops.common import check_bn_reader, check_rank, cl_format, stats_dtype

load_extension()
_ops = torch.ops.densenet_fast


# -- fake (meta) kernels: output shapes only (docs/design.md §6; the C++ kernels validate) -----------------
def _gate_grad(input, gate):
    """The fake of the backward's ``grad_gate``: [N, C] in the gate's dtype, or an empty [0] when ungated."""
    if gate is None:
        return input.new_empty((0,))
    return gate.new_empty((input.shape[0], input.shape[1]))


def _transition_out_shape(input: torch.Tensor, conv_weight: torch.Tensor) -> list:
    C = input.shape[1]
    ones = ", ".join(["1"] * (input.dim() - 2))
    torch._check(conv_weight.dim() == input.dim(), lambda: f"conv_weight: expected shape [C_out, {C}, {ones}], "
                 f"got {list(conv_weight.shape)}")
    return [input.shape[0], conv_weight.shape[0]] + [s // 2 for s in input.shape[2:]]


@torch.library.register_fake("densenet_fast::transition_forward")
def _transition_forward_fake(input, mean, var, weight, bias, conv_weight, training, eps, gate=None):
    check_bn_reader(input, mean, var, weight, bias, gate=gate, conv_weight=conv_weight)
    return torch.empty(_transition_out_shape(input, conv_weight), dtype=input.dtype, device=input.device,
                       memory_format=cl_format(input))


@torch.library.register_fake("densenet_fast::transition_backward")
def _transition_backward_fake(grad_output, input, mean, var, weight, bias, conv_weight, training, eps, gate=None):
    check_bn_reader(input, mean, var, weight, bias, gate=gate, conv_weight=conv_weight, grad_output=grad_output)
    return (torch.empty_like(input, memory_format=cl_format(input)), torch.empty_like(weight),
            torch.empty_like(bias), torch.empty_like(conv_weight, memory_format=torch.contiguous_format),
            _gate_grad(input, gate))


@torch.library.register_fake("densenet_fast::norm_relu_pool_forward")
def _norm_relu_pool_forward_fake(input, mean, var, weight, bias, training, eps, gate=None):
    check_bn_reader(input, mean, var, weight, bias, gate=gate)
    return input.new_empty((input.shape[0], input.shape[1]))


@torch.library.register_fake("densenet_fast::norm_relu_pool_backward")
def _norm_relu_pool_backward_fake(grad_output, input, mean, var, weight, bias, training, eps, gate=None):
    check_bn_reader(input, mean, var, weight, bias, gate=gate, grad_output=grad_output)
    return (torch.empty_like(input, memory_format=cl_format(input)), torch.empty_like(weight),
            torch.empty_like(bias), _gate_grad(input, gate))


@torch.library.register_fake("densenet_fast::channel_moments")
def _channel_moments_fake(input):
    check_rank(input)
    sd = stats_dtype(input.dtype)
    return input.new_empty(input.shape[1], dtype=sd), input.new_empty(input.shape[1], dtype=sd)


@torch.library.register_fake("densenet_fast::sample_moments")
def _sample_moments_fake(input):
    check_rank(input)
    sd = stats_dtype(input.dtype)
    shape = (input.shape[0], input.shape[1])
    return input.new_empty(shape, dtype=sd), input.new_empty(shape, dtype=sd)


def _cpu_bf16(input: torch.Tensor) -> bool:
    return input.device.type == "cpu" and input.dtype == torch.bfloat16


def _refuse_cpu_bf16_gate(input: torch.Tensor, gate) -> None:
    if gate is not None and _cpu_bf16(input):
        raise ValueError("gate: a gated reader takes float32/float64 CPU input (or CUDA input); got a CPU bfloat16 "
                         "input (apply the SE gate before the reader under CPU bfloat16 autocast)")


def transition(input: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor, conv_weight: torch.Tensor, *, training: bool, eps: float = 1e-5,
               gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """avg_pool(conv1x1(relu(batch_norm(y))), 2) with ``y = gate[:, :, None, None] * input`` (``y = input``
    without a gate): [N, C, H, W] -> [N, C_out, H//2, W//2], or [N, C, D, H, W] -> [N, C_out, D//2, H//2, W//2].
    ``gate``: [N, C] (differentiable); mean/var are then the statistics of y. A CPU bfloat16 input (CPU
    autocast; float32 BN tensors and float32 master or bfloat16 conv weight, no gate) is read and its gradient
    written in bfloat16, with float32 BN math and accumulation; the output is bfloat16."""
    _refuse_cpu_bf16_gate(input, gate)
    return _ops.transition_forward(input, mean, var, weight, bias, conv_weight, bool(training), float(eps), gate)


def norm_relu_pool(input: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, *, training: bool, eps: float = 1e-5,
                   gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """adaptive_avg_pool(relu(batch_norm(y)), 1).flatten(1), ``y = gate[:, :, None, None] * input`` (or input):
    [N, C, (D,) H, W] -> [N, C]. A CPU bfloat16 input (float32 BN tensors, no gate) is read in bfloat16 with
    float32 BN math; the output is bfloat16."""
    _refuse_cpu_bf16_gate(input, gate)
    return _ops.norm_relu_pool_forward(input, mean, var, weight, bias, bool(training), float(eps), gate)


def channel_moments(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of [N, C, H, W] -> ([C], [C]); no gradient."""
    return _ops.channel_moments(input)


def sample_moments(input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and biased variance over the spatial positions: [N, C, (D,) H, W] ->
    ([N, C], [N, C]) in the BatchNorm dtype. The mean is the SE squeeze and is differentiable; the variance
    is not."""
    return _ops.sample_moments(input)


def gated_channel_moments(sample_mean: torch.Tensor, sample_var: torch.Tensor,
                          gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance [C] of ``y = gate[n, c] * x`` from the per-sample moments of x ([N, C]
    each, equal counts per sample): sample n of channel c has mean g*m and variance g^2*v, so
    ``mean = mean_n(g*m)`` and ``var = mean_n(g^2*v) + mean_n((g*m - mean)^2)`` (no cancellation). Computed
    in float64 on [N, C] values, returned in sample_mean's dtype; no gradient (the readers' backward
    includes the statistics' terms)."""
    with torch.no_grad():
        m, v, g = (t.detach().double() for t in (sample_mean, sample_var, gate))
        gm = g * m
        mean = gm.mean(0)
        var = (g * g * v).mean(0) + (gm - mean).square().mean(0)
    return mean.to(sample_mean.dtype), var.to(sample_mean.dtype)
