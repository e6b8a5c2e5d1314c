"""The benchmark suite's own tooling (benchmarks/): measurement helpers, search, reports, one tiny CLI run.

Fast by design: measurements are checked on synthetic workloads; the end-to-end run uses a 3-layer-per-
block DenseNet-BC-sized spec at 8x8 with two implementations and one repeat.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package lives at the root

from benchmarks import harness, measure, micro_report, plots, report  # noqa: E402
from benchmarks.cli import PRESETS, build_parser, parse_size, resolve  # noqa: E402
from benchmarks.impls import IMPLS, build_model, parse_impls  # noqa: E402
from benchmarks.runner import largest_batch, run_worker  # noqa: E402
from benchmarks.specs import MODELS, get_spec  # noqa: E402
from benchmarks.timing import NOISY_RATIO, summarize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.mark.parametrize("largest", [1, 63, 64, 100, 1000, 5000])
def test_largest_batch_relative_tolerance(largest):
    """bench_cuda_block's search: doubling from 64, then bisecting to 1/16 of the batch (fewer probes)."""
    exact, exact_probes = largest_batch(lambda b: None if b > largest else 0, 0, 64, 16384, growth=2.0)
    best, probes = largest_batch(lambda b: None if b > largest else 0, 0, 64, 16384, growth=2.0, rel_tol=1 / 16)
    assert exact == largest
    assert largest - largest / 16 - 1 <= best <= largest
    assert len(probes) <= len(exact_probes)


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
        # compiling takes minutes on a CPU (tested through the same builders); 3-D impls build 3-D specs only
        if impl.compiled or impl.unavailable(spec) is not None:
            continue
        assert impl.unavailable() is None, (name, impl.unavailable())  # the test extra installs every family
        model = build_model(impl, spec, state, torch.device("cpu")).eval()
        with torch.no_grad():
            outs[name] = model(x)
    ref = outs.pop("tv")
    # The SE-DenseNet rows compute another function (SE gates on torchvision's weights): folded == unfolded.
    se, se_unfolded = outs.pop("dnf-se"), outs.pop("dnf-se-unfolded")
    assert (se - se_unfolded).abs().max() < 1e-4 and (se - ref).abs().max() > 1e-3
    for name, out in outs.items():
        assert (out - ref).abs().max() < 1e-4, name


def test_monai_2d_impls_load_torchvision_weights():
    """MONAI's 2-D DenseNet121 (and its convert()) computes torchvision's function from the shared weights."""
    spec = get_spec("densenet121")
    from benchmarks.impls import torchvision_model

    torch.manual_seed(0)
    state = torchvision_model(spec).state_dict()
    x = torch.randn(2, 3, 64, 64)
    outs = {}
    for name in ("tv", "monai-2d", "monai-2d-convert"):
        model = build_model(IMPLS[name], spec, state, torch.device("cpu")).eval()
        with torch.no_grad():
            outs[name] = model(x)
    assert type(build_model(IMPLS["monai-2d-convert"], spec, state, torch.device("cpu"))).__name__.startswith("Fused")
    for name in ("monai-2d", "monai-2d-convert"):
        assert (outs[name] - outs["tv"]).abs().max() < 1e-4, name
    assert IMPLS["monai-2d"].unavailable(get_spec("densenet_bc100")) is not None


def test_3d_rows_ratios_vs_monai():
    from benchmarks import report
    rows = [dict(model="monai_densenet121_3d", size=96, batch=2, device="cpu", dtype="float32", impl=i,
                 peak_bytes=p) for i, p in (("monai", 1000), ("monai-convert", 200))]
    report.add_ratios(rows)
    assert rows[1]["peak_x"] == 0.2 and rows[0]["peak_x"] == 1.0


def test_budget_axis_size():
    s = resolve(build_parser().parse_args(["--preset", "monai3d-budget", "--budget-axis", "size"]))
    assert s.budget_axis == "size" and s.budget_bytes == 512 * 2 ** 20 and s.models == ["monai_densenet121_3d"]
    assert resolve(build_parser().parse_args(["--preset", "monai3d-budget"])).budget_axis == "batch"


def test_se_rows_keep_their_weights_and_get_ratios_vs_dnf():
    from benchmarks import report
    from benchmarks.impls import torchvision_model

    spec = get_spec("densenet_bc100")
    state = torchvision_model(spec).state_dict()
    a = build_model(IMPLS["dnf-se"], spec, state, torch.device("cpu"))
    b = build_model(IMPLS["dnf-se-unfolded"], spec, state, torch.device("cpu"))
    a.load_state_dict(state)  # as the benchmark reloads before timing: the SE weights stay, torchvision's load
    assert a.features.fold_se and not b.features.fold_se
    torch.testing.assert_close(a.state_dict(), b.state_dict(), rtol=0, atol=0)
    key = dict(model="m", size=32, batch=2, device="cpu", dtype="float32", status="ok")
    rows = [dict(key, impl="tv", train_ms_median=4.0, peak_bytes=400, saved_bytes=300),
            dict(key, impl="dnf", train_ms_median=2.0, peak_bytes=100, saved_bytes=50),
            dict(key, impl="dnf-se", train_ms_median=2.1, peak_bytes=110, saved_bytes=60)]
    report.add_ratios(rows)
    assert rows[2]["peak_x_dnf"] == pytest.approx(1.1) and rows[2]["saved_extra_bytes"] == 10
    assert "dnf-se vs dnf: step 1.05x, peak 1.10x" in report.format_table(rows)


def test_presets_and_overrides():
    s = resolve(build_parser().parse_args(["--quick"]))
    assert (s.models, s.batches, s.name, s.compile, s.figure) == (["densenet121"], [2], "quick", False, "bars")
    assert s.impls == ["tv", "tv-memeff", "dnf"] and s.repeats == 3 and s.dtypes == ["float32"]
    assert "tv-compile" not in s.impls
    s = resolve(build_parser().parse_args(["--preset", "readme-cpu", "--batch", "4", "--no-compile"]))
    assert (s.batches, s.size, s.device, s.name) == ([4], 224, "cpu", "readme-cpu")
    assert {"tv-compile", "dnf-compile"} <= set(s.skipped) and not {"tv-compile", "dnf-compile"} & set(s.impls)
    s = resolve(build_parser().parse_args(["--model", "bc100,densenet169", "--sweep-batch", "2,4"]))
    assert s.models == ["densenet_bc100", "densenet169"] and s.batches == [2, 4] and s.figure == "batch"
    assert set(MODELS) >= set(s.models)


def test_preset_readme_cpu_has_bf16_and_compiled_rows():
    s = resolve(build_parser().parse_args(["--preset", "readme-cpu"]))
    assert s.dtypes == ["float32", "bfloat16"] and s.compile
    assert {"tv", "timm", "tv-memeff", "tv-compile", "dnf", "dnf-compile"} <= set(s.impls_for("float32"))
    assert s.impls_for("bfloat16") == ["tv", "dnf"]
    s = resolve(build_parser().parse_args(["--preset", "readme-cpu", "--dtype", "bfloat16", "--lowp-impls", "tv"]))
    assert s.dtypes == ["bfloat16"] and s.impls_for("bfloat16") == ["tv"]


def test_preset_mem_depth():
    s = resolve(build_parser().parse_args(["--preset", "mem-depth"]))
    specs = [get_spec(m) for m in s.models]
    assert all(sp.cifar and sp.size == 32 for sp in specs) and s.batches == [16] and s.figure == "depth"
    assert {sp.growth_rate for sp in specs} == {12, 24}
    depths = sorted({2 * sum(sp.block_config) + 4 for sp in specs})
    assert depths[0] == 40 and depths[-1] == 250
    assert set(s.impls) == {"tv", "tv-memeff", "dnf"}
    assert (s.timing, s.eval, s.memory, s.mem_cap_bytes, s.jobs, s.threads) == (False, False, True, 3 * 2 ** 30, 3, 1)
    # an explicit flag overrides the preset
    s = resolve(build_parser().parse_args(["--preset", "mem-depth", "--mem-cap", "2GiB", "--batch", "8"]))
    assert s.mem_cap_bytes == 2 * 1024 ** 3 and s.batches == [8]


def test_preset_mem_batch_and_budget():
    s = resolve(build_parser().parse_args(["--preset", "mem-batch"]))
    assert s.models == ["densenet121"] and s.batches == [1, 4, 16, 32] and s.figure == "batch"
    assert {"tv", "tv-memeff", "dnf"} == set(s.impls)
    assert not s.timing and s.memory
    s = resolve(build_parser().parse_args(["--preset", "budget"]))
    assert s.budget_bytes == 768 * 1024 ** 2 and s.figure == "budget" and s.timing
    s = resolve(build_parser().parse_args(["--preset", "budget", "--budget", "3GiB"]))
    assert s.budget_bytes == 3 * 1024 ** 3
    assert set(PRESETS) == {"quick", "readme-cpu", "mem-depth", "mem-batch", "budget", "monai3d-cpu", "monai3d-128",
                            "monai3d-budget", "monai2d-cpu", "se-cpu", "readme-cpu-b32", "deep-cpu",
                            "bc250-cpu"}


@pytest.mark.parametrize("argv,message", [
    (["--dtype", "float64"], "--dtype"), (["--sweep-batch", "2,0"], "--sweep-batch"),
    (["--mem-cap", "lots"], "--mem-cap"), (["--preset", "nope"], "--preset")])
def test_bad_arguments_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(argv)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name,depth,k", [("densenet_bc40", 40, 12), ("bc250", 250, 24),
                                          ("densenet_bc250_k24", 250, 24), ("densenet_bc70_k24", 70, 24)])
def test_densenet_bc_specs_by_depth(name, depth, k):
    spec = get_spec(name)
    assert spec.cifar and spec.growth_rate == k and spec.num_init_features == 2 * k
    assert 6 * spec.block_config[0] + 4 == depth and len(set(spec.block_config)) == 1


@pytest.mark.parametrize("name", ["densenet_bc41", "densenet_bc4", "resnet50"])
def test_bad_model_names(name):
    with pytest.raises(ValueError, match="--model"):
        get_spec(name)


def test_summarize_flags_noisy_repeats():
    steady = summarize([1.0, 1.02, 1.01], batch=4)
    assert steady["noisy"] is False and steady["ms_min"] == 1000.0 and steady["img_s"] == pytest.approx(4 / 1.01)
    noisy = summarize([1.0, NOISY_RATIO * 1.5, NOISY_RATIO * 2], batch=4)
    assert noisy["noisy"] is True


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
    assert "| densenet_fast fused | 50 MiB (0.25x) | 10 MiB (0.10x) | 5 (4) ms, 0.50x (0.44x) |" in md
    assert "times are median (min) of 3 interleaved repeats" in md
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
    assert rows["dnf-convert"]["status"] == "ok", rows["dnf-convert"]
    assert rows["dnf-convert"]["saved_bytes"] == rows["dnf"]["saved_bytes"]  # the same fused blocks
    assert (tmp_path / "t.csv").exists() and (tmp_path / "t.md").exists()
    assert (tmp_path / "t.png").stat().st_size > 0 and f"figure: {tmp_path / 't.png'}" in printed
    assert (data["settings"]["figure"], data["settings"]["figure_file"]) == ("bars", "t.png")


# -- figures --------------------------------------------------------------------------------------------
_MACHINE = {"cpu_model": "Test CPU", "logical_cores": 2, "torch": "t", "load_average": [0.1, 0.1, 0.1]}
_PNG = b"\x89PNG\r\n\x1a\n"


def _synthetic(kind):
    """A tiny result set of the shape each figure kind reads (as cli.run_cli produces it)."""
    rows = []
    base = dict(size=32, device="cpu", dtype="float32", status="ok", note="")
    impls = [("tv", "torchvision", 2.0), ("tv-memeff", "torchvision memory_efficient=True", 1.5),
             ("dnf", "densenet_fast fused", 1.0)]
    if kind == "depth":
        for k in (12, 24):
            for depth in (40, 100, 250):
                for impl, label, power in impls:
                    row = dict(base, model=f"densenet_bc{depth}_k{k}", depth=depth, growth_rate=k, batch=64,
                               impl=impl, label=label, peak_bytes=int(1e3 * k * depth ** power),
                               saved_bytes=int(5e2 * k * depth ** power))
                    if impl == "tv" and depth == 250:  # over the memory cap: no numbers
                        row.update(status="oom", note="out of memory", peak_bytes=None, saved_bytes=None)
                    rows.append(row)
    else:
        batches = (1, 2, 4) if kind == "batch" else (3,)
        for dtype in (("float32", "bfloat16") if kind == "bars" else ("float32",)):
            for b in batches:
                for n, (impl, label, power) in enumerate(impls):
                    rows.append(dict(base, model="m", depth=40, growth_rate=12, batch=b, dtype=dtype, impl=impl,
                                     label=label, peak_bytes=(3 - n) * b * report.MIB, saved_bytes=(3 - n) * b * 1000,
                                     train_ms_median=10.0 * b + n, train_ms_min=9.0 * b, eval_ms_median=3.0 + n,
                                     max_batch=(8 * (n + 1) if kind == "budget" else None),
                                     budget_train_ms_median=(50.0 * (n + 1) if kind == "budget" else None),
                                     budget_train_img_s=(8 * (n + 1) / (0.05 * (n + 1)) if kind == "budget" else None)))
    report.add_ratios(rows)
    return rows


@pytest.mark.parametrize("kind", ["bars", "batch", "depth", "budget"])
def test_every_figure_kind_writes_a_png(kind, tmp_path):
    path = plots.write_figure(_synthetic(kind), _MACHINE, {"figure": kind, "budget_bytes": 2 ** 30,
                                                           "mem_cap_bytes": 6 * 2 ** 30}, tmp_path / f"{kind}.png")
    assert path == tmp_path / f"{kind}.png"
    data = path.read_bytes()
    assert data.startswith(_PNG) and len(data) > 10_000  # a real image, not an empty canvas


def test_figure_of_a_run_without_numbers_is_not_written(tmp_path):
    rows = [dict(model="m", size=8, batch=2, device="cpu", dtype="float32", impl="tv", label="torchvision",
                 status="error", note="boom")]
    assert plots.write_figure(rows, _MACHINE, {"figure": "bars"}, tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_loglog_slope_reads_the_growth_order(power):
    xs = [40, 100, 160, 250]
    assert plots.loglog_slope(xs, [3.0 * x ** power for x in xs]) == pytest.approx(power)
    assert plots.loglog_slope([40], [1.0]) is None


def test_report_gathers_the_results_folder(tmp_path):
    machine = {"command": "python -m benchmarks --preset x", "timestamp": "2026-01-01T00:00:00", "cpu_model": "c",
               "logical_cores": 2, "ram_bytes": 2 ** 34, "torch": "t", "torch_threads": 2,
               "densenet_fast": {"version": "v", "cpu_engine": {"float32": "onednn"}}}
    for name, kind in (("mem-depth", "depth"), ("other", "bars")):
        rows = _synthetic(kind)
        settings = {"repeats": 3, "figure": kind, "elapsed_s": 1.0}
        if name == "mem-depth":  # the other run's figure is missing: --report draws it from the JSON
            settings["figure_file"] = plots.write_figure(rows, machine, settings, tmp_path / f"{name}.png").name
        report.write_json(tmp_path / f"{name}.json", machine, settings, rows)
        report.write_markdown(tmp_path / f"{name}.md", machine, settings, rows)
    path = report.write_report(tmp_path)
    text = path.read_text()
    assert path == tmp_path / "README.md"
    assert text.index("## mem-depth") < text.index("## other")  # headline runs first
    assert "![mem-depth](mem-depth.png)" in text and "![other](other.png)" in text
    assert (tmp_path / "other.png").read_bytes().startswith(_PNG)
    assert "{'float32'" not in text and "| densenet_fast fused |" in text  # one readable machine line


def test_report_takes_micro_benchmark_json_and_skips_git_ignored_runs(tmp_path):
    """A pytest-benchmark JSON gets its micro_report table (no CSV link, no figure); a run git ignores (the
    local --quick files) is left out."""
    import subprocess

    bench = {"group": "g", "name": "t[densenet_fast]", "params": {"impl": "densenet_fast"},
             "stats": {"min": 0.001, "median": 0.002}, "extra_info": {}}
    (tmp_path / "micro-x.json").write_text(json.dumps({"benchmarks": [bench], "machine_info": {}}))
    (tmp_path / "micro-x.md").write_text("stale\n")  # regenerated from the JSON
    (tmp_path / "quick.json").write_text(json.dumps({"benchmarks": []}))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("quick.*\n")
    text = report.write_report(tmp_path).read_text()
    assert "## micro-x" in text and "| g | densenet_fast | 1.00 | 2.00 |" in text and "micro-x.csv" not in text
    assert "stale" not in (tmp_path / "micro-x.md").read_text()
    assert "python -m benchmarks.micro_report micro-x.json --markdown micro-x.md" in text
    assert "quick" not in text


def test_worker_over_the_memory_cap_is_recorded_as_oom(tmp_path):
    from benchmarks.impls import torchvision_model

    spec = get_spec("densenet_bc100")
    torch.save(torchvision_model(spec).state_dict(), tmp_path / "w.pt")
    job = dict(model=spec.name, impl="tv", batch=64, size=32, device="cpu", dtype="float32", threads=1,
               weights=str(tmp_path / "w.pt"), tasks=["saved"], warmup=1, seed=0)
    result = run_worker(dict(job, mem_cap=2 * 1024 ** 3), timeout=600)  # the step needs ~2.7 GB
    assert result.get("oom") is True and "allocate" in result["error"], result


def test_readme_figures_exist():
    """Every image the README shows is committed (under benchmarks/results/), and it shows some."""
    import re

    readme = (ROOT / "README.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", readme)
    assert images and all(image.startswith("benchmarks/results/") for image in images), images
    for image in images:
        assert (ROOT / image).read_bytes().startswith(_PNG), image


def test_busy_flag_does_not_count_the_runs_own_threads():
    """A 2-thread run on an otherwise idle 2-core machine ends at a load average near 2: not busy. Other work
    at the start, or beyond the run's own threads at the end, is."""
    from benchmarks import report
    machine = {"logical_cores": 2, "torch_threads": 2, "load_average": (2.3, 1.0, 0.5)}
    assert not report.is_busy(machine, (0.1, 0.1, 0.1))
    assert report.max_load(machine, (0.1, 0.1, 0.1)) == pytest.approx(0.3)
    assert report.is_busy(machine, (1.5, 0.5, 0.2))
    assert report.is_busy(dict(machine, load_average=(4.5, 2.0, 1.0)), (0.1, 0.1, 0.1))
    assert not report.is_busy(dict(machine, gpu="H200", load_average=(9.0, 9.0, 9.0)), (5.0, 5.0, 5.0))


# --- benchmarks/harness.py: the single-operation scripts' shared part ----------------------------------------------

def test_harness_time_impls_interleaves_and_drops_a_failing_impl():
    calls = []

    def fn(name, fail=False):
        def call():
            calls.append(name)
            if fail and len([c for c in calls if c == name]) > 1:  # fails after its first (warm-up) call
                raise RuntimeError("boom")
        return call

    res = harness.time_impls({"a": fn("a"), "b": fn("b"), "c": fn("c", fail=True)}, {"a": 2, "b": 4, "c": 1},
                             repeats=3, warmup=1, device=torch.device("cpu"))
    assert [res[n]["n"] for n in "abc"] == [3, 3, 0]
    assert res["c"]["error"] == "RuntimeError: boom" and res["a"]["error"] is None
    assert res["b"]["img_s"] == pytest.approx(4 / (res["b"]["ms_median"] * 1e-3))
    # warm-up a b c; rounds rotate: a b c (c fails and is dropped), b (c) a, (c) a b
    assert calls == ["a", "b", "c", "a", "b", "c", "b", "a", "a", "b"]


def test_harness_table_and_noisy_lines():
    rows = [{"impl": "x", "ms_median": 2.0, "ms_min": 1.0, "noisy": True, "note": None},
            {"impl": "longer", "ms_median": 10.25, "ms_min": 10.0, "noisy": False, "note": "n"}]
    cols = [("impl", "impl", ""), ("ms", "ms_median", ".1f"), ("note", "note", "")]
    text = harness.table(rows, cols).splitlines()
    assert text[0].split() == ["impl", "ms", "note"] and set(text[1]) == {"-"}
    assert text[2].split() == ["x", "2.0", "-"] and text[3].split() == ["longer", "10.2", "n"]
    assert text[2].index("2.0") + 3 == text[3].index("10.2") + 4  # numbers right-aligned
    md = harness.table(rows, cols, markdown=True).splitlines()
    assert md == ["| impl | ms | note |", "|---|---|---|", "| x | 2.0 | - |", "| longer | 10.2 | n |"]
    (line,) = harness.noisy_lines(rows, lambda r: r["impl"])
    assert line.startswith("WARNING: noisy timing, x:") and "2.0x the min" in line
    renamed = [{"impl": r["impl"], "median_ms": r["ms_median"], "min_ms": r["ms_min"], "noisy": r["noisy"]}
               for r in rows]  # bench_se's row keys
    assert harness.noisy_lines(renamed, lambda r: r["impl"], "median_ms", "min_ms") == [line]


def test_harness_recorder_writes_rows_as_they_finish(tmp_path):
    path = tmp_path / "sub" / "r.json"
    rec = harness.Recorder(path, {"benchmark": "t"}, echo=False)
    assert json.loads(path.read_text()) == {"benchmark": "t", "rows": []}
    rec.add({"a": 1})
    rec.add({"a": 2, "status": "failed"})
    assert json.loads(path.read_text())["rows"] == [{"a": 1, "status": "ok"}, {"a": 2, "status": "failed"}]
    assert (rec.failed, rec.skipped) == (1, 0)
    assert not list(path.parent.glob("*.tmp"))


def test_bench_se_runs_on_cpu(tmp_path, capsys):
    """bench_se through the harness on the CPU path: its command line, table and JSON fields."""
    from benchmarks import bench_se

    out = tmp_path / "se.json"
    assert bench_se.main(["--device", "cpu", "--impls", "densenet_fast,timm", "--repeats", "2", "--warmup", "0",
                          "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "bench_se" and doc["device"] == harness.device_name(torch.device("cpu"))
    assert [r["impl"] for r in doc["rows"]] == ["densenet_fast", "timm"]  # the test extra installs timm
    for r in doc["rows"]:
        assert r["layout"] == "channels_last" and r["shape"] == [8, 128, 28, 28] and r["error"] is None
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] and r["gbps"] is None
    ours, timm = doc["rows"]
    assert ours["speedup_vs_timm"] == pytest.approx(timm["median_ms"] / ours["median_ms"])
    printed = capsys.readouterr().out
    assert "SE fwd+bwd on" in printed and "densenet_fast" in printed
    with pytest.raises(SystemExit):
        bench_se.main(["--impls", "nope"])



def test_micro_report_ratios_back_to_back_and_interleaved():
    """micro_report: per-implementation groups (pytest-benchmark's stats) and an interleaved group (its times in
    extra_info) give throughput vs oneDNN by minima and by medians, GFLOP/s at the minimum."""
    def bench(group, impl, t_min, t_med, extra=None):
        return {"group": group, "name": f"test[{impl}]", "params": {"impl": impl},
                "stats": {"min": t_min, "median": t_med}, "extra_info": extra or {"gflop": 2.0}}
    data = {"benchmarks": [
        bench("g", "onednn-conv1x1", 1.0, 1.2), bench("g", "densenet_fast", 2.0, 2.0),
        bench("gi", "densenet_fast", 9.0, 9.0, {"gflop": 4.0, "interleaved": {
            "onednn-conv1x1": {"ms_min": 1000.0, "ms_median": 1500.0},
            "densenet_fast": {"ms_min": 800.0, "ms_median": 1600.0}}}),
    ]}
    rows = {(r["group"], r["impl"]): r for r in micro_report.rows(data)}
    assert len(rows) == 4
    r = rows[("g", "densenet_fast")]
    assert r["vs_base"] == pytest.approx(0.5) and r["vs_base_median"] == pytest.approx(0.6)
    assert r["gflops"] == pytest.approx(1.0) and r["median_ms"] == pytest.approx(2000.0)
    r = rows[("gi", "densenet_fast")]  # from extra_info, not from pytest-benchmark's own 9 s
    assert r["min_ms"] == pytest.approx(800.0) and r["vs_base"] == pytest.approx(1.25)
    assert r["vs_base_median"] == pytest.approx(1500 / 1600) and r["gflops"] == pytest.approx(5.0)
    assert rows[("gi", "onednn-conv1x1")]["vs_base"] == pytest.approx(1.0)
    md = micro_report.to_markdown(micro_report.rows(data), "test machine")
    assert "| gi | densenet_fast | 800.00 | 1600.00 | 5 | 1.25x | 0.94x |" in md


# -- the numbers of README.md and docs/ (benchmarks/doc_numbers.py) ------------------------------------------------
def test_docs_numbers_match_the_committed_results():
    """Every generated region of README.md and docs/*.md is what `python -m benchmarks --report` writes from the
    committed results: text and results cannot drift (run --report after a new run)."""
    from benchmarks import doc_numbers

    stale = [str(p.relative_to(ROOT)) for p in doc_numbers.doc_files()
             if doc_numbers.render_file(p.read_text()) != p.read_text()]
    assert not stale, f"generated numbers out of date in {stale}: run python -m benchmarks --report"
    names = [name for p in doc_numbers.doc_files() for name, _ in doc_numbers.regions(p.read_text())]
    assert "headline" in names and "run:readme-cpu" in names and "slopes:mem-depth" in names


def test_monai_act_renderer_makes_the_table_from_its_json(tmp_path):
    """``monai-act:NAME`` regions render ``monai-act/NAME.json`` (benchmarks/bench_monai_act.py): one line per
    (act, norm), MONAI vs converted with converted / MONAI ratios and what convert() fused; a busy machine is said."""
    from benchmarks import bench_monai_act, doc_numbers

    assert bench_monai_act.parse_rows("relu,prelu:instance") == [("relu", "batch"), ("prelu", "instance")]
    with pytest.raises(ValueError):
        bench_monai_act.parse_rows("gelu")

    def row(act, norm, model, peak, saved, **extra):
        return dict(act=act, norm=norm, model=model, peak_bytes=peak * 2**20, saved_bytes=saved * 2**20,
                    param_grad_bytes=4 * 2**20, **extra)
    rows = [row("relu", "batch", "MONAI", 200, 160),
            row("relu", "batch", "converted", 50, 16, blocks_fused=4,
                converted=[["features.denseblock1", "ConcatDenseBlock <- x"]] * 4 + [["features", "FusedFeatures"]],
                left_alone=[["features.transition1", "LeakyReLU"]] * 3 + [["", "head"]]),
            row("leakyrelu", "instance", "MONAI", 300, 240),
            row("leakyrelu", "instance", "converted", 300, 240, blocks_fused=0, converted=[],
                left_alone=[["features.denseblock1", "InstanceNorm"]] * 4)]
    data = {"machine": dict(_MACHINE, timestamp="2026-01-02T03:04:05", torch_threads=2),
            "settings": {"spatial_dims": 2, "size": 32, "batch": 2, "load_average_start": [0.1, 0.1, 0.1]},
            "rows": rows}
    (tmp_path / "monai-act").mkdir()
    (tmp_path / "monai-act" / "x.json").write_text(json.dumps(data))
    text = doc_numbers.render("monai-act:x", tmp_path)
    assert text == bench_monai_act.markdown(data).rstrip("\n")
    lines, flat = text.splitlines(), " ".join(text.split())  # flat: the wrapped prose on one line
    assert flat.startswith("MONAI DenseNet121 2-D, 1 channel 32², batch 2, float32, CPU, memory only; measured "
                           "2026-01-02 on Test CPU, 2 logical cores") and "loaded" not in text
    assert max(len(line) for line in lines if not line.startswith("|")) <= 116
    assert ('| `"relu"` | `"batch"` | 200.0 MiB | 50.0 MiB | 0.25 | 160.0 MiB | 16.0 MiB | 0.10 '
            "| 4 dense blocks (left alone: 3 transitions, final norm + head) |") in lines
    assert any(line.startswith('| `("leakyrelu", {"negative_slope": 0.1})` | `"instance"` | 300.0 MiB | 300.0 MiB | '
                               "1.00 |") and line.endswith("| nothing |") for line in lines)
    assert "the parameter gradients alone: 4.0 MiB" in flat
    busy = dict(data, settings=dict(data["settings"], load_average_start=[1.8, 1.0, 1.0]))
    busy_text = " ".join(bench_monai_act.markdown(busy).split())
    assert "other work loaded the machine (load up to 1.8 on 2 cores)" in busy_text
    doc = "a\n<!-- generated: monai-act:x -->\nold\n<!-- end generated -->\nb\n"
    assert doc_numbers.render_file(doc, tmp_path) == doc.replace("\nold\n", f"\n{text}\n")


def test_conv3x3_renderer_makes_the_tables_from_its_json(tmp_path):
    """``conv3x3:NAME`` regions render ``conv3x3/NAME.json`` (benchmarks/bench_conv3x3.py): the peak, a row per
    shape and pass with ours / oneDNN and the share of the peak, the steps against torchvision, the stages, and the
    bfloat16 passes and step where measured."""
    from benchmarks import bench_conv3x3, doc_numbers

    def passes(onednn, own):
        return {"onednn_ms": onednn, "own_ms": own, "own_gflops": 2.0 / own * 1e3, "onednn_gflops": 1.0,
                "own_peak_share": 2.0 / own * 1e3 / 400}
    shape = {"shape": "block 1", "batch": 8, "cin": 128, "cout": 32, "spatial": [56, 56], "gflop": 2.0,
             **{p: passes(5.0, 4.0) for p in bench_conv3x3.PASSES}}
    stage = {"self_ms": {**{s: 10.0 for s in bench_conv3x3.STAGES}, "copy_ calls": 8, "profiled total": 800.0},
             "gemm_rates": {"3x3 (3 passes)": {"gflop": 60.0, "ms": 300.0, "gflops": 200.0, "peak_share": 0.5}}}
    step = {"batch": 8, "step_gflop": 134.0, "load_avg": {"before": [0.5], "after": [1.0]},
            "steps": {"densenet_fast": {"ms": [800.0, 810.0], "min_ms": 800.0, "median_ms": 805.0,
                                        "peak_share_at_min": 0.4},
                      "torchvision": {"ms": [1200.0, 1210.0], "min_ms": 1200.0, "median_ms": 1207.5,
                                      "peak_share_at_min": 0.28}},
            "stages": {"densenet_fast": stage}}
    bf16_shape = {**{k: shape[k] for k in ("shape", "batch", "cin", "cout", "spatial", "gflop")},
                  **{p: {"onednn_ms": 2.0, "own_ms": 1.0, "own_gflops": 2000.0} for p in ("forward", "input_grad")}}
    bf16 = {"shapes": [bf16_shape], "engines": "own: where input and output channels are multiples of 32, else onednn",
            "step": {"batch": 8, "load_avg": {"before": [0.5], "after": [1.0]},
                     "steps": {"densenet_fast bf16": {"ms": [350.0], "min_ms": 350.0, "median_ms": 350.0},
                               "torchvision bf16": {"ms": [875.0], "min_ms": 875.0, "median_ms": 875.0}}}}
    data = {"cpu_model": "Test CPU", "threads": 2, "torch": "2.14.1", "peak_gflops": 400.0, "shapes": [shape],
            "step": step, "bf16": bf16}
    (tmp_path / "conv3x3").mkdir()
    (tmp_path / "conv3x3" / "x.json").write_text(json.dumps(data))
    text = doc_numbers.render("conv3x3:x", tmp_path)
    assert text == bench_conv3x3.markdown(data).rstrip("\n")
    assert "FMA peak (bare AVX-512 FMA loop, all threads): **400 GFLOP/s**" in text
    assert "| block 1 [8, 128→32, 56x56] | 2.00 | forward | 5.00 | 4.00 | 0.80x | 500 (125%) |" in text
    assert "| densenet_fast | 805 (800) | 0.67x | 40% |" in text
    assert "| copy_ calls | 8 calls |" in text and "| rate: 3x3 (3 passes), 60.0 GFLOP | 200 GFLOP/s (50%) |" in text
    assert "| block 1 [8, 128→32, 56x56] | 2.00 | forward | 2.00 | 1.00 | 0.50x | 2000 |" in text
    assert "| densenet_fast bf16 | 350 (350) | 0.40x |" in text
    flops = bench_conv3x3.densenet121_gemm_flops(8)
    assert flops["3x3 (3 passes)"] == pytest.approx(3 * 2 * 8 * 128 * 32 * 9 * (6 * 56**2 + 12 * 28**2 + 24 * 14**2
                                                                                 + 16 * 7**2))


# a measured quantity: a time, a size in bytes, or a ratio such as 0.64x / 0.64×
_MEASURED = re.compile(r"\b\d+(\.\d+)?\s?(ms|MiB|GiB|MB|GB|KiB|GFLOP/s|img/s)\b|\b\d+\.\d+\s?[x×]")


def test_no_measured_number_outside_generated_regions():
    """Prose carries no measured number: every one sits in a generated region (the settings of a preset, such as
    a 512 MiB budget or a 128 KiB threshold, are allowed where they are named as settings)."""
    from benchmarks import doc_numbers

    allowed = ("128 KiB", "512 MiB")  # the mmap threshold and the monai3d-budget preset's budget: settings
    found = []
    for path in doc_numbers.doc_files():
        text = doc_numbers._REGION.sub("", path.read_text())
        for line in text.splitlines():
            for m in _MEASURED.finditer(line):
                if m.group(0) not in allowed:
                    found.append(f"{path.name}: {m.group(0)!r} in {line.strip()[:80]!r}")
    assert not found, found


def test_readme_is_product_documentation():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 250
    assert [n for n, line in enumerate(lines, 1) if len(line) > 120] == []
    history = re.compile(r"session|sessions ago|last run|-dirty|\b[0-9a-f]{7}\b|engine issue|the issue's", re.I)
    assert [line for line in lines if history.search(line)] == []
    assert text.count("not yet measured on a GPU") >= 1
    # the supported torch range is the metadata's floor (tests/test_torch_versions.py) up to the tested release
    from densenet_fast._extension import MIN_TORCH
    assert f"torch {MIN_TORCH[0]}.{MIN_TORCH[1]}–2.14" in text
    assert text.count("<!-- time-estimates:") == 1


def test_headline_shows_the_default_allocator_column_when_recorded(tmp_path):
    """The README table gains a "Peak, default allocator" column once a run records ``peak_bytes_default_alloc``
    (benchmarks/measure.py), and keeps every line within 120 characters."""
    from benchmarks import doc_numbers

    data = json.loads((ROOT / "benchmarks/results/readme-cpu.json").read_text())
    for row in data["rows"]:  # a run that did not record it: no column
        row.pop(report.DEFAULT_ALLOC_PEAK, None)
    (tmp_path / "readme-cpu.json").write_text(json.dumps(data))
    assert "Peak, default allocator" not in doc_numbers.render("headline", tmp_path)
    for row in data["rows"]:
        if row.get("peak_bytes") is not None:
            row[report.DEFAULT_ALLOC_PEAK] = int(row["peak_bytes"] * 1.4)
    (tmp_path / "readme-cpu.json").write_text(json.dumps(data))
    text = doc_numbers.render("headline", tmp_path)
    assert "| Peak, default allocator |" in text and "The default-allocator column" in text
    dnf = next(r for r in data["rows"] if r["impl"] == "dnf" and r["dtype"] == "float32")
    dnf_line = next(line for line in text.splitlines() if line.startswith("| **densenet_fast** | fp32"))
    assert f"| {dnf[report.DEFAULT_ALLOC_PEAK] / report.MIB:.0f}, " in dnf_line
    assert max(len(line) for line in text.splitlines()) <= 120
    md = "\n".join(report.markdown_lines(data["machine"], data["settings"], data["rows"]))
    assert "Peak, default allocator" in md


def test_tables_and_figures_show_median_and_min():
    data = json.loads((ROOT / "benchmarks/results/readme-cpu.json").read_text())
    row = next(r for r in data["rows"] if r["impl"] == "dnf" and r["dtype"] == "float32")
    md = "\n".join(report.markdown_lines(data["machine"], data["settings"], data["rows"]))
    assert f"{row['train_ms_median']:.0f} ({row['train_ms_min']:.0f}) ms" in md
    assert plots._MIN_OF["train_ms_median"] == "train_ms_min" and "min" in plots.TIME[0][2]


def test_depth_figure_legend_sits_below_the_axes(tmp_path, monkeypatch):
    """The mem-depth legend once covered densenet_fast's lowest line: it is drawn below each panel, readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    legends = []
    monkeypatch.setattr(plt, "close", lambda fig: legends.extend(ax.get_legend() for ax in fig.axes))
    plots.write_figure(_synthetic("depth"), _MACHINE, {"figure": "depth"}, tmp_path / "d.png")
    assert legends and all(lg is not None for lg in legends)
    for lg in legends:
        assert lg.get_bbox_to_anchor().y1 < lg.axes.get_window_extent().y0 + 1  # anchored under the axes
        assert lg.get_texts()[0].get_fontsize() >= 8  # "small"; it was "xx-small" (5.8 pt)


def test_bf16_paths_renderer_states_ratios_and_load():
    """benchmarks/bench_bf16_paths.py: the target ratios (bf16 vs our fp32 and torchvision's bf16 step, peaks) from
    the sorted times, and the load averages around the timing when the record has them (older records do not)."""
    from benchmarks import bench_bf16_paths as b

    ms = {"densenet_fast fp32": [1000.0, 1100.0, 1300.0], "densenet_fast bf16": [900.0, 1000.0, 1200.0],
          "torchvision fp32": [3000.0, 3000.0, 3000.0], "torchvision bf16": [2500.0, 2600.0, 2700.0]}
    peaks = {"densenet_fast fp32": 100.0, "densenet_fast bf16": 60.0, "torchvision fp32": 900.0,
             "torchvision bf16": 480.0}
    conv = {"forward": "float32", "input_grad": "float32", "weight_grad": "float32"}
    entry = {"ms": ms, "peak_mb": peaks, "peak_mb_default_allocator": peaks,
             "cpu_engine": {"bf16_conv": {"2d": conv}, "bf16_rows": "portable", "amx_kernel": False}}
    text = b.render_config("stand-in", entry)
    assert "0.91x by medians, 0.90x by minima (target <= 1.0)" in text
    assert "0.38x by medians, 0.36x by minima (target <= 0.5)" in text
    assert "1/8.0 (default allocator 1/8.0; target <= 1/6)" in text
    assert "Load average" not in text
    entry["load_avg"] = {"before": [0.5, 0.75, 1.0], "after": [1.25, 1.0, 1.0]}
    assert "Load average before / after the timing: 0.50, 0.75, 1.00 / 1.25, 1.00, 1.00" in b.render_config(
        "stand-in", entry)
