"""torch.fx: traced convert()ed torchvision / timm DenseNets compute exactly what eager computes (issue 28 item 4).

timm's model tests require ``torch.all(fx_outputs == outputs)`` after tracing with timm's tracer settings
(``tests/test_models.py::test_model_forward_fx`` upstream: torchvision's ``create_feature_extractor`` with timm's
leaf modules and autowrapped functions, the graph's last node returned). The traced graph calls the fused stem and
pooled head as eager does (densenet_fast/nn/fused_fx.py), so the outputs are bitwise eager's.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import rel_err
from convert_utils import image_batch, randomize_bn, timm_small, tv_small
from torch import nn

import densenet_fast as dnf

torchvision = pytest.importorskip("torchvision")
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names  # noqa: E402

# An eval graph also records the fused stem / pooled head nodes, a training graph the modules alone (fused_fx.py):
# torchvision warns that the two modes' node names differ.
pytestmark = pytest.mark.filterwarnings("ignore:The nodes obtained by tracing the model in train mode")


def _tv121():
    return torchvision.models.densenet121(num_classes=7)


def _timm121():
    timm = pytest.importorskip("timm")
    return timm.create_model("densenet121", pretrained=False, num_classes=7)


def _timm_small():
    pytest.importorskip("timm")
    return timm_small()


MODELS = {"torchvision121": _tv121, "torchvision_small": tv_small, "timm121": _timm121, "timm_small": _timm_small,
          "dnf121": lambda: dnf.densenet121(num_classes=7)}


def _converted(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(MODELS[name]())
    return dnf.convert(model) if not name.startswith("dnf") else model


def _timm_tracer_kwargs() -> dict:
    from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    return dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())


def _last_node_extractor(model: nn.Module, tracer_kwargs=None) -> nn.Module:
    """As timm's ``_create_fx_model``: the graph's last node of each mode, with the given tracer settings."""
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, train_return_nodes=[train_nodes[-1]], eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("tracer", ["symbolic_trace", "torchvision", "timm"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("batch,size", [(2, 64), (3, 45)])
def test_traced_eval_output_is_bitwise_eager(name, tracer, batch, size):
    if tracer == "timm":
        pytest.importorskip("timm")
    model = _converted(name).eval()
    x = image_batch(batch, size=size, seed=batch)
    with torch.no_grad():
        out = model(x)
        if tracer == "symbolic_trace":
            fx_out = torch.fx.symbolic_trace(model)(x)
        else:
            kwargs = _timm_tracer_kwargs() if tracer == "timm" else None
            fx_out = torch.cat(tuple(_last_node_extractor(model, kwargs)(x).values()))
    assert fx_out.shape == out.shape
    assert torch.all(fx_out == out), f"max |fx - eager| = {(fx_out - out).abs().max().item():.3e}"


def test_traced_graph_calls_the_fused_stem_and_head():
    model = _converted("torchvision_small").eval()
    gm = torch.fx.symbolic_trace(model)
    targets = [getattr(n.target, "__name__", n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "run_stem" in targets and "run_pooled_head" in targets, targets
    call_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"features.denseblock1", "features.transition1", "features.denseblock2"} <= call_modules


def test_eval_graph_keeps_stem_and_final_norm_nodes_extractable():
    """The stem's and final norm's own modules stay on a side branch of an eval graph: extractable, with their
    module's value; an extractor that does not return them drops them."""
    model = _converted("torchvision_small").eval()
    x = image_batch(2, size=32)
    ext = create_feature_extractor(model, return_nodes={"features.norm0": "n0", "features.norm5": "n5"})
    with torch.no_grad():
        got = ext(x)
        f = model.features
        n0 = f.norm0(f.conv0(x))
        n5 = f.norm5(f.denseblock2(f.transition1(f.denseblock1(f.pool0(f.relu0(n0.clone()))))))
    assert rel_err(got["n0"], n0) <= 1e-6 and rel_err(got["n5"], n5) <= 1e-5
    last = _last_node_extractor(model)
    assert not any(n.op == "call_module" and n.target == "features.norm5" for n in last.graph.nodes)


@pytest.mark.parametrize("name", ["torchvision_small", "timm_small"])
def test_traced_train_graph_matches_eager_and_updates_stats_once(name):
    """A graph traced in training mode runs the stem and final norm as modules (a side branch would update their
    running statistics twice): outputs within float32 roundoff, every running statistic updated once."""
    model = _converted(name).train()
    twin = copy.deepcopy(model)
    x = image_batch(4, size=32)
    gm = torch.fx.symbolic_trace(model)
    out, fx_out = twin(x), gm(x)
    assert rel_err(fx_out, out) <= 1e-4
    expected = twin.state_dict()
    for key, a in gm.state_dict().items():
        b = expected[key]
        if key.endswith("num_batches_tracked"):
            assert int(a) == int(b), key
        elif "running" in key:
            assert rel_err(a, b) <= 1e-5, key
