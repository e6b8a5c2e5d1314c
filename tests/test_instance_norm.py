"""Issue 28 item 6: InstanceNorm in the fused dense block (``dense_block_in_forward``, CPU kernels).

* the operator: fp64 gradcheck (input, every parameter, with and without LeakyReLU slopes), opcheck, errors;
* MONAI DenseNet121 (2-D and 3-D) built with ``norm="instance"`` and ``("instance", {"affine": True})``:
  ``convert()`` fuses its blocks (stem, transitions and head stay MONAI's, reported), fp64 ≤ 1e-9 against the
  unconverted model over two SGD steps (outputs and every gradient), batch 1 and 2, odd sizes; fp32 no worse than
  2x MONAI's own fp32 error and bf16 autocast no worse than 1.5x MONAI's own bf16 error against the fp64 truth;
* what stays on the reference path: ``track_running_stats=True``, devices without the operator (CUDA kernels:
  tests/test_cuda_emulation.py, tests/test_cuda_dense_block.py);
* TorchScript copies call the operator (tests/test_torchscript.py: eval, training, a fresh process).
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err, rel_l2_err
from torch import nn

from densenet_fast.convert import conversion_report, convert
from densenet_fast.nn.concat_block import ConcatDenseBlock
from densenet_fast.nn.instance_block import instance_block_problem
from densenet_fast.ops import instance_block as in_ops

monai_nets = pytest.importorskip("monai.networks.nets")

from test_monai_xrv import SHAPES, _inputs, _train_steps, monai_small  # noqa: E402

_op = torch.ops.densenet_fast.dense_block_in_forward


def _op_args(dtype=torch.float64, L=2, C0=3, k=2, inter=4, N=2, spatial=(4, 3)):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    x = rnd(N, C0, *spatial)
    one = (1,) * len(spatial)
    three = (3,) * len(spatial)
    cs = [C0 + i * k for i in range(L)]
    params = [[1 + 0.2 * rnd(c) for c in cs], [0.1 * rnd(c) for c in cs], [rnd(inter, c, *one) for c in cs],
              [1 + 0.2 * rnd(inter) for _ in cs], [0.1 * rnd(inter) for _ in cs], [rnd(k, inter, *three) for _ in cs]]
    slopes = 0.3 * rnd(sum(c + inter for c in cs))
    return x, params, slopes


@pytest.mark.parametrize("slopes_on", [False, True], ids=["relu", "leaky"])
@pytest.mark.parametrize("spatial,N", [((4, 3), 2), ((3, 2, 3), 1)], ids=["2d_b2", "3d_b1"])
def test_op_gradcheck_fp64(slopes_on, spatial, N):
    x, params, slopes = _op_args(spatial=spatial, N=N)
    leaves = [x] + ([slopes] if slopes_on else []) + [t for lst in params for t in lst]
    for t in leaves:
        t.requires_grad_(True)
    L = len(params[0])

    def f(x, *rest):
        s = rest[0] if slopes_on else None
        flat = rest[1:] if slopes_on else rest
        lists = [list(flat[i * L:(i + 1) * L]) for i in range(6)]
        return _op(x, *lists, 1e-5, s)[0]

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_op_matches_instance_norm_layers_fp64():
    """The operator against F.instance_norm / conv, layer by layer (an independent check of the buffer and the
    per-sample statistics it returns)."""
    x, params, _ = _op_args(N=3, spatial=(5, 7))
    buf, mean, var, mean2, var2 = _op(x, *params, 1e-5)
    feats = x
    for i in range(2):
        z = nn.functional.instance_norm(feats, weight=params[0][i], bias=params[1][i], eps=1e-5)
        y = nn.functional.conv2d(torch.relu(z), params[2][i])
        assert rel_err(mean2[i], y.mean((2, 3))) <= 1e-12
        assert rel_err(var2[i], y.var((2, 3), unbiased=False)) <= 1e-12
        z2 = nn.functional.instance_norm(y, weight=params[3][i], bias=params[4][i], eps=1e-5)
        feats = torch.cat([feats, nn.functional.conv2d(torch.relu(z2), params[5][i], padding=1)], 1)
    assert rel_err(buf, feats) <= 1e-12
    assert rel_err(mean, feats.mean((2, 3))) <= 1e-12 and rel_err(var, feats.var((2, 3), unbiased=False)) <= 1e-12


def test_op_opcheck_and_errors():
    x, params, slopes = _op_args(dtype=torch.float32)
    torch.library.opcheck(_op, (x, *params, 1e-5, None))
    torch.library.opcheck(_op, (x, *params, 1e-5, slopes))
    with pytest.raises(ValueError, match=r"Expected more than 1 spatial element when training, got input size"):
        _op(x[:, :, :1, :1], *params, 1e-5)
    with pytest.raises(RuntimeError, match=r"slopes \(per layer: .*\): expected shape \[16\], got \[15\]"):
        _op(x, *params, 1e-5, slopes[:-1])
    with pytest.raises(RuntimeError, match=r"norm1_weight\[1\] \(layer input channels C0 \+ l\*growth_rate\): "
                       r"expected shape \[5\], got \[4\]"):
        _op(x, params[0][:1] + [params[0][1][:-1]], *params[1:], 1e-5)
    buf, mean, var, mean2, var2 = _op(x, *params, 1e-5)
    bwd = torch.ops.densenet_fast.dense_block_in_backward
    with pytest.raises(RuntimeError, match=r"mean: expected shape \[2, 7\], got \[7\]"):
        bwd(buf, buf, mean[0], var, mean2, var2, *params, 1e-5, 3)


# -- MONAI ---------------------------------------------------------------------------------------------

NORMS = {"instance": "instance", "instance_affine": ("instance", {"affine": True})}


def _monai(spatial_dims: int, norm, dtype=torch.float64, act="relu") -> nn.Module:
    model = monai_small(spatial_dims, norm=norm, act=act)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.affine:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model.to(dtype)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_monai_instance_converted_and_parity_fp64(spatial_dims, norm, batch):
    model = _monai(spatial_dims, NORMS[norm])
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    with pytest.warns(UserWarning, match="the fused transition computes BatchNorm only"):
        convert(model)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert list(model.state_dict()) == list(ref.state_dict())
    report = conversion_report(model)
    assert report.count("ConcatDenseBlock") == 2, str(report)
    affine = "True" if norm == "instance_affine" else "False"
    assert all(f"InstanceNorm (affine={affine}) fused" in what for _, what in report.converted
               if what.startswith("ConcatDenseBlock")), str(report)
    left = dict(report.left_alone)
    assert "features.transition1" in left and "" in left, str(report)  # transition and head: unfused
    assert isinstance(model.features.denseblock2, ConcatDenseBlock)
    assert model.features.denseblock2.can_fuse(torch.randn(2, 16, *[5] * spatial_dims, dtype=torch.float64))
    shape = (batch,) + SHAPES[spatial_dims][1:]
    _train_steps([model, ref], _inputs(shape), 1e-9)
    model.eval(), ref.eval()  # no running statistics: eval normalises per sample as well
    with torch.no_grad():
        x = _inputs(shape, 1)[0]
        assert rel_err(model(x), ref(x)) <= 1e-9


def test_monai_instance_leakyrelu_parity_fp64():
    model = _monai(2, NORMS["instance_affine"], act=("leakyrelu", {"negative_slope": 0.1}))
    ref = copy.deepcopy(model)
    convert(model, warn=False)
    what = dict(conversion_report(model).converted)["features.denseblock1"]
    assert "InstanceNorm" in what and "LeakyReLU activations fused" in what
    _train_steps([model, ref], _inputs(SHAPES[2]), 1e-9)


def _step(m, x, g, autocast=False):
    m.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = m(xi)
    y.backward(g.to(y.dtype))
    return [y.double(), xi.grad.double(), torch.cat([p.grad.double().flatten() for p in m.parameters()])]


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_monai_instance_fp32_vs_fp64_truth(spatial_dims, norm):
    """fp32: output, input gradient and all parameter gradients no worse than 2x MONAI's own fp32 error against
    the fp64 truth."""
    base = _monai(spatial_dims, NORMS[norm], torch.float32).train()
    ours = convert(copy.deepcopy(base), warn=False)
    truth = copy.deepcopy(base).double()
    x = _inputs(SHAPES[spatial_dims], 1, torch.float32)[0]
    g = torch.randn(x.shape[0], 3, generator=torch.Generator().manual_seed(3))
    t = _step(truth, x.double(), g.double())
    for a, b, tr, what in zip(_step(ours, x, g), _step(base, x, g), t, ("output", "input grad", "param grads")):
        err_o, err_t = rel_l2_err(a, tr), rel_l2_err(b, tr)
        assert err_o <= 2 * err_t + 1e-12, f"{what}: ours {err_o:.3e} > 2 x MONAI {err_t:.3e}"


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_monai_instance_autocast_bf16_vs_fp64_truth(spatial_dims, norm):
    """CPU bf16 autocast: output and all parameter gradients (summed over two seeds) no worse than 1.5x MONAI's own
    bf16 error against the fp64 truth."""
    errs = torch.zeros(2, 2, dtype=torch.float64)  # [ours, MONAI] x [output, parameter gradients]
    for seed in range(2):
        base = _monai(spatial_dims, NORMS[norm], torch.float32).train()
        ours = convert(copy.deepcopy(base), warn=False)
        truth = copy.deepcopy(base).double()
        shape = (3,) + SHAPES[spatial_dims][1:]
        x = torch.randn(shape, generator=torch.Generator().manual_seed(20 + seed))
        g = torch.randn(3, 3, generator=torch.Generator().manual_seed(30 + seed))
        t = _step(truth, x.double(), g.double())
        for i, m in enumerate((ours, base)):
            r = _step(m, x, g, autocast=True)
            errs[i] += torch.tensor([rel_l2_err(r[0], t[0]), rel_l2_err(r[2], t[2])])
    for k, what in enumerate(("output", "parameter gradients")):
        ours, ref = errs[0, k].item(), errs[1, k].item()
        assert ours <= 1.5 * ref + 1e-4, f"{what}: ours {ours:.3e} > 1.5 x MONAI {ref:.3e}"


def test_monai_instance_running_stats_left_alone():
    model = _monai(3, ("instance", {"track_running_stats": True}))
    ref = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="track_running_stats=True"):
        convert(model)
    assert conversion_report(model).count("ConcatDenseBlock") == 0
    x = _inputs(SHAPES[3], 1)[0]
    model.eval(), ref.eval()
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) <= 1e-9


def test_non_cpu_takes_the_reference_path_with_a_reason():
    model = convert(_monai(2, "instance"), warn=False)
    units = model.features.denseblock1._layers()
    reason = instance_block_problem(units, torch.empty(2, 8, 5, 5, device="meta", dtype=torch.float64))
    assert reason is not None and "the meta kernels do not fuse" in reason


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_runs_the_operator():
    model = convert(_monai(2, NORMS["instance_affine"]), warn=False).eval()
    x = _inputs(SHAPES[2], 1)[0]
    scripted = torch.jit.script(model)
    assert "densenet_fast::dense_block_in_forward" in str(scripted.inlined_graph)
    with torch.no_grad():
        assert rel_err(scripted(x), model(x)) <= 1e-12


def test_fused_instance_block_entry_point():
    x, params, _ = _op_args(N=2)
    out = in_ops.fused_instance_block(x, in_ops.InstanceBlockParams(*params))
    assert out.buffer.shape == (2, 7, 4, 3) and out.mean.shape == (2, 7) and out.mean2.shape == (2, 2, 4)
    with pytest.raises(TypeError, match="params: expected an InstanceBlockParams"):
        in_ops.fused_instance_block(x, params[:3])


def test_compile_fullgraph_block():
    """torch.compile(fullgraph=True) of a converted InstanceNorm block captures the fused operator (fake kernels)
    and computes what the reference path computes, forward and backward."""
    model = convert(_monai(2, NORMS["instance_affine"]), warn=False)
    blk = model.features.denseblock1
    ref = copy.deepcopy(blk)
    ref.impl = "reference"
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(str(gm.graph))
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    compiled = torch.compile(blk, fullgraph=True, backend=backend)
    x = torch.randn(2, 8, 9, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out, expected = compiled(x), ref(x)
    assert any("dense_block_in_forward" in g for g in graphs)
    assert rel_err(out, expected) <= 1e-10
    out.square().sum().backward(), expected.square().sum().backward()
    for (n, p), (_, q) in zip(blk.named_parameters(), ref.named_parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-9, n


def test_double_backward_names_the_operator():
    x, params, _ = _op_args()
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(_op(x, *params, 1e-5)[0].square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"double backward through densenet_fast::dense_block_in_forward"):
        g.sum().backward()


@pytest.mark.parametrize("norm", list(NORMS))
def test_monai_instance_bf16_model_vs_fp64_truth(norm):
    """A ``.bfloat16()`` model (bf16 InstanceNorm parameters read in fp32 by the kernels): output and all parameter
    gradients (summed over two seeds) no worse than 1.5x MONAI's own ``.bfloat16()`` model against the fp64 truth."""
    errs = torch.zeros(2, 2, dtype=torch.float64)
    for seed in range(2):
        base = _monai(2, NORMS[norm], torch.float32).train()
        ours = convert(copy.deepcopy(base), warn=False).bfloat16()
        truth = copy.deepcopy(base).double()
        x = torch.randn((3,) + SHAPES[2][1:], generator=torch.Generator().manual_seed(20 + seed))
        g = torch.randn(3, 3, generator=torch.Generator().manual_seed(30 + seed))
        t = _step(truth, x.double(), g.double())
        for i, m in enumerate((ours, copy.deepcopy(base).bfloat16())):
            r = _step(m, x.bfloat16(), g)
            errs[i] += torch.tensor([rel_l2_err(r[0], t[0]), rel_l2_err(r[2], t[2])])
    for k, what in enumerate(("output", "parameter gradients")):
        ours, ref = errs[0, k].item(), errs[1, k].item()
        assert ours <= 1.5 * ref + 1e-4, f"{what}: ours {ours:.3e} > 1.5 x MONAI {ref:.3e}"
