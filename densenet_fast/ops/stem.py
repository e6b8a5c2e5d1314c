"""``densenet_fast::bn_relu_maxpool``: a DenseNet stem's BN -> ReLU -> 3x3/2 max-pool as one operator.

``[N, C, H, W] -> [N, C, (H-1)//2+1, (W-1)//2+1]`` (3x3/2 pool, padding 1) or, for MONAI's 3-D stem,
``[N, C, D, H, W] -> [N, C, (D-1)//2+1, (H-1)//2+1, (W-1)//2+1]`` (3x3x3/2). Saves only its input (the stem
convolution's output) and the BN statistics; the backward recomputes the BN/ReLU output and the pooling
argmax. torchvision / MONAI store the BN(-ReLU) output and the int64 pooling indices besides, 1.5x the
conv output. With ``training=True`` ``mean``/``var`` must be the batch statistics of ``input`` (the
backward then includes their gradient terms and ``mean``/``var`` get none).

CPU (float32/float64): C++ kernels (``csrc/cpu/stem_cpu.cpp``) that allocate nothing of the input's size
in the forward and only the input gradient in the backward, in the input's own layout (contiguous or
channels_last). Other devices: the composite of ATen ops below (registered as
``CompositeExplicitAutograd``), which has transient BN/ReLU outputs but the same saved tensors.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from densenet_fast import _switches
from densenet_fast._extension import load_extension
from densenet_fast.ops.common import check_bn_reader, cl_format

load_extension()
_ops = torch.ops.densenet_fast

__all__ = ["bn_relu_maxpool", "conv_bn_relu_maxpool"]


def _pool_args(dim: int):
    n = dim - 2
    return [3] * n, [2] * n, [1] * n, [1] * n


def _out_shape(input: Tensor) -> list:
    return list(input.shape[:2]) + [(s - 1) // 2 + 1 for s in input.shape[2:]]


def _memory_format(input: Tensor) -> torch.memory_format:
    # channels_last(_3d) for a channels_last(_3d) input that is not also contiguous (the CPU kernel's rule).
    cl = cl_format(input)
    if input.is_contiguous() or not input.is_contiguous(memory_format=cl):
        return torch.contiguous_format
    return cl


def _bn_relu(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    # Eval-mode batch_norm with the given statistics computes exactly what training-mode BN computes
    # from the same batch statistics. The parameters take the statistics' dtype: a .half() model's
    # weights with its float32 batch statistics is batch_norm's mixed-dtype case (BN in float32).
    return torch.relu(F.batch_norm(input, mean, var, weight.to(mean.dtype), bias.to(mean.dtype), False, 0.0, eps))


# -- composite implementation for the devices without a kernel (CUDA) ---------------------------------

@torch.library.impl("densenet_fast::bn_relu_maxpool", "CompositeExplicitAutograd")
def _forward_composite(input, mean, var, weight, bias, training, eps):
    k, s, p, _ = _pool_args(input.dim())
    pool = F.max_pool3d if input.dim() == 5 else F.max_pool2d
    return pool(_bn_relu(input, mean, var, weight, bias, eps), k, s, p)


@torch.library.impl("densenet_fast::bn_relu_maxpool_backward", "CompositeExplicitAutograd")
def _backward_composite(grad, input, mean, var, weight, bias, training, eps):
    k, s, p, d = _pool_args(input.dim())
    aten = torch.ops.aten
    fwd, bwd = ((aten.max_pool3d_with_indices, aten.max_pool3d_with_indices_backward) if input.dim() == 5
                else (aten.max_pool2d_with_indices, aten.max_pool2d_with_indices_backward))
    u = _bn_relu(input, mean, var, weight, bias, eps)  # recomputed, never stored
    _, idx = fwd(u, k, s, p, d, False)
    du = bwd(grad, u, k, s, p, d, False, idx)
    dz = aten.threshold_backward(du, u, 0)
    w = weight.to(mean.dtype)  # as in _bn_relu; the gradients go back in the parameters' dtype
    if training:
        invstd = torch.rsqrt(var + eps)
        dx, dw, db = aten.native_batch_norm_backward(dz, input, w, None, None, mean, invstd, True, eps,
                                                     [True, True, True])
    else:
        dx, dw, db = aten.native_batch_norm_backward(dz, input, w, mean, var, None, None, False, eps,
                                                     [True, True, True])
    return dx, dw.to(weight.dtype), db.to(bias.dtype)


# -- fake kernels (the autograd is C++: csrc/autograd/readers_autograd.cpp) -------------------------

@torch.library.register_fake("densenet_fast::bn_relu_maxpool")
def _forward_fake(input, mean, var, weight, bias, training, eps):
    check_bn_reader(input, mean, var, weight, bias)
    return input.new_empty(_out_shape(input)).contiguous(memory_format=_memory_format(input))


@torch.library.register_fake("densenet_fast::bn_relu_maxpool_backward")
def _backward_fake(grad, input, mean, var, weight, bias, training, eps):
    check_bn_reader(input, mean, var, weight, bias, grad_output=grad)
    return (torch.empty_like(input, memory_format=_memory_format(input)), torch.empty_like(weight),
            torch.empty_like(bias))


def bn_relu_maxpool_backward(grad: Tensor, input: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
                             training: bool, eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias) of :func:`bn_relu_maxpool`; recomputes the BN-ReLU output and
    the pooling argmax. ``training=False``: the statistics are constants (dx = a·dz)."""
    return _ops.bn_relu_maxpool_backward(grad, input, mean, var, weight, bias, bool(training), float(eps))


def bn_relu_maxpool(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, training: bool,
                    eps: float) -> Tensor:
    """max_pool(relu(batch_norm(input)), 3, 2, 1) with the given statistics: [N, C, H, W] ->
    [N, C, (H-1)//2+1, (W-1)//2+1], or [N, C, D, H, W] -> [N, C, (D-1)//2+1, (H-1)//2+1, (W-1)//2+1].
    A CPU bfloat16 input (conv0's output under autocast; float32 BN tensors) is read in bfloat16 with float32
    BN math and returns bfloat16 (as the pool of torchvision's stem under the same autocast); only that input
    is saved for the backward."""
    return _ops.bn_relu_maxpool(input, mean, var, weight, bias, bool(training), float(eps))


# -- conv0 + BN + ReLU + max-pool: the 3-D stem that saves only the image ----------------------------
# A 3-D stem convolution's output is the largest tensor of a volume DenseNet (64 channels at half the
# input resolution: 54 MiB for a batch of 2 x 96^3). This operator saves the *image* instead (conv0's
# weight gradient needs it anyway) and recomputes the convolution in the backward: one extra conv0
# forward per step for the largest saved tensor of the model (docs/design.md §4).

def _channels_last(image: Tensor) -> Tensor:
    """``image`` in channels_last(_3d): the convolution's output then comes out channels_last too (oneDNN follows
    its input's layout), where the stem kernels vectorise over the channels and the dense block after the stem
    takes it without a transpose (contiguous: ~3x slower stem forward + backward). A one-channel contiguous
    image is also channels_last; the view only sets the strides that say so (no copy)."""
    if image.shape[1] == 1 and image.is_contiguous():
        return image.view(image.shape[0], *image.shape[2:], 1).movedim(-1, 1)
    return image.contiguous(memory_format=torch.channels_last_3d if image.dim() == 5 else torch.channels_last)


def _conv(image: Tensor, weight: Tensor, stride: List[int], padding: List[int]) -> Tensor:
    conv = F.conv3d if image.dim() == 5 else F.conv2d
    return conv(_channels_last(image), weight, None, stride, padding)


def _check_conv_stem(image: Tensor, conv_weight: Tensor, stride: List[int], padding: List[int]) -> None:
    n = image.dim() - 2
    torch._check(image.dim() in (4, 5), lambda: f"input: expected a 4-D image batch [N, C, H, W] or a 5-D volume "
                 f"batch [N, C, D, H, W], got {image.dim()}-D with shape {list(image.shape)}")
    torch._check(conv_weight.dim() == image.dim() and conv_weight.shape[1] == image.shape[1],
                 lambda: f"conv_weight: expected a {image.dim()}-D weight [C_out, {image.shape[1]}, k...] for input "
                 f"shape {list(image.shape)}, got shape {list(conv_weight.shape)}")
    torch._check(len(stride) == n and len(padding) == n and min(stride) >= 1 and min(padding) >= 0,
                 lambda: f"stride/padding: expected {n} values each (stride >= 1, padding >= 0), got stride={stride}, "
                 f"padding={padding}")


@torch.library.custom_op("densenet_fast::conv_bn_relu_maxpool", mutates_args=())
def conv_bn_relu_maxpool(input: Tensor, conv_weight: Tensor, stride: List[int], padding: List[int],
                         running_mean: Tensor, running_var: Tensor, weight: Tensor, bias: Tensor, training: bool,
                         eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(bn_relu_maxpool(conv(input, conv_weight, stride, padding)), mean, var): the stem of a DenseNet.

    training: BN uses the batch statistics of the convolution's output, returned as ``mean``/``var``
    ([C], biased variance; the caller updates the running statistics with them); eval: the running
    statistics (``mean``/``var`` are returned empty). Saves only ``input`` and ``conv_weight``. The convolution
    runs on ``input`` in channels_last(_3d), so on CPU float32 (oneDNN) the output is channels_last(_3d).
    """
    _check_conv_stem(input, conv_weight, stride, padding)
    y = _conv(input, conv_weight, stride, padding)
    if training:
        torch._check_value(y.numel() // y.shape[1] > 1, lambda: "Expected more than 1 value per channel when "
                           f"training, got input size {y.size()}")
        mean, var = _ops.channel_moments(y)
    else:
        mean, var = running_mean, running_var
    out = _ops.bn_relu_maxpool(y, mean, var, weight, bias, training, eps)
    if not training:
        mean, var = mean.new_empty(0), var.new_empty(0)
    return out, mean, var


@conv_bn_relu_maxpool.register_fake
def _(input, conv_weight, stride, padding, running_mean, running_var, weight, bias, training, eps):
    _check_conv_stem(input, conv_weight, stride, padding)
    y = _conv(input, conv_weight, stride, padding)
    out = _forward_fake(y, running_mean, running_var, weight, bias, training, eps)
    n = y.shape[1] if training else 0
    return out, running_mean.new_empty(n), running_var.new_empty(n)


def _conv_setup(ctx, inputs, output):
    input, conv_weight, stride, padding, running_mean, running_var, weight, bias, training, eps = inputs
    _, mean, var = output
    ctx.stride, ctx.padding, ctx.training, ctx.eps = stride, padding, training, eps
    ctx.mark_non_differentiable(mean, var)
    stats = (mean, var) if training else (running_mean, running_var)
    ctx.save_for_backward(input, conv_weight, *stats, weight, bias)


def _conv_backward_batch(ctx, grad):
    """The whole batch at once: one conv0 recompute, its output and gradient coexisting (2x the memory)."""
    input, conv_weight, mean, var, weight, bias = ctx.saved_tensors
    input = _channels_last(input)  # as the forward ran it (a view for one channel), for the conv backward too
    y = _conv(input, conv_weight, ctx.stride, ctx.padding)
    dy, dw, db = _ops.bn_relu_maxpool_backward(grad, y, mean, var, weight, bias, ctx.training, ctx.eps)
    del y
    n = input.dim() - 2
    dinput, dconv, _ = torch.ops.aten.convolution_backward(
        dy, input, conv_weight, None, ctx.stride, ctx.padding, [1] * n, False, [0] * n, 1,
        [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
    return dinput, dconv, None, None, None, None, dw, db, None, None


# How the 3-D stem's backward recomputes conv0 (read at import from DNF_CONV_STEM_BACKWARD; the module attribute
# may be changed at run time): "batch" (default; one recompute for the whole batch) or "sample" (one sample at a
# time: the recomputed output and its gradient exist for one sample, for one more conv0 recompute in training).
# MONAI DenseNet121 3D, 2 x 1x96^3, this Xeon: the same step peak (the step's peak is elsewhere); the sample mode's
# stem forward + backward takes ~1.35x the batch mode's, ~6% of the step (docs/design.md §4).
CONV_STEM_BACKWARD = _switches.read("DNF_CONV_STEM_BACKWARD")


def _conv_backward(ctx, grad, _grad_mean, _grad_var):
    if CONV_STEM_BACKWARD == "batch" or ctx.saved_tensors[0].shape[0] == 1:
        return _conv_backward_batch(ctx, grad)
    return _conv_backward_sample(ctx, grad)


def _conv_backward_sample(ctx, grad):
    """Sample by sample, so the recomputed convolution output and its gradient exist for one sample at a time
    instead of for the whole batch. Training needs the BN backward's batch sums first, so it recomputes each
    sample twice: pass 1 collects sum(dz) and sum(dz*xhat) (exactly eval mode's dbeta and dgamma with the batch
    statistics), pass 2 forms each sample's gradient from eval mode's a*dz: dy = a*dz - a*(sum(dz) +
    xhat*sum(dz*xhat))/M, the training BN backward. Eval needs one pass (its dbeta/dgamma are summed there)."""
    input, conv_weight, mean, var, weight, bias = ctx.saved_tensors
    input = _channels_last(input)  # as the forward ran it (a view for one channel), for the conv backward too
    n_dims = input.dim() - 2
    view = (1, -1) + (1,) * n_dims
    need_input, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]

    def sample_grads(i):  # eval-mode backward of sample i: (a*dz, sum dz*xhat, sum dz) and its conv input
        x_i = input.narrow(0, i, 1)
        y_i = _conv(x_i, conv_weight, ctx.stride, ctx.padding)  # recomputed, one sample at a time
        return (x_i, y_i, *_ops.bn_relu_maxpool_backward(grad.narrow(0, i, 1), y_i, mean, var, weight, bias, False,
                                                          ctx.eps))

    dw_bn = db_bn = 0  # sum over samples of dgamma (= sum dz*xhat) and dbeta (= sum dz)
    if ctx.training:
        for i in range(input.shape[0]):
            _, _, _, dg, db = sample_grads(i)
            dw_bn, db_bn = dw_bn + dg, db_bn + db
        invstd = torch.rsqrt(var + ctx.eps)
        a = weight.to(mean.dtype) * invstd
    dinput = torch.empty_like(input) if need_input else None
    dconv = None
    for i in range(input.shape[0]):
        x_i, y_i, dy, dg, db = sample_grads(i)
        if ctx.training:
            m = y_i.numel() // y_i.shape[1] * input.shape[0]  # values per channel in the batch
            # dy = a*dz - a*s1/m - xhat*(a*s2/m), with xhat = (y - mean)*invstd; y_i is reused in place
            dy, y_i = dy.to(mean.dtype), y_i.to(mean.dtype)  # no copies when the dtypes match
            y_i.sub_(mean.view(view)).mul_((invstd * a * dw_bn / m).view(view))
            dy.sub_((a * db_bn / m).view(view)).sub_(y_i)
            dy = dy.to(input.dtype)
        else:
            dw_bn, db_bn = dw_bn + dg, db_bn + db
        del y_i
        gi, gw, _ = torch.ops.aten.convolution_backward(
            dy, x_i, conv_weight, None, ctx.stride, ctx.padding, [1] * n_dims, False, [0] * n_dims, 1,
            [need_input, need_weight, False])
        if need_input:
            dinput[i:i + 1].copy_(gi)
        if need_weight:
            dconv = gw if dconv is None else dconv.add_(gw)
    return dinput, dconv, None, None, None, None, dw_bn.to(weight.dtype), db_bn.to(bias.dtype), None, None


conv_bn_relu_maxpool.register_autograd(_conv_backward, setup_context=_conv_setup)
