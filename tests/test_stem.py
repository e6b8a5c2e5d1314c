"""The fused stem operators: ``bn_relu_maxpool`` (2-D and 3-D, CPU C++ kernels) and the 3-D
``conv_bn_relu_maxpool`` (conv0 recomputed in the backward).

* against torch's own modules (BatchNorm2d/3d, ReLU, MaxPool2d/3d, Conv3d; MONAI's stem is these modules)
  in fp64: outputs, every gradient, running statistics and ``num_batches_tracked``, train and eval, odd
  sizes, contiguous and channels_last(_3d) inputs;
* gradcheck on tiny odd volumes, opcheck (fake kernels, autograd registration);
* MONAI 3D through convert() and our densenet121_3d: the stem is fused, conv0's output is not saved;
* bad inputs: clear errors naming the argument.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from conftest import rel_err  # noqa: E402

import densenet_fast as dnf  # noqa: E402
from densenet_fast.models.densenet import DenseNet  # noqa: E402
from densenet_fast.nn.fused_features import fused_conv_stem, fused_stem  # noqa: E402
from densenet_fast.ops import channel_moments  # noqa: E402

OPS = torch.ops.densenet_fast
# (N, C, spatial...): odd sizes, size-1 dimensions, a batch of one
SHAPES_3D = [(2, 3, 5, 4, 7), (1, 4, 3, 6, 5), (3, 2, 1, 3, 2)]
SHAPES_2D = [(2, 3, 9, 8), (1, 5, 7, 3)]


def _bn(cls, c: int, seed: int = 1) -> nn.Module:
    bn = cls(c).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
        bn.bias.copy_(0.3 * torch.randn(c, generator=g, dtype=torch.float64))
        bn.running_mean.copy_(0.2 * torch.randn(c, generator=g, dtype=torch.float64))
        bn.running_var.copy_(0.5 + torch.rand(c, generator=g, dtype=torch.float64))
    return bn


def _layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if not channels_last:
        return x
    return x.contiguous(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)


def _assert_bn_close(ours: nn.Module, ref: nn.Module, tol: float) -> None:
    for name in ("weight", "bias"):
        assert rel_err(getattr(ours, name).grad, getattr(ref, name).grad) <= tol, f"{name} grad"
    for name in ("running_mean", "running_var"):
        assert rel_err(getattr(ours, name), getattr(ref, name)) <= tol, name
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES_3D + SHAPES_2D)
def test_bn_relu_maxpool_matches_torch(shape, channels_last, training):
    three = len(shape) == 5
    ref_bn = _bn(nn.BatchNorm3d if three else nn.BatchNorm2d, shape[1]).train(training)
    our_bn = copy.deepcopy(ref_bn)
    pool = nn.MaxPool3d(3, 2, 1) if three else nn.MaxPool2d(3, 2, 1)
    x = _layout(torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), channels_last)
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yr = pool(F.relu(ref_bn(xr)))
    yo = fused_stem(our_bn, xo)
    assert yo.shape == yr.shape and yo.stride() == yr.stride()
    g = torch.randn(yr.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    yr.backward(g), yo.backward(g)
    assert rel_err(yo, yr) <= 1e-12
    assert rel_err(xo.grad, xr.grad) <= 1e-10
    _assert_bn_close(our_bn, ref_bn, 1e-10)


@pytest.mark.parametrize("backward", ["batch", "sample"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("stride,padding", [(2, 3), (1, 1)])
@pytest.mark.parametrize("shape", [(2, 1, 9, 7, 11), (1, 2, 6, 5, 3), (3, 2, 5, 6, 7)])
def test_conv_stem_matches_torch(shape, stride, padding, training, backward, monkeypatch):
    """MONAI's stem (Conv3d k7 s2 p3, BatchNorm3d, ReLU, MaxPool3d 3/2/1) vs the fused operator, with either
    backward (the whole batch at once, or sample by sample)."""
    import densenet_fast.ops.stem as stem_ops
    monkeypatch.setattr(stem_ops, "CONV_STEM_BACKWARD", backward)
    k = 2 * padding + 1
    conv_ref = nn.Conv3d(shape[1], 4, k, stride, padding, bias=False).double()
    ref_bn = _bn(nn.BatchNorm3d, 4).train(training)
    conv, our_bn = copy.deepcopy(conv_ref), copy.deepcopy(ref_bn)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yr = F.max_pool3d(F.relu(ref_bn(conv_ref(xr))), 3, 2, 1)
    yo = fused_conv_stem(conv, our_bn, xo)
    g = torch.randn(yr.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    yr.backward(g), yo.backward(g)
    assert rel_err(yo, yr) <= 1e-12
    assert rel_err(xo.grad, xr.grad) <= 1e-10
    assert rel_err(conv.weight.grad, conv_ref.weight.grad) <= 1e-10
    _assert_bn_close(our_bn, ref_bn, 1e-10)


def _moments(x: torch.Tensor):
    dims = [0] + list(range(2, x.dim()))
    return x.mean(dims), x.var(dims, unbiased=False)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(2, 2, 3, 5, 4), (1, 3, 5, 3)])
def test_bn_relu_maxpool_gradcheck(shape, training):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, dtype=torch.float64, generator=g, requires_grad=True)
    w = (0.5 + torch.rand(shape[1], dtype=torch.float64, generator=g)).requires_grad_(True)
    b = (0.3 * torch.randn(shape[1], dtype=torch.float64, generator=g)).requires_grad_(True)
    rm, rv = 0.1 * torch.randn(shape[1], dtype=torch.float64), 0.5 + torch.rand(shape[1], dtype=torch.float64)

    def f(x, w, b):  # training: the statistics are those of x (the operator's contract)
        mean, var = _moments(x) if training else (rm, rv)
        return OPS.bn_relu_maxpool(x, mean, var, w, b, training, 1e-5)

    assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backward", ["batch", "sample"])
@pytest.mark.parametrize("training", [True, False])
def test_conv_stem_gradcheck(training, backward, monkeypatch):
    import densenet_fast.ops.stem as stem_ops
    monkeypatch.setattr(stem_ops, "CONV_STEM_BACKWARD", backward)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 1, 5, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    cw = torch.randn(3, 1, 3, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = (0.5 + torch.rand(3, dtype=torch.float64, generator=g)).requires_grad_(True)
    b = (0.3 * torch.randn(3, dtype=torch.float64, generator=g)).requires_grad_(True)
    rm, rv = 0.1 * torch.randn(3, dtype=torch.float64), 0.5 + torch.rand(3, dtype=torch.float64)

    def f(x, cw, w, b):
        return OPS.conv_bn_relu_maxpool(x, cw, [2, 1, 2], [1, 1, 1], rm, rv, w, b, training, 1e-5)[0]

    assert torch.autograd.gradcheck(f, (x, cw, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 3), (2, 1, 5, 4, 3), (2, 3, 6, 7)])
def test_stem_opcheck(shape, channels_last):
    x = _layout(torch.randn(shape), channels_last).requires_grad_(True)
    mean, var = channel_moments(x.detach())
    w, b = torch.rand(shape[1], requires_grad=True), torch.randn(shape[1], requires_grad=True)
    for training in (True, False):
        torch.library.opcheck(OPS.bn_relu_maxpool.default, (x, mean, var, w, b, training, 1e-5))
    if len(shape) == 5:
        cw = torch.randn(4, shape[1], 3, 3, 3, requires_grad=True)
        rm, rv = torch.zeros(4), torch.ones(4)
        w4, b4 = torch.rand(4, requires_grad=True), torch.randn(4, requires_grad=True)
        for training in (True, False):
            torch.library.opcheck(OPS.conv_bn_relu_maxpool.default,
                                  (x, cw, [2, 2, 2], [1, 1, 1], rm, rv, w4, b4, training, 1e-5))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("channels", [1, 3])
def test_conv_stem_runs_channels_last(channels, channels_last):
    """conv0 runs on the image in channels_last_3d, so the stem's output (the first dense block's input) is
    channels_last_3d whatever the image's layout (the stem kernels vectorise over channels there, and the block
    copies it without a transpose), and a one-channel contiguous image is saved as it is (a view, no copy).
    float32: oneDNN follows the input's layout (ATen's float64 conv3d answers contiguous, as its fake does)."""
    dtype = torch.float32
    g = torch.Generator().manual_seed(6)
    x = _layout(torch.randn(2, channels, 9, 8, 7, dtype=dtype, generator=g), channels_last)
    cw = torch.randn(4, channels, 3, 3, 3, dtype=dtype, generator=g, requires_grad=True)
    w, b = torch.rand(4, dtype=dtype, requires_grad=True), torch.randn(4, dtype=dtype, requires_grad=True)
    rm, rv = torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype)
    saved = _saved_storages(lambda: OPS.conv_bn_relu_maxpool(x, cw, [2, 2, 2], [1, 1, 1], rm, rv, w, b, True, 1e-5))
    out = OPS.conv_bn_relu_maxpool(x, cw, [2, 2, 2], [1, 1, 1], rm, rv, w, b, True, 1e-5)[0]
    assert out.shape == (2, 4, 3, 2, 2)
    assert out.is_contiguous(memory_format=torch.channels_last_3d) and not out.is_contiguous(), out.stride()
    assert x.untyped_storage().data_ptr() in saved  # the image itself, not a copy
    out.backward(torch.randn(out.shape, dtype=dtype, generator=g))
    assert cw.grad is not None and torch.isfinite(cw.grad).all()


@pytest.mark.parametrize("build", ["convert", "ours"])
def test_2d_conv0_answers_channels_last_and_saves_the_image(build):
    """Before a fused 2-D stem conv0 runs with its weight in channels_last: its output (saved by the stem) is
    channels_last for a contiguous image, and the image itself is what conv0 saves (no channels_last copy)."""
    tv = pytest.importorskip("torchvision")
    kw = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
    model = dnf.convert(tv.models.DenseNet(**kw)) if build == "convert" else DenseNet(**kw)
    x = torch.randn(2, 3, 33, 31)
    saved = {}

    def pack(t):
        saved.setdefault(tuple(t.shape), []).append((t.untyped_storage().data_ptr(), t.stride()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    conv0_out = torch.empty(2, 8, 17, 16).contiguous(memory_format=torch.channels_last)
    assert (x.untyped_storage().data_ptr(), x.stride()) in saved[tuple(x.shape)]
    assert [st for _, st in saved[tuple(conv0_out.shape)]] == [conv0_out.stride()]


def _saved_storages(fn) -> dict:
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return seen


@pytest.mark.parametrize("build", ["convert", "densenet121_3d"])
def test_monai_3d_stem_fused_saves_no_conv0_output(build):
    monai_nets = pytest.importorskip("monai.networks.nets")
    kw = dict(spatial_dims=3, in_channels=1, out_channels=2, init_features=8, growth_rate=4, block_config=(2, 2))
    monai = monai_nets.DenseNet121(**kw)
    model = dnf.convert(copy.deepcopy(monai)) if build == "convert" else dnf.densenet121_3d(**kw)
    model.load_state_dict(monai.state_dict())
    x = torch.randn(2, 1, 17, 15, 13)
    conv0_out = (2, 8, 9, 8, 7)
    ours = _saved_storages(lambda: model(x))
    theirs = _saved_storages(lambda: monai(x))
    assert conv0_out in {s for s, _ in theirs.values()}  # MONAI keeps it (and its ReLU output, and indices)
    assert conv0_out not in {s for s, _ in ours.values()}
    out = model(x)
    names, stack, seen = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(f for f, _ in node.next_functions)
    assert any("conv_bn_relu_maxpool" in n for n in names), sorted(names)
    assert not any(n.startswith(("MaxPool3D", "NativeBatchNorm", "Convolution")) for n in names), sorted(names)


def test_stem_bad_inputs():
    x = torch.randn(2, 3, 5, 5, 5)
    m, v, w, b = torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"input: expected a 4-D tensor \[N, C, H, W\] or a 5-D tensor"):
        OPS.bn_relu_maxpool(torch.randn(2, 3, 5), m[:3], v, w, b, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"mean: expected shape \[3\], got \[4\]"):
        OPS.bn_relu_maxpool(x, torch.zeros(4), v, w, b, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"weight: expected dtype Float .*, got Double"):
        OPS.bn_relu_maxpool(x, m, v, w.double(), b, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"eps: expected a positive value, got 0"):
        OPS.bn_relu_maxpool(x, m, v, w, b, True, 0.0)
    with pytest.raises(RuntimeError, match=r"input: expected dtype float32, float64 or bfloat16 on CPU, got Half"):
        OPS.bn_relu_maxpool(x.half(), m, v, w, b, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"grad_output: expected shape \[2, 3, 3, 3, 3\], got \[2, 3, 3, 3\]"):
        OPS.bn_relu_maxpool_backward(torch.randn(2, 3, 3, 3), x, m, v, w, b, True, 1e-5)
    cw = torch.randn(4, 3, 3, 3)  # a 2-D weight for a 3-D input
    with pytest.raises(RuntimeError, match=r"conv_weight: expected a 5-D weight \[C_out, 3, k\.\.\.\]"):
        OPS.conv_bn_relu_maxpool(x, cw, [2, 2, 2], [1, 1, 1], m, v, w, b, True, 1e-5)
    with pytest.raises(RuntimeError, match=r"stride/padding: expected 3 values each"):
        OPS.conv_bn_relu_maxpool(x, torch.randn(4, 3, 3, 3, 3), [2, 2], [1, 1, 1], m, v, w, b, True, 1e-5)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        OPS.conv_bn_relu_maxpool(torch.randn(1, 3, 1, 1, 1), torch.randn(4, 3, 1, 1, 1), [1, 1, 1], [0, 0, 0],
                                 m, v, torch.ones(4), torch.zeros(4), True, 1e-5)
