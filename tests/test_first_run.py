"""What a new user meets first: the examples, the benchmark CLI, the README commands and the mistakes people make
in their first minutes (issue 29, "first-run friction"). Each test pins one behaviour."""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision

import densenet_fast as dnf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _run_without(package: str, argv: list, timeout: float = 600) -> subprocess.CompletedProcess:
    """Runs examples/<script> as `python examples/<script> ARGS` does, with ``package`` made uninstalled
    (``sys.modules[package] = None``: imports fail, importlib.util.find_spec finds nothing)."""
    code = (f"import runpy, sys; sys.modules[{package!r}] = None; sys.path.insert(0, {str(ROOT / 'examples')!r}); "
            f"sys.argv = {argv!r}; runpy.run_path(sys.argv[0], run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


# -- 1. optional packages: --help works, a missing package names its pip install ------------------------------
@pytest.mark.parametrize("script, package", [("examples/finetune_monai_3d.py", "monai"),
                                             ("examples/xray_convert.py", "torchxrayvision")])
def test_example_help_and_missing_package(script, package):
    helped = _run_without(package, [script, "--help"])
    assert helped.returncode == 0, helped.stderr
    assert "usage:" in helped.stdout
    ran = _run_without(package, [script])
    assert ran.returncode != 0
    assert f"needs {package}, which is not installed: pip install {package}" in ran.stderr, ran.stderr
    assert '".[medical]"' in ran.stderr and "Traceback" not in ran.stderr


def test_benchmark_preset_without_monai_says_what_to_install(monkeypatch, capsys):
    from benchmarks.cli import run_cli

    monkeypatch.setitem(sys.modules, "monai", None)
    assert run_cli(["--preset", "monai3d-cpu", "--no-progress", "--out", "/nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "monai_densenet121_3d needs monai" in err and "pip install monai" in err and ".[medical]" in err


def test_medical_extra_lists_the_medical_packages():
    text = (ROOT / "pyproject.toml").read_text()
    line = next(x for x in text.splitlines() if x.startswith("medical = "))
    assert "monai" in line and "torchxrayvision" in line


# -- 2. convert() of a model without dense blocks warns ---------------------------------------------------------
def test_convert_without_dense_blocks_warns():
    model = torchvision.models.resnet18()
    with pytest.warns(UserWarning, match=r"no dense block found in ResNet; nothing was converted"):
        dnf.convert(model)
    assert not dnf.conversion_report(model).converted


def test_convert_of_an_already_fused_model_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dnf.convert(dnf.densenet_bc(depth=10, growth_rate=4))


# -- 3. torchvision's weight names ----------------------------------------------------------------------------
@pytest.fixture
def imagenet_download(monkeypatch):
    """torchvision's download, answered with a seeded densenet121's state dict (no network in tests)."""
    import torchvision.models._api as api

    torch.manual_seed(0)
    state = torchvision.models.densenet121().state_dict()
    urls = []

    def fake_download(url, *args, **kwargs):
        urls.append(url)
        return state

    monkeypatch.setattr(api, "load_state_dict_from_url", fake_download)
    return state, urls


@pytest.mark.parametrize("name", ["DEFAULT", "IMAGENET1K_V1", "DenseNet121_Weights.IMAGENET1K_V1"])
def test_weights_by_torchvision_name(name, imagenet_download):
    state, urls = imagenet_download
    model = dnf.densenet121(weights=name)
    assert urls == [torchvision.models.DenseNet121_Weights.IMAGENET1K_V1.url]
    assert model.classifier.out_features == 1000
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_unknown_weights_name_lists_the_valid_ones():
    with pytest.raises(FileNotFoundError, match=r"weights: expected a path .* names \['DEFAULT', 'IMAGENET1K_V1'\], "
                                                r"got 'IMAGENET1K_V9' \(no such file, no such weights\)"):
        dnf.densenet121(weights="IMAGENET1K_V9")


# -- 4. a 1-channel image into a 3-channel model ---------------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 4])
def test_wrong_input_channels_name_in_channels(channels):
    """torchvision's exception type and torch's wording, then the constructor argument that fixes it."""
    model = dnf.densenet_bc(depth=10, growth_rate=4)
    x = torch.randn(2, channels, 16, 17)
    message = (rf"^input: expected input\[2, {channels}, 16, 17\] to have 3 channels, but got {channels} channels "
               rf"\(the model was built with in_channels=3\); for {channels}-channel inputs build the model with "
               rf"in_channels={channels}")
    with pytest.raises(RuntimeError, match=message):
        model(x)
    fixed = dnf.densenet_bc(depth=10, growth_rate=4, in_channels=channels)
    assert fixed(x).shape == (2, 10)


def test_wrong_input_channels_3d():
    model = dnf.densenet121_3d(3, 1, 2, init_features=4, growth_rate=2, block_config=(1, 1), bn_size=1)
    with pytest.raises(RuntimeError, match=r"expected input\[1, 2, 9, 9, 9\] to have 1 channels, but got 2 .*"
                                           r"in_channels=2"):
        model(torch.randn(1, 2, 9, 9, 9))


# -- 6. the benchmark CLI's help and summary line -----------------------------------------------------------------
def test_benchmark_help_is_current():
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "< 1 min" not in text and "PNG plots for --sweep-batch" not in text
    assert "every run draws its figure" in text
    assert "--report regenerates every table and figure" in text


def test_machine_line_is_readable():
    import json

    from benchmarks import report
    machine = json.loads((ROOT / "benchmarks/results/readme-cpu.json").read_text())["machine"]
    line = report.machine_line(machine)
    assert "{" not in line and "GFLOP" not in line
    assert line.startswith(machine["cpu_model"] + ", 2 logical cores") and "AVX-512 + AMX-BF16" in line


# -- 7. the examples' default runs show learning and explain their output -----------------------------------------
def test_monai_example_default_run_beats_chance():
    pytest.importorskip("monai")
    out = subprocess.run([sys.executable, "examples/finetune_monai_3d.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    match = re.search(r"eval accuracy on \d+ fresh volumes: ([0-9.]+) \(chance: ([0-9.]+)\)", out.stdout)
    assert match, out.stdout
    accuracy, chance = float(match.group(1)), float(match.group(2))
    assert accuracy >= 2 * chance, out.stdout


def test_xray_example_explains_random_weights():
    pytest.importorskip("torchxrayvision")
    out = subprocess.run([sys.executable, "examples/xray_convert.py"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "random weights: no pathology probabilities shown" in out.stdout
    assert not re.search(r"^\s+\w[\w ]+\s+[01]\.000$", out.stdout, re.M), out.stdout


# -- 8. ConcatDenseBlock is documented --------------------------------------------------------------------------
def test_concat_dense_block_is_documented():
    from densenet_fast.nn.concat_block import ConcatDenseBlock

    assert "convert()" in ConcatDenseBlock.__doc__ and "forward(" in ConcatDenseBlock.__doc__
    assert "ConcatDenseBlock" in (ROOT / "docs/api.md").read_text()


# -- 9. CI runs README command 2 and the README says what CI needs ----------------------------------------------
def _readme_command(n: int) -> list:
    """The steps (split at &&) of README command n, with the shell's line continuations joined."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"\*\*Command (\d)\*\*.*?```bash\n(.*?)```", text, re.S)
    body = dict(blocks)[str(n)].replace("\\\n", " ")
    return [" ".join(step.split()) for step in body.split("&&")]


def test_ci_runs_readme_command_2():
    """.ci/run runs every step of command 2 after its own `python3 -m venv` (in $VENV, not .venv): the same
    commands, with only pip's -q and pytest's -q -p no:cacheprovider added."""
    steps = _readme_command(2)
    assert steps[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
    ci = (ROOT / ".ci/run").read_text()
    ci_steps = [" ".join(line.split(" 2>")[0].split()) for line in ci.splitlines()
                if line.startswith(("pip install", "python -m pytest"))]
    normalised = [s.replace("pip install -q ", "pip install ").replace(" -q -p no:cacheprovider", "")
                  for s in ci_steps]
    assert normalised == steps[2:]
    assert "kept identical to the README" not in ci


def test_readme_says_ci_needs_a_cuda_toolkit():
    text = " ".join((ROOT / "README.md").read_text().split())
    assert "`.ci/run`" in text and "needs a CUDA toolkit" in text


def test_readme_commands_are_readable():
    text = (ROOT / "README.md").read_text()
    for n in (1, 2):
        steps = _readme_command(n)
        assert steps[-1] == ("python -m benchmarks --quick" if n == 1 else "python -m pytest tests")
    assert "meant for the same clone" in text
    fences = re.findall(r"```bash\n(.*?)```", text, re.S)
    assert all(len(line) <= 100 for block in fences for line in block.splitlines())
