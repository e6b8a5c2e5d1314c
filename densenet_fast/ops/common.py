"""Helpers shared by the operators' Python side: the BatchNorm dtype rule, channels_last allocation and the
few checks a fake (meta) kernel needs.

Argument validation lives in C++ (``csrc/common/checks.h``, docs/design.md §6). A fake kernel checks only
what it needs to compute its outputs' shapes, dtypes and device — with the C++ kernels' wording, so a meta
or traced call fails with the same message where it fails at all; everything else is checked when the real
kernel runs (under ``torch.compile`` too: the compiled graph calls it).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from densenet_fast._extension import load_extension

load_extension()
_handover = torch.ops.densenet_fast._handover  # the hand-over tags (csrc/autograd/handover.h)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of BN parameters and statistics for an input dtype (float32 for float16/bfloat16)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def check_drop_rate(drop_rate) -> float:
    """``drop_rate`` as a float; TypeError unless a real number (not a bool), ValueError unless in [0, 1). The
    modules check it when built; the synchronised block before it draws a dropout mask from it."""
    if isinstance(drop_rate, bool) or not isinstance(drop_rate, (int, float)):
        raise TypeError(f"drop_rate: expected a float in [0, 1), got {type(drop_rate).__name__} {drop_rate!r}")
    if not 0.0 <= float(drop_rate) < 1.0:
        raise ValueError(f"drop_rate: expected a value in [0, 1), got {drop_rate!r}")
    return float(drop_rate)


def cl_format(x: Union[Tensor, int]) -> torch.memory_format:
    """The activation layout of every operator: channels_last / channels_last_3d of a 4-D / 5-D tensor, or of
    2 / 3 spatial dimensions (the two overloads of ``cl_format`` in csrc/common/layout.h)."""
    dims = x.dim() - 2 if isinstance(x, Tensor) else x
    return torch.channels_last_3d if dims == 3 else torch.channels_last


def empty_cl(shape: Sequence[int], like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialised channels_last(_3d) tensor on like's device (like's dtype unless given): a [rows, C]
    matrix."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=cl_format(len(shape) - 2))


# -- gradient hand-over (docs/design.md §11) ------------------------------------------------------------------
# A block's backward needs a block-sized working gradient G. When the gradient autograd hands it is one that
# nothing else can read — the fresh input gradient of the block's only reader, inside FusedFeatures, where the
# buffer never leaves the module (no hook, retain_grad or autograd.grad(inputs=...) can reach it) — the block
# updates it in place instead of copying it: one block-sized tensor less at the step's peak. The tags live in
# C++ (csrc/autograd/handover.h), where the operators' autograd reads and sets them (densenet_fast::_handover).


def mark_sole_reader(buffer: Tensor) -> Tensor:
    """Marks a block buffer that FusedFeatures hands to exactly one fused reader (and nothing else). Eager only:
    a traced graph has no hand-over (torch.compile keeps the copying backward)."""
    if not torch.compiler.is_compiling():
        _handover(buffer, 0)
    return buffer


def is_sole_reader_input(input: Tensor) -> bool:
    """Whether a reader's input was marked by :func:`mark_sole_reader` (its input gradient may be handed over)."""
    return bool(_handover(input, 1))


def mark_fresh(grad: Tensor) -> Tensor:
    """Tags a reader's freshly allocated input gradient as handed over (see :func:`owns_grad`)."""
    _handover(grad, 2)
    return grad


def owns_grad(grad: Tensor) -> bool:
    """Whether ``grad`` (a gradient a block's backward receives) is a sole reader's fresh input gradient
    (:func:`mark_fresh`) that autograd handed over unchanged, or summed in place with other consumers'
    gradients (then the sum is autograd's own): either way nothing else reads it afterwards, and the receiving
    backward may update it in place."""
    return bool(_handover(grad, 3))


def can_take_over(grad: Tensor, buffer: Tensor) -> bool:
    """Whether a block's backward may use ``grad`` as its working gradient (updated in place): handed over
    (:func:`owns_grad`) and already what the block would copy it into (``buffer``'s device, dtype, shape and
    channels_last layout)."""
    return (owns_grad(grad) and grad.device == buffer.device and grad.dtype == buffer.dtype
            and grad.shape == buffer.shape and grad.is_contiguous(memory_format=cl_format(buffer)))


def handovers_taken() -> int:
    """How many fused dense-block backward passes so far updated a handed-over gradient in place (the C++
    autograd's counter; tests observe the hand-over with it)."""
    return _handover(None, 4)


def check_rank(input: Tensor, name: str = "input") -> None:
    """A 4-D [N, C, H, W] or 5-D [N, C, D, H, W] activation: the output shapes and layouts need it."""
    torch._check(input.dim() in (4, 5), lambda: f"{name}: expected a 4-D tensor [N, C, H, W] or a 5-D tensor "
                 f"[N, C, D, H, W], got {input.dim()}-D with shape {list(input.shape)}")


def check_devices(input: Tensor, tensors: dict, input_name: str = "input") -> None:
    """Every tensor argument on input's device (``tensors``: name -> tensor, list of tensors or None).

    The outputs are allocated on input's device; an argument elsewhere would also make the dispatcher pick
    that device's kernel — a meta argument this fake kernel — for a call on input's device.
    """
    for name, value in tensors.items():
        items = [(name, value)] if not isinstance(value, (list, tuple)) else [
            (f"{name}[{i}]", t) for i, t in enumerate(value)]
        for item_name, t in items:
            if isinstance(t, Tensor):
                torch._check(t.device == input.device, lambda: f"{item_name}: expected a tensor on "
                             f"{input.device} (the device of {input_name}), got {t.device}")


def check_bn_reader(input: Tensor, mean: Tensor, var: Tensor, weight: Tensor, bias: Tensor, **more) -> None:
    """What the fake kernel of a BN reader (transition, final norm, stem) needs: the input's rank, and its
    BN tensors and ``more`` (name -> tensor or None) on input's device."""
    check_rank(input)
    check_devices(input, dict(mean=mean, var=var, weight=weight, bias=bias, **more))
