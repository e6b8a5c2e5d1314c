"""SE-DenseNet (se_densenet121/169/201, densenet_bc(se_ratio=...)): parity, fusion, shapes, arguments, state dicts.

The reference is assembled from torchvision's ``_DenseBlock``/``_DenseLayer``/``_Transition`` and timm's
``SEModule`` in the same order, loaded with our model's ``state_dict`` (strict), so it shares nothing
with our blocks, transitions or SE operator. Configurations are tiny: the whole file runs in seconds
on a CPU.
"""
from __future__ import annotations

import copy
import io
import re
import sys
import warnings
from collections import Counter, OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

from conftest import rel_err  # noqa: E402

import densenet_fast.models as dn  # noqa: E402
from densenet_fast.models.se_densenet import (  # noqa: E402
    SEDenseBlock,
    SEDenseLayer,
    SEDenseNet,
    se_densenet121,
    se_densenet169,
    se_densenet201,
)
from densenet_fast.nn import fused_features  # noqa: E402
from densenet_fast.nn import squeeze_excite as se_module  # noqa: E402
from densenet_fast.nn.dense_block import DenseBlock, DenseLayer, Transition  # noqa: E402
from densenet_fast.nn.squeeze_excite import SqueezeExcite  # noqa: E402
from densenet_fast.ops import squeeze_excite as se_ops  # noqa: E402

tvd = pytest.importorskip("torchvision.models.densenet")
SEModule = pytest.importorskip("timm.layers.squeeze_excite").SEModule


@pytest.fixture(autouse=True)
def _setup(monkeypatch):
    monkeypatch.setenv(se_ops.BACKEND_ENV, "auto")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: OpenMP threads only spin (4x slower on a shared 2-core box)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the "layer" placement rule warning
            yield
    finally:
        torch.set_num_threads(threads)


# --- reference: torchvision dense parts + timm SEModule -------------------------------------------
class TVSELayer(tvd._DenseLayer):
    """torchvision's _DenseLayer with a timm SEModule on its new features, before the dropout."""

    def __init__(self, num_input_features, growth_rate, bn_size, drop_rate, rd_channels):
        super().__init__(num_input_features, growth_rate, bn_size, drop_rate)
        self.se = SEModule(growth_rate, rd_channels=rd_channels)

    def forward(self, input):
        prev = [input] if isinstance(input, Tensor) else input
        new = self.se(self.conv2(self.relu2(self.norm2(self.bn_function(prev)))))
        if self.drop_rate > 0:
            new = F.dropout(new, p=self.drop_rate, training=self.training)
        return new


class Reference(nn.Module):
    def __init__(self, features: nn.Sequential, classifier: nn.Linear):
        super().__init__()
        self.features, self.classifier = features, classifier

    def forward(self, x):  # torchvision DenseNet.forward
        out = F.adaptive_avg_pool2d(F.relu(self.features(x)), (1, 1))
        return self.classifier(torch.flatten(out, 1))


def build_reference(model: SEDenseNet) -> Reference:
    children = OrderedDict()
    for name, m in model.features.named_children():
        if isinstance(m, DenseBlock):
            layers = list(m.values())
            k, c0 = layers[0].conv2.out_channels, layers[0].norm1.num_features
            bn_size = layers[0].conv1.out_channels // k
            ref = tvd._DenseBlock(len(layers), c0, bn_size, k, layers[0].drop_rate)
            for i, layer in enumerate(layers):
                if isinstance(layer, SEDenseLayer):
                    ref[f"denselayer{i + 1}"] = TVSELayer(c0 + i * k, k, bn_size, layer.drop_rate,
                                                          layer.se.fc1.out_channels)
        elif isinstance(m, Transition):
            ref = tvd._Transition(m.norm.num_features, m.conv.out_channels)
        elif isinstance(m, SqueezeExcite):
            ref = SEModule(m.fc1.in_channels, rd_channels=m.fc1.out_channels)
        else:
            ref = copy.deepcopy(m)
        children[name] = ref
    ref = Reference(nn.Sequential(children), copy.deepcopy(model.classifier))
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.to(next(model.parameters()).dtype)


# --- helpers ---------------------------------------------------------------------------------------
CONFIGS = {
    # imagenet stem (7x7/2 conv, max-pool), two blocks; input 16x16 -> blocks at 4x4 and 2x2
    "imagenet": (lambda **kw: SEDenseNet(4, (2, 2), 8, 2, num_classes=5, **kw), (2, 3, 16, 16)),
    # CIFAR DenseNet-BC-16 (three blocks of 2 layers), k=4; input 8x8 -> blocks at 8x8, 4x4, 2x2
    "bc16": (lambda **kw: dn.densenet_bc(16, 4, num_classes=5, bn_size=2, **kw), (2, 3, 8, 8)),
}


def make(config: str, dtype=torch.float64, **kwargs) -> nn.Module:
    build, shape = CONFIGS[config]
    kwargs.setdefault("se_ratio", 0.25)
    model = build(**kwargs)
    with torch.no_grad():  # non-trivial BN affine parameters and SE weights, so every term matters
        for name, p in model.named_parameters():
            if ".se" in name or ".norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name.endswith("norm1.weight") else 0.0))
    return model.to(dtype)


def step(model: nn.Module, x: Tensor, dy: Tensor):
    """(output, input grad, {param: grad}) of one training forward + backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = model(x)
    y.backward(dy)
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}


def assert_close(a: Tensor, b: Tensor, tol: float, what: str) -> None:
    assert a is not None and b is not None, f"{what}: missing gradient"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = rel_err(a, b)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def compare(model: nn.Module, ref: nn.Module, shape, dtype, tol: float, steps: int = 2) -> None:
    for s in range(steps):  # second step: running stats already moved, num_batches_tracked = 2
        x = torch.randn(shape, dtype=dtype)
        dy = torch.randn(shape[0], model.classifier.out_features, dtype=dtype)
        torch.manual_seed(100 + s)
        y, dx, grads = step(model, x, dy)
        torch.manual_seed(100 + s)
        y_ref, dx_ref, grads_ref = step(ref, x, dy)
        assert_close(y, y_ref, tol, f"step {s}: output")
        assert_close(dx, dx_ref, tol, f"step {s}: input grad")
        assert grads.keys() == grads_ref.keys()
        for name in grads:
            assert_close(grads[name], grads_ref[name], tol, f"step {s}: grad of {name}")
    buffers, buffers_ref = dict(model.named_buffers()), dict(ref.named_buffers())
    assert buffers.keys() == buffers_ref.keys()
    for name, b in buffers.items():
        if name.endswith("num_batches_tracked"):
            assert b.item() == buffers_ref[name].item() == steps, name
        else:
            assert_close(b, buffers_ref[name], tol, f"buffer {name}")
    model.eval(), ref.eval()
    x = torch.randn(shape, dtype=dtype)
    with torch.no_grad():
        assert_close(model(x), ref(x), tol, "eval output")


# --- parity ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["block", "layer"])
@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
def test_parity_with_torchvision_and_timm(config, placement, dtype, tol):
    model = make(config, dtype, se_placement=placement)
    compare(model, build_reference(model), CONFIGS[config][1], dtype, tol)


@pytest.mark.parametrize("placement", ["block", "layer"])
def test_reference_impl_parity(placement):
    model = make("bc16", se_placement=placement, impl="reference")
    compare(model, build_reference(model), CONFIGS["bc16"][1], torch.float64, 1e-10)


def test_layer_placement_dropout_parity():
    """SE before dropout; same RNG stream on both sides, so the masks match. impl="reference": the fused
    transitions return channels_last tensors, and dropout draws its mask in memory order."""
    model = make("bc16", se_placement="layer", drop_rate=0.25, impl="reference")
    compare(model, build_reference(model), CONFIGS["bc16"][1], torch.float64, 1e-10)


def test_layer_se_runs_before_dropout():
    layer = SEDenseLayer(8, 4, 2, drop_rate=0.5, se_ratio=0.5).double().train()
    seen = []
    layer.se.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    torch.manual_seed(0)
    layer(torch.randn(2, 8, 3, 3, dtype=torch.float64))
    assert (seen[0] != 0).all()  # the SE saw the un-dropped features


# --- fusion ----------------------------------------------------------------------------------------
def _spy(monkeypatch, calls: Counter, owner, name: str, key: str) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls[key] += 1
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("placement", ["block", "layer"])
def test_what_runs_fused(monkeypatch, placement, training):
    model = make("bc16", torch.float32, se_placement=placement).train(training)
    calls = Counter()
    _spy(monkeypatch, calls, DenseBlock, "fused_forward", "block")
    _spy(monkeypatch, calls, DenseLayer, "forward", "layer")
    if "forward" in vars(SEDenseLayer):  # SEDenseLayer may inherit DenseLayer.forward (spied above)
        _spy(monkeypatch, calls, SEDenseLayer, "forward", "layer")
    _spy(monkeypatch, calls, Transition, "fused_forward", "transition")
    _spy(monkeypatch, calls, nn.Sequential, "forward", "unfused transition")
    _spy(monkeypatch, calls, fused_features, "fused_norm_relu_pool", "final norm")
    _spy(monkeypatch, calls, nn.BatchNorm2d, "forward", "plain BN")
    _spy(monkeypatch, calls, se_module, "se_gate", "se")
    _spy(monkeypatch, calls, SqueezeExcite, "gate_of", "folded se")
    y = model(torch.randn(2, 3, 8, 8))
    if training:
        y.sum().backward()
    assert all(m.fused for m in model.modules() if isinstance(m, SqueezeExcite))
    if placement == "block":  # every SE folded into the transition / final norm after it (no gated tensor)
        assert calls == Counter({"block": 3, "folded se": 3, "transition": 2, "final norm": 1})
    else:  # per-layer path: 3 blocks x 2 layers, each layer's BNs run as nn.BatchNorm2d
        assert calls == Counter({"layer": 6, "se": 6, "plain BN": 12, "transition": 2, "final norm": 1})


@pytest.mark.parametrize("placement", ["block", "layer"])
def test_compile_fullgraph(placement):
    """Dynamo traces the whole model (fused block, SE, transition, final-norm operators) without breaks."""
    model = make("bc16", torch.float32, se_placement=placement)
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for training in (True, False):
        model.train(training)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


def test_layer_placement_warns_once(monkeypatch):
    from densenet_fast._warn import forget
    forget("se-densenet:")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        model = make("bc16", se_placement="layer")
        make("bc16", se_placement="layer")
        model(torch.randn(2, 3, 8, 8, dtype=torch.float64))
        make("bc16", se_placement="block")
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "se_placement='layer'" in msgs[0] and "reference" in msgs[0], msgs
    from densenet_fast._warn import forget
    forget("se-densenet:")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        make("bc16", se_placement="layer", impl="reference")  # asked for the reference path: no warning
    assert not [w for w in rec if issubclass(w.category, RuntimeWarning)]


def test_layer_placement_blocks_never_fuse():
    model = make("bc16", se_placement="layer").set_impl("fused")
    blocks = [m for m in model.modules() if isinstance(m, DenseBlock)]
    assert len(blocks) == 3 and all(isinstance(b, SEDenseBlock) for b in blocks)
    assert not any(b.can_fuse(torch.randn(2, b.denselayer1.norm1.num_features, 4, 4, dtype=torch.float64))
                   for b in blocks)


# --- shapes and structure --------------------------------------------------------------------------
def test_se_densenet121_shapes():
    model = se_densenet121(num_classes=10)
    se = {n: m for n, m in model.features.named_children() if isinstance(m, SqueezeExcite)}
    assert list(se) == ["se1", "se2", "se3", "se4"]
    assert [m.fc1.in_channels for m in se.values()] == [256, 512, 1024, 1024]
    assert [m.fc1.out_channels for m in se.values()] == [16, 32, 64, 64]
    names = [n for n, _ in model.features.named_children()]
    assert names[4:] == ["denseblock1", "se1", "transition1", "denseblock2", "se2", "transition2",
                         "denseblock3", "se3", "transition3", "denseblock4", "se4", "norm5"]
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    assert y.shape == (2, 10)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        feats = model.features(x)
    assert feats.shape == (2, 1024, 2, 2)


@pytest.mark.parametrize("factory,widths", [(se_densenet169, [256, 512, 1280, 1664]),
                                            (se_densenet201, [256, 512, 1792, 1920])])
def test_se_densenet169_201_structure(factory, widths):
    with torch.device("meta"):
        model = factory()
    se = [m for m in model.features.children() if isinstance(m, SqueezeExcite)]
    assert [m.fc1.in_channels for m in se] == widths
    assert model.classifier.in_features == widths[-1] and model.classifier.out_features == 1000


def test_layer_placement_structure():
    with torch.device("meta"):
        model = se_densenet121(se_placement="layer", se_ratio=0.25)
    layers = [m for m in model.modules() if isinstance(m, DenseLayer)]
    assert len(layers) == 58 and all(isinstance(m, SEDenseLayer) for m in layers)
    assert {(m.se.fc1.in_channels, m.se.fc1.out_channels) for m in layers} == {(32, 8)}
    assert not any(isinstance(m, SqueezeExcite) for m in model.features.children())
    assert "features.denseblock4.denselayer16.se.fc2.bias" in model.state_dict()


def test_densenet_bc_without_se_is_plain():
    model = dn.densenet_bc(16, 4)
    assert type(model) is dn.DenseNet
    assert not any(isinstance(m, SqueezeExcite) for m in model.modules())
    model = dn.densenet_bc(16, 4, se_ratio=0.5)
    assert type(model) is SEDenseNet and model.se_ratio == 0.5 and model.se_placement == "block"


# --- bad arguments ---------------------------------------------------------------------------------
BAD_RATIOS = [0, 0.0, -0.25, 1.5, 2, float("nan"), float("inf"), True, "0.25", None]


RATIO_BUILDERS = {
    "se_densenet121": lambda **kw: se_densenet121(**kw),
    "se_densenet201": lambda **kw: se_densenet201(**kw),
    "SEDenseNet": lambda **kw: SEDenseNet(4, (2,), 8, **kw),
    "SEDenseBlock": lambda **kw: SEDenseBlock(2, 8, 2, 4, **kw),
    "SEDenseLayer": lambda **kw: SEDenseLayer(8, 4, 2, 0.0, **kw),
    "densenet_bc": lambda **kw: dn.densenet_bc(16, 4, **kw),
}


@pytest.mark.parametrize("se_ratio", BAD_RATIOS, ids=repr)
@pytest.mark.parametrize("build", sorted(RATIO_BUILDERS))
def test_bad_se_ratio(build, se_ratio):
    if se_ratio is None and build == "densenet_bc":
        pytest.skip("densenet_bc: se_ratio=None means no SE")
    with pytest.raises(ValueError, match=r"se_ratio: expected a number in \(0, 1\].*got " + re.escape(repr(se_ratio))):
        RATIO_BUILDERS[build](se_ratio=se_ratio)


PLACEMENT_BUILDERS = {
    "se_densenet121": lambda **kw: se_densenet121(**kw),
    "SEDenseNet": lambda **kw: SEDenseNet(4, (2,), 8, **kw),
    "densenet_bc": lambda **kw: dn.densenet_bc(16, 4, se_ratio=0.5, **kw),
    "densenet_bc-no-se": lambda **kw: dn.densenet_bc(16, 4, **kw),  # validated even without SE
}


@pytest.mark.parametrize("se_placement", ["blocks", "Layer", "", None, 1])
@pytest.mark.parametrize("build", sorted(PLACEMENT_BUILDERS))
def test_bad_se_placement(build, se_placement):
    with pytest.raises(ValueError, match=r"se_placement: expected one of \('block', 'layer'\), got "
                                         + re.escape(repr(se_placement))):
        PLACEMENT_BUILDERS[build](se_placement=se_placement)


def test_densenet_bc_keeps_its_checks():
    with pytest.raises(ValueError, match="depth"):
        dn.densenet_bc(15, 4, se_ratio=0.5)


# --- state dicts -----------------------------------------------------------------------------------
@pytest.mark.parametrize("placement", ["block", "layer"])
def test_state_dict_round_trip(tmp_path, placement):
    model = make("bc16", torch.float32, se_placement=placement)
    step(model, torch.randn(2, 3, 8, 8), torch.randn(2, 5))  # move the running stats
    state = model.state_dict()
    key = "features.se1.fc1.weight" if placement == "block" else "features.denseblock1.denselayer1.se.fc1.weight"
    assert key in state
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    path = tmp_path / "se.pt"
    torch.save(state, path)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    for weights in (loaded, path, str(path)):
        clone = dn.densenet_bc(16, 4, num_classes=5, bn_size=2, se_ratio=0.25, se_placement=placement,
                               weights=weights).eval()
        for k, v in clone.state_dict().items():
            assert torch.equal(v, state[k]), k
        with torch.no_grad():
            assert torch.equal(clone(x), expected)
    other = "layer" if placement == "block" else "block"
    with pytest.raises(RuntimeError, match="se"):  # strict: the other placement's keys don't match
        dn.densenet_bc(16, 4, num_classes=5, bn_size=2, se_ratio=0.25, se_placement=other, weights=loaded)


def test_plain_densenet_weights_load_non_strict():
    plain = dn.densenet_bc(16, 4, num_classes=5)
    model = dn.densenet_bc(16, 4, num_classes=5, se_ratio=0.5)
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith("features.se") for k in result.missing_keys)
