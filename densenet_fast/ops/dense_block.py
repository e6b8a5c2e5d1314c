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
    """channels_last (4-D) / channels_last_3d (5-D) tensor: a [rows, C] matrix."""
    fmt = torch.channels_last_3d if len(shape) == 5 else _CL
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


# -- argument validation of the fake (meta) kernels -------------------------------------------------
# The same checks, with the same argument names, as csrc/common/checks.h: a call with meta tensors, or
# one traced by torch.compile, fails like the real kernels instead of returning made-up shapes.
# Errors are RuntimeError (as TORCH_CHECK), except the BatchNorm batch-size rule (ValueError).
_MAX_CHANNELS = 2**31 - 1  # channel counts are GEMM dimensions of a 32-bit BLAS


def _check(cond, msg) -> None:
    torch._check(cond, msg)  # RuntimeError; defers to a runtime assert for symbolic sizes


def spatial_numel(t: Tensor):
    """H*W of [N, C, H, W], D*H*W of [N, C, D, H, W]."""
    n = 1
    for s in t.shape[2:]:
        n = n * s
    return n


def conv_weight_shape(out: int, inp: int, kernel: int, dims: int) -> list:
    """[out, in, kernel, kernel(, kernel)] for 2 (3) spatial dimensions."""
    return [out, inp] + [kernel] * dims


def check_input_4d(input: Tensor, name: str, training: bool) -> None:
    """A 4-D [N, C, H, W] or 5-D [N, C, D, H, W] activation (2 or 3 spatial dimensions)."""
    _check(input.dim() in (4, 5), lambda: f"{name}: expected a 4-D tensor [N, C, H, W] or a 5-D tensor "
           f"[N, C, D, H, W], got {input.dim()}-D with shape {list(input.shape)}")
    _check(input.dtype.is_floating_point, lambda: f"{name}: expected a floating-point dtype (float32, float64; "
           f"float16/bfloat16 on CUDA), got {input.dtype}")
    N, C = input.shape[:2]
    H, W = input.shape[-2:]
    depth = f"D={input.shape[2]}, " if input.dim() == 5 else ""
    _check(N > 0, lambda: f"{name}: expected a non-empty batch, got batch size 0 (shape {list(input.shape)})")
    _check(spatial_numel(input) > 0, lambda: f"{name}: expected a non-zero spatial size, got {depth}H={H}, W={W}")
    _check(C > 0, lambda: f"{name}: expected at least one channel, got 0")
    _check(C <= _MAX_CHANNELS, lambda: f"{name}: expected at most {_MAX_CHANNELS} channels (GEMM dimensions are "
           f"32-bit), got {C}")
    if training:
        torch._check_value(N * spatial_numel(input) > 1,
                           lambda: "Expected more than 1 value per channel when training, got "
                           f"input size {input.size()}")


def check_tensor(t: Tensor, name: str, ref: Tensor, shape, bn_tensor: bool = False) -> None:
    """dtype (the input's, or the BatchNorm dtype for it), device (the input's) and shape of an argument."""
    _check(isinstance(t, Tensor), lambda: f"{name}: expected a tensor, got {type(t).__name__}")
    want = stats_dtype(ref.dtype) if bn_tensor else ref.dtype
    # BN tensors may also have the input's own dtype (a .half()/.bfloat16() model; BN still computes in want).
    what = "(the BatchNorm dtype for input's dtype) or input's dtype" if bn_tensor else "(the dtype of input)"
    _check(t.dtype == want or (bn_tensor and t.dtype == ref.dtype),
           lambda: f"{name}: expected dtype {want} {what}, got {t.dtype}")
    _check(t.device == ref.device, lambda: f"{name}: expected a tensor on {ref.device} (the device of input), "
           f"got {t.device}")
    if shape is not None:
        _check(list(t.shape) == list(shape), lambda: f"{name}: expected shape {list(shape)}, got {list(t.shape)}")


def check_conv_weight(t: Tensor, name: str, ref: Tensor, shape) -> None:
    """A block's conv weight: the input's dtype, or float32 master weights for a CPU bfloat16 input."""
    master = ref.device.type == "cpu" and ref.dtype == torch.bfloat16 and isinstance(t, Tensor) and \
        t.dtype == torch.float32
    check_tensor(t, name, ref if not master else t, shape)
    _check(t.device == ref.device, lambda: f"{name}: expected a tensor on {ref.device} (the device of input), "
           f"got {t.device}")


def check_dense_block_args(input, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias, conv2_weight,
                           rm1, rv1, rm2, rv2, dropout_mask, drop_rate, training, eps):
    """Python twin of ``dnf::check_dense_block_args``; returns (L, k, inter)."""
    check_input_4d(input, "input", training)
    N, C0 = input.shape[:2]
    dims = input.dim() - 2
    k3, k1 = ", ".join(["3"] * dims), ", ".join(["1"] * dims)
    L = len(norm1_weight)
    _check(L >= 1, lambda: "norm1_weight: expected at least one layer, got an empty list")
    for name, lst in (("norm1_bias", norm1_bias), ("conv1_weight", conv1_weight), ("norm2_weight", norm2_weight),
                      ("norm2_bias", norm2_bias), ("conv2_weight", conv2_weight)):
        _check(len(lst) == L,
               lambda: f"{name}: expected {L} tensors (one per layer, from norm1_weight), got {len(lst)}")
    _check(conv2_weight[0].dim() == input.dim(), lambda: f"conv2_weight[0]: expected a {input.dim()}-D weight "
           f"[k, inter, {k3}] for a {input.dim()}-D input, got shape {list(conv2_weight[0].shape)}")
    _check(conv1_weight[0].dim() == input.dim(), lambda: f"conv1_weight[0]: expected a {input.dim()}-D weight "
           f"[inter, C0, {k1}] for a {input.dim()}-D input, got shape {list(conv1_weight[0].shape)}")
    k, inter = conv2_weight[0].shape[0], conv1_weight[0].shape[0]
    _check(k >= 1 and inter >= 1, lambda: "conv weights: expected growth_rate >= 1 and bn_size*growth_rate >= 1, "
           f"got k={k}, inter={inter}")
    _check(inter <= _MAX_CHANNELS, lambda: f"conv1_weight[0] (bn_size*growth_rate): expected at most "
           f"{_MAX_CHANNELS} channels (GEMM dimensions are 32-bit), got {inter}")
    _check(C0 + L * k <= _MAX_CHANNELS, lambda: f"input, conv2_weight: the block buffer would hold C0 + L*k = {C0} + "
           f"{L}*{k} channels, more than {_MAX_CHANNELS} (GEMM dimensions are 32-bit)")
    for li in range(L):
        c = C0 + li * k
        check_tensor(norm1_weight[li], f"norm1_weight[{li}]", input, [c], bn_tensor=True)
        check_tensor(norm1_bias[li], f"norm1_bias[{li}]", input, [c], bn_tensor=True)
        check_conv_weight(conv1_weight[li], f"conv1_weight[{li}]", input, conv_weight_shape(inter, c, 1, dims))
        check_tensor(norm2_weight[li], f"norm2_weight[{li}]", input, [inter], bn_tensor=True)
        check_tensor(norm2_bias[li], f"norm2_bias[{li}]", input, [inter], bn_tensor=True)
        check_conv_weight(conv2_weight[li], f"conv2_weight[{li}]", input, conv_weight_shape(k, inter, 3, dims))
    if not training:
        for name, lst in (("norm1_running_mean", rm1), ("norm1_running_var", rv1), ("norm2_running_mean", rm2),
                          ("norm2_running_var", rv2)):
            _check(len(lst) == L, lambda: f"{name}: expected {L} tensors (one per layer, from norm1_weight), "
                   f"got {len(lst)}")
            for li, t in enumerate(lst):
                check_tensor(t, f"{name}[{li}]", input, [C0 + li * k] if name.startswith("norm1") else [inter],
                             bn_tensor=True)
    _check(0.0 <= drop_rate < 1.0, lambda: f"drop_rate: expected a value in [0, 1), got {drop_rate}")
    _check(eps > 0.0, lambda: f"eps: expected a positive value, got {eps}")
    if dropout_mask is not None:
        _check(dropout_mask.dtype == torch.bool, lambda: f"dropout_mask: expected dtype torch.bool, got "
               f"{dropout_mask.dtype}")
        _check(dropout_mask.device == input.device, lambda: f"dropout_mask: expected a tensor on {input.device}, "
               f"got {dropout_mask.device}")
        mask_shape = [N, L * k, *input.shape[2:]]
        _check(list(dropout_mask.shape) == mask_shape, lambda: f"dropout_mask: expected shape "
               f"{mask_shape}, got {list(dropout_mask.shape)}")
    return L, k, inter


@torch.library.register_fake("densenet_fast::dense_block_forward")
def _dense_block_forward_fake(input, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias,
                              conv2_weight, rm1, rv1, rm2, rv2, dropout_mask, drop_rate, training, eps):
    L, k, inter = check_dense_block_args(input, norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias,
                                         conv2_weight, rm1, rv1, rm2, rv2, dropout_mask, drop_rate, training, eps)
    N, C0 = input.shape[:2]
    Ct = C0 + L * k
    n_stats, sd = (Ct if training else 0), stats_dtype(input.dtype)
    return (_empty_cl((N, Ct, *input.shape[2:]), input), input.new_empty(n_stats, dtype=sd),
            input.new_empty(n_stats, dtype=sd),
            input.new_empty((L if training else 0, inter), dtype=sd),
            input.new_empty((L if training else 0, inter), dtype=sd))


@torch.library.register_fake("densenet_fast::bn_relu_conv1x1")
def _bn_relu_conv1x1_fake(input, scale, shift, weight):
    shape = [input.shape[0], weight.shape[0], *input.shape[2:]]
    fmt = torch.channels_last_3d if input.dim() == 5 else _CL
    return torch.empty(shape, dtype=stats_dtype(input.dtype), device=input.device, memory_format=fmt)


@torch.library.register_fake("densenet_fast::dense_block_backward")
def _dense_block_backward_fake(grad_buffer, buffer, mean, var, mean2, var2, norm1_weight, norm1_bias,
                               conv1_weight, norm2_weight, norm2_bias, conv2_weight, rm1, rv1, rm2, rv2,
                               dropout_mask, drop_rate, training, eps, num_input_features):
    _check(buffer.dim() in (4, 5), lambda: f"buffer: expected a 4-D or 5-D tensor, got {buffer.dim()}-D")
    _check(1 <= num_input_features < buffer.shape[1], lambda: f"num_input_features: expected a value in [1, "
           f"{buffer.shape[1]}), got {num_input_features}")
    L, k, inter = check_dense_block_args(buffer.narrow(1, 0, num_input_features), norm1_weight, norm1_bias,
                                         conv1_weight, norm2_weight, norm2_bias, conv2_weight, rm1, rv1, rm2, rv2,
                                         dropout_mask, drop_rate, training, eps)
    Ct = num_input_features + L * k
    _check(buffer.shape[1] == Ct, lambda: f"buffer: expected {Ct} channels (C0 + L*k), got {buffer.shape[1]}")
    check_tensor(grad_buffer, "grad_buffer", buffer, list(buffer.shape))
    if training:
        for name, t, shape in (("mean", mean, [Ct]), ("var", var, [Ct]), ("mean2", mean2, [L, inter]),
                               ("var2", var2, [L, inter])):
            check_tensor(t, name, buffer, shape, bn_tensor=True)
    N = buffer.shape[0]
    like = lambda ts: [torch.empty_like(t, memory_format=torch.contiguous_format) for t in ts]  # noqa: E731
    # Every backend returns contiguous weight gradients (torch.compile asserts the real strides match).
    return (_empty_cl((N, num_input_features, *buffer.shape[2:]), buffer), like(norm1_weight), like(norm1_bias),
            like(conv1_weight), like(norm2_weight), like(norm2_bias), like(conv2_weight))


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


def cpu_autocast_input(x: Tensor, rule: str) -> Tensor:
    """The dtype a CPU fused operator computes in under ``torch.autocast("cpu")``: x, cast where its rule says.

    One table for every fused CPU operator (docs/design.md §7), outside autocast, for float64 and for non-CPU
    inputs x is returned unchanged:

    * ``"block"`` (the dense block): bfloat16 under bf16 autocast (bf16 buffer and GEMM operands, fp32
      accumulation and BN, as autocast runs convolutions in bf16); float32 under fp16 autocast (no fp16 CPU
      kernel: autocast's fp16 CPU convolutions are slow reference kernels, so the block keeps fp32).
    * ``"tail"`` (transition, final norm): a bfloat16 input (a block's buffer) stays bfloat16, the operator
      computes in fp32 on a transient copy and autograd saves the bf16 buffer it keeps anyway; float16 ->
      float32.
    * ``"float32"`` (the other readers, e.g. the stem): bfloat16 and float16 -> float32.
    """
    if x.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return x
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return x
    if rule == "block":
        target = torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else torch.float32
    elif rule == "tail":
        target = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    elif rule == "float32":
        target = torch.float32
    else:
        raise ValueError(f"rule: expected 'block', 'tail' or 'float32', got {rule!r}")
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


def fused_dense_block(input: Tensor, params: BlockParams, *, training: bool, eps: float = 1e-5,
                drop_rate: float = 0.0, dropout_mask: Optional[Tensor] = None) -> BlockOutput:
    """Runs a whole dense block as one fused operator.

    Args:
        input: [N, C0, H, W] or [N, C0, D, H, W] block input (any layout).
        params: the layers' parameters; running statistics are read only in eval.
        training: batch statistics (training) or running statistics (eval).
        drop_rate: dropout probability applied to each layer's new features (training only).
        dropout_mask: bool [N, L*k, (D,) H, W], True = keep; drawn here when None and dropout is active.

    Every argument is validated by the operator (RuntimeError naming the argument, the expected and the
    actual value; ValueError for a single value per channel in training, as ``nn.BatchNorm2d``). The
    operator is functional: it never writes to its arguments and its outputs are new tensors, so
    arguments may alias each other (e.g. the input sharing storage with a parameter).
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"input: expected a Tensor, got {type(input).__name__}")
    if not isinstance(params, tuple) or len(params) != len(BlockParams._fields):
        raise TypeError(f"params: expected a BlockParams ({len(BlockParams._fields)} lists of per-layer tensors), "
                        f"got {type(params).__name__}")
    if not 0.0 <= float(drop_rate) < 1.0:
        raise ValueError(f"drop_rate: expected a value in [0, 1), got {drop_rate!r}")
    L = len(params.conv2_weight)
    if training and drop_rate > 0 and dropout_mask is None and input.dim() in (4, 5) and L > 0:
        k = params.conv2_weight[0].shape[0]
        dropout_mask = torch.empty((input.shape[0], L * k, *input.shape[2:]),
                                   device=input.device).bernoulli_(1.0 - drop_rate).bool()
    if not (training and drop_rate > 0):
        dropout_mask, drop_rate = None, 0.0
    running = list(params[6:]) if not training else [[], [], [], []]
    out = _ops.dense_block_forward(input, *params[:6], *running, dropout_mask, float(drop_rate),
                                   bool(training), float(eps))
    return BlockOutput(*out)
