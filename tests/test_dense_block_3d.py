"""The fused operators on 5-D volumes [N, C, D, H, W] (3x3x3 convolutions, 2x2x2 transition pool).

* DenseBlock / Transition / fused final norm with ``spatial_dims=3`` against the plain PyTorch
  computation (torch's BatchNorm3d / Conv3d / AvgPool3d) in fp64: outputs, every gradient, running
  statistics, train and eval, odd D, H, W, dropout with an explicit mask;
* gradcheck of the three operators on tiny odd volumes; opcheck (fake kernels, autograd registration);
* torch.compile(fullgraph=True) of a small 3D DenseNet;
* the CUDA implementation's host emulation (csrc/cuda/*_impl.h compiled for the CPU) on 5-D input;
* fp32 against the fp64 truth.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import rel_err  # noqa: E402

import densenet_fast as dnf  # noqa: E402
from densenet_fast.nn.dense_block import fused_norm_relu_pool  # noqa: E402
from densenet_fast.ops import BlockParams, fused_dense_block, norm_relu_pool, transition  # noqa: E402

OPS = torch.ops.densenet_fast
VOLUMES = [(2, 3, 5, 4), (1, 5, 3, 7), (3, 2, 2, 3)]  # (N, D, H, W): odd sizes, a batch of one


def _randomize(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return module


def _compare_modules(fused, ref, x, tol):
    """Forward + backward of both modules on x (fresh leaves); outputs, input/param grads, buffers."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fused(xa), ref(xb)
    assert rel_err(ya, yb) <= tol, f"output {rel_err(ya, yb):.2e}"
    grad = torch.randn_like(yb)
    ya.backward(grad), yb.backward(grad)
    assert rel_err(xa.grad, xb.grad) <= tol, f"input grad {rel_err(xa.grad, xb.grad):.2e}"
    for (n, p), (_, q) in zip(fused.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, q.grad) <= tol, f"grad {n}: {rel_err(p.grad, q.grad):.2e}"
    for (n, a), (_, b) in zip(fused.named_buffers(), ref.named_buffers()):
        if b.dtype == torch.long:
            assert torch.equal(a, b), n
        else:
            assert rel_err(a, b) <= tol, f"buffer {n}: {rel_err(a, b):.2e}"
    return ya


@pytest.mark.parametrize("vol", VOLUMES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_block_3d_matches_reference_fp64(vol, training):
    N, D, H, W = vol
    block = _randomize(dnf.DenseBlock(3, 4, 2, 3, spatial_dims=3)).double().train(training)
    ref = copy.deepcopy(block)
    ref.impl = "reference"
    assert isinstance(block.denselayer1.conv2, torch.nn.Conv3d) and block.denselayer1.conv2.kernel_size == (3, 3, 3)
    x = torch.randn(N, 4, D, H, W, dtype=torch.float64)
    out = _compare_modules(block, ref, x, 1e-10)
    assert out.shape == (N, 4 + 3 * 3, D, H, W) and out.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("vol", VOLUMES[:2] + [(2, 4, 4, 4)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_transition_3d_matches_reference_fp64(vol, training):
    N, D, H, W = vol
    t = _randomize(dnf.Transition(6, 4, spatial_dims=3)).double().train(training)
    ref = copy.deepcopy(t)
    ref.impl = "reference"
    assert isinstance(t.pool, torch.nn.AvgPool3d)
    x = torch.randn(N, 6, D, H, W, dtype=torch.float64)
    out = _compare_modules(t, ref, x, 1e-10)
    assert out.shape == (N, 4, D // 2, H // 2, W // 2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_final_norm_3d_matches_reference_fp64(training):
    bn = _randomize(torch.nn.BatchNorm3d(5)).double().train(training)
    ref = copy.deepcopy(bn)
    x = torch.randn(2, 5, 3, 5, 4, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fused_norm_relu_pool(bn, xa)
    yb = F.adaptive_avg_pool3d(F.relu(ref(xb)), 1).flatten(1)
    assert rel_err(ya, yb) <= 1e-12
    g = torch.randn_like(yb)
    ya.backward(g), yb.backward(g)
    for a, b in ((xa.grad, xb.grad), (bn.weight.grad, ref.weight.grad), (bn.bias.grad, ref.bias.grad),
                 (bn.running_mean, ref.running_mean), (bn.running_var, ref.running_var)):
        assert rel_err(a, b) <= 1e-12
    assert torch.equal(bn.num_batches_tracked, ref.num_batches_tracked)


def test_block_3d_dropout_mask_matches_reference():
    block = _randomize(dnf.DenseBlock(2, 3, 2, 2, spatial_dims=3)).double()
    x = torch.randn(2, 3, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 4, 3, 4, 5) > 0.3
    out = fused_dense_block(x, block.block_params(), training=True, drop_rate=0.3, dropout_mask=mask).buffer
    feats = [x]
    for i, layer in enumerate(block.values()):
        new = layer.conv2(F.relu(layer.norm2(layer.conv1(F.relu(layer.norm1(torch.cat(feats, 1)))))))
        feats.append(new * mask[:, 2 * i:2 * i + 2].double() / 0.7)
    assert rel_err(out, torch.cat(feats, 1)) <= 1e-12


# -- operator-level checks -----------------------------------------------------------------------------


def _block_args(N=2, C0=3, D=3, H=3, W=5, L=2, k=2, bs=2, training=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    inter = bs * k
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = r(N, C0, D, H, W)
    p = [[], [], [], [], [], [], [], [], [], []]
    for layer in range(L):
        c = C0 + layer * k
        for i, t in enumerate((1 + 0.3 * r(c), 0.2 * r(c), r(inter, c, 1, 1, 1) / c ** 0.5, 1 + 0.3 * r(inter),
                               0.2 * r(inter), r(k, inter, 3, 3, 3) / (27 * inter) ** 0.5, 0.1 * r(c),
                               0.5 + r(c).abs(), 0.1 * r(inter), 0.5 + r(inter).abs())):
            p[i].append(t)
    return x, BlockParams(*p)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_block_3d(training):
    x, P = _block_args(training=training)
    leaves = [x.requires_grad_()] + [t.requires_grad_() for lst in P[:6] for t in lst]
    n = len(P.conv2_weight)

    def f(x, *flat):
        params = BlockParams(*[list(flat[i * n:(i + 1) * n]) for i in range(6)], *P[6:])
        return fused_dense_block(x, params, training=training).buffer

    assert torch.autograd.gradcheck(f, tuple(leaves), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_tails_3d(training):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 3, 5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = (1 + 0.3 * torch.randn(3, dtype=torch.float64, generator=g)).requires_grad_()
    b = (0.2 * torch.randn(3, dtype=torch.float64, generator=g)).requires_grad_()
    cw = torch.randn(2, 3, 1, 1, 1, dtype=torch.float64, generator=g).requires_grad_()
    rm, rv = 0.1 * torch.randn(3, dtype=torch.float64), 0.5 + torch.rand(3, dtype=torch.float64)

    def stats(x):
        if not training:
            return rm, rv
        return x.mean((0, 2, 3, 4)), x.var((0, 2, 3, 4), unbiased=False)

    def trans(x, w, b, cw):
        m, v = stats(x.detach())  # the operator differentiates through its batch statistics itself
        return transition(x, m, v, w, b, cw, training=training)

    def pool(x, w, b):
        m, v = stats(x.detach())
        return norm_relu_pool(x, m, v, w, b, training=training)

    assert torch.autograd.gradcheck(trans, (x, w, b, cw), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)
    assert torch.autograd.gradcheck(pool, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_3d(training):
    x, P = _block_args(training=training)
    running = list(P[6:]) if not training else [[], [], [], []]
    params = [[t.requires_grad_() for t in lst] for lst in P[:6]]
    torch.library.opcheck(OPS.dense_block_forward, (x.requires_grad_(), *params, *running, None, 0.0, training, 1e-5))
    xt = torch.randn(2, 5, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    m, v = (xt.detach().mean((0, 2, 3, 4)), xt.detach().var((0, 2, 3, 4), unbiased=False)) if training else \
        (torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64))
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    b = torch.rand(5, dtype=torch.float64, requires_grad=True)
    cw = torch.randn(3, 5, 1, 1, 1, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(OPS.transition_forward, (xt, m, v, w, b, cw, training, 1e-5))
    torch.library.opcheck(OPS.norm_relu_pool_forward, (xt, m, v, w, b, training, 1e-5))
    torch.library.opcheck(OPS.channel_moments, (xt.detach(),))


def test_fp32_block_3d_against_fp64_truth():
    """fp32 fused vs fp64 truth no worse than 2x the plain fp32 PyTorch block's own error."""
    block = _randomize(dnf.DenseBlock(4, 8, 2, 4, spatial_dims=3))
    x = torch.randn(2, 8, 5, 6, 7)
    truth = copy.deepcopy(block).double()
    truth.impl = "reference"
    ref32 = copy.deepcopy(block)
    ref32.impl = "reference"
    t, o, r = truth(x.double()), block(x), ref32(x)
    assert rel_err(o, t) <= max(2 * rel_err(r, t), 1e-6)


class _Small3d(torch.nn.Module):
    """stem conv -> block -> transition -> block -> final norm + ReLU + global pool -> linear, all 3-D."""

    def __init__(self):
        super().__init__()
        from collections import OrderedDict

        from densenet_fast.nn.fused_features import FusedFeatures
        self.features = FusedFeatures(OrderedDict([
            ("conv0", torch.nn.Conv3d(1, 4, 3, stride=2, padding=1, bias=False)),
            ("denseblock1", dnf.DenseBlock(2, 4, 2, 2, spatial_dims=3)),
            ("transition1", dnf.Transition(8, 4, spatial_dims=3)),
            ("denseblock2", dnf.DenseBlock(2, 4, 2, 2, spatial_dims=3)),
            ("norm5", torch.nn.BatchNorm3d(8))]))
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.features.forward_pooled(x, relu=True))


def test_compile_fullgraph_3d_model():
    model = _randomize(_Small3d()).double()
    ref = copy.deepcopy(model)
    ref.features.impl = "reference"
    graphs = []

    def backend(gm, example_inputs):  # records the captured graph: the fused operators must be in it
        graphs.append(str(gm.graph))
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 1, 9, 11, 13, dtype=torch.float64)
    out, expected = compiled(x), ref(x)
    for op in ("dense_block_forward", "transition_forward", "norm_relu_pool_forward"):
        assert any(op in g for g in graphs), op
    assert rel_err(out, expected) <= 1e-10
    out.sum().backward(), expected.sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-9, n


# -- the CUDA implementation, emulated on the CPU ---------------------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cuda_path_emulated_3d(emu, training):
    x, P = _block_args(training=training)
    running = list(P[6:]) if not training else [[], [], [], []]
    mask = torch.rand(2, 4, 3, 3, 5) > 0.25 if training else None
    p = 0.25 if training else 0.0
    args = (x, *P[:6], *running, mask, p, training, 1e-5)
    ours, spec = emu.dense_block_forward(*args), OPS.dense_block_forward(*args)
    for u, v in zip(ours, spec):
        assert u.shape == v.shape and (v.numel() == 0 or rel_err(u, v) <= 1e-12)
    grad = torch.randn_like(spec[0])
    bargs = (grad, *spec, *P[:6], *running, mask, p, training, 1e-5, x.shape[1])
    for got, want in zip(emu.dense_block_backward(*bargs), OPS.dense_block_backward(*bargs)):
        for u, v in (zip(got, want) if isinstance(got, (list, tuple)) else [(got, want)]):
            assert u.shape == v.shape and rel_err(u, v) <= 1e-12
    xt = torch.randn(2, 5, 5, 4, 3, dtype=torch.float64)
    mean, var = xt.mean((0, 2, 3, 4)), xt.var((0, 2, 3, 4), unbiased=False)
    w, b, cw = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64), torch.randn(3, 5, 1, 1, 1,
                                                                                                     dtype=torch.float64)
    targs = (xt, mean, var, w, b, cw, training, 1e-5)
    out = OPS.transition_forward(*targs)
    assert rel_err(emu.transition_forward(*targs), out) <= 1e-12
    go = torch.randn_like(out)
    got, want = emu.transition_backward(go, *targs), OPS.transition_backward(go, *targs)
    assert got[4].numel() == want[4].numel() == 0  # no gate, no gate gradient
    for u, v in zip(got[:4], want[:4]):
        assert u.shape == v.shape and rel_err(u, v) <= 1e-12
    pargs = (xt, mean, var, w, b, training, 1e-5)
    assert rel_err(emu.norm_relu_pool_forward(*pargs), OPS.norm_relu_pool_forward(*pargs)) <= 1e-12
    gp = torch.randn(2, 5, dtype=torch.float64)
    got, want = emu.norm_relu_pool_backward(gp, *pargs), OPS.norm_relu_pool_backward(gp, *pargs)
    assert got[3].numel() == want[3].numel() == 0
    for u, v in zip(got[:3], want[:3]):
        assert rel_err(u, v) <= 1e-12
