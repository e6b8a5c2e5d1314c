"""Issue 27.3: a 2-D model's conv0 under CPU bf16 autocast computed in float32 on the bfloat16 values
(densenet_fast/nn/conv0_bf16.py), where the bfloat16 convolutions measured slower. Forced on here (the choice
is the process's measurement); outputs and gradients against the fp64 truth, no worse than 1.5x autocast's own
conv0 (torchvision's model under the same autocast)."""
from __future__ import annotations

import pytest
import torch
from conftest import rel_l2_err

import densenet_fast as dnf
from densenet_fast.nn import conv0_bf16


def _no_worse(ours, theirs, truth, what, factor=1.5):
    err_o, err_t = rel_l2_err(ours, truth), rel_l2_err(theirs, truth)
    assert err_o <= factor * err_t + 1e-6, f"{what}: ours {err_o:.3e} > {factor} x autocast's {err_t:.3e}"


@pytest.fixture
def forced(monkeypatch):
    """conv0_widened forced on; returns {"calls": n} counting its calls."""
    calls = {"calls": 0}
    real = conv0_bf16.conv0_widened

    def counted(conv, x):
        calls["calls"] += 1
        return real(conv, x)

    monkeypatch.setattr(conv0_bf16, "_float32_chosen", lambda: True)
    monkeypatch.setattr(dnf.nn.fused_features, "conv0_widened", counted)
    return calls


@pytest.mark.parametrize("chunk_bytes", [conv0_bf16.CHUNK_BYTES, 1], ids=["whole-batch", "per-sample-chunks"])
@pytest.mark.parametrize("needs_input_grad", [False, True], ids=["image", "input_grad"])
@pytest.mark.parametrize("shape", [(3, 3, 23, 17), (2, 5, 31, 30)])
def test_conv0_widened_vs_fp64_truth(shape, needs_input_grad, chunk_bytes, monkeypatch):
    """The conv alone: output (bfloat16, channels_last), weight gradient and input gradient vs autocast's conv;
    also computed one sample per chunk (the float32 operands of a large batch exist a few samples at a time)."""
    monkeypatch.setattr(conv0_bf16, "CHUNK_BYTES", chunk_bytes)
    N, C, H, W = shape
    conv = torch.nn.Conv2d(C, 11, 7, 2, 3, bias=False)
    truth = torch.nn.Conv2d(C, 11, 7, 2, 3, bias=False).double()
    truth.load_state_dict(conv.state_dict())
    x = torch.randn(N, C, H, W)
    g = torch.randn(N, 11, (H + 1) // 2, (W + 1) // 2)
    out = {}
    for name in ("autocast", "ours", "truth"):
        m = truth if name == "truth" else conv
        m.zero_grad(set_to_none=True)
        xi = (x.double() if name == "truth" else x.clone()).requires_grad_(needs_input_grad)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "truth"):
            y = conv0_bf16.conv0_widened(m, xi) if name == "ours" else m(xi)
        y.backward(g.to(y.dtype))
        out[name] = (y, m.weight.grad, xi.grad)
    y, gw, gx = out["ours"]
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    assert gw.dtype == torch.float32 and (gx is None) == (not needs_input_grad)
    for i, what in enumerate(["output", "weight grad", "input grad"][:3 if needs_input_grad else 2]):
        _no_worse(out["ours"][i], out["autocast"][i], out["truth"][i], what)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_under_autocast_takes_it(forced, train):
    """A whole DenseNet-BC under CPU bf16 autocast with conv0 widened: output and every gradient no worse than
    1.5x torchvision's under the same autocast against the fp64 truth; conv0 saves the bfloat16 image, no float32
    copy of it."""
    import torchvision
    from torch.autograd.graph import saved_tensors_hooks

    kw = dict(growth_rate=5, block_config=(3, 2), num_init_features=13, bn_size=3, num_classes=7)
    ref = torchvision.models.DenseNet(**kw)
    ours, truth = dnf.DenseNet(**kw), torchvision.models.DenseNet(**kw).double()
    ours.load_state_dict(ref.state_dict()), truth.load_state_dict(ref.state_dict())
    x, g = torch.randn(8, 3, 37, 29), torch.randn(8, 7)
    res = {}
    for name, model in (("tv", ref), ("ours", ours), ("truth", truth)):
        model.train(train).zero_grad(set_to_none=True)
        saved = []
        with saved_tensors_hooks(lambda t: saved.append((tuple(t.shape), t.dtype)) or t, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "truth"):
                y = model(x.double() if name == "truth" else x)
        y.backward(g.to(y.dtype))
        grads = torch.cat([p.grad.double().flatten() for _, p in sorted(model.named_parameters())])
        res[name] = (y, grads, saved)
    assert forced["calls"] == 1
    _no_worse(res["ours"][0], res["tv"][0], res["truth"][0], "output")
    _no_worse(res["ours"][1], res["tv"][1], res["truth"][1], "all parameter gradients")
    image = [d for s, d in res["ours"][2] if s == (8, 3, 37, 29)]
    assert image == [torch.bfloat16], image


def test_not_taken_outside_its_case():
    """Only a bias-free float32 conv under CPU bf16 autocast; never outside autocast or for a float16 autocast."""
    conv, x = torch.nn.Conv2d(3, 4, 7, 2, 3, bias=False), torch.randn(1, 3, 9, 9)
    assert not conv0_bf16.conv0_in_float32(conv, x)  # no autocast
    with torch.autocast("cpu", dtype=torch.float16):
        assert not conv0_bf16.conv0_in_float32(conv, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv0_bf16.conv0_in_float32(torch.nn.Conv2d(3, 4, 7, 2, 3, bias=True), x)
        assert not conv0_bf16.conv0_in_float32(conv, x.double())
        want = torch.ops.densenet_fast.bf16_conv_compute(2, 0) == "float32" == \
            torch.ops.densenet_fast.bf16_conv_compute(2, 2)
        assert conv0_bf16.conv0_in_float32(conv, x) == want
