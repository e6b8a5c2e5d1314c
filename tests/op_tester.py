"""The shared parametrisation of the operator tests (as torchvision's ``test/test_ops.py`` ``RoIOpTester``).

A subclass of :class:`OpTester` names its operator's shapes (odd sizes) and builds a reference module
(torchvision / timm / torch's own modules) and ours with the same weights; the base class runs every
combination of device, dtype, memory layout, train/eval and shape through one test that compares the output,
the input gradient, every parameter gradient and every buffer (running statistics) after two steps.
"""
from __future__ import annotations

import contextlib
from typing import Sequence, Tuple

import pytest
import torch
from conftest import assert_buffers_close, assert_close_rel, requires_cuda
from torch import nn

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda())]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
LAYOUTS = ["contiguous", "channels_last", "noncontiguous"]
TRAINING = [pytest.param(True, id="train"), pytest.param(False, id="eval")]


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x as a contiguous, channels_last or non-dense (every other channel, offset width) 4-D tensor."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "noncontiguous":
        N, C, H, W = x.shape
        wide = torch.zeros(N, 2 * C, H, W + 1, dtype=x.dtype, device=x.device)
        wide[:, ::2, :, 1:] = x
        return wide[:, ::2, :, 1:]
    assert layout == "contiguous", layout
    return x.contiguous()


class OpTester:
    """Subclasses set ``SHAPES`` (anything :meth:`make` takes) and implement :meth:`make`; they may narrow
    ``DEVICES``, ``DTYPES``, ``LAYOUTS``, ``TRAINING`` and ``TOL`` (relative, per dtype)."""

    SHAPES: Sequence = ()
    DEVICES, DTYPES, LAYOUTS, TRAINING = DEVICES, DTYPES, LAYOUTS, TRAINING
    TOL = {torch.float32: 1e-4, torch.float64: 1e-9}  # fp64: the project's parity bound
    STEPS = 2  # the second step runs with the running statistics the first one updated

    def pytest_generate_tests(self, metafunc) -> None:
        for name, values in (("shape", self.SHAPES), ("device", self.DEVICES), ("dtype", self.DTYPES),
                             ("layout", self.LAYOUTS), ("training", self.TRAINING)):
            if name in metafunc.fixturenames:
                ids = [str(v).replace(" ", "") for v in values] if name == "shape" else None
                metafunc.parametrize(name, values, ids=ids)

    def make(self, shape, dtype: torch.dtype) -> Tuple[nn.Module, nn.Module, torch.Tensor]:
        """(reference module, our module with the same weights, a contiguous input), on the CPU."""
        raise NotImplementedError

    def check_output(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Op-specific checks of our output (e.g. its layout)."""

    def test_matches_reference(self, shape, device, dtype, layout, training):
        ref, ours, x = self.make(shape, dtype)
        ref, ours = ref.to(device).train(training), ours.to(device).train(training)
        x = to_layout(x.to(device), layout)
        tol = self.TOL[dtype]
        # TF32 would round both sides' fp32 convolutions to 10 mantissa bits on a GPU.
        no_tf32 = torch.backends.cudnn.flags(enabled=True, allow_tf32=False) if device == "cuda" else \
            contextlib.nullcontext()
        with no_tf32:
            for step in range(self.STEPS):
                grad = None
                results = []
                for module in (ref, ours):
                    module.zero_grad(set_to_none=True)
                    xi = x.detach().clone().requires_grad_(True)
                    y = module(xi)
                    grad = torch.randn_like(y) if grad is None else grad
                    y.backward(grad)
                    results.append((y.detach(), xi.grad, dict(module.named_parameters())))
                (yr, gxr, pr), (yo, gxo, po) = results
                assert_close_rel(yo, yr, tol, f"output, step {step}")
                assert_close_rel(gxo, gxr, tol, f"input grad, step {step}")
                assert pr.keys() == po.keys()
                for name in pr:
                    assert_close_rel(po[name].grad, pr[name].grad, tol, f"grad of {name}, step {step}")
        self.check_output(x, yo)
        assert_buffers_close(ours, ref, tol)
