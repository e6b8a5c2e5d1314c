"""A 2-D DenseNet's conv0 under CPU bfloat16 autocast, computed in float32 where bfloat16 convolutions are slow.

On a CPU without bfloat16 dot products (no AVX512_BF16, no AMX) oneDNN emulates bfloat16, and densenet121's conv0
(7x7/2, 3 -> 64 channels, batch 8 at 224x224) took about twice its float32 time, forward plus weight gradient
(docs/design.md §14). Where the dense blocks' 2-D 3x3 forward and weight gradient measured faster in float32
(``bf16_conv_compute``, csrc/cpu/conv3x3.h), conv0 multiplies the bfloat16 values autocast would multiply (image
and weight rounded to bfloat16) widened to float32 and rounds its output to bfloat16 once: autocast's output up
to the order of the float sums, and autograd saves the same bfloat16 image and weight. The weight gradient is
the float32 product's, not rounded to bfloat16 (autocast's is).

The float32 operands exist a few samples at a time (about ``CHUNK_BYTES`` of conv0's float32 output per chunk):
a whole-batch float32 copy of conv0's output and of its gradient (25.7 MB each for densenet121 at batch 8,
224x224) was the largest transient of the bfloat16 step's forward and of its backward's end, and under glibc's
default allocator it raised the step's steady peak by about as much.
"""
from __future__ import annotations

import functools
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from densenet_fast._extension import load_extension

__all__ = ["conv0_in_float32", "conv0_widened"]

CHUNK_BYTES = 8 << 20


def _chunks(out_shape: Tuple[int, ...]) -> List[Tuple[int, int]]:
    """[n0, n1) sample ranges of about CHUNK_BYTES of float32 output each (equal sizes but the last)."""
    per_sample = 4
    for d in out_shape[1:]:
        per_sample *= d
    step = max(1, CHUNK_BYTES // max(per_sample, 1))
    return [(n0, min(out_shape[0], n0 + step)) for n0 in range(0, out_shape[0], step)]


@functools.lru_cache(maxsize=None)
def _float32_chosen() -> bool:
    """Whether a bfloat16 block's 2-D 3x3 forward and weight gradient compute in float32 (measured once per
    process, or forced by DNF_CPU_BF16_CONV)."""
    load_extension()
    choice = torch.ops.densenet_fast.bf16_conv_compute
    return choice(2, 0) == "float32" and choice(2, 2) == "float32"


def conv0_in_float32(conv: nn.Conv2d, x: Tensor) -> bool:
    """Whether ``conv(x)`` (a plain conv0 without bias, float32 image and weight, CPU bfloat16 autocast) runs as
    :func:`conv0_widened`."""
    return (isinstance(x, Tensor) and x.device.type == "cpu" and x.dtype == torch.float32
            and conv.weight.dtype == torch.float32 and conv.bias is None and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not torch.compiler.is_compiling()
            and _float32_chosen())


class _Conv0Widened(torch.autograd.Function):
    """y = bf16(conv(float(bf16(x)), float(bf16(w)))); saves the bfloat16 x and w (as autocast's conv does)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, stride: Tuple[int, ...], padding: Tuple[int, ...],
                dilation: Tuple[int, ...], groups: int) -> Tensor:
        xb = x.to(torch.bfloat16)
        wb = weight.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        wf = wb.float()
        spatial = [(s + 2 * p - d * (k - 1) - 1) // st + 1
                   for s, k, st, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
        y = torch.empty([x.shape[0], weight.shape[0]] + spatial, dtype=torch.bfloat16, device=x.device,
                        memory_format=torch.channels_last)
        with torch.autocast("cpu", enabled=False):
            for n0, n1 in _chunks(tuple(y.shape)):
                y[n0:n1].copy_(F.conv2d(xb[n0:n1].float(), wf, None, stride, padding, dilation, groups))
        ctx.save_for_backward(xb, wb)
        ctx.conf = (list(stride), list(padding), list(dilation), groups)
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):
        xb, wb = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False]
        wf = wb.float()
        gxs, gw = [], None
        with torch.autocast("cpu", enabled=False):
            for n0, n1 in _chunks(tuple(gy.shape)):
                gxi, gwi, _ = torch.ops.aten.convolution_backward(
                    gy[n0:n1].float(), xb[n0:n1].float(), wf, None, stride, padding, dilation, False,
                    [0] * len(stride), groups, mask)
                if gxi is not None:
                    gxs.append(gxi)
                if gwi is not None:
                    gw = gwi if gw is None else gw.add_(gwi)
        gx = None if not gxs else gxs[0] if len(gxs) == 1 else torch.cat(gxs)
        return gx, (None if gw is None else gw.contiguous()), None, None, None, None


def conv0_widened(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """conv(x) [N, C, H, W] -> bfloat16 [N, C_out, H', W'] (channels_last) as described above."""
    return _Conv0Widened.apply(x, conv.weight, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation),
                               conv.groups)
