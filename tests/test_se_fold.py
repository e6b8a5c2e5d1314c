"""SE gate folded into the next BN reader (densenet_fast/nn/se_fold.py, docs/design.md §5).

The reference is timm's ``SEModule`` followed by torchvision's ``_Transition`` (or BatchNorm2d -> ReLU ->
global average pool, torchvision's head), loaded with the same weights: it materialises the gated tensor
and computes its own batch statistics. Ours never builds the gated tensor: the transition / final-norm
operators take the block buffer and the gate [N, C].
"""
from __future__ import annotations

import copy
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from conftest import rel_err  # noqa: E402

import densenet_fast as dnf  # noqa: E402
from densenet_fast.nn.dense_block import Transition  # noqa: E402
from densenet_fast.nn.fused_features import FusedFeatures  # noqa: E402
from densenet_fast.nn.squeeze_excite import SqueezeExcite  # noqa: E402
from densenet_fast.ops import squeeze_excite as se_ops  # noqa: E402
from densenet_fast.ops import tail as tail_ops  # noqa: E402

tvd = pytest.importorskip("torchvision.models.densenet")
SEModule = pytest.importorskip("timm.layers.squeeze_excite").SEModule
OPS = torch.ops.densenet_fast


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    monkeypatch.setenv(se_ops.BACKEND_ENV, "auto")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors
    yield
    torch.set_num_threads(threads)


def _randomize(module: nn.Module) -> None:
    """Non-trivial BN affine parameters, running statistics and SE weights, so every term matters."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("norm.weight") else 0.0))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.3)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)


def _pair(c: int, r: int, c_out: int, dtype, final: bool):
    """(ours, reference): FusedFeatures(se, transition | norm5) and timm SEModule + torchvision modules."""
    se = SqueezeExcite(c, rd_channels=r)
    reader = nn.BatchNorm2d(c) if final else Transition(c, c_out)
    ours = FusedFeatures(OrderedDict([("se", se), ("norm5" if final else "transition", reader)]))
    ref_reader = nn.BatchNorm2d(c) if final else tvd._Transition(c, c_out)
    ref = nn.Sequential(OrderedDict([("se", SEModule(c, rd_channels=r)),
                                     ("norm5" if final else "transition", ref_reader)]))
    _randomize(ours)
    ref.load_state_dict(ours.state_dict(), strict=True)
    return ours.to(dtype), ref.to(dtype)


def _run(model, x, final: bool, ours: bool):
    """Output (forward_pooled for the final norm, as DenseNet.forward) and grads of one step."""
    x = x.detach().clone().requires_grad_(True)
    if final:
        out = model.forward_pooled(x) if ours else F.adaptive_avg_pool2d(F.relu(model(x)), 1).flatten(1)
    else:
        out = model(x)
    dy = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(7))
    out.backward(dy)
    return out.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


SHAPES = [(2, 6, 7, 9), (3, 5, 4, 4), (1, 7, 5, 6), (4, 9, 3, 5)]


def _check(what: str, got, want, truth, tol: float) -> None:
    """fp64: ``got`` vs the reference within ``tol``. fp32: ``got`` and the fp32 reference ``want`` vs the fp64
    reference ``truth``; ours may be off by ``tol`` or by up to 4x the fp32 reference's own error (training
    BN makes the gate gradient a near-cancelling sum, so both fp32 results carry visible roundoff there)."""
    if truth is None:
        err = rel_err(got, want)
        assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"
        return
    err, ref_err = rel_err(got.double(), truth), rel_err(want.double(), truth)
    assert err <= max(tol, 4 * ref_err), f"{what}: error {err:.3g} vs fp64 (torchvision/timm fp32: {ref_err:.3g})"


@pytest.mark.parametrize("final", [False, True], ids=["transition", "final_norm"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
def test_folded_parity_with_timm_and_torchvision(shape, layout, training, final, dtype, tol, monkeypatch):
    n, c, h, w = shape
    ours, ref = _pair(c, 3, 4, dtype, final)
    truth = copy.deepcopy(ref).double() if dtype != torch.float64 else None
    for m in (ours, ref, truth):
        if m is not None:
            m.train(training)
    folded = []  # gate_of runs only on the folded path
    original = SqueezeExcite.gate_of
    monkeypatch.setattr(SqueezeExcite, "gate_of", lambda self, x: folded.append(1) or original(self, x))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    for step in range(2):  # the second step starts from the running statistics the first one moved
        x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
        y, dx, grads = _run(ours, x, final, True)
        y_ref, dx_ref, grads_ref = _run(ref, x, final, False)
        y_t, dx_t, grads_t = _run(truth, x.double(), final, False) if truth is not None else (None, None, {})
        _check(f"step {step}: output", y, y_ref, y_t, tol)
        _check(f"step {step}: input grad", dx, dx_ref, dx_t, tol)
        assert grads.keys() == grads_ref.keys() and {"se.fc1.weight", "se.fc2.bias"} <= grads.keys()
        for name in grads:
            _check(f"step {step}: grad of {name}", grads[name], grads_ref[name], grads_t.get(name), tol)
        for m in (ours, ref, truth):
            if m is not None:
                m.zero_grad()
    assert len(folded) == 2
    buffers, buffers_ref = dict(ours.named_buffers()), dict(ref.named_buffers())
    for name, b in buffers.items():
        if name.endswith("num_batches_tracked"):
            assert b.item() == buffers_ref[name].item() == (2 if training else 0), name
        else:
            assert rel_err(b, buffers_ref[name]) <= tol, f"buffer {name}"


def test_se_densenet_folded_saves_one_gate_per_se():
    """Bytes saved for backward: the folded SE-DenseNet saves the plain model's tensors plus, per SE, the gate
    [N, C] and its reader's own statistics [2, C]; unfolded, it saves each gated block output as well."""
    from benchmarks.measure import saved_tensor_bytes

    kw = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5)
    plain = dnf.DenseNet(**kw)
    se = dnf.SEDenseNet(**kw, se_ratio=0.25)
    se.load_state_dict(plain.state_dict(), strict=False)
    unfolded = copy.deepcopy(se)
    unfolded.features.fold_se = False
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 5, (3,))
    base = saved_tensor_bytes(plain, x, y)["saved_bytes"]
    widths = [m.fc1.in_channels for m in se.modules() if isinstance(m, SqueezeExcite)]
    gates = sum((x.shape[0] + 2) * c * 4 for c in widths)
    assert saved_tensor_bytes(se, x, y)["saved_bytes"] - base <= gates
    assert saved_tensor_bytes(unfolded, x, y)["saved_bytes"] - base > gates + 3 * widths[-1] * 8 * 4


# --- operators -------------------------------------------------------------------------------------
def _op_args(n=2, c=5, h=5, w=7, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, dtype=dtype, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.rand(c, dtype=dtype, generator=g) + 0.5
    bias = torch.randn(c, dtype=dtype, generator=g) * 0.3
    conv = torch.randn(3, c, 1, 1, dtype=dtype, generator=g)
    gate = torch.rand(n, c, dtype=dtype, generator=g) + 0.1
    rm, rv = torch.randn(c, dtype=dtype, generator=g) * 0.2, torch.rand(c, dtype=dtype, generator=g) + 0.5
    return x, weight, bias, conv, gate, rm, rv


def _gated_stats(x, gate):
    m, v = tail_ops.sample_moments(x)
    return tail_ops.gated_channel_moments(m, v, gate)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op", ["transition", "norm_relu_pool"])
def test_gradcheck_gated_ops(op, training):
    x, weight, bias, conv, gate, rm, rv = _op_args()

    def f(x, weight, bias, conv, gate):
        # training: the statistics are recomputed from the perturbed x and gate (they carry no gradient;
        # the operator's backward holds their terms)
        mean, var = _gated_stats(x, gate) if training else (rm, rv)
        if op == "transition":
            return tail_ops.transition(x, mean, var, weight, bias, conv, training=training, gate=gate)
        return tail_ops.norm_relu_pool(x, mean, var, weight, bias, training=training, gate=gate)

    inputs = [t.detach().clone().requires_grad_(True) for t in (x, weight, bias, conv, gate)]
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_squeeze_and_gate():
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert torch.autograd.gradcheck(lambda t: tail_ops.sample_moments(t)[0], [x.requires_grad_(True)])
    w1, b1 = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    w2, b2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    inputs = [t.detach().clone().requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    assert torch.autograd.gradcheck(lambda *a: se_ops.se_gate_of(*a)[0], inputs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck(training):
    x, weight, bias, conv, gate, rm, rv = _op_args(dtype=torch.float32)
    mean, var = _gated_stats(x, gate) if training else (rm, rv)
    x.requires_grad_(True), gate.requires_grad_(True), conv.requires_grad_(True)
    torch.library.opcheck(OPS.transition_forward, (x, mean, var, weight, bias, conv, training, 1e-5, gate))
    torch.library.opcheck(OPS.norm_relu_pool_forward, (x, mean, var, weight, bias, training, 1e-5, gate))
    torch.library.opcheck(OPS.sample_moments, (x,))
    w1, w2 = torch.randn(3, 5, requires_grad=True), torch.randn(5, 3, requires_grad=True)
    torch.library.opcheck(OPS.se_gate_of, (x, w1, None, w2, torch.randn(5)))


def test_ungated_backward_returns_empty_gate_grad():
    x, weight, bias, conv, gate, rm, rv = _op_args()
    out = OPS.transition_backward(torch.ones(2, 3, 2, 3, dtype=x.dtype), x, rm, rv, weight, bias, conv, False, 1e-5)
    assert len(out) == 5 and out[4].numel() == 0
    gated = OPS.transition_backward(torch.ones(2, 3, 2, 3, dtype=x.dtype), x, rm, rv, weight, bias, conv, False,
                                    1e-5, gate)
    assert gated[4].shape == (2, 5) and gated[4].dtype == gate.dtype


def test_gate_of_ones_matches_ungated():
    """A gate of ones is the ungated operator, bit for bit (the prologue multiplies by exactly 1)."""
    x, weight, bias, conv, gate, rm, rv = _op_args(dtype=torch.float32)
    ones = torch.ones_like(gate)
    for training in (True, False):
        mean, var = (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)) if training else (rm, rv)
        a = OPS.transition_forward(x, mean, var, weight, bias, conv, training, 1e-5)
        b = OPS.transition_forward(x, mean, var, weight, bias, conv, training, 1e-5, ones)
        assert torch.equal(a, b)
        go = torch.randn_like(a)
        ga = OPS.transition_backward(go, x, mean, var, weight, bias, conv, training, 1e-5)
        gb = OPS.transition_backward(go, x, mean, var, weight, bias, conv, training, 1e-5, ones)
        for u, v in zip(ga[:4], gb[:4]):
            assert torch.equal(u, v)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_gradients(training):
    """aot_eager traces the fold (se_gate_of, sample_moments, gated transition / final norm and their
    autograd) in one graph; outputs and every gradient match eager."""
    model = dnf.SEDenseNet(4, (2, 2), 8, 2, num_classes=5, se_ratio=0.25).train(training)
    _randomize(model)
    twin = copy.deepcopy(model)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 16, 16)
    y, y_c = model(x), compiled(x)
    torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-6)
    if training:
        y.square().sum().backward()
        y_c.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def _se_after_blocks(model: nn.Module, x) -> nn.Module:
    """A timm SEModule after every dense block of a torchvision / timm DenseNet's features (SE-DenseNet style)."""
    children, h = OrderedDict(), x
    for name, m in model.features.named_children():
        h = m(h)
        children[name] = m
        if name.startswith("denseblock"):
            children["se" + name[len("denseblock"):]] = SEModule(h.shape[1], rd_ratio=0.25)
    model.features = nn.Sequential(children)
    _randomize(model)
    return model.double()


@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_convert_se_densenet_style_models_use_the_fold(family, monkeypatch):
    """convert() of a torchvision / timm DenseNet with an SEModule after each block: every SE is folded into the
    transition / final norm after it, with fp64 parity (outputs, every gradient, running stats) to the original."""
    if family == "torchvision":
        model = tvd.DenseNet(4, (2, 3), 8, 2, num_classes=5)
    else:
        model = pytest.importorskip("timm.models.densenet").DenseNet(4, (2, 3), num_classes=5)
    model = _se_after_blocks(model, torch.randn(2, 3, 32, 32))
    ref = copy.deepcopy(model).train()
    dnf.convert(model)
    model.train()
    folded = []
    original = SqueezeExcite.gate_of
    monkeypatch.setattr(SqueezeExcite, "gate_of", lambda self, x: folded.append(1) or original(self, x))
    for _ in range(2):
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        y, dx, grads = _run(model, x, False, True)
        y_ref, dx_ref, grads_ref = _run(ref, x, False, False)
        assert rel_err(y, y_ref) <= 1e-9 and rel_err(dx, dx_ref) <= 1e-9
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            assert rel_err(grads[name], grads_ref[name]) <= 1e-9, name
        model.zero_grad(), ref.zero_grad()
    assert len(folded) == 2 * 2  # two SEs, two steps
    for (name, b), b_ref in zip(model.named_buffers(), ref.buffers()):
        assert rel_err(b.double(), b_ref.double()) <= 1e-9, name
