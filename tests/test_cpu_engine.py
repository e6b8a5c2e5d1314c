"""Issue 12: the CPU GEMM engines. Each engine (forced by DNF_CPU_GEMM, in a fresh process: the choice is
made once per process) against torchvision's _DenseBlock and _Transition on odd shapes that are not
multiples of any ISA blocking (C0 = 13, growth 5, bn_size 3, odd H x W), NCHW and channels_last:
fp64 to ~1e-10, fp32 and bf16 autocast against the fp64 truth relative to torchvision's own error."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import rel_err, tv_block_pair
from torchvision.models import densenet as tv

import densenet_fast as dnf
from densenet_fast._switches import SWITCHES

L, C0, BN_SIZE, K = 3, 13, 3, 5
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pair(dtype, train):
    return tv_block_pair(L, C0, BN_SIZE, K, dtype, train)


def _step(block, x, g, autocast=False):
    x = x.detach().clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = block(x)
    y.backward(g.to(y.dtype))
    grads = torch.cat([p.grad.double().flatten() for _, p in sorted(block.named_parameters())])
    return y, x.grad, grads


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("H,W", [(5, 7), (11, 3)])
def test_engine_parity(train, layout, H, W):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(3, C0, H, W, dtype=torch.float64).contiguous(memory_format=fmt)
    g = torch.randn(3, C0 + L * K, H, W, dtype=torch.float64)
    # fp64: fused == torchvision to ~1e-10 (outputs, every gradient, running statistics).
    ref, ours = _pair(torch.float64, train)
    truth = _step(ref, x, g)
    got = _step(ours, x, g)
    for a, b, what in zip(got, truth, ("output", "input grad", "parameter grads")):
        assert rel_err(a, b) <= 1e-10, what
    rb = dict(ref.named_buffers())
    for n, b in ours.named_buffers():
        assert rel_err(b, rb[n]) <= 1e-10, n
    # fp32 against the fp64 truth: no worse than 2x torchvision's fp32 error.
    ref32, ours32 = _pair(torch.float32, train)
    ref32.load_state_dict(ref.state_dict()), ours32.load_state_dict(ref.state_dict())
    r32, o32 = _step(ref32, x.float(), g.float()), _step(ours32, x.float(), g.float())
    for o, r, t, what in zip(o32, r32, truth, ("output", "input grad", "parameter grads")):
        assert rel_err(o, t) <= 2 * rel_err(r, t) + 1e-7, what
    # bf16 autocast (bf16 block input, as the stem hands it over) against the fp64 truth of that input:
    # no worse than 1.5x torchvision's error under the same autocast (relative L2 error: on few rows the
    # max error of a bf16 BN backward is dominated by single elements).
    xb = torch.randn(8, C0, H + 4, W + 4).bfloat16().contiguous(memory_format=fmt)
    gb = torch.randn(8, C0 + L * K, H + 4, W + 4)
    tb = _step(ref, xb.double(), gb.double())
    rb16, ob16 = _step(ref32, xb, gb, True), _step(ours32, xb, gb, True)
    for o, r, t, what in zip(ob16, rb16, tb, ("output", "input grad", "parameter grads")):
        assert o.dtype == r.dtype, what
        assert _l2_err(o, t) <= 1.5 * _l2_err(r, t) + 1e-6, what


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("C0_", [13, 16])
@pytest.mark.parametrize("growth", [4, 8], ids=["inter16", "inter32"])
def test_packed_bf16_parity(layout, C0_, growth):
    """bf16 autocast on a block whose bottleneck width is a multiple of 16 (bn_size 4 x growth 4 = 16: cpublas
    brgemm) or of 32 (4 x 8: the AMX kernel), the shapes the brgemm engine packs (odd input widths exercise the
    k padding; 9 x 7 x 8 = 504 rows, not a multiple of 32), against torchvision's block under the same
    autocast, both against the fp64 truth."""
    ref, ours = tv_block_pair(3, C0_, 4, growth, torch.float32, True)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    xb = torch.randn(8, C0_, 9, 7).bfloat16().contiguous(memory_format=fmt)
    gb = torch.randn(8, C0_ + 3 * growth, 9, 7)
    truth = tv_block_pair(3, C0_, 4, growth, torch.float64, True)[0]
    truth.load_state_dict(ref.state_dict())
    tb = _step(truth, xb.double(), gb.double())
    rb16, ob16 = _step(ref, xb, gb, True), _step(ours, xb, gb, True)
    for o, r, t, what in zip(ob16, rb16, tb, ("output", "input grad", "parameter grads")):
        assert o.dtype == r.dtype, what
        assert _l2_err(o, t) <= 1.5 * _l2_err(r, t) + 1e-6, what


def _l2_err(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("train", [True, False])
def test_transition_engine_parity(train):
    ref = tv._Transition(C0, 6).double().train(train)
    ours = dnf.Transition(C0, 6).double().train(train)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, C0, 7, 9, dtype=torch.float64)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    ref(xr).backward(g)
    ours(xo).backward(g)
    assert rel_err(xo.grad, xr.grad) <= 1e-10
    assert rel_err(ours.conv.weight.grad, ref.conv.weight.grad) <= 1e-10


def test_build_info_reports_the_engine():
    info = dnf.build_info()["cpu_engine"]
    for dt in ("float32", "float64", "bfloat16"):
        assert info[dt]["engine"] in (("blas", "aten", "brgemm") if dt == "bfloat16" else ("blas", "aten")), info
        assert info[dt]["how"], info
    assert isinstance(info["amx_bf16"], bool) and info["isa"]
    f32 = info["f32_kernel"]
    assert isinstance(f32["on"], bool) and f32["how"], f32
    if f32["on"]:  # it runs only where it was measured faster (or forced)
        assert f32["how"].startswith("measured own=") or f32["how"] == "forced by DNF_CPU_F32_KERNEL", f32
    bf16_gemm = info["bf16_gemm"]
    assert bf16_gemm["compute"] in ("bfloat16", "float32"), bf16_gemm
    assert bf16_gemm["how"].startswith("measured bf16=") or bf16_gemm["how"] == "forced by DNF_CPU_BF16_GEMM"


def _run(env_value: str, *args: str, own_kernels: bool = True, **env_extra: str) -> subprocess.CompletedProcess:
    """A fresh process with DNF_CPU_GEMM=env_value and our own 1x1-stage kernels (AMX bf16, AVX-512 fp32) on
    where the CPU has them, or both off."""
    env = dict(os.environ, DNF_CPU_GEMM=env_value, DNF_CPU_AMX_KERNEL="1" if own_kernels else "0",
               DNF_CPU_F32_KERNEL="1" if own_kernels else "0")
    env.update(env_extra)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _has_amx() -> bool:
    return bool(dnf.build_info()["cpu_engine"]["amx_bf16"])


def _has_f32_kernel() -> bool:
    return "unavailable" not in dnf.build_info()["cpu_engine"]["f32_kernel"]["how"]


@pytest.mark.parametrize("engine", ["blas-without-own-kernels", "aten-without-own-kernels",
                                    "brgemm-without-own-kernels", "blas", "aten", "brgemm"])
def test_each_engine_forced(engine):
    """The parity tests above, in a process whose engine is forced (the fallback, the BLAS, and brgemm where the
    CPU packs for AMX: bfloat16 only, the other dtypes then run on the BLAS), with our own 1x1-stage kernels
    (the AMX kernel for bfloat16 on AMX CPUs, the AVX-512 kernel for float32 on AVX-512 CPUs, whatever the
    engine) and without them (DNF_CPU_AMX_KERNEL=0, DNF_CPU_F32_KERNEL=0: each engine's own tile loop runs that
    stage)."""
    own = not engine.endswith("-without-own-kernels")
    engine = engine.split("-")[0]
    if engine == "brgemm" and not _has_amx():
        pytest.skip("brgemm needs cpublas::could_pack(bfloat16) (AMX bf16 tiles); this CPU has none")
    r = _run(engine, "-m", "pytest", "tests/test_cpu_engine.py", "-q", "-x", "-p", "no:cacheprovider",
             "-k", "parity and 5-7 or transition or packed or conv1x1_stage", "-W", "ignore", own_kernels=own)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = _run(engine, "-c", "import densenet_fast as d; i = d.build_info()['cpu_engine']; "
             "print(i['float32']['engine'], i['bfloat16']['engine'], i['amx_kernel'], i['f32_kernel']['on'], "
             "i['float32']['how'])", own_kernels=own)
    assert r.returncode == 0, r.stderr[-2000:]
    f32 = "blas" if engine == "brgemm" else engine
    uses_amx_kernel = own and _has_amx() and dnf.build_info()["cpu_engine"]["bf16_rows"] == "avx512_bf16"
    uses_f32_kernel = own and _has_f32_kernel()
    assert r.stdout.split()[:4] == [f32, engine, str(uses_amx_kernel), str(uses_f32_kernel)]
    assert "forced by DNF_CPU_GEMM" in r.stdout


@pytest.mark.parametrize("own", [True, False], ids=["own-kernels", "without-own-kernels"])
@pytest.mark.parametrize("compute", ["bf16", "fp32"])
def test_bf16_gemm_compute_forced(compute, own):
    """DNF_CPU_BF16_GEMM forces the compute dtype of a bfloat16 block's 1x1 stage (build_info reports it), and the
    parity tests above pass either way: float32 on our AVX-512 kernel (bfloat16 rows widened in, rounded once out)
    or, with our own kernels off, on the float32 engine's tile loop; bfloat16 on the AMX kernel or the engine."""
    env = {"DNF_CPU_BF16_GEMM": compute}
    r = _run("auto", "-m", "pytest", "tests/test_cpu_engine.py", "-q", "-x", "-p", "no:cacheprovider",
             "-k", "parity and 5-7 or packed or conv1x1_stage", "-W", "ignore", own_kernels=own, **env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    code = "import json, densenet_fast as d; print(json.dumps(d.build_info()['cpu_engine']['bf16_gemm']))"
    r = _run("auto", "-c", code, own_kernels=own, **env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {
        "compute": "float32" if compute == "fp32" else "bfloat16", "how": "forced by DNF_CPU_BF16_GEMM"}


def test_brgemm_unavailable_is_a_clear_error():
    if _has_amx():
        pytest.skip("this CPU has AMX: brgemm is available")
    r = _run("brgemm", "-c", "import densenet_fast as d; d.build_info()")
    assert r.returncode != 0 and "DNF_CPU_GEMM: the 'brgemm' engine is not available for BFloat16" in r.stderr


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_bad_switch_value_is_a_clear_error(name):
    """Every switch (densenet_fast/_switches.py; the C++ reader csrc/cpu/switches.h) refuses a bad value at import
    with a message naming it, the values it accepts and the value it got."""
    r = subprocess.run([sys.executable, "-c", "import densenet_fast as d; d.build_info()"], cwd=ROOT,
                       env=dict(os.environ, **{name: "mkl-please"}), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert f"{name}: expected one of {', '.join(SWITCHES[name])} (or unset), got 'mkl-please'" in r.stderr


def test_empty_switches_read_as_unset():
    """An empty or blank switch is its default (issue 29: `DNF_CPU_ISA=` was refused): the same engine report as
    with the switches unset."""
    code = ("import json, densenet_fast as d; i = d.build_info()['cpu_engine']; "
            "print(json.dumps([i['kernels_isa'], i['bf16_rows'], i['amx_kernel'], i['float32']['engine'] != '']))")
    clean = {k: v for k, v in os.environ.items() if k not in SWITCHES}
    runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(clean, **extra), capture_output=True,
                           text=True, timeout=300) for extra in ({}, {n: "" for n in SWITCHES},
                                                                {n: " " for n in SWITCHES})]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    assert runs[0].stdout == runs[1].stdout == runs[2].stdout


def _run_isa(isa: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DNF_CPU_ISA=isa)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def _supported_isas() -> list[str]:
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    isas = ["base"]
    if all(f in flags for f in (" avx2", " fma", " bmi2", " f16c")):
        isas.append("avx2")
    if all(f in flags for f in (" avx512f", " avx512bw", " avx512vl", " avx512dq")):
        isas.append("avx512")
    return isas


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_each_isa_build(isa):
    """The engine parity tests (fp64, fp32 and bf16 against torchvision, odd shapes, both layouts) and the
    transition, and densenet121 against torchvision in fp64 over two SGD steps (every operator: stem, blocks,
    transitions, final norm), in a process whose element loops run the `isa` build (csrc/cpu/isa.h)."""
    if isa not in _supported_isas():
        pytest.skip(f"this CPU does not support {isa}")
    r = _run_isa(isa, "-c", "import densenet_fast as d; print(d.build_info()['cpu_engine']['kernels_isa'])")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [isa]
    r = _run_isa(isa, "-m", "pytest", "tests/test_cpu_engine.py", "tests/test_models.py", "-q", "-x", "-p",
                 "no:cacheprovider", "-k", "parity and 5-7 or transition or fp64 and densenet121", "-W", "ignore")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def test_unsupported_isa_warns_and_runs_the_best_supported():
    supported = _supported_isas()
    if "avx512" in supported:
        pytest.skip("this CPU supports every build")
    r = _run_isa("avx512", "-W", "always", "-c", "import densenet_fast as d; "
                 "print(d.build_info()['cpu_engine']['kernels_isa'])")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == [supported[-1]]
    assert "DNF_CPU_ISA=avx512: this CPU does not support it" in r.stderr


def _bn_relu_conv1x1_truth(x, a, b, w):
    view = (1, -1) + (1,) * (x.dim() - 2)
    conv = torch.nn.functional.conv3d if x.dim() == 5 else torch.nn.functional.conv2d
    return conv(torch.relu(x.double() * a.double().view(view) + b.double().view(view)), w.double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
# Rows: 70 (five full 14-row blocks of the float32 kernel), 3 (one partial 32-row block of the AMX kernel's
# pipeline), 120, 189, 64 (two full AMX blocks); C odd or not a multiple of 32. Output widths: one partial
# 32-column panel of the float32 kernel (6: one half-masked vector), whole panels (32, 64), a last panel with one
# full and one partial vector (57).
@pytest.mark.parametrize("shape", [(2, 13, 5, 7), (1, 29, 3, 1), (2, 11, 3, 4, 5), (3, 45, 7, 9), (2, 40, 4, 8)])
@pytest.mark.parametrize("n_out", [6, 32, 57, 64])
def test_bn_relu_conv1x1_stage(dtype, layout, shape, n_out):
    """The fused 1x1 stage on its own (what benchmarks/test_bench_ops.py times against oneDNN) equals
    conv(relu(x*scale + shift)) computed by torch in float64; output in the input's dtype (float accumulation,
    rounded once for bfloat16, as oneDNN's bfloat16 convolution), channels_last."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    c = shape[1]
    bn_dtype = torch.float32 if dtype == torch.bfloat16 else dtype
    a, b = (torch.rand(c, generator=g) + 0.5).to(bn_dtype), torch.randn(c, generator=g).to(bn_dtype)
    w = torch.randn(n_out, c, *([1] * (x.dim() - 2)), generator=g).to(dtype)
    y = torch.ops.densenet_fast.bn_relu_conv1x1(x, a, b, w)
    truth = _bn_relu_conv1x1_truth(x, a, b, w)
    assert y.dtype == dtype and y.shape == truth.shape
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    assert y.is_contiguous(memory_format=fmt)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(y, truth) <= tol
    torch.library.opcheck(torch.ops.densenet_fast.bn_relu_conv1x1.default, (x, a, b, w))


def test_bn_relu_conv1x1_bad_inputs():
    x = torch.randn(2, 13, 5, 7)
    a, b, w = torch.rand(13), torch.randn(13), torch.randn(6, 13, 1, 1)
    op = torch.ops.densenet_fast.bn_relu_conv1x1
    with pytest.raises(RuntimeError, match=r"scale: expected shape \[13\], got \[12\]"):
        op(x, a[:12], b, w)
    with pytest.raises(RuntimeError, match=r"weight: expected shape \[C_out, 13, 1, 1\], got \[6, 12, 1, 1\]"):
        op(x, a, b, w[:, :12])
    with pytest.raises(RuntimeError, match=r"weight: expected dtype Float \(the dtype of input\), got Double"):
        op(x, a, b, w.double())
    # torch's convolution refuses a weight without output channels too (not an empty output, not a crash).
    with pytest.raises(RuntimeError, match=r"weight: expected at least one output channel .*got shape \[0, 13, 1, 1\]"):
        op(x, a, b, w[:0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bn_relu_conv1x1_stage_across_thread_counts(dtype):
    """1, 2 and 3 threads on 1001 rows (not a multiple of 32 or 14) and a 64-wide output: the same result. Bitwise
    on our own kernels (each row block, 32 rows on AMX, 14 in float32, is computed the same whichever thread takes
    it); within rounding on the BLAS engines, whose tile heights follow the thread count."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 45, 11, 13, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    a, b = torch.rand(45, generator=g) + 0.5, torch.randn(45, generator=g)
    w = torch.randn(64, 45, 1, 1, generator=g).to(dtype)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(torch.ops.densenet_fast.bn_relu_conv1x1(x, a, b, w))
    finally:
        torch.set_num_threads(before)
    info = dnf.build_info()["cpu_engine"]
    bitwise = info["amx_kernel"] if dtype == torch.bfloat16 else info["f32_kernel"]["on"]
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-6
    for o in outs[1:]:
        assert torch.equal(o, outs[0]) if bitwise else rel_err(o, outs[0]) <= tol
    assert rel_err(outs[0], _bn_relu_conv1x1_truth(x, a, b, w)) <= tol
