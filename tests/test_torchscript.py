"""TorchScript, as torchvision's and MONAI's model tests hold their models to it (torchvision test_models.py
``_check_jit_scriptable``: script, save, load, same outputs; MONAI ``test_script_save``): ``torch.jit.script`` of
every densenet_fast model and ``convert()``ed model, in eval and in training, runs the fused operators (counted
with the profiler) with the eager outputs, gradients and running statistics; the scripted module saves, loads in
a fresh process and runs there. Models are small and fp64 (the kernels and the plan are the eager ones, so the
values are expected bit for bit; the tolerance only allows for torch's own scripted-vs-eager differences).
"""
from __future__ import annotations

import contextlib
import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import rel_err
from convert_utils import ROOT, randomize_bn, timm_small, tv_small

import densenet_fast as dnf

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning",
                                        "ignore:`torch.jit.save` is deprecated:FutureWarning",
                                        "ignore:`torch.jit.load` is deprecated:FutureWarning",
                                        "ignore:densenet_fast.SEDenseNet. se_placement='layer'")

TOL = 1e-12


def _monai(**kw):
    nets = pytest.importorskip("monai.networks.nets")
    args = dict(spatial_dims=3, in_channels=1, out_channels=3, init_features=8, growth_rate=4, block_config=(2, 3),
                bn_size=2)
    args.update(kw)
    return nets.DenseNet121(**args)


def _xrv():
    xrv = pytest.importorskip("torchxrayvision")
    return xrv.models.DenseNet(growth_rate=4, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5,
                               weights=None)


ACT_OPS = {"densenet_fast::dense_block_act_forward"}


def _act(model):
    """Distinct PReLU slopes, per channel in the first block's second layer (one parameter elsewhere)."""
    g = torch.Generator().manual_seed(1)
    layer = model.features.denseblock1.denselayer2.layers
    if isinstance(layer.relu1, torch.nn.PReLU):
        layer.relu1 = torch.nn.PReLU(layer.norm1.num_features)
        layer.relu2 = torch.nn.PReLU(layer.norm2.num_features)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(0.05, 0.4, generator=g)
    return model


IMAGE = (2, 3, 29, 35)  # odd sizes: the floor-mode pools drop a row/column
VOLUME = (2, 1, 13, 15, 17)
# name -> (model factory, input shape, fused operators that must run)
BLOCK_OPS = {"densenet_fast::dense_block_forward", "densenet_fast::transition_forward",
             "densenet_fast::norm_relu_pool_forward"}
MODELS = {
    "densenet121": (lambda: dnf.densenet121(num_classes=7), (2, 3, 64, 64),
                    BLOCK_OPS | {"densenet_fast::bn_relu_maxpool"}),
    "densenet_bc": (lambda: dnf.densenet_bc(depth=16, num_classes=5), IMAGE, BLOCK_OPS),
    "se_densenet_block": (lambda: dnf.densenet_bc(depth=16, num_classes=5, se_ratio=0.5), IMAGE,
                          {"densenet_fast::se_gate_of", "densenet_fast::transition_forward",
                           "densenet_fast::norm_relu_pool_forward"}),
    "se_densenet_layer": (lambda: dnf.densenet_bc(depth=16, num_classes=5, se_ratio=0.5, se_placement="layer"),
                          IMAGE, {"densenet_fast::se_forward", "densenet_fast::transition_forward"}),
    "densenet121_3d": (lambda: dnf.densenet121_3d(init_features=8, growth_rate=4, block_config=(2, 3), bn_size=2,
                                                  out_channels=3), VOLUME,
                       BLOCK_OPS | {"densenet_fast::conv_bn_relu_maxpool"}),
    "torchvision": (lambda: dnf.convert(tv_small()), IMAGE, BLOCK_OPS | {"densenet_fast::bn_relu_maxpool"}),
    "timm": (lambda: dnf.convert(timm_small()), IMAGE, BLOCK_OPS | {"densenet_fast::bn_relu_maxpool"}),
    "monai_3d": (lambda: dnf.convert(_monai()), VOLUME, BLOCK_OPS | {"densenet_fast::conv_bn_relu_maxpool"}),
    "monai_2d": (lambda: dnf.convert(_monai(spatial_dims=2, in_channels=3)), IMAGE,
                 BLOCK_OPS | {"densenet_fast::bn_relu_maxpool"}),
    "torchxrayvision": (lambda: dnf.convert(_xrv()), (2, 1, 33, 33), BLOCK_OPS | {"densenet_fast::bn_relu_maxpool"}),
    # MONAI's act="leakyrelu" / "prelu": the blocks run dense_block_act_forward (transitions, stem and head stay
    # MONAI's modules, as in eager)
    "monai_leaky_2d": (lambda: _act(dnf.convert(_monai(spatial_dims=2, in_channels=3,
                                                       act=("leakyrelu", {"negative_slope": 0.1})), warn=False)),
                       IMAGE, ACT_OPS),
    "monai_prelu_3d": (lambda: _act(dnf.convert(_monai(act="prelu"), warn=False)), VOLUME, ACT_OPS),
}


def _input(shape, seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _ops_run(fn) -> set:
    """The densenet_fast operators that ran in ``fn()`` (the profiler records every dispatched operator)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("densenet_fast::")}


def _pair(name):
    make, shape, ops = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(make()).double()
    return model, copy.deepcopy(model), shape, ops


@pytest.mark.parametrize("name", list(MODELS))
def test_scripted_model_eval_matches_eager_and_runs_fused_ops(name):
    eager, twin, shape, ops = _pair(name)
    eager.eval()
    before = {k: type(m) for k, m in eager.named_modules()}
    scripted = torch.jit.script(twin.eval())
    assert {k: type(m) for k, m in eager.named_modules()} == before  # scripting leaves the eager model alone
    assert list(scripted.state_dict()) == list(eager.state_dict())
    x = _input(shape)
    with torch.no_grad():
        want = eager(x)
        ran = _ops_run(lambda: scripted(x))
        got = scripted(x)
    assert ops <= ran, f"fused operators that did not run: {ops - ran}"
    assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("name", list(MODELS))
def test_scripted_model_trains_like_eager(name):
    eager, twin, shape, ops = _pair(name)
    scripted = torch.jit.script(twin.train())
    eager.train()
    # The act models keep MONAI's stem and transitions unfused: from its second call the profiling executor runs
    # them as its own differentiable graphs, whose gradients differ from eager by ~4e-9 (the unconverted MONAI model
    # scripted too); without its optimisations they are eager's bit for bit, so our operators are compared exactly.
    unoptimised = name.startswith("monai_") and ops == ACT_OPS
    for step in range(2):  # two SGD steps; the running statistics are compared at the end
        x = _input(shape, seed=step)
        losses = []
        for model in (eager, scripted):
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_(True)
            with torch.jit.optimized_execution(False) if unoptimised else contextlib.nullcontext():
                ran = _ops_run(lambda: model(xi).square().mean().backward())
            losses.append((xi.grad, ran))
        assert ops <= losses[1][1], f"fused operators that did not run: {ops - losses[1][1]}"
        assert rel_err(losses[1][0], losses[0][0]) <= TOL, "input gradient"
        for (n, p), (_, q) in zip(eager.named_parameters(), twin.named_parameters()):
            assert (p.grad is None) == (q.grad is None), n
            if p.grad is not None:
                assert rel_err(q.grad, p.grad) <= TOL, n
        with torch.no_grad():
            for p, q in zip(eager.parameters(), twin.parameters()):
                if p.grad is not None:
                    p -= 0.1 * p.grad
                    q -= 0.1 * q.grad
    for (n, a), (_, b) in zip(eager.state_dict().items(), twin.state_dict().items()):
        assert rel_err(b, a) <= TOL if a.is_floating_point() else torch.equal(a, b), n


_LOAD_AND_RUN = textwrap.dedent("""
    import sys
    import torch
    import densenet_fast  # registers the operators the scripted module calls
    model = torch.jit.load(sys.argv[1])
    x = torch.load(sys.argv[2])
    with torch.profiler.profile() as prof:
        out = model(x)
    torch.save((out, sorted({e.name for e in prof.events() if e.name.startswith("densenet_fast::")})), sys.argv[3])
""")


@pytest.mark.parametrize("name", ["densenet_bc", "torchvision", "monai_3d", "monai_prelu_3d"])
def test_scripted_model_saves_and_runs_in_a_fresh_process(tmp_path, name):
    eager, twin, shape, ops = _pair(name)
    scripted = torch.jit.script(twin.eval())
    torch.jit.save(scripted, str(tmp_path / "model.pt"))
    x = _input(shape)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(tmp_path / "model.pt"), str(tmp_path / "x.pt"),
                    str(tmp_path / "out.pt")], check=True, cwd=ROOT, timeout=600)
    out, ran = torch.load(tmp_path / "out.pt")
    assert ops <= set(ran)
    with torch.no_grad():
        assert rel_err(out, eager.eval()(x)) <= TOL


def _act_block():
    """A DenseBlock whose layers mix LeakyReLU, one-parameter and per-channel PReLU (the slope kernels)."""
    blk = dnf.DenseBlock(3, 8, 2, 4)
    acts = [lambda c: torch.nn.LeakyReLU(-0.2), lambda c: torch.nn.PReLU(), lambda c: torch.nn.PReLU(c)]
    for i, layer in enumerate(blk.values()):
        layer.relu1 = acts[i](layer.norm1.num_features)
        layer.relu2 = acts[(i + 1) % 3](layer.norm2.num_features)
    with torch.no_grad():
        for m in blk.modules():
            if isinstance(m, torch.nn.PReLU):
                m.weight.uniform_(-0.2, 0.5, generator=torch.Generator().manual_seed(2))
    return blk


@pytest.mark.parametrize("make", [lambda: dnf.DenseBlock(3, 8, 2, 4), _act_block, lambda: dnf.Transition(8, 4),
                                  lambda: dnf.SqueezeExcite(16)],
                         ids=["DenseBlock", "DenseBlockAct", "Transition", "SqueezeExcite"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_scripted_modules(make, train):
    torch.manual_seed(0)
    eager = randomize_bn(make()).double().train(train)
    scripted = torch.jit.script(copy.deepcopy(eager))
    channels = 16 if isinstance(eager, dnf.SqueezeExcite) else 8
    x = _input((2, channels, 9, 7))
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [m(xi) for m, xi in zip((eager, scripted), xs)]
    assert rel_err(outs[1], outs[0]) <= TOL
    for out in outs:
        out.square().sum().backward()
    assert rel_err(xs[1].grad, xs[0].grad) <= TOL
    for (n, p), q in zip(eager.named_parameters(), scripted.parameters()):
        assert rel_err(q.grad, p.grad) <= TOL, n  # the PReLU weights' gradients included


def test_scripted_act_block_runs_the_slope_operator():
    eager = randomize_bn(_act_block()).double().train()
    scripted = torch.jit.script(copy.deepcopy(eager))
    x = _input((2, 8, 9, 7)).requires_grad_(True)
    ran = _ops_run(lambda: scripted(x).sum().backward())
    assert {"densenet_fast::dense_block_act_forward", "densenet_fast::dense_block_act_backward"} <= ran
    assert "densenet_fast::dense_block_act_forward" in str(scripted.inlined_graph)


def test_scripted_graph_holds_the_fused_operators():
    scripted = torch.jit.script(dnf.convert(tv_small()).eval())
    graph = str(scripted.inlined_graph)  # forward with every submodule method it calls inlined
    for op in ("dense_block_forward", "transition_forward", "norm_relu_pool_forward", "bn_relu_maxpool"):
        assert f"densenet_fast::{op}" in graph, op
    assert "conv_channels_last" in scripted.features.code  # the plan, readable


def test_scripted_reference_path_for_other_dtypes():
    """The documented rule: inputs the fused kernels of a scripted module do not take (here a bfloat16 model on the
    CPU) run the modules one by one, i.e. torchvision's computation."""
    torch.manual_seed(0)
    tv = randomize_bn(tv_small()).eval()
    scripted = torch.jit.script(dnf.convert(copy.deepcopy(tv))).to(torch.bfloat16)
    x = _input(IMAGE).bfloat16()
    with torch.no_grad():
        ran = _ops_run(lambda: scripted(x))
        got, want = scripted(x), tv.to(torch.bfloat16)(x)
    assert not ran & BLOCK_OPS
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 2e-2


def test_eager_model_unchanged_after_scripting():
    model = dnf.densenet_bc(depth=16, num_classes=5)
    types = [type(m) for m in model.modules()]
    torch.jit.script(model)
    assert [type(m) for m in model.modules()] == types
    assert not any(type(m).__name__.startswith("Scriptable") for m in model.modules())
