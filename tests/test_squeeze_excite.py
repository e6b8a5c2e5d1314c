"""Squeeze-and-excitation gating: parity with timm's SEModule, the custom ops, the Triton kernels.

* CPU parity (fp32/fp64/bf16/fp16, NCHW and channels_last, odd sizes) against timm's SEModule
  with the same weights, forward and every gradient.
* ``torch.library.opcheck`` and ``torch.compile(fullgraph=True)`` on the registered operators.
* The Triton kernels run through Triton's CPU interpreter in a subprocess (``TRITON_INTERPRET=1``
  must be set before triton defines kernels, and must not leak into this process).
* CUDA tests skip without a GPU; nothing touches a GPU at collection time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

# --- conftest-style setup (kept in this file: tests/conftest.py belongs to the lead) ----------
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

from conftest import rel_err  # noqa: E402
from op_tester import OpTester  # noqa: E402

from densenet_fast.nn.squeeze_excite import SqueezeExcite, make_divisible  # noqa: E402
from densenet_fast.ops import squeeze_excite as se_ops  # noqa: E402

timm_se = pytest.importorskip("timm.layers.squeeze_excite")
SEModule = timm_se.SEModule

HAS_TRITON = se_ops._triton.is_available()


@pytest.fixture(autouse=True)
def _torch_backend(monkeypatch):
    """In-process tests use the PyTorch kernels whatever the caller's environment says."""
    monkeypatch.setenv(se_ops.BACKEND_ENV, "auto")
    torch.manual_seed(0)


def _cuda_or_skip() -> torch.device:
    # Checked inside the test body, so collection never initialises CUDA.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not HAS_TRITON:
        pytest.skip("needs triton")
    return torch.device("cuda")


# --- helpers ----------------------------------------------------------------------------------
def _pair(channels: int, dtype=torch.float32, **kwargs) -> tuple[nn.Module, SqueezeExcite]:
    """A timm SEModule and ours with identical (non-trivial) weights."""
    ref = SEModule(channels, **kwargs)
    with torch.no_grad():
        for p in ref.parameters():  # default bias init is tiny; make every term matter
            p.copy_(torch.randn_like(p) * 0.5)
    ours = SqueezeExcite(channels, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(dtype), ours.to(dtype)


def _run(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> list[torch.Tensor]:
    """[y, dx, *param grads] of one forward+backward."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    y = module(x)
    y.backward(dy)
    return [y.detach(), x.grad] + [p.grad for p in module.parameters()]


def _make_x(n, c, h, w, layout, dtype=torch.float32):
    x = torch.randn(n, c, h, w).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # non-dense strides: every other channel of a bigger tensor
        x = torch.randn(n, 2 * c, h, w + 1).to(dtype)[:, ::2, :, 1:]
    return x


SIZES = [(1, 1), (7, 1), (7, 7)]
CHANNELS = [3, 13, 67]
LAYOUTS = ["contiguous", "channels_last"]
NAMES = ["y", "x.grad", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


# --- parity with timm -------------------------------------------------------------------------
class TestSqueezeExciteOp(OpTester):
    """The fused SE (se_forward / se_backward) against timm's SEModule; no BatchNorm, so train/eval is one case."""

    SHAPES = [(n, c, h, w) for n in (1, 3) for c in CHANNELS for (h, w) in SIZES]  # (N, C, H, W)
    TRAINING = [True]
    TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
    STEPS = 1  # no running statistics

    def make(self, shape, dtype):
        N, C, H, W = shape
        ref, ours = _pair(C, dtype)
        assert ours.fused
        return ref, ours, torch.randn(N, C, H, W, dtype=dtype)

    def check_output(self, x, y):
        assert y.stride() == torch.empty_like(x).stride()  # laid out like the input (channels_last stays)


@pytest.mark.parametrize("kwargs", [dict(bias=False), dict(rd_channels=5), dict(rd_ratio=0.5)],
                         ids=["no_bias", "rd5", "ratio0.5"])
def test_parity_fp64_variants(kwargs):
    ref, ours = _pair(13, torch.float64, **kwargs)
    x = _make_x(2, 13, 7, 7, "channels_last", torch.float64)
    dy = torch.randn_like(x)
    for name, a, b in zip(NAMES, _run(ours, x, dy), _run(ref, x, dy)):
        assert rel_err(a, b) <= 1e-10, (name, rel_err(a, b))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-3), (torch.float16, 1e-3)],
                         ids=["bf16", "fp16"])
@pytest.mark.parametrize("channels,hw", [(3, (1, 1)), (67, (7, 7)), (256, (7, 1))])
def test_parity_low_precision(channels, hw, dtype, tol, layout):
    """fp32 accumulation: within one rounding of the fp64 result on the same low-precision
    inputs, and close to timm's own low-precision result."""
    ref, ours = _pair(channels, dtype)
    exact = SEModule(channels).double()
    exact.load_state_dict(ours.state_dict())  # the dtype-rounded weights, in fp64
    x = _make_x(3, channels, *hw, layout, dtype)
    dy = torch.randn_like(x)
    got = _run(ours, x, dy)
    want = _run(exact, x.double(), dy.double())
    timm = _run(ref, x, dy)
    for name, a, b, t in zip(NAMES, got, want, timm):
        assert a.dtype == dtype, name
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))
        assert rel_err(a, t) <= 8 * tol, (name, rel_err(a, t))


def test_autocast_casts_params():
    ref, ours = _pair(16)
    x = torch.randn(2, 16, 5, 5, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
        y_ref = ref(x)
    assert y.dtype == torch.bfloat16
    assert rel_err(y, y_ref) <= 2e-2
    y.float().sum().backward()
    assert ours.fc1.weight.grad.dtype == torch.float32


def test_plain_path_parity():
    """Non-default configurations (norm, other act/gate, max-pool) follow timm exactly."""
    kwargs = dict(act_layer="silu", gate_layer="hard_sigmoid", norm_layer=nn.BatchNorm2d,
                  add_maxpool=True)
    with pytest.warns(UserWarning, match="plain PyTorch path"):
        ours = SqueezeExcite(24, **kwargs)
    ref = SEModule(24, **kwargs)
    assert not ours.fused
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 24, 5, 5)
    dy = torch.randn_like(x)
    for name, a, b in zip(NAMES[:2], _run(ours, x, dy), _run(ref, x, dy)):
        assert rel_err(a, b) <= 1e-6, name


def test_plain_path_warns_once_per_reason():
    from densenet_fast._warn import forget
    forget("squeeze-excite:activation GELU (fused path needs nn.ReLU)")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        SqueezeExcite(16, act_layer=nn.GELU)
        SqueezeExcite(16, act_layer=nn.GELU)
        SqueezeExcite(16)  # fused: no warning
    assert len([w for w in rec if "plain PyTorch path" in str(w.message)]) == 1


# --- module structure -------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3, 8, 13, 64, 67, 100, 256, 1000, 2048])
@pytest.mark.parametrize("rd_ratio,rd_divisor", [(1 / 16, 8), (0.25, 8), (1 / 3, 4), (1.0, 1),
                                                 (0.0625, 1)])
def test_rd_channels_match_timm(channels, rd_ratio, rd_divisor):
    ref = SEModule(channels, rd_ratio=rd_ratio, rd_divisor=rd_divisor)
    ours = SqueezeExcite(channels, rd_ratio=rd_ratio, rd_divisor=rd_divisor)
    assert ours.fc1.out_channels == ref.fc1.out_channels


def test_make_divisible_matches_timm():
    from timm.layers import make_divisible as timm_make_divisible
    for v in [0.5, 1, 7.9, 8, 12, 12.1, 100, 1000.5]:
        for d in [1, 4, 8, 16]:
            for lim in [0.0, 0.9]:
                assert make_divisible(v, d, round_limit=lim) == timm_make_divisible(
                    v, d, round_limit=lim)


def test_state_dict_roundtrip():
    ref, ours = SEModule(64), SqueezeExcite(64)
    assert list(ours.state_dict()) == list(ref.state_dict()) == \
        ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.load_state_dict(ours.state_dict(), strict=True)
    assert isinstance(ours.fc1, nn.Conv2d) and ours.fc1.kernel_size == (1, 1)


def test_from_timm_shares_parameters():
    ref = SEModule(32)
    ours = SqueezeExcite.from_timm(ref)
    assert ours.fc1.weight is ref.fc1.weight and ours.fc2.bias is ref.fc2.bias
    assert ours.fused
    x = torch.randn(2, 32, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))
    with torch.no_grad():
        ref.fc2.bias.add_(1.0)  # shared, not copied
    torch.testing.assert_close(ours(x), ref(x))


def test_from_timm_unfused_and_eval_mode():
    ref = SEModule(32, norm_layer=nn.BatchNorm2d, gate_layer="hard_sigmoid").eval()
    with pytest.warns(UserWarning):
        ours = SqueezeExcite.from_timm(ref)
    assert not ours.fused and not ours.training and ours.bn is ref.bn
    x = torch.randn(2, 32, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))


def test_from_timm_rejects_other_modules():
    with pytest.raises(TypeError, match="fc1"):
        SqueezeExcite.from_timm(nn.Linear(3, 3))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(channels=0), ValueError, r"channels: expected an integer >= 1, got 0"),
    (dict(channels=-3), ValueError, r"channels: expected an integer >= 1, got -3"),
    (dict(channels=2.5), TypeError, r"channels: expected an integer >= 1, got float 2.5"),
    (dict(channels=True), TypeError, r"channels: expected an integer >= 1, got bool"),
    (dict(channels=16, rd_ratio=0.0), ValueError, r"rd_ratio: expected a value in \(0, 1\], got 0.0"),
    (dict(channels=16, rd_ratio=1.5), ValueError, r"rd_ratio: expected a value in \(0, 1\], got 1.5"),
    (dict(channels=16, rd_ratio="x"), TypeError, r"rd_ratio: expected a float in \(0, 1\], got str 'x'"),
    (dict(channels=16, rd_channels=0), ValueError, r"rd_channels: expected an integer >= 1, got 0"),
    (dict(channels=16, rd_divisor=0), ValueError, r"rd_divisor: expected an integer >= 1, got 0"),
    (dict(channels=16, bias="yes"), TypeError, r"bias: expected a bool, got str 'yes'"),
    (dict(channels=16, act_layer="nope"), ValueError, r"act_layer: expected one of .*, got 'nope'"),
    (dict(channels=16, gate_layer=3), TypeError, r"gate_layer: expected a name.*got int"),
    (dict(channels=16, norm_layer=5), TypeError, r"norm_layer: expected None or a callable.*got int"),
])
def test_constructor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SqueezeExcite(**kwargs)


# --- operators --------------------------------------------------------------------------------
def _op_args(n=2, c=13, h=7, w=7, r=8, dtype=torch.float32, bias=True, layout="contiguous"):
    x = _make_x(n, c, h, w, layout, dtype).requires_grad_(True)
    mk = lambda *s: (torch.randn(*s) * 0.5).to(dtype).requires_grad_(True)  # noqa: E731
    return x, mk(r, c), mk(r) if bias else None, mk(c, r), mk(c) if bias else None


@pytest.mark.parametrize("case", [
    dict(), dict(bias=False, layout="channels_last"), dict(layout="sliced", h=3, w=1),
    dict(dtype=torch.bfloat16, n=1, c=3, h=1, w=1),
], ids=["fp32", "no_bias_cl", "sliced", "bf16_1x1"])
def test_opcheck(case):
    args = _op_args(**case)
    torch.library.opcheck(torch.ops.densenet_fast.se_forward.default, args)
    y, s, g = torch.ops.densenet_fast.se_forward(*args)
    assert not s.requires_grad and not g.requires_grad and s.dtype == torch.float32
    x, w1, b1, w2, _ = (a.detach() if a is not None else None for a in args)
    bargs = (torch.randn_like(y), x, s, g, w1, b1, w2)
    torch.library.opcheck(torch.ops.densenet_fast.se_backward.default, bargs)


def test_gradcheck_fp64():
    args = [a.detach().double().requires_grad_(True) for a in _op_args(n=2, c=5, h=3, w=2, r=3)]
    assert torch.autograd.gradcheck(se_ops.se_gate, args)


def _formula_fp64(x, w1, b1, w2, b2):
    d = lambda t: None if t is None else t.detach().double().requires_grad_(True)  # noqa: E731
    leaves = [d(t) for t in (x, w1, b1, w2, b2)]
    xd, w1d, b1d, w2d, b2d = leaves
    s = xd.mean((2, 3))
    g = torch.sigmoid(nn.functional.linear(torch.relu(nn.functional.linear(s, w1d, b1d)), w2d, b2d))
    return xd * g[:, :, None, None], leaves


def test_random_shapes_property():
    """Random small shapes/layouts/bias: op forward and every grad vs the fp64 formula."""
    hyp = pytest.importorskip("hypothesis")
    st = hyp.strategies

    @hyp.settings(max_examples=25, deadline=None, derandomize=True)
    @hyp.given(n=st.integers(1, 3), c=st.integers(1, 20), h=st.integers(1, 6),
               w=st.integers(1, 6), r=st.integers(1, 9), bias=st.booleans(),
               layout=st.sampled_from(["contiguous", "channels_last", "sliced"]))
    def check(n, c, h, w, r, bias, layout):
        args = _op_args(n, c, h, w, r, bias=bias, layout=layout)
        y = se_ops.se_gate(*args)
        y_ref, leaves = _formula_fp64(*args)
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy.double())
        assert rel_err(y, y_ref) <= 1e-5
        for a, b in zip(args, leaves):
            if a is not None:
                assert rel_err(a.grad, b.grad) <= 1e-4

    check()


def test_gate_outputs_match_reference():
    x, w1, b1, w2, b2 = (a.detach() for a in _op_args())
    _, s, g = torch.ops.densenet_fast.se_forward(x, w1, b1, w2, b2)
    torch.testing.assert_close(s, x.mean((2, 3)))
    torch.testing.assert_close(g, torch.sigmoid(torch.relu(s @ w1.T + b1) @ w2.T + b2))


def test_compile_fullgraph_parity():
    torch._dynamo.reset()
    ref, ours = _pair(24)
    x = _make_x(2, 24, 5, 5, "channels_last")
    dy = torch.randn_like(x)
    eager = _run(ours, x, dy)
    compiled = torch.compile(ours, fullgraph=True, backend="inductor")
    for name, a, b in zip(NAMES, _run(compiled, x, dy), eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def _bad_inputs():
    x, w1, b1, w2, b2 = (a.detach() for a in _op_args(n=2, c=13, r=8))
    meta = lambda t: t.to("meta")  # noqa: E731  a device other than x's, available everywhere
    return [  # the operators' policy: RuntimeError naming the argument, the expected and the actual value
        ("x_3d", (x[0], w1, b1, w2, b2), RuntimeError, r"x: expected a 4-D tensor \[N, C, H, W\], got 3-D"),
        ("x_int", (x.long(), w1, b1, w2, b2), RuntimeError, r"x: expected a floating-point dtype.*got torch.int64"),
        ("x_bool", (x > 0, w1, b1, w2, b2), RuntimeError, r"x: expected a floating-point dtype.*got torch.bool"),
        ("empty_batch", (x[:0], w1, b1, w2, b2), RuntimeError, r"x: expected a non-empty batch, got batch size 0"),
        ("zero_hw", (x[:, :, :0], w1, b1, w2, b2), RuntimeError, r"x: expected a non-zero spatial size, got H=0, W=7"),
        ("no_channels", (x[:, :0], w1[:, :0], b1, w2[:0], b2[:0]), RuntimeError,
         r"x: expected at least one channel, got 0"),
        ("w1_channels", (x, w1[:, :5], b1, w2, b2), RuntimeError,
         r"w1: expected shape \[8, 13\] \(\[R, C\] with C=13 channels of x\), got \[8, 5\]"),
        ("w1_3d", (x, w1[None], b1, w2, b2), RuntimeError, r"w1: expected a 2-D tensor \[R, C\].*got 3-D"),
        ("w2_shape", (x, w1, b1, w2[:, :4], b2), RuntimeError, r"w2: expected shape \[13, 8\].*got \[13, 4\]"),
        ("b1_shape", (x, w1, b1[:3], w2, b2), RuntimeError, r"b1: expected shape \[8\].*got \[3\]"),
        ("b2_shape", (x, w1, b1, w2, b2[:3]), RuntimeError, r"b2: expected shape \[13\].*got \[3\]"),
        ("w1_dtype", (x, w1.double(), b1, w2, b2), RuntimeError,
         r"w1: expected dtype torch.float32 \(the dtype of x\), got torch.float64"),
        ("b2_dtype", (x, w1, b1, w2, b2.half()), RuntimeError, r"b2: expected dtype torch.float32.*got torch.float16"),
        ("w1_not_tensor", (x, [[1.0]], b1, w2, b2), RuntimeError,
         r"Expected a value of type 'Tensor' for argument 'w1'"),
        ("w2_device", (x, w1, b1, meta(w2), b2), RuntimeError,
         r"w2: expected a tensor on cpu \(the device of x\), got meta"),
    ]


@pytest.mark.parametrize("name,args,exc,match", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_bad_inputs(name, args, exc, match):
    with pytest.raises(exc, match=match):
        torch.ops.densenet_fast.se_forward(*args)


_META_ROWS = [c for c in _bad_inputs() if c[0] not in ("w2_device", "w1_not_tensor")]  # no meta variant


@pytest.mark.parametrize("name,args,exc,match", _META_ROWS, ids=[c[0] for c in _META_ROWS])
def test_bad_inputs_meta(name, args, exc, match):
    """On meta the fake kernel checks what its output shapes need (x's and w1's rank, devices) with the same
    message; the other rows return outputs there (the real kernel refuses them, test_bad_inputs)."""
    to_meta = lambda t: t.detach().to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    margs = [to_meta(a) for a in args]
    if name in ("x_3d", "w1_3d"):
        with pytest.raises(exc, match=match):
            torch.ops.densenet_fast.se_forward(*margs)
    else:
        assert all(t.device.type == "meta" for t in torch.ops.densenet_fast.se_forward(*margs))


def test_bad_inputs_backward():
    x, w1, b1, w2, b2 = (a.detach() for a in _op_args())
    _, s, g = torch.ops.densenet_fast.se_forward(x, w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match=r"dy: expected shape \[2, 13, 7, 7\]"):
        torch.ops.densenet_fast.se_backward(x[:1], x, s, g, w1, b1, w2)
    with pytest.raises(RuntimeError, match=r"s: expected dtype torch.float32"):
        torch.ops.densenet_fast.se_backward(x, x, s.double(), g, w1, b1, w2)


def test_backend_env_validation(monkeypatch):
    args = [a.detach() for a in _op_args()]
    monkeypatch.setenv(se_ops.BACKEND_ENV, "cudnn")
    with pytest.raises(ValueError, match=r"DENSENET_FAST_SE_BACKEND: expected one of"):
        torch.ops.densenet_fast.se_forward(*args)
    monkeypatch.setenv(se_ops.BACKEND_ENV, "torch")
    torch.ops.densenet_fast.se_forward(*args)
    if HAS_TRITON:
        monkeypatch.setenv(se_ops.BACKEND_ENV, "triton")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            torch.ops.densenet_fast.se_forward(*args)


def test_module_rejects_wrong_channels():
    with pytest.raises(ValueError, match=r"input: expected a 4-D tensor with 16 channels \[N, 16, H, W\], "
                                         r"got shape \(1, 8, 4, 4\)"):
        SqueezeExcite(16)(torch.randn(1, 8, 4, 4))


# --- Triton kernels through the interpreter (subprocess) --------------------------------------
_TRITON_SCRIPT = textwrap.dedent(r"""
    import json, os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    sys.path.insert(0, sys.argv[1])
    sys.path.insert(0, os.path.join(sys.argv[1], "tests"))
    import torch
    from conftest import rel_err
    from densenet_fast.ops import squeeze_excite as se_ops
    from densenet_fast.ops.triton import load_se_kernels
    K = load_se_kernels()
    torch.manual_seed(0)
    results = []

    def make(n, c, h, w, r, dtype, layout, bias):
        x = torch.randn(n, c, h, w)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "sliced":
            x = torch.randn(n, 2 * c, h, w + 1)[:, ::2, :, 1:]
        x = x.to(dtype)  # .to keeps the strides of dense tensors
        mk = lambda *s: (torch.randn(*s) * 0.5).to(dtype)
        return x, mk(r, c), mk(r) if bias else None, mk(c, r), mk(c) if bias else None

    def reference(x, w1, b1, w2, b2, dy):
        # fp64 autograd of the plain formula, on the same (rounded) inputs
        d = lambda t: None if t is None else t.double().requires_grad_(True)
        xd, w1d, b1d, w2d, b2d = map(d, (x, w1, b1, w2, b2))
        s = xd.mean((2, 3))
        h = torch.relu(torch.nn.functional.linear(s, w1d, b1d))
        g = torch.sigmoid(torch.nn.functional.linear(h, w2d, b2d))
        y = xd * g[:, :, None, None]
        y.backward(dy.double())
        grads = [t.grad if t is not None else None for t in (xd, w1d, b1d, w2d, b2d)]
        return [y.detach(), s.detach(), g.detach()], grads

    # The interpreter truncates fp32->bf16 (GPUs round to nearest): allow one bf16 ulp (2^-7);
    # the CUDA tests hold bf16 to half an ulp.
    TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}
    NAMES = ["dx", "dw1", "db1", "dw2", "db2"]

    def check(label, dtype, fwd, bwd, ref_fwd, ref_bwd, x, dy):
        errs = {}
        for nm, a, b in zip(["y", "s", "g"], fwd, ref_fwd):
            errs[nm] = rel_err(a, b)
        for nm, a, b in zip(NAMES, bwd, ref_bwd):
            if b is not None:
                errs[nm] = rel_err(a, b)
        ok = max(errs.values()) <= TOL[dtype]
        ok &= fwd[0].dtype == dtype and fwd[0].stride() == torch.empty_like(x).stride()
        ok &= bwd[0].dtype == dtype and bwd[0].stride() == torch.empty_like(x).stride()
        results.append(dict(case=label, ok=bool(ok), errs=errs))

    CASES = [  # n, c, h, w, r, dtype, layout, bias, splits
        (2, 13, 7, 7, 8, torch.float32, "contiguous", True, None),
        (2, 13, 7, 7, 8, torch.float32, "channels_last", True, None),
        (1, 3, 1, 1, 8, torch.float32, "contiguous", False, None),
        (3, 67, 7, 1, 8, torch.float32, "channels_last", True, None),
        (2, 13, 3, 5, 4, torch.float32, "sliced", True, None),
        (2, 130, 3, 3, 40, torch.float32, "contiguous", True, None),   # several K/M blocks
        (2, 5, 24, 24, 3, torch.float32, "contiguous", True, 2),       # split HW reduction
        (1, 13, 20, 20, 8, torch.float32, "channels_last", True, 3),
        (2, 13, 7, 7, 8, torch.bfloat16, "channels_last", True, None),
        (2, 67, 7, 7, 8, torch.bfloat16, "contiguous", True, None),
        (2, 13, 7, 7, 8, torch.float16, "channels_last", False, None),
        (1, 3, 7, 1, 8, torch.float16, "contiguous", True, None),
    ]
    for n, c, h, w, r, dtype, layout, bias, splits in CASES:
        label = f"{n}x{c}x{h}x{w} r={r} {str(dtype)[6:]} {layout} bias={bias} splits={splits}"
        x, w1, b1, w2, b2 = make(n, c, h, w, r, dtype, layout, bias)
        dy = torch.randn(n, c, h, w).to(dtype)
        ref_fwd, ref_bwd = reference(x, w1, b1, w2, b2, dy)
        y, s, g = K.se_forward_triton(x, w1, b1, w2, b2, num_splits=splits)
        bwd = K.se_backward_triton(dy, x, s, g, w1, b1, w2, num_splits=splits)
        check(label, dtype, (y, s, g), bwd, ref_fwd, ref_bwd, x, dy)

    # Through the registered op + autograd, with the backend forced to Triton; dy from
    # y.sum() is an expanded (all-zero-stride) tensor.
    os.environ["DENSENET_FAST_SE_BACKEND"] = "triton"
    x, w1, b1, w2, b2 = make(2, 13, 5, 5, 8, torch.float32, "channels_last", True)
    leaves = [t.requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    y = se_ops.se_gate(*leaves)
    y.sum().backward()
    ref_fwd, ref_bwd = reference(x.detach(), w1.detach(), b1.detach(), w2.detach(), b2.detach(),
                                 torch.ones_like(y))
    _, s, g = torch.ops.densenet_fast.se_forward(*(t.detach() for t in leaves))
    check("op+autograd expanded dy", torch.float32, (y.detach(), s, g),
          [t.grad for t in leaves], ref_fwd, ref_bwd, x, y)

    # Deterministic: bit-identical reruns, including the split reduction.
    x, w1, b1, w2, b2 = make(1, 13, 20, 20, 8, torch.float32, "channels_last", True)
    dy = torch.randn_like(x)
    runs = []
    for _ in range(2):
        y, s, g = K.se_forward_triton(x, w1, b1, w2, b2, num_splits=3)
        runs.append([y, s, g, *K.se_backward_triton(dy, x, s, g, w1, b1, w2, num_splits=3)])
    same = all(torch.equal(a, b) for a, b in zip(*runs))
    results.append(dict(case="deterministic", ok=bool(same), errs={}))

    # opcheck on the Triton path: fake strides/dtypes match the kernels' outputs.
    x, w1, b1, w2, b2 = make(2, 13, 3, 3, 8, torch.bfloat16, "channels_last", True)
    args = [t.requires_grad_(True) for t in (x, w1, b1, w2, b2)]
    res = torch.library.opcheck(torch.ops.densenet_fast.se_forward.default, args,
                                test_utils=("test_schema", "test_autograd_registration",
                                            "test_faketensor"))
    results.append(dict(case="opcheck", ok=all(v == "SUCCESS" for v in res.values()),
                        errs={}, detail=str(res)))
    print("RESULTS" + json.dumps(results))
""")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env.pop(se_ops.BACKEND_ENV, None)
    proc = subprocess.run([sys.executable, "-c", _TRITON_SCRIPT, str(ROOT)], env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS"))
    results = json.loads(line[len("RESULTS"):])
    failed = [r for r in results if not r["ok"]]
    assert not failed, json.dumps(failed, indent=1)
    assert len(results) >= 15


# --- CUDA (skip without a GPU) ----------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-3)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_triton_parity(dtype, tol, layout):
    dev = _cuda_or_skip()
    ref, ours = _pair(256, dtype)
    exact = SEModule(256).double()
    exact.load_state_dict(ours.state_dict())
    ref, ours, exact = ref.to(dev), ours.to(dev), exact.to(dev)
    x = _make_x(8, 256, 28, 28, layout, dtype).to(dev)
    dy = torch.randn_like(x)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        got = _run(ours, x, dy)
        torch.cuda.synchronize()
    kernels = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    # the Triton kernels ran (not a PyTorch fallback): squeeze partial sums and the scale kernel
    assert any("_channel_sum" in k for k in kernels) and any("_scale" in k for k in kernels), sorted(kernels)
    want = _run(exact, x.double(), dy.double())
    for name, a, b in zip(NAMES, got, want):
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))
    assert got[0].stride() == x.stride()


def test_cuda_deterministic_and_small_batch():
    dev = _cuda_or_skip()
    _, ours = _pair(64)
    ours = ours.to(dev)
    x = _make_x(1, 64, 112, 112, "channels_last").to(dev)  # batch 1: HW split path
    dy = torch.randn_like(x)
    a, b = _run(ours, x, dy), _run(ours, x, dy)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_cuda_compile_and_opcheck():
    dev = _cuda_or_skip()
    args = [a.detach().to(dev).requires_grad_(True) for a in _op_args(layout="channels_last")]
    torch.library.opcheck(torch.ops.densenet_fast.se_forward.default, args)
    torch._dynamo.reset()
    _, ours = _pair(64)
    ours = ours.to(dev)
    x = _make_x(4, 64, 14, 14, "channels_last").to(dev)
    dy = torch.randn_like(x)
    eager = _run(ours, x, dy)
    for name, a, b in zip(NAMES, _run(torch.compile(ours, fullgraph=True), x, dy), eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
