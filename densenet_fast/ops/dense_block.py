"""Python side of ``torch.ops.densenet_fast.dense_block_forward``: fake (meta) kernels and the entry point.

The C++ kernels (csrc/cpu, csrc/cuda) implement the forward and the recompute-based backward, and its
autograd (csrc/autograd/dense_block_autograd.cpp: the in-place backward on a handed-over gradient, the
double-backward error); this module makes the operator traceable by ``torch.compile`` and ``torch.export``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from densenet_fast._extension import load_extension
from densenet_fast.ops.common import check_devices, check_rank, empty_cl, stats_dtype

load_extension()
_ops = torch.ops.densenet_fast


def check_dense_block_args(input: Tensor, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias,
                           conv2_weight, norm1_running_mean, norm1_running_var, norm2_running_mean,
                           norm2_running_var, dropout_mask: Optional[Tensor], drop_rate: float, training: bool,
                           eps: float) -> None:
    """Validates ``dense_block_forward``'s arguments with the operator's own C++ checks (csrc/common/checks.h),
    for a Python entry point that does not call the operator itself (the synchronised block)."""
    _ops.check_dense_block_args(input, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias,
                                conv2_weight, norm1_running_mean, norm1_running_var, norm2_running_mean,
                                norm2_running_var, dropout_mask, float(drop_rate), bool(training), float(eps))


# -- fake (meta) kernels: output shapes only (docs/design.md §6; the C++ kernels validate) -----------------
def _block_geometry(input: Tensor, norm1_weight, conv1_weight, conv2_weight) -> tuple:
    """(L, k, inter) of a block, from what the output shapes need: L from norm1_weight, growth rate k and
    bottleneck width inter from the first layer's conv weights (of the input's rank)."""
    check_rank(input)
    L = len(norm1_weight)
    torch._check(L >= 1, lambda: "norm1_weight: expected at least one layer, got an empty list")
    for name, lst in (("conv1_weight", conv1_weight), ("conv2_weight", conv2_weight)):
        torch._check(len(lst) == L,
                     lambda: f"{name}: expected {L} tensors (one per layer, from norm1_weight), got {len(lst)}")
    k3, k1 = ", ".join(["3"] * (input.dim() - 2)), ", ".join(["1"] * (input.dim() - 2))
    torch._check(conv2_weight[0].dim() == input.dim(), lambda: f"conv2_weight[0]: expected a {input.dim()}-D "
                 f"weight [k, inter, {k3}] for a {input.dim()}-D input, got shape {list(conv2_weight[0].shape)}")
    torch._check(conv1_weight[0].dim() == input.dim(), lambda: f"conv1_weight[0]: expected a {input.dim()}-D "
                 f"weight [inter, C0, {k1}] for a {input.dim()}-D input, got shape {list(conv1_weight[0].shape)}")
    return L, conv2_weight[0].shape[0], conv1_weight[0].shape[0]


@torch.library.register_fake("densenet_fast::dense_block_forward")
def _dense_block_forward_fake(input, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias,
                              conv2_weight, rm1, rv1, rm2, rv2, dropout_mask, drop_rate, training, eps):
    L, k, inter = _block_geometry(input, norm1_weight, conv1_weight, conv2_weight)
    check_devices(input, dict(norm1_weight=norm1_weight, norm1_bias=norm1_bias, conv1_weight=conv1_weight,
                              norm2_weight=norm2_weight, norm2_bias=norm2_bias, conv2_weight=conv2_weight,
                              norm1_running_mean=rm1, norm1_running_var=rv1, norm2_running_mean=rm2,
                              norm2_running_var=rv2, dropout_mask=dropout_mask))
    N, C0 = input.shape[:2]
    (n_stats, n_layers), sd = ((C0 + L * k, L) if training else (0, 0)), stats_dtype(input.dtype)
    return (empty_cl((N, C0 + L * k, *input.shape[2:]), input), input.new_empty(n_stats, dtype=sd),
            input.new_empty(n_stats, dtype=sd), input.new_empty((n_layers, inter), dtype=sd),
            input.new_empty((n_layers, inter), dtype=sd))


@torch.library.register_fake("densenet_fast::dense_block_act_forward")
def _dense_block_act_forward_fake(input, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias,
                                  conv2_weight, rm1, rv1, rm2, rv2, dropout_mask, drop_rate, training, eps, slopes):
    L, k, inter = _block_geometry(input, norm1_weight, conv1_weight, conv2_weight)
    C0 = input.shape[1]
    want = L * (C0 + inter) + k * L * (L - 1) // 2
    torch._check(slopes.dim() == 1 and slopes.shape[0] == want,
                 lambda: f"slopes: expected shape [{want}] (per layer: C0 + l*growth_rate slopes of norm1's "
                 f"activation, then bn_size*growth_rate of norm2's), got {list(slopes.shape)}")
    check_devices(input, dict(slopes=slopes))
    return _dense_block_forward_fake(input, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias,
                                     conv2_weight, rm1, rv1, rm2, rv2, dropout_mask, drop_rate, training, eps)


@torch.library.register_fake("densenet_fast::bn_relu_conv1x1")
def _bn_relu_conv1x1_fake(input, scale, shift, weight):
    check_rank(input)
    check_devices(input, dict(scale=scale, shift=shift, weight=weight))
    torch._check(weight.shape[0] > 0, lambda: "weight: expected at least one output channel (as torch's convolution), "
                 f"got shape {list(weight.shape)}")
    return empty_cl([input.shape[0], weight.shape[0], *input.shape[2:]], input, input.dtype)


@torch.library.register_fake("densenet_fast::dense_block_backward")
def _dense_block_backward_fake(grad_buffer, buffer, mean, var, mean2, var2, norm1_weight, norm1_bias,
                               conv1_weight, norm2_weight, norm2_bias, conv2_weight, rm1, rv1, rm2, rv2,
                               dropout_mask, drop_rate, training, eps, num_input_features):
    check_rank(buffer, "buffer")
    # The input gradient's shape: [N, num_input_features, ...] of the buffer.
    torch._check(1 <= num_input_features < buffer.shape[1], lambda: "num_input_features: expected a value in "
                 f"[1, {buffer.shape[1]}), got {num_input_features}")
    check_devices(buffer, dict(grad_buffer=grad_buffer, mean=mean, var=var, mean2=mean2, var2=var2,
                               norm1_weight=norm1_weight, norm1_bias=norm1_bias, conv1_weight=conv1_weight,
                               norm2_weight=norm2_weight, norm2_bias=norm2_bias, conv2_weight=conv2_weight,
                               norm1_running_mean=rm1, norm1_running_var=rv1, norm2_running_mean=rm2,
                               norm2_running_var=rv2, dropout_mask=dropout_mask))
    like = lambda ts: [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]  # noqa: E731
    # Every backend returns contiguous weight gradients (torch.compile asserts the real strides match).
    return (empty_cl((buffer.shape[0], num_input_features, *buffer.shape[2:]), buffer), like(norm1_weight),
            like(norm1_bias), like(conv1_weight), like(norm2_weight), like(norm2_bias), like(conv2_weight))


torch.library.register_fake("densenet_fast::dense_block_backward_inplace")(_dense_block_backward_fake)


@torch.library.register_fake("densenet_fast::dense_block_act_backward")
def _dense_block_act_backward_fake(grad_buffer, buffer, mean, var, mean2, var2, norm1_weight, norm1_bias,
                                   conv1_weight, norm2_weight, norm2_bias, conv2_weight, rm1, rv1, rm2, rv2,
                                   dropout_mask, drop_rate, training, eps, num_input_features, slopes):
    check_devices(buffer, dict(slopes=slopes))
    return (*_dense_block_backward_fake(grad_buffer, buffer, mean, var, mean2, var2, norm1_weight, norm1_bias,
                                        conv1_weight, norm2_weight, norm2_bias, conv2_weight, rm1, rv1, rm2, rv2,
                                        dropout_mask, drop_rate, training, eps, num_input_features),
            torch.empty_like(slopes, memory_format=torch.contiguous_format))


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

    buffer: [N, C0 + L*k, (D,) H, W] (channels_last / channels_last_3d), the concatenation of the input and
        every layer's output.
    mean, var: [C0 + L*k] batch mean / biased variance of the buffer (training; empty in eval).
    mean2, var2: [L, bn_size*k] batch statistics of every layer's norm2 (training; empty in eval).
    """

    buffer: Tensor
    mean: Tensor
    var: Tensor
    mean2: Tensor
    var2: Tensor


def cpu_autocast_dtype(x: Tensor, rule: str) -> torch.dtype:
    """The dtype a CPU fused operator computes in under ``torch.autocast("cpu")``, for input ``x``.

    One table for every fused CPU operator (docs/design.md §7); outside autocast, for float64 and for non-CPU
    inputs it is ``x.dtype``:

    * ``"block"`` (the dense block): bfloat16 under bf16 autocast (bf16 buffer and GEMM operands, fp32
      accumulation and BN, as autocast runs convolutions in bf16); float32 under fp16 autocast (no fp16 CPU
      kernel: autocast's fp16 CPU convolutions are slow reference kernels, so the block keeps fp32).
    * ``"tail"`` (transition, final norm): a bfloat16 input (a block's buffer) stays bfloat16: the operator
      reads it and writes its gradient in bfloat16 with fp32 BN math, and autograd saves the bf16 buffer it
      keeps anyway; float16 -> float32.
    * ``"float32"`` (the other readers, e.g. the stem): bfloat16 and float16 -> float32.
    """
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return x.dtype
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return x.dtype
    if rule == "block":
        return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else torch.float32
    if rule == "tail":
        return torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    if rule == "float32":
        return torch.float32
    raise ValueError(f"rule: expected 'block', 'tail' or 'float32', got {rule!r}")


def cpu_autocast_input(x: Tensor, rule: str) -> Tensor:
    """x cast to :func:`cpu_autocast_dtype` (x itself where it has that dtype). Checks that only need the dtype
    call :func:`cpu_autocast_dtype`: a cast copies the whole tensor."""
    target = cpu_autocast_dtype(x, rule)
    return x if x.dtype == target else x.to(target)


def cast_block_params(params: "BlockParams", dtype: torch.dtype) -> "BlockParams":
    """params with conv weights in ``dtype`` and every BN tensor in ``stats_dtype(dtype)`` (autocast's rule),
    for the CPU block.

    Differentiable (``Tensor.to``), and free where a tensor already has its dtype: a ``.bfloat16()`` model's
    BN tensors are read in fp32. float32 master weights of a bfloat16 block stay float32: the CPU kernels cast
    them layer by layer, so autograd saves no bfloat16 copy of every weight (torchvision under autocast
    saves one per convolution) and the 1x1 weight gradients come out of the GEMM in fp32.
    """
    sd = stats_dtype(dtype)
    master = dtype == torch.bfloat16
    conv = lambda ts: [t if master and t.dtype == torch.float32 else t.to(dtype) for t in ts]  # noqa: E731
    bn = lambda ts: [t.to(sd) for t in ts]  # noqa: E731
    p = params
    return BlockParams(bn(p.norm1_weight), bn(p.norm1_bias), conv(p.conv1_weight), bn(p.norm2_weight),
                       bn(p.norm2_bias), conv(p.conv2_weight), bn(p.norm1_running_mean), bn(p.norm1_running_var),
                       bn(p.norm2_running_mean), bn(p.norm2_running_var))


def pack_slopes(slope1: Sequence[Tensor], slope2: Sequence[Tensor]) -> Tensor:
    """The ``slopes`` argument of ``dense_block_act_forward``: per layer, the slopes of the activation after
    norm1 (``[C0 + l*k]``) then after norm2 (``[bn_size*k]``), concatenated (differentiable: a PReLU weight
    expanded to its channels gets the sum of their gradients)."""
    return torch.cat([t for pair in zip(slope1, slope2) for t in pair])


def fused_dense_block(input: Tensor, params: BlockParams, *, training: bool, eps: float = 1e-5,
                drop_rate: float = 0.0, dropout_mask: Optional[Tensor] = None,
                slopes: Optional[Tensor] = None) -> BlockOutput:
    """Runs a whole dense block as one fused operator.

    Args:
        input: [N, C0, H, W] or [N, C0, D, H, W] block input (any layout).
        params: the layers' parameters; running statistics are read only in eval.
        training: batch statistics (training) or running statistics (eval).
        drop_rate: dropout probability applied to each layer's new features (training only).
        dropout_mask: bool [N, L*k, (D,) H, W], True = keep; drawn here when None and dropout is active.

    Every argument is validated by the operator (RuntimeError naming the argument, the expected and the
    actual value; ValueError for a single value per channel in training, as ``nn.BatchNorm2d``), drop_rate
    in eval too. ``slopes`` (:func:`pack_slopes`, BatchNorm dtype): the block's activations are LeakyReLU / PReLU
    with these per-channel slopes instead of ReLU (``dense_block_act_forward``; CPU and CUDA kernels). The
    operator is functional: it never writes to its arguments and its outputs are new tensors, so
    arguments may alias each other (e.g. the input sharing storage with a parameter).
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a Tensor, got {type(input).__name__}")
    if not isinstance(params, tuple) or len(params) != len(BlockParams._fields):
        raise TypeError(f"params: expected a BlockParams ({len(BlockParams._fields)} lists of per-layer tensors), "
                        f"got {type(params).__name__}")
    L = len(params.conv2_weight)
    dropout = training and 0.0 < drop_rate < 1.0  # an invalid drop_rate reaches the operator, which refuses it
    if dropout and dropout_mask is None and input.dim() in (4, 5) and L > 0:
        k = params.conv2_weight[0].shape[0]
        # channels_last, as the activations: the kernels read a mask by channel across threads (coalesced)
        layout = torch.channels_last if input.dim() == 4 else torch.channels_last_3d
        dropout_mask = torch.empty((input.shape[0], L * k, *input.shape[2:]), device=input.device,
                                   memory_format=layout).bernoulli_(1.0 - drop_rate).bool()
    if not dropout:
        dropout_mask = None  # the operator applies no dropout without a mask
    # The running statistics are passed in training too, where the operator ignores them: an AOTInductor package
    # of torch 2.14 hands an empty Tensor[] argument to the operator as None (docs/deployment.md).
    if slopes is not None:
        out = _ops.dense_block_act_forward(input, *params, dropout_mask, float(drop_rate), bool(training), float(eps),
                                           slopes)
    else:
        out = _ops.dense_block_forward(input, *params, dropout_mask, float(drop_rate), bool(training), float(eps))
    return BlockOutput(*out)
