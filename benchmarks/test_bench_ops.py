"""Micro-benchmarks (pytest-benchmark) of the fused operators vs their PyTorch counterparts.

Run with ``pytest benchmarks/`` (``pytest tests/`` and plain ``pytest`` do not collect this folder).
Compare columns within one group, e.g. ``pytest benchmarks/ --benchmark-group-by=group``.

* dense block: ``densenet_fast.DenseBlock`` (fused operator) vs torchvision's ``_DenseBlock``
  (default and ``memory_efficient=True``), forward, backward and forward + backward, training mode.
* SE gating: ``densenet_fast.SqueezeExcite`` vs timm's ``SEModule``.
* every timed block / SE implementation is then checked against the reference with the same weights
  (output, input and parameter gradients).
* the fused 1x1 stage (``densenet_fast::bn_relu_conv1x1``: BN-ReLU prologue + 1x1 conv, the normalised
  input never stored) vs oneDNN's 1x1 convolution alone (``F.conv2d`` on a precomputed normalised input,
  channels_last) and vs BN-ReLU + the convolution in PyTorch, on densenet121's four blocks (batch 8,
  the widest 1x1 input of each block), float32 and bfloat16 (CPU). Every implementation's output is
  checked against float64. Ratios: ``python -m benchmarks.micro_report <pytest-benchmark json>``. The same
  three are also timed interleaved in one loop (``test_conv1x1_stage_interleaved``: min and median of each in
  the JSON's ``extra_info``), so that a drift of a shared machine spreads over all of them.
"""
from __future__ import annotations

import copy
import statistics
from typing import Callable, Dict, Tuple

import pytest

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")
tv_densenet = pytest.importorskip("torchvision.models.densenet")
dnf = pytest.importorskip("densenet_fast")

from torch import Tensor, nn  # noqa: E402

# name -> (N, C0, layers, growth k, H=W): DenseNet-121's first block (at half resolution, to keep a CPU
# run short) and a DenseNet-BC-100 block.
BLOCKS: Dict[str, Tuple[int, int, int, int, int]] = {
    "dn121-block1": (2, 64, 6, 32, 28),
    "bc100-block": (4, 24, 16, 12, 32),
}
SE_CASES: Dict[str, Tuple[int, int, int]] = {"c256-28x28": (8, 256, 28)}  # N, C, H=W


def _devices():
    cuda_ok = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "densenet_fast::dense_block_forward", "CUDA")
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not cuda_ok, reason="no CUDA device or kernels"))]


def _rounds(device: str) -> Dict[str, int]:
    return {"rounds": 5, "warmup_rounds": 1} if device == "cpu" else {"rounds": 50, "warmup_rounds": 5}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _blocks(case: str, device: str) -> Tuple[Dict[str, nn.Module], Tensor]:
    """The three block implementations with identical weights, and an input batch."""
    n, c0, layers, k, hw = BLOCKS[case]
    torch.manual_seed(0)
    ref = tv_densenet._DenseBlock(layers, c0, 4, k, 0.0, memory_efficient=False)
    memeff = tv_densenet._DenseBlock(layers, c0, 4, k, 0.0, memory_efficient=True)
    fused = dnf.DenseBlock(layers, c0, 4, k, 0.0)
    memeff.load_state_dict(ref.state_dict())
    fused.load_state_dict(ref.state_dict())
    mods = {"torchvision": ref, "torchvision-memeff": memeff, "densenet_fast": fused}
    x = torch.randn(n, c0, hw, hw, device=device, requires_grad=True)
    return {name: m.to(device).train() for name, m in mods.items()}, x


def _forward(mod: nn.Module, x: Tensor, device: str) -> Callable[[], Tensor]:
    def run() -> Tensor:
        out = mod(x)
        _sync(device)
        return out
    return run


IMPLS = ["torchvision", "torchvision-memeff", "densenet_fast"]


def _assert_matches(mods: Dict[str, nn.Module], impl: str, ref: str, x: Tensor, tol: float = 1e-9) -> None:
    """The timed implementation computes what the reference does with the same weights: output, input gradient
    and every parameter gradient of one forward + backward of float64 copies, relative error <= tol (in
    float32 a deep block's input gradient differs by ~1e-2 between any two implementations: roundoff
    amplified through the BN chain, torchvision's own against float64 included)."""
    if impl == ref:
        return  # the reference row itself
    results, grad = [], None
    for name in (impl, ref):
        mod = copy.deepcopy(mods[name]).double()
        xi = x.detach().double().requires_grad_(True)
        out = mod(xi)
        if grad is None:
            grad = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1)).to(out.device)
        out.backward(grad)
        results.append((out.detach(), xi.grad, [p.grad for p in mod.parameters()]))
    (y, gx, gp), (y_ref, gx_ref, gp_ref) = results
    for what, a, b in [("output", y, y_ref), ("input grad", gx, gx_ref), *[
            (f"grad {i}", a, b) for i, (a, b) in enumerate(zip(gp, gp_ref))]]:
        err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
        assert err <= tol, f"{impl} vs {ref}: {what} relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BLOCKS))
def test_dense_block_forward(benchmark, case: str, impl: str, device: str) -> None:
    mods, x = _blocks(case, device)
    benchmark.group = f"dense block forward {case} {device}"
    out = benchmark.pedantic(_forward(mods[impl], x, device), **_rounds(device))
    assert out.shape[1] == BLOCKS[case][1] + BLOCKS[case][2] * BLOCKS[case][3]
    _assert_matches(mods, impl, "torchvision", x)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BLOCKS))
def test_dense_block_backward(benchmark, case: str, impl: str, device: str) -> None:
    mods, x = _blocks(case, device)
    mod = mods[impl]
    grad = None

    def setup():  # untimed: a fresh forward graph for every timed backward
        nonlocal grad
        x.grad = None
        out = mod(x)
        grad = torch.ones_like(out) if grad is None else grad
        _sync(device)
        return (out,), {}

    def backward(out: Tensor) -> None:
        out.backward(grad)
        _sync(device)

    benchmark.group = f"dense block backward {case} {device}"
    benchmark.pedantic(backward, setup=setup, **_rounds(device))
    _assert_matches(mods, impl, "torchvision", x)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", list(BLOCKS))
def test_dense_block_forward_backward(benchmark, case: str, impl: str, device: str) -> None:
    mods, x = _blocks(case, device)
    mod = mods[impl]

    def step() -> None:
        x.grad = None
        mod.zero_grad(set_to_none=True)
        mod(x).sum().backward()
        _sync(device)

    benchmark.group = f"dense block fwd+bwd {case} {device}"
    benchmark.pedantic(step, **_rounds(device))
    _assert_matches(mods, impl, "torchvision", x)


# -- squeeze-and-excitation -------------------------------------------------------------------------
def _se_pair(case: str, device: str) -> Tuple[Dict[str, nn.Module], Tensor]:
    se_layers = pytest.importorskip("timm.layers.squeeze_excite")
    n, c, hw = SE_CASES[case]
    torch.manual_seed(0)
    ref = se_layers.SEModule(c)
    with torch.no_grad():
        for p in ref.parameters():  # non-trivial biases, so every term of the gate matters
            p.copy_(torch.randn_like(p) * 0.5)
    ours = dnf.SqueezeExcite(c)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(n, c, hw, hw, device=device, requires_grad=True)
    return {"timm": ref.to(device), "densenet_fast": ours.to(device)}, x


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
@pytest.mark.parametrize("impl", ["timm", "densenet_fast"])
@pytest.mark.parametrize("case", list(SE_CASES))
def test_se_forward_backward(benchmark, case: str, impl: str, device: str) -> None:
    mods, x = _se_pair(case, device)
    mod = mods[impl]

    def step() -> None:
        x.grad = None
        mod.zero_grad(set_to_none=True)
        mod(x).sum().backward()
        _sync(device)

    benchmark.group = f"SE fwd+bwd {case} {device}"
    benchmark.pedantic(step, **_rounds(device))
    _assert_matches(mods, impl, "timm", x)


# name -> (N, C_in, H=W): the widest 1x1-convolution input of each densenet121 block, batch 8 at 224x224.
STAGES_1X1: Dict[str, Tuple[int, int, int]] = {
    "dn121-block1": (8, 224, 56), "dn121-block2": (8, 480, 28), "dn121-block3": (8, 992, 14),
    "dn121-block4": (8, 992, 7),
}
STAGE_IMPLS = ["onednn-conv1x1", "torch-bn-relu-conv1x1", "densenet_fast"]
BOTTLENECK = 128  # densenet121's bn_size * growth


def _stage(case: str, dtype: torch.dtype):
    n, c, hw = STAGES_1X1[case]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, hw, hw, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    a = torch.rand(c, generator=g) + 0.5
    b = torch.randn(c, generator=g) * 0.5
    w = (torch.randn(BOTTLENECK, c, 1, 1, generator=g) * c ** -0.5).to(dtype)
    u = torch.relu(x.float() * a.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)).to(dtype)  # for the conv-only row
    impls = {
        "onednn-conv1x1": lambda: torch.nn.functional.conv2d(u, w),
        "torch-bn-relu-conv1x1": lambda: torch.nn.functional.conv2d(
            torch.relu(x * a.to(dtype).view(1, -1, 1, 1) + b.to(dtype).view(1, -1, 1, 1)), w),
        "densenet_fast": lambda: torch.ops.densenet_fast.bn_relu_conv1x1(x, a, b, w),
    }
    truth = torch.nn.functional.conv2d(torch.relu(x.double() * a.double().view(1, -1, 1, 1)
                                                  + b.double().view(1, -1, 1, 1)), w.double())
    return impls, truth


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", STAGE_IMPLS)
@pytest.mark.parametrize("case", list(STAGES_1X1))
def test_conv1x1_stage(benchmark, case: str, impl: str, dtype: str) -> None:
    impls, truth = _stage(case, getattr(torch, dtype))
    n, c, hw = STAGES_1X1[case]
    benchmark.group = f"1x1 stage {case} {dtype}"
    benchmark.extra_info["gflop"] = 2 * n * hw * hw * c * BOTTLENECK / 1e9
    out = benchmark.pedantic(impls[impl], rounds=30, warmup_rounds=3)  # ~1 ms kernels: the min of many
    err = ((out.double() - truth).norm() / truth.norm()).item()
    assert err < (1e-5 if dtype == "float32" else 2e-2), err  # bf16: operands rounded to 8 bits


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", list(STAGES_1X1))
def test_conv1x1_stage_interleaved(benchmark, case: str, dtype: str) -> None:
    """The three 1x1-stage implementations in one interleaved loop (benchmarks/timing.py: A B C, B C A, ...),
    30 rounds each: min and median per implementation in ``extra_info["interleaved"]`` (milliseconds), which
    micro_report turns into ratios by both. pytest-benchmark itself times one more call of ours."""
    from benchmarks.timing import interleaved_times

    impls, truth = _stage(case, getattr(torch, dtype))
    n, c, hw = STAGES_1X1[case]
    times = interleaved_times(impls, repeats=30, warmup=3, device=torch.device("cpu"))
    assert all(len(v) == 30 for v in times.values()), {k: len(v) for k, v in times.items()}
    benchmark.group = f"1x1 stage interleaved {case} {dtype}"
    benchmark.extra_info["gflop"] = 2 * n * hw * hw * c * BOTTLENECK / 1e9
    benchmark.extra_info["interleaved"] = {
        k: {"ms_min": min(v) * 1e3, "ms_median": statistics.median(v) * 1e3} for k, v in times.items()}
    out = benchmark.pedantic(impls["densenet_fast"], rounds=1, warmup_rounds=0)
    err = ((out.double() - truth).norm() / truth.norm()).item()
    assert err < (1e-5 if dtype == "float32" else 2e-2), err
