"""The benchmark suite's own tooling (benchmarks/): measurement helpers, search, reports, one tiny CLI run.

Fast by design: measurements are checked on synthetic workloads; the end-to-end run uses a 3-layer-per-
block DenseNet-BC-sized spec at 8x8 with two implementations and one repeat.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package lives at the root

from benchmarks import measure, report  # noqa: E402
from benchmarks.cli import build_parser, parse_size, resolve  # noqa: E402
from benchmarks.impls import IMPLS, build_model, parse_impls  # noqa: E402
from benchmarks.runner import largest_batch  # noqa: E402
from benchmarks.specs import MODELS, get_spec  # noqa: E402


def test_parse_size():
    assert parse_size("4GiB") == 4 * 1024 ** 3
    assert parse_size("512MiB") == 512 * 1024 ** 2
    assert parse_size("2GB") == 2 * 10 ** 9
    assert parse_size("1000") == 1000
    with pytest.raises(Exception, match="expected a size"):
        parse_size("4 parsecs")


def test_parse_impls():
    assert parse_impls("all") == list(IMPLS)
    assert parse_impls("dnf, tv,dnf") == ["dnf", "tv"]
    with pytest.raises(ValueError, match="--impls"):
        parse_impls("tv,nope")


@pytest.mark.parametrize("budget,expected", [(0, 0), (99, 0), (100, 1), (1000, 10), (12345, 123), (10 ** 9, 200)])
@pytest.mark.parametrize("guess", [1, 7, 50, 5000])
def test_largest_batch_linear(budget, expected, guess):
    calls = []

    def peak(b):
        calls.append(b)
        return 100 * b

    best, probes = largest_batch(peak, budget, guess, max_batch=200)
    assert best == expected
    assert len(calls) == len(set(calls)) <= 20  # each batch probed once


def test_largest_batch_treats_failures_as_over_budget():
    best, _ = largest_batch(lambda b: None if b > 9 else 10 * b, budget=10 ** 6, guess=4, max_batch=1024)
    assert best == 9


def test_step_peak_memory_sees_an_allocation():
    def step():
        a = torch.ones(12_500_000)  # 50 MB, touched
        b = a + 1                   # another 50 MB
        del a, b

    result = measure.step_peak_memory(step, torch.device("cpu"), warmup=1)
    assert 80e6 < result["peak_bytes"] < 160e6, result


def test_saved_tensor_bytes_counts_unique_storages():
    model = torch.nn.Sequential(torch.nn.Linear(100, 50), torch.nn.ReLU(), torch.nn.Linear(50, 10))
    x, y = torch.randn(64, 100), torch.randint(0, 10, (64,))
    out = measure.saved_tensor_bytes(model, x, y)
    # x (first linear), relu output (relu and second linear: one storage), softmax output, targets
    expected = 64 * 100 * 4 + 64 * 50 * 4 + 64 * 10 * 4 + 64 * 8
    assert out["saved_bytes"] == pytest.approx(expected, rel=0.05), out
    assert out["saved_param_bytes"] == 10 * 50 * 4  # the second layer's weight
    assert all(p.grad is not None for p in model.parameters())


def test_every_impl_builds_same_function():
    spec = get_spec("densenet_bc100")
    from benchmarks.impls import torchvision_model

    torch.manual_seed(0)
    state = torchvision_model(spec).state_dict()
    x = torch.randn(2, 3, 32, 32)
    outs = {}
    for name, impl in IMPLS.items():
        if impl.unavailable(spec) or impl.compiled:
            continue
        model = build_model(impl, spec, state, torch.device("cpu")).eval()
        with torch.no_grad():
            outs[name] = model(x)
    ref = outs.pop("tv")
    for name, out in outs.items():
        assert (out - ref).abs().max() < 1e-4, name


def test_presets_and_overrides():
    s = resolve(build_parser().parse_args(["--quick"]))
    assert (s.models, s.batches, s.name, s.compile) == (["densenet121"], [2], "quick", False)
    assert "tv-compile" not in s.impls
    s = resolve(build_parser().parse_args(["--preset", "readme-cpu", "--batch", "4", "--no-compile"]))
    assert (s.batches, s.size, s.device, s.name) == ([4], 224, "cpu", "readme-cpu")
    assert "tv-compile" in s.skipped
    s = resolve(build_parser().parse_args(["--model", "bc100,densenet169", "--sweep-batch", "2,4"]))
    assert s.models == ["densenet_bc100", "densenet169"] and s.batches == [2, 4]
    assert set(MODELS) >= set(s.models)


def _rows():
    base = dict(model="m", size=8, batch=2, device="cpu", dtype="float32", status="ok", note="")
    return [dict(base, impl="tv", label="torchvision", train_ms_median=10.0, train_ms_min=9.0, train_img_s=200.0,
                 peak_bytes=200 * report.MIB, saved_bytes=100 * report.MIB),
            dict(base, impl="dnf", label="densenet_fast fused", train_ms_median=5.0, train_ms_min=4.0,
                 train_img_s=400.0, peak_bytes=50 * report.MIB, saved_bytes=10 * report.MIB),
            dict(base, impl="dnf-convert", label="convert", status="skipped", note="no convert()")]


def test_report_ratios_and_files(tmp_path):
    rows = _rows()
    report.add_ratios(rows)
    assert rows[1]["train_x"] == 0.5 and rows[1]["peak_x"] == 0.25 and rows[1]["saved_x"] == 0.1
    assert rows[0]["train_x"] == 1.0 and rows[2]["train_x"] is None
    table = report.format_table(rows)
    assert "0.25x" in table and "skipped: no convert()" in table
    machine = {"command": "x", "timestamp": "2026-01-01T00:00:00", "cpu_model": "cpu", "logical_cores": 2,
               "ram_bytes": 2 ** 34, "torch": "t", "torch_threads": 2, "densenet_fast": {"version": "v"}}
    report.write_markdown(tmp_path / "r.md", machine, {"repeats": 3}, rows)
    md = (tmp_path / "r.md").read_text()
    assert "| densenet_fast fused | 50 MiB (0.25x) | 10 MiB (0.10x) | 5 ms (0.50x) |" in md
    report.write_csv(tmp_path / "r.csv", rows)
    assert (tmp_path / "r.csv").read_text().splitlines()[0].startswith("model,size,batch")


def test_cli_end_to_end(tmp_path, capsys):
    """One tiny real run: subprocess memory workers, interleaved timing, eval check, files."""
    from benchmarks.__main__ import main

    rc = main(["--model", "densenet_bc100", "--size", "8", "--batch", "2", "--impls", "tv,dnf,dnf-convert",
               "--repeats", "1", "--no-progress", "--out", str(tmp_path), "--name", "t"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "densenet_bc100  8x8  batch 2" in printed
    data = json.loads((tmp_path / "t.json").read_text())
    rows = {r["impl"]: r for r in data["rows"]}
    assert data["machine"]["densenet_fast"]["version"]
    for name in ("tv", "dnf"):
        row = rows[name]
        assert row["status"] == "ok", row
        assert row["train_ms_median"] > 0 and row["eval_ms_median"] > 0 and row["saved_bytes"] > 0
        assert row["peak_bytes"] is not None and row["max_abs_diff"] < 1e-4
    assert rows["dnf"]["saved_bytes"] < rows["tv"]["saved_bytes"]  # the point of the fused block
    if "dnf-convert" in rows and rows["dnf-convert"]["status"] == "skipped":
        assert "convert" in rows["dnf-convert"]["note"]
    assert (tmp_path / "t.csv").exists() and (tmp_path / "t.md").exists()
