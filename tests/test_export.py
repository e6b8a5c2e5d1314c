"""Deployment paths: ONNX (torch.onnx.export dynamo=True + onnxruntime), torch.export, torch.fx feature
extraction, torch.hub, BN folding for inference (TorchScript: test_torchscript.py).

References are torchvision/timm models with the same weights (and the eager densenet_fast model, itself
tested against them in test_models.py / test_convert.py). Models are small (DenseNet-BC depth 10, small
torchvision/timm DenseNets, densenet121 at 32x32) to keep the file fast.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from conftest import rel_err
from convert_utils import ROOT, image_batch, randomize_bn, timm_small, tv_small
from torch import nn

import densenet_fast as dnf

_HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not _HAVE_ONNX, reason="needs onnx, onnxscript and onnxruntime (the test extra)")


def _tv121():
    import torchvision
    return randomize_bn(torchvision.models.densenet121(num_classes=10)).eval()


def _dnf_from(tv: nn.Module, make) -> nn.Module:
    model = make().to(next(tv.parameters()).dtype)
    model.load_state_dict(tv.state_dict())
    return model.eval()


# -- ONNX -------------------------------------------------------------------------------------------

def _onnx_export(model: nn.Module, x: torch.Tensor, path, dynamic_batch: bool):
    shapes = ({0: torch.export.Dim("batch")},) if dynamic_batch else None
    torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=shapes, verbose=False)
    import onnx
    graph = onnx.load(str(path)).graph
    domains = {(n.domain or "ai.onnx") for n in graph.node}
    assert domains == {"ai.onnx"}, f"non-standard ONNX domains in the graph: {domains}"
    assert not any(n.op_type.startswith("densenet") for n in graph.node)
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), graph


def _ort_run(session, x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.fixture(scope="module")
def onnx_densenet121(tmp_path_factory):
    """densenet121 (random BN statistics) exported once with a dynamic batch dimension."""
    if not _HAVE_ONNX:
        pytest.skip("needs onnx, onnxscript and onnxruntime")
    torch.manual_seed(0)
    tv = _tv121()
    model = _dnf_from(tv, lambda: dnf.densenet121(num_classes=10))
    session, graph = _onnx_export(model, image_batch(2), tmp_path_factory.mktemp("onnx") / "densenet121.onnx", True)
    return tv, model, session, graph


@needs_onnx
@pytest.mark.parametrize("batch", [1, 3])
def test_onnx_densenet121_dynamic_batch(onnx_densenet121, batch):
    tv, model, session, graph = onnx_densenet121
    dim0 = graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param and not dim0.dim_value, "batch dimension is not symbolic"
    x = image_batch(batch, seed=batch)
    with torch.no_grad():
        expected, eager = tv(x), model(x)
    out = _ort_run(session, x)
    assert rel_err(out, expected) <= 1e-5, rel_err(out, expected)
    assert rel_err(out, eager) <= 1e-5, rel_err(out, eager)


def _small_cases():
    """(name, make reference, make model to export: loads the reference's weights)."""
    def bc(**kw):
        return lambda: dnf.densenet_bc(depth=10, growth_rate=6, num_classes=7, **kw)

    def converted(ref):
        return dnf.convert(copy.deepcopy(ref))

    return [
        ("densenet_bc", bc(impl="reference"), lambda ref: _dnf_from(ref, bc())),
        ("se_densenet_bc_block", bc(impl="reference", se_ratio=0.5), lambda ref: _dnf_from(ref, bc(se_ratio=0.5))),
        ("se_densenet_bc_layer", bc(impl="reference", se_ratio=0.5, se_placement="layer"),
         lambda ref: _dnf_from(ref, bc(se_ratio=0.5, se_placement="layer"))),
        ("torchvision_converted", tv_small, converted),
        ("timm_converted", timm_small, converted),
        ("folded", bc(impl="reference"), lambda ref: dnf.fold_for_inference(_dnf_from(ref, bc()))),
    ]


@needs_onnx
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # se_placement="layer" warns that blocks run per layer
@pytest.mark.parametrize("name,make_ref,make_model", _small_cases(), ids=[c[0] for c in _small_cases()])
@pytest.mark.parametrize("dynamic_batch", [False, True], ids=["static", "dynamic"])
def test_onnx_small_models(tmp_path, name, make_ref, make_model, dynamic_batch):
    ref = randomize_bn(make_ref()).eval()
    model = make_model(ref).eval()
    x = image_batch(1 if not dynamic_batch else 2, size=24)
    session, _ = _onnx_export(model, x, tmp_path / f"{name}.onnx", dynamic_batch)
    for n in ([1] if not dynamic_batch else [1, 2, 5]):
        xn = image_batch(n, size=24, seed=n)
        with torch.no_grad():
            expected = ref(xn)
        out = _ort_run(session, xn)
        assert rel_err(out, expected) <= 1e-5, (n, rel_err(out, expected))


@needs_onnx
def test_onnx_export_leaves_eager_path_fused(tmp_path):
    """Export routes to standard ops only while torch.onnx.export runs; afterwards the fused path is back."""
    model = dnf.densenet_bc(depth=10, num_classes=5).eval()
    _onnx_export(model, image_batch(1), tmp_path / "m.onnx", False)
    assert model.features.denseblock1.can_fuse(torch.randn(1, 24, 8, 8))


# -- torch.export -----------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("make", [lambda: dnf.densenet_bc(depth=10, num_classes=5),
                                  lambda: dnf.convert(tv_small())], ids=["densenet_bc", "torchvision_converted"])
def test_torch_export_keeps_fused_ops(make, train):
    model = randomize_bn(make()).train(train)
    x = image_batch(4, size=16)
    twin = copy.deepcopy(model)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for gm in program.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
               for n in gm.graph.nodes if n.op == "call_function"}  # incl. autocast-region subgraphs
    assert any(t.startswith("densenet_fast.") for t in targets), sorted(targets)
    out = program.module()(x)
    expected = twin(x)
    assert rel_err(out, expected) <= 1e-6
    if train:  # the exported program updates the running statistics like the eager model
        for (name, b), b_ref in zip(program.module().named_buffers(), twin.buffers()):
            if name.endswith("running_mean"):
                assert rel_err(b, b_ref) <= 1e-6, name


# -- torch.fx feature extraction --------------------------------------------------------------------

_NODES = {"features.denseblock1": "c2", "features.transition2": "t2", "features.denseblock4": "c5",
          "features.norm5": "n5"}


def _hooked_features(model: nn.Module, x: torch.Tensor, names) -> dict:
    got = {}
    hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o)) for n in names]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return got


@pytest.mark.parametrize("make", [lambda: dnf.densenet121(num_classes=10),
                                  lambda: dnf.convert(__import__("torchvision").models.densenet121(num_classes=10))],
                         ids=["densenet121", "torchvision_converted"])
def test_create_feature_extractor_matches_eager(make):
    from torchvision.models.feature_extraction import create_feature_extractor
    model = randomize_bn(make()).eval()
    extractor = create_feature_extractor(model, return_nodes=_NODES)
    # blocks and transitions stay single (fused) modules in the traced graph
    call_modules = {n.target for n in extractor.graph.nodes if n.op == "call_module"}
    assert {"features.denseblock1", "features.transition1", "features.denseblock4"} <= call_modules
    x = image_batch(2, size=64)
    with torch.no_grad():
        out = extractor(x)
        expected = _hooked_features(model, x, _NODES)
    # The traced graph runs the stem's BN/ReLU/max-pool as plain modules, eager runs the fused stem kernel
    # (BN folded into x*a + b, without ATen's FMA contraction): equal to float32 roundoff.
    for name, key in _NODES.items():
        assert rel_err(out[key], expected[name]) <= 1e-5, name


def test_create_feature_extractor_train_mode_fp64():
    """Train-mode graph (create_feature_extractor traces both modes): same features and running stats."""
    from torchvision.models.feature_extraction import create_feature_extractor
    model = randomize_bn(dnf.densenet_bc(depth=16, num_classes=5)).double().train()
    nodes = {"features.denseblock2": "b2", "features.transition2": "t2", "features.norm5": "n"}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    twin = copy.deepcopy(model)
    x = image_batch(3, size=16, dtype=torch.float64)
    out = extractor(x)
    expected = _hooked_features(twin, x, nodes)
    for name, key in nodes.items():
        assert rel_err(out[key], expected[name]) <= 1e-10, name
    assert rel_err(model.features.norm5.running_var, twin.features.norm5.running_var) <= 1e-10


def test_create_feature_extractor_se_densenet():
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
    model = randomize_bn(dnf.densenet_bc(depth=10, num_classes=5, se_ratio=0.5)).eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    se_nodes = [n for n in eval_nodes if n.endswith(".se") or ".se" in n]
    assert se_nodes, eval_nodes
    extractor = create_feature_extractor(model, return_nodes=[se_nodes[0], "features.denseblock3"])
    x = image_batch(2, size=16)
    with torch.no_grad():
        out = extractor(x)
        expected = _hooked_features(model, x, [se_nodes[0], "features.denseblock3"])
    # The model's own forward folds the un-hooked SEs into the transitions after them (docs/design.md §5); the
    # extractor runs each module on its own: the same function, rounded differently from the first fold on.
    for name in expected:
        torch.testing.assert_close(out[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_intermediate_layer_getter():
    from torchvision.models._utils import IntermediateLayerGetter
    model = randomize_bn(dnf.densenet121(num_classes=10)).eval()
    getter = IntermediateLayerGetter(model.features, {"denseblock2": "0", "denseblock3": "1"})
    x = image_batch(2, size=64)
    with torch.no_grad():
        out = getter(x)
        expected = _hooked_features(model, x, ["features.denseblock2", "features.denseblock3"])
    # The getter runs the stem unfused (plain modules): equal to float32 roundoff (see above).
    assert rel_err(out["0"], expected["features.denseblock2"]) <= 1e-5
    assert rel_err(out["1"], expected["features.denseblock3"]) <= 1e-5


def test_fpn_backbone_example():
    import runpy
    result = runpy.run_path(str(ROOT / "examples" / "fpn_backbone.py"), run_name="not_main")
    backbone = result["build_backbone"]()
    x = image_batch(2, size=64)
    with torch.no_grad():
        feats = backbone.eval()(x)
    assert list(feats) == ["0", "1", "2", "pool"]
    assert all(f.shape[1] == backbone.out_channels for f in feats.values())
    assert [tuple(f.shape[2:]) for f in feats.values()] == [(8, 8), (4, 4), (2, 2), (1, 1)]


# -- torch.hub --------------------------------------------------------------------------------------

def test_hub_load_local():
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")  # hub.list has no local source
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    assert hubconf.dependencies == ["torch"]
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert {"densenet121", "densenet161", "densenet169", "densenet201", "densenet_bc", "se_densenet121",
            "se_densenet169", "se_densenet201", "convert"} <= entries
    model = torch.hub.load(str(ROOT), "densenet121", source="local", num_classes=10)
    assert isinstance(model, dnf.DenseNet) and model.classifier.out_features == 10
    tv = _tv121()
    model.load_state_dict(tv.state_dict())
    x = image_batch(1)
    with torch.no_grad():
        assert rel_err(model.eval()(x), tv(x)) <= 1e-5
    bc = torch.hub.load(str(ROOT), "densenet_bc", source="local", depth=10)
    assert isinstance(bc, dnf.DenseNet)
    converted = torch.hub.load(str(ROOT), "convert", tv_small(), source="local")  # positional: load() has `model`
    assert type(converted.features).__name__ == "FusedFeatures"


# -- BN folding for inference -----------------------------------------------------------------------

@pytest.mark.parametrize("name,make_ref,make_model", [
    ("densenet_bc", lambda: dnf.densenet_bc(depth=16, num_classes=5, impl="reference"),
     lambda ref: _dnf_from(ref, lambda: dnf.densenet_bc(depth=16, num_classes=5))),
    ("densenet_imagenet_stem", tv_small, lambda ref: _dnf_from(ref, lambda: dnf.DenseNet(
        growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=5))),
    ("torchvision", tv_small, lambda ref: copy.deepcopy(ref)),
    ("torchvision_converted", tv_small, lambda ref: dnf.convert(copy.deepcopy(ref))),
    ("timm_converted", timm_small, lambda ref: dnf.convert(copy.deepcopy(ref))),
], ids=lambda v: v if isinstance(v, str) else "")
def test_fold_for_inference_parity(name, make_ref, make_model):
    ref64 = randomize_bn(make_ref()).double().eval()
    model = make_model(ref64)
    before = copy.deepcopy(model.state_dict())
    folded = dnf.fold_for_inference(model)
    assert not folded.training
    for k, v in model.state_dict().items():  # inplace=False: the model is left as it was
        assert torch.equal(v, before[k]), k
    layers = [m for m in folded.modules() if hasattr(m, "conv1") and hasattr(m, "norm2")]
    assert layers and all(layer.conv1.bias is not None for layer in layers)
    assert all(not isinstance(layer.norm2, nn.BatchNorm2d) for layer in layers)
    x64 = image_batch(3, size=32, dtype=torch.float64)
    with torch.no_grad():
        truth = ref64(x64)
        assert rel_err(folded(x64), truth) <= 1e-9
        # fp32: no worse than 2x torchvision's own fp32 error against the fp64 truth
        ref32, folded32 = copy.deepcopy(ref64).float(), copy.deepcopy(folded).float()
        x32 = x64.float()
        err_ref, err = rel_err(ref32(x32), truth), rel_err(folded32(x32), truth)
    assert err <= max(2 * err_ref, 1e-6), (err, err_ref)


def test_fold_bn_into_conv_and_bad_input():
    conv, bn = nn.Conv2d(5, 7, 1, bias=True).double(), randomize_bn(nn.BatchNorm2d(7)).double().eval()
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    assert rel_err(dnf.inference.fold_bn_into_conv(conv, bn)(x), bn(conv(x))) <= 1e-12
    with pytest.raises(ValueError, match="bn: expected 7 features"):
        dnf.inference.fold_bn_into_conv(nn.Conv2d(5, 7, 1), nn.BatchNorm2d(6))
    with pytest.raises(TypeError, match="model: expected an nn.Module, got str"):
        dnf.fold_for_inference("densenet121")


def test_fx_symbolic_trace_leaf_and_root():
    block = dnf.DenseBlock(2, 8, 2, 4).eval()
    traced = torch.fx.symbolic_trace(nn.Sequential(block))
    assert [n.op for n in traced.graph.nodes] == ["placeholder", "call_module", "output"]
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        assert torch.equal(traced(x), block(x))
    with pytest.raises(TypeError, match="trace that model"):
        torch.fx.symbolic_trace(block)
