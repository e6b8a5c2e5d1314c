"""Our bfloat16 3x3 (3x3x3) convolution on AMX (csrc/cpu/conv3x3_bf16.h, issue 32), the forward and the input
gradient: against the fp64 convolution of the same bfloat16 values and against torch's own bfloat16 convolution,
bitwise the same on any thread count, bad inputs named, and the bfloat16 dense block on it (the default where it
fits) against oneDNN and the fp64 truth."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_l2_err, tv_block_pair

import densenet_fast as dnf

OWN = torch.ops.densenet_fast.own_conv3x3
pytestmark = pytest.mark.skipif(not dnf.build_info()["cpu_engine"].get("amx_kernel", False),
                                reason="our bfloat16 3x3 kernel needs AMX")

# (batch, input channels, output channels, spatial): densenet121's layer at two sizes, a single pixel, widths that
# leave the last 32-row block part padding (7, 15, 29), two 32-channel output pairs, 3-D volumes of depth 1 and 2
# and several samples per frame.
SHAPES = [
    (2, 128, 32, (28, 28)),
    (1, 128, 32, (56, 56)),
    (1, 32, 32, (1, 1)),
    (3, 64, 32, (7, 9)),
    (2, 32, 64, (15, 29)),
    (2, 32, 32, (5, 6, 7)),
    (2, 64, 32, (1, 4, 15)),
    (1, 32, 96, (2, 1, 3)),
]


def _inputs(n, cin, cout, sp, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *sp, generator=g).relu().bfloat16()  # V = relu(bn2(Y)), as the block stores it
    w = torch.randn(cout, cin, *([3] * len(sp)), generator=g) / (cin * 9) ** 0.5  # the float32 master
    return x, w


def _conv(x, w):
    return (F.conv2d if x.dim() == 4 else F.conv3d)(x, w, padding=1)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_input_grad_against_fp64_truth(shape):
    """The input gradient (the transposed convolution of a bfloat16 output gradient through the rounded weight) within
    1.5x the error of torch's bfloat16 input gradient (oneDNN) and within one bfloat16 rounding of every value."""
    n, cin, cout, sp = shape
    _, w = _inputs(*shape)
    d = torch.randn(n, cout, *sp, generator=torch.Generator().manual_seed(1)).bfloat16()
    wb = w.bfloat16()
    tconv = F.conv_transpose2d if len(sp) == 2 else F.conv_transpose3d
    truth = tconv(d.double(), wb.double(), padding=1)
    ours = OWN(d, w, 1)
    ref = tconv(d, wb, padding=1)
    assert ours.dtype == torch.bfloat16 and ours.shape == truth.shape
    err, ref_err = rel_l2_err(ours, truth), rel_l2_err(ref, truth)
    assert err <= max(1.5 * ref_err, 1e-4), f"{err:.3g} vs torch's {ref_err:.3g}"
    bound = 2.0 ** -8 * truth.abs() + 1e-5 * truth.abs().max()
    assert bool(((ours.double() - truth).abs() <= bound).all())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_against_fp64_truth(shape):
    """Each output is the fp64 convolution of the same bfloat16 values rounded once to bfloat16 (up to the float32
    sum's roofoff): within 1.5x the error of torch's bfloat16 convolution (oneDNN) and within one bfloat16 rounding
    of every value; a wrong tap or channel gives O(1) errors."""
    x, w = _inputs(*shape)
    wb = w.bfloat16()
    truth = _conv(x.double(), wb.double())
    ours = OWN(x, w, 0)
    ref = _conv(x, wb)
    assert ours.dtype == torch.bfloat16 and ours.shape == truth.shape
    err, ref_err = rel_l2_err(ours, truth), rel_l2_err(ref, truth)
    assert err <= max(1.5 * ref_err, 1e-4), f"{err:.3g} vs torch's {ref_err:.3g}"
    bound = 2.0 ** -8 * truth.abs() + 1e-5 * truth.abs().max()
    assert bool(((ours.double() - truth).abs() <= bound).all())


@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4], SHAPES[5]], ids=str)
def test_forward_bitwise_across_thread_counts(shape):
    """1, 2 and 3 threads give the same bits: each 32-row block of outputs is summed by one thread in one order."""
    x, w = _inputs(*shape, seed=3)
    before = torch.get_num_threads()
    outs = []
    try:
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(OWN(x, w, 0))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_bad_inputs_named():
    x, w = _inputs(1, 32, 32, (5, 5))
    with pytest.raises(RuntimeError, match="multiples of 32, got 48 and 32"):
        OWN(torch.zeros(1, 48, 5, 5, dtype=torch.bfloat16), torch.zeros(32, 48, 3, 3), 0)
    with pytest.raises(RuntimeError, match="multiples of 32, got 32 and 16"):
        OWN(x, w[:16], 0)
    with pytest.raises(RuntimeError, match="pass_ 0 or 1"):
        OWN(x, w, 2)
    with pytest.raises(RuntimeError, match="float32 master weight"):
        OWN(x, w.bfloat16(), 0)
    with pytest.raises(RuntimeError, match="3x3 kernel"):
        OWN(x, torch.zeros(32, 32, 3, 5), 0)


def _block_run(block, x, g, engine):
    for p in block.parameters():
        p.grad = None
    os.environ["DNF_CPU_CONV3X3"] = engine
    try:
        xx = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = block(xx)
        y.float().backward(g)
    finally:
        del os.environ["DNF_CPU_CONV3X3"]
    return [y.detach().float(), xx.grad.float()] + [p.grad.clone().float() for p in block.parameters()]


def _three(res):
    """Output, input gradient, and every parameter gradient as one vector (the bfloat16 tests' global metric:
    single small parameter gradients of a bfloat16 step are noise-dominated, tests/test_bf16.py)."""
    return [res[0].double(), res[1].double(), torch.cat([t.double().flatten() for t in res[2:]])]


@pytest.mark.parametrize("spatial", [(15, 13), (28, 9)], ids=str)
def test_block_under_autocast_against_torchvision(spatial):
    """The bfloat16 block (CPU autocast, a 128-channel bottleneck and k = 32: our kernel's shape) with its 3x3 forward
    on our kernel and forced onto oneDNN: output, input gradient and the parameter gradients within 1.5x
    torchvision's autocast error of the fp64 truth (~600-800 rows: on fewer, single seeds of either side's bfloat16
    BN backward vary by 2x)."""
    torch.manual_seed(0)
    ref, ours = tv_block_pair(3, 32, 4, 32, torch.float32)
    x = torch.randn(3, 32, *spatial)
    g = torch.randn(3, 32 + 3 * 32, *spatial)

    def tv_run(block, dtype, autocast):
        for p in block.parameters():
            p.grad = None
        torch.manual_seed(7)
        xx = x.to(dtype).clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = block(xx)
        y.to(dtype).backward(g.to(dtype))
        return [y.detach().double(), xx.grad.double()] + [p.grad.clone().double() for p in block.parameters()]

    truth = _three(tv_run(ref.to(torch.float64), torch.float64, False))
    tv_bf16 = _three(tv_run(ref.to(torch.float32), torch.float32, True))
    for engine in ("own", "onednn"):
        torch.manual_seed(7)
        res = _three(_block_run(ours, x, g, engine))
        for what, o, r, t in zip(("output", "input grad", "parameter grads"), res, tv_bf16, truth):
            err, ref_err = rel_l2_err(o, t), rel_l2_err(r, t)
            assert err <= 1.5 * ref_err + 1e-6, f"{engine} {what}: {err:.3g} vs torchvision's {ref_err:.3g}"


@pytest.mark.parametrize("drop", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("spatial", [(70, 30), (20, 10, 10), (3, 4)], ids=["2d-windows", "3d-windows", "small"])
def test_block_own_and_onednn_agree(spatial, drop):
    """A bfloat16 block on our kernel and on oneDNN, 2-D and 3-D, with frames of one to several samples (~2 MiB
    windows): output, input gradient and parameter gradients within 1.5x oneDNN's error of the fp64 result; with
    dropout (the same mask on both), outputs within bfloat16 roundoff of each other."""
    torch.manual_seed(2)
    block = dnf.DenseBlock(2, 32, 4, 32, drop_rate=0.3 if drop else 0.0, spatial_dims=len(spatial)).train()
    x = torch.randn(3, 32, *spatial)
    g = torch.randn(3, 96, *spatial)
    torch.manual_seed(5)
    own = _three(_block_run(block, x, g, "own"))
    torch.manual_seed(5)
    onednn = _three(_block_run(block, x, g, "onednn"))
    if drop:
        assert rel_l2_err(own[0], onednn[0]) <= 1e-2
        return
    for p in block.parameters():
        p.grad = None
    xx = x.double().clone().requires_grad_(True)
    y = block.double()(xx)
    y.backward(g.double())
    truth = _three([y.detach(), xx.grad] + [p.grad.clone() for p in block.parameters()])
    block.float()
    for what, a, b, t in zip(("output", "input grad", "parameter grads"), own, onednn, truth):
        ea, eb = rel_l2_err(a, t), rel_l2_err(b, t)
        assert ea <= 1.5 * eb + 1e-6, f"{what}: own {ea:.3g} vs oneDNN {eb:.3g}"


def test_switch_decides_the_engine():
    """Under autocast the block's forward convolution and its input gradient run on our kernel (no aten convolution
    in the forward; our profiler ranges) where they compute in bfloat16, unless DNF_CPU_CONV3X3=onednn."""
    block = dnf.DenseBlock(2, 32, 4, 32).train()
    x = torch.randn(2, 32, 8, 8, requires_grad=True)
    seen = {}
    for engine in ("own", "onednn"):
        os.environ["DNF_CPU_CONV3X3"] = engine
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    y = block(x)
                forward = {e.key for e in prof.key_averages()}
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                y.float().sum().backward()
            backward = {e.key for e in prof.key_averages()}
        finally:
            del os.environ["DNF_CPU_CONV3X3"]
        seen[engine] = (forward, backward)
    # (a pass that computes in float32, as measured once per process on a busy host, stays on oneDNN: design.md §16)
    compute = dnf.build_info()["cpu_engine"]["bf16_conv"]["2d"]
    if compute["forward"] == "bfloat16":
        assert "dnf_cpu::conv3x3" in seen["own"][0] and "aten::convolution" not in seen["own"][0]
    if compute["input_grad"] == "bfloat16":
        assert "dnf_cpu::conv3x3_input_grad" in seen["own"][1]
    assert "aten::convolution" in seen["onednn"][0] and "dnf_cpu::conv3x3" not in seen["onednn"][0]
    assert "dnf_cpu::conv3x3_input_grad" not in seen["onednn"][1]


def test_3d_input_gradient_rule():
    """A 3-D block's input gradient stays on oneDNN unless DNF_CPU_CONV3X3=own (design.md §16: its peak memory); its
    forward runs on our kernel either way."""
    if dnf.build_info()["cpu_engine"]["bf16_conv"]["3d"]["input_grad"] != "bfloat16":
        pytest.skip("this process measured the 3-D input gradient faster in float32 (oneDNN runs it then)")
    block = dnf.DenseBlock(2, 32, 4, 32, spatial_dims=3).train()
    x = torch.randn(2, 32, 4, 5, 6, requires_grad=True)
    seen = {}
    for engine in ("", "own"):
        os.environ["DNF_CPU_CONV3X3"] = engine
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = block(x)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                y.float().sum().backward()
        finally:
            del os.environ["DNF_CPU_CONV3X3"]
        seen[engine] = {e.key for e in prof.key_averages()}
    assert "dnf_cpu::conv3x3_input_grad" not in seen[""]
    assert "dnf_cpu::conv3x3_input_grad" in seen["own"]


def test_reported():
    """build_info() says where the bfloat16 forward runs, and that the switch turns it off."""
    import json
    import subprocess
    import sys
    code = "import json, densenet_fast as d; print(json.dumps(d.build_info()['cpu_engine']['conv3x3']))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "DNF_CPU_CONV3X3"}
    for forced, expected in ((None, "own: where input and output channels are multiples of 32, else onednn; rule: 3-D "
                                    "input gradients on oneDNN"),
                             ("onednn", "onednn: forced by DNF_CPU_CONV3X3")):
        e = dict(env, DNF_CPU_CONV3X3=forced) if forced else env
        r = subprocess.run([sys.executable, "-c", code], cwd=root, env=e, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert json.loads(r.stdout.strip().splitlines()[-1])["bfloat16"].startswith(expected)



def test_times_op_for_the_benchmark():
    """own_conv3x3_bf16_times (benchmarks/bench_conv3x3.py): four positive times; bad dtypes and channels named."""
    x, w = _inputs(2, 64, 32, (6, 5))
    d = torch.randn(2, 32, 6, 5).bfloat16()
    secs = torch.ops.densenet_fast.own_conv3x3_bf16_times(x, d, w, 2)
    assert len(secs) == 4 and all(0 < s < 10 for s in secs)
    with pytest.raises(RuntimeError, match="bfloat16 x and dout and a float32 w"):
        torch.ops.densenet_fast.own_conv3x3_bf16_times(x.float(), d, w, 2)
    with pytest.raises(RuntimeError, match="multiples of 32, got 64, 16"):
        torch.ops.densenet_fast.own_conv3x3_bf16_times(x, d[:, :16], w[:16], 2)
