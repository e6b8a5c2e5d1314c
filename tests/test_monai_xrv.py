"""convert() on MONAI DenseNets (2D and 3D) and torchxrayvision's chest X-ray DenseNet.

* structure: concatenating blocks -> ConcatDenseBlock, transitions -> Transition, the head fused
  (class swapped to a subclass: ``isinstance`` holds), same Parameters/buffers and ``state_dict`` keys;
* fp64 parity with the unconverted model: outputs and every gradient over 2 SGD steps in training,
  then running statistics / ``num_batches_tracked`` and eval outputs;
* MONAI ``act``/``norm`` options: BN + ReLU variants are converted (LeakyReLU / PReLU: tests/test_leaky_act.py),
  anything else is left alone and reported;
* a model holding dense-block-like modules of unknown classes: nothing converted -> a warning that says why.

MONAI and torchxrayvision are in the ``test`` extra; the tests skip only if the import fails.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import rel_err
from convert_utils import assert_state_close, randomize_bn, train_steps
from torch import nn

from densenet_fast.convert import conversion_report, convert
from densenet_fast.nn import Transition
from densenet_fast.nn.concat_block import ConcatDenseBlock
from densenet_fast.nn.fused_features import FusedFeatures

monai_nets = pytest.importorskip("monai.networks.nets")
xrv = pytest.importorskip("torchxrayvision")

SMALL = dict(init_features=8, growth_rate=4, block_config=(2, 3), bn_size=2)
# Odd spatial sizes: the transitions' floor-mode pools drop a row/column/slice.
SHAPES = {2: (2, 2, 29, 35), 3: (2, 1, 13, 15, 17)}


def monai_small(spatial_dims: int, cls=None, **kw) -> nn.Module:
    cls = cls or monai_nets.DenseNet121
    args = dict(spatial_dims=spatial_dims, in_channels=SHAPES[spatial_dims][1], out_channels=3, **SMALL)
    args.update(kw)
    return cls(**args)


def xrv_small(**kw) -> nn.Module:
    args = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5, weights=None)
    args.update(kw)
    return xrv.models.DenseNet(**args)


def _inputs(shape, n=2, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(n)]


def _assert_every_grad_close(model: nn.Module, ref: nn.Module, tol: float) -> None:
    """Every parameter's gradient within ``tol`` relative to its own magnitude, floored at 1e-6 of the model's
    largest gradient: the stem norm's gradients nearly cancel (every reader of its output is a training-mode
    BatchNorm, so they are ~1e-16 after an SGD step) and are then compared at that floor."""
    pairs = [(n, p.grad, q.grad) for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters())]
    assert all((a is None) == (b is None) for _, a, b in pairs)
    top = max(b.abs().max().item() for _, _, b in pairs if b is not None)
    for n, a, b in pairs:
        if b is not None:
            err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6 * top)
            assert err <= tol, f"grad {n}: relative error {err:.3e} > {tol:.1e}"


def _train_steps(models, inputs, tol: float, lr: float = 0.05) -> None:
    """convert_utils.train_steps with every gradient checked by _assert_every_grad_close."""
    train_steps(models, inputs, lr=lr, tol_out=tol,
                grad_check=lambda model, ref: _assert_every_grad_close(model, ref, tol))


def _check_parity(model: nn.Module, shape, tol: float = 1e-9) -> None:
    model = randomize_bn(model).double()
    ref = copy.deepcopy(model)
    params = {n: p for n, p in model.named_parameters()}
    convert(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == list(ref.state_dict())
    _train_steps([model, ref], _inputs(shape), tol)
    assert_state_close(model, ref, tol)  # running statistics, num_batches_tracked (exact), weights after 2 steps
    model.eval(), ref.eval()
    with torch.no_grad():
        x = _inputs(shape, 1)[0]
        assert rel_err(model(x), ref(x)) <= tol


# -- MONAI ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_monai_structure(spatial_dims):
    model = monai_small(spatial_dims)
    layer = model.features.denseblock1.denselayer1
    keys = list(model.state_dict())
    convert(model)
    assert isinstance(model, monai_nets.DenseNet121) and type(model).__name__ == "FusedMonaiDenseNet121"
    assert isinstance(model.features, FusedFeatures)
    assert isinstance(model.features.denseblock1, ConcatDenseBlock)
    assert isinstance(model.features.transition1, Transition)
    assert model.features.denseblock1.denselayer1 is layer
    assert list(model.state_dict()) == keys
    report = conversion_report(model)
    assert report.count("ConcatDenseBlock") == 2 and report.count("Transition") == 1
    assert report.count("FusedMonaiDenseNet121") == 1 and not report.left_alone, str(report)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("cls", ["DenseNet121", "DenseNet169", "DenseNet"])
def test_monai_parity_fp64(spatial_dims, cls):
    _check_parity(monai_small(spatial_dims, getattr(monai_nets, cls)), SHAPES[spatial_dims])


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("act,norm", [(("relu", {"inplace": False}), "batch"),
                                      ("relu", ("batch", {"eps": 1e-3, "momentum": 0.3}))])
def test_monai_bn_relu_options_converted(spatial_dims, act, norm):
    model = monai_small(spatial_dims, act=act, norm=norm)
    _check_parity(model, SHAPES[spatial_dims])
    report = conversion_report(model)
    assert report.count("ConcatDenseBlock") == 2 and not report.left_alone, str(report)


@pytest.mark.parametrize("kw,reason", [
    (dict(act="elu"), r"followed by ELU, not nn.ReLU"),  # LeakyReLU / PReLU: tests/test_leaky_act.py
    (dict(norm="instance"), r"is InstanceNorm3d, not BatchNorm3d"),
    (dict(dropout_prob=0.2), r"dropout_prob > 0: channel dropout \(Dropout3d\)"),
])
def test_monai_other_options_left_alone(kw, reason):
    model = randomize_bn(monai_small(3, **kw)).double()
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=reason):
        convert(model)
    report = conversion_report(model)
    assert report.count("ConcatDenseBlock") == 0 and report.left_alone
    model.eval(), ref.eval()  # the blocks run their original computation (transitions may be fused)
    x = _inputs(SHAPES[3], 1)[0]
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) <= 1e-9


# -- torchxrayvision -----------------------------------------------------------------------------------


def test_xrv_structure_and_parity_fp64():
    model = xrv_small()
    convert(model)
    assert isinstance(model, xrv.models.DenseNet) and type(model).__name__ == "FusedXRVDenseNet"
    assert isinstance(model.features.denseblock2, ConcatDenseBlock)
    report = conversion_report(model)
    assert report.count("ConcatDenseBlock") == 2 and report.count("FusedXRVDenseNet") == 1, str(report)
    _check_parity(xrv_small(), (2, 1, 29, 35))


def test_xrv_dropout_fused():
    """torchxrayvision's element-wise dropout (drop_rate) runs inside the fused block (no fallback); eval parity."""
    model = randomize_bn(xrv_small(drop_rate=0.3)).double()
    ref = copy.deepcopy(model)
    convert(model)
    x = _inputs((2, 1, 29, 35), 1)[0]
    model.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) <= 1e-9
    block = model.features.denseblock1
    model.train()
    buf = model.features.conv0(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "using the reference PyTorch path" warning
        assert block.can_fuse(torch.randn(2, 8, 9, 9, dtype=torch.float64))
    assert torch.isfinite(model(x)).all() and buf.shape[1] == 8


# -- nothing recognised ----------------------------------------------------------------------------------


class MyDenseBlock(nn.Sequential):
    pass


def test_unknown_dense_blocks_warn():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), MyDenseBlock(nn.BatchNorm2d(4), nn.ReLU()))
    with pytest.warns(UserWarning, match=r"dense-block-like module.*MyDenseBlock.*nothing was converted"):
        convert(model)


def test_plain_model_warns_only_that_nothing_was_found():
    """A model without dense blocks gets one warning, that no dense block was found (issue 29), and no list of
    modules left alone."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    assert [str(w.message) for w in caught] == [
        "densenet_fast.convert: no dense block found in Sequential; nothing was converted (convert() fuses the dense "
        "blocks, transitions and heads of torchvision, timm, MONAI and torchxrayvision DenseNets, and timm SEModules)"]


def test_smp_unet_densenet_encoder():
    smp = pytest.importorskip("segmentation_models_pytorch")
    model = smp.Unet("densenet121", encoder_weights=None, classes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert(model)
    assert conversion_report(model).count("DenseBlock") == 4


# -- densenet_fast's own MONAI-compatible models -------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("name", ["densenet121_3d", "densenet169_3d", "densenet201_3d", "densenet264_3d"])
def test_own_models_load_monai_checkpoints_strict(spatial_dims, name):
    import densenet_fast as dnf
    monai_cls = getattr(monai_nets, "DenseNet" + name[8:11])
    kw = dict(init_features=8, growth_rate=4, bn_size=2)
    theirs = monai_cls(spatial_dims=spatial_dims, in_channels=1, out_channels=3, **kw)
    ours = getattr(dnf, name)(spatial_dims, 1, 3, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_own_model_parity_with_monai_fp64(spatial_dims):
    import densenet_fast as dnf
    theirs = randomize_bn(monai_small(spatial_dims, norm=("batch", {"eps": 1e-4}))).double()
    ours = dnf.DenseNet3d(spatial_dims, SHAPES[spatial_dims][1], 3, norm=("batch", {"eps": 1e-4}), **SMALL).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _train_steps([ours, theirs], _inputs(SHAPES[spatial_dims]), 1e-9)
    assert_state_close(ours, theirs, 1e-9)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        x = _inputs(SHAPES[spatial_dims], 1)[0]
        assert rel_err(ours(x), theirs(x)) <= 1e-9


def test_own_model_refuses_other_act_norm():
    import densenet_fast as dnf
    with pytest.raises(ValueError, match=r"act: expected 'relu'.*got 'prelu'"):
        dnf.DenseNet3d(3, 1, 2, act="prelu")
    with pytest.raises(ValueError, match=r"norm: expected 'batch'.*got 'instance'"):
        dnf.DenseNet3d(3, 1, 2, norm="instance")
    with pytest.raises(ValueError, match=r"spatial_dims: expected 2 or 3, got 1"):
        dnf.DenseNet3d(1, 1, 2)
