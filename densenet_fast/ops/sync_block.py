"""The synchronised (SyncBatchNorm) dense block: the fused block's algorithm with all-reduced statistics.

The fused operator (``dense_block_forward``) runs a whole block in one C++ call; with SyncBatchNorm each
layer's statistics must be all-reduced across the process group before the next layer reads them, so
this path loops over the layers in Python with per-layer operators between the collectives
(docs/design.md §13). Same buffer, same saved tensors (the block buffer and O(L·k) statistics), same
recompute-based backward with merged per-channel BN1 sums; per layer it all-reduces

* forward: Σx, Σx² of the layer's bottleneck (``bn_size·k`` channels), then of its k new channels;
* backward: the BN2 sums (Σdz, Σdz·x̂), then the merged sums (S1, S2) of the k channels it wrote,

plus, per block, the input's statistics (with the value count, once) and its input's S1, S2. A reader
after the block (transition, final norm) passes its statistics' gradients back through the block's
``mean``/``var`` outputs, which are merged into the same sums: it needs no collective of its own.

Operators: ``block_layer_bottleneck`` (BN1-ReLU as the prologue of the 1x1 GEMM, tile by tile),
``block_layer_bottleneck_backward`` and ``channel_sums`` (C++ on CPU, csrc/cpu/sync_block_cpu.cpp; on
CUDA the ATen composites below, which materialise one layer's BN1-ReLU output transiently).
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from densenet_fast._extension import load_extension
from densenet_fast.ops.common import can_take_over, check_drop_rate, cl_format, empty_cl
from densenet_fast.ops.dense_block import BlockParams, check_dense_block_args
from densenet_fast.ops.sync_stats import all_reduce_, channel_sums, moments_from_sums

load_extension()
_ops = torch.ops.densenet_fast

__all__ = ["SyncBlockOutput", "sync_dense_block"]


def _mat(t: Tensor) -> Tensor:
    """[N, C, *] channels_last (or a channel slice of a channels_last buffer) as its [rows, C] matrix (a view)."""
    return t.movedim(1, -1).view(-1, t.shape[1])


# -- fake kernels -----------------------------------------------------------------------------------------


@torch.library.register_fake("densenet_fast::block_layer_bottleneck")
def _bottleneck_fake(buffer, channels, mean, var, weight, bias, conv_weight, eps):
    torch._check(1 <= channels <= buffer.shape[1], lambda: f"channels: expected a value in [1, {buffer.shape[1]}] "
                 f"(the buffer's channel count), got {channels}")
    return empty_cl([buffer.shape[0], conv_weight.shape[0], *buffer.shape[2:]], buffer)


@torch.library.register_fake("densenet_fast::block_layer_bottleneck_backward")
def _bottleneck_backward_fake(grad_y, buffer, channels, mean, var, weight, bias, conv_weight, eps, grad_buffer):
    return (torch.empty_like(conv_weight, memory_format=torch.contiguous_format), buffer.new_empty(channels),
            buffer.new_empty(channels))


@torch.library.register_fake("densenet_fast::channel_sums")
def _channel_sums_fake(input, other=None):
    if other is not None:
        torch._check(other.shape == input.shape, lambda: f"other: expected shape {tuple(input.shape)} (the shape "
                     f"of input), got {tuple(other.shape)}")
    return input.new_empty((2, input.shape[1]), dtype=torch.float64)


# -- ATen composites (the CUDA kernels of the three operators) -------------------------------------------


def _conv1x1(u: Tensor, w: Tensor) -> Tensor:
    return F.conv3d(u, w) if u.dim() == 5 else F.conv2d(u, w)


def _bcast(v: Tensor, dims: int) -> Tensor:
    return v.view([1, -1] + [1] * dims)


def bottleneck_composite(buffer: Tensor, channels: int, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor,
                         conv_weight: Tensor, eps: float) -> Tensor:
    """``block_layer_bottleneck`` in ATen ops (materialises relu(bn(buffer[:, :channels])) transiently)."""
    u = torch.relu(F.batch_norm(buffer[:, :channels], mean, var, weight, bias, False, 0.0, eps))
    return _conv1x1(u, conv_weight).contiguous(memory_format=cl_format(buffer))


def bottleneck_backward_composite(grad_y: Tensor, buffer: Tensor, channels: int, mean: Tensor, var: Tensor,
                                  weight: Tensor, bias: Tensor, conv_weight: Tensor, eps: float,
                                  grad_buffer: Tensor):
    """``block_layer_bottleneck_backward`` in ATen ops."""
    d = buffer.dim() - 2
    x = buffer[:, :channels]
    invstd = torch.rsqrt(var + eps)
    a = weight * invstd
    u = torch.relu(x * _bcast(a, d) + _bcast(bias - mean * a, d))
    du, dw, _ = torch.ops.aten.convolution_backward(grad_y, u, conv_weight, None, [1] * d, [0] * d, [1] * d, False,
                                                    [0] * d, 1, [True, True, False])
    dz = torch.ops.aten.threshold_backward(du, u, 0)
    dims = [0] + list(range(2, buffer.dim()))
    xhat = (x - _bcast(mean, d)) * _bcast(invstd, d)
    grad_buffer[:, :channels].add_(dz * _bcast(a, d))
    return dw.contiguous(), dz.sum(dims), (dz * xhat).sum(dims)


def channel_sums_composite(input: Tensor, other: Optional[Tensor] = None) -> Tensor:
    """``channel_sums`` in ATen ops (float64 copies of the inputs, transiently)."""
    x = input.double()
    dims = [0] + list(range(2, input.dim()))
    return torch.stack([x.sum(dims), (x * (x if other is None else other.double())).sum(dims)])


for _name, _fn in (("block_layer_bottleneck", bottleneck_composite),
                   ("block_layer_bottleneck_backward", bottleneck_backward_composite),
                   ("channel_sums", channel_sums_composite)):
    torch.library.impl(f"densenet_fast::{_name}", "CUDA")(_fn)


# -- the block --------------------------------------------------------------------------------------------


class SyncBlockOutput(NamedTuple):
    """Result of :func:`sync_dense_block`: as :class:`~densenet_fast.ops.BlockOutput`, with global statistics.

    buffer: [N, C0 + L*k, (D,) H, W] (channels_last), this rank's block output.
    mean, var: [C0 + L*k] statistics of the global batch (every rank); differentiable: a reader that
        normalises with them returns their gradients here (see ``sync_stats.bn_reader``).
    mean2, var2: [L, bn_size*k] global statistics of every layer's norm2.
    count: values per channel of the global batch (Σ over ranks of N·(D·)H·W), for the running statistics.
    """

    buffer: Tensor
    mean: Tensor
    var: Tensor
    mean2: Tensor
    var2: Tensor
    count: int


def _conv3x3(v: Tensor, w: Tensor) -> Tensor:
    return F.conv3d(v, w, padding=1) if v.dim() == 5 else F.conv2d(v, w, padding=1)


def _fold(gamma: Tensor, beta: Tensor, mean: Tensor, var: Tensor, eps: float):
    invstd = torch.rsqrt(var + eps)
    a = gamma * invstd
    return a, beta - mean * a, invstd


def _dropout(x: Tensor, mask: Optional[Tensor], layer: int, k: int, p: float) -> Tensor:
    # As the fused kernels and F.dropout: x * (mask / (1 - p)).
    return x if mask is None else x * mask[:, layer * k:(layer + 1) * k].to(x.dtype).div_(1.0 - p)


class _SyncDenseBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, eps: float, p: float, mask: Optional[Tensor], *flat: Tensor):
        L = len(flat) // 6
        g1, b1, w1, g2, b2, w2 = (flat[i * L:(i + 1) * L] for i in range(6))
        N, C0 = x.shape[:2]
        k, inter = w2[0].shape[0], w1[0].shape[0]
        Ct = C0 + L * k
        buffer = empty_cl((N, Ct, *x.shape[2:]), x)
        buffer[:, :C0].copy_(x)
        mean, var = x.new_empty(Ct), x.new_empty(Ct)
        mean2, var2 = x.new_empty(L, inter), x.new_empty(L, inter)
        # The block input's sums and this rank's count, in one collective (the count serves the whole block).
        pack = torch.empty(2 * C0 + 1, dtype=torch.float64, device=x.device)
        pack[:2 * C0].copy_(channel_sums(x).flatten())
        pack[2 * C0] = x.numel() // C0
        all_reduce_(pack, group)
        n = int(pack[2 * C0].item())

        def reduce_into(t: Tensor, m_out: Tensor, v_out: Tensor) -> None:
            s = all_reduce_(channel_sums(t), group)
            m, v = moments_from_sums(s, n, x.dtype)
            m_out.copy_(m)
            v_out.copy_(v)

        m0, v0 = moments_from_sums(pack[:2 * C0].view(2, C0), n, x.dtype)
        mean[:C0].copy_(m0)
        var[:C0].copy_(v0)
        for l in range(L):  # noqa: E741
            c = C0 + l * k
            y = _ops.block_layer_bottleneck(buffer, c, mean[:c], var[:c], g1[l], b1[l], w1[l], eps)
            reduce_into(y, mean2[l], var2[l])
            a2, s2, _ = _fold(g2[l], b2[l], mean2[l], var2[l], eps)
            v = _mat(y)
            v.mul_(a2).add_(s2).relu_()  # V = relu(bn2(Y)), in place over Y
            buffer[:, c:c + k].copy_(_dropout(_conv3x3(y, w2[l]), mask, l, k, p))
            del y, v
            reduce_into(buffer[:, c:c + k], mean[c:c + k], var[c:c + k])
        ctx.group, ctx.eps, ctx.p, ctx.n, ctx.L, ctx.C0 = group, eps, p, n, L, C0
        ctx.has_mask = mask is not None
        ctx.save_for_backward(buffer, mean, var, mean2, var2, *flat, *([mask] if mask is not None else []))
        count = torch.tensor(n)
        ctx.mark_non_differentiable(mean2, var2, count)
        return buffer, mean, var, mean2, var2, count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_buffer, grad_mean, grad_var, _gm2, _gv2, _gcount):
        saved = ctx.saved_tensors
        buffer, mean, var, mean2, var2 = saved[:5]
        L, C0, n, eps, p, group = ctx.L, ctx.C0, ctx.n, ctx.eps, ctx.p, ctx.group
        flat = saved[5:5 + 6 * L]
        mask = saved[-1] if ctx.has_mask else None
        g1, b1, w1, g2, b2, w2 = (flat[i * L:(i + 1) * L] for i in range(6))
        dims, k, inter = buffer.dim() - 2, w2[0].shape[0], w1[0].shape[0]
        Ct = buffer.shape[1]
        if grad_buffer is None:
            G = torch.zeros_like(buffer, memory_format=cl_format(dims))
        elif can_take_over(grad_buffer, buffer):
            G = grad_buffer  # our reader's fresh dx, handed over unshared: updated in place (no second copy)
        else:
            G = torch.empty_like(buffer, memory_format=cl_format(dims)).copy_(grad_buffer)
        invstd = torch.rsqrt(var + eps)
        # Merged BN1 backward of every reader of a channel: S1 = Σ γ·dβ, S2 = Σ γ·dγ (docs/design.md §3). A
        # reader outside the block returned dmean = -γ·invstd·dβ and dvar = -½·γ·invstd²·dγ instead.
        S = torch.zeros(2, Ct, dtype=torch.float64, device=buffer.device)
        external = grad_mean is not None or grad_var is not None
        if grad_mean is not None:
            S[0] -= grad_mean / invstd
        if grad_var is not None:
            S[1] -= 2.0 * grad_var / (invstd * invstd)

        def finalize(c0: int, w: int) -> None:
            # Every reader of channels [c0, c0+w) is done: all-reduce their sums, then
            # G -= invstd/n · (S1 + x̂·S2) with the global count.
            s = all_reduce_(S[:, c0:c0 + w].to(buffer.dtype).clone(memory_format=torch.contiguous_format), group)
            x = _mat(buffer[:, c0:c0 + w])
            t = (x - mean[c0:c0 + w]).mul_(invstd[c0:c0 + w] * s[1]).add_(s[0]).mul_(invstd[c0:c0 + w] / n)
            _mat(G[:, c0:c0 + w]).sub_(t)

        grads: List[List[Optional[Tensor]]] = [[None] * L for _ in range(6)]
        if external:  # the last layer's channels have readers outside the block only
            finalize(C0 + (L - 1) * k, k)
        for l in range(L - 1, -1, -1):  # noqa: E741
            c = C0 + l * k
            if l + 1 < L:
                finalize(c, k)
            # The step's peak is here, in the first block's layers (docs/design.md §13): beside Y, one more
            # [rows, bn_size·k] tensor at a time (V, then dV) and a 1-byte ReLU mask.
            y = _ops.block_layer_bottleneck(buffer, c, mean[:c], var[:c], g1[l], b1[l], w1[l], eps)
            a2, s2, is2 = _fold(g2[l], b2[l], mean2[l], var2[l], eps)
            v = torch.mul(_mat(y), a2).add_(s2).relu_()  # V = relu(bn2(Y)), one allocation
            v4 = v.view(y.shape[0], *y.shape[2:], inter).movedim(-1, 1)
            dout = _dropout(G[:, c:c + k], mask, l, k, p)
            conv_args = ([1] * dims, [1] * dims, [1] * dims, False, [0] * dims, 1)
            # dW2 reads V, dV does not: two calls, so that V is freed before dV is allocated.
            dw2 = torch.ops.aten.convolution_backward(dout, v4, w2[l], None, *conv_args, [False, True, False])[1]
            dead = v <= 0  # ReLU backward (threshold_backward's rule)
            del v, v4
            dv = torch.ops.aten.convolution_backward(dout, y, w2[l], None, *conv_args, [True, False, False])[0]
            dv = dv.contiguous(memory_format=cl_format(dims))  # (Y stands in for V's shape: dV does not read it)
            dz = _mat(dv)
            dz.masked_fill_(dead, 0.0)  # in place
            del dead
            xhat = _mat(y).sub_(mean2[l]).mul_(is2)  # in place over Y (not needed any more)
            sums = channel_sums(dv, y)  # [Σdz, Σdz·x̂] in float64, no temporaries (y holds x̂ now)
            grads[4][l], grads[3][l] = sums[0].to(g2[l].dtype), sums[1].to(g2[l].dtype)  # local dβ2, dγ2
            sg = all_reduce_(sums.to(buffer.dtype, copy=True), group)
            # BN2 backward with global sums: dY = a2·(dz - Σdz/n - x̂·Σdz·x̂/n), in place over dz.
            dz.sub_(xhat.mul_(sg[1] / n).add_(sg[0] / n)).mul_(a2)
            del xhat, y
            dw1, sdu, sdux = _ops.block_layer_bottleneck_backward(dv, buffer, c, mean[:c], var[:c], g1[l], b1[l],
                                                                  w1[l], eps, G)
            del dz, dv
            grads[2][l], grads[1][l], grads[0][l], grads[5][l] = dw1, sdu, sdux, dw2.contiguous()
            S[0, :c] += g1[l] * sdu
            S[1, :c] += g1[l] * sdux
        finalize(0, C0)
        grad_x = G[:, :C0].contiguous(memory_format=cl_format(dims))  # G is released here
        return (grad_x, None, None, None, None, *[g for group_ in grads for g in group_])


def _check_sync_args(x: Tensor, params: BlockParams, drop_rate: float, dropout_mask, eps: float) -> None:
    # training=False: a rank may hold one value per channel (SyncBatchNorm's rule counts the global batch).
    check_dense_block_args(x, *params, dropout_mask, drop_rate, False, eps)
    if x.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"input: the synchronised block computes in float32 or float64, got {x.dtype}")
    sd = x.dtype
    for name, ts in zip(BlockParams._fields[:6], params[:6]):
        for i, t in enumerate(ts):
            if t.dtype != sd:
                raise RuntimeError(f"{name}[{i}]: expected dtype {sd} (the dtype of input), got {t.dtype}")


@torch.compiler.disable
def sync_dense_block(input: Tensor, params: BlockParams, *, group, eps: float = 1e-5, drop_rate: float = 0.0,
                     dropout_mask: Optional[Tensor] = None) -> SyncBlockOutput:
    """A dense block in training with SyncBatchNorm statistics over ``group`` (a torch.distributed process group).

    Args:
        input: [N, C0, H, W] or [N, C0, D, H, W] this rank's block input (float32/float64); N may differ
            between ranks (every statistic is weighed by its rank's count, as SyncBatchNorm does).
        params: the layers' parameters (running statistics are not read; update them from the result).
        drop_rate, dropout_mask: as :func:`~densenet_fast.ops.fused_dense_block`.

    Returns a :class:`SyncBlockOutput`. Every rank of ``group`` must call it with the same block (the
    collectives are matched in order). Under ``torch.compile`` this call is a graph break.
    """
    drop_rate = check_drop_rate(drop_rate)
    L = len(params.conv2_weight)
    if drop_rate > 0 and dropout_mask is None and input.dim() in (4, 5) and L > 0:
        k = params.conv2_weight[0].shape[0]
        dropout_mask = torch.empty((input.shape[0], L * k, *input.shape[2:]),
                                   device=input.device).bernoulli_(1.0 - drop_rate).bool()
    if drop_rate == 0:
        dropout_mask = None
    _check_sync_args(input, params, float(drop_rate), dropout_mask, float(eps))
    flat: Sequence[Tensor] = [t for ts in params[:6] for t in ts]
    buffer, mean, var, mean2, var2, count = _SyncDenseBlock.apply(input, group, float(eps), float(drop_rate),
                                                                  dropout_mask, *flat)
    return SyncBlockOutput(buffer, mean, var, mean2, var2, int(count))
