"""densenet_fast.convert: torchvision / timm DenseNets (and timm SE modules) converted in place.

* structure: what is converted, what is left alone (with a warning), shared Parameters/buffers,
  identical ``state_dict`` keys, hooks kept, idempotence;
* parity with the unconverted model: outputs, gradients, running statistics and num_batches_tracked
  over a few SGD steps (float64 where the model is deep, float32 on small ones), eval mode;
* an optimizer built before conversion keeps working;
* save/load (state_dict and whole model) between converted and unconverted models, both ways; deepcopy;
* the fused head reaches the activation memory of densenet_fast's own DenseNet.
"""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from conftest import rel_err
from convert_utils import (
    assert_state_close,
    image_batch,
    pair,
    randomize_bn,
    saved_tensor_bytes,
    timm_small,
    train_steps,
    tv_small,
)
from torch import nn

import densenet_fast as dnf
from densenet_fast.convert import ConversionReport, conversion_report, convert
from densenet_fast.nn import DenseBlock, Transition
from densenet_fast.nn.fused_features import FusedFeatures

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")
from timm.layers import BlurPool2d  # noqa: E402
from timm.models import densenet as timm_densenet  # noqa: E402

# -- structure -----------------------------------------------------------------------------------------


def test_torchvision_structure_and_shared_parameters():
    model = randomize_bn(tv_small())
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    layer = model.features.denseblock1.denselayer1
    out = convert(model)
    assert out is model
    assert isinstance(model, torchvision.models.DenseNet)  # class swapped to a subclass
    assert type(model).__name__ == "FusedTorchvisionDenseNet"
    assert isinstance(model.features, FusedFeatures)
    assert isinstance(model.features.denseblock1, DenseBlock) and isinstance(model.features.denseblock2, DenseBlock)
    assert isinstance(model.features.transition1, Transition)
    assert model.features.denseblock1.denselayer1 is layer  # dense layers are kept as they are
    # same Parameter / buffer objects, same keys in the same order
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(b is buffers[n] for n, b in model.named_buffers())
    assert list(model.state_dict()) == list(ref.state_dict())
    report = conversion_report(model)
    assert isinstance(report, ConversionReport)
    assert report.count("DenseBlock") == 2 and report.count("Transition") == 1 and not report.left_alone
    assert "FusedTorchvisionDenseNet" in str(report)


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_torchvision_full_models_convert_completely(name):
    model = getattr(torchvision.models, name)()
    n_blocks = sum(isinstance(m, torchvision.models.densenet._DenseBlock) for m in model.modules())
    convert(model)
    report = conversion_report(model)
    assert report.count("DenseBlock") == n_blocks == 4 and report.count("Transition") == 3
    assert not report.left_alone and type(model).__name__ == "FusedTorchvisionDenseNet"


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201", "densenet264d",
                                  "densenetblur121d"])
def test_timm_full_models_convert_completely(name):
    model = timm.create_model(name, pretrained=False, num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left alone -> no warning
        convert(model)
    report = conversion_report(model)
    assert report.count("DenseBlock") == 4 and report.count("Transition") == 3, str(report)
    assert not report.left_alone and type(model).__name__ == "FusedTimmDenseNet"
    assert isinstance(model, timm_densenet.DenseNet)


def test_timm_blur_pool_transitions_are_left_alone_and_reported():
    model = randomize_bn(timm_small(aa_layer=BlurPool2d, aa_stem_only=False, block_config=(2, 2, 2)))
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="transition1.*BlurPool2d"):
        convert(model)
    report = conversion_report(model)
    assert report.count("DenseBlock") == 3 and report.count("Transition") == 0
    assert [n for n, _ in report.left_alone] == ["features.transition1", "features.transition2"]
    assert type(model.features.transition1) is timm_densenet.DenseTransition
    train_steps([model, ref], [image_batch(seed=s) for s in range(2)], per_param=False)


def test_non_relu_activation_is_left_alone():
    model = timm_small(act_layer="silu")
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="activation is SiLU"):
        convert(model)
    report = conversion_report(model)
    assert report.count("DenseBlock") == 0 and len(report.left_alone) >= 3
    assert not isinstance(model.features.denseblock1, DenseBlock)
    x = image_batch()
    torch.testing.assert_close(model(x), ref(x))


def test_subclass_overriding_forward_is_left_alone():
    class MyBlock(torchvision.models.densenet._DenseBlock):
        def forward(self, x):
            return super().forward(x) * 1.0

    model = tv_small()
    model.features.denseblock1 = MyBlock(2, 16, 4, 8, 0.0)
    with pytest.warns(UserWarning, match="overrides forward"):
        convert(model)
    assert type(model.features.denseblock1) is MyBlock
    assert isinstance(model.features.denseblock2, DenseBlock)


def test_convert_is_idempotent_and_leaves_densenet_fast_models_alone():
    model = convert(tv_small())
    before = [(n, type(m)) for n, m in model.named_modules()]
    convert(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    ours = dnf.densenet_bc(depth=16, growth_rate=4)
    types = [type(m) for m in ours.modules()]
    convert(ours)
    assert [type(m) for m in ours.modules()] == types
    assert "already a densenet_fast.DenseNet" in str(conversion_report(ours))


def test_convert_not_inplace_and_nested_models_and_bare_blocks():
    model = tv_small()
    copy_ = convert(model, inplace=False)
    assert type(model) is torchvision.models.DenseNet and isinstance(copy_.features, FusedFeatures)
    assert all(p is not q for p, q in zip(model.parameters(), copy_.parameters()))
    # a DenseNet backbone inside a larger model
    wrapper = nn.Sequential(nn.Conv2d(3, 3, 1), tv_small())
    convert(wrapper)
    assert type(wrapper[1]).__name__ == "FusedTorchvisionDenseNet"
    # a bare block: the root itself is replaced, the returned module is the new one
    block = torchvision.models.densenet._DenseBlock(2, 8, 2, 4, 0.0)
    ref = copy.deepcopy(block)
    new = convert(block)
    assert isinstance(new, DenseBlock) and new.denselayer1 is block.denselayer1
    x = torch.randn(2, 8, 6, 6)
    assert rel_err(new(x), ref(x)) < 1e-5
    with pytest.raises(TypeError, match="nn.Module"):
        convert("not a module")


def test_hooks_are_kept_and_still_fire():
    model = randomize_bn(tv_small())
    ref = copy.deepcopy(model)
    seen = []
    h1 = model.features.denseblock2.register_forward_hook(lambda m, i, o: seen.append(("block", o.shape)))
    model.features.norm5.register_forward_hook(lambda m, i, o: seen.append(("norm5", o.shape)))
    convert(model)
    x = image_batch()
    torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-5)
    assert [s[0] for s in seen] == ["block", "norm5"]
    h1.remove()  # the old handle removes the hook from the converted block
    seen.clear()
    model(x)
    assert [s[0] for s in seen] == ["norm5"]


# -- numerical parity ----------------------------------------------------------------------------------


def test_torchvision_training_parity_fp32_small():
    model, ref = pair(tv_small)
    train_steps([model, ref], [image_batch(seed=s) for s in range(3)], per_param=False)
    assert_state_close(model, ref, 1e-4)
    model.eval(), ref.eval()
    x = image_batch(seed=9)
    assert rel_err(model(x), ref(x)) < 1e-4


@pytest.mark.parametrize("kind", ["torchvision", "timm", "timm-deep-stem", "timm-blur-stem", "dropout-eval"])
def test_training_parity_fp64(kind):
    makers = {
        "torchvision": lambda: tv_small(torch.float64, block_config=(3, 2, 2)),
        "timm": lambda: timm_small(torch.float64, block_config=(3, 2, 2)),
        "timm-deep-stem": lambda: timm_small(torch.float64, stem_type="deep_tiered"),  # densenet264d's stem family
        "timm-blur-stem": lambda: timm_small(torch.float64, stem_type="deep", aa_layer=BlurPool2d),  # densenetblur121d
        "dropout-eval": lambda: tv_small(torch.float64, drop_rate=0.2),
    }
    model, ref = pair(makers[kind])
    inputs = [image_batch(dtype=torch.float64, seed=s) for s in range(3)]
    if kind == "dropout-eval":  # dropout masks differ: compare in eval mode (and running stats after train steps)
        for m in (model, ref):
            m.eval()
        assert rel_err(model(inputs[0]), ref(inputs[0])) < 1e-10
        return
    train_steps([model, ref], inputs, tol_out=1e-9, tol_grad=1e-8)
    assert_state_close(model, ref, 1e-9)  # params, running stats; num_batches_tracked exactly
    assert int(model.features.denseblock1.denselayer1.norm1.num_batches_tracked) == 3
    model.eval(), ref.eval()
    assert rel_err(model(inputs[0]), ref(inputs[0])) < 1e-10


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_bn_momentum_variants(momentum):
    model = tv_small(torch.float64)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    model, ref = pair(lambda: model)
    train_steps([model, ref], [image_batch(dtype=torch.float64, seed=s) for s in range(2)], tol_out=1e-9, tol_grad=1e-8)
    assert_state_close(model, ref, 1e-9)


def test_full_densenet121_training_parity_fp64():
    model, ref = pair(lambda: torchvision.models.densenet121(num_classes=10).double())
    # batch 4 at 32x32: block 4 runs at 1x1, so its BN sees 4 values per channel (2 would be ill-conditioned)
    train_steps([model, ref], [image_batch(n=4, dtype=torch.float64, seed=0)], tol_out=1e-9, tol_grad=1e-8)
    assert_state_close(model, ref, 1e-9)


def test_timm_head_variants_and_forward_intermediates():
    # non-average global pool: the class is swapped but forward falls back to timm's head
    model, ref = pair(lambda: timm_small(torch.float64, global_pool="max"))
    train_steps([model, ref], [image_batch(dtype=torch.float64)], tol_out=1e-9, tol_grad=1e-8)
    model, ref = pair(lambda: timm_small(torch.float64))
    x = image_batch(dtype=torch.float64)
    final, inter = model.forward_intermediates(x)
    final_r, inter_r = ref.forward_intermediates(x)
    assert all(rel_err(a, b) < 1e-10 for a, b in zip(inter + [final], inter_r + [final_r]))
    model.reset_classifier(0)
    ref.reset_classifier(0)
    assert rel_err(model(x), ref(x)) < 1e-10
    feats = timm.create_model("densenet121", pretrained=False, features_only=True, out_indices=(1, 2, 3))
    ref = copy.deepcopy(feats).eval()
    convert(feats).eval()
    assert conversion_report(feats).count("DenseBlock") == 3
    with torch.no_grad():
        outs, outs_r = feats(image_batch(size=32)), ref(image_batch(size=32))
    assert all(rel_err(a, b) < 1e-4 for a, b in zip(outs, outs_r))


def test_timm_squeeze_excite_modules_are_converted():
    from timm.layers import SEModule
    SqueezeExcite = pytest.importorskip("densenet_fast.nn.squeeze_excite").SqueezeExcite
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), SEModule(16), nn.ReLU(), nn.Conv2d(16, 24, 3, stride=2),
                          SEModule(24, rd_ratio=0.25), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5)).double()
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    convert(model)
    assert type(model[1]) is SqueezeExcite and type(model[4]) is SqueezeExcite and model[1].fused
    assert conversion_report(model).count("SqueezeExcite") == 2
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == list(ref.state_dict())
    train_steps([model, ref], [image_batch(n=3, size=12, dtype=torch.float64, seed=s) for s in range(2)], tol_out=1e-9,
                tol_grad=1e-8)
    # squeeze_excite=False leaves them alone
    other = convert(copy.deepcopy(ref), squeeze_excite=False)
    assert type(other[1]) is SEModule


def test_converted_reaches_densenet_fast_activation_memory():
    cfg = dict(growth_rate=8, block_config=(3, 3), num_init_features=16, num_classes=5)
    ours = dnf.DenseNet(**cfg)
    tv = torchvision.models.DenseNet(**cfg)
    conv = convert(copy.deepcopy(tv))
    x = image_batch(n=4, size=32)
    b_ours, b_conv, b_tv = (saved_tensor_bytes(m, x) for m in (ours, conv, tv))
    assert b_conv == b_ours, (b_conv, b_ours)
    assert b_conv < 0.6 * b_tv, (b_conv, b_tv)


# -- optimizer continuity, save / load, deepcopy ---------------------------------------------------------


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_optimizer_built_before_conversion_keeps_working(opt_name):
    model = randomize_bn(tv_small(torch.float64))
    ref = copy.deepcopy(model)
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "adam": lambda p: torch.optim.Adam(p, lr=1e-2)}[opt_name]
    opt, opt_ref = make(model.parameters()), make(ref.parameters())
    xs = [image_batch(dtype=torch.float64, seed=s) for s in range(3)]

    def step(m, o, x):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()

    step(model, opt, xs[0])
    step(ref, opt_ref, xs[0])
    convert(model)  # mid-training: optimizer state (momentum / Adam moments) is keyed by the same Parameters
    for x in xs[1:]:
        step(model, opt, x)
        step(ref, opt_ref, x)
    assert_state_close(model, ref, 1e-9)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


def test_save_load_both_ways():
    x = image_batch(seed=3)
    conv = randomize_bn(tv_small())
    convert(conv)
    train_steps([conv], [image_batch(seed=1)])  # non-trivial running stats / num_batches_tracked
    conv.eval()
    expected = conv(x)

    # converted state_dict -> unconverted torchvision model (strict)
    plain = tv_small()
    plain.load_state_dict(_roundtrip(conv.state_dict()), strict=True)
    assert rel_err(plain.eval()(x), expected) < 1e-5
    # whole converted model saved and loaded: still converted, same outputs; its state dict loads into torchvision
    whole = _roundtrip(conv)
    assert type(whole).__name__ == "FusedTorchvisionDenseNet" and isinstance(whole.features, FusedFeatures)
    assert rel_err(whole.eval()(x), expected) < 1e-6
    plain2 = tv_small()
    plain2.load_state_dict(whole.state_dict(), strict=True)
    assert rel_err(plain2.eval()(x), expected) < 1e-5
    # and the other way: unconverted state dict / whole model -> converted
    other = convert(tv_small())
    other.load_state_dict(_roundtrip(plain.state_dict()), strict=True)
    assert rel_err(other.eval()(x), expected) < 1e-5
    whole_plain = convert(_roundtrip(plain))
    assert rel_err(whole_plain.eval()(x), expected) < 1e-5
    # training continues identically after loading
    a, b = convert(_roundtrip(plain)), _roundtrip(plain)
    train_steps([a, b], [image_batch(seed=4)], per_param=False)


def test_save_load_timm():
    conv = convert(randomize_bn(timm_small()))
    x = image_batch()
    whole = _roundtrip(conv)
    plain = timm_small()
    plain.load_state_dict(whole.state_dict(), strict=True)
    for m in (conv, whole, plain):
        m.eval()
    assert rel_err(whole(x), conv(x)) < 1e-6 and rel_err(plain(x), conv(x)) < 1e-5


def test_deepcopy():
    model = convert(randomize_bn(tv_small(torch.float64)))
    clone = copy.deepcopy(model)
    assert type(clone) is type(model) and isinstance(clone.features.denseblock1, DenseBlock)
    assert all(p is not q and torch.equal(p, q) for p, q in zip(model.parameters(), clone.parameters()))
    assert conversion_report(clone) is not None
    ref = copy.deepcopy(clone)
    train_steps([clone, ref], [image_batch(dtype=torch.float64)], tol_out=1e-9, tol_grad=1e-8)
    # the original was not touched by training the clone
    assert int(model.features.norm5.num_batches_tracked) == 0


@pytest.mark.parametrize("family", ["torchvision", "timm"])
def test_sync_batchnorm_models_convert_and_match_without_process_group(family):
    # Without an initialised process group SyncBatchNorm computes plain batch norm: the converted model (plain
    # fused path) must match the unconverted one (the multi-process tests: test_sync_bn.py, test_training_stack.py).
    if family == "torchvision":
        base = tv_small(torch.float64)
        to_sync = nn.SyncBatchNorm.convert_sync_batchnorm
    else:
        from timm.layers import convert_sync_batchnorm as to_sync
        base = timm_small(torch.float64)
    model = to_sync(randomize_bn(base))
    ref = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        convert(model)
        report = conversion_report(model)
        assert report.count("DenseBlock") == 2 and "SyncBatchNorm" in str(report)
        train_steps([model, ref], [image_batch(dtype=torch.float64, seed=s) for s in range(2)], tol_out=1e-10,
                    tol_grad=1e-9)
    assert_state_close(model, ref, 1e-10)
