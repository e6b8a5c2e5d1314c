"""Clear errors for double backward through the fused operators.

The backward kernels (``dense_block_backward``, ``transition_backward``, ``norm_relu_pool_backward``)
are not differentiable. Without an autograd kernel, differentiating a gradient that flows through them
(``torch.autograd.grad(..., create_graph=True)`` and then ``.backward()``) would silently treat them as
constants and return wrong second derivatives. Registering an autograd formula that raises makes that
an error, at the point where the second backward reaches the fused operator. First-order gradients,
``create_graph=True`` alone, and ``torch.compile`` are unaffected.
"""
from __future__ import annotations

import torch

from densenet_fast._extension import load_extension

load_extension()

_OPS = {
    "densenet_fast::dense_block_backward": "densenet_fast::dense_block_forward (fused dense block)",
    "densenet_fast::transition_backward": "densenet_fast::transition_forward (fused transition)",
    "densenet_fast::norm_relu_pool_backward": "densenet_fast::norm_relu_pool_forward (fused final norm + ReLU + pool)",
}


class DoubleBackwardError(RuntimeError):
    """Raised when a gradient computed through a fused densenet_fast operator is differentiated again."""


def _make_backward(op: str, what: str):
    def _raise(ctx, *grads):
        raise DoubleBackwardError(
            f"densenet_fast: double backward through {what} is not supported: its backward ({op}) is not "
            "differentiable. For higher-order gradients (gradient penalties, Hessian-vector products, ...) use the "
            "reference PyTorch path: densenet_fast.convert.set_impl(model, 'reference') (any model holding "
            "densenet_fast modules, converted or not), DenseNet(..., impl='reference'), or an unconverted model.")
    return _raise


def _setup_context(ctx, inputs, output) -> None:
    pass


for _op, _what in _OPS.items():
    torch.library.register_autograd(_op, _make_backward(_op, _what), setup_context=_setup_context)
