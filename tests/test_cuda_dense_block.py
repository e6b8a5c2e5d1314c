"""CUDA kernels of the dense block and its tails: parity with torchvision, gradients against fp64,
opcheck, bad inputs, determinism, streams, autocast, half models, NaN/Inf rules, the fused BN+GEMM path.

No test pins the 1x1 path unless it compares the paths: the others run whatever DNF_CUDA_BN_GEMM
says (tools/run_gpu_checks.sh runs them with the default and again with "fused"), and none skips on a
GPU machine (the verdict counts a skip as a failure).

Every test that needs a GPU asks for the ``cuda`` fixture, which skips inside the test body: nothing
touches CUDA at import or collection time. The registration test runs everywhere the extension was
built with CUDA kernels (a GPU is not needed for it).

Tolerances: fp32 outputs and running statistics within 1e-4 (relative) of torchvision with TF32
off. Gradients are compared against an fp64 reference: our error must be within a small factor of
torchvision's own error in the same dtype (a deep BN network amplifies roundoff, so a fixed
tolerance would be either meaningless or flaky).
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

# Deterministic cuBLAS workspaces; read when cuBLAS is first used (setting it is not a CUDA call).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

from conftest import assert_bf16_autocast_no_worse, rel_l2_err  # noqa: E402

import densenet_fast as dnf  # noqa: E402
from densenet_fast.ops import dense_block as block_ops  # noqa: E402
from densenet_fast.ops import tail as tail_ops  # noqa: E402

tv_densenet = pytest.importorskip("torchvision.models.densenet")

OPS = torch.ops.densenet_fast
ALL_OPS = ("dense_block_forward", "dense_block_backward", "transition_forward", "transition_backward",
           "norm_relu_pool_forward", "norm_relu_pool_backward", "channel_moments", "sample_moments")
FUSED_ENV = "DNF_CUDA_BN_GEMM"


def test_cuda_kernels_registered():
    info = dnf.build_info()
    if not info["cuda"]:
        pytest.skip("extension built without CUDA kernels")
    assert info["cuda_kernels_registered"]
    for op in ALL_OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"densenet_fast::{op}", "CUDA"), op
    for op in ("dense_block_forward", "transition_forward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"densenet_fast::{op}", "AutocastCUDA"), op


@pytest.fixture
def cuda():
    """The CUDA device; skips (inside the test, never at collection) without a GPU or kernels."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not dnf.build_info()["cuda_kernels_registered"]:
        pytest.skip("extension built without CUDA kernels")
    torch.manual_seed(0)
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity at 1e-4 needs true fp32 GEMMs/convs
    torch.backends.cudnn.allow_tf32 = False
    yield torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def kernel_names(fn) -> set:
    """Names of the CUDA kernels fn() launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {evt.name for evt in prof.events() if evt.device_type == torch.autograd.DeviceType.CUDA}


# --- helpers -----------------------------------------------------------------------------------

def tv_block(L, C0, bs, k, device, seed=0):
    """torchvision _DenseBlock with non-trivial BN parameters and running statistics."""
    torch.manual_seed(seed)
    blk = tv_densenet._DenseBlock(num_layers=L, num_input_features=C0, bn_size=bs, growth_rate=k, drop_rate=0.0)
    with torch.no_grad():
        for m in blk.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return blk.to(device)


def ours_like(blk, L, C0, bs, k):
    ours = dnf.DenseBlock(L, C0, bs, k).to(next(blk.parameters()).device)
    ours.load_state_dict(blk.state_dict())
    ours.train(blk.training)
    return ours


def params_of(blk):
    return [p for _, p in sorted(blk.named_parameters())]


def grads_of(model, x, grad_out):
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    out = model(x)
    out.backward(grad_out.to(out.dtype))
    return out.detach(), [x.grad] + [p.grad for p in params_of(model)]


GEOMS = [  # (N, C0, H, W, L, k, bn_size)
    (4, 16, 8, 8, 4, 8, 4),
    (3, 5, 7, 5, 3, 3, 2),    # odd everything (non-vectorised paths)
    (2, 24, 9, 11, 5, 12, 4),
    (1, 3, 1, 1, 2, 2, 1),    # 1x1 spatial, N=1 (eval only: one value per channel)
]


# --- parity ------------------------------------------------------------------------------------

# BatchNorm needs more than one value per channel in training: the 1x1, N=1 geometry runs in eval only
# (no skips: tools/run_gpu_checks.sh counts a skipped GPU test as a failure).
PARITY_CASES = [(g, t) for g in GEOMS for t in (True, False) if not (t and g[0] * g[2] * g[3] == 1)]


@pytest.mark.parametrize("geom,training", PARITY_CASES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fp32_parity_with_torchvision(cuda, geom, training, channels_last):
    N, C0, H, W, L, k, bs = geom
    tv = tv_block(L, C0, bs, k, cuda).train(training)
    ours = ours_like(tv, L, C0, bs, k)
    ref = copy.deepcopy(tv).double()
    x = torch.randn(N, C0, H, W, device=cuda) * 1.5 + 0.2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(N, C0 + L * k, H, W, device=cuda)

    out_tv, g_tv = grads_of(tv, x, grad)
    out_us, g_us = grads_of(ours, x, grad)
    out_64, g_64 = grads_of(ref, x.double(), grad.double())

    assert out_us.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out_us, out_tv, rtol=1e-4, atol=1e-4 * out_tv.abs().max().item())
    for (name, b_tv), b_us in zip(tv.named_buffers(), ours.buffers()):
        if b_tv.is_floating_point():
            torch.testing.assert_close(b_us, b_tv, rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert torch.equal(b_us, b_tv), name
    for gt, gu in zip(g_tv, g_us):
        assert gu.dtype == gt.dtype and gu.shape == gt.shape
    assert_grad_errors_comparable(g_us, g_tv, g_64, factor=3.0, floor=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["simple", "fused"])
@pytest.mark.parametrize("geom", GEOMS[:3])
def test_autocast_vs_fp64(cuda, monkeypatch, dtype, path, geom):
    """The op under autocast (AutocastCUDA kernel: input + conv weights cast, BN in fp32) against
    torchvision under the same autocast, both measured against fp64."""
    monkeypatch.setenv(FUSED_ENV, path)
    N, C0, H, W, L, k, bs = geom
    tv = tv_block(L, C0, bs, k, cuda).train()
    ref = copy.deepcopy(tv).double()
    ours = ours_like(tv, L, C0, bs, k)
    x = (torch.randn(N, C0, H, W, device=cuda) + 0.2).to(memory_format=torch.channels_last)
    grad = torch.randn(N, C0 + L * k, H, W, device=cuda)

    with torch.autocast("cuda", dtype=dtype):
        out_tv, g_tv = grads_of(tv, x, grad)
    xr = x.detach().clone().requires_grad_()
    params = ours.block_params()
    with torch.autocast("cuda", dtype=dtype):
        res = block_ops.fused_dense_block(xr, params, training=True)
    assert res.buffer.dtype == dtype and res.mean.dtype == torch.float32 and res.mean2.dtype == torch.float32
    res.buffer.backward(grad.to(dtype))
    g_us = [xr.grad] + [p.grad for p in params_of(ours)]
    out_64, g_64 = grads_of(ref, x.double(), grad.double())

    assert rel_l2_err(res.buffer, out_64) <= 2 * rel_l2_err(out_tv, out_64) + 1e-3
    for gt, gu in zip(g_tv, g_us):
        assert gu.dtype == gt.dtype == torch.float32  # master weights / input stay fp32
    assert_grad_errors_comparable(g_us, g_tv, g_64, factor=3.0, floor=1e-2)


def assert_grad_errors_comparable(ours, base, ref, factor, floor):
    """Our gradients' errors vs fp64 against torchvision's in the same dtype, as mean and median
    over all gradient tensors (roundoff through BN + ReLU is dominated by ReLU mask flips near 0,
    which move single tensors a lot in either implementation)."""
    e_us = [rel_l2_err(g, r) for g, r in zip(ours, ref)]
    e_tv = [rel_l2_err(g, r) for g, r in zip(base, ref)]
    assert statistics.mean(e_us) <= factor * statistics.mean(e_tv) + floor, (e_us, e_tv)
    assert statistics.median(e_us) <= factor * statistics.median(e_tv) + floor, (e_us, e_tv)


def test_module_under_autocast(cuda):
    """dnf.DenseBlock under autocast on CUDA runs the fused op (needs the Python layer to leave the
    casting to the AutocastCUDA kernel)."""
    tv = tv_block(3, 16, 4, 8, cuda).train()
    ours = ours_like(tv, 3, 16, 4, 8)
    x = torch.randn(4, 16, 8, 8, device=cuda)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = ours(x)
        ref = tv(x)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("geom", GEOMS[:3] + [(2, 64, 14, 14, 4, 32, 4), (3, 40, 9, 9, 2, 40, 4)])
def test_fused_path_matches_simple(cuda, monkeypatch, dtype, geom):
    """DNF_CUDA_BN_GEMM=fused runs bn_relu_gemm_kernel (checked in the profiler), and its buffer,
    statistics (mean, var, mean2, var2) and every gradient are as close to fp64 as the simple path's
    (the last geometry has 160 bottleneck channels: grid.y = 2)."""
    N, C0, H, W, L, k, bs = geom
    tv = tv_block(L, C0, bs, k, cuda)
    P = [[t.detach().to(dtype) if t.dim() == 4 else t.detach() for t in lst]
         for lst in ours_like(tv, L, C0, bs, k).block_params()]
    x = torch.randn(N, C0, H, W, device=cuda, dtype=dtype)
    grad = torch.randn(N, C0 + L * k, H, W, device=cuda, dtype=dtype)
    P64 = [[t.double() for t in lst] for lst in P]
    out64 = OPS.dense_block_forward(x.double(), *P64[:6], [], [], [], [], None, 0.0, True, 1e-5)
    g64 = OPS.dense_block_backward(grad.double(), *out64, *P64[:6], [], [], [], [], None, 0.0, True, 1e-5, C0)
    res = {}
    for path in ("simple", "fused"):
        monkeypatch.setenv(FUSED_ENV, path)
        holder = {}

        def run():
            holder["out"] = OPS.dense_block_forward(x, *P[:6], [], [], [], [], None, 0.0, True, 1e-5)
            holder["grads"] = OPS.dense_block_backward(grad, *holder["out"], *P[:6], [], [], [], [], None, 0.0, True,
                                                       1e-5, C0)

        names = kernel_names(run)
        assert any("bn_relu_gemm_kernel" in n for n in names) == (path == "fused"), sorted(names)
        res[path] = holder
    for i, name in enumerate(("buffer", "mean", "var", "mean2", "var2")):
        e_f, e_s = rel_l2_err(res["fused"]["out"][i], out64[i]), rel_l2_err(res["simple"]["out"][i], out64[i])
        assert e_f <= 1.5 * e_s + 2e-3, (name, e_f, e_s)

    def flat(g):
        return [g[0]] + [t for lst in g[1:] for t in lst]

    e_f = [rel_l2_err(a, b) for a, b in zip(flat(res["fused"]["grads"]), flat(g64))]
    e_s = [rel_l2_err(a, b) for a, b in zip(flat(res["simple"]["grads"]), flat(g64))]
    assert statistics.median(e_f) <= 1.5 * statistics.median(e_s) + 2e-3, (e_f, e_s)
    assert statistics.mean(e_f) <= 1.5 * statistics.mean(e_s) + 2e-3, (e_f, e_s)


def test_unknown_gemm_path_is_an_error(cuda, monkeypatch):
    monkeypatch.setenv(FUSED_ENV, "fastest")
    with pytest.raises(RuntimeError, match=r'DNF_CUDA_BN_GEMM: expected "simple" or "fused" \(or unset\)'):
        OPS.dense_block_forward(*_block_args(cuda))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_grad_large_k(cuda, dtype):
    """dW1 and the transition's dWc reduce over K = N*H*W pixels (here 25088): accumulated in float,
    their errors vs fp64 stay within 2x those of torchvision under the same autocast."""
    N, C0, H, W, L, k, bs = 32, 32, 28, 28, 2, 16, 4
    tv = tv_block(L, C0, bs, k, cuda).train()
    ref = copy.deepcopy(tv).double()
    ours = ours_like(tv, L, C0, bs, k)
    x = torch.randn(N, C0, H, W, device=cuda).to(memory_format=torch.channels_last)
    grad = torch.randn(N, C0 + L * k, H, W, device=cuda)
    with torch.autocast("cuda", dtype=dtype):
        _, g_tv = grads_of(tv, x, grad)
        _, g_us = grads_of(ours, x, grad)
    _, g_64 = grads_of(ref, x.double(), grad.double())
    names = [n for n, _ in sorted(tv.named_parameters())]
    for i, name in enumerate(names):
        if name.endswith("conv1.weight"):
            e_us, e_tv = rel_l2_err(g_us[1 + i], g_64[1 + i]), rel_l2_err(g_tv[1 + i], g_64[1 + i])
            assert e_us <= 2 * e_tv + 2e-3, (name, e_us, e_tv)
    C = 64
    xt = torch.randn(N, C, H + 1, W + 1, device=cuda)
    w, b = torch.rand(C, device=cuda) + 0.5, torch.rand(C, device=cuda) - 0.5
    cw = torch.randn(32, C, 1, 1, device=cuda, requires_grad=True)
    mean, var = OPS.channel_moments(xt)
    gt = torch.randn(N, 32, (H + 1) // 2, (W + 1) // 2, device=cuda)
    with torch.autocast("cuda", dtype=dtype):
        out = dnf.ops.transition(xt, mean, var, w, b, cw, training=True)
    (dwc,) = torch.autograd.grad(out, cw, gt.to(out.dtype))
    cw64 = cw.detach().double().requires_grad_()
    ref64 = F.avg_pool2d(F.conv2d(F.relu(F.batch_norm(xt.double(), None, None, w.double(), b.double(), True)), cw64), 2)
    (dwc64,) = torch.autograd.grad(ref64, cw64, gt.double())
    with torch.autocast("cuda", dtype=dtype):
        cwt = cw.detach().clone().requires_grad_()
        reft = F.avg_pool2d(F.conv2d(F.relu(F.batch_norm(xt, None, None, w, b, True)), cwt), 2)
    (dwct,) = torch.autograd.grad(reft, cwt, gt.to(reft.dtype))
    assert rel_l2_err(dwc, dwc64) <= 2 * rel_l2_err(dwct, dwc64) + 2e-3


def test_dropout_mask(cuda):
    N, C0, H, W, L, k, bs, p = 3, 8, 6, 6, 3, 4, 2, 0.25
    tv = tv_block(L, C0, bs, k, cuda)
    P = ours_like(tv, L, C0, bs, k).block_params()
    x = torch.randn(N, C0, H, W, device=cuda, dtype=torch.float64)
    P64 = [[t.double() for t in lst] for lst in P]
    mask = torch.rand(N, L * k, H, W, device=cuda) > p

    def reference(x, *flat):
        lists = [list(flat[i * L:(i + 1) * L]) for i in range(6)]
        feats = [x]
        for li in range(L):
            u = F.relu(F.batch_norm(torch.cat(feats, 1), None, None, lists[0][li], lists[1][li], True, 0.0, 1e-5))
            v = F.relu(F.batch_norm(F.conv2d(u, lists[2][li]), None, None, lists[3][li], lists[4][li], True, 0.0, 1e-5))
            feats.append(F.conv2d(v, lists[5][li], padding=1) * mask[:, li * k:(li + 1) * k] / (1 - p))
        return torch.cat(feats, 1)

    leaves = [x.clone().requires_grad_()] + [t.clone().requires_grad_() for lst in P64[:6] for t in lst]
    ref = reference(*leaves)
    flat_ours = [t.clone().requires_grad_() for t in leaves]
    out = block_ops.fused_dense_block(flat_ours[0], block_ops.BlockParams(
        *[flat_ours[1 + i * L:1 + (i + 1) * L] for i in range(6)], *P64[6:]), training=True, drop_rate=p,
        dropout_mask=mask)
    torch.testing.assert_close(out.buffer, ref.detach(), rtol=1e-9, atol=1e-9)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, leaves, grad)
    got = torch.autograd.grad(out.buffer, flat_ours, grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9)


# --- tails -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(4, 32, 8, 8), (3, 7, 5, 7), (2, 5, 2, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_tails_fp32(cuda, shape, training):
    N, C, H, W = shape
    x = (torch.randn(shape, device=cuda) * 2 + 0.3).to(memory_format=torch.channels_last)
    bn = torch.nn.BatchNorm2d(C).to(cuda)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    conv = torch.nn.Conv2d(C, 6, 1, bias=False).to(cuda)
    if training:
        mean, var = OPS.channel_moments(x)
        torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-5)
    else:
        mean, var = bn.running_mean, bn.running_var
    bn.train(training)

    leaves = [x.detach().clone().requires_grad_(), bn.weight, bn.bias, conv.weight]
    ref = F.avg_pool2d(conv(F.relu(bn(leaves[0]))), 2)
    ours_in = [t.detach().clone().requires_grad_() for t in leaves]
    out = dnf.ops.transition(ours_in[0], mean, var, ours_in[1], ours_in[2], ours_in[3], training=training)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, ours_in, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)

    leaves = [x.detach().clone().requires_grad_(), bn.weight, bn.bias]
    ref = F.adaptive_avg_pool2d(F.relu(bn(leaves[0])), 1).flatten(1)
    ours_in = [t.detach().clone().requires_grad_() for t in leaves]
    out = dnf.ops.norm_relu_pool(ours_in[0], mean, var, ours_in[1], ours_in[2], training=training)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, ours_in, grad), torch.autograd.grad(ref, leaves, grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_transition_autocast(cuda):
    x = torch.randn(4, 16, 8, 8, device=cuda)
    w, b = torch.rand(16, device=cuda) + 0.5, torch.rand(16, device=cuda) - 0.5
    cw = torch.randn(8, 16, 1, 1, device=cuda, requires_grad=True)
    mean, var = OPS.channel_moments(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = dnf.ops.transition(x, mean, var, w, b, cw, training=True)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert cw.grad.dtype == torch.float32
    ref = F.avg_pool2d(F.conv2d(F.relu(F.batch_norm(x, None, None, w, b, True)), cw), 2)
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


# --- opcheck, bad inputs, determinism, streams ---------------------------------------------------

def _block_args(device, dtype=torch.float32, training=True, N=2, C0=5, H=4, W=3, L=2, k=3, bs=2, mask=False):
    sd = block_ops.stats_dtype(dtype)
    inter = bs * k
    g1 = [torch.rand(C0 + li * k, device=device, dtype=sd) + 0.5 for li in range(L)]
    b1 = [torch.rand(C0 + li * k, device=device, dtype=sd) - 0.5 for li in range(L)]
    w1 = [torch.randn(inter, C0 + li * k, 1, 1, device=device, dtype=dtype) for li in range(L)]
    g2 = [torch.rand(inter, device=device, dtype=sd) + 0.5 for _ in range(L)]
    b2 = [torch.rand(inter, device=device, dtype=sd) - 0.5 for _ in range(L)]
    w2 = [torch.randn(k, inter, 3, 3, device=device, dtype=dtype) for _ in range(L)]
    running = [[], [], [], []]
    if not training:
        running = [[torch.randn(C0 + li * k, device=device, dtype=sd) * 0.1 for li in range(L)],
                   [torch.rand(C0 + li * k, device=device, dtype=sd) + 0.5 for li in range(L)],
                   [torch.randn(inter, device=device, dtype=sd) * 0.1 for _ in range(L)],
                   [torch.rand(inter, device=device, dtype=sd) + 0.5 for _ in range(L)]]
    m = (torch.rand(N, L * k, H, W, device=device) > 0.2) if mask else None
    x = torch.randn(N, C0, H, W, device=device, dtype=dtype)
    return [x, g1, b1, w1, g2, b2, w2, *running, m, 0.2 if mask else 0.0, training, 1e-5]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("training,mask", [(True, False), (False, False), (True, True)])
def test_opcheck_dense_block(cuda, dtype, training, mask):
    args = _block_args(cuda, dtype, training, mask=mask)
    for t in [args[0]] + [t for lst in args[1:7] for t in lst]:
        t.requires_grad_(True)
    torch.library.opcheck(OPS.dense_block_forward, tuple(args))
    with torch.no_grad():
        out = OPS.dense_block_forward(*args)
    grad = torch.randn_like(out[0])
    bargs = (grad, *out, *args[1:11], args[11], args[12], args[13], args[14], args[0].shape[1])
    torch.library.opcheck(OPS.dense_block_backward, tuple(a.detach() if isinstance(a, torch.Tensor) else
                                                          ([t.detach() for t in a] if isinstance(a, list) else a)
                                                          for a in bargs))


@pytest.mark.parametrize("training", [True, False])
def test_opcheck_half_model(cuda, training):
    """BN tensors in the data dtype (a .bfloat16() model): the real kernels' outputs match the fake
    kernels' (statistics float32, BN gradients bfloat16), forward and backward."""
    args = _block_args(cuda, torch.bfloat16, training)
    args[1:11] = [[t.bfloat16() for t in lst] for lst in args[1:11]]
    for t in [args[0]] + [t for lst in args[1:7] for t in lst]:
        t.requires_grad_(True)
    torch.library.opcheck(OPS.dense_block_forward, tuple(args))
    x = torch.randn(2, 6, 5, 4, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    mean, var = OPS.channel_moments(x.detach())
    if not training:
        mean, var = mean.bfloat16(), var.bfloat16()
    w = (torch.rand(6, device=cuda) + 0.5).bfloat16().requires_grad_()
    b = (torch.rand(6, device=cuda) - 0.5).bfloat16().requires_grad_()
    cw = torch.randn(3, 6, 1, 1, device=cuda, dtype=torch.bfloat16, requires_grad=True)
    torch.library.opcheck(OPS.transition_forward, (x, mean, var, w, b, cw, training, 1e-5))
    torch.library.opcheck(OPS.norm_relu_pool_forward, (x, mean, var, w, b, training, 1e-5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_tails(cuda, dtype, training):
    sd = block_ops.stats_dtype(dtype)
    x = torch.randn(2, 6, 5, 4, device=cuda, dtype=dtype)
    mean, var = (t.to(sd) for t in OPS.channel_moments(x))
    w = (torch.rand(6, device=cuda, dtype=sd) + 0.5).requires_grad_()
    b = (torch.rand(6, device=cuda, dtype=sd) - 0.5).requires_grad_()
    cw = torch.randn(3, 6, 1, 1, device=cuda, dtype=dtype, requires_grad=True)
    xr = x.clone().requires_grad_()
    torch.library.opcheck(OPS.transition_forward, (xr, mean, var, w, b, cw, training, 1e-5))
    torch.library.opcheck(OPS.norm_relu_pool_forward, (xr, mean, var, w, b, training, 1e-5))
    torch.library.opcheck(OPS.channel_moments, (x,))
    g = torch.randn(2, 3, 2, 2, device=cuda, dtype=dtype)
    torch.library.opcheck(OPS.transition_backward, (g, x, mean, var, w.detach(), b.detach(), cw.detach(), training,
                                                    1e-5))
    g = torch.randn(2, 6, device=cuda, dtype=dtype)
    torch.library.opcheck(OPS.norm_relu_pool_backward, (g, x, mean, var, w.detach(), b.detach(), training, 1e-5))


def _bad(args, i, value):
    args = list(args)
    args[i] = value
    return args


BAD_BLOCK = [
    # (description, mutate(args, device) -> args, error regex)
    ("3-D input", lambda a, d: _bad(a, 0, a[0][0]), r"input: expected a 4-D tensor"),
    ("int input", lambda a, d: _bad(a, 0, a[0].long()), r"input: expected dtype float32, float16, bfloat16 or float64"),
    ("fp8 input", lambda a, d: _bad(a, 0, a[0].to(torch.float8_e4m3fn)), r"input: expected dtype float32"),
    ("CPU input", lambda a, d: _bad(a, 0, a[0].cpu()), r"input: expected a CUDA tensor, got a tensor on cpu"),
    ("empty batch", lambda a, d: _bad(a, 0, a[0][:0]), r"input: expected a non-empty batch"),
    ("conv1 dtype", lambda a, d: _bad(a, 3, [a[3][0].double()] + a[3][1:]), r"conv1_weight\[0\]: expected dtype Float"),
    ("conv2 on CPU", lambda a, d: _bad(a, 6, [a[6][0].cpu()] + a[6][1:]),
     r"conv2_weight\[0\]: expected a tensor on cuda"),
    ("norm1 shape", lambda a, d: _bad(a, 1, [a[1][0][:-1]] + a[1][1:]),
     r"norm1_weight\[0\].*expected shape \[5\], got \[4\]"),
    ("list length", lambda a, d: _bad(a, 2, a[2][:1]), r"norm1_bias: expected 2 tensors"),
    ("drop rate", lambda a, d: _bad(a, 12, 1.0), r"drop_rate: expected a value in \[0, 1\)"),
    ("eps", lambda a, d: _bad(a, 14, 0.0), r"eps: expected a positive value"),
    ("mask dtype", lambda a, d: _bad(a, 11, torch.ones(2, 6, 4, 3, device=d)),
     r"dropout_mask: expected dtype torch.bool"),
    ("mask shape", lambda a, d: _bad(a, 11, torch.ones(2, 5, 4, 3, device=d, dtype=torch.bool)),
     r"dropout_mask: expected shape"),
    ("single value", lambda a, d: _bad(a, 0, a[0][:1, :, :1, :1]),
     r"Expected more than 1 value per channel when training"),
]


@pytest.mark.parametrize("case", BAD_BLOCK, ids=[c[0] for c in BAD_BLOCK])
def test_bad_inputs(cuda, case):
    _, mutate, pattern = case
    args = mutate(_block_args(cuda), cuda)
    with pytest.raises(RuntimeError, match=pattern):
        OPS.dense_block_forward(*args)


def test_bad_inputs_half_bn_dtype(cuda):
    """BN tensors are float32 or the input's own dtype (a .bfloat16() model); another dtype is an error."""
    args = _block_args(cuda, torch.bfloat16)
    args[1] = [t.half() for t in args[1]]
    with pytest.raises(RuntimeError, match=r"norm1_weight\[0\]: expected dtype Float \(the BatchNorm dtype.*got Half"):
        OPS.dense_block_forward(*args)


def test_bad_inputs_tails(cuda):
    x = torch.randn(2, 4, 5, 5, device=cuda)
    m, v = OPS.channel_moments(x)
    w, b = torch.ones(4, device=cuda), torch.zeros(4, device=cuda)
    with pytest.raises(RuntimeError, match=r"conv_weight: expected shape \[C_out, 4, 1, 1\]"):
        OPS.transition_forward(x, m, v, w, b, torch.randn(3, 5, 1, 1, device=cuda), True, 1e-5)
    with pytest.raises(RuntimeError, match=r"H >= 2 and W >= 2"):
        OPS.transition_forward(x[:, :, :1], m, v, w, b, torch.randn(3, 4, 1, 1, device=cuda), True, 1e-5)
    with pytest.raises(RuntimeError, match=r"mean: expected shape \[4\]"):
        OPS.norm_relu_pool_forward(x, m[:3], v, w, b, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight: expected a tensor on cuda"):
        OPS.norm_relu_pool_forward(x, m, v, w.cpu(), b, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"grad_output: expected shape \[2, 4\]"):
        OPS.norm_relu_pool_backward(torch.randn(2, 3, device=cuda), x, m, v, w, b, True, 1e-5)


@pytest.mark.parametrize("path", ["simple", "fused"])
def test_deterministic(cuda, monkeypatch, path):
    """Two runs (forward + backward) are bitwise equal with deterministic algorithms requested (our
    reductions are deterministic by construction; cuDNN/cuBLAS follow the global flag)."""
    monkeypatch.setenv(FUSED_ENV, path)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        tv = tv_block(4, 32, 4, 16, cuda)
        results = []
        for _ in range(2):
            ours = ours_like(tv, 4, 32, 4, 16)
            x = torch.randn(8, 32, 12, 12, device=cuda, generator=torch.Generator(cuda).manual_seed(5))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                res = block_ops.fused_dense_block(x.requires_grad_(), ours.block_params(), training=True)
            res.buffer.float().square().sum().backward()
            results.append([res.buffer, res.mean, res.var, res.mean2, x.grad] + [p.grad for p in params_of(ours)])
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(old)


def test_current_stream_and_device(cuda):
    """Every kernel and library call runs on the caller's current stream, while other work runs
    concurrently on a second stream: the input is written on stream s right after a long spin kernel
    (so a kernel launched on any other stream would read it unwritten), a long GEMM chain keeps a third
    stream busy meanwhile, and the results equal those of a plain run on the default stream."""
    args = _block_args(cuda, training=True, N=8, C0=32, H=24, W=24, L=4, k=16, bs=4)
    ref = OPS.dense_block_forward(*args)
    back_ref = OPS.dense_block_backward(torch.ones_like(ref[0]), *ref, *args[1:11], None, 0.0, True, 1e-5, 32)
    x0 = args[0]
    busy_a = torch.randn(2048, 2048, device=cuda)
    torch.cuda.synchronize()
    s, busy = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(busy):
        acc = busy_a
        for _ in range(20):  # concurrent work on another stream
            acc = torch.tanh(acc @ busy_a)
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)  # the input below is written late on s
        x = x0 * 1.0
        out = OPS.dense_block_forward(x, *args[1:])
        grad = torch.ones_like(out[0])
        back = OPS.dense_block_backward(grad, *out, *args[1:11], None, 0.0, True, 1e-5, 32)
        mean_t, var_t = OPS.channel_moments(out[0])
    torch.cuda.synchronize()
    assert torch.isfinite(acc).all()
    for a, b in zip(out, ref):
        assert torch.equal(a, b)
    assert torch.equal(back[0], back_ref[0])
    for la, lb in zip(back[1:], back_ref[1:]):
        for a, b in zip(la, lb):
            assert torch.equal(a, b)
    m_ref, v_ref = OPS.channel_moments(ref[0])
    assert torch.equal(mean_t, m_ref) and torch.equal(var_t, v_ref)
    if torch.cuda.device_count() > 1:
        dev1 = torch.device("cuda", 1)
        moved = [a.to(dev1) if isinstance(a, torch.Tensor) else ([t.to(dev1) for t in a] if isinstance(a, list) else a)
                 for a in args]
        out1 = OPS.dense_block_forward(*moved)
        assert out1[0].device == dev1
        torch.testing.assert_close(out1[0].cpu(), ref[0].cpu())


NONFINITE = {"nan": [((0, 1, 2, 3), float("nan"))],
             "inf": [((1, 0, 0, 1), float("inf")), ((0, 2, 4, 0), -float("inf")), ((0, 1, 4, 3), float("inf"))]}


@pytest.mark.parametrize("case", list(NONFINITE))
@pytest.mark.parametrize("training", [True, False])
def test_nonfinite_matches_cpu(cuda, case, training):
    """NaN/Inf follow the CPU kernels' rules (csrc/common/nonfinite.h): the same NaN pattern in every
    output and gradient, block and tails (odd H/W: the transition's dropped-pixel dWc rule)."""
    args = _block_args(torch.device("cpu"), training=training, N=2, C0=4, H=5, W=5, L=3, k=3, bs=2)
    for (n, c, h, w), v in NONFINITE[case]:
        args[0][n, c, h, w] = v

    def to(a, d):
        return a.to(d) if isinstance(a, torch.Tensor) else ([t.to(d) for t in a] if isinstance(a, list) else a)

    out_c = OPS.dense_block_forward(*args)
    out_g = OPS.dense_block_forward(*[to(a, cuda) for a in args])
    grad = torch.randn(out_c[0].shape)
    bargs = [grad, *out_c, *args[1:11], None, 0.0, training, 1e-5, 4]
    res_c = [out_c, OPS.dense_block_backward(*bargs)]
    res_g = [out_g, OPS.dense_block_backward(*[to(a, cuda) for a in bargs])]
    x, C = args[0], 4
    w, b = torch.rand(C) + 0.5, torch.rand(C) - 0.5
    mean, var = (OPS.channel_moments(x) if training else (torch.rand(C) - 0.5, torch.rand(C) + 0.5))
    cw = torch.randn(3, C, 1, 1)
    targs = [torch.randn(2, 3, 2, 2), x, mean, var, w, b, cw, training, 1e-5]
    nargs = [torch.randn(2, C), x, mean, var, w, b, training, 1e-5]
    res_c += [OPS.transition_backward(*targs), OPS.norm_relu_pool_backward(*nargs)]
    res_g += [OPS.transition_backward(*[to(a, cuda) for a in targs]),
              OPS.norm_relu_pool_backward(*[to(a, cuda) for a in nargs])]

    def flat(r):
        return [t for item in r for t in (item if isinstance(item, (list, tuple)) else [item])
                for t in (t if isinstance(t, (list, tuple)) else [t])]

    for a, b in zip(flat(res_g), flat(res_c)):
        assert torch.equal(a.cpu().isnan(), b.isnan())
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-4, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_gated_tails_match_cpu(cuda, training, dtype):
    """The SE gate folded into the CUDA tails (docs/design.md §5) against the CPU operators (fp32 data;
    bf16 buffers with float32 gates and BN tensors, as under autocast, against fp32 on the CPU)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 6, 7, 9, generator=g).contiguous(memory_format=torch.channels_last)
    gate = torch.rand(3, 6, generator=g) + 0.1
    w, b = torch.rand(6, generator=g) + 0.5, torch.rand(6, generator=g) - 0.5
    cw = torch.randn(4, 6, 1, 1, generator=g)
    xd = x.to(dtype)
    m_c, v_c = OPS.sample_moments(xd.float())
    m_g, v_g = OPS.sample_moments(xd.to(cuda))
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(m_g.cpu(), m_c, **tol)
    torch.testing.assert_close(v_g.cpu(), v_c, **tol)
    mean, var = (tail_ops.gated_channel_moments(m_c, v_c, gate) if training
                 else (torch.rand(6, generator=g) - 0.5, torch.rand(6, generator=g) + 0.5))
    targs = [xd.float(), mean, var, w, b, cw, training, 1e-5, gate]
    nargs = [xd.float(), mean, var, w, b, training, 1e-5, gate]
    on = [a.to(cuda) for a in targs[:5]] + [cw.to(cuda, dtype), training, 1e-5, gate.to(cuda)]
    on[0] = xd.to(cuda)
    out_c, out_g = OPS.transition_forward(*targs), OPS.transition_forward(*on)
    torch.testing.assert_close(out_g.float().cpu(), out_c, **tol)
    go = torch.randn(out_c.shape, generator=g)
    for a, c in zip(OPS.transition_backward(go.to(cuda, dtype), *on), OPS.transition_backward(go, *targs)):
        torch.testing.assert_close(a.float().cpu(), c, rtol=tol["rtol"] * 5, atol=tol["atol"] * 5)
    non = [on[0], *on[1:5], training, 1e-5, gate.to(cuda)]
    torch.testing.assert_close(OPS.norm_relu_pool_forward(*non).float().cpu(), OPS.norm_relu_pool_forward(*nargs),
                               **tol)
    gp = torch.randn(3, 6, generator=g)
    for a, c in zip(OPS.norm_relu_pool_backward(gp.to(cuda, dtype), *non), OPS.norm_relu_pool_backward(gp, *nargs)):
        torch.testing.assert_close(a.float().cpu(), c, rtol=tol["rtol"] * 5, atol=tol["atol"] * 5)


HALF_MODELS = {  # (builder, image size): CIFAR stem; ImageNet stem (fused BN-ReLU-max-pool) and transitions
    "densenet_bc": (lambda: dnf.densenet_bc(depth=22, growth_rate=12, num_classes=10, impl="reference"), 32),
    "imagenet_stem": (lambda: dnf.DenseNet(growth_rate=8, block_config=(2, 3), num_init_features=16, bn_size=2,
                                           num_classes=10, impl="reference"), 64),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("arch", list(HALF_MODELS))
def test_half_model_trains_like_torchvision(cuda, dtype, arch):
    """model.half()/.bfloat16() on CUDA: the fused path runs (no fallback warning), BN computes in
    float32 inside the kernels, and loss, every gradient and the running statistics are as close to
    the fp64 model as the same model's plain PyTorch (torchvision) path in that dtype is."""
    import warnings

    torch.manual_seed(0)
    build, size = HALF_MODELS[arch]
    tv = build().to(cuda)
    ours = copy.deepcopy(tv).set_impl("fused")
    ref = copy.deepcopy(tv).double()
    tv, ours = tv.to(dtype), ours.to(dtype)
    x = torch.randn(8, 3, size, size, device=cuda)
    target = torch.randint(0, 10, (8,), device=cuda)
    res = {}
    from densenet_fast._warn import forget
    forget("block:")  # so that a fallback to the reference path warns (again) here
    forget("transition:")
    for name, m, xx in (("tv", tv, x.to(dtype)), ("ours", ours, x.to(dtype)), ("64", ref, x.double())):
        with warnings.catch_warnings():
            if name == "ours":  # a fallback warning fails the test
                warnings.filterwarnings("error", message=r"densenet_fast\.")
            loss = F.cross_entropy(m(xx), target)
            loss.backward()
        res[name] = (loss.detach(), [p.grad for p in m.parameters()], [b for b in m.buffers() if b.is_floating_point()])
    for name in ("tv", "ours"):
        assert all(g.dtype == dtype for g in res[name][1])
    e = {n: (rel_l2_err(res[n][0], res["64"][0]), [rel_l2_err(a, b) for a, b in zip(res[n][1], res["64"][1])],
             [rel_l2_err(a, b) for a, b in zip(res[n][2], res["64"][2])]) for n in ("tv", "ours")}
    assert e["ours"][0] <= 2 * e["tv"][0] + 1e-2, e
    assert statistics.median(e["ours"][1]) <= 2 * statistics.median(e["tv"][1]) + 1e-2
    assert statistics.median(e["ours"][2]) <= 2 * statistics.median(e["tv"][2]) + 1e-2
    ours.eval(), tv.eval(), ref.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"densenet_fast\.")
        out = ours(x.to(dtype))
    with torch.no_grad():
        out_tv, out_64 = tv(x.to(dtype)), ref(x.double())
    assert out.dtype == dtype
    assert rel_l2_err(out, out_64) <= 2 * rel_l2_err(out_tv, out_64) + 1e-2


def test_features_end_to_end(cuda):
    """A small densenet_bc (blocks, transitions, final norm, all fused) matches torchvision-style
    reference math in fp32: forward and parameter gradients."""
    torch.manual_seed(0)
    model = dnf.densenet_bc(depth=40, growth_rate=12, num_classes=10).to(cuda)
    ref = copy.deepcopy(model).set_impl("reference")
    x = torch.randn(8, 3, 32, 32, device=cuda)
    out, ref_out = model(x), ref(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4 * q.grad.abs().max().item() + 1e-6,
                                   msg=name)


def test_compile_fullgraph(cuda):
    """torch.compile(fullgraph=True) traces the CUDA op through its fake kernel; same results as eager."""
    tv = tv_block(3, 16, 4, 8, cuda)
    ours = ours_like(tv, 3, 16, 4, 8)
    x = torch.randn(4, 16, 8, 8, device=cuda)

    def f(x, *params):
        return block_ops.fused_dense_block(x,
                                           block_ops.BlockParams(*[list(params[i * 3:(i + 1) * 3]) for i in range(10)]),
                                           training=False).buffer

    ours.eval()
    flat = [t for lst in ours.block_params() for t in lst]
    eager = f(x, *flat)
    compiled = torch.compile(f, fullgraph=True)(x, *flat)
    torch.testing.assert_close(compiled, eager)


# --- LeakyReLU / PReLU blocks (dense_block_act_forward / _backward) ----------------------------------------------

def test_act_kernels_registered():
    if not dnf.build_info()["cuda"]:
        pytest.skip("extension built without CUDA kernels")
    for op in ("dense_block_act_forward", "dense_block_act_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"densenet_fast::{op}", "CUDA"), op
    assert torch._C._dispatch_has_kernel_for_dispatch_key("densenet_fast::dense_block_act_forward", "AutocastCUDA")


def _monai_act(spatial_dims, act, dtype):
    from test_leaky_act import _monai
    return _monai(spatial_dims, act, dtype)


MONAI_ACTS = {"leakyrelu": ("leakyrelu", {"negative_slope": 0.1}), "prelu": "prelu"}


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("act", list(MONAI_ACTS))
def test_monai_act_fp64_parity_on_cuda(cuda, spatial_dims, act):
    """A converted MONAI DenseNet121 with act=leakyrelu / prelu on CUDA, fp64: its blocks run the CUDA act operators
    (no fallback warning), and outputs, every gradient (PReLU weights included) and the running statistics match the
    unconverted MONAI model over two SGD steps to 1e-9."""
    import warnings

    from convert_utils import assert_state_close
    from test_monai_xrv import SHAPES, _inputs, _train_steps

    from densenet_fast._warn import forget

    model = _monai_act(spatial_dims, MONAI_ACTS[act], torch.float64).to(cuda)
    ref = copy.deepcopy(model)
    dnf.convert(model, warn=False)
    forget("block:")
    inputs = [x.to(cuda) for x in _inputs(SHAPES[spatial_dims])]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"densenet_fast\.DenseBlock")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _train_steps([model, ref], inputs, 1e-9)
    ran = {e.name for e in prof.events()}
    assert {"densenet_fast::dense_block_act_forward", "densenet_fast::dense_block_act_backward"} <= ran
    assert_state_close(model, ref, 1e-9)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_act_ops_match_cpu_fp32(cuda, training, spatial_dims):
    """The CUDA act operators against the CPU ones (the specification) in fp32, per-channel slopes of both signs:
    buffer, statistics and every gradient, the slopes' included."""
    from test_cuda_emulation import ACT_GEOMS, act_operands, monai_act_block, run_act

    shape = ACT_GEOMS[spatial_dims]
    block = monai_act_block(spatial_dims, "prelu_c", shape[1], seed=4).train(training)
    P, slopes = act_operands(block, training)
    P = {n: [t.float() for t in lst] for n, lst in P.items()}
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    grad = torch.randn(x.shape[0], shape[1] + 9, *shape[2:], generator=torch.Generator().manual_seed(6))
    spec = run_act(OPS, x, P, slopes.float(), training, grad)
    to = lambda t: t.to(cuda)  # noqa: E731
    got = run_act(OPS, to(x), {n: [to(t) for t in lst] for n, lst in P.items()}, to(slopes.float()), training,
                  to(grad))
    for a, b in zip(got[0], spec[0]):
        assert a.shape == b.shape and a.dtype == b.dtype
        if b.numel():
            assert rel_l2_err(a.cpu(), b) <= 1e-5
    flat = lambda r: [r[0]] + [t for lst in r[1:7] for t in lst] + [r[7]]  # noqa: E731
    for a, b in zip(flat(got[1]), flat(spec[1])):
        assert rel_l2_err(a.cpu(), b) <= 1e-4


def _seeded_inputs(batch: int, device) -> list:
    """Three seeded (input [batch, 2, 29, 35], output gradient [batch, 3]) pairs on ``device``."""
    return [(torch.randn(batch, 2, 29, 35, generator=torch.Generator().manual_seed(2 + seed)).to(device),
             torch.randn(batch, 3, generator=torch.Generator().manual_seed(10 + seed)).to(device))
            for seed in range(3)]


@pytest.mark.parametrize("act", list(MONAI_ACTS))
def test_monai_act_autocast_bf16_vs_fp64_truth(cuda, act):
    """Under CUDA bf16 autocast: output and every gradient no worse than 1.5x MONAI's own bf16 error against the
    fp64 truth, summed over three seeds (a pre-activation next to 0 whose sign bf16 flips makes one seed a lottery
    for either side, tests/test_leaky_act.py)."""
    base = _monai_act(2, MONAI_ACTS[act], torch.float32).to(cuda).train()
    ours = dnf.convert(copy.deepcopy(base), warn=False)
    assert_bf16_autocast_no_worse(ours, base, copy.deepcopy(base).double(), _seeded_inputs(4, cuda))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_opcheck_act_block(cuda, training):
    from test_cuda_emulation import ACT_GEOMS, act_operands, monai_act_block

    block = monai_act_block(2, "prelu_c", ACT_GEOMS[2][1], seed=4).train(training)
    P, slopes = act_operands(block, training)
    P = {n: [t.float().to(cuda) for t in lst] for n, lst in P.items()}
    running = [P[n] for n in ("rm1", "rv1", "rm2", "rv2")] if not training else [[], [], [], []]
    x = torch.randn(ACT_GEOMS[2], device=cuda)
    args = (x, *[P[n] for n in ("g1", "b1", "w1", "g2", "b2", "w2")], *running, None, 0.0, training, 1e-5,
            slopes.float().to(cuda))
    torch.library.opcheck(OPS.dense_block_act_forward, args)


# --- InstanceNorm blocks (dense_block_in_forward / _backward) ------------------------------------------------------

def test_in_kernels_registered():
    if not dnf.build_info()["cuda"]:
        pytest.skip("extension built without CUDA kernels")
    for op in ("dense_block_in_forward", "dense_block_in_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"densenet_fast::{op}", "CUDA"), op
    assert torch._C._dispatch_has_kernel_for_dispatch_key("densenet_fast::dense_block_in_forward", "AutocastCUDA")


MONAI_IN = {"instance": ("instance", "relu"), "instance_affine": (("instance", {"affine": True}), "relu"),
            "instance_leaky": (("instance", {"affine": True}), ("leakyrelu", {"negative_slope": 0.1}))}


def _monai_in(spatial_dims, kind, dtype):
    from test_instance_norm import _monai
    norm, act = MONAI_IN[kind]
    return _monai(spatial_dims, norm, dtype, act=act)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("kind", list(MONAI_IN))
def test_monai_instance_fp64_parity_on_cuda(cuda, kind, spatial_dims, batch):
    """A converted MONAI DenseNet with norm="instance" (affine or not, ReLU or LeakyReLU) on CUDA, fp64: its blocks
    run the CUDA InstanceNorm operators (no fallback warning), and outputs and every gradient match the unconverted
    MONAI model over two SGD steps to 1e-9."""
    import warnings

    from convert_utils import assert_state_close
    from test_monai_xrv import SHAPES, _inputs, _train_steps

    from densenet_fast._warn import forget

    model = _monai_in(spatial_dims, kind, torch.float64).to(cuda)
    ref = copy.deepcopy(model)
    dnf.convert(model, warn=False)
    forget("block:")
    inputs = [x.to(cuda) for x in _inputs((batch,) + SHAPES[spatial_dims][1:])]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"densenet_fast\.(Concat)?DenseBlock")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _train_steps([model, ref], inputs, 1e-9)
    ran = {e.name for e in prof.events()}
    assert {"densenet_fast::dense_block_in_forward", "densenet_fast::dense_block_in_backward"} <= ran
    assert_state_close(model, ref, 1e-9)


@pytest.mark.parametrize("slopes_on", [False, True], ids=["relu", "prelu"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_in_ops_match_cpu_fp32(cuda, spatial_dims, slopes_on):
    """The CUDA InstanceNorm operators against the CPU ones (the specification) in fp32: buffer, per-sample
    statistics and every gradient (the slopes' included)."""
    from test_cuda_emulation import IN_GEOMS, in_operands, monai_in_block, run_in

    C0, *spatial = IN_GEOMS[spatial_dims]
    P, _ = in_operands(monai_in_block(spatial_dims, "instance_affine", "relu", C0, seed=4))
    P = {n: [t.float() for t in lst] for n, lst in P.items()}
    slopes = None
    if slopes_on:
        n = sum(t.numel() for t in P["g1"] + P["g2"])
        slopes = torch.rand(n, generator=torch.Generator().manual_seed(7)) * 0.7 - 0.2
    x = torch.randn(3, C0, *spatial, generator=torch.Generator().manual_seed(5))
    grad = torch.randn(3, C0 + 9, *spatial, generator=torch.Generator().manual_seed(6))
    spec = run_in(OPS, x, P, slopes, grad)
    to = lambda t: None if t is None else t.to(cuda)  # noqa: E731
    got = run_in(OPS, to(x), {n: [to(t) for t in lst] for n, lst in P.items()}, to(slopes), to(grad))
    for a, b in zip(got[0], spec[0]):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_l2_err(a.cpu(), b) <= 1e-5
    flat = lambda r: [r[0]] + [t for lst in r[1:7] for t in lst] + [r[7]]  # noqa: E731
    for a, b in zip(flat(got[1]), flat(spec[1])):
        assert a.shape == b.shape
        if b.numel():
            assert rel_l2_err(a.cpu(), b) <= 1e-4


@pytest.mark.parametrize("kind", ["instance", "instance_leaky"])
def test_monai_instance_autocast_bf16_vs_fp64_truth_on_cuda(cuda, kind):
    """Under CUDA bf16 autocast: output and every parameter gradient no worse than 1.5x MONAI's own bf16 error
    against the fp64 truth, summed over three seeds."""
    base = _monai_in(2, kind, torch.float32).to(cuda).train()
    ours = dnf.convert(copy.deepcopy(base), warn=False)
    assert_bf16_autocast_no_worse(ours, base, copy.deepcopy(base).double(), _seeded_inputs(3, cuda))


def test_opcheck_in_block(cuda):
    from test_cuda_emulation import IN_GEOMS, in_operands, monai_in_block

    C0, *spatial = IN_GEOMS[2]
    P, slopes = in_operands(monai_in_block(2, "instance_affine", "leaky", C0, seed=4))
    P = {n: [t.float().to(cuda) for t in lst] for n, lst in P.items()}
    x = torch.randn(3, C0, *spatial, device=cuda)
    args = (x, *[P[n] for n in ("g1", "b1", "w1", "g2", "b2", "w2")], 1e-5, slopes.float().to(cuda))
    torch.library.opcheck(OPS.dense_block_in_forward, args)
