"""Our float32 3x3 (3x3x3) convolution of the dense layer (csrc/cpu/conv3x3_f32.h, issue 32): its three passes
against torch's convolution in the fp64 truth, bitwise the same on any thread count, the dense block and whole
models on it (forced, against torchvision / MONAI), and its per-shape choice and switch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_l2_err, tv_block_pair

import densenet_fast as dnf
from densenet_fast.ops import fused_dense_block

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OWN = torch.ops.densenet_fast.own_conv3x3
pytestmark = pytest.mark.skipif(dnf.build_info()["cpu_engine"]["kernels_isa"] != "avx512",
                                reason="our 3x3 kernel is the AVX-512 build's")

# (batch, input channels, output channels, spatial): densenet121's layer, tile splits of every kind (W = 1, 7,
# 15, 29: partial 14-pixel tiles; 56: four full ones), odd channel counts (input channels not a multiple of the
# 14-channel weight-gradient tiles, outputs past one 32-wide panel), 3-D volumes of depth 1 and 2.
SHAPES = [
    (2, 128, 32, (28, 28)),
    (1, 64, 32, (56, 56)),
    (3, 13, 5, (7, 9)),
    (1, 37, 45, (1, 1)),
    (2, 17, 33, (15, 29)),
    (1, 192, 48, (7, 7)),
    (2, 20, 33, (5, 6, 7)),
    (2, 17, 3, (2, 1, 3)),
    (1, 32, 32, (1, 4, 15)),
]


def _inputs(n, cin, cout, sp, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *sp, generator=g, dtype=dtype).relu()  # V = relu(bn2(Y)): non-negative
    w = torch.randn(cout, cin, *([3] * len(sp)), generator=g, dtype=dtype) / (cin * 9) ** 0.5
    d = torch.randn(n, cout, *sp, generator=g, dtype=dtype)
    return x, w, d


def _torch_passes(x, w, d):
    conv = F.conv2d if x.dim() == 4 else F.conv3d
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = conv(xr, wr, padding=1)
    out.backward(d)
    return out.detach(), xr.grad, wr.grad


def _own_passes(x, w, d):
    return OWN(x, w, 0), OWN(d, w, 1), OWN(d, x, 2)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_passes_against_fp64_truth(shape):
    """Forward, input gradient and weight gradient in float32, each within 2x torch's own float32 error of the fp64
    result (and at float32 roundoff: a wrong tap or channel gives O(1) errors)."""
    x, w, d = _inputs(*shape)
    truth = _torch_passes(x, w, d)
    ref = _torch_passes(x.float(), w.float(), d.float())
    ours = _own_passes(x.float(), w.float(), d.float())
    for name, o, r, t in zip(("forward", "input_grad", "weight_grad"), ours, ref, truth):
        assert o.shape == t.shape and o.dtype == torch.float32, name
        err, ref_err = rel_l2_err(o, t), rel_l2_err(r, t)
        assert err <= max(2 * ref_err, 1e-6), f"{name}: {err:.3g} vs torch's {ref_err:.3g}"


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4], SHAPES[6]], ids=str)
def test_passes_bitwise_across_thread_counts(shape):
    """1, 2 and 3 threads give the same bits: every output is summed by one thread in one order (pixel tiles of the
    forward and input gradient; (tap, channels) items of the weight gradient, in chunks of lines in order)."""
    x, w, d = (t.float() for t in _inputs(*shape, seed=3))
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(_own_passes(x, w, d))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_bad_inputs_named():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(3, 4, 3, 3)
    with pytest.raises(RuntimeError, match="expected float32"):
        OWN(x.double(), w.double(), 0)
    with pytest.raises(RuntimeError, match="pass_: expected 0, 1 or 2, got 7"):
        OWN(x, w, 7)
    with pytest.raises(RuntimeError, match="a: expected 4 channels, got 3"):
        OWN(torch.randn(1, 3, 5, 5), w, 0)
    with pytest.raises(RuntimeError, match="expected a 3x3 kernel"):
        OWN(x, torch.randn(3, 4, 5, 5), 0)


def _block_truth_and_runs(drop, spatial=(9, 11), switch="DNF_CPU_CONV3X3", engines=("own", "onednn")):
    """A fused fp32 block (3 layers, odd sizes) run with each value of `switch`, and torchvision's block in fp64 and
    fp32 with the same weights (and, with dropout, the same mask): (truth, torchvision fp32, {value: result})."""
    torch.manual_seed(1)
    ref, ours = tv_block_pair(3, 10, 3, 7, torch.float64, drop_rate=0.3 if drop else 0.0)
    x = torch.randn(2, 10, *spatial, dtype=torch.float64)
    g = torch.randn(2, 31, *spatial, dtype=torch.float64)
    mask = (torch.rand(2, 21, *spatial) > 0.3) if drop else None
    results = {}

    def run_ref(dtype):
        m = ref.to(dtype)
        calls = iter(range(3))
        orig = F.dropout

        def fixed(t, p, training, inplace=False):
            i = next(calls)
            return t * mask[:, 7 * i:7 * i + 7].to(t.dtype) / (1 - p)

        F.dropout = fixed if drop else orig
        try:
            xx = x.to(dtype).clone().requires_grad_(True)
            y = m(xx)
            y.backward(g.to(dtype))
        finally:
            F.dropout = orig
        return [y.detach(), xx.grad] + [p.grad.clone() for p in m.parameters()]

    truth = run_ref(torch.float64)
    for p in ref.parameters():
        p.grad = None
    ref32 = run_ref(torch.float32)
    ours = ours.float()
    for engine in engines:
        os.environ[switch] = engine
        try:
            for p in ours.parameters():
                p.grad = None
            xx = x.float().clone().requires_grad_(True)
            out = fused_dense_block(xx, ours.block_params(), training=True, drop_rate=0.3 if drop else 0.0,
                                    dropout_mask=mask)
            out.buffer.backward(g.float())
            results[engine] = [out.buffer.detach(), xx.grad] + [p.grad.clone() for p in ours.parameters()]
        finally:
            del os.environ[switch]
    return truth, ref32, results


@pytest.mark.parametrize("drop", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("switch,values",
                         [("DNF_CPU_CONV3X3", ("own", "onednn")), ("DNF_CPU_F32_BACKWARD", ("1", "0"))],
                         ids=["conv3x3", "f32-backward"])
@pytest.mark.parametrize("spatial", [(9, 11), (14, 3)], ids=str)
def test_block_on_each_engine_against_torchvision(drop, switch, values, spatial):
    """The fp32 block with its 3x3 passes forced onto our kernel and onto oneDNN, and its 1x1 backward products on
    our kernel (cpu/f32_gemm.h) and on the GEMM engine: output, input gradient and every parameter gradient within
    2x torchvision's fp32 error of the fp64 truth (with dropout: torchvision given the same mask). (3-D blocks and
    whole 2-D / 3-D models on our 3x3 kernel: tests/test_cpu_feature_paths.py, config "own-3x3".)"""
    truth, ref32, results = _block_truth_and_runs(drop, spatial, switch, values)
    for engine, res in results.items():
        for i, (o, r, t) in enumerate(zip(res, ref32, truth)):
            err, ref_err = rel_l2_err(o, t), rel_l2_err(r, t)
            assert err <= max(2 * ref_err, 1e-6), f"{engine} tensor {i}: {err:.3g} vs torchvision's {ref_err:.3g}"


def test_block_runs_the_forced_engine():
    """The switch decides which code runs: our kernel's profiler ranges appear only under DNF_CPU_CONV3X3=own."""
    _, ours = tv_block_pair(2, 6, 2, 5, torch.float32)
    x = torch.randn(2, 6, 8, 8)
    seen = {}
    for engine in ("own", "onednn"):
        os.environ["DNF_CPU_CONV3X3"] = engine
        try:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                ours(x).sum().backward()
        finally:
            del os.environ["DNF_CPU_CONV3X3"]
        seen[engine] = {e.key for e in prof.key_averages()}
    own_ranges = {"dnf_cpu::conv3x3", "dnf_cpu::conv3x3_input_grad", "dnf_cpu::conv3x3_weight_grad"}
    assert own_ranges <= seen["own"]
    assert not own_ranges & seen["onednn"]


def test_choice_reported_per_shape():
    """Unforced, each shape is measured once, on first use, and build_info() reports each pass's engine and both
    times; forced, build_info() says so."""
    code = ("import json, torch, densenet_fast as d\n"
            "m = d.DenseBlock(2, 8, 2, 6)\n"
            "m(torch.randn(2, 8, 9, 13)).sum().backward()\n"
            "print(json.dumps(d.build_info()['cpu_engine']['conv3x3']))")
    env = {k: v for k, v in os.environ.items() if k != "DNF_CPU_CONV3X3"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["how"].startswith("measured per shape")
    assert rep["how"].endswith("rule: 3-D input gradients on oneDNN")
    passes = rep["shapes"]["2d 9x13 12->6"]
    for name in ("forward", "input_grad", "weight_grad"):
        engine, onednn_us, own_us = passes[name]
        assert engine in ("own", "onednn") and onednn_us > 0 and own_us > 0
        if abs(own_us - 1.1 * onednn_us) > 2:  # (times in whole microseconds)
            assert (engine == "own") == (own_us <= 1.1 * onednn_us)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, DNF_CPU_CONV3X3="onednn"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    bf16_forward = rep.pop("bfloat16")
    assert rep == {"how": "onednn: forced by DNF_CPU_CONV3X3", "shapes": {}}
    assert bf16_forward.startswith("onednn: ")


def test_deterministic_algorithms_take_our_kernel_untimed():
    """A timed choice may differ between two processes, and with it a float32 result's last bits; under
    torch.use_deterministic_algorithms(True) every shape runs on our kernel without timing, so two processes give
    the same bits."""
    code = ("import hashlib, json, torch, densenet_fast as d\n"
            "torch.use_deterministic_algorithms(True)\n"
            "torch.manual_seed(0)\n"
            "m = d.DenseBlock(3, 8, 2, 6)\n"
            "x = torch.randn(2, 8, 9, 13)\n"
            "m(x).sum().backward()\n"
            "h = hashlib.sha256(b''.join(p.grad.numpy().tobytes() for p in m.parameters())).hexdigest()\n"
            "print(json.dumps({'conv3x3': d.build_info()['cpu_engine']['conv3x3'], 'grads': h}))")
    env = {k: v for k, v in os.environ.items() if k != "DNF_CPU_CONV3X3"}
    outs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    outs[0]["conv3x3"].pop("bfloat16")
    assert outs[0]["conv3x3"] == {"how": "own: rule under torch.use_deterministic_algorithms(True) (no timed choice; "
                                         "3-D input gradients on oneDNN)", "shapes": {}}
    assert outs[0]["grads"] == outs[1]["grads"]


@pytest.mark.parametrize("spatial", [(70, 30), (20, 10, 10)], ids=["2d", "3d"])
def test_forward_windows_of_lines(spatial):
    """The forward computes V per window of about 2 MiB of lines (with the halo of lines the taps read: one row in
    2-D, a depth slice in 3-D) instead of whole: on frames of several windows (a 128-channel bottleneck, 140 and 400
    lines) the block on our kernel, forward and backward, is as close to the fp64 result as the block on oneDNN."""
    torch.manual_seed(2)
    block = dnf.DenseBlock(2, 16, 4, 32, spatial_dims=len(spatial)).train()
    x = torch.randn(2, 16, *spatial, dtype=torch.float64)
    g = torch.randn(2, 80, *spatial, dtype=torch.float64)

    def run(dtype, engine):
        m = block.to(dtype)
        for p in m.parameters():
            p.grad = None
        os.environ["DNF_CPU_CONV3X3"] = engine
        try:
            xx = x.to(dtype).clone().requires_grad_(True)
            y = m(xx)
            y.backward(g.to(dtype))
        finally:
            del os.environ["DNF_CPU_CONV3X3"]
        return [y.detach(), xx.grad] + [p.grad.clone() for p in m.parameters()]

    truth = run(torch.float64, "onednn")
    own, onednn = run(torch.float32, "own"), run(torch.float32, "onednn")
    for i, (o, r, t) in enumerate(zip(own, onednn, truth)):
        err, ref_err = rel_l2_err(o, t), rel_l2_err(r, t)
        assert err <= max(2 * ref_err, 1e-6), f"tensor {i}: {err:.3g} vs oneDNN's {ref_err:.3g}"
