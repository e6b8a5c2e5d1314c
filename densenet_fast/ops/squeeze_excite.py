"""Squeeze-and-excitation gating as registered custom operators (docs/design.md §5).

Operators (``torch.ops.densenet_fast.*``)::

    se_forward(x, w1, b1?, w2, b2?) -> (y, s, g)
    se_backward(dy, x, s, g, w1, b1?, w2) -> (dx, dw1, db1, dw2, db2)
    se_gate_of(x, w1, b1?, w2, b2?) -> (g, s, v)

with ``x``/``y``/``dy``/``dx`` ``[N, C, H, W]`` (any strides; ``y``/``dx`` are laid out like
``torch.empty_like(x)``, so channels_last stays channels_last), ``w1 [R, C]``, ``b1 [R]``,
``w2 [C, R]``, ``b2 [C]`` in x's dtype, and ``s = mean_hw(x)``, ``g = sigmoid(W2·relu(W1·s+b1)+b2)``
returned as ``[N, C]`` in the accumulation dtype (fp32; fp64 for fp64 inputs). ``s`` and ``g``
are saved for the backward and are not differentiable. Use :func:`se_gate` for ``y`` alone.

``se_gate_of`` is the SE without the multiply, for a gate folded into the next BN reader
(docs/design.md §5): the gate ``g`` (differentiable w.r.t. x and the weights) and the per-sample
channel mean ``s`` (the squeeze) and variance ``v`` of x (not differentiable), from
``densenet_fast::sample_moments``. It saves nothing but its inputs (x is the block buffer, saved
anyway): the backward recomputes ``s`` and the tiny MLP and returns ``dx = ds/HW`` as an expanded view.

Kernels, selected through the dispatcher (no device branching around it):

* CPU (and any non-CUDA device): plain PyTorch math with fp32 accumulation.
* CUDA: the Triton kernels of :mod:`densenet_fast.ops.triton.se_kernels` (fp16/bf16/fp32;
  fp64 uses the PyTorch math).

Environment variable ``DENSENET_FAST_SE_BACKEND`` (read at every call):

* ``auto`` (default): as above.
* ``torch``: PyTorch math on every device (debugging, reference numbers).
* ``triton``: Triton kernels on every device; for CPU tensors this needs ``TRITON_INTERPRET=1``
  set before the kernels are first used (tests run the kernels this way).
"""

import contextlib
from typing import Optional

import torch
from torch import Tensor

from densenet_fast import _switches
from densenet_fast.ops import triton as _triton
from densenet_fast.ops.common import check_devices, stats_dtype

__all__ = ["se_gate", "se_forward", "se_backward", "se_gate_of", "BACKEND_ENV", "backend_for"]

BACKEND_ENV = "DENSENET_FAST_SE_BACKEND"
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def backend_for(device: torch.device, dtype: torch.dtype) -> str:
    """``"torch"`` or ``"triton"``: which kernel the SE ops use for tensors of this kind."""
    choice = _switches.read(BACKEND_ENV)
    if choice == "torch" or dtype not in _TRITON_DTYPES:
        return "torch"
    if choice == "auto":
        return "triton" if device.type == "cuda" and _triton.is_available() else "torch"
    # choice == "triton"
    if not _triton.is_available():
        raise RuntimeError(f"{BACKEND_ENV}=triton but the `triton` package is not installed")
    if device.type != "cuda" and not _triton.interpreter_enabled():
        raise RuntimeError(
            f"{BACKEND_ENV}=triton on {device.type} tensors needs TRITON_INTERPRET=1 in the "
            "environment before the kernels are first used (Triton's CPU interpreter)")
    return "triton"


# --------------------------------------------------------------------------------------------
# input validation: the one home of the SE operators' checks (their kernels are Python); messages and
# RuntimeError as the C++ operators' (argument: expected ..., got ...). The fake kernels check only what
# their output shapes need (x's rank, w1's rank, devices); the real kernels run the rest.
# --------------------------------------------------------------------------------------------
def _check_device_dtype(name: str, t: Tensor, x: Tensor, dtype: Optional[torch.dtype] = None,
                        what: str = "the dtype of x") -> None:
    torch._check(t.device == x.device, lambda: f"{name}: expected a tensor on {x.device} (the device of x), "
                 f"got {t.device}")
    want = x.dtype if dtype is None else dtype
    torch._check(t.dtype == want, lambda: f"{name}: expected dtype {want} ({what}), got {t.dtype}")


def _check_shape(name: str, t: Tensor, expected: tuple, what: str) -> None:
    torch._check(tuple(t.shape) == tuple(expected), lambda: f"{name}: expected shape {list(expected)} ({what}), "
                 f"got {list(t.shape)}")


def _check_x_rank(x: Tensor, name: str = "x") -> None:
    torch._check(x.dim() == 4, lambda: f"{name}: expected a 4-D tensor [N, C, H, W], got {x.dim()}-D with shape "
                 f"{list(x.shape)}")


def _check_w1_rank(w1: Tensor) -> None:
    torch._check(w1.dim() == 2, lambda: f"w1: expected a 2-D tensor [R, C] (flatten a 1x1 conv weight with "
                 f".flatten(1)), got {w1.dim()}-D with shape {list(w1.shape)}")


def _check_x(x: Tensor, name: str = "x") -> None:
    _check_x_rank(x, name)
    torch._check(x.is_floating_point(), lambda: f"{name}: expected a floating-point dtype (float16, bfloat16, "
                 f"float32 or float64), got {x.dtype}")
    n, c, h, w = x.shape
    torch._check(n > 0, lambda: f"{name}: expected a non-empty batch, got batch size 0 (shape {list(x.shape)})")
    torch._check(c > 0, lambda: f"{name}: expected at least one channel, got 0 (shape {list(x.shape)})")
    torch._check(h * w > 0, lambda: f"{name}: expected a non-zero spatial size, got H={h}, W={w}")


def _check_params(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor]) -> None:
    c = x.shape[1]
    _check_w1_rank(w1)
    r = w1.shape[0]
    torch._check(r > 0, lambda: f"w1: expected at least one row (R >= 1), got shape {list(w1.shape)}")
    _check_shape("w1", w1, (r, c), f"[R, C] with C={c} channels of x")
    _check_shape("w2", w2, (c, r), f"[C, R] with C={c} channels of x and R={r} rows of w1")
    _check_device_dtype("w1", w1, x)
    _check_device_dtype("w2", w2, x)
    for name, b, n in (("b1", b1, r), ("b2", b2, c)):
        if b is not None:
            _check_shape(name, b, (n,), "one bias per output")
            _check_device_dtype(name, b, x)


def _check_forward(x, w1, b1, w2, b2) -> None:
    _check_x(x)
    _check_params(x, w1, b1, w2, b2)


def _check_backward(dy, x, s, g, w1, b1, w2) -> None:
    _check_forward(x, w1, b1, w2, None)
    _check_shape("dy", dy, tuple(x.shape), "the shape of x")
    _check_device_dtype("dy", dy, x)
    n, c = x.shape[:2]
    for name, t in (("s", s), ("g", g)):
        _check_shape(name, t, (n, c), "[N, C] from se_forward")
        _check_device_dtype(name, t, x, stats_dtype(x.dtype), "the accumulation dtype, from se_forward")


def _check_fake(x: Tensor, w1: Tensor, **tensors) -> None:
    """What the fake kernels need: x's and w1's rank (their shapes size the outputs), every tensor on x's device."""
    _check_x_rank(x)
    _check_w1_rank(w1)
    check_devices(x, dict(w1=w1, **tensors), "x")


# --------------------------------------------------------------------------------------------
# PyTorch reference kernels (CPU); fp32 accumulation, single rounding of the big outputs
# --------------------------------------------------------------------------------------------
def _excite_torch(s: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                  b2: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    acc = s.dtype
    cast = lambda t: None if t is None else t.to(acc)  # noqa: E731
    hid = torch.relu(torch.nn.functional.linear(s, w1.to(acc), cast(b1)))
    g = torch.sigmoid(torch.nn.functional.linear(hid, w2.to(acc), cast(b2)))
    return hid, g


def _forward_torch(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                   b2: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    acc = stats_dtype(x.dtype)
    s = x.mean(dim=(2, 3), dtype=acc)
    _, g = _excite_torch(s, w1, b1, w2, b2)
    y = torch.empty_like(x)
    torch.mul(x, g[:, :, None, None], out=y)  # computed in `acc`, rounded once into y
    return y, s, g


def _excite_backward_torch(dg: Tensor, s: Tensor, g: Tensor, w1: Tensor, b1: Optional[Tensor],
                           w2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The excitation MLP's backward: dg [N, C] -> (ds, dw1, db1, dw2, db2); ds in s's dtype."""
    acc = s.dtype
    hid, _ = _excite_torch(s, w1, b1, w2, None)  # recompute the tiny hidden activation
    dz2 = dg * g * (1 - g)
    dz1 = (dz2 @ w2.to(acc)) * (hid > 0)
    ds = dz1 @ w1.to(acc)
    wd = w1.dtype
    return ds, (dz1.t() @ s).to(wd), dz1.sum(0).to(wd), (dz2.t() @ hid).to(wd), dz2.sum(0).to(wd)


def _backward_torch(dy: Tensor, x: Tensor, s: Tensor, g: Tensor, w1: Tensor,
                    b1: Optional[Tensor], w2: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    hw = x.shape[2] * x.shape[3]
    dg = (dy.to(s.dtype) * x).sum(dim=(2, 3))
    ds, dw1, db1, dw2, db2 = _excite_backward_torch(dg, s, g, w1, b1, w2)
    dx = torch.empty_like(x)
    torch.add(dy * g[:, :, None, None], (ds / hw)[:, :, None, None], out=dx)
    return dx, dw1, db1, dw2, db2


def _no_autocast(device: torch.device):
    # Kernels run below the autocast dispatch key only for C++ ops; a Python impl would see
    # F.linear autocast to bf16/fp16, breaking the fp32 accumulation (and the fake dtypes).
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _forward_impl(x, w1, b1, w2, b2):
    _check_forward(x, w1, b1, w2, b2)
    with _no_autocast(x.device):
        if backend_for(x.device, x.dtype) == "triton":
            return _triton.load_se_kernels().se_forward_triton(x, w1, b1, w2, b2)
        return _forward_torch(x, w1, b1, w2, b2)


def _backward_impl(dy, x, s, g, w1, b1, w2):
    _check_backward(dy, x, s, g, w1, b1, w2)
    with _no_autocast(x.device):
        if backend_for(x.device, x.dtype) == "triton":
            return _triton.load_se_kernels().se_backward_triton(dy, x, s, g, w1, b1, w2)
        return _backward_torch(dy, x, s, g, w1, b1, w2)


# --------------------------------------------------------------------------------------------
# operator registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("densenet_fast::se_forward", mutates_args=())
def se_forward(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
               b2: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """SE gating forward: returns ``(y, s, g)``; see the module docstring for shapes."""
    return _forward_impl(x, w1, b1, w2, b2)


@torch.library.custom_op("densenet_fast::se_backward", mutates_args=())
def se_backward(dy: Tensor, x: Tensor, s: Tensor, g: Tensor, w1: Tensor, b1: Optional[Tensor],
                w2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SE gating backward: returns ``(dx, dw1, db1, dw2, db2)`` (db* computed even if no bias)."""
    return _backward_impl(dy, x, s, g, w1, b1, w2)


# The default kernels above serve every device; CUDA gets its own registration so the
# dispatcher (not a device branch) routes it. Both share the implementation, which picks
# Triton for CUDA under `auto`.
se_forward.register_kernel("cuda")(_forward_impl)
se_backward.register_kernel("cuda")(_backward_impl)


@se_forward.register_fake
def _se_forward_fake(x, w1, b1, w2, b2):
    _check_fake(x, w1, b1=b1, w2=w2, b2=b2)
    n, c = x.shape[:2]
    acc = stats_dtype(x.dtype)
    return (torch.empty_like(x), x.new_empty((n, c), dtype=acc), x.new_empty((n, c), dtype=acc))


@se_backward.register_fake
def _se_backward_fake(dy, x, s, g, w1, b1, w2):
    _check_fake(x, w1, dy=dy, s=s, g=g, b1=b1, w2=w2)
    r, c = w1.shape
    return (torch.empty_like(x), torch.empty_like(w1, memory_format=torch.contiguous_format),
            w1.new_empty((r,)), torch.empty_like(w2, memory_format=torch.contiguous_format),
            w2.new_empty((c,)))


def _setup_context(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2 = inputs
    _, s, g = output
    ctx.save_for_backward(x, w1, b1, w2, s, g)
    ctx.has_bias = (b1 is not None, b2 is not None)
    ctx.mark_non_differentiable(s, g)


def _backward(ctx, dy, _ds, _dg):
    x, w1, b1, w2, s, g = ctx.saved_tensors
    dx, dw1, db1, dw2, db2 = torch.ops.densenet_fast.se_backward(dy, x, s, g, w1, b1, w2)
    has_b1, has_b2 = ctx.has_bias
    return dx, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None


se_forward.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
# the gate alone, for a gate folded into the next BN reader
# --------------------------------------------------------------------------------------------
def _gate_of_impl(x, w1, b1, w2, b2):
    _check_forward(x, w1, b1, w2, b2)
    with _no_autocast(x.device):
        s, v = torch.ops.densenet_fast.sample_moments(x)
        _, g = _excite_torch(s, w1, b1, w2, b2)
    return g, s, v


@torch.library.custom_op("densenet_fast::se_gate_of", mutates_args=())
def se_gate_of(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
               b2: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """SE gate without the multiply: ``(g, s, v)``, each ``[N, C]`` in the accumulation dtype; see the
    module docstring. Only ``g`` is differentiable."""
    return _gate_of_impl(x, w1, b1, w2, b2)


@se_gate_of.register_fake
def _se_gate_of_fake(x, w1, b1, w2, b2):
    _check_fake(x, w1, b1=b1, w2=w2, b2=b2)
    n, c = x.shape[:2]
    acc = stats_dtype(x.dtype)
    return tuple(x.new_empty((n, c), dtype=acc) for _ in range(3))


def _gate_of_setup(ctx, inputs, output) -> None:
    x, w1, b1, w2, b2 = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2)  # x: the block buffer, which the block saves anyway
    ctx.has_bias = (b1 is not None, b2 is not None)
    ctx.mark_non_differentiable(output[1], output[2])


def _gate_of_backward(ctx, dg, _ds, _dv):
    x, w1, b1, w2, b2 = ctx.saved_tensors
    with _no_autocast(x.device):
        s, _ = torch.ops.densenet_fast.sample_moments(x)  # bitwise the forward's squeeze (deterministic)
        _, g = _excite_torch(s, w1, b1, w2, b2)
        ds, dw1, db1, dw2, db2 = _excite_backward_torch(dg, s, g, w1, b1, w2)
    hw = x.shape[2] * x.shape[3]
    dx = (ds / hw).to(x.dtype)[:, :, None, None].expand(x.shape)  # d mean_hw: a broadcast view, no copy
    has_b1, has_b2 = ctx.has_bias
    return dx, dw1, db1 if has_b1 else None, dw2, db2 if has_b2 else None


se_gate_of.register_autograd(_gate_of_backward, setup_context=_gate_of_setup)


def se_gate(x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor,
            b2: Optional[Tensor] = None) -> Tensor:
    """``y = x * sigmoid(W2 relu(W1 mean_hw(x) + b1) + b2)``, differentiable.

    Args:
        x: ``[N, C, H, W]`` float tensor, any strides (NCHW or channels_last).
        w1: ``[R, C]`` (a 1x1 conv weight ``[R, C, 1, 1]`` is flattened), b1: ``[R]`` or None.
        w2: ``[C, R]`` (or ``[C, R, 1, 1]``), b2: ``[C]`` or None. Same dtype/device as x.

    Returns:
        ``y`` with x's shape, dtype and memory format.
    """
    if isinstance(w1, Tensor) and w1.dim() == 4 and w1.shape[2:] == (1, 1):
        w1 = w1.flatten(1)
    if isinstance(w2, Tensor) and w2.dim() == 4 and w2.shape[2:] == (1, 1):
        w2 = w2.flatten(1)
    return torch.ops.densenet_fast.se_forward(x, w1, b1, w2, b2)[0]
