"""Issue 12/13: the CPU dense block in bfloat16, under torch.autocast("cpu") and as a .bfloat16() model,
against torchvision's _DenseBlock run the same way, both measured against the fp64 truth."""
from __future__ import annotations

import warnings

import pytest
import torch
from conftest import rel_err, rel_l2_err, tv_block_pair

import densenet_fast as dnf

# Odd sizes, not multiples of any ISA blocking: C0 = 13, growth 5, bn_size 3.
L, C0, BN_SIZE, K = 3, 13, 3, 5


def _pair(train: bool):
    return tv_block_pair(L, C0, BN_SIZE, K, train=train)


def _step(block, x, g, autocast: bool):
    x = x.detach().clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = block(x)
    y.backward(g.to(y.dtype))
    return y, x.grad, {n: p.grad for n, p in block.named_parameters()}


def _truth(ref, x, g):
    truth = ref.__class__(L, C0, BN_SIZE, K, 0.0)
    truth.load_state_dict(ref.state_dict())
    return _step(truth.double().train(ref.training), x.double(), g.double(), False)


def _flat(grads):
    """Every parameter gradient as one vector (the global-gradient metric of the model tests)."""
    return torch.cat([grads[n].double().flatten() for n in sorted(grads)])


def _count_calls(monkeypatch, *targets):
    """Wraps each (module, function name) so that its calls are counted: {name: calls so far}."""
    calls = {}
    for mod, name in targets:
        calls[name] = 0

        def counted(*args, _f=getattr(mod, name), _name=name, **kwargs):
            calls[_name] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(mod, name, counted)
    return calls


def _assert_no_worse(ours, theirs, truth, factor, what):
    # Relative L2 error: on few rows the max error of a bf16 BN backward is dominated by single elements.
    err_o, err_t = rel_l2_err(ours, truth), rel_l2_err(theirs, truth)
    assert err_o <= factor * err_t + 1e-6, f"{what}: ours {err_o:.3e} > {factor} x torchvision {err_t:.3e}"


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("H,W", [(5, 7), (9, 9)])
def test_autocast_bf16_block_vs_fp64_truth(train, layout, H, W):
    ref, ours = _pair(train)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    # The block input a bf16 network hands over under autocast (the stem's conv emits bf16).
    x = torch.randn(8, C0, H, W).bfloat16().contiguous(memory_format=fmt)
    g = torch.randn(8, C0 + L * K, H, W)
    yt, gxt, gpt = _truth(ref, x, g)
    yr, gxr, gpr = _step(ref, x, g, True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path, no fallback
        yo, gxo, gpo = _step(ours, x, g, True)
    assert yo.dtype == yr.dtype == torch.bfloat16 and gxo.dtype == gxr.dtype
    _assert_no_worse(yo, yr, yt, 1.5, "output")
    _assert_no_worse(gxo, gxr, gxt, 1.5, "input grad")
    for n in gpr:
        assert gpo[n].dtype == gpr[n].dtype == torch.float32, n
    _assert_no_worse(_flat(gpo), _flat(gpr), _flat(gpt), 1.5, "parameter grads (global)")
    for (n, b), (_, br) in zip(ours.named_buffers(), ref.named_buffers()):
        assert b.dtype == br.dtype, n
        if not n.endswith("num_batches_tracked"):
            tb = dict(ref.named_buffers())[n]
            assert rel_err(b, tb) <= 2e-2, n  # fp32 statistics of bf16 data


def test_autocast_bf16_keeps_a_bf16_buffer_and_fp32_stats():
    _, ours = _pair(True)
    x = torch.randn(2, C0, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours.fused_forward(x)
    assert out.buffer.dtype == torch.bfloat16 and out.buffer.is_contiguous(memory_format=torch.channels_last)
    assert out.mean.dtype == out.var.dtype == out.mean2.dtype == torch.float32
    for m in ours.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert m.running_mean.dtype == torch.float32 and int(m.num_batches_tracked) == 1


@pytest.mark.parametrize("train", [True, False])
def test_bf16_model_without_autocast_runs_fused_like_torchvision(train):
    """A .bfloat16() block computes BN in fp32 inside the fused kernel; torchvision's (bf16 BN) is the bar."""
    ref32, ours32 = _pair(train)
    x = torch.randn(8, C0, 9, 11).bfloat16()
    g = torch.randn(8, C0 + L * K, 9, 11)
    yt, gxt, gpt = _truth(ref32, x, g)
    ref, ours = ref32.bfloat16(), ours32.bfloat16()
    yr, gxr, gpr = _step(ref, x, g, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yo, gxo, gpo = _step(ours, x, g, False)
    assert yo.dtype == gxo.dtype == torch.bfloat16
    _assert_no_worse(yo, yr, yt, 1.5, "output")
    _assert_no_worse(gxo, gxr, gxt, 1.5, "input grad")
    for n in gpr:
        assert gpo[n].dtype == torch.bfloat16, n
    _assert_no_worse(_flat(gpo), _flat(gpr), _flat(gpt), 1.5, "parameter grads (global)")
    rb = dict(ref.named_buffers())
    for n, b in ours.named_buffers():
        assert b.dtype == rb[n].dtype, n
        if n.endswith("num_batches_tracked"):
            assert int(b) == int(rb[n]), n
        else:
            torch.testing.assert_close(b.float(), rb[n].float(), rtol=2e-2, atol=2e-2)


def test_bf16_model_trains():
    """A few SGD steps of a .bfloat16() model (fused blocks and tails) lower the loss."""
    torch.manual_seed(0)
    model = dnf.densenet_bc(depth=10, growth_rate=5, num_classes=3).bfloat16()
    x = torch.randn(8, 3, 12, 12).bfloat16()
    y = torch.randint(0, 3, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no reference-path fallback warning
        for _ in range(6):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_bf16_model_vs_fp64_truth_and_tails_save_the_bf16_buffer(train):
    """A whole DenseNet-BC under CPU bf16 autocast: output and every gradient no worse than 1.5x torchvision's
    error against the fp64 truth, output dtype as torchvision's, and the transitions / final norm save the
    bf16 block buffer (no float32 copy of it is kept for the backward)."""
    import torchvision
    from torch.autograd.graph import saved_tensors_hooks

    ref = torchvision.models.DenseNet(growth_rate=5, block_config=(3, 2), num_init_features=13, bn_size=3,
                                      num_classes=7)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    ours = dnf.DenseNet(growth_rate=5, block_config=(3, 2), num_init_features=13, bn_size=3, num_classes=7)
    ours.load_state_dict(ref.state_dict())
    truth = torchvision.models.DenseNet(growth_rate=5, block_config=(3, 2), num_init_features=13, bn_size=3,
                                        num_classes=7).double()
    truth.load_state_dict(ref.state_dict())
    x, g = torch.randn(8, 3, 37, 29), torch.randn(8, 7)
    results = {}
    for name, model in (("tv", ref), ("ours", ours)):
        model.train(train)
        saved_dtypes = []

        def pack(t, saved_dtypes=saved_dtypes):
            saved_dtypes.append((tuple(t.shape), t.dtype))
            return t

        with saved_tensors_hooks(pack, lambda t: t):
            y, _, grads = _step(model, x, g, True)
        results[name] = (y, grads, saved_dtypes)
    yt, _, gt = _step(truth.train(train), x.double(), g.double(), False)
    (yo, go, saved), (yr, gr, _) = results["ours"], results["tv"]
    assert yo.dtype == yr.dtype
    _assert_no_worse(yo, yr, yt, 1.5, "output")
    _assert_no_worse(_flat(go), _flat(gr), _flat(gt), 1.5, "all parameter gradients")
    # The first block's buffer [8, 13 + 3*5, 10, 8] (after the stem: 37x29 -> 19x15 -> 10x8) is saved in bf16 only.
    first_buffer = [d for s, d in saved if s == (8, 28, 10, 8)]
    assert first_buffer and set(first_buffer) == {torch.bfloat16}, first_buffer
    # The stem runs fused on conv0's bf16 output: no int64 pooling indices, no BN-ReLU output of conv0's size.
    assert torch.int64 not in {d for _, d in saved}, saved
    conv0_out = [d for s, d in saved if s == (8, 13, 19, 15)]
    assert conv0_out == [torch.bfloat16], conv0_out  # conv0's output, once (torchvision: + its BN-ReLU output)
    # The blocks take the float32 master weights (cast per layer inside): no bf16 copy of a block weight saved.
    block_weights = {tuple(p.shape) for n, p in ours.named_parameters() if ".denselayer" in n and "conv" in n}
    assert not [(s, d) for s, d in saved if s in block_weights and d == torch.bfloat16]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bf16_model_readers_fused_vs_fp64_truth(train, layout, monkeypatch):
    """A .bfloat16() DenseNet on CPU (no autocast): the stem, transitions and final norm run their fused kernels on
    the bf16 tensors (BN math in float32 inside, as torch's batch_norm on bf16), and the output, every parameter
    gradient and the running statistics are no worse than torchvision's .bfloat16() model against the fp64
    truth (1.5x), in torchvision's dtypes; odd sizes."""
    import torchvision

    import densenet_fast.nn.fused_features as ff
    import densenet_fast.ops.tail as tail

    calls = _count_calls(monkeypatch, (tail, "transition"), (tail, "norm_relu_pool"), (ff, "bn_relu_maxpool"))
    kw = dict(growth_rate=5, block_config=(3, 2), num_init_features=13, bn_size=3, num_classes=7)
    torch.manual_seed(1)
    ref = torchvision.models.DenseNet(**kw)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    ref = ref.bfloat16()  # the shared weights: exactly representable in every copy below
    ours, truth = dnf.DenseNet(**kw).bfloat16(), torchvision.models.DenseNet(**kw).double()
    ours.load_state_dict(ref.state_dict()), truth.load_state_dict(ref.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(8, 3, 37, 29).bfloat16().contiguous(memory_format=fmt)
    g = torch.randn(8, 7).bfloat16()
    out = {}
    for name, model in (("tv", ref), ("ours", ours), ("truth", truth)):
        dt = torch.float64 if name == "truth" else torch.bfloat16
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no reference-path fallback warning
            y = model.train(train)(x.to(dt))
        y.backward(g.to(dt))
        out[name] = (y, {n: p.grad for n, p in model.named_parameters()}, dict(model.named_buffers()))
    assert calls["transition"] == 1 and calls["norm_relu_pool"] == 1 and calls["bn_relu_maxpool"] == 1, calls
    (yo, go, bo), (yr, gr, br), (yt, gt, bt) = out["ours"], out["tv"], out["truth"]
    assert yo.dtype == yr.dtype == torch.bfloat16
    assert all(go[n].dtype == gr[n].dtype for n in gr)
    _assert_no_worse(yo, yr, yt, 1.5, "output")
    _assert_no_worse(_flat(go), _flat(gr), _flat(gt), 1.5, "all parameter gradients")
    # (Per tensor, bf16 gradients are chaotic at ~1e-1 for both: the global norm is the metric, as above.)
    for n, b in br.items():
        assert bo[n].dtype == b.dtype, n
        if b.is_floating_point():
            _assert_no_worse(bo[n], b, bt[n], 1.5, f"buffer {n}")


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_bf16_model_3d_readers_fused_vs_fp64_truth(train, monkeypatch):
    """The same for a .bfloat16() DenseNet3d (MONAI's layout): fused 3-D stem, transition and final norm on the
    bf16 tensors vs the same model on its reference path (torch's modules in bf16), both against fp64. torch
    has no CPU bfloat16 avg_pool3d (MONAI's .bfloat16() 3-D DenseNet cannot run on a CPU), so the reference's
    pool accumulates in float32 and rounds once, as a bfloat16 pooling kernel would."""
    import torch.nn.functional as F

    import densenet_fast.ops.tail as tail

    calls = _count_calls(monkeypatch, (tail, "transition"), (tail, "norm_relu_pool"))
    avg_pool3d = F.avg_pool3d
    monkeypatch.setattr(F, "avg_pool3d", lambda x, *a, **k: avg_pool3d(x.float(), *a, **k).to(x.dtype))
    kw = dict(spatial_dims=3, in_channels=1, out_channels=3, init_features=7, growth_rate=5, block_config=(2, 2),
              bn_size=3)
    torch.manual_seed(2)
    base = dnf.DenseNet3d(**kw)
    for m in base.modules():
        if isinstance(m, torch.nn.BatchNorm3d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    base = base.bfloat16()
    models = {"ours": dnf.DenseNet3d(**kw).bfloat16(), "ref": dnf.DenseNet3d(**kw, impl="reference").bfloat16(),
              "truth": dnf.DenseNet3d(**kw, impl="reference").double()}
    x, g = torch.randn(6, 1, 15, 13, 11).bfloat16(), torch.randn(6, 3).bfloat16()
    out = {}
    for name, model in models.items():
        model.load_state_dict(base.state_dict())
        dt = torch.float64 if name == "truth" else torch.bfloat16
        # The reference runs torch's native convolutions: oneDNN's bfloat16 3-D weight gradient is wrong on a
        # depth-2 volume on AVX-512 CPUs without AMX (tests/test_cpu_feature_paths.py), which block 2 here is.
        with warnings.catch_warnings(), torch.backends.mkldnn.flags(enabled=name != "ref"):
            warnings.simplefilter("error")  # no reference-path fallback warning
            y = model.train(train)(x.to(dt))
            y.backward(g.to(dt))
        out[name] = (y, {n: p.grad for n, p in model.named_parameters()})
        if name == "ours":
            assert calls["transition"] == 1 and calls["norm_relu_pool"] == 1, calls
    (yo, go), (yr, gr), (yt, gt) = out["ours"], out["ref"], out["truth"]
    assert yo.dtype == yr.dtype == torch.bfloat16 and all(go[n].dtype == gr[n].dtype for n in gr)
    _assert_no_worse(yo, yr, yt, 1.5, "output")
    _assert_no_worse(_flat(go), _flat(gr), _flat(gt), 1.5, "all parameter gradients")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_autocast_bf16_stem_vs_fp64_truth(train, layout):
    """torchvision's stem (conv0 -> norm0 -> relu0 -> pool0) under CPU bf16 autocast vs ours (the fused stem op on
    conv0's bf16 output): output and gradients no worse than 1.5x torchvision's error against the fp64 truth."""
    import torchvision

    def stem_of(model):
        f = model.features
        return torch.nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)

    kw = dict(growth_rate=5, block_config=(2,), num_init_features=13, bn_size=3, num_classes=3)
    ref = torchvision.models.DenseNet(**kw)
    with torch.no_grad():
        ref.features.norm0.weight.uniform_(0.5, 1.5), ref.features.norm0.bias.uniform_(-0.5, 0.5)
        ref.features.norm0.running_mean.uniform_(-0.2, 0.2), ref.features.norm0.running_var.uniform_(0.5, 2.0)
    ours, truth = dnf.DenseNet(**kw), torchvision.models.DenseNet(**kw).double()
    ours.load_state_dict(ref.state_dict()), truth.load_state_dict(ref.state_dict())
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(4, 3, 23, 17).contiguous(memory_format=fmt)
    g = torch.randn(4, 13, 6, 5)
    out = {}
    for name, model, ac in (("tv", stem_of(ref), True), ("truth", stem_of(truth), False)):
        model.train(train)
        xi = (x.double() if name == "truth" else x.clone()).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=ac):
            y = model(xi)
        y.backward(g.to(y.dtype))
        out[name] = (y, xi.grad, torch.cat([p.grad.double().flatten() for p in model.parameters()]))
    ours.features.train(train)
    xi = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path, no fallback
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = ours.features.conv0(xi)
            y = dnf.nn.fused_features.fused_stem(ours.features.norm0, y)
    y.backward(g.to(y.dtype))
    params = [ours.features.conv0.weight, ours.features.norm0.weight, ours.features.norm0.bias]
    out["ours"] = (y, xi.grad, torch.cat([p.grad.double().flatten() for p in params]))
    assert out["ours"][0].dtype == out["tv"][0].dtype == torch.bfloat16
    for i, what in enumerate(["output", "input grad", "parameter grads"]):
        _assert_no_worse(out["ours"][i], out["tv"][i], out["truth"][i], 1.5, what)
    for a, b in zip(ours.features.norm0.buffers(), ref.features.norm0.buffers()):
        assert a.dtype == b.dtype and rel_err(a.double(), b.double()) <= 2e-2


def test_bf16_block_weight_dtype_errors():
    """A CPU bf16 block takes conv weights in bf16 or float32 (master weights); anything else is refused by name."""
    C, inter, k = 4, 6, 3
    x = torch.randn(2, C, 5, 5).bfloat16()
    bn = lambda n: [torch.ones(n)]  # noqa: E731
    args = dict(g1=bn(C), b1=bn(C), w1=[torch.randn(inter, C, 1, 1)], g2=bn(inter), b2=bn(inter),
                w2=[torch.randn(k, inter, 3, 3)])

    def run(w1, w2):
        return torch.ops.densenet_fast.dense_block_forward(x, args["g1"], args["b1"], w1, args["g2"], args["b2"], w2,
                                                            [], [], [], [], None, 0.0, True, 1e-5)

    buf32 = run(args["w1"], args["w2"])[0]
    buf16 = run([w.bfloat16() for w in args["w1"]], [w.bfloat16() for w in args["w2"]])[0]
    assert buf32.dtype == torch.bfloat16 and torch.equal(buf32, buf16)  # the same per-layer cast
    with pytest.raises(RuntimeError, match=r"conv1_weight\[0\]: expected dtype BFloat16 \(the dtype of input\) "
                       r"or Float, got Half"):
        run([w.half() for w in args["w1"]], args["w2"])
    with pytest.raises(RuntimeError, match=r"conv2_weight\[0\]: expected dtype BFloat16 .* got Double"):
        run(args["w1"], [w.double() for w in args["w2"]])


@pytest.mark.parametrize("op", ["transition_forward", "norm_relu_pool_forward", "bn_relu_maxpool"])
@pytest.mark.parametrize("master", [True, False], ids=["f32-params", "bf16-params"])
def test_bf16_reader_ops_opcheck(op, master):
    # The readers take a bfloat16 buffer natively: float32 BN tensors and a float32 master conv weight under
    # autocast, or a model cast with .bfloat16() (all bfloat16). Outputs and the input gradient in bfloat16,
    # parameter gradients in the parameters' dtypes.
    C, Cout = 7, 3
    x = torch.randn(2, C, 5, 3).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    pd = torch.float32 if master else torch.bfloat16
    mean, var = (torch.randn(C) * 0.1).to(pd), (torch.rand(C) + 0.5).to(pd)
    w, b = (torch.rand(C) + 0.5).to(pd).requires_grad_(True), (torch.randn(C) * 0.1).to(pd).requires_grad_(True)
    if op == "transition_forward":
        args = (x, mean, var, w, b, torch.randn(Cout, C, 1, 1).to(pd).requires_grad_(True), True, 1e-5)
    else:
        args = (x, mean, var, w, b, True, 1e-5)
    torch.library.opcheck(getattr(torch.ops.densenet_fast, op), args)
    out = getattr(torch.ops.densenet_fast, op)(*args)
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == pd and b.grad.dtype == pd


def _bn(C):
    bn = torch.nn.BatchNorm2d(C)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2.0)
    return bn


class _FinalNorm(torch.nn.Module):
    """torchvision's norm5 -> relu -> global average pool."""

    def __init__(self, C):
        super().__init__()
        self.norm = _bn(C)

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.norm(x)), 1).flatten(1)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("reader", ["transition", "norm_relu_pool"])
@pytest.mark.parametrize("H,W", [(7, 5), (8, 6)])
def test_autocast_bf16_readers_vs_fp64_truth(train, reader, H, W):
    """The transition / final norm on a bfloat16 buffer (read natively, float32 BN math) against torchvision's
    _Transition / norm5-relu-pool under the same autocast, both measured against fp64: output, input
    gradient, BN and conv weight gradients no worse than 1.5x; odd H, W (the floor-mode pool drops pixels)."""
    import copy

    from torchvision.models.densenet import _Transition

    C, Cout = 13, 6
    torch.manual_seed(0)
    if reader == "transition":
        ref = _Transition(C, Cout)
        ref.norm = _bn(C)
    else:
        ref = _FinalNorm(C)
    x = torch.randn(4, C, H, W).contiguous(memory_format=torch.channels_last).bfloat16()
    with torch.no_grad():
        gout = torch.randn_like(copy.deepcopy(ref).float()(x.float()))

    def params(m):
        return [m.norm.weight, m.norm.bias] + ([m.conv.weight] if reader == "transition" else [])

    def step(m, xin, autocast, ours):
        m = m.train(train)
        xi = xin.detach().clone().requires_grad_(True)
        m.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if not ours:
                y = m(xi)
            else:
                bn = m.norm
                if train:
                    xf = xi.detach().float()
                    mean, var = xf.mean((0, 2, 3)), xf.var((0, 2, 3), unbiased=False)
                else:
                    mean, var = bn.running_mean, bn.running_var
                if reader == "transition":
                    y = dnf.ops.tail.transition(xi, mean, var, bn.weight, bn.bias, m.conv.weight, training=train)
                else:
                    y = dnf.ops.tail.norm_relu_pool(xi, mean, var, bn.weight, bn.bias, training=train)
        y.backward(gout.to(y.dtype))
        return y, [xi.grad] + [p.grad for p in params(m)]

    yo, go = step(copy.deepcopy(ref), x, True, True)
    yr, gr = step(copy.deepcopy(ref), x, True, False)
    yt, gt = step(copy.deepcopy(ref).double(), x.double(), False, False)
    assert yo.dtype == yr.dtype == torch.bfloat16
    assert go[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in go[1:])
    _assert_no_worse(yo, yr, yt, 1.5, "output")
    for name, o, r, t in zip(["input", "weight", "bias", "conv weight"], go, gr, gt):
        _assert_no_worse(o, r, t, 1.5, f"grad {name}")
