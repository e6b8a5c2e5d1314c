"""AOTInductor: ``torch._inductor.aoti_compile_and_package`` of an exported eval model keeps the fused operators as
calls into the dispatcher (AOTInductor's proxy executor runs every custom operator of the graph: densenet_fast's
CPU kernels, registered in C++ with their schemas), and ``aoti_load_package`` runs it with the eager outputs, in this
process and in a fresh one. The reference is the eager model, itself tested against torchvision.

Compiling a package takes a C++ compile of the generated wrapper (~1-3 min on a loaded 2-core machine), so the model
is a small DenseNet-BC and one package serves the tests of this file.
"""
from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import rel_err
from convert_utils import ROOT, randomize_bn

import densenet_fast as dnf

FUSED = {"densenet_fast.dense_block_forward.default", "densenet_fast.transition_forward.default",
         "densenet_fast.norm_relu_pool_forward.default"}


def _x(n=3, seed=0):
    return torch.randn(n, 3, 29, 35, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(dnf.densenet_bc(depth=16, num_classes=5)).eval()
    exported = torch.export.export(model, (_x(),))
    targets = {str(n.target) for gm in exported.graph_module.modules() if isinstance(gm, torch.fx.GraphModule)
               for n in gm.graph.nodes if n.op == "call_function"}  # incl. autocast-region subgraphs
    assert FUSED <= targets, f"the exported graph lacks {FUSED - targets}"
    path = tmp_path_factory.mktemp("aoti") / "densenet_bc.pt2"
    torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
    return model, path


def _ops_run(fn) -> set:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("densenet_fast::")}


def test_aoti_package_runs_fused_kernels_with_eager_outputs(package):
    model, path = package
    loaded = torch._inductor.aoti_load_package(str(path))
    x = _x()
    with torch.no_grad():
        want = model(x)
        ran = _ops_run(lambda: loaded(x))
        got = loaded(x)
    assert {"densenet_fast::dense_block_forward", "densenet_fast::transition_forward",
            "densenet_fast::norm_relu_pool_forward"} <= ran
    # Inductor compiles the ATen parts (stem conv, classifier) itself: its own fp32 rounding there.
    assert rel_err(got, want) <= 1e-5


_LOAD_AND_RUN = textwrap.dedent("""
    import sys
    import torch
    import densenet_fast  # registers the operators the package calls
    loaded = torch._inductor.aoti_load_package(sys.argv[1])
    torch.save(loaded(torch.load(sys.argv[2])), sys.argv[3])
""")


def test_aoti_package_runs_in_a_fresh_process(package, tmp_path):
    model, path = package
    x = _x(seed=1)
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", _LOAD_AND_RUN, str(path), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                   check=True, cwd=ROOT, timeout=600)
    with torch.no_grad():
        assert rel_err(torch.load(tmp_path / "y.pt"), model(x)) <= 1e-5


def test_aoti_train_mode_forward(tmp_path):
    """A train-mode forward (batch statistics; every dense block's call carries its running-statistics lists, which
    the package's proxy executor cannot pass empty) packages and gives the eager outputs."""
    torch.manual_seed(1)
    model = randomize_bn(dnf.densenet_bc(depth=10, num_classes=4)).train()
    x = _x(seed=2)
    exported = torch.export.export(copy.deepcopy(model), (x,))
    path = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "train.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        assert rel_err(loaded(x), model(x)) <= 1e-5


def test_training_step_export_is_refused_by_torch():
    """What docs/deployment.md states: torch.export (hence AOTInductor) cannot capture a backward pass."""

    class Step(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            loss = self.model(x).square().mean()
            loss.backward()
            return loss

    with pytest.raises(RuntimeError, match="fake tensor in the exported program constant's list"):
        torch.export.export(Step(dnf.densenet_bc(depth=10, num_classes=4).train()), (_x(),))
