"""Shared test helpers. Collection never touches a GPU: CUDA availability is only queried inside tests."""
from __future__ import annotations

import pytest
import torch


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected| in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item()
    diff = (a - e).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def requires_cuda():
    return pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")
