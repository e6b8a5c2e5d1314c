"""The CUDA kernels' code path, run on the host (no GPU needed).

``csrc/cuda/emu/emulate.cpp`` compiles the CUDA operators' implementation (``csrc/cuda/*_impl.h``)
with ``DNF_CUDA_EMULATE``: each index functor that is a GPU kernel in the real build runs in a serial
loop over a *permutation* of its indices, ATen calls run on CPU. That checks the indexing, the
orchestration (reverse sweep, merged BN1 backward, statistics, dropout, tails) and the output
metadata of the CUDA path against an independent fp64 functional reference and against the CPU
operators, everywhere the test suite runs. What it cannot check (launch configuration, the real
streams, cuBLAS/cuDNN on the device, the fused tensor-core GEMM) is covered by
tests/test_cuda_dense_block.py on a GPU.

It also drives the real host side of every launch (launch.cuh's grid arithmetic with the grid's
threads run in a permuted order; bn_gemm_tile.cuh's launch_bn_relu_gemm with the thread blocks of the
fused GEMM emulated), compiles autocast.cpp's cast logic for the CPU device, and covers shapes with
many reduction chunks and two tree levels, grid.y > 1 in the fused GEMM, float16/bfloat16 models,
the fused path's dispatch rule and the NaN/Inf rules of csrc/common/nonfinite.h against the CPU kernels, and the
LeakyReLU / PReLU block (dense_block_act_*) and the InstanceNorm block (dense_block_in_*) against MONAI's own
modules in fp64 and the CPU operators.

The emulation module is JIT-built once (about a minute) into torch's extension cache.
"""
from __future__ import annotations

import math
import statistics
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

from conftest import rel_l2_err  # noqa: E402

import densenet_fast  # noqa: E402,F401  (loads the operators and their fake kernels)
from densenet_fast.ops import dense_block as block_ops  # noqa: E402
from densenet_fast.ops import tail as tail_ops  # noqa: E402

OPS = torch.ops.densenet_fast


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- reference ---------------------------------------------------------------------------------

def make_params(C0, L, k, bn_size, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    inter = bn_size * k
    sd = block_ops.stats_dtype(dtype)

    def r(*shape, lo=-1.0, hi=1.0, dt=sd):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dt)

    P = {n: [] for n in ("g1", "b1", "w1", "g2", "b2", "w2", "rm1", "rv1", "rm2", "rv2")}
    for li in range(L):
        c = C0 + li * k
        P["g1"].append(r(c, lo=0.5, hi=1.5))
        P["b1"].append(r(c, lo=-0.3, hi=0.3))
        P["w1"].append(r(inter, c, 1, 1, dt=dtype) / c ** 0.5)
        P["g2"].append(r(inter, lo=0.5, hi=1.5))
        P["b2"].append(r(inter, lo=-0.3, hi=0.3))
        P["w2"].append(r(k, inter, 3, 3, dt=dtype) / (9 * inter) ** 0.5)
        P["rm1"].append(r(c, lo=-0.5, hi=0.5))
        P["rv1"].append(r(c, lo=0.5, hi=2.0))
        P["rm2"].append(r(inter, lo=-0.5, hi=0.5))
        P["rv2"].append(r(inter, lo=0.5, hi=2.0))
    return P


ORDER = ("g1", "b1", "w1", "g2", "b2", "w2")
RUNNING = ("rm1", "rv1", "rm2", "rv2")


def reference_block(x, P, training, mask=None, p=0.0, eps=1e-5):
    """Plain PyTorch dense block (torchvision's _DenseBlock math, with an explicit dropout mask)."""
    feats = [x]
    L, k = len(P["w2"]), P["w2"][0].shape[0]
    for li in range(L):
        cat = torch.cat(feats, 1)
        rm1, rv1 = (None, None) if training else (P["rm1"][li].to(x.dtype), P["rv1"][li].to(x.dtype))
        rm2, rv2 = (None, None) if training else (P["rm2"][li].to(x.dtype), P["rv2"][li].to(x.dtype))
        u = F.relu(F.batch_norm(cat, rm1, rv1, P["g1"][li].to(x.dtype), P["b1"][li].to(x.dtype), training, 0.0, eps))
        y = F.conv2d(u, P["w1"][li].to(x.dtype))
        v = F.relu(F.batch_norm(y, rm2, rv2, P["g2"][li].to(x.dtype), P["b2"][li].to(x.dtype), training, 0.0, eps))
        new = F.conv2d(v, P["w2"][li].to(x.dtype), padding=1)
        if mask is not None:
            new = new * mask[:, li * k:(li + 1) * k].to(new.dtype) / (1 - p)
        feats.append(new)
    return torch.cat(feats, 1)


def run_emu(emu, x, P, training, mask=None, p=0.0, eps=1e-5):
    running = [P[n] for n in RUNNING] if not training else [[], [], [], []]
    return emu.dense_block_forward(x, *[P[n] for n in ORDER], *running, mask, p, training, eps)


def emu_backward(emu, grad, out, x, P, training, mask=None, p=0.0, eps=1e-5):
    running = [P[n] for n in RUNNING] if not training else [[], [], [], []]
    buffer, mean, var, mean2, var2 = out
    return emu.dense_block_backward(grad, buffer, mean, var, mean2, var2, *[P[n] for n in ORDER], *running, mask, p,
                                    training, eps, x.shape[1])



def plain_block_grads(x, P, grad, dtype):
    """The plain PyTorch block computed in ``dtype`` (BN parameters in the data dtype, as on CPU), training:
    its output and the gradients of x and every parameter (ORDER) -- the error baseline of that dtype."""
    x_h = x.detach().requires_grad_()
    P_h = {n: [t.detach().to(dtype).requires_grad_(n in ORDER) for t in P[n]] for n in P}
    base = reference_block(x_h, P_h, True)
    return base, torch.autograd.grad(base, [x_h] + [t for n in ORDER for t in P_h[n]], grad)

def reference_grads(x, P, grad, training, mask=None, p=0.0):
    x64 = x.detach().double().requires_grad_()
    P64 = {n: [t.detach().double().requires_grad_(n in ORDER) for t in P[n]] for n in P}
    out = reference_block(x64, P64, training, mask, p)
    params = [t for n in ORDER for t in P64[n]]
    grads = torch.autograd.grad(out, [x64, *params], grad.double())
    return out.detach(), grads


GEOMS = [  # (N, C0, H, W, L, k, bn_size)
    (2, 4, 5, 6, 3, 3, 2),
    (3, 5, 4, 3, 2, 4, 1),
    (1, 3, 7, 5, 4, 2, 3),
]


# --- dense block -------------------------------------------------------------------------------

@pytest.mark.parametrize("geom", GEOMS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_block_fp64_matches_reference(emu, geom, training, channels_last):
    N, C0, H, W, L, k, bs = geom
    torch.manual_seed(1)
    P = make_params(C0, L, k, bs)
    x = torch.randn(N, C0, H, W, dtype=torch.float64)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    out = run_emu(emu, x, P, training)
    buffer, mean, var, mean2, var2 = out
    torch.manual_seed(2)
    grad = torch.randn(N, C0 + L * k, H, W, dtype=torch.float64)
    ref, ref_grads = reference_grads(x, P, grad, training)
    torch.testing.assert_close(buffer, ref, rtol=1e-10, atol=1e-10)
    assert buffer.is_contiguous(memory_format=torch.channels_last)
    if training:
        torch.testing.assert_close(mean, ref.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(var, ref.var((0, 2, 3), unbiased=False), rtol=1e-10, atol=1e-12)
        assert mean2.shape == (L, bs * k)
    else:
        assert mean.numel() == var.numel() == mean2.numel() == var2.numel() == 0

    ours = emu_backward(emu, grad, out, x, P, training)
    flat = [ours[0]] + [t for lst in ours[1:] for t in lst]
    assert len(flat) == len(ref_grads)
    for got, want in zip(flat, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    assert ours[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False])
def test_block_matches_cpu_operator(emu, training):
    """fp32: the CUDA path and the CPU kernels (the specification) agree closely."""
    N, C0, H, W, L, k, bs = 2, 6, 5, 4, 3, 4, 2
    P = make_params(C0, L, k, bs, dtype=torch.float32)
    x = torch.randn(N, C0, H, W)
    running = [P[n] for n in RUNNING] if not training else [[], [], [], []]
    args = (x, *[P[n] for n in ORDER], *running, None, 0.0, training, 1e-5)
    ours, spec = emu.dense_block_forward(*args), OPS.dense_block_forward(*args)
    for a, b in zip(ours, spec):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    grad = torch.randn_like(spec[0])
    bargs = (grad, *spec, *[P[n] for n in ORDER], *running, None, 0.0, training, 1e-5, C0)
    g_ours, g_spec = emu.dense_block_backward(*bargs), OPS.dense_block_backward(*bargs)
    torch.testing.assert_close(g_ours[0], g_spec[0], rtol=1e-4, atol=1e-5)
    for lo, ls in zip(g_ours[1:], g_spec[1:]):
        for a, b in zip(lo, ls):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_block_dropout_mask(emu):
    N, C0, H, W, L, k, bs = 2, 4, 4, 5, 3, 3, 2
    p = 0.3
    P = make_params(C0, L, k, bs)
    x = torch.randn(N, C0, H, W, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(N, L * k, H, W, generator=g) > p
    out = run_emu(emu, x, P, True, mask, p)
    grad = torch.randn_like(out[0])
    ref, ref_grads = reference_grads(x, P, grad, True, mask, p)
    torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-10)
    ours = emu_backward(emu, grad, out, x, P, True, mask, p)
    for got, want in zip([ours[0]] + [t for lst in ours[1:] for t in lst], ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
    # a non-contiguous mask (strided view) gives the same result
    big = torch.zeros(N, 2 * L * k, H, W, dtype=torch.bool)
    big[:, ::2] = mask
    out2 = run_emu(emu, x, P, True, big[:, ::2], p)
    assert torch.equal(out2[0], out[0])
    # the channels_last mask fused_dense_block draws (coalesced reads by channel) gives the same result
    out3 = run_emu(emu, x, P, True, mask.contiguous(memory_format=torch.channels_last), p)
    assert torch.equal(out3[0], out[0])
    ours3 = emu_backward(emu, grad, out, x, P, True, mask.contiguous(memory_format=torch.channels_last), p)
    flat = [ours[0]] + [t for lst in ours[1:] for t in lst]
    flat3 = [ours3[0]] + [t for lst in ours3[1:] for t in lst]
    assert all(torch.equal(a, b) for a, b in zip(flat3, flat))


@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (2, 4, 3, 5, 7)])
def test_drawn_dropout_mask_is_channels_last(monkeypatch, shape):
    """fused_dense_block draws the mask in the activations' layout: channel stride 1, so the kernels'
    MaskView reads consecutive channels of one pixel across consecutive threads."""
    seen = {}

    def capture(*args):
        seen["mask"] = args[11]
        raise RuntimeError("captured")

    monkeypatch.setattr(block_ops, "_ops", types.SimpleNamespace(dense_block_forward=capture))
    blk_params = make_params(shape[1], 2, 3, 2, dtype=torch.float32)
    params = block_ops.BlockParams(*[blk_params[n] for n in ORDER], *[blk_params[n] for n in RUNNING])
    with pytest.raises(RuntimeError, match="captured"):
        block_ops.fused_dense_block(torch.randn(shape), params, training=True, drop_rate=0.5)
    mask = seen["mask"]
    assert mask.dtype == torch.bool and mask.shape == (shape[0], 6, *shape[2:]) and mask.stride(1) == 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_block_half_dtypes(emu, dtype):
    """Half-precision data with float32 BN tensors: output metadata as the fake kernel says, and
    errors vs fp64 of the same order as the plain PyTorch block's in that dtype.

    Roundoff through BN + ReLU layers is dominated by ReLU mask flips at pre-activations within
    rounding distance of 0 (one flip with a large upstream gradient moves a BN gradient by several
    percent, in either implementation), so the errors are compared as medians over several seeds."""
    N, C0, H, W, L, k, bs = 2, 8, 6, 6, 3, 4, 2
    ours_err, base_err = [], []
    for seed in range(5):
        torch.manual_seed(seed)
        P = make_params(C0, L, k, bs, dtype=dtype, seed=seed)
        x = torch.randn(N, C0, H, W).to(dtype)
        try:
            out = run_emu(emu, x, P, True)
        except RuntimeError as err:  # CPU half GEMM/conv missing in this torch build
            pytest.skip(f"CPU {dtype} kernels unavailable: {err}")
        fake = block_ops._dense_block_forward_fake(x, *[P[n] for n in ORDER], [], [], [], [], None, 0.0, True, 1e-5)
        for got, want in zip(out, fake):
            assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
        assert out[1].dtype == torch.float32
        grad = torch.randn(out[0].shape).to(dtype)
        ref, ref_grads = reference_grads(x, P, grad, True)
        base, base_grads = plain_block_grads(x, P, grad, dtype)
        assert rel_l2_err(out[0], ref) <= 2 * rel_l2_err(base, ref) + 1e-3
        ours = emu_backward(emu, grad, out, x, P, True)
        assert ours[0].dtype == dtype and ours[1][0].dtype == torch.float32 and ours[3][0].dtype == dtype
        flat = [ours[0]] + [t for lst in ours[1:] for t in lst]
        ours_err.append(statistics.mean(rel_l2_err(g, r) for g, r in zip(flat, ref_grads)))
        base_err.append(statistics.mean(rel_l2_err(g, r) for g, r in zip(base_grads, ref_grads)))
    assert statistics.median(ours_err) <= 2 * statistics.median(base_err) + 5e-3, (ours_err, base_err)


def test_block_deterministic(emu):
    N, C0, H, W, L, k, bs = 2, 4, 5, 5, 3, 3, 2
    P = make_params(C0, L, k, bs, dtype=torch.float32)
    x = torch.randn(N, C0, H, W)
    a, b = run_emu(emu, x, P, True), run_emu(emu, x, P, True)
    for s, t in zip(a, b):
        assert torch.equal(s, t)


def test_block_bad_inputs(emu):
    N, C0, H, W, L, k, bs = 2, 4, 3, 3, 2, 3, 2
    P = make_params(C0, L, k, bs, dtype=torch.float32)
    x = torch.randn(N, C0, H, W)
    with pytest.raises(RuntimeError, match=r"conv1_weight\[1\]: expected dtype Double"):
        run_emu(emu, x.double(), {**P, "g1": [t.double() for t in P["g1"]], "b1": [t.double() for t in P["b1"]],
                                  "g2": [t.double() for t in P["g2"]], "b2": [t.double() for t in P["b2"]],
                                  "w1": [P["w1"][0].double(), P["w1"][1]], "w2": [t.double() for t in P["w2"]]}, True)
    # BN tensors: float32 or (a .bfloat16() model) the input's dtype; another half dtype is an error
    with pytest.raises(RuntimeError, match="norm1_weight\\[0\\]: expected dtype Float .* or input's dtype, got Half"):
        run_emu(emu, x.bfloat16(), {**P, "w1": [t.bfloat16() for t in P["w1"]], "w2": [t.bfloat16() for t in P["w2"]],
                                    "g1": [P["g1"][0].half(), P["g1"][1]]}, True)
    with pytest.raises(RuntimeError, match="input: expected a 4-D tensor"):
        run_emu(emu, x[0], P, True)
    with pytest.raises(RuntimeError, match="input: expected dtype float32, float16, bfloat16 or float64"):
        run_emu(emu, x.to(torch.float8_e4m3fn), P, True)


# --- tails -------------------------------------------------------------------------------------

def tail_args(C, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = block_ops.stats_dtype(dtype)
    weight = (torch.rand(C, generator=g) + 0.5).to(sd)
    bias = (torch.rand(C, generator=g) - 0.5).to(sd)
    return weight, bias


@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (1, 3, 5, 4), (3, 4, 2, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_tails_fp64(emu, shape, training):
    N, C, H, W = shape
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.3
    weight, bias = tail_args(C)
    if training:
        mean, var = emu.channel_moments(x)
        torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-12, atol=1e-12)
    else:
        mean, var = torch.rand(C, dtype=torch.float64) - 0.5, torch.rand(C, dtype=torch.float64) + 0.5
    Cout = 3
    conv_w = torch.randn(Cout, C, 1, 1, dtype=torch.float64)

    def ref_tr(x, w, b, cw):
        rm, rv = (None, None) if training else (mean, var)
        return F.avg_pool2d(F.conv2d(F.relu(F.batch_norm(x, rm, rv, w, b, training, 0.0, 1e-5)), cw), 2)

    def ref_nrp(x, w, b):
        rm, rv = (None, None) if training else (mean, var)
        return F.adaptive_avg_pool2d(F.relu(F.batch_norm(x, rm, rv, w, b, training, 0.0, 1e-5)), 1).flatten(1)

    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, conv_w)]
    ref = ref_tr(*leaves)
    out = emu.transition_forward(x, mean, var, weight, bias, conv_w, training, 1e-5)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
    fake = tail_ops._transition_forward_fake(x, mean, var, weight, bias, conv_w, training, 1e-5)
    assert out.stride() == fake.stride() and out.dtype == fake.dtype
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, leaves, grad)
    got = emu.transition_backward(grad, x, mean, var, weight, bias, conv_w, training, 1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert got[0].is_contiguous(memory_format=torch.channels_last) and got[3].is_contiguous()

    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    ref = ref_nrp(*leaves)
    out = emu.norm_relu_pool_forward(x, mean, var, weight, bias, training, 1e-5)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, leaves, grad)
    got = emu.norm_relu_pool_backward(grad, x, mean, var, weight, bias, training, 1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_tails_match_cpu_operators_fp32(emu):
    x = torch.randn(2, 6, 5, 5).to(memory_format=torch.channels_last)
    weight, bias = tail_args(6, torch.float32)
    mean, var = OPS.channel_moments(x)
    m2, v2 = emu.channel_moments(x)
    torch.testing.assert_close(m2, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v2, var, rtol=1e-5, atol=1e-6)
    cw = torch.randn(4, 6, 1, 1)
    for name, args in (("transition_forward", (x, mean, var, weight, bias, cw, True, 1e-5)),
                       ("norm_relu_pool_forward", (x, mean, var, weight, bias, True, 1e-5))):
        torch.testing.assert_close(getattr(emu, name)(*args), getattr(OPS, name)(*args), rtol=1e-5, atol=1e-5)
    g = torch.randn(2, 4, 2, 2)
    for a, b in zip(emu.transition_backward(g, x, mean, var, weight, bias, cw, True, 1e-5),
                    OPS.transition_backward(g, x, mean, var, weight, bias, cw, True, 1e-5)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- SE gate folded into the tails (docs/design.md §5) ----------------------------------------------
@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (3, 4, 13, 11), (1, 3, 5, 4), (2, 3, 3, 5, 4)],
                         ids=["2x5x6x7", "3x4x13x11-two-chunks", "1x3x5x4", "2x3x3x5x4-3d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gated_tails_fp64(emu, shape, training):
    """The gated CUDA tails (emulated) against torch on the materialised product y = gate * x."""
    N, C = shape[:2]
    dims = len(shape) - 2
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.3).contiguous(
        memory_format=torch.channels_last_3d if dims == 3 else torch.channels_last)
    gate = torch.rand(N, C, dtype=torch.float64) + 0.05
    weight, bias = tail_args(C)
    conv_w = torch.randn((3, C) + (1,) * dims, dtype=torch.float64)
    gshape = (N, C) + (1,) * dims
    y = x * gate.view(gshape)
    spatial = tuple(range(2, 2 + dims))
    if training:
        mean, var = y.mean((0,) + spatial), y.var((0,) + spatial, unbiased=False)
    else:
        mean, var = torch.rand(C, dtype=torch.float64) - 0.5, torch.rand(C, dtype=torch.float64) + 0.5
    conv, pool = (F.conv3d, F.avg_pool3d) if dims == 3 else (F.conv2d, F.avg_pool2d)

    def bn_relu(x, g, w, b):
        rm, rv = (None, None) if training else (mean, var)
        return F.relu(F.batch_norm(x * g.view(gshape), rm, rv, w, b, training, 0.0, 1e-5))

    leaves = [t.clone().requires_grad_() for t in (x, gate, weight, bias, conv_w)]
    ref = pool(conv(bn_relu(*leaves[:4]), leaves[4]), 2)
    out = emu.transition_forward(x, mean, var, weight, bias, conv_w, training, 1e-5, gate)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    dx, dgate, dw, db, dcw = torch.autograd.grad(ref, leaves, grad)
    got = emu.transition_backward(grad, x, mean, var, weight, bias, conv_w, training, 1e-5, gate)
    for a, b in zip(got, (dx, dw, db, dcw, dgate)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert _meta(got) == _meta(tail_ops._transition_backward_fake(grad, x, mean, var, weight, bias, conv_w,
                                                                  training, 1e-5, gate))

    leaves = [t.clone().requires_grad_() for t in (x, gate, weight, bias)]
    ref = bn_relu(*leaves).mean(spatial)
    out = emu.norm_relu_pool_forward(x, mean, var, weight, bias, training, 1e-5, gate)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(ref)
    dx, dgate, dw, db = torch.autograd.grad(ref, leaves, grad)
    got = emu.norm_relu_pool_backward(grad, x, mean, var, weight, bias, training, 1e-5, gate)
    for a, b in zip(got, (dx, dw, db, dgate)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)

    m, v = emu.sample_moments(x)
    torch.testing.assert_close(m, x.mean(spatial), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, x.var(spatial, unbiased=False), rtol=1e-12, atol=1e-12)


def test_gated_tails_match_cpu_operators_fp32(emu):
    x = torch.randn(3, 6, 7, 5).to(memory_format=torch.channels_last)
    gate = torch.rand(3, 6)
    weight, bias = tail_args(6, torch.float32)
    sm, sv = OPS.sample_moments(x)
    sm2, sv2 = emu.sample_moments(x)
    torch.testing.assert_close(sm2, sm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sv2, sv, rtol=1e-5, atol=1e-6)
    mean, var = tail_ops.gated_channel_moments(sm, sv, gate)
    cw = torch.randn(4, 6, 1, 1)
    args_t = (x, mean, var, weight, bias, cw, True, 1e-5, gate)
    args_n = (x, mean, var, weight, bias, True, 1e-5, gate)
    torch.testing.assert_close(emu.transition_forward(*args_t), OPS.transition_forward(*args_t), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(emu.norm_relu_pool_forward(*args_n), OPS.norm_relu_pool_forward(*args_n), rtol=1e-5,
                               atol=1e-5)
    g = torch.randn(3, 4, 3, 2)
    for a, b in zip(emu.transition_backward(g, *args_t), OPS.transition_backward(g, *args_t)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    g = torch.randn(3, 6)
    for a, b in zip(emu.norm_relu_pool_backward(g, *args_n), OPS.norm_relu_pool_backward(g, *args_n)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gated_tails_half_metadata_and_accuracy(emu, dtype):
    """Half-precision buffer, float32 gate and BN tensors (as under CUDA autocast): outputs match the fake
    kernels' metadata (grad_gate in the gate's float32) and an fp64 reference within half-precision error."""
    x64 = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    x = x64.to(dtype).contiguous(memory_format=torch.channels_last)
    gate = torch.rand(2, 5) + 0.1
    weight, bias = tail_args(5, dtype)
    sm, sv = emu.sample_moments(x)
    assert sm.dtype == sv.dtype == torch.float32
    assert _meta([sm, sv]) == _meta(list(tail_ops._sample_moments_fake(x)))
    mean, var = tail_ops.gated_channel_moments(sm, sv, gate)
    cw = torch.randn(3, 5, 1, 1).to(dtype)
    args = (x, mean, var, weight, bias, cw, True, 1e-5, gate)
    out = emu.transition_forward(*args)
    assert _meta(out) == _meta(tail_ops._transition_forward_fake(*args))
    g = torch.randn(out.shape, dtype=dtype)
    got = emu.transition_backward(g, *args)
    assert _meta(got) == _meta(tail_ops._transition_backward_fake(g, *args))
    leaves = [t.clone().requires_grad_() for t in (x.double(), gate.double())]
    ref = F.avg_pool2d(F.conv2d(F.relu(F.batch_norm(leaves[0] * leaves[1][:, :, None, None], None, None,
                                                    weight.double(), bias.double(), True, 0.0, 1e-5)),
                                cw.double()), 2)
    assert rel_l2_err(out.double(), ref.detach()) < 2e-2
    dx, dgate = torch.autograd.grad(ref, leaves, g.double())
    assert rel_l2_err(got[0].double(), dx) < 5e-2 and rel_l2_err(got[4].double(), dgate) < 5e-2


def test_channel_moments_dtype_follows_fake(emu):
    x = torch.randn(2, 3, 4, 4).bfloat16()
    mean, var = emu.channel_moments(x)
    fm, fv = tail_ops._channel_moments_fake(x)
    assert mean.dtype == fm.dtype and var.dtype == fv.dtype
    torch.testing.assert_close(mean.float(), x.float().mean((0, 2, 3)), rtol=1e-2, atol=1e-2)


# --- output metadata = the fake kernels' (what opcheck would check on a GPU) ----------------------

def _meta(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.dtype)
    return [_meta(t) for t in x]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (1, 1, 1, 2), (3, 2, 1, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_output_metadata_matches_fake_kernels(emu, dtype, shape, training):
    N, C0, H, W = shape
    if training and N * H * W == 1:
        pytest.skip("training needs more than one value per channel")
    L, k, bs = 2, 1 if C0 == 1 else 3, 2
    P = make_params(C0, L, k, bs, dtype=dtype)
    x = torch.randn(shape).to(dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = x.contiguous(memory_format=layout)
        running = [P[n] for n in RUNNING] if not training else [[], [], [], []]
        args = (x, *[P[n] for n in ORDER], *running, None, 0.0, training, 1e-5)
        out = emu.dense_block_forward(*args)
        assert _meta(out) == _meta(block_ops._dense_block_forward_fake(*args))
        bargs = (torch.randn(out[0].shape).to(dtype), *out, *[P[n] for n in ORDER], *running, None, 0.0, training,
                 1e-5, C0)
        assert _meta(emu.dense_block_backward(*bargs)) == _meta(block_ops._dense_block_backward_fake(*bargs))

        sd = block_ops.stats_dtype(dtype)
        C = C0
        mean, var = (torch.rand(C) + 0.5).to(sd), (torch.rand(C) + 0.5).to(sd)
        weight, bias = tail_args(C, dtype)
        cw = torch.randn(4, C, 1, 1).to(dtype)
        assert _meta(emu.channel_moments(x)) == _meta(tail_ops._channel_moments_fake(x))
        nargs = (x, mean, var, weight, bias, training, 1e-5)
        out = emu.norm_relu_pool_forward(*nargs)
        assert _meta(out) == _meta(tail_ops._norm_relu_pool_forward_fake(*nargs))
        gargs = (torch.randn(out.shape).to(dtype), *nargs)
        assert _meta(emu.norm_relu_pool_backward(*gargs)) == _meta(tail_ops._norm_relu_pool_backward_fake(*gargs))
        if H >= 2 and W >= 2:
            targs = (x, mean, var, weight, bias, cw, training, 1e-5)
            out = emu.transition_forward(*targs)
            assert _meta(out) == _meta(tail_ops._transition_forward_fake(*targs))
            gargs = (torch.randn(out.shape).to(dtype), *targs)
            assert _meta(emu.transition_backward(*gargs)) == _meta(tail_ops._transition_backward_fake(*gargs))


# --- the fused BN+GEMM kernel (bn_gemm.cu), block by block ---------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,ld,c,n_out", [
    (200, 64, 48, 128),    # 16-byte path, partial row tile, two K steps
    (130, 40, 40, 128),    # 16-byte path, c not a multiple of BK
    (100, 37, 29, 50),     # element path (odd everything)
    (64, 256, 232, 200),   # two column blocks, many K steps
    (1, 8, 8, 1),
])
def test_fused_bn_gemm_kernel(emu, dtype, M, ld, c, n_out):
    g = torch.Generator().manual_seed(M + c)
    X = (torch.randn(M, ld, generator=g) * 2).to(dtype)
    W = (torch.randn(n_out, c, generator=g) / c ** 0.5).to(dtype)
    a = torch.rand(c, generator=g) + 0.5
    b = torch.rand(c, generator=g) - 0.5
    Y = emu.bn_relu_gemm(X, c, a, b, W)
    U = torch.relu(a * X[:, :c].float() + b).to(dtype)  # rounded as the kernel stages it
    ref = (U.double() @ W.double().t())
    assert Y.dtype == dtype and Y.shape == (M, n_out)
    ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    torch.testing.assert_close(Y.double(), ref, rtol=ulp, atol=1e-5 * ref.abs().max().item())


# --- launch arithmetic, many reduction chunks, tree sums ------------------------------------------

@pytest.mark.parametrize("n", [1, 255, 256, 257, 100_000, 2**28 + 3])
def test_for_each_launch_config(emu, n):
    blocks, threads = emu.for_each_config(n)
    assert threads == 256
    assert blocks == min((n + 255) // 256, 2**20)  # capped: the grid-stride loop covers the rest


@pytest.mark.parametrize("training", [True, False])
def test_block_many_reduction_chunks_fp64(emu, training):
    """N*H*W = 4608 rows: 36 row chunks of 128, i.e. two levels of the fixed-fan-in (32) tree sum, in
    every statistic and every backward reduction."""
    N, C0, H, W, L, k, bs = 2, 3, 48, 48, 2, 2, 2
    P = make_params(C0, L, k, bs, seed=4)
    x = torch.randn(N, C0, H, W, dtype=torch.float64) * 1.5 + 0.3
    out = run_emu(emu, x, P, training)
    grad = torch.randn(out[0].shape, dtype=torch.float64)
    ref, ref_grads = reference_grads(x, P, grad, training)
    torch.testing.assert_close(out[0], ref, rtol=1e-10, atol=1e-10)
    if training:
        torch.testing.assert_close(out[1], ref.mean((0, 2, 3)), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(out[2], ref.var((0, 2, 3), unbiased=False), rtol=1e-10, atol=1e-12)
    ours = emu_backward(emu, grad, out, x, P, training)
    for got, want in zip([ours[0]] + [t for lst in ours[1:] for t in lst], ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 3, 48, 49), (1, 2, 65, 70)])
def test_tails_many_reduction_chunks_fp64(emu, shape):
    x = torch.randn(shape, dtype=torch.float64) * 2 + 0.3
    C = shape[1]
    weight, bias = tail_args(C)
    mean, var = emu.channel_moments(x)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-12, atol=1e-12)
    cw = torch.randn(3, C, 1, 1, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, cw)]
    ref = F.avg_pool2d(F.conv2d(F.relu(F.batch_norm(leaves[0], None, None, leaves[1], leaves[2], True)), leaves[3]), 2)
    grad = torch.randn_like(ref)
    got = emu.transition_backward(grad, x, mean, var, weight, bias, cw, True, 1e-5)
    for a, b in zip(got, torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# --- float16/bfloat16 models (BN tensors in the data dtype) ------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [True, False])
def test_half_model_bn_tensors(emu, dtype, training):
    """A .half()/.bfloat16() model hands the kernels BN tensors in the data dtype: BN computes in float
    exactly as with those values given in float32 (bitwise the same outputs and gradients), the
    statistics come back in float32 and the BN gradients in the parameters' dtype (as the fake
    kernels declare)."""
    N, C0, H, W, L, k, bs = 2, 6, 5, 7, 3, 4, 2
    P = make_params(C0, L, k, bs, dtype=dtype, seed=5)
    P_model = {n: [t.to(dtype) for t in P[n]] for n in P}                # every tensor in the model dtype
    P_float = {n: [t.float() if n not in ("w1", "w2") else t for t in P_model[n]] for n in P}  # same values
    x = torch.randn(N, C0, H, W).to(dtype)
    try:
        out_m = run_emu(emu, x, P_model, training)
    except RuntimeError as err:
        if "not implemented" in str(err):
            pytest.skip(f"CPU {dtype} kernels unavailable: {err}")
        raise
    out_f = run_emu(emu, x, P_float, training)
    for a, b in zip(out_m, out_f):
        assert torch.equal(a, b)
    running = [P_model[n] for n in RUNNING] if not training else [[], [], [], []]
    fake = block_ops._dense_block_forward_fake(x, *[P_model[n] for n in ORDER], *running, None, 0.0, training, 1e-5)
    assert _meta(out_m) == _meta(fake)
    grad = torch.randn(out_m[0].shape).to(dtype)
    g_m = emu_backward(emu, grad, out_m, x, P_model, training)
    g_f = emu_backward(emu, grad, out_f, x, P_float, training)
    bargs = (grad, *out_m, *[P_model[n] for n in ORDER], *running, None, 0.0, training, 1e-5, C0)
    assert _meta(g_m) == _meta(block_ops._dense_block_backward_fake(*bargs))
    assert g_m[1][0].dtype == dtype and g_m[5][0].dtype == dtype
    for a, b in zip([g_m[0]] + [t for lst in g_m[1:] for t in lst], [g_f[0]] + [t for lst in g_f[1:] for t in lst]):
        assert torch.equal(a, b.to(a.dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_model_tails(emu, dtype):
    x = (torch.randn(2, 5, 7, 6) * 2).to(dtype)
    weight, bias = (t.to(dtype) for t in tail_args(5, torch.float32))
    mean, var = emu.channel_moments(x)
    assert mean.dtype == torch.float32
    cw = torch.randn(3, 5, 1, 1).to(dtype)
    for training, (m, v) in ((True, (mean, var)), (False, (mean.to(dtype), var.to(dtype)))):
        g = torch.randn(2, 3, 3, 3).to(dtype)
        got = emu.transition_backward(g, x, m, v, weight, bias, cw, training, 1e-5)
        want = emu.transition_backward(g, x, m.float(), v.float(), weight.float(), bias.float(), cw, training, 1e-5)
        assert got[1].dtype == got[2].dtype == dtype and got[0].dtype == got[3].dtype == dtype
        for a, b in zip(got, want):
            assert torch.equal(a, b.to(a.dtype))
        out = emu.norm_relu_pool_forward(x, m, v, weight, bias, training, 1e-5)
        assert torch.equal(out, emu.norm_relu_pool_forward(x, m.float(), v.float(), weight.float(), bias.float(),
                                                           training, 1e-5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_many_chunks(emu, dtype):
    """float16/bfloat16 data over 4608 rows (two tree levels; dW1's K = N*H*W accumulated in float):
    errors vs fp64 of the order of the plain PyTorch block's in that dtype."""
    N, C0, H, W, L, k, bs = 2, 8, 48, 48, 2, 4, 2
    P = make_params(C0, L, k, bs, dtype=dtype, seed=6)
    x = torch.randn(N, C0, H, W).to(dtype)
    out = run_emu(emu, x, P, True)
    grad = torch.randn(out[0].shape).to(dtype)
    ref, ref_grads = reference_grads(x, P, grad, True)
    base, base_grads = plain_block_grads(x, P, grad, dtype)
    assert rel_l2_err(out[0], ref) <= 2 * rel_l2_err(base, ref) + 1e-3
    ours = emu_backward(emu, grad, out, x, P, True)
    flat = [ours[0]] + [t for lst in ours[1:] for t in lst]
    e_us = [rel_l2_err(g, r) for g, r in zip(flat, ref_grads)]
    e_base = [rel_l2_err(g, r) for g, r in zip(base_grads, ref_grads)]
    assert statistics.median(e_us) <= 2 * statistics.median(e_base) + 5e-3, (e_us, e_base)
    w1_us, w1_base = e_us[1 + 2 * L:1 + 3 * L], e_base[1 + 2 * L:1 + 3 * L]  # dW1 of every layer
    assert max(w1_us) <= 2 * max(w1_base) + 5e-3, (w1_us, w1_base)


# --- autocast.cpp, compiled for the CPU device ------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_logic(emu, dtype):
    """Under autocast the input and the conv weights are cast to the autocast dtype, every BN tensor
    stays float32 (bitwise the same as calling the operator with those casts by hand); float64 inputs
    pass through."""
    N, C0, H, W, L, k, bs = 2, 5, 4, 6, 2, 3, 2
    P = make_params(C0, L, k, bs, dtype=torch.float32, seed=7)
    x = torch.randn(N, C0, H, W)
    args = [P[n] for n in ORDER]
    with torch.autocast("cpu", dtype=dtype):
        got = emu.autocast_dense_block_forward(x, *args, [], [], [], [], None, 0.0, True, 1e-5)
    by_hand = run_emu(emu, x.to(dtype), {**P, "w1": [t.to(dtype) for t in P["w1"]],
                                         "w2": [t.to(dtype) for t in P["w2"]]}, True)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    for a, b in zip(got, by_hand):
        assert torch.equal(a, b)
    P64 = make_params(C0, L, k, bs, seed=7)
    x64 = x.double()
    with torch.autocast("cpu", dtype=dtype):
        got64 = emu.autocast_dense_block_forward(x64, *[P64[n] for n in ORDER], [], [], [], [], None, 0.0, True, 1e-5)
    assert got64[0].dtype == torch.float64
    assert torch.equal(got64[0], run_emu(emu, x64, P64, True)[0])

    w, b = tail_args(C0, torch.float32)
    mean, var = emu.channel_moments(x)
    cw = torch.randn(4, C0, 1, 1)
    with torch.autocast("cpu", dtype=dtype):
        t = emu.autocast_transition_forward(x, mean, var, w, b, cw, True, 1e-5)
    assert t.dtype == dtype
    assert torch.equal(t, emu.transition_forward(x.to(dtype), mean, var, w, b, cw.to(dtype), True, 1e-5))


# --- the fused 1x1 path through the block: dispatch rule, grid.y > 1, backward recompute ------------

@pytest.fixture
def fused_env(emu, monkeypatch):
    monkeypatch.setenv("DNF_CUDA_BN_GEMM", "fused")
    emu.set_compute_capabilities(90, 90)
    yield monkeypatch
    emu.set_compute_capabilities(90, 90)


def test_fused_path_dispatch_rule(emu, fused_env):
    x16, x32 = torch.zeros(1, 1, 1, 1, dtype=torch.bfloat16), torch.zeros(1, 1, 1, 1)
    assert emu.use_fused_bn_gemm(x16) and emu.use_fused_bn_gemm(x16.half())
    assert not emu.use_fused_bn_gemm(x32) and not emu.use_fused_bn_gemm(x32.double())  # documented: half only
    emu.set_compute_capabilities(75, 75)
    with pytest.raises(RuntimeError, match=r"DNF_CUDA_BN_GEMM=fused: .* compute capability >= 8.0.*got 7.5"):
        emu.use_fused_bn_gemm(x16)
    emu.set_compute_capabilities(90, 70)  # e.g. compute_70 PTX only: the kernel body would be a trap
    with pytest.raises(RuntimeError, match=r"no device code .* \(found: 7.0\); rebuild with TORCH_CUDA_ARCH_LIST"):
        emu.use_fused_bn_gemm(x16)
    emu.set_compute_capabilities(90, 0)
    with pytest.raises(RuntimeError, match=r"found: none"):
        emu.use_fused_bn_gemm(x16)
    P = make_params(3, 1, 2, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"DNF_CUDA_BN_GEMM=fused"):  # raised by the op, before any work
        run_emu(emu, torch.randn(2, 3, 4, 4).bfloat16(), P, True)
    for value, fused in (("simple", False), ("", False)):
        fused_env.setenv("DNF_CUDA_BN_GEMM", value)
        assert emu.use_fused_bn_gemm(x16) is fused
    fused_env.setenv("DNF_CUDA_BN_GEMM", "fast")
    with pytest.raises(RuntimeError, match=r'DNF_CUDA_BN_GEMM: expected "simple" or "fused" \(or unset\), got "fast"'):
        run_emu(emu, torch.randn(2, 3, 4, 4), make_params(3, 1, 2, 2, dtype=torch.float32), True)


@pytest.mark.parametrize("M,ld,c,n_out,grid,vec", [
    (200, 64, 48, 200, (4, 2), True),
    (64, 37, 29, 300, (1, 3), False),
    (65, 40, 40, 128, (2, 1), True),
])
def test_fused_gemm_launch_grid(emu, M, ld, c, n_out, grid, vec):
    X = torch.zeros(M, ld, dtype=torch.bfloat16)
    W = torch.zeros(n_out, c, dtype=torch.bfloat16)
    assert emu.bn_relu_gemm_grid(X, c, W) == (*grid, vec)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_path_block(emu, fused_env, dtype):
    """The block with the fused 1x1 kernel (emulated through its real launch, inter = 132 output
    channels: grid.y = 2) against the simple path and fp64: the forward within rounding of the simple
    path; the backward recomputes Y with the same kernel, so it differs from the simple path's only by
    the forward's rounding. Recomputing with cuBLAS instead (a forward/backward path mismatch) is shown
    harmless too: its gradient errors vs fp64 stay of the same size."""
    N, C0, H, W, L, k, bs = 2, 16, 5, 6, 2, 33, 4
    P = make_params(C0, L, k, bs, dtype=dtype, seed=8)
    x = torch.randn(N, C0, H, W).to(dtype)
    grad = torch.randn(N, C0 + L * k, H, W).to(dtype)
    ref, ref_grads = reference_grads(x, P, grad, True)
    results = {}
    blocks_per_pass = L * 1 * 2  # L layers x grid (ceil(60/64) = 1, ceil(132/128) = 2)
    for fwd, bwd in (("simple", "simple"), ("fused", "fused"), ("fused", "simple")):
        fused_env.setenv("DNF_CUDA_BN_GEMM", fwd)
        before = emu.gemm_blocks_run()
        out = run_emu(emu, x, P, True)
        assert emu.gemm_blocks_run() - before == (blocks_per_pass if fwd == "fused" else 0)
        fused_env.setenv("DNF_CUDA_BN_GEMM", bwd)
        before = emu.gemm_blocks_run()
        g = emu_backward(emu, grad, out, x, P, True)
        assert emu.gemm_blocks_run() - before == (blocks_per_pass if bwd == "fused" else 0)
        results[fwd, bwd] = out, [g[0]] + [t for lst in g[1:] for t in lst]
    out_s, out_f = results["simple", "simple"][0], results["fused", "fused"][0]
    torch.testing.assert_close(out_f[0].float(), out_s[0].float(), rtol=3e-2, atol=3e-2)
    for a, b in zip(out_f[1:], out_s[1:]):  # mean, var, mean2, var2
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
    assert rel_l2_err(out_f[0], ref) <= 1.5 * rel_l2_err(out_s[0], ref) + 1e-3
    e = {key: statistics.median(rel_l2_err(a, b) for a, b in zip(gs, ref_grads)) for key, (_, gs) in results.items()}
    assert e["fused", "fused"] <= 1.5 * e["simple", "simple"] + 2e-3, e
    assert e["fused", "simple"] <= 1.5 * e["simple", "simple"] + 2e-3, e


# --- LeakyReLU / PReLU blocks (dense_block_act_forward / _backward) ----------------------------------------------
#
# The emulated CUDA act operators against MONAI's own _DenseBlock built with act="leakyrelu" / "prelu" (the real
# module, fp64: output, input gradient, every parameter gradient including the PReLU weights, running statistics)
# and against the CPU act operators (the specification: buffer, statistics, every gradient, the slopes').

ACT_KINDS = {  # name -> (MONAI act argument, PReLU with one parameter per channel)
    "leaky": (("leakyrelu", {"negative_slope": 0.1}), False),
    "leaky_neg": (("leakyrelu", {"negative_slope": -0.3}), False),  # gradient by z, not by the output's sign
    "prelu1": ("prelu", False),
    "prelu_c": ("prelu", True),
}
ACT_GEOMS = {2: (3, 5, 7, 6), 3: (2, 3, 5, 3, 4)}  # input shapes, odd sizes


def monai_act_block(spatial_dims, kind, C0, L=3, k=3, bs=2, seed=0):
    """MONAI's _DenseBlock with LeakyReLU / PReLU layers, fp64, random BN statistics and slopes (momentum 1: the
    running statistics after one training step are the batch's, unbiased)."""
    densenet = pytest.importorskip("monai.networks.nets.densenet")
    act, per_channel = ACT_KINDS[kind]
    torch.manual_seed(seed)
    block = densenet._DenseBlock(spatial_dims, L, C0, bs, k, 0.0, act=act, norm="batch").double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in block:
            seq = layer.layers
            for norm, relu in ((seq.norm1, "relu1"), (seq.norm2, "relu2")):
                c = norm.num_features
                norm.momentum = 1.0
                norm.weight.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
                norm.bias.copy_(0.3 * torch.randn(c, generator=g, dtype=torch.float64))
                norm.running_mean.copy_(0.3 * torch.randn(c, generator=g, dtype=torch.float64))
                norm.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
                if per_channel:
                    seq._modules[relu] = torch.nn.PReLU(c).double()
                if isinstance(seq._modules[relu], torch.nn.PReLU):
                    seq._modules[relu].weight.uniform_(-0.2, 0.5, generator=g)
    return block


def act_operands(block, training):
    """(P, slopes) of a MONAI block in emu_backward's order; slopes packed as pack_slopes does, a leaf."""
    seqs = [layer.layers for layer in block]
    P = {"g1": [s.norm1.weight for s in seqs], "b1": [s.norm1.bias for s in seqs],
         "w1": [s.conv1.weight for s in seqs], "g2": [s.norm2.weight for s in seqs],
         "b2": [s.norm2.bias for s in seqs], "w2": [s.conv2.weight for s in seqs],
         "rm1": [s.norm1.running_mean for s in seqs], "rv1": [s.norm1.running_var for s in seqs],
         "rm2": [s.norm2.running_mean for s in seqs], "rv2": [s.norm2.running_var for s in seqs]}
    P = {n: [t.detach().clone() for t in lst] for n, lst in P.items()}

    def slope(act, c):
        if isinstance(act, torch.nn.PReLU):
            return act.weight.detach().expand(c).clone()
        return torch.full((c,), act.negative_slope, dtype=torch.float64)

    slopes = block_ops.pack_slopes([slope(s.relu1, s.norm1.num_features) for s in seqs],
                                   [slope(s.relu2, s.norm2.num_features) for s in seqs])
    return P, slopes


def act_slope_grads(block, grad_slopes):
    """The PReLU weights' gradients from the packed slopes' gradient (a one-parameter PReLU: the sum)."""
    out, at = [], 0
    for layer in block:
        s = layer.layers
        for norm, act in ((s.norm1, s.relu1), (s.norm2, s.relu2)):
            g = grad_slopes[at:at + norm.num_features]
            at += norm.num_features
            if isinstance(act, torch.nn.PReLU):
                out.append(g if act.weight.numel() > 1 else g.sum().reshape(1))
    assert at == grad_slopes.numel()
    return out


def run_act(ops, x, P, slopes, training, grad):
    running = [P[n] for n in RUNNING] if not training else [[], [], [], []]
    out = ops.dense_block_act_forward(x, *[P[n] for n in ORDER], *running, None, 0.0, training, 1e-5, slopes)
    back = ops.dense_block_act_backward(grad, *out, *[P[n] for n in ORDER], *running, None, 0.0, training, 1e-5,
                                        x.shape[1], slopes)
    return out, back


@pytest.mark.parametrize("kind", list(ACT_KINDS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_act_block_matches_monai_fp64(emu, kind, training, spatial_dims):
    shape = ACT_GEOMS[spatial_dims]
    block = monai_act_block(spatial_dims, kind, shape[1]).train(training)
    P, slopes = act_operands(block, training)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_(True)
    want = block(xr)
    grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want.backward(grad)
    out, back = run_act(emu, x, P, slopes, training, grad)
    assert rel_l2_err(out[0], want) <= 1e-9
    assert out[0].is_contiguous(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
    assert rel_l2_err(back[0], xr.grad) <= 1e-9
    seqs = [layer.layers for layer in block]
    for i, name in enumerate(("norm1.weight", "norm1.bias", "conv1.weight", "norm2.weight", "norm2.bias",
                              "conv2.weight")):
        for layer, (got, s) in enumerate(zip(back[1 + i], seqs)):
            assert rel_l2_err(got, s.get_parameter(name).grad) <= 1e-9, f"layer {layer + 1} {name}"
    prelu = [a.weight.grad for s in seqs for a in (s.relu1, s.relu2) if isinstance(a, torch.nn.PReLU)]
    assert len(prelu) == (0 if kind.startswith("leaky") else 2 * len(seqs))
    for got, w in zip(act_slope_grads(block, back[7]), prelu):
        assert rel_l2_err(got, w) <= 1e-9
    if training:  # momentum 1: MONAI's running statistics are this batch's (variance unbiased)
        n = x.numel() // x.shape[1]
        for layer, s in enumerate(seqs):
            c = s.norm1.num_features
            assert rel_l2_err(out[1][:c], s.norm1.running_mean) <= 1e-9
            assert rel_l2_err(out[2][:c] * n / (n - 1), s.norm1.running_var) <= 1e-9
            assert rel_l2_err(out[3][layer], s.norm2.running_mean) <= 1e-9
            assert rel_l2_err(out[4][layer] * n / (n - 1), s.norm2.running_var) <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_act_block_matches_cpu_operator(emu, dtype, training, spatial_dims):
    """The emulated CUDA act operators against the CPU ones (per-channel PReLU slopes of both signs): every output
    and every gradient, the slopes' included; fp64 to roundoff, fp32 closely."""
    shape = ACT_GEOMS[spatial_dims]
    block = monai_act_block(spatial_dims, "prelu_c", shape[1], seed=4).train(training)
    P, slopes = act_operands(block, training)
    P = {n: [t.to(dtype) for t in lst] for n, lst in P.items()}
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(5))
    grad = torch.randn(x.shape[0], shape[1] + 9, *shape[2:], dtype=dtype, generator=torch.Generator().manual_seed(6))
    ours, spec = run_act(emu, x, P, slopes.to(dtype), training, grad), run_act(OPS, x, P, slopes.to(dtype), training,
                                                                                grad)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for a, b in zip(ours[0], spec[0]):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        if b.numel():
            assert rel_l2_err(a, b) <= tol
    flat = lambda r: [r[0]] + [t for lst in r[1:7] for t in lst] + [r[7]]  # noqa: E731
    for a, b in zip(flat(ours[1]), flat(spec[1])):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert rel_l2_err(a, b) <= (1e-9 if dtype == torch.float64 else 1e-4)


def test_act_block_half_and_autocast(emu):
    """bfloat16 data: slopes in float32 (the BN dtype), the outputs' metadata as the fake kernel declares; the
    autocast logic casts input and conv weights only (slopes and BN tensors stay float32), as for the ReLU block."""
    block = monai_act_block(2, "prelu_c", 5, seed=7).train()
    P, slopes = act_operands(block, True)
    P32 = {n: [t.float() for t in lst] for n, lst in P.items()}
    x = torch.randn(ACT_GEOMS[2], generator=torch.Generator().manual_seed(8))
    train = [[], [], [], []]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = emu.autocast_dense_block_act_forward(x, *[P32[n] for n in ORDER], *train, None, 0.0, True, 1e-5,
                                                   slopes.float())
    cast = {n: [t.bfloat16() if n in ("w1", "w2") else t for t in lst] for n, lst in P32.items()}
    want = emu.dense_block_act_forward(x.bfloat16(), *[cast[n] for n in ORDER], *train, None, 0.0, True, 1e-5,
                                       slopes.float())
    fake = block_ops._dense_block_act_forward_fake(x.bfloat16(), *[cast[n] for n in ORDER], *train, None, 0.0, True,
                                                   1e-5, slopes.float())
    for a, b, f in zip(got, want, fake):
        assert torch.equal(a, b)
        assert a.dtype == f.dtype and a.shape == f.shape and a.stride() == f.stride()
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    ref = block.float()(x)  # MONAI in float32: the bf16 block is within bf16 rounding of it
    assert rel_l2_err(got[0].float(), ref) <= 2e-2
    with pytest.raises(RuntimeError, match="slopes: expected dtype Float"):
        emu.dense_block_act_forward(x.bfloat16(), *[cast[n] for n in ORDER], *train, None, 0.0, True, 1e-5,
                                    slopes.bfloat16())


def test_act_block_bad_slopes(emu):
    block = monai_act_block(2, "leaky", 5)
    P, slopes = act_operands(block, True)
    x = torch.randn(ACT_GEOMS[2], dtype=torch.float64)
    args = (x, *[P[n] for n in ORDER], [], [], [], [], None, 0.0, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"slopes \(per layer: .*\): expected shape \[\d+\], got \[\d+\]"):
        emu.dense_block_act_forward(*args, slopes[:-1])
    with pytest.raises(RuntimeError, match="slopes: expected dtype Double"):
        emu.dense_block_act_forward(*args, slopes.float())


def test_act_block_takes_the_simple_path_under_fused_gemm(emu, fused_env):
    """DNF_CUDA_BN_GEMM=fused: the fused 1x1 kernel computes a ReLU prologue, so a LeakyReLU / PReLU block takes the
    simple path (no fused thread block runs) and gives the simple path's results bit for bit."""
    block = monai_act_block(2, "prelu_c", 5, seed=9).train()
    P, slopes = act_operands(block, True)
    P = {n: [t.bfloat16() if n in ("w1", "w2") else t.float() for t in lst] for n, lst in P.items()}
    x = torch.randn(ACT_GEOMS[2], generator=torch.Generator().manual_seed(10)).bfloat16()
    grad = torch.randn(x.shape[0], 14, *x.shape[2:], generator=torch.Generator().manual_seed(11)).bfloat16()
    before = emu.gemm_blocks_run()
    fused = run_act(emu, x, P, slopes.float(), True, grad)
    assert emu.gemm_blocks_run() == before
    fused_env.setenv("DNF_CUDA_BN_GEMM", "simple")
    simple = run_act(emu, x, P, slopes.float(), True, grad)
    assert all(torch.equal(a, b) for a, b in zip(fused[0], simple[0]))
    assert torch.equal(fused[1][7], simple[1][7]) and torch.equal(fused[1][0], simple[1][0])


# --- the InstanceNorm block (dense_block_in_*): MONAI's module in fp64, the CPU operators -------------------------

IN_NORMS = {"instance": "instance", "instance_affine": ("instance", {"affine": True})}
IN_ACTS = {"relu": "relu", "leaky": ("leakyrelu", {"negative_slope": 0.1})}
IN_GEOMS = {2: (5, 7, 6), 3: (3, 5, 3, 4)}  # C0 and spatial sizes, odd


def monai_in_block(spatial_dims, norm, act, C0, L=3, k=3, bs=2, seed=0):
    """MONAI's _DenseBlock with InstanceNorm layers, fp64; an affine norm gets random weights and biases."""
    densenet = pytest.importorskip("monai.networks.nets.densenet")
    torch.manual_seed(seed)
    block = densenet._DenseBlock(spatial_dims, L, C0, bs, k, 0.0, act=IN_ACTS[act], norm=IN_NORMS[norm]).double()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in block:
            for nm in (layer.layers.norm1, layer.layers.norm2):
                if nm.affine:
                    nm.weight.copy_(0.5 + torch.rand(nm.num_features, generator=g, dtype=torch.float64))
                    nm.bias.copy_(0.3 * torch.randn(nm.num_features, generator=g, dtype=torch.float64))
    return block


def in_operands(block):
    """(P, slopes) of a MONAI InstanceNorm block: ORDER's lists (ones / zeros for affine=False norms), the packed
    LeakyReLU slopes or None."""
    seqs = [layer.layers for layer in block]

    def wb(nm):
        if nm.affine:
            return nm.weight.detach().clone(), nm.bias.detach().clone()
        c = nm.num_features
        return torch.ones(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)

    n1, n2 = [wb(s.norm1) for s in seqs], [wb(s.norm2) for s in seqs]
    P = {"g1": [w for w, _ in n1], "b1": [b for _, b in n1], "w1": [s.conv1.weight.detach().clone() for s in seqs],
         "g2": [w for w, _ in n2], "b2": [b for _, b in n2], "w2": [s.conv2.weight.detach().clone() for s in seqs]}
    if not isinstance(seqs[0].relu1, torch.nn.LeakyReLU):
        return P, None
    slopes = block_ops.pack_slopes(
        [torch.full((s.norm1.num_features,), s.relu1.negative_slope, dtype=torch.float64) for s in seqs],
        [torch.full((s.norm2.num_features,), s.relu2.negative_slope, dtype=torch.float64) for s in seqs])
    return P, slopes


def run_in(ops, x, P, slopes, grad):
    out = ops.dense_block_in_forward(x, *[P[n] for n in ORDER], 1e-5, slopes)
    back = ops.dense_block_in_backward(grad, *out, *[P[n] for n in ORDER], 1e-5, x.shape[1], slopes)
    return out, back


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("act", list(IN_ACTS))
@pytest.mark.parametrize("norm", list(IN_NORMS))
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_in_block_matches_monai_fp64(emu, spatial_dims, norm, act, batch):
    """The emulated CUDA InstanceNorm operators against MONAI's _DenseBlock(norm="instance" / affine, act ReLU /
    LeakyReLU) in fp64: the output, the per-sample statistics, the input gradient and every parameter gradient."""
    C0, *spatial = IN_GEOMS[spatial_dims]
    block = monai_in_block(spatial_dims, norm, act, C0).train()
    P, slopes = in_operands(block)
    x = torch.randn(batch, C0, *spatial, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xr = x.clone().requires_grad_(True)
    want = block(xr)
    grad = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want.backward(grad)
    out, back = run_in(emu, x, P, slopes, grad)
    assert rel_l2_err(out[0], want) <= 1e-9
    assert out[0].is_contiguous(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
    dims = tuple(range(2, want.dim()))
    assert rel_l2_err(out[1], want.detach().mean(dims)) <= 1e-9
    assert rel_l2_err(out[2], want.detach().var(dims, unbiased=False)) <= 1e-9
    assert out[3].shape == out[4].shape == (3, batch, 2 * 3)
    assert rel_l2_err(back[0], xr.grad) <= 1e-9
    seqs = [layer.layers for layer in block]
    for i, name in enumerate(("norm1.weight", "norm1.bias", "conv1.weight", "norm2.weight", "norm2.bias",
                              "conv2.weight")):
        for layer, (got, s) in enumerate(zip(back[1 + i], seqs)):
            if name.startswith("norm") and not s.norm1.affine:
                assert got.shape == P[ORDER[i]][layer].shape  # ones / zeros of an affine=False norm
                continue
            assert rel_l2_err(got, s.get_parameter(name).grad) <= 1e-9, f"layer {layer + 1} {name}"
    assert back[7].shape == ((0,) if slopes is None else slopes.shape)


@pytest.mark.parametrize("slopes_on", [False, True], ids=["relu", "prelu"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_in_block_matches_cpu_operator(emu, spatial_dims, dtype, slopes_on):
    """The emulated CUDA InstanceNorm operators against the CPU ones (affine norms; per-channel slopes of both
    signs, their gradient included): every output and every gradient, fp64 to roundoff, fp32 closely."""
    C0, *spatial = IN_GEOMS[spatial_dims]
    P, _ = in_operands(monai_in_block(spatial_dims, "instance_affine", "relu", C0, seed=4))
    P = {n: [t.to(dtype) for t in lst] for n, lst in P.items()}
    slopes = None
    if slopes_on:
        n = sum(t.numel() for t in P["g1"] + P["g2"])
        slopes = (torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 0.7 - 0.2).to(dtype)
    x = torch.randn(3, C0, *spatial, dtype=dtype, generator=torch.Generator().manual_seed(5))
    grad = torch.randn(3, C0 + 9, *spatial, dtype=dtype, generator=torch.Generator().manual_seed(6))
    ours, spec = run_in(emu, x, P, slopes, grad), run_in(OPS, x, P, slopes, grad)
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    for a, b in zip(ours[0], spec[0]):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert rel_l2_err(a, b) <= tol
    flat = lambda r: [r[0]] + [t for lst in r[1:7] for t in lst] + [r[7]]  # noqa: E731
    for a, b in zip(flat(ours[1]), flat(spec[1])):
        assert a.dtype == b.dtype and a.shape == b.shape
        if b.numel():
            assert rel_l2_err(a, b) <= (1e-9 if dtype == torch.float64 else 1e-4)


def test_in_block_half_and_autocast(emu):
    """bfloat16 data: norm tensors in float32, the outputs' metadata as the fake kernel declares; the autocast logic
    casts input and conv weights only (norm weights and slopes stay float32). Against MONAI in float32."""
    from densenet_fast.ops import instance_block as in_ops

    block = monai_in_block(2, "instance_affine", "leaky", 5, seed=7).train()
    P, slopes = in_operands(block)
    P32 = {n: [t.float() for t in lst] for n, lst in P.items()}
    x = torch.randn(2, 5, 7, 6, generator=torch.Generator().manual_seed(8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = emu.autocast_dense_block_in_forward(x, *[P32[n] for n in ORDER], 1e-5, slopes.float())
    cast = {n: [t.bfloat16() if n in ("w1", "w2") else t for t in lst] for n, lst in P32.items()}
    want = emu.dense_block_in_forward(x.bfloat16(), *[cast[n] for n in ORDER], 1e-5, slopes.float())
    fake = in_ops._dense_block_in_forward_fake(x.bfloat16(), *[cast[n] for n in ORDER], 1e-5, slopes.float())
    for a, b, f in zip(got, want, fake):
        assert torch.equal(a, b)
        assert a.dtype == f.dtype and a.shape == f.shape and a.stride() == f.stride()
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    assert rel_l2_err(got[0].float(), block.float()(x)) <= 2e-2
    grad = torch.randn(got[0].shape, generator=torch.Generator().manual_seed(9)).bfloat16()
    back = emu.dense_block_in_backward(grad, *got, *[cast[n] for n in ORDER], 1e-5, 5, slopes.float())
    fake_back = in_ops._dense_block_in_backward_fake(grad, *got, *[cast[n] for n in ORDER], 1e-5, 5, slopes.float())
    flat = lambda r: [r[0]] + [t for lst in r[1:7] for t in lst] + [r[7]]  # noqa: E731
    for a, f in zip(flat(back), flat(fake_back)):
        assert a.dtype == f.dtype and a.shape == f.shape and a.is_contiguous() == f.is_contiguous()


def test_in_block_errors(emu):
    """The CPU operators' argument errors: slopes, one spatial element (F.instance_norm's ValueError), the backward's
    per-sample statistics."""
    P, slopes = in_operands(monai_in_block(2, "instance", "leaky", 5))
    Pl = [P[n] for n in ORDER]
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"slopes \(per layer: .*\): expected shape \[\d+\], got \[\d+\]"):
        emu.dense_block_in_forward(x, *Pl, 1e-5, slopes[:-1])
    with pytest.raises(RuntimeError, match="slopes: expected dtype Double"):
        emu.dense_block_in_forward(x, *Pl, 1e-5, slopes.float())
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        emu.dense_block_in_forward(x[:, :, :1, :1], *Pl, 1e-5)
    out = emu.dense_block_in_forward(x, *Pl, 1e-5)
    grad = torch.randn(out[0].shape, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"mean: expected shape \[2, 14\]"):
        emu.dense_block_in_backward(grad, out[0], out[1][0], *out[2:], *Pl, 1e-5, 5)
    with pytest.raises(RuntimeError, match=r"mean2: expected shape \[3, 2, 6\]"):
        emu.dense_block_in_backward(grad, *out[:3], out[3][0], out[4], *Pl, 1e-5, 5)


# --- NaN/Inf: one rule (csrc/common/nonfinite.h), the same results as the CPU kernels ---------------

def _poison(x, cases):
    x = x.clone()
    for (n, c, h, w), v in cases:
        x[n, c, h, w] = v
    return x


NONFINITE = {
    "nan": [((0, 1, 2, 3), float("nan"))],
    "inf": [((1, 0, 0, 1), float("inf")), ((0, 2, 4, 0), -float("inf"))],
}


@pytest.mark.parametrize("case", list(NONFINITE))
@pytest.mark.parametrize("training", [True, False])
def test_block_nonfinite_matches_cpu(emu, case, training):
    N, C0, H, W, L, k, bs = 2, 4, 5, 4, 3, 3, 2
    P = make_params(C0, L, k, bs, dtype=torch.float32, seed=9)
    x = _poison(torch.randn(N, C0, H, W), NONFINITE[case])
    running = [P[n] for n in RUNNING] if not training else [[], [], [], []]
    args = (x, *[P[n] for n in ORDER], *running, None, 0.0, training, 1e-5)
    ours, spec = emu.dense_block_forward(*args), OPS.dense_block_forward(*args)
    for a, b in zip(ours, spec):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, equal_nan=True)
    grad = torch.randn(spec[0].shape)
    bargs = (grad, *spec, *[P[n] for n in ORDER], *running, None, 0.0, training, 1e-5, C0)
    g_ours, g_spec = emu.dense_block_backward(*bargs), OPS.dense_block_backward(*bargs)
    for a, b in zip([g_ours[0]] + [t for lst in g_ours[1:] for t in lst],
                    [g_spec[0]] + [t for lst in g_spec[1:] for t in lst]):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_block_last_layer_gradient_not_finalised(emu):
    """The last layer's channels have no BN reader in the block: their gradient passes through as given
    even where their batch statistics are not finite (CPU rule; CUDA used to turn it into NaN)."""
    N, C0, H, W, L, k, bs = 2, 3, 4, 4, 2, 2, 2
    P = make_params(C0, L, k, bs, dtype=torch.float32, seed=10)
    x = torch.randn(N, C0, H, W)
    out = list(OPS.dense_block_forward(x, *[P[n] for n in ORDER], [], [], [], [], None, 0.0, True, 1e-5))
    out[1] = out[1].clone()
    out[1][-k:] = float("inf")  # non-finite statistics of the last layer's channels: xhat = -inf
    grad = torch.zeros(out[0].shape)
    grad[:, -k:] = 1.0
    bargs = (grad, *out, *[P[n] for n in ORDER], [], [], [], [], None, 0.0, True, 1e-5, C0)
    g_ours, g_spec = emu.dense_block_backward(*bargs), OPS.dense_block_backward(*bargs)
    for a, b in zip([g_ours[0]] + [t for lst in g_ours[1:] for t in lst],
                    [g_spec[0]] + [t for lst in g_spec[1:] for t in lst]):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert not g_ours[0].isnan().any()


@pytest.mark.parametrize("case", list(NONFINITE))
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 4, 5, 7), (1, 3, 6, 6)])
def test_tails_nonfinite_match_cpu(emu, case, training, shape):
    """Includes a non-finite value in a pixel the floor-mode pool drops (odd H/W): dWc's NaN rule."""
    N, C, H, W = shape
    cases = NONFINITE[case] + [((0, 1, H - 1, W - 1), float("inf"))]
    x = _poison(torch.randn(shape), [((n % N, c % C, h % H, w % W), v) for (n, c, h, w), v in cases])
    weight, bias = tail_args(C, torch.float32)
    if training:
        mean, var = OPS.channel_moments(x)
    else:
        mean, var = torch.rand(C) - 0.5, torch.rand(C) + 0.5
    cw = torch.randn(3, C, 1, 1)
    g = torch.randn(N, 3, H // 2, W // 2)
    for a, b in zip(emu.transition_backward(g, x, mean, var, weight, bias, cw, training, 1e-5),
                    OPS.transition_backward(g, x, mean, var, weight, bias, cw, training, 1e-5)):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
    g = torch.randn(N, C)
    for a, b in zip(emu.norm_relu_pool_backward(g, x, mean, var, weight, bias, training, 1e-5),
                    OPS.norm_relu_pool_backward(g, x, mean, var, weight, bias, training, 1e-5)):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)


# --- hot spots of issue 30: one-pass moments, 32-bit index decode, the dropped-pixel NaN rule -----------

def _ref_moments(x64, dims):
    return x64.mean(dims), x64.var(dims, unbiased=False)


@pytest.mark.parametrize("shape", [(1, 3, 1, 1), (2, 5, 3, 3), (64, 32, 7, 7), (3, 7, 64, 65), (2, 3, 150, 150)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_moments_one_pass_match_fp64(emu, shape, dtype):
    """channel_moments / sample_moments (two-pass chunks, Chan's merge up the tree): against fp64 on data
    far from zero (mean 50, std 1.5), where a naive one-pass sum of squares would lose every digit.
    Shapes: one row; one chunk; 7x7 at batch 64 with k = 32 channels (the narrow case that now uses
    16-row chunks and three levels); many chunks with partial last chunks and two or three tree levels."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + 50).to(dtype)
    x64 = x.double()
    tol = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2e-5}[dtype]
    mean, var = emu.channel_moments(x)
    m_ref, v_ref = _ref_moments(x64, (0, 2, 3))
    torch.testing.assert_close(mean.double(), m_ref, rtol=tol, atol=0)
    torch.testing.assert_close(var.double(), v_ref, rtol=5 * tol if dtype != torch.float64 else tol, atol=tol)
    sm, sv = emu.sample_moments(x)
    sm_ref, sv_ref = _ref_moments(x64.flatten(2), 2)
    torch.testing.assert_close(sm.double(), sm_ref, rtol=tol, atol=0)
    torch.testing.assert_close(sv.double(), sv_ref, rtol=5 * tol if dtype != torch.float64 else tol, atol=tol)


@pytest.mark.parametrize("shape", [(64, 32, 7, 7), (64, 128, 7, 7), (8, 64, 56, 56), (2, 3, 1, 1), (4, 5, 200, 200)])
def test_moments_are_few_wide_launches(emu, shape):
    """One statistics call is 1 + ceil(log32(chunks)) launches (the two-pass version: 2 * (1 + levels) + 2),
    and its first level has at least min(2^15, rows/16 * width) items: narrow layers get 16-row chunks."""
    N, C, H, W = shape
    rows = N * H * W
    x = torch.randn(shape)
    emu.take_launch_log()
    emu.channel_moments(x)
    log = emu.take_launch_log()
    chunks = -(-rows // 16)
    levels = math.ceil(math.log(chunks, 32)) if chunks > 1 else 0
    assert 1 <= len(log) <= 1 + levels
    assert log[0] >= min(2 ** 15, chunks * C, rows * C) or len(log) == 1
    assert log[-1] == C  # the last level writes the statistics
    if shape == (64, 32, 7, 7):
        assert len(log) == 3 and log[0] == 196 * 32  # was 6 launches, the first 25 * 32 = 800 threads wide


@pytest.mark.parametrize("a,b", [(0, 1), (7, 3), (2**32 - 1, 7), (2**32 - 1, 2**32 - 1), (2**32, 7), (2**40 + 5, 3),
                                 (5, 2**33), (3 * 2**31, 2**31), (2**62 + 12345, 2**20 + 7)])
def test_index_divmod_32_and_64_bit(emu, a, b):
    """launch.cuh's divmod: 32-bit division where both operands fit, 64-bit past 2^32; both equal Python's."""
    assert emu.divmod(a, b) == divmod(a, b)


@pytest.mark.parametrize("dhw,kd", [((1, 5, 7), 1), ((1, 6, 7), 1), ((1, 5, 6), 1), ((1, 6, 6), 1), ((3, 5, 7), 2),
                                    ((3, 4, 4), 2), ((2, 5, 6), 2), ((1, 1, 3), 1)])
def test_dropped_pixels_enumerates_exactly_the_dropped_ones(emu, dhw, kd):
    D, H, W = dhw
    Dr, Hr, Wr = kd * (D // kd), 2 * (H // 2), 2 * (W // 2)
    want = [(d * H + h) * W + w for d in range(D) for h in range(H) for w in range(W)
            if d >= Dr or h >= Hr or w >= Wr]
    got = emu.dropped_pixels(D, H, W, kd)
    assert sorted(got) == want and len(set(got)) == len(got)


@pytest.mark.parametrize("shape", [(2, 4, 5, 6), (2, 4, 6, 7), (2, 4, 5, 7), (2, 4, 3, 5, 7), (2, 4, 3, 4, 4)])
def test_dropped_pixel_nan_rule_each_run(emu, shape):
    """The transition's dWc NaN rule, now a column reduction over the dropped pixels: an Inf in one dropped
    pixel of channel c (the last column, the last row, the last plane, each where the shape has it) makes
    exactly column c of dWc NaN, as the CPU kernel does; eval mode, so nothing else is poisoned."""
    N, C = shape[:2]
    spatial = shape[2:]
    kd = 2 if len(shape) == 5 else 1
    D, H, W = (spatial if kd == 2 else (1, *spatial))
    Dr, Hr, Wr = kd * (D // kd), 2 * (H // 2), 2 * (W // 2)
    candidates = [(Dr - 1 if Dr else 0, 0, W - 1)] if W > Wr else []
    candidates += [(0, H - 1, 1)] if H > Hr else []
    candidates += [(D - 1, 1, 0)] if D > Dr else []
    assert candidates
    weight, bias = tail_args(C, torch.float32)
    mean, var = torch.rand(C) - 0.5, torch.rand(C) + 0.5
    Cout = 3
    cw = torch.randn(Cout, C, *([1] * len(spatial)))
    pooled = [s // 2 for s in spatial]
    for c, (d, h, w) in enumerate(candidates):
        x = torch.randn(shape)
        idx = (1, c, d, h, w) if kd == 2 else (1, c, h, w)
        x[idx] = float("inf")
        g = torch.randn(N, Cout, *pooled)
        ours = emu.transition_backward(g, x, mean, var, weight, bias, cw, False, 1e-5)
        spec = OPS.transition_backward(g, x, mean, var, weight, bias, cw, False, 1e-5)
        dwc = ours[3].flatten(1)
        assert dwc[:, c].isnan().all() and not dwc[:, [j for j in range(C) if j != c]].isnan().any()
        assert torch.equal(ours[3].isnan(), spec[3].isnan())
