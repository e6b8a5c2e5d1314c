"""Property tests: the fused modules against torchvision's real modules, same weights.

Random geometry (layers 1-4, growth 1-8, bn_size 1-4, channels 1-17, batch 1-3, H and W 1-7),
memory layout (NCHW, channels_last, non-contiguous), train/eval, BatchNorm momentum (incl. None =
cumulative average), and requires_grad on random subsets of the input and the parameters. Compared:
outputs, every gradient (and which ones are None), running statistics and num_batches_tracked.
float64 with tight tolerances; float32 to 1e-4 on shallow blocks. Dropout is only drawn in eval (in
training the two implementations draw different random masks).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models.densenet import DenseNet as TVDenseNet
from torchvision.models.densenet import _DenseBlock, _Transition

import densenet_fast as dnf
from densenet_fast.nn.dense_block import fused_norm_relu_pool

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
TOL = {torch.float64: dict(rtol=1e-7, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}


# ------------------------------------------------------------------------------------------------
# strategies and helpers
# ------------------------------------------------------------------------------------------------
@st.composite
def spatial(draw, n_min=1, hw_min=1, training=None):
    n = draw(st.integers(1, 3))
    h = draw(st.integers(hw_min, 7))
    w = draw(st.integers(hw_min, 7))
    if training and n * h * w == 1:  # nn.BatchNorm2d refuses a single value per channel in training
        w = 2
    return n, h, w


@st.composite
def common(draw):
    return dict(training=draw(st.booleans()),
                layout=draw(st.sampled_from(["nchw", "channels_last", "strided"])),
                momentum=draw(st.sampled_from([0.1, 0.7, None])),
                grads=draw(st.sampled_from(["all", "none", "random", "input-only", "params-only"])),
                seed=draw(st.integers(0, 2**31 - 1)))


def make_input(shape, layout, dtype, gen):
    n, c, h, w = shape
    if layout == "strided":  # every other column of a wider tensor, with the channels permuted in memory
        base = torch.randn(n, h, c, 2 * w, dtype=dtype, generator=gen)
        return base.permute(0, 2, 1, 3)[..., ::2]  # neither contiguous nor channels_last (unless trivially)
    x = torch.randn(shape, dtype=dtype, generator=gen)
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x


def twin_inputs(shape, layout, dtype, seed):
    """Two equal inputs with the same layout (one for each implementation)."""
    return (make_input(shape, layout, dtype, torch.Generator().manual_seed(seed)),
            make_input(shape, layout, dtype, torch.Generator().manual_seed(seed)))


def randomise(module: nn.Module, seed: int, momentum) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(int(torch.randint(0, 5, (), generator=g)))
                m.momentum = momentum


def set_requires_grad(a: nn.Module, b: nn.Module, mode: str, seed: int) -> bool:
    """Same requires_grad pattern on both; returns whether the input requires grad."""
    g = torch.Generator().manual_seed(seed + 1)
    for (_, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        flag = {"all": True, "none": False, "input-only": False, "params-only": True,
                "random": bool(torch.rand((), generator=g) < 0.5)}[mode]
        p.requires_grad_(flag)
        q.requires_grad_(flag)
    return mode in ("all", "input-only") or (mode == "random" and bool(torch.rand((), generator=g) < 0.5))


def compare(ref: nn.Module, ours: nn.Module, xa, xb, ya, yb, dtype, seed, what: str) -> None:
    tol = TOL[dtype]
    torch.testing.assert_close(yb, ya, **tol, msg=lambda m: f"{what} output: {m}")
    needs = [t for t in [xa, *ref.parameters()] if t.requires_grad]
    if needs:
        g = torch.randn(ya.shape, dtype=dtype, generator=torch.Generator().manual_seed(seed + 2))
        ya.backward(g)
        yb.backward(g)
    if xa.requires_grad:
        torch.testing.assert_close(xb.grad, xa.grad, **tol, msg=lambda m: f"{what} input grad: {m}")
    for (name, p), (_, q) in zip(ref.named_parameters(), ours.named_parameters()):
        assert (p.grad is None) == (q.grad is None), f"{what}: grad of {name} present in one implementation only"
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, **tol, msg=lambda m: f"{what} grad of {name}: {m}")
    compare_buffers(ref, ours, dtype, what)


def compare_buffers(ref: nn.Module, ours: nn.Module, dtype, what: str) -> None:
    for (name, p), (_, q) in zip(ref.named_buffers(), ours.named_buffers()):
        if p.is_floating_point():
            torch.testing.assert_close(q, p, **TOL[dtype], msg=lambda m: f"{what} {name}: {m}")
        else:
            assert torch.equal(q, p), f"{what} {name}: {q} != {p}"


def no_fallback():
    """The fused path must run: any fallback warning is an error."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("error", RuntimeWarning)
    return ctx


# ------------------------------------------------------------------------------------------------
# dense block
# ------------------------------------------------------------------------------------------------
@st.composite
def block_cases(draw, max_layers=4):
    c = draw(common())
    n, h, w = draw(spatial(training=c["training"]))
    c.update(layers=draw(st.integers(1, max_layers)), growth=draw(st.integers(1, 8)), bn_size=draw(st.integers(1, 4)),
             channels=draw(st.integers(1, 17)), n=n, h=h, w=w,
             drop_rate=0.0 if c["training"] else draw(st.sampled_from([0.0, 0.3])))
    return c


def run_block_case(c, dtype):
    torch.manual_seed(c["seed"])
    ref = _DenseBlock(c["layers"], c["channels"], c["bn_size"], c["growth"], c["drop_rate"]).to(dtype)
    randomise(ref, c["seed"], c["momentum"])
    ours = dnf.DenseBlock(c["layers"], c["channels"], c["bn_size"], c["growth"], c["drop_rate"], impl="fused").to(dtype)
    ours.load_state_dict(ref.state_dict())
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = c["momentum"]
    ref.train(c["training"])
    ours.train(c["training"])
    input_grad = set_requires_grad(ref, ours, c["grads"], c["seed"])
    xa, xb = twin_inputs((c["n"], c["channels"], c["h"], c["w"]), c["layout"], dtype, c["seed"])
    xa.requires_grad_(input_grad)
    xb.requires_grad_(input_grad)
    ctx = no_fallback()
    try:
        assert ours.can_fuse(xb)
        yb = ours(xb)
    finally:
        ctx.__exit__(None, None, None)
    ya = ref(xa)
    compare(ref, ours, xa, xb, ya, yb, dtype, c["seed"], "block")
    if c["training"]:  # a second step: running statistics keep agreeing (momentum=None: cumulative average)
        with torch.no_grad():
            torch.testing.assert_close(ours(xb * 0.5 + 1), ref(xa * 0.5 + 1), **TOL[dtype])
        compare_buffers(ref, ours, dtype, "block (second step)")


@settings(max_examples=60, **SETTINGS)
@given(block_cases())
def test_block_matches_torchvision_fp64(c):
    run_block_case(c, torch.float64)


@settings(max_examples=25, **SETTINGS)
@given(block_cases(max_layers=2))
def test_block_matches_torchvision_fp32_shallow(c):
    run_block_case(c, torch.float32)


# ------------------------------------------------------------------------------------------------
# transition and final norm
# ------------------------------------------------------------------------------------------------
@st.composite
def tail_cases(draw, hw_min):
    c = draw(common())
    n, h, w = draw(spatial(hw_min=hw_min, training=c["training"]))
    c.update(channels=draw(st.integers(1, 17)), out=draw(st.integers(1, 9)), n=n, h=h, w=w,
             dtype=draw(st.sampled_from([torch.float64, torch.float32])))
    return c


@settings(max_examples=40, **SETTINGS)
@given(tail_cases(hw_min=2))
def test_transition_matches_torchvision(c):
    dtype = c["dtype"]
    torch.manual_seed(c["seed"])
    ref = _Transition(c["channels"], c["out"]).to(dtype)
    randomise(ref, c["seed"], c["momentum"])
    ours = dnf.Transition(c["channels"], c["out"]).to(dtype)
    ours.load_state_dict(ref.state_dict())
    ours.norm.momentum = c["momentum"]
    ref.train(c["training"])
    ours.train(c["training"])
    input_grad = set_requires_grad(ref, ours, c["grads"], c["seed"])
    xa, xb = twin_inputs((c["n"], c["channels"], c["h"], c["w"]), c["layout"], dtype, c["seed"])
    xa.requires_grad_(input_grad)
    xb.requires_grad_(input_grad)
    assert ours.can_fuse(xb)
    compare(ref, ours, xa, xb, ref(xa), ours(xb), dtype, c["seed"], "transition")


class _FinalNorm(nn.Module):
    """torchvision's DenseNet tail: relu(norm5(x)) -> adaptive_avg_pool2d(1) -> flatten."""

    def __init__(self, c):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.flatten(F.adaptive_avg_pool2d(F.relu(self.norm(x)), (1, 1)), 1)


class _FusedFinalNorm(_FinalNorm):
    def forward(self, x):
        return fused_norm_relu_pool(self.norm, x)


@settings(max_examples=40, **SETTINGS)
@given(tail_cases(hw_min=1))
def test_final_norm_matches_torchvision(c):
    dtype = c["dtype"]
    ref = _FinalNorm(c["channels"]).to(dtype)
    randomise(ref, c["seed"], c["momentum"])
    ours = _FusedFinalNorm(c["channels"]).to(dtype)
    ours.load_state_dict(ref.state_dict())
    ours.norm.momentum = c["momentum"]
    ref.train(c["training"])
    ours.train(c["training"])
    input_grad = set_requires_grad(ref, ours, c["grads"], c["seed"])
    xa, xb = twin_inputs((c["n"], c["channels"], c["h"], c["w"]), c["layout"], dtype, c["seed"])
    xa.requires_grad_(input_grad)
    xb.requires_grad_(input_grad)
    compare(ref, ours, xa, xb, ref(xa), ours(xb), dtype, c["seed"], "final norm")


# ------------------------------------------------------------------------------------------------
# whole model: fused blocks hand their statistics to transitions and the final norm
# ------------------------------------------------------------------------------------------------
@st.composite
def model_cases(draw):
    c = draw(common())
    c.update(growth=draw(st.integers(1, 6)), bn_size=draw(st.integers(1, 3)), init=draw(st.integers(1, 9)),
             blocks=tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))), n=draw(st.integers(2, 3)),
             hw=draw(st.integers(16, 23)))
    return c


@settings(max_examples=12, **SETTINGS)
@given(model_cases())
def test_densenet_matches_torchvision(c):
    kw = dict(growth_rate=c["growth"], block_config=c["blocks"], num_init_features=c["init"], bn_size=c["bn_size"],
              num_classes=5)
    torch.manual_seed(c["seed"])
    ref = TVDenseNet(**kw).double()
    randomise(ref, c["seed"], c["momentum"])
    ours = dnf.DenseNet(**kw).double()
    ours.load_state_dict(ref.state_dict())
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = c["momentum"]
    ref.train(c["training"])
    ours.train(c["training"])
    input_grad = set_requires_grad(ref, ours, c["grads"], c["seed"])
    xa, xb = twin_inputs((c["n"], 3, c["hw"], c["hw"]), c["layout"], torch.float64, c["seed"])
    xa.requires_grad_(input_grad)
    xb.requires_grad_(input_grad)
    ctx = no_fallback()
    try:
        yb = ours(xb)
    finally:
        ctx.__exit__(None, None, None)
    compare(ref, ours, xa, xb, ref(xa), yb, torch.float64, c["seed"], "densenet")
