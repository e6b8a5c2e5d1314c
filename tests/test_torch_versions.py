"""Issue 27: every torch the metadata promises. CI builds and tests the floor and the GPU image's torch in their
own environments (.ci/other_torch.sh, called by .ci/run); these tests keep the metadata, the runtime check and
CI in step, and run under every torch CI uses."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import densenet_fast as dnf
from densenet_fast._extension import MIN_TORCH, check_torch_version

ROOT = Path(__file__).resolve().parents[1]


def _floor(spec: str) -> tuple:
    m = re.fullmatch(r"torch>=(\d+)\.(\d+)", spec)
    assert m, f"expected a plain torch>=X.Y floor, got {spec!r}"
    return int(m.group(1)), int(m.group(2))


def test_metadata_floor_is_the_runtime_floor_and_ci_builds_it():
    text = (ROOT / "pyproject.toml").read_text()
    specs = re.findall(r'"(torch>=[^"]+)"', text)
    assert len(specs) == 2, specs  # build-system requires and project dependencies
    assert {_floor(s) for s in specs} == {MIN_TORCH}
    ci = (ROOT / ".ci" / "run").read_text()
    floor = f"{MIN_TORCH[0]}.{MIN_TORCH[1]}"
    assert re.search(rf"\.ci/other_torch\.sh {re.escape(floor)}\.\d+ ", ci), "CI must build and test the floor"
    assert re.search(r"\.ci/other_torch\.sh 2\.11\.\d+ ", ci), "CI must build and test the GPU image's torch"


@pytest.mark.parametrize("version", ["2.5.1", "2.4.0+cpu", "1.13.1"])
def test_older_torch_is_a_clear_error(version):
    with pytest.raises(ImportError, match=rf"densenet_fast needs torch >= 2\.6, but torch {re.escape(version)} is "
                                          r"installed: pip install 'torch>=2\.6'"):
        check_torch_version(version)


@pytest.mark.parametrize("version", ["2.6.0", "2.11.0+cu130", "2.14.1", "3.0.0.dev20270101"])
def test_supported_torch_passes(version):
    check_torch_version(version)


def test_running_torch_is_the_one_built_against():
    info = dnf.build_info()
    assert info["torch_built"].split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
