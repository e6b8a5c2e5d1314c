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


def rel_l2_err(actual, expected) -> float:
    """||actual - expected|| / ||expected|| in float64 over a tensor or a sequence of tensors taken together
    (the global-gradient metric: roundoff that lands on different elements in two implementations averages
    out instead of deciding the result)."""
    if isinstance(actual, torch.Tensor):
        actual, expected = [actual], [expected]
    num = sum(((a.detach().double() - e.detach().double()) ** 2).sum() for a, e in zip(actual, expected))
    den = sum((e.detach().double() ** 2).sum() for e in expected)
    return (num / den).sqrt().item() if den > 0 else num.sqrt().item()


def assert_bf16_autocast_no_worse(ours, ref, truth, inputs, factor: float = 1.5, ref_name: str = "MONAI") -> None:
    """``ours`` and ``ref`` (the same float32 weights) trained one step each under bf16 autocast on the inputs'
    device, ``truth`` (their float64 copy) without: the relative L2 errors of the output and of all parameter
    gradients against the truth, summed over the ``(x, g)`` pairs of ``inputs`` (x the input, g the output
    gradient), ours no worse than ``factor`` x ref's."""
    def step(m, x, g, autocast):
        m.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            y = m(x)
        y.backward(g.to(y.dtype))
        return y, torch.cat([p.grad.double().flatten() for p in m.parameters()])

    errs = {"output": [0.0, 0.0], "all parameter gradients": [0.0, 0.0]}
    for x, g in inputs:
        yo, go = step(ours, x, g, True)
        yr, gr = step(ref, x, g, True)
        yt, gt = step(truth, x.double(), g.double(), False)
        for a, b, t, what in ((yo, yr, yt, "output"), (go, gr, gt, "all parameter gradients")):
            errs[what][0] += rel_l2_err(a, t)
            errs[what][1] += rel_l2_err(b, t)
    for what, (err_o, err_r) in errs.items():
        assert err_o <= factor * err_r + 1e-6, f"{what}: ours {err_o:.3e} > {factor} x {ref_name} {err_r:.3e}"


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_buffers_close(ours: torch.nn.Module, ref: torch.nn.Module, tol: float) -> None:
    """Every buffer of ``ours`` against ``ref``'s of the same name: ``num_batches_tracked`` equal, the running
    statistics within ``tol`` (relative)."""
    ref_buffers = dict(ref.named_buffers())
    for name, b in ours.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert int(b) == int(ref_buffers[name]), name
        else:
            assert_close_rel(b, ref_buffers[name], tol, f"buffer {name}")


def tv_block_pair(num_layers: int, c0: int, bn_size: int, growth: int, dtype=torch.float32, train: bool = True,
                  drop_rate: float = 0.0):
    """(torchvision ``_DenseBlock``, ``densenet_fast.DenseBlock``) with the same weights; the BatchNorms get
    random affine parameters and running statistics, so no test passes by the identity's symmetry."""
    from convert_utils import randomize_bn
    from torchvision.models import densenet as tv

    import densenet_fast as dnf

    ref = randomize_bn(tv._DenseBlock(num_layers, c0, bn_size, growth, drop_rate))
    ours = dnf.DenseBlock(num_layers, c0, bn_size, growth, drop_rate)
    ours.load_state_dict(ref.state_dict())
    return ref.to(dtype).train(train), ours.to(dtype).train(train)


@pytest.fixture(scope="session")
def emu():
    """The CUDA implementation (csrc/cuda) compiled for the host (csrc/cuda/emu/emulate.cpp), built once per
    checkout. Skips only where this machine has no C++ compiler or ninja; a compile error fails the tests."""
    import hashlib
    import shutil
    from pathlib import Path

    from torch.utils import cpp_extension

    if shutil.which("c++") is None or not cpp_extension.is_ninja_available():
        pytest.skip("no C++ compiler or ninja: the CUDA-path emulation module cannot be built")
    root = Path(__file__).resolve().parents[1]
    try:
        return cpp_extension.load(
            # one build per checkout: two worktrees never rebuild each other's module in the shared cache
            name=f"dnf_cuda_emu_{hashlib.sha1(str(root).encode()).hexdigest()[:8]}",
            sources=[str(root / "csrc" / "cuda" / "emu" / "emulate.cpp")],
            extra_include_paths=[str(root / "csrc")], extra_cflags=["-O1"], with_cuda=False, verbose=False)
    except Exception as err:
        pytest.fail(f"the CUDA-path emulation module (csrc/cuda/emu/emulate.cpp) does not compile: {err}")


_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state and torch's default thread count: tests that run the
    benchmarks in-process set the threads, and the fp64 parity tests' roundoff depends on torchvision's
    (MKL's) thread count (densenet169's gradients: 8.9e-8 on 2 threads, 1.04e-7 on 1, against 1e-7)."""
    torch.manual_seed(0)
    torch.set_num_threads(_THREADS)
    yield


def requires_cuda():
    return pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA device")
