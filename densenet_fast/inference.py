"""``fold_for_inference``: an eval-only copy of a DenseNet with BatchNorms folded into convolutions.

A BatchNorm in eval mode is a per-channel affine map ``y = a*x + b``. It folds exactly into the
convolution *before* it (``W' = a*W``, ``bias' = b``), never into a convolution after a ReLU. So:

* each dense layer's ``norm2`` folds into ``conv1`` (conv1 -> norm2 -> ReLU): conv1 gets a bias,
  norm2 becomes ``nn.Identity`` (timm's ``BatchNormAct2d`` becomes its ReLU);
* the stem's ``norm0`` folds into ``conv0`` (conv0 -> norm0 -> ReLU);
* ``norm1`` of every layer, the transitions' norm and the final norm come *before* a ReLU: they stay.

The folded dense blocks run the plain per-layer PyTorch path (``impl="reference"``; the fused
operator takes BN2 as an argument and applies it in the GEMM epilogue, where folding saves nothing),
transitions and the final norm keep their fused operators. This is the graph to hand to runtimes
that have no fused kernels (``torch.onnx.export``, ``torch.export`` for other backends, other devices).
On CPU the unfolded fused model is faster in eager mode (see the README's Deployment section).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from densenet_fast.nn.dense_block import DenseBlock
from densenet_fast.nn.fused_features import norm_relu_kind

__all__ = ["fold_for_inference", "fold_bn_into_conv"]


@torch.no_grad()
def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new ``nn.Conv2d`` computing ``bn(conv(x))`` with ``bn``'s running statistics (eval mode)."""
    if conv.out_channels != bn.num_features:
        raise ValueError(f"bn: expected {conv.out_channels} features (conv's output channels), got {bn.num_features}")
    if not (bn.affine and bn.track_running_stats):
        raise ValueError(f"bn: expected an affine BatchNorm with running statistics, got {bn}")
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                       conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                       device=conv.weight.device, dtype=conv.weight.dtype)
    folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1).to(conv.weight.dtype))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded.bias.copy_((bn.bias + (bias - bn.running_mean) * scale).to(conv.weight.dtype))
    return folded.eval()


def _folded_norm(bn: nn.Module) -> nn.Module:
    """What replaces a folded norm: nothing (plain BN) or its own activation (timm BatchNormAct2d)."""
    return bn.act if norm_relu_kind(bn) == "bn_relu" else nn.Identity()


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and norm_relu_kind(bn) is not None
            and conv.out_channels == bn.num_features and not isinstance(bn, nn.SyncBatchNorm))


def fold_for_inference(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Returns ``model`` (a densenet_fast model, or a torchvision/timm DenseNet, converted or not) in eval
    mode with every exactly foldable BatchNorm folded into the convolution before it (see the module
    docstring): dense layers' ``conv1 + norm2`` and the stem's ``conv0 + norm0``.

    ``inplace=False`` (default) folds a deep copy and leaves ``model`` as it is. The result is for
    inference only: its folded parts have no BatchNorm left to train. Input/output: as ``model``'s.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    for block in [m for m in model.modules() if isinstance(m, DenseBlock) or type(m).__name__ in
                  ("_DenseBlock", "DenseBlock")]:
        folded_any = False
        for layer in block.children():
            conv1, norm2 = getattr(layer, "conv1", None), getattr(layer, "norm2", None)
            if _foldable(conv1, norm2):
                layer.conv1, layer.norm2 = fold_bn_into_conv(conv1, norm2), _folded_norm(norm2)
                folded_any = True
        if folded_any and isinstance(block, DenseBlock):
            block.impl = "reference"  # its fused operator needs norm2 (documented rule: no warning)
    features = getattr(model, "features", None)
    if isinstance(features, nn.Sequential):
        conv0, norm0 = getattr(features, "conv0", None), getattr(features, "norm0", None)
        if _foldable(conv0, norm0):
            features.conv0, features.norm0 = fold_bn_into_conv(conv0, norm0), _folded_norm(norm0)
    return model
