"""Issue 4: the fused dense-block operator against torchvision's _DenseBlock / _Transition."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_buffers_close, assert_close_rel, tv_block_pair
from convert_utils import randomize_bn
from op_tester import OpTester
from torch import nn
from torchvision.models import densenet as tv

import densenet_fast as dnf
from densenet_fast.nn.dense_block import fused_norm_relu_pool
from densenet_fast.nn.fused_features import fused_stem
from densenet_fast.ops import BlockParams, channel_moments, fused_dense_block, norm_relu_pool, transition


def _blocks(L, C0, bn_size, k, dtype=torch.float32, drop_rate=0.0):
    return tv_block_pair(L, C0, bn_size, k, dtype, drop_rate=drop_rate)


def _run(block, x, grad):
    x = x.detach().clone().requires_grad_(True)
    y = block(x)
    y.backward(grad)
    return y.detach(), x.grad, {n: p.grad for n, p in block.named_parameters()}


def _compare_block(ref, ours, x, tol, train=True, steps=2):
    ref.train(train), ours.train(train)
    for step in range(steps):
        g = torch.randn(x.shape[0], ref_channels(ref, x), *x.shape[2:], dtype=x.dtype)
        yr, gxr, gpr = _run(ref, x, g)
        yo, gxo, gpo = _run(ours, x, g)
        assert_close_rel(yo, yr, tol, f"output step {step}")
        assert_close_rel(gxo, gxr, tol, f"input grad step {step}")
        for n in gpr:
            assert_close_rel(gpo[n], gpr[n], tol, f"grad {n}")
            ref.get_parameter(n).grad = None
            ours.get_parameter(n).grad = None
    assert_buffers_close(ours, ref, tol)


def ref_channels(ref, x):
    layers = list(ref.values())
    return x.shape[1] + len(layers) * layers[0].conv2.out_channels


# -- the operators against the reference modules, over device x dtype x layout x train/eval x shape ------------
class TestDenseBlockOp(OpTester):
    """The fused block (DenseBlock) against torchvision's _DenseBlock."""

    SHAPES = [(1, 1, 1, 1, 2, 1, 3), (3, 5, 2, 3, 3, 3, 3), (2, 7, 1, 1, 2, 7, 5), (4, 16, 4, 8, 2, 13, 13),
              (5, 3, 3, 5, 2, 5, 6), (1, 3, 4, 2, 3, 1, 1)]  # (L, C0, bn_size, k, N, H, W)
    TOL = {torch.float32: 1e-4, torch.float64: 1e-10}

    def make(self, shape, dtype):
        L, C0, bn_size, k, N, H, W = shape
        ref, ours = _blocks(L, C0, bn_size, k, dtype)
        return ref, ours, torch.randn(N, C0, H, W, dtype=dtype)


class TestTransitionOp(OpTester):
    """The fused transition against torchvision's _Transition."""

    SHAPES = [(6, 3, 3, 2, 2), (6, 3, 3, 5, 7), (6, 3, 3, 8, 8), (5, 1, 2, 3, 3)]  # (C, C_out, N, H, W)
    TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

    def make(self, shape, dtype):
        C, Cout, N, H, W = shape
        ref = randomize_bn(tv._Transition(C, Cout)).to(dtype)
        ours = dnf.Transition(C, Cout).to(dtype)
        ours.load_state_dict(ref.state_dict())
        return ref, ours, torch.randn(N, C, H, W, dtype=dtype)


class _BnReader(nn.Module):
    """A BatchNorm2d read by an epilogue: ``fn(bn, x)``."""

    def __init__(self, bn: nn.BatchNorm2d, fn) -> None:
        super().__init__()
        self.bn, self.fn = bn, fn

    def forward(self, x):
        return self.fn(self.bn, x)


def _bn_reader_pair(C: int, dtype, ref_fn, our_fn):
    bn = randomize_bn(nn.BatchNorm2d(C)).to(dtype)
    return _BnReader(bn, ref_fn), _BnReader(copy.deepcopy(bn), our_fn)


class TestFinalNormOp(OpTester):
    """The final norm (norm_relu_pool) against BatchNorm2d -> ReLU -> global average pool."""

    SHAPES = [(5, 2, 1, 3), (6, 3, 4, 5), (3, 2, 9, 8)]  # (C, N, H, W)
    TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

    def make(self, shape, dtype):
        C, N, H, W = shape
        ref, ours = _bn_reader_pair(C, dtype, lambda bn, x: torch.flatten(F.adaptive_avg_pool2d(F.relu(bn(x)), 1), 1),
                                    fused_norm_relu_pool)
        return ref, ours, torch.randn(N, C, H, W, dtype=dtype)


class TestStemOp(OpTester):
    """The stem (bn_relu_maxpool) against BatchNorm2d -> ReLU -> max_pool2d(3, 2, 1)."""

    SHAPES = [(4, 3, 1, 1), (4, 3, 4, 5), (4, 3, 9, 8), (3, 2, 7, 2)]  # (C, N, H, W)
    TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

    def make(self, shape, dtype):
        C, N, H, W = shape
        ref, ours = _bn_reader_pair(C, dtype, lambda bn, x: F.max_pool2d(F.relu(bn(x)), 3, 2, 1), fused_stem)
        return ref, ours, torch.randn(N, C, H, W, dtype=dtype)


def test_batch_one_spatial_one_training_error_matches_batchnorm():
    ours = dnf.DenseBlock(2, 4, 2, 2)
    x = torch.randn(1, 4, 1, 1)
    with pytest.raises(ValueError) as ref_err:
        torch.nn.BatchNorm2d(4)(x)
    with pytest.raises(ValueError) as our_err:
        ours(x)
    assert str(our_err.value) == str(ref_err.value)
    ours.eval()
    assert ours(x).shape == (1, 8, 1, 1)  # eval is fine, as for nn.BatchNorm2d


def test_output_is_one_channels_last_buffer():
    ours = dnf.DenseBlock(3, 4, 2, 2)
    y = ours(torch.randn(2, 4, 5, 5))
    assert y.shape == (2, 10, 5, 5) and y.is_contiguous(memory_format=torch.channels_last)


def test_running_stats_updated_once_per_forward():
    ref, ours = _blocks(3, 4, 2, 3)
    x = torch.randn(4, 4, 6, 6, requires_grad=True)
    ours(x).sum().backward()
    ref(x).sum().backward()
    for n, b in ours.named_buffers():
        if n.endswith("num_batches_tracked"):
            assert int(b) == 1, n
    # momentum=None: cumulative average, like nn.BatchNorm2d
    for m in list(ref.modules()) + list(ours.modules()):
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    for _ in range(3):
        x = torch.randn(4, 4, 6, 6)
        ref(x), ours(x)
    _compare_block(ref, ours, torch.randn(4, 4, 6, 6), 1e-4, True, steps=1)


def _params(block: dnf.DenseBlock):
    return block.block_params()


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_block_fp64(training):
    block = dnf.DenseBlock(2, 3, 2, 2).double()
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    p = _params(block)
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (*p.norm1_weight, *p.conv1_weight, *p.norm2_bias,
                                                                  *p.conv2_weight)]
    L = 2

    def fn(x, *ts):
        params = BlockParams(list(ts[0:L]), p.norm1_bias, list(ts[L:2 * L]), p.norm2_weight, list(ts[2 * L:3 * L]),
                             list(ts[3 * L:4 * L]), *p[6:])
        return fused_dense_block(x, params, training=training).buffer

    assert torch.autograd.gradcheck(fn, (x, *leaves), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_transition_and_final_norm_fp64(training):
    C, Cout = 5, 3
    x = torch.randn(2, C, 5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(C, dtype=torch.float64, requires_grad=True)
    b = torch.randn(C, dtype=torch.float64, requires_grad=True)
    cw = torch.randn(Cout, C, 1, 1, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5

    def stats(x):
        return channel_moments(x.detach()) if training else (rm, rv)

    def trans(x, w, b, cw):
        return transition(x, *stats(x), w, b, cw, training=training)

    def final(x, w, b):
        return norm_relu_pool(x, *stats(x), w, b, training=training)

    assert torch.autograd.gradcheck(trans, (x, w, b, cw), eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradcheck(final, (x, w, b), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_opcheck_operators():
    block = dnf.DenseBlock(2, 3, 2, 2)
    p = _params(block)
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    params_train = list(p[:6]) + [[], [], [], []]
    torch.library.opcheck(torch.ops.densenet_fast.dense_block_forward, (x, *params_train, None, 0.0, True, 1e-5))
    torch.library.opcheck(torch.ops.densenet_fast.dense_block_forward, (x, *p, None, 0.0, False, 1e-5))
    mask = torch.rand(2, 4, 4, 5) > 0.3
    torch.library.opcheck(torch.ops.densenet_fast.dense_block_forward, (x, *params_train, mask, 0.3, True, 1e-5))
    xt = torch.randn(2, 6, 4, 6, requires_grad=True)
    mean, var = channel_moments(xt.detach())
    w, b = torch.rand(6, requires_grad=True), torch.randn(6, requires_grad=True)
    cw = torch.randn(3, 6, 1, 1, requires_grad=True)
    torch.library.opcheck(torch.ops.densenet_fast.transition_forward, (xt, mean, var, w, b, cw, True, 1e-5))
    torch.library.opcheck(torch.ops.densenet_fast.norm_relu_pool_forward, (xt, mean, var, w, b, True, 1e-5))
    torch.library.opcheck(torch.ops.densenet_fast.channel_moments, (xt.detach(),))


def test_dropout_matches_torchvision_with_same_mask(monkeypatch):
    p_drop = 0.4
    ref, ours = _blocks(3, 4, 2, 3, torch.float64, drop_rate=p_drop)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    mask = torch.rand(2, 9, 5, 5) > p_drop
    # torchvision draws one mask per layer through F.dropout: hand it the slices of our mask.
    calls = iter(range(3))

    def fixed_dropout(t, p, training, inplace=False):
        i = next(calls)
        return t * mask[:, 3 * i:3 * i + 3].to(t.dtype) / (1 - p)

    monkeypatch.setattr(F, "dropout", fixed_dropout)
    g = torch.randn(2, 13, 5, 5, dtype=torch.float64)
    yr, gxr, gpr = _run(ref, x, g)
    xo = x.clone().requires_grad_(True)
    out = fused_dense_block(xo, ours.block_params(), training=True, drop_rate=p_drop, dropout_mask=mask)
    out.buffer.backward(g)
    assert_close_rel(out.buffer, yr, 1e-12, "output")
    assert_close_rel(xo.grad, gxr, 1e-10, "input grad")
    for n, prm in ours.named_parameters():
        assert_close_rel(prm.grad, gpr[n], 1e-10, n)


def test_dropout_statistics():
    ours = dnf.DenseBlock(2, 4, 2, 8, drop_rate=0.25)
    y = ours(torch.randn(8, 4, 16, 16))
    new = y[:, 4:]
    frac_zero = (new == 0).double().mean().item()
    assert abs(frac_zero - 0.25) < 0.03
    ours.eval()
    assert not (ours(torch.randn(8, 4, 16, 16))[:, 4:] == 0).any()


def _saved_bytes(fn, module) -> int:
    """Bytes of the distinct storages autograd saves during fn(), parameters excluded (they exist anyway)."""
    storages = {}
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_saved_bytes_grow_linearly_with_depth():
    N, C0, k, H = 2, 8, 4, 8
    ours_bytes, ref_bytes = [], []
    for L in (2, 4, 8, 16):
        x = torch.randn(N, C0, H, H, requires_grad=True)
        block = dnf.DenseBlock(L, C0, 4, k)
        ref = tv._DenseBlock(L, C0, 4, k, 0.0)
        ours_bytes.append(_saved_bytes(lambda: block(x), block))
        ref_bytes.append(_saved_bytes(lambda: ref(x), ref))
        buffer = N * (C0 + L * k) * H * H * 4
        # the block buffer and O(C) statistics: nothing else
        assert ours_bytes[-1] <= buffer + 4 * (C0 + L * k + 2 * L * 4 * k) * 4
    inc = [b - a for a, b in zip(ours_bytes, ours_bytes[1:])]  # per doubling of L
    # linear: doubling L again roughly doubles the increment (quadratic would quadruple it)
    assert inc[2] < 2.5 * inc[1] and inc[1] < 2.5 * inc[0]
    ref_inc = [b - a for a, b in zip(ref_bytes, ref_bytes[1:])]
    assert ref_inc[2] > 3 * ref_inc[1]  # torchvision's concatenations grow quadratically


def test_autocast_bf16_cpu():
    ref, ours = _blocks(2, 4, 2, 3)
    # bf16, as a block input arrives under autocast (the stem's conv emits bf16). Rule: under CPU bf16
    # autocast our block casts its input to bf16 and returns bf16, also for an fp32 input (where
    # torchvision's torch.cat would return fp32).
    x = torch.randn(2, 4, 6, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yo = ours(x)
        yr = ref(x)
    y32 = ref(x.float())
    # our block computes in bf16 (fp32 accumulation, BN in fp32) under CPU autocast; accuracy: tests/test_bf16.py
    assert yo.dtype == torch.bfloat16
    assert (yo.float() - y32).abs().max() <= 1.5 * (yr.float() - y32).abs().max() + 1e-4


def test_compile_fullgraph_parity():
    model = dnf.densenet_bc(depth=10, growth_rate=4, num_classes=3)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)
    yc, ye = compiled(x), eager(x)
    assert_close_rel(yc, ye, 1e-5, "compiled output")
    yc.sum().backward(), ye.sum().backward()
    for (n, a), (_, b) in zip(model.named_parameters(), eager.named_parameters()):
        assert_close_rel(a.grad, b.grad, 1e-4, n)
    for (n, a), (_, b) in zip(model.named_buffers(), eager.named_buffers()):
        assert_close_rel(a.double(), b.double(), 1e-5, n)


def test_compile_inductor_fullgraph():
    model = dnf.densenet_bc(depth=10, growth_rate=4, num_classes=3).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert_close_rel(torch.compile(model, fullgraph=True)(x), model(x), 1e-5, "inductor output")


def test_stem_opcheck_and_saved_bytes():
    x = torch.randn(2, 3, 6, 7, requires_grad=True)
    mean, var = channel_moments(x.detach())
    w, b = torch.rand(3, requires_grad=True), torch.randn(3, requires_grad=True)
    torch.library.opcheck(torch.ops.densenet_fast.bn_relu_maxpool.default, (x, mean, var, w, b, True, 1e-5))
    # only the input (plus O(C) statistics) is saved: no BN output, no int64 pooling indices
    model = dnf.densenet121()
    saved = _saved_bytes(lambda: model.features[:4](torch.randn(1, 3, 64, 64)), model)
    conv0_out = 64 * 32 * 32 * 4
    conv0_weight_cl = 64 * 3 * 7 * 7 * 4  # conv0 runs on a channels_last copy of its weight (fused_features.py)
    assert saved <= 3 * 64 * 64 * 4 + conv0_out + conv0_weight_cl + 64 * 4 * 4
