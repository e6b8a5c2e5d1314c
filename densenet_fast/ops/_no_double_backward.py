"""Double backward through the fused operators: a clear error.

The backward kernels (``dense_block_backward``, ``transition_backward``, ``norm_relu_pool_backward``,
``bn_relu_maxpool_backward``) are not differentiable. Their C++ autograd kernels
(csrc/autograd/common.h, ``not_differentiable``) make differentiating a gradient that flows through them
(``torch.autograd.grad(..., create_graph=True)`` and then ``.backward()``) raise a RuntimeError that names the
operator and the way out (the reference path), where torch would otherwise treat them as constants and return
wrong second derivatives. First-order gradients, ``create_graph=True`` alone, and ``torch.compile`` are
unaffected. The error is raised in C++ (libtorch and TorchScript users get it too), so it reaches Python as
a ``RuntimeError``; :data:`DoubleBackwardError` names that type.
"""
from __future__ import annotations

DoubleBackwardError = RuntimeError
"""The exception type of a double backward through a fused operator (raised by the C++ autograd kernels)."""
