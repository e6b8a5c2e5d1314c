"""``densenet_fast::bn_relu_maxpool``: a DenseNet stem's BN -> ReLU -> 3x3/2 max-pool as one operator.

Saves only its input (the stem convolution's output) and the BN statistics; the backward recomputes
the BN/ReLU output and the pooling argmax. torchvision stores the BN output and the int64 pooling
indices besides, 1.5x the conv output. Composite of ATen ops, so it runs on every device; with
``training=True`` ``mean``/``var`` must be the batch statistics of ``input`` (the backward then
includes their gradient terms and ``mean``/``var`` get none).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_K, _S, _P = [3, 3], [2, 2], [1, 1]


def _bn_relu(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    # Eval-mode batch_norm with the given statistics computes exactly what training-mode BN computes
    # from the same batch statistics. The parameters take the statistics' dtype: a .half() model's
    # weights with its float32 batch statistics is batch_norm's mixed-dtype case (BN in float32).
    return torch.relu(F.batch_norm(input, mean, var, weight.to(mean.dtype), bias.to(mean.dtype), False, 0.0, eps))


@torch.library.custom_op("densenet_fast::bn_relu_maxpool", mutates_args=())
def bn_relu_maxpool(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, training: bool,
                    eps: float) -> Tensor:
    """max_pool2d(relu(batch_norm(input)), 3, 2, 1): [N, C, H, W] -> [N, C, (H-1)//2+1, (W-1)//2+1]."""
    return F.max_pool2d(_bn_relu(input, mean, var, weight, bias, eps), _K, _S, _P)


@bn_relu_maxpool.register_fake
def _(input, mean, var, weight, bias, training, eps):
    return F.max_pool2d(_bn_relu(input, mean, var, weight, bias, eps), _K, _S, _P)


def _setup(ctx, inputs, output):
    input, mean, var, weight, bias, training, eps = inputs
    ctx.training, ctx.eps = training, eps
    ctx.save_for_backward(input, mean, var, weight, bias)


def bn_relu_maxpool_backward(grad: Tensor, input: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
                             training: bool, eps: float):
    """(grad_input, grad_weight, grad_bias) of :func:`bn_relu_maxpool`; recomputes the BN-ReLU output and
    the pooling argmax. ``training=False``: the statistics are constants (dx = a·dz)."""
    u = _bn_relu(input, mean, var, weight, bias, eps)  # recomputed, never stored
    _, idx = torch.ops.aten.max_pool2d_with_indices(u, _K, _S, _P, [1, 1], False)
    du = torch.ops.aten.max_pool2d_with_indices_backward(grad, u, _K, _S, _P, [1, 1], False, idx)
    dz = torch.ops.aten.threshold_backward(du, u, 0)
    w = weight.to(mean.dtype)  # as in _bn_relu; the gradients go back in the parameters' dtype
    if training:
        invstd = torch.rsqrt(var + eps)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(dz, input, w, None, None, mean, invstd, True,
                                                               eps, [True, True, True])
    else:
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(dz, input, w, mean, var, None, None, False,
                                                               eps, [True, True, True])
    return dx, dw.to(weight.dtype), db.to(bias.dtype)


def _backward(ctx, grad):
    input, mean, var, weight, bias = ctx.saved_tensors
    dx, dw, db = bn_relu_maxpool_backward(grad, input, mean, var, weight, bias, ctx.training, ctx.eps)
    return dx, None, None, dw, db, None, None


bn_relu_maxpool.register_autograd(_backward, setup_context=_setup)
