"""Hard inputs and failure behaviour (issue 9).

Every operator (``torch.ops.densenet_fast.*``: eagerly, under ``torch.compile``, and on meta tensors for
what the fake kernels check, i.e. what the output shapes need; see FAKE/KERNEL/DEVICE below) and every
module/model rejects bad inputs with an error naming the argument, the expected and the actual value;
the process survives, the next valid call gives the right answer, and no running statistic changes in
a call that raises. NaN/Inf propagate exactly as in torchvision. Large sizes: channel counts beyond
the 32-bit BLAS limit are refused before anything is allocated.

Error-type policy (documented here, relied on by the tables below):
* operators: RuntimeError (TORCH_CHECK) for every bad argument, except a single value per channel in
  training, which is a ValueError with nn.BatchNorm2d's message;
* modules: ValueError for wrong rank / channel count and the BatchNorm batch rule (as nn.BatchNorm2d),
  RuntimeError for wrong device or dtype (as torch's conv/BN modules), TypeError/ValueError for bad
  constructor arguments (wrong type / out of range);
* empty batch: the operators reject it; the modules and models accept it and return the empty result
  torchvision returns (reference path, no warning), since it is valid input for torchvision's modules;
* aliasing: the operators are functional (no out= arguments, nothing written in place, outputs are new
  tensors), so arguments may alias one another; the only in-place writes are the modules' running-stat
  updates, done after the operator has succeeded.
"""
from __future__ import annotations

import copy
import re
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from convert_utils import randomize_bn
from torch import nn
from torchvision.models.densenet import DenseNet as TVDenseNet
from torchvision.models.densenet import _DenseBlock, _Transition

import densenet_fast as dnf
from densenet_fast._warn import forget
from densenet_fast.nn.dense_block import fused_norm_relu_pool
from densenet_fast.ops import tail as tail_ops

ops = torch.ops.densenet_fast
N, C0, H, W, L, K, BN_SIZE = 2, 3, 4, 4, 2, 2, 2
INTER = BN_SIZE * K
CT = C0 + L * K
BIG = 2**31  # one past the 32-bit BLAS limit


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _block(dtype=torch.float32, **kw) -> dnf.DenseBlock:
    torch.manual_seed(0)
    b = dnf.DenseBlock(L, C0, BN_SIZE, K, **kw).to(dtype)
    randomize_bn(b)
    return b


def _snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_state_unchanged(module: nn.Module, snap: dict) -> None:
    now = module.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"{k} changed in a call that raised"


def _block_op_args(training: bool, dtype=torch.float32):
    """Valid positional arguments of dense_block_forward, as a list (tensor lists as Python lists)."""
    b = _block(dtype)
    p = b.block_params()
    x = torch.randn(N, C0, H, W, dtype=dtype, generator=torch.Generator().manual_seed(1))
    lists = [[t.detach() for t in lst] for lst in p]
    if training:
        lists[6:] = [[], [], [], []]
    return [x, *lists, None, 0.0, training, 1e-5]


def _to_meta(args):
    conv = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [[conv(t) for t in a] if isinstance(a, list) else conv(a) for a in args]


# Argument positions of dense_block_forward.
I_INPUT, I_G1, I_B1, I_W1, I_G2, I_B2, I_W2, I_RM1, I_RV1, I_RM2, I_RV2, I_MASK, I_P, I_TRAIN, I_EPS = range(15)


def _set(i, value):
    def mutate(a):
        a[i] = value(a) if callable(value) else value
    return mutate


def _set_item(i, j, value):
    def mutate(a):
        a[i] = list(a[i])
        a[i][j] = value(a[i][j])
    return mutate


def _drop_item(i):
    def mutate(a):
        a[i] = list(a[i])[:-1]
    return mutate


def _cat(*muts):
    def mutate(a):
        for m in muts:
            m(a)
    return mutate


def _to_3d_weights(a):
    """The block's conv weights for a 5-D input: 1x1x1 and 3x3x3 (the 2-D ones repeated along depth)."""
    a[I_W1] = [w[..., None] for w in a[I_W1]]
    a[I_W2] = [w[..., None].expand(*w.shape, 3) for w in a[I_W2]]


# Where a bad argument is refused (docs/design.md §6: the C++ kernels validate every argument; the fake
# kernels check only what the output shapes need):
FAKE = "fake"  # by the C++ kernel and by the fake kernel (meta tensors, torch.compile's tracing)
KERNEL = "kernel"  # by the C++ kernel only (eager, and when a compiled graph runs); on meta the call returns
DEVICE = "device"  # an argument on another device than input: the dispatcher picks the fake kernel (meta
#                    argument), which refuses it; no meta variant (every argument is on meta there)


def _device_params(cases):
    """(case, device) pairs: every case on cpu, and on meta unless it is a device mix."""
    return [pytest.param(c, d, id=f"{c[0]}-{d}") for c in cases for d in ("cpu", "meta")
            if not (d == "meta" and c[-1] == DEVICE)]


def _expect_refusal(call, device, exc, pattern, where):
    """A bad call raises exc matching pattern, except a KERNEL row on meta, whose fake kernel returns outputs
    (it checks only what the output shapes need; the C++ kernel refuses the same call)."""
    if device == "meta" and where == KERNEL:
        out = call()
        assert all(t.device.type == "meta" for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor))
        return
    with pytest.raises(exc, match=pattern):
        call()


# ------------------------------------------------------------------------------------------------
# dense_block_forward: table of bad arguments (CPU kernel and fake/meta kernel)
# ------------------------------------------------------------------------------------------------
# (id, training, mutate(args), exception, regex that names argument/expected/actual, where refused)
BLOCK_FORWARD_CASES = [
    ("input-3d", True, _set(I_INPUT, lambda a: a[0][0]), RuntimeError, r"input: expected a 4-D tensor.*got 3-D", FAKE),
    ("input-6d", True, _set(I_INPUT, lambda a: a[0][None, None]), RuntimeError,
     r"input: expected a 4-D tensor \[N, C, H, W\] or a 5-D tensor \[N, C, D, H, W\], got 6-D", FAKE),
    # A 5-D (3D) input for a block of 2D weights.
    ("input-5d-2d-weights", True, _set(I_INPUT, lambda a: a[0][None]), RuntimeError,
     r"conv2_weight\[0\]: expected a 5-D weight \[k, inter, 3, 3, 3\] for a 5-D input, got shape \[2, 4, 3, 3\]",
     FAKE),
    # 3D weights for a 2D block (4-D input).
    ("input-4d-3d-weights", True, _set(I_W2, lambda a: [w[..., None].expand(*w.shape, 3) for w in a[I_W2]]),
     RuntimeError, r"conv2_weight\[0\]: expected a 4-D weight \[k, inter, 3, 3\] for a 4-D input, got shape "
     r"\[2, 4, 3, 3, 3\]", FAKE),
    ("input-5d-2d-conv1", True, _cat(_set(I_INPUT, lambda a: a[0][:, :, None]),
                                     _set(I_W2, lambda a: [w[..., None].expand(*w.shape, 3) for w in a[I_W2]])),
     RuntimeError, r"conv1_weight\[0\]: expected a 5-D weight \[inter, C0, 1, 1, 1\] for a 5-D input", FAKE),
    ("input-5d-zero-depth", True, _cat(_set(I_INPUT, lambda a: a[0][:, :, None][:, :, :0]), _to_3d_weights),
     RuntimeError,
     r"input: expected a non-zero spatial size, got D=0, H=4, W=4", KERNEL),
    ("input-int", True, _set(I_INPUT, lambda a: a[0].long()), RuntimeError,
     r"input: expected a floating-point dtype.*got Long|input: expected a floating-point dtype.*int64", KERNEL),
    ("input-bool", False, _set(I_INPUT, lambda a: a[0] > 0), RuntimeError, r"input: expected a floating-point dtype",
     KERNEL),
    ("input-complex", True, _set(I_INPUT, lambda a: a[0].to(torch.complex64)), RuntimeError,
     r"input: expected a floating-point dtype", KERNEL),
    # fp16 on CPU (no autocast at the operator level): BN tensors fp32, conv weights fp16 -> CPU refuses
    # (bf16 is a CPU dtype of the block: tests/test_bf16.py).
    ("input-fp16-cpu", True, _cat(_set(I_INPUT, lambda a: a[0].half()), _set(I_W1,
                                                                             lambda a: [t.half() for t in a[I_W1]]),
                                  _set(I_W2, lambda a: [t.half() for t in a[I_W2]])), RuntimeError,
     r"input: expected dtype float32, float64 or bfloat16 on CPU.*got Half", KERNEL),
    ("dtype-input-vs-params", True, _set(I_INPUT, lambda a: a[0].double()), RuntimeError,
     r"norm1_weight\[0\]: expected dtype .*(Double|float64).*got (Float|torch.float32)", KERNEL),
    ("dtype-conv1", True, _set_item(I_W1, 1, lambda t: t.double()), RuntimeError,
     r"conv1_weight\[1\]: expected dtype .*(Float|float32).*got (Double|torch.float64)", KERNEL),
    ("dtype-norm2-bias", True, _set_item(I_B2, 0, lambda t: t.double()), RuntimeError,
     r"norm2_bias\[0\]: expected dtype", KERNEL),
    ("dtype-running-var", False, _set_item(I_RV2, 1, lambda t: t.double()), RuntimeError,
     r"norm2_running_var\[1\]: expected dtype", KERNEL),
    ("device-param-meta", True, _set_item(I_G1, 1, lambda t: t.to("meta")), RuntimeError,
     r"norm1_weight\[1\]: expected a tensor on cpu.*got meta", DEVICE),
    ("device-input-meta", True, _set(I_INPUT, lambda a: a[0].to("meta")), RuntimeError,
     r"norm1_weight\[0\]: expected a tensor on meta.*got cpu", DEVICE),
    ("device-running-meta", False, _set_item(I_RM1, 0, lambda t: t.to("meta")), RuntimeError,
     r"norm1_running_mean\[0\]: expected a tensor on cpu.*got meta", DEVICE),
    ("empty-batch", True, _set(I_INPUT, lambda a: a[0][:0]), RuntimeError,
     r"input: expected a non-empty batch, got batch size 0", KERNEL),
    ("empty-batch-eval", False, _set(I_INPUT, lambda a: a[0][:0]), RuntimeError,
     r"input: expected a non-empty batch", KERNEL),
    ("zero-height", True, _set(I_INPUT, lambda a: a[0][:, :, :0]), RuntimeError,
     r"input: expected a non-zero spatial size, got H=0, W=4", KERNEL),
    ("zero-width", False, _set(I_INPUT, lambda a: a[0][:, :, :, :0]), RuntimeError,
     r"input: expected a non-zero spatial size, got H=4, W=0", KERNEL),
    ("zero-channels", True, _set(I_INPUT, lambda a: a[0][:, :0]), RuntimeError,
     r"input: expected at least one channel, got 0", KERNEL),
    ("batch1-1x1-train", True, _set(I_INPUT, lambda a: a[0][:1, :, :1, :1]), ValueError,
     r"^Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3, 1, 1\]\)$", KERNEL),
    ("channels-vs-block", True, _set(I_INPUT, lambda a: torch.cat([a[0], a[0][:, :1]], 1)), RuntimeError,
     r"norm1_weight\[0\].*: expected shape \[4\], got \[3\]", KERNEL),
    ("norm1-weight-shape", True, _set_item(I_G1, 1, lambda t: t[:-1]), RuntimeError,
     r"norm1_weight\[1\].*: expected shape \[5\], got \[4\]", KERNEL),
    ("conv1-weight-shape", True, _set_item(I_W1, 0, lambda t: t[:, :, :, :].repeat(1, 1, 3, 3)), RuntimeError,
     r"conv1_weight\[0\]: expected shape \[4, 3, 1, 1\], got \[4, 3, 3, 3\]", KERNEL),
    ("conv1-weight-2d", True, _set_item(I_W1, 0, lambda t: t.flatten(1)), RuntimeError,
     r"conv1_weight\[0\]: expected a 4-D weight", FAKE),
    ("conv2-weight-growth", True, _set_item(I_W2, 1, lambda t: t[:1]), RuntimeError,
     r"conv2_weight\[1\]: expected shape \[2, 4, 3, 3\], got \[1, 4, 3, 3\]", KERNEL),
    ("conv2-weight-kernel", True, _set_item(I_W2, 0, lambda t: t[:, :, :1, :1]), RuntimeError,
     r"conv2_weight\[0\]: expected shape \[2, 4, 3, 3\], got \[2, 4, 1, 1\]", KERNEL),
    ("norm2-weight-shape", True, _set_item(I_G2, 0, lambda t: torch.cat([t, t])), RuntimeError,
     r"norm2_weight\[0\]: expected shape \[4\].*got \[8\]", KERNEL),
    ("list-length", True, _drop_item(I_B1), RuntimeError, r"norm1_bias: expected 2 tensors.*got 1", KERNEL),
    ("no-layers", True, _cat(*[_set(i, []) for i in range(I_G1, I_W2 + 1)]), RuntimeError,
     r"norm1_weight: expected at least one layer", FAKE),
    ("eval-no-running", False, _set(I_RM1, []), RuntimeError, r"norm1_running_mean: expected 2 tensors.*got 0", KERNEL),
    ("eval-running-shape", False, _set_item(I_RV1, 1, lambda t: t[:2]), RuntimeError,
     r"norm1_running_var\[1\]: expected shape \[5\].*got \[2\]", KERNEL),
    ("drop-rate-one", True, _set(I_P, 1.0), RuntimeError, r"drop_rate: expected a value in \[0, 1\), got 1", KERNEL),
    ("drop-rate-negative", True, _set(I_P, -0.25), RuntimeError, r"drop_rate: expected a value in \[0, 1\), got -0.25",
     KERNEL),
    ("drop-rate-nan", True, _set(I_P, float("nan")), RuntimeError, r"drop_rate: expected a value in \[0, 1\)", KERNEL),
    ("eps-zero", True, _set(I_EPS, 0.0), RuntimeError, r"eps: expected a positive value, got 0", KERNEL),
    ("eps-nan", False, _set(I_EPS, float("nan")), RuntimeError, r"eps: expected a positive value, got nan", KERNEL),
    ("mask-dtype", True, _set(I_MASK, lambda a: torch.ones(N, L * K, H, W, device=a[0].device)), RuntimeError,
     r"dropout_mask: expected dtype torch.bool, got (Float|torch.float32)", KERNEL),
    ("mask-shape", True, _set(I_MASK, lambda a: torch.ones(N, L * K + 1, H, W, dtype=torch.bool,
                                                           device=a[0].device)), RuntimeError,
     r"dropout_mask: expected shape \[2, 4, 4, 4\], got \[2, 5, 4, 4\]", KERNEL),
    ("mask-device", True, _set(I_MASK, torch.ones(N, L * K, H, W, dtype=torch.bool, device="meta")), RuntimeError,
     r"dropout_mask: expected a tensor on cpu.*got meta", DEVICE),
]


@pytest.fixture(scope="module")
def block_baselines():
    return {t: [o.clone() for o in ops.dense_block_forward(*_block_op_args(t))] for t in (True, False)}


@pytest.mark.parametrize("case,device", _device_params(BLOCK_FORWARD_CASES))
def test_dense_block_forward_rejects(case, device, block_baselines):
    name, training, mutate, exc, pattern, where = case
    args = _block_op_args(training)
    if device == "meta":
        args = _to_meta(args)
    mutate(args)
    _expect_refusal(lambda: ops.dense_block_forward(*args), device, exc, pattern, where)
    # The process survives and the next valid call gives the right answer.
    good = _block_op_args(training)
    out = ops.dense_block_forward(*good)
    for o, ref in zip(out, block_baselines[training]):
        torch.testing.assert_close(o, ref, rtol=0, atol=0)


@pytest.mark.parametrize("case", BLOCK_FORWARD_CASES, ids=[c[0] for c in BLOCK_FORWARD_CASES])
def test_compiled_dense_block_forward_rejects(case):
    """Under torch.compile every row is refused with the same message: FAKE and DEVICE rows while tracing (the
    fake kernel), KERNEL rows when the compiled graph calls the C++ kernel."""
    name, training, mutate, exc, pattern, where = case
    args = _block_op_args(training)
    mutate(args)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: ops.dense_block_forward(*a), fullgraph=True, backend="eager")
    with pytest.raises(exc, match=pattern):
        compiled(*args)


def test_fused_dense_block_entry_point_rejects():
    from densenet_fast.ops import BlockParams, fused_dense_block
    b = _block()
    x = torch.randn(N, C0, H, W)
    with pytest.raises(TypeError, match=r"params: expected a BlockParams"):
        fused_dense_block(x, tuple(b.block_params())[:6], training=True)
    with pytest.raises(TypeError, match=r"input: expected a Tensor, got ndarray"):
        fused_dense_block(x.numpy(), b.block_params(), training=True)
    for p in (1.0, -0.5, float("nan")):  # checked (by the operator) in eval too, where dropout is inactive
        with pytest.raises(RuntimeError, match=r"drop_rate: expected a value in \[0, 1\)"):
            fused_dense_block(x, b.block_params(), training=False, drop_rate=p)
    with pytest.raises(RuntimeError, match=r"input: expected a 4-D tensor"):  # no mask drawn for a bad input
        fused_dense_block(x[0], b.block_params(), training=True, drop_rate=0.5)
    assert isinstance(b.block_params(), BlockParams)
    out = fused_dense_block(x, b.block_params(), training=True, drop_rate=0.5)
    assert out.buffer.shape == (N, CT, H, W)


# ------------------------------------------------------------------------------------------------
# dense_block_backward
# ------------------------------------------------------------------------------------------------
def _block_backward_args(training: bool):
    fwd = _block_op_args(training)
    buffer, mean, var, mean2, var2 = ops.dense_block_forward(*fwd)
    return [torch.randn_like(buffer), buffer, mean, var, mean2, var2, *fwd[1:11], None, 0.0, training, 1e-5, C0]


B_GRAD, B_BUF, B_MEAN, B_VAR, B_MEAN2, B_VAR2 = range(6)
B_NIF = 20
BLOCK_BACKWARD_CASES = [  # (id, training, mutate(args), exception, pattern, where refused)
    ("grad-shape", True, _set(B_GRAD, lambda a: a[0][:, :-1]), RuntimeError,
     r"grad_buffer: expected shape \[2, 7, 4, 4\], got \[2, 6, 4, 4\]", KERNEL),
    ("grad-dtype", True, _set(B_GRAD, lambda a: a[0].double()), RuntimeError, r"grad_buffer: expected dtype", KERNEL),
    ("grad-device", False, _set(B_GRAD, lambda a: a[0].to("meta")), RuntimeError,
     r"grad_buffer: expected a tensor on cpu.*got meta", DEVICE),
    ("buffer-3d", True, _set(B_BUF, lambda a: a[1][0]), RuntimeError, r"buffer: expected a 4-D tensor.*got 3-D", FAKE),
    ("num-input-features-0", True, _set(B_NIF, 0), RuntimeError,
     r"num_input_features: expected a value in \[1, 7\), got 0", FAKE),
    ("num-input-features-big", True, _set(B_NIF, 7), RuntimeError,
     r"num_input_features: expected a value in \[1, 7\), got 7", FAKE),
    ("buffer-channels", True, _set(B_NIF, 2), RuntimeError, r"norm1_weight\[0\].*: expected shape \[2\], got \[3\]",
     KERNEL),
    ("mean-shape", True, _set(B_MEAN, lambda a: a[2][:-1]), RuntimeError, r"mean: expected shape \[7\], got \[6\]",
     KERNEL),
    ("mean2-dtype", True, _set(B_MEAN2, lambda a: a[4].double()), RuntimeError, r"mean2: expected dtype", KERNEL),
    ("var2-device", True, _set(B_VAR2, lambda a: a[5].to("meta")), RuntimeError,
     r"var2: expected a tensor on cpu.*got meta", DEVICE),
    ("var2-shape", True, _set(B_VAR2, lambda a: a[5][:1]), RuntimeError,
     r"var2: expected shape \[2, 4\], got \[1, 4\]", KERNEL),
]


@pytest.mark.parametrize("case,device", _device_params(BLOCK_BACKWARD_CASES))
def test_dense_block_backward_rejects(case, device):
    name, training, mutate, exc, pattern, where = case
    args = _block_backward_args(training)
    ref = [t.clone() if isinstance(t, torch.Tensor) else [u.clone() for u in t]
           for t in ops.dense_block_backward(*args)]
    bad = list(args)
    if device == "meta":
        bad = _to_meta(bad)
    mutate(bad)
    _expect_refusal(lambda: ops.dense_block_backward(*bad), device, exc, pattern, where)
    again = ops.dense_block_backward(*args)
    torch.testing.assert_close(list(again[0:1]) + [t for lst in again[1:] for t in lst],
                               list(ref[0:1]) + [t for lst in ref[1:] for t in lst], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# transition / norm_relu_pool / channel_moments
# ------------------------------------------------------------------------------------------------
def _tail_args(with_conv: bool):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, 5, 4, 6, generator=g)
    mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    args = [x, mean, var, torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)]
    if with_conv:
        args.append(torch.randn(3, 5, 1, 1, generator=g))
    return args + [True, 1e-5]


T_IN, T_MEAN, T_VAR, T_W, T_B, T_CONV = range(6)
TAIL_CASES = [  # (id, applies to transition / norm_relu_pool, mutate, exception, pattern, cpu_only)
    ("input-3d", "tn", _set(T_IN, lambda a: a[0][0]), RuntimeError, r"input: expected a 4-D tensor", FAKE),
    ("input-int", "tn", _set(T_IN, lambda a: a[0].int()), RuntimeError, r"input: expected a floating-point dtype",
     KERNEL),
    ("input-complex", "tn", _set(T_IN, lambda a: a[0].to(torch.complex64)), RuntimeError,
     r"input: expected a floating-point dtype", KERNEL),
    ("input-fp16-cpu", "tn", _cat(_set(T_IN, lambda a: a[0].half()),
                                  _set(T_CONV, lambda a: a[T_CONV].half() if len(a) > 7 else a[T_CONV])),
     RuntimeError, r"input: expected dtype float32, float64 or bfloat16 on CPU", KERNEL),
    ("empty-batch", "tn", _set(T_IN, lambda a: a[0][:0]), RuntimeError, r"input: expected a non-empty batch", KERNEL),
    ("zero-width", "tn", _set(T_IN, lambda a: a[0][..., :0]), RuntimeError, r"input: expected a non-zero spatial size",
     KERNEL),
    ("channels", "tn", _set(T_IN, lambda a: a[0][:, :4]), RuntimeError, r"mean: expected shape \[4\], got \[5\]",
     KERNEL),
    ("dtype-weight", "tn", _set(T_W, lambda a: a[T_W].double()), RuntimeError,
     r"weight: expected dtype .*(Float|float32).*got (Double|torch.float64)", KERNEL),
    ("dtype-input", "tn", _set(T_IN, lambda a: a[0].double()), RuntimeError, r"mean: expected dtype", KERNEL),
    ("device-var", "tn", _set(T_VAR, lambda a: a[T_VAR].to("meta")), RuntimeError,
     r"var: expected a tensor on cpu.*got meta", DEVICE),
    ("bias-shape", "tn", _set(T_B, lambda a: a[T_B][:, None]), RuntimeError,
     r"bias: expected shape \[5\], got \[5, 1\]",
     KERNEL),
    ("eps", "tn", _set(-1, 0.0), RuntimeError, r"eps: expected a positive value", KERNEL),
    ("conv-shape", "t", _set(T_CONV, lambda a: a[T_CONV][:, :4]), RuntimeError,
     r"conv_weight: expected shape \[C_out, 5, 1, 1\], got \[3, 4, 1, 1\]", KERNEL),
    ("conv-no-outputs", "t", _set(T_CONV, lambda a: a[T_CONV][:0]), RuntimeError,
     r"conv_weight: expected .*output channel", KERNEL),
    ("conv-dtype", "t", _set(T_CONV, lambda a: a[T_CONV].double()), RuntimeError, r"conv_weight: expected dtype",
     KERNEL),
    ("pool-too-small", "t", _set(T_IN, lambda a: a[0][:, :, :1]), RuntimeError,
     r"input: the transition's 2x2 average pool needs H >= 2 and W >= 2, got H=1, W=6", KERNEL),
    ("input-6d", "tn", _set(T_IN, lambda a: a[0][None, None]), RuntimeError,
     r"input: expected a 4-D tensor \[N, C, H, W\] or a 5-D tensor \[N, C, D, H, W\], got 6-D", FAKE),
    ("conv-2d-for-5d", "t", _set(T_IN, lambda a: a[0][:, :, None].expand(-1, -1, 2, -1, -1)), RuntimeError,
     r"conv_weight: expected shape \[C_out, 5, 1, 1, 1\], got \[3, 5, 1, 1\]", FAKE),
    ("pool-depth-1", "t", _cat(_set(T_IN, lambda a: a[0][:, :, None]), _set(T_CONV, lambda a: a[T_CONV][..., None])),
     RuntimeError, r"input: the transition's 2x2x2 average pool needs D >= 2, H >= 2 and W >= 2, got D=1, H=4, W=6",
     KERNEL),
]


_TAIL_OPS = {"t": "transition", "n": "norm_relu_pool"}


@pytest.mark.parametrize("op,case,device", [pytest.param(_TAIL_OPS[o], *p.values, id=f"{_TAIL_OPS[o]}-{p.id}")
                                            for p in _device_params(TAIL_CASES) for o in p.values[0][1]])
def test_tail_ops_reject(case, op, device):
    name, applies, mutate, exc, pattern, where = case
    fn = ops.transition_forward if op == "transition" else ops.norm_relu_pool_forward
    args = _tail_args(op == "transition")
    ref = fn(*args).clone()
    bad = list(args)
    if device == "meta":
        bad = _to_meta(bad)
    mutate(bad)
    _expect_refusal(lambda: fn(*bad), device, exc, pattern, where)
    torch.testing.assert_close(fn(*_tail_args(op == "transition")), ref, rtol=0, atol=0)


@pytest.mark.parametrize("op,case", [pytest.param(_TAIL_OPS[o], c, id=f"{_TAIL_OPS[o]}-{c[0]}")
                                     for c in TAIL_CASES for o in c[1]])
def test_compiled_tail_ops_reject(case, op):
    """As test_compiled_dense_block_forward_rejects: every row refused with its message under torch.compile."""
    name, applies, mutate, exc, pattern, where = case
    fn = ops.transition_forward if op == "transition" else ops.norm_relu_pool_forward
    bad = _tail_args(op == "transition")
    mutate(bad)
    torch._dynamo.reset()
    with pytest.raises(exc, match=pattern):
        torch.compile(lambda *a: fn(*a), fullgraph=True, backend="eager")(*bad)


def test_tail_backward_rejects_bad_grad():
    t_args = _tail_args(True)
    with pytest.raises(RuntimeError, match=r"grad_output: expected shape \[2, 3, 2, 3\], got \[2, 3, 4, 6\]"):
        ops.transition_backward(torch.zeros(2, 3, 4, 6), *t_args)
    n_args = _tail_args(False)
    with pytest.raises(RuntimeError, match=r"grad_output: expected shape \[2, 5\], got \[2, 4\]"):
        ops.norm_relu_pool_backward(torch.zeros(2, 4), *n_args)
    with pytest.raises(RuntimeError, match=r"grad_output: expected dtype"):
        ops.norm_relu_pool_backward(torch.zeros(2, 5, dtype=torch.float64), *n_args)
    # The fake kernel needs only the input's shape: on meta a wrong grad_output gives the input-shaped outputs.
    gx = ops.transition_backward(*_to_meta([torch.zeros(2, 3, 4, 6), *t_args]))[0]
    assert gx.shape == t_args[0].shape and gx.device.type == "meta"


# The optional SE gate [N, C] of the tail operators (checked in C++, csrc/common/checks.h; the fake
# kernels check only what output shapes need, so these rows run on the CPU kernels).
GATE_CASES = [  # (id, gate from the input x, pattern)
    ("gate-shape", lambda x: torch.rand(x.shape[0], x.shape[1] + 1),
     r"gate \(\[N, C\] of input\): expected shape \[2, 5\], got \[2, 6\]"),
    ("gate-1d", lambda x: torch.rand(x.shape[1]), r"gate \(\[N, C\] of input\): expected shape \[2, 5\], got \[5\]"),
    ("gate-batch", lambda x: torch.rand(x.shape[0] + 1, x.shape[1]), r"gate .*expected shape \[2, 5\], got \[3, 5\]"),
    ("gate-dtype", lambda x: torch.rand(x.shape[0], x.shape[1], dtype=torch.float64),
     r"gate: expected dtype (Float|float32).*got (Double|torch.float64)"),
    ("gate-int", lambda x: torch.ones(x.shape[0], x.shape[1], dtype=torch.int32),
     r"gate: expected dtype (Float|float32).*got (Int|torch.int32)"),
    ("gate-device", lambda x: torch.rand(x.shape[0], x.shape[1], device="meta"),
     r"gate: expected a tensor on cpu \(the device of input\), got meta"),
]


@pytest.mark.parametrize("op", ["transition", "norm_relu_pool"])
@pytest.mark.parametrize("case", GATE_CASES, ids=[c[0] for c in GATE_CASES])
def test_tail_ops_reject_bad_gate(case, op):
    name, make_gate, pattern = case
    is_t = op == "transition"
    args = _tail_args(is_t)
    fwd, bwd = (ops.transition_forward, ops.transition_backward) if is_t else (ops.norm_relu_pool_forward,
                                                                              ops.norm_relu_pool_backward)
    good = torch.rand(args[0].shape[0], args[0].shape[1])
    ref = fwd(*args, good).clone()
    with pytest.raises(RuntimeError, match=pattern):
        fwd(*args, make_gate(args[0]))
    with pytest.raises(RuntimeError, match=pattern):
        bwd(torch.ones_like(ref), *args, make_gate(args[0]))
    torch.testing.assert_close(fwd(*args, good), ref, rtol=0, atol=0)


def test_gated_reader_refuses_cpu_bf16_input():
    args = _tail_args(False)
    x = args[0].bfloat16()
    with pytest.raises(ValueError, match=r"gate: a gated reader takes float32/float64 CPU input"):
        tail_ops.norm_relu_pool(x, *args[1:5], training=True, gate=torch.rand(2, 5))


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("op", ["channel_moments", "sample_moments"])
@pytest.mark.parametrize("bad,pattern,where", [
    (lambda: torch.zeros(3, 4, 4), r"input: expected a 4-D tensor", FAKE),
    (lambda: torch.zeros(2, 3, 4, 4, dtype=torch.int32), r"input: expected a floating-point dtype", KERNEL),
    (lambda: torch.zeros(0, 3, 4, 4), r"input: expected a non-empty batch", KERNEL),
    (lambda: torch.zeros(2, 3, 0, 4), r"input: expected a non-zero spatial size", KERNEL),
], ids=["3d", "int", "empty", "zero-h"])
def test_channel_moments_rejects(bad, pattern, where, device, op):
    _expect_refusal(lambda: getattr(ops, op)(bad().to(device)), device, RuntimeError, pattern, where)


# ------------------------------------------------------------------------------------------------
# 64-bit sizes: channel counts past the 32-bit BLAS limit are refused before any allocation
# ------------------------------------------------------------------------------------------------
def test_block_beyond_int32_channels_refused_before_allocation():
    # Stride-0 views: 2^31 channels in a few bytes. The kernel would allocate an [N, Ct, H, W] buffer
    # (> 2^31 elements, 8+ GiB) and pass Ct to a 32-bit BLAS; it must refuse first.
    args = _block_op_args(True)
    args[I_INPUT] = torch.zeros(1, 1, 1, 1).expand(1, BIG, 1, 2)
    with pytest.raises(RuntimeError, match=r"input: expected at most 2147483647 channels .*got 2147483648"):
        ops.dense_block_forward(*args)
    # C0 fits, but C0 + L*k does not.
    args[I_INPUT] = torch.zeros(1, 1, 1, 1).expand(1, BIG - 3, 1, 2)
    with pytest.raises(RuntimeError, match=r"block buffer would hold C0 \+ L\*k = 2147483645 \+ 2\*2 channels"):
        ops.dense_block_forward(*args)
    # Still usable.
    ops.dense_block_forward(*_block_op_args(True))


def test_tail_beyond_int32_channels_refused_before_allocation():
    x = torch.zeros(1, 1, 1, 1).expand(1, BIG, 2, 2)
    stat = torch.ones(1).expand(BIG)
    for fn, extra in ((ops.norm_relu_pool_forward, []), (ops.transition_forward, [torch.zeros(1, 1, 1, 1)])):
        with pytest.raises(RuntimeError, match=r"input: expected at most 2147483647 channels"):
            fn(x, stat, stat, stat, stat, *extra, False, 1e-5)
    with pytest.raises(RuntimeError, match=r"input: expected at most 2147483647 channels"):
        ops.channel_moments(x)


def test_block_past_int32_elements_shapes_are_64bit():
    # The kernels index with int64 throughout (only channel counts reach the BLAS, and those are
    # checked above); a real > 2^31-element block needs > 8 GiB, so its shape logic is proven on fake
    # tensors: an output buffer of 2 * 68 * 2048 * 8192 = 2.3e9 elements.
    from torch._subclasses.fake_tensor import FakeTensorMode
    c0 = 64
    with FakeTensorMode():
        e = torch.empty
        layers = range(L)
        buffer, mean, var, mean2, var2 = ops.dense_block_forward(
            e(2, c0, 2048, 8192), [e(c0 + li * K) for li in layers], [e(c0 + li * K) for li in layers],
            [e(INTER, c0 + li * K, 1, 1) for li in layers], [e(INTER) for li in layers], [e(INTER) for li in layers],
            [e(K, INTER, 3, 3) for li in layers], [], [], [], [], None, 0.0, True, 1e-5)
        assert buffer.shape == (2, c0 + L * K, 2048, 8192) and buffer.numel() > 2**31
        assert buffer.is_contiguous(memory_format=torch.channels_last)
        assert mean.shape == (c0 + L * K,) and mean2.shape == (L, INTER)
        out = ops.transition_forward(buffer, mean, var, e(c0 + L * K), e(c0 + L * K), e(3, c0 + L * K, 1, 1),
                                     True, 1e-5)
        assert out.shape == (2, 3, 1024, 4096)


# ------------------------------------------------------------------------------------------------
# modules and models: bad inputs, running stats unchanged, next call right
# ------------------------------------------------------------------------------------------------
def _bn_message(shape) -> str:
    bn = nn.BatchNorm2d(shape[1])
    with pytest.raises(ValueError) as info:
        bn(torch.zeros(shape))
    return str(info.value)


def _small_densenet(**kw) -> dnf.DenseNet:
    torch.manual_seed(0)
    m = dnf.densenet_bc(depth=10, growth_rate=4, num_classes=3, **kw)
    randomize_bn(m)
    return m


MODULE_CASES = [
    # (id, module factory, valid input shape, bad input factory(x), exception, pattern)
    ("block-3d", lambda: _block(), (N, C0, H, W), lambda x: x[0], ValueError, r"input: expected a 4-D tensor with 3"),
    ("block-5d-for-2d-block", lambda: _block(), (N, C0, H, W), lambda x: x[:, :, None], ValueError,
     r"input: expected a 4-D tensor with 3 channels \[N, 3, H, W\], got shape \(2, 3, 1, 4, 4\)"),
    ("block-4d-for-3d-block", lambda: _block(spatial_dims=3), (N, C0, 2, H, W), lambda x: x[:, :, 0], ValueError,
     r"input: expected a 5-D tensor with 3 channels \[N, 3, D, H, W\], got shape \(2, 3, 4, 4\)"),
    ("block-channels", lambda: _block(), (N, C0, H, W), lambda x: x[:, :2], ValueError,
     r"expected a 4-D tensor with 3 channels \[N, 3, H, W\], got shape \(2, 2, 4, 4\)"),
    ("block-int", lambda: _block(), (N, C0, H, W), lambda x: x.long(), RuntimeError,
     r"input: expected a floating-point dtype.*got torch.int64"),
    ("block-complex", lambda: _block(), (N, C0, H, W), lambda x: x.to(torch.complex64), RuntimeError,
     r"input: expected a floating-point dtype.*got torch.complex64"),
    ("block-fp16-no-autocast", lambda: _block(), (N, C0, H, W), lambda x: x.half(), RuntimeError,
     r"input: expected dtype torch.float32 \(the dtype of the module's parameters; use torch.autocast"
     r".*got torch.float16"),
    ("block-bf16-no-autocast", lambda: _block(), (N, C0, H, W), lambda x: x.bfloat16(), RuntimeError,
     r"input: expected dtype torch.float32.*got torch.bfloat16"),
    ("block-dtype-mismatch", lambda: _block(), (N, C0, H, W), lambda x: x.double(), RuntimeError,
     r"input: expected dtype torch.float32.*got torch.float64"),
    ("block-device", lambda: _block(), (N, C0, H, W), lambda x: x.to("meta"), RuntimeError,
     r"input: expected a tensor on cpu \(the device of the module's parameters\), got meta"),
    ("block-zero-height", lambda: _block(), (N, C0, H, W), lambda x: x[:, :, :0], RuntimeError,
     r"input: expected a non-zero spatial size, got H=0"),
    ("block-batch1-1x1", lambda: _block(), (N, C0, H, W), lambda x: x[:1, :, :1, :1], ValueError,
     "^" + re.escape(_bn_message((1, C0, 1, 1))) + "$"),
    ("block-not-a-tensor", lambda: _block(), (N, C0, H, W), lambda x: x.tolist(), TypeError,
     r"input: expected a Tensor, got list"),
    ("transition-channels", lambda: dnf.Transition(5, 3), (N, 5, 4, 4), lambda x: x[:, :4], ValueError,
     r"input: expected 5 channels, got shape \(2, 4, 4, 4\)"),
    ("transition-int", lambda: dnf.Transition(5, 3), (N, 5, 4, 4), lambda x: x.int(), RuntimeError,
     r"Transition: input: expected a floating-point dtype"),
    ("transition-dtype", lambda: dnf.Transition(5, 3), (N, 5, 4, 4), lambda x: x.double(), RuntimeError,
     r"Transition: input: expected dtype torch.float32"),
    ("transition-device", lambda: dnf.Transition(5, 3), (N, 5, 4, 4), lambda x: x.to("meta"), RuntimeError,
     r"Transition: input: expected a tensor on cpu"),
    ("transition-3d", lambda: dnf.Transition(5, 3), (N, 5, 4, 4), lambda x: x[0], ValueError,
     r"expected 4D input \(got 3D input\)"),  # nn.BatchNorm2d's own message (reference path, as torchvision)
    ("transition-1x1", lambda: dnf.Transition(5, 3), (N, 5, 4, 4), lambda x: x[:1, :, :1, :1], ValueError,
     r"Expected more than 1 value per channel when training"),
    ("model-channels", _small_densenet, (N, 3, 8, 8), lambda x: x[:, :2], RuntimeError,
     r"expected input\[2, 2, 8, 8\] to have 3 channels, but got 2 channels"),
    ("model-int", _small_densenet, (N, 3, 8, 8), lambda x: x.long(), RuntimeError, r"Long|long|int64"),
    ("model-dtype", _small_densenet, (N, 3, 8, 8), lambda x: x.double(), RuntimeError, r"[Dd]ouble"),
    ("model-device", _small_densenet, (N, 3, 8, 8), lambda x: x.to("meta"), RuntimeError, r"meta"),
    ("model-batch1-tiny", _small_densenet, (N, 3, 8, 8), lambda x: x[:1, :, :4, :4], ValueError,
     r"^Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 5, 1, 1\]\)$"),
    ("se-model-batch1-tiny", lambda: _small_densenet(se_ratio=0.5), (N, 3, 8, 8), lambda x: x[:1, :, :4, :4],
     ValueError,
     r"^Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 5, 1, 1\]\)$"),
    ("model-pool-too-small", _small_densenet, (N, 3, 8, 8), lambda x: x[:, :, :2, :2], RuntimeError,
     r"too small for its 2x2 average pool"),
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", MODULE_CASES, ids=[c[0] for c in MODULE_CASES])
def test_module_rejects_and_keeps_state(case, training):
    name, factory, shape, make_bad, exc, pattern = case
    if not training and ("1x1" in name or "tiny" in name):
        pytest.skip("a training-only rule (BatchNorm's one-value-per-channel check)")
    module = factory().train(training)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    ref_module = copy.deepcopy(module)
    with torch.no_grad():
        expected = ref_module(x)
    snap = _snapshot(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a reference-path fallback may warn before the error
        with pytest.raises(exc, match=pattern):
            module(make_bad(x))
    _assert_state_unchanged(module, snap)
    with torch.no_grad():
        got = module(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    _assert_state_unchanged(module, _snapshot(ref_module))


def test_block_batch1_message_identical_to_batchnorm():
    b = _block().train()
    with pytest.raises(ValueError) as ours:
        b(torch.zeros(1, C0, 1, 1))
    assert str(ours.value) == _bn_message((1, C0, 1, 1))
    # The operator raises the same type and text.
    args = _block_op_args(True)
    args[I_INPUT] = torch.zeros(1, C0, 1, 1)
    with pytest.raises(ValueError) as op_err:
        ops.dense_block_forward(*args)
    assert str(op_err.value).splitlines()[0] == _bn_message((1, C0, 1, 1))


def test_fused_norm_relu_pool_rejects_without_touching_stats():
    bn = nn.BatchNorm2d(5).train()
    randomize_bn(bn)
    snap = _snapshot(bn)
    with pytest.raises(RuntimeError, match=r"weight: expected dtype"):
        fused_norm_relu_pool(bn, torch.randn(2, 5, 3, 3, dtype=torch.float64))  # stats computed, op refuses
    _assert_state_unchanged(bn, snap)
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        fused_norm_relu_pool(bn, torch.randn(1, 5, 1, 1))
    _assert_state_unchanged(bn, snap)


def test_transition_op_failure_leaves_stats():
    # The transition computes its batch statistics, then its operator refuses the conv weight: the
    # running statistics must not have been updated.
    t = dnf.Transition(5, 3).train()
    with torch.no_grad():
        t.conv.weight = nn.Parameter(torch.randn(3, 4, 1, 1))  # wrong shape: not caught by the module itself
    snap = _snapshot(t)
    with pytest.raises(RuntimeError, match=r"conv_weight: expected shape \[C_out, 5, 1, 1\], got \[3, 4, 1, 1\]"):
        t(torch.randn(2, 5, 4, 4))
    _assert_state_unchanged(t, snap)


def test_block_wrong_weight_shape_named():
    b = _block().train()
    with torch.no_grad():
        b.denselayer2.conv1.weight = nn.Parameter(torch.randn(INTER, C0 + K, 3, 3))
    snap = _snapshot(b)
    with pytest.raises(RuntimeError, match=r"conv1_weight\[1\]: expected shape \[4, 5, 1, 1\], got \[4, 5, 3, 3\]"):
        b(torch.randn(N, C0, H, W))
    _assert_state_unchanged(b, snap)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_matches_torchvision(training):
    torch.manual_seed(0)
    tv = _DenseBlock(L, C0, BN_SIZE, K, 0.0).train(training)
    randomize_bn(tv)
    ours = dnf.DenseBlock(L, C0, BN_SIZE, K).train(training)
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(0, C0, H, W, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty batch is not a slow-path fallback
        y = ours(x)
    y_tv = tv(x)
    assert y.shape == y_tv.shape == (0, CT, H, W)
    y.sum().backward()
    for k, v in tv.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    tr_tv = _Transition(CT, 3).train(training)
    tr = dnf.Transition(CT, 3).train(training)
    tr.load_state_dict(tr_tv.state_dict())
    assert tr(y.detach()).shape == tr_tv(y_tv.detach()).shape == (0, 3, H // 2, W // 2)
    model = _small_densenet().train(training)
    assert model(torch.randn(0, 3, 8, 8)).shape == (0, 3)


# ------------------------------------------------------------------------------------------------
# construction-time range checks
# ------------------------------------------------------------------------------------------------
CTOR_CASES = [
    ("block-layers-0", lambda: dnf.DenseBlock(0, 3, 2, 2), ValueError, r"num_layers: expected an integer >= 1, got 0"),
    ("block-growth-0", lambda: dnf.DenseBlock(2, 3, 2, 0), ValueError, r"growth_rate: expected an integer >= 1, got 0"),
    ("block-growth-neg", lambda: dnf.DenseBlock(2, 3, 2, -4), ValueError, r"growth_rate: .* got -4"),
    ("block-growth-float", lambda: dnf.DenseBlock(2, 3, 2, 2.5), TypeError, r"growth_rate: expected an integer.*2.5"),
    ("block-growth-bool", lambda: dnf.DenseBlock(2, 3, 2, True), TypeError, r"growth_rate: expected an integer"),
    ("block-bn-size-0", lambda: dnf.DenseBlock(2, 3, 0, 2), ValueError, r"bn_size: expected an integer >= 1, got 0"),
    ("block-features-0", lambda: dnf.DenseBlock(2, 0, 2, 2), ValueError, r"num_input_features: .* got 0"),
    ("block-drop-1", lambda: dnf.DenseBlock(2, 3, 2, 2, drop_rate=1.0), ValueError,
     r"drop_rate: expected a value in \[0, 1\), got 1.0"),
    ("block-drop-neg", lambda: dnf.DenseBlock(2, 3, 2, 2, drop_rate=-0.1), ValueError, r"drop_rate: .*-0.1"),
    ("block-drop-nan", lambda: dnf.DenseBlock(2, 3, 2, 2, drop_rate=float("nan")), ValueError, r"drop_rate: .*nan"),
    ("block-drop-str", lambda: dnf.DenseBlock(2, 3, 2, 2, drop_rate="0.1"), TypeError, r"drop_rate: expected a float"),
    ("block-impl", lambda: dnf.DenseBlock(2, 3, 2, 2, impl="cuda"), ValueError, r"impl: expected one of"),
    ("layer-growth-0", lambda: dnf.DenseLayer(3, 0, 2, 0.0), ValueError, r"growth_rate: expected an integer >= 1"),
    ("layer-drop", lambda: dnf.DenseLayer(3, 2, 2, 1.5), ValueError, r"drop_rate: .*1.5"),
    ("transition-out-0", lambda: dnf.Transition(4, 0), ValueError, r"num_output_features: expected an integer >= 1"),
    ("transition-in-float", lambda: dnf.Transition(4.0, 2), TypeError, r"num_input_features: expected an integer"),
    ("net-growth-0", lambda: dnf.DenseNet(growth_rate=0), ValueError, r"growth_rate: expected an integer >= 1, got 0"),
    ("net-bn-size-neg", lambda: dnf.DenseNet(bn_size=-1), ValueError, r"bn_size: .* got -1"),
    ("net-blocks-empty", lambda: dnf.DenseNet(block_config=()), ValueError, r"block_config: expected a non-empty"),
    ("net-blocks-zero", lambda: dnf.DenseNet(block_config=(2, 0)), ValueError, r"block_config\[1\]: .* got 0"),
    ("net-blocks-float", lambda: dnf.DenseNet(block_config=(2, 1.5)), TypeError,
     r"block_config\[1\]: expected an integer"),
    ("net-blocks-int", lambda: dnf.DenseNet(block_config=6), TypeError, r"block_config: expected a sequence"),
    ("net-blocks-str", lambda: dnf.DenseNet(block_config="6"), TypeError, r"block_config: expected a sequence"),
    ("net-drop", lambda: dnf.DenseNet(drop_rate=1.0), ValueError, r"drop_rate: expected a value in \[0, 1\)"),
    ("net-classes-0", lambda: dnf.DenseNet(num_classes=0), ValueError, r"num_classes: expected an integer >= 1"),
    ("net-compression-0", lambda: dnf.DenseNet(compression=0.0), ValueError,
     r"compression: expected a value in \(0, 1\]"),
    ("net-stem", lambda: dnf.DenseNet(stem="vgg"), ValueError, r"stem: expected 'imagenet' or 'cifar'"),
    ("bc-depth", lambda: dnf.densenet_bc(depth=11), ValueError, r"depth: DenseNet-BC needs depth = 6\*n \+ 4"),
    ("bc-growth", lambda: dnf.densenet_bc(growth_rate=0), ValueError, r"growth_rate: expected an integer >= 1"),
]


@pytest.mark.parametrize("case", CTOR_CASES, ids=[c[0] for c in CTOR_CASES])
def test_constructor_rejects(case):
    name, make, exc, pattern = case
    with pytest.raises(exc, match=pattern):
        make()


# ------------------------------------------------------------------------------------------------
# checkpoints: missing / unexpected / wrongly-shaped keys fail like nn.Module.load_state_dict
# ------------------------------------------------------------------------------------------------
def _pair():
    kw = dict(growth_rate=4, block_config=(2, 1), num_init_features=8, bn_size=2, num_classes=3)
    return dnf.DenseNet(**kw), TVDenseNet(**kw)


@pytest.mark.parametrize("edit", ["missing", "unexpected", "shape", "all"])
def test_load_state_dict_errors_match_torch(edit, tmp_path):
    ours, tv = _pair()
    state = copy.deepcopy(tv.state_dict())
    if edit in ("missing", "all"):
        del state["features.denseblock1.denselayer2.norm1.running_var"]
        del state["classifier.bias"]
    if edit in ("unexpected", "all"):
        state["features.denseblock1.denselayer3.conv1.weight"] = torch.zeros(1)
    if edit in ("shape", "all"):
        state["features.transition1.conv.weight"] = torch.zeros(5, 16, 1, 1)
    with pytest.raises(RuntimeError) as expected:
        tv.load_state_dict(copy.deepcopy(state))
    with pytest.raises(RuntimeError) as got:
        ours.load_state_dict(copy.deepcopy(state))
    assert str(got.value) == str(expected.value)
    for key in ("denselayer2.norm1.running_var", "classifier.bias", "denselayer3.conv1.weight",
                "transition1.conv.weight"):
        if (edit == "all") or (key.startswith("denselayer2") or key.startswith("classifier")) == (edit == "missing") \
                and (key.startswith("denselayer3") == (edit == "unexpected")) \
                and (key.startswith("transition1") == (edit == "shape")):
            assert key in str(got.value)
    # Through the factories' weights= argument (state dict and file path): same error.
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    for weights in (copy.deepcopy(state), str(path)):
        fresh, _ = _pair()
        with pytest.raises(RuntimeError) as via_loader:
            dnf.models.densenet.load_weights(fresh, weights)
        assert str(via_loader.value) == str(expected.value)
    # Non-strict loading reports the same keys as torch.
    if edit != "shape" and edit != "all":
        assert ours.load_state_dict(copy.deepcopy(state), strict=False) == tv.load_state_dict(copy.deepcopy(state),
                                                                                               strict=False)


def test_load_state_dict_legacy_keys_still_strict():
    ours, tv = _pair()
    state = tv.state_dict()
    legacy = {k if k.endswith("num_batches_tracked") else k.replace("denselayer1.norm1.", "denselayer1.norm.1."): v
              for k, v in state.items()}
    ours.load_state_dict(copy.deepcopy(legacy))  # remapped, strict, succeeds
    del legacy["features.denseblock1.denselayer1.norm.1.weight"]
    with pytest.raises(RuntimeError,
                       match=r"Missing key\(s\) in state_dict: \"features.denseblock1.denselayer1.norm1.weight\""):
        ours.load_state_dict(legacy)


# ------------------------------------------------------------------------------------------------
# no silent slow path: warn once where the fused path cannot run
# ------------------------------------------------------------------------------------------------
def _fresh_warnings():
    forget("block:")
    forget("transition:")


@pytest.mark.parametrize("setup,reason", [
    (lambda b: setattr(b.denselayer1, "norm2", nn.BatchNorm2d(INTER, affine=False)), "not all affine"),
    (lambda b: setattr(b.denselayer2, "norm1", nn.BatchNorm2d(C0 + K, track_running_stats=False)), "not all affine"),
    (lambda b: b.denselayer2.norm2.eval(), "mixed train/eval"),
    (lambda b: setattr(b.denselayer1.norm1, "eps", 1e-3), "one eps"),
    (lambda b: setattr(b.denselayer2, "drop_rate", 0.2), "different drop rates"),
], ids=["affine-false", "no-running-stats", "mixed-modes", "eps", "drop-rates"])
def test_block_fallback_warns_once(setup, reason):
    _fresh_warnings()
    b = _block().train()
    setup(b)
    x = torch.randn(N, C0, H, W)
    with pytest.warns(RuntimeWarning, match=reason):
        assert not b.can_fuse(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert not b.can_fuse(x)
        b2 = copy.deepcopy(b)
        torch.manual_seed(1)
        y = b(x)
    # The fallback is torchvision's computation on the same children.
    tv = _DenseBlock(L, C0, BN_SIZE, K, 0.0)
    for name, m in b2.named_children():
        tv[name] = m
    torch.manual_seed(1)
    assert torch.equal(y, tv(x))
    for k, v in tv.state_dict().items():
        assert torch.equal(b.state_dict()[k], v), k


def test_frozen_bn_with_dropout_takes_reference_path():
    # model.train() with every BatchNorm frozen (eval) and drop_rate > 0: torchvision applies dropout
    # (the layers train) with running statistics. The fused operator ties both to one flag, so the
    # block must warn and run the reference path rather than silently skip dropout.
    _fresh_warnings()
    b = _block(drop_rate=0.5).train()
    for m in b.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    x = torch.randn(N, C0, H, W)
    with pytest.warns(RuntimeWarning, match="dropout is active"):
        b(x)
    tv = _DenseBlock(L, C0, BN_SIZE, K, 0.5)
    tv.load_state_dict(b.state_dict())
    tv.train()
    for m in tv.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    torch.manual_seed(7)
    y_ours = b(x)
    torch.manual_seed(7)
    torch.testing.assert_close(y_ours, tv(x), rtol=0, atol=0)


def test_transition_fallback_warns_once():
    _fresh_warnings()
    t = dnf.Transition(5, 3)
    t.norm = nn.BatchNorm2d(5, affine=False)
    x = torch.randn(N, 5, 4, 4)
    with pytest.warns(RuntimeWarning, match="Transition: using the reference PyTorch path"):
        t(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t(x)


def test_bf16_model_on_cpu_runs_fused_without_warning():
    """A .bfloat16() block runs the fused bf16 kernel (BN in fp32 inside); accuracy: tests/test_bf16.py."""
    _fresh_warnings()
    torch.manual_seed(0)
    tv = _DenseBlock(L, C0, BN_SIZE, K, 0.0).eval().bfloat16()
    b = dnf.DenseBlock(L, C0, BN_SIZE, K).eval().bfloat16()
    b.load_state_dict(tv.state_dict())
    x = torch.randn(N, C0, H, W).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = b(x)
    ref = tv(x)
    assert y.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=5e-2, atol=5e-2)


def test_autocast_cpu_runs_fused_in_bfloat16():
    _fresh_warnings()
    b = _block().eval()
    x = torch.randn(N, C0, H, W)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = b(x.bfloat16())
    assert y.dtype == torch.bfloat16  # as torchvision's block under the same autocast
    torch.testing.assert_close(y.float(), b(x.bfloat16().float()), rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------------------------------
# aliasing: the operators are functional
# ------------------------------------------------------------------------------------------------
def test_operators_tolerate_aliased_arguments_and_never_write_them():
    args = _block_op_args(False, torch.float64)
    ref = [o.clone() for o in ops.dense_block_forward(*args)]
    # Make the input share storage with a parameter and one parameter serve two roles.
    storage = torch.cat([args[I_INPUT].flatten(), args[I_G1][0]])
    aliased = list(args)
    aliased[I_INPUT] = storage[:args[I_INPUT].numel()].view_as(args[I_INPUT])
    aliased[I_G1] = [storage[args[I_INPUT].numel():]] + list(args[I_G1][1:])
    aliased[I_RV1] = list(aliased[I_RV1])
    aliased[I_RV1][0] = aliased[I_G1][0]  # weight doubles as running_var: both read-only
    ref_rv = [o.clone() for o in ops.dense_block_forward(*[*args[:I_RV1], aliased[I_RV1], *args[I_RV1 + 1:]])]
    before = storage.clone()
    out = ops.dense_block_forward(*aliased)
    assert torch.equal(storage, before), "an operator wrote to its arguments"
    for o, r in zip(out, ref_rv):
        assert torch.equal(o, r)
    inputs = [t for a in aliased if isinstance(a, (list, torch.Tensor)) for t in (a if isinstance(a, list) else [a])]
    for o in out:
        if o.numel():
            assert all(o.untyped_storage().data_ptr() != t.untyped_storage().data_ptr() for t in inputs)
    assert ref[0].shape == out[0].shape


@pytest.mark.parametrize("op,make", [
    ("dense_block_forward", lambda: _block_op_args(True, torch.float64)),
    ("transition_forward", lambda: [t.double() if isinstance(t, torch.Tensor) else t for t in _tail_args(True)]),
    ("norm_relu_pool_forward", lambda: [t.double() if isinstance(t, torch.Tensor) else t for t in _tail_args(False)]),
])
def test_operator_schema_no_mutation_no_alias(op, make):
    # torch.library.opcheck's schema test: no argument mutated, no output aliasing an argument.
    torch.library.opcheck(getattr(ops, op).default, tuple(make()), test_utils=("test_schema",))


# ------------------------------------------------------------------------------------------------
# NaN / Inf propagate as in torchvision (forward and backward, train and eval)
# ------------------------------------------------------------------------------------------------
def _poison(x: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    flat = x.view(-1)
    idx = torch.randperm(flat.numel(), generator=g)[:3]
    flat[idx[0]] = float("nan")
    flat[idx[1]] = float("inf")
    flat[idx[2]] = -float("inf")
    return x


def _same_pattern(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN pattern differs"
    assert torch.equal(a.isposinf(), b.isposinf()), f"{what}: +Inf pattern differs"
    assert torch.equal(a.isneginf(), b.isneginf()), f"{what}: -Inf pattern differs"
    fin = a.isfinite()
    torch.testing.assert_close(a[fin], b[fin], rtol=1e-9, atol=1e-9, msg=what)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("where", ["input", "weight"])
def test_nan_inf_propagate_like_torchvision(training, where, seed):
    torch.manual_seed(seed)
    tv = _DenseBlock(L, C0, BN_SIZE, K, 0.0).double().train(training)
    randomize_bn(tv, seed)
    ours = dnf.DenseBlock(L, C0, BN_SIZE, K).double().train(training)
    x = torch.randn(N, C0, 5, 5, dtype=torch.float64)
    if where == "input":
        x = _poison(x, seed)
    else:
        with torch.no_grad():
            tv.denselayer1.conv2.weight.view(-1)[seed] = float("nan")
            tv.denselayer2.norm1.weight[1 + seed] = float("inf")
    ours.load_state_dict(tv.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = tv(xa), ours(xb)
    _same_pattern(yb, ya, "output")
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    _same_pattern(xb.grad, xa.grad, "input grad")
    for (name, p), (_, q) in zip(tv.named_parameters(), ours.named_parameters()):
        _same_pattern(q.grad, p.grad, f"grad of {name}")
    for (name, p), (_, q) in zip(tv.named_buffers(), ours.named_buffers()):
        if p.is_floating_point():
            _same_pattern(q, p, name)

    # Transition and final norm readers of the poisoned block output.
    tr_tv = _Transition(CT, 3).double().train(training)
    randomize_bn(tr_tv, seed)
    tr = dnf.Transition(CT, 3).double().train(training)
    tr.load_state_dict(tr_tv.state_dict())
    za, zb = ya.detach().clone().requires_grad_(), yb.detach().contiguous().clone().requires_grad_()
    oa, ob = tr_tv(za), tr(zb)
    _same_pattern(ob, oa, "transition output")
    gt = torch.randn_like(oa)
    oa.backward(gt)
    ob.backward(gt)
    _same_pattern(zb.grad, za.grad, "transition input grad")
    for (name, p), (_, q) in zip(tr_tv.named_parameters(), tr.named_parameters()):
        _same_pattern(q.grad, p.grad, f"transition grad of {name}")
    bn_tv = copy.deepcopy(tr_tv.norm)
    bn = copy.deepcopy(tr_tv.norm)
    za.grad = zb.grad = None
    pa = torch.flatten(F.adaptive_avg_pool2d(F.relu(bn_tv(za)), 1), 1)
    pb = fused_norm_relu_pool(bn, zb)
    _same_pattern(pb, pa, "final norm output")
    gp = torch.randn_like(pa)
    pa.backward(gp)
    pb.backward(gp)
    _same_pattern(zb.grad, za.grad, "final norm input grad")
    _same_pattern(bn.weight.grad, bn_tv.weight.grad, "final norm weight grad")
    _same_pattern(bn.running_var, bn_tv.running_var, "final norm running_var")


# ------------------------------------------------------------------------------------------------
# no global mutable state: concurrent inference == serial inference
# ------------------------------------------------------------------------------------------------
def test_concurrent_inference_matches_serial():
    model = _small_densenet().eval()
    inputs = [torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(8)]
    with torch.no_grad():
        serial = [model(x) for x in inputs]
    results = [[None] * len(inputs) for _ in range(4)]
    errors = []

    def worker(t):
        try:
            with torch.no_grad():
                for rep in range(2):
                    for i in range(len(inputs)):
                        j = (i + t) % len(inputs)  # threads work on different inputs at the same time
                        results[t][j] = model(inputs[j])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t in range(4):
        for i, x in enumerate(inputs):
            torch.testing.assert_close(results[t][i], serial[i], rtol=1e-6, atol=1e-6)
