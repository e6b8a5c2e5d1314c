"""densenet121_3d / 169_3d / 201_3d / 264_3d take every argument MONAI's DenseNet121/169/201/264 take (issue 28,
item 5), checked against the installed MONAI: the same signature, the same model for each argument, MONAI's
``pretrained`` behaviour, and a clear error naming the argument where the fused kernels cannot honour one."""
from __future__ import annotations

import inspect

import pytest
import torch

import densenet_fast as dnf

monai_nets = pytest.importorskip("monai.networks.nets")
monai_densenet = pytest.importorskip("monai.networks.nets.densenet")

NAMES = ["densenet121_3d", "densenet169_3d", "densenet201_3d", "densenet264_3d"]
SMALL = dict(init_features=8, growth_rate=4, block_config=(2, 3))  # every test model: seconds on a CPU


def _monai(name: str):
    return getattr(monai_nets, "DenseNet" + name[8:11])


def _params(fn) -> list:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", NAMES)
def test_signature_is_monais(name):
    """Same parameter names, order, kinds and defaults as MONAI's class, but for the three MONAI requires, which
    ours defaults to MONAI's documented 3-D use (spatial_dims=3, in_channels=1, out_channels=2)."""
    ours, theirs = _params(getattr(dnf, name)), _params(_monai(name).__init__)
    assert [p[:2] for p in ours] == [p[:2] for p in theirs]
    required = {"spatial_dims", "in_channels", "out_channels"}
    assert [p for p in ours if p[0] not in required] == [p for p in theirs if p[0] not in required]
    # what MONAI's **kwargs reach: DenseNet's own arguments, taken by ours as keywords too
    base = {p[0] for p in _params(monai_nets.DenseNet.__init__)} - {p[0] for p in theirs}
    assert base == {"bn_size", "act", "norm", "dropout_prob"}
    assert base <= set(inspect.signature(dnf.DenseNet3d).parameters)


# every MONAI argument at a value other than its default (that the fused kernels compute)
CASES = [
    dict(spatial_dims=2), dict(in_channels=3), dict(out_channels=5), dict(init_features=6), dict(growth_rate=6),
    dict(block_config=(1, 2, 1)), dict(bn_size=2), dict(act="relu"), dict(act=("RELU", {"inplace": False})),
    dict(norm=("batch", {"eps": 1e-3, "momentum": 0.3})), dict(norm=("batch", {"affine": True})),
    dict(dropout_prob=0.2), dict(pretrained=False, progress=False),
]


@pytest.mark.filterwarnings("ignore:densenet_fast.ConcatDenseBlock")  # dropout_prob > 0
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_each_argument_builds_monais_model(kw):
    """Ours and MONAI's, built with the same arguments, have the same state_dict keys and shapes, the same
    norm settings, and compute the same function once they share weights (eval, float64)."""
    args = dict(spatial_dims=3, in_channels=1, out_channels=2, **SMALL)
    args.update(kw)
    torch.manual_seed(0)
    theirs = monai_nets.DenseNet121(**args).double().eval()
    ours = dnf.densenet121_3d(**args).double().eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours_modules = dict(ours.named_modules())
    for name, a in theirs.named_modules():
        if isinstance(a, torch.nn.modules.batchnorm._BatchNorm):
            b = ours_modules[name]
            assert (a.eps, a.momentum, a.affine, a.track_running_stats) == (
                b.eps, b.momentum, b.affine, b.track_running_stats), name
    spatial = (24,) * args["spatial_dims"]
    x = torch.randn(2, args["in_channels"], *spatial, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_positional_arguments_in_monais_order(name):
    args = (2, 1, 3, 8, 4, (2, 1))  # spatial_dims, in_channels, out_channels, init_features, growth_rate, blocks
    ours, theirs = getattr(dnf, name)(*args), _monai(name)(*args)
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.fixture
def imagenet_download(monkeypatch):
    """The ImageNet checkpoint both libraries download, answered with a seeded torchvision densenet121's state dict
    in the legacy ``norm.1`` key format of the real file (no network in tests)."""
    import re

    import torchvision

    torch.manual_seed(0)
    state = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])", r"\1.\2", k): v
             for k, v in torchvision.models.densenet121().state_dict().items()}
    urls = []

    def fake(url, progress=True, **kwargs):
        urls.append(url)
        return dict(state)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake)
    monkeypatch.setattr(monai_densenet, "load_state_dict_from_url", fake)
    return urls


@pytest.mark.parametrize("in_channels", [3, 1])
def test_pretrained_2d_loads_what_monai_loads(imagenet_download, in_channels):
    torch.manual_seed(1)
    theirs = monai_nets.DenseNet121(2, in_channels, 4, pretrained=True)
    torch.manual_seed(1)
    ours = dnf.densenet121_3d(2, in_channels, 4, pretrained=True)
    assert imagenet_download[0] == imagenet_download[1]  # the same checkpoint
    loaded = [k for k in theirs.state_dict() if k.startswith("features.") and (in_channels == 3 or "conv0" not in k)]
    assert len(loaded) > 300
    for key in loaded:
        assert torch.equal(ours.state_dict()[key], theirs.state_dict()[key]), key


def test_pretrained_3d_and_264_refused_as_monai_does():
    with pytest.raises(NotImplementedError, match="pretrained: there are no pretrained weights for spatial_dims=3"):
        dnf.densenet121_3d(3, 1, 2, pretrained=True)
    with pytest.raises(NotImplementedError):
        monai_nets.DenseNet121(3, 1, 2, pretrained=True)
    with pytest.raises(ValueError, match="pretrained: only 'densenet121', 'densenet169' and 'densenet201'"):
        dnf.densenet264_3d(2, 1, 2, pretrained=True)
    with pytest.raises(TypeError, match="pretrained: expected a bool"):
        dnf.densenet121_3d(2, 1, 2, pretrained="yes")


def test_pretrained_without_network_is_a_clear_error(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(RuntimeError, match=r"pretrained: could not download https://download.pytorch.org/models/"
                                           r"densenet121-a639ec97.pth \(OSError: network is unreachable\)"):
        dnf.densenet121_3d(2, 3, 2, pretrained=True)


@pytest.mark.parametrize("kw, arg, monai_builds", [
    (dict(act="prelu"), "act", True), (dict(act=("leakyrelu", {"negative_slope": 0.1})), "act", True),
    (dict(norm="instance"), "norm", True), (dict(norm=("group", {"num_groups": 2})), "norm", True),
    # MONAI's own initialisation fails on these (no affine weight / no running statistics); ours names the argument
    (dict(norm=("batch", {"affine": False})), "norm", False),
    (dict(norm=("batch", {"track_running_stats": False})), "norm", False),
])
def test_unfused_act_or_norm_refused_with_the_way_out(kw, arg, monai_builds):
    """Ours refuses what the fused kernels do not compute, naming the argument and how to run it: MONAI's model
    through convert(), which leaves such blocks on MONAI's modules."""
    args = dict(spatial_dims=3, in_channels=1, out_channels=2, **SMALL, **kw)
    if monai_builds:
        monai_nets.DenseNet121(**args)  # a valid MONAI model
    with pytest.raises(ValueError, match=rf"^{arg}: expected .* got .*; for other .*densenet_fast.convert\(\)"):
        dnf.densenet121_3d(**args)
