"""The non-GPU logic of the GPU verdict (tools/run_gpu_checks.sh, tools/gpu_checks.py) and of the GPU
benchmark's row bookkeeping (benchmarks/harness.py, used by benchmarks/bench_cuda_block.py), on any machine."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "run_gpu_checks.sh"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import gpu_checks  # noqa: E402

from benchmarks import harness as bench  # noqa: E402

STEPS = ("environment", "build", "build-info", "tests", "fused-tests", "memcheck", "racecheck", "synccheck",
         "bench", "se")


def _run(*args, **kw):
    env = dict(os.environ, PYTHON=sys.executable, **kw.pop("env", {}))
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _planned(stdout: str) -> list:
    return [line.split()[1] for line in stdout.splitlines() if line.startswith("[dry-run] ") and "timeout" in line]


def test_script_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_plans_every_step_within_budget(tmp_path):
    proc = _run("--dry-run", env={"LOG_DIR": str(tmp_path / "log")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    planned = _planned(proc.stdout)
    assert tuple(planned) == STEPS
    limits = {line.split()[1]: int(line.split()[3].rstrip("s")) for line in proc.stdout.splitlines()
              if line.startswith("[dry-run] ") and "timeout" in line}
    assert all(0 < v <= 540 for v in limits.values())
    assert "--budget-s" in proc.stdout  # the benchmark gets a hard budget
    assert not (tmp_path / "log").exists()  # a dry run leaves nothing behind


def test_dry_run_prebuilt_and_skips(tmp_path):
    proc = _run("--dry-run", "--prebuilt", "--skip", "bench,sanitizer", env={"LOG_DIR": str(tmp_path / "log")})
    assert proc.returncode == 0, proc.stderr
    assert _planned(proc.stdout) == ["environment", "build-info", "tests", "fused-tests", "se"]


@pytest.mark.parametrize("args,message", [(["--budget-s", "soon"], "--budget-s: expected whole seconds"),
                                          (["--fast"], "unknown argument: --fast")])
def test_bad_arguments(args, message):
    proc = _run(*args)
    assert proc.returncode == 2 and message in proc.stderr


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="{n}">
<testcase classname="tests.test_cuda_dense_block" name="test_a" time="0.1"/>
{extra}</testsuite></testsuites>"""


@pytest.mark.parametrize("extra,ok", [
    ("", True),
    ('<testcase classname="t" name="test_b"><skipped type="pytest.skip" message="needs a CUDA GPU"/></testcase>',
     False),
    ('<testcase classname="t" name="test_c"><failure message="assert 1 == 2"/></testcase>', False),
    ('<testcase classname="t" name="test_d"><error message="fixture"/></testcase>', False),
])
def test_junit_skips_count_as_failures(tmp_path, capsys, extra, ok):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT.format(n=2, extra=extra))
    assert gpu_checks.main(["junit", str(path)]) == (0 if ok else 1)
    out = capsys.readouterr().out
    assert ("PASS" if ok else "FAIL") in out
    if "skipped" in extra:
        assert "SKIPPED (counts as a failure) t::test_b: needs a CUDA GPU" in out


def test_junit_no_tests_is_a_failure(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text('<testsuites><testsuite name="pytest" tests="0"></testsuite></testsuites>')
    assert gpu_checks.main(["junit", str(path)]) == 1


def _bench_doc():
    rows = []
    for variant, mem, ms, loss in (("torchvision", 12000.0, 100.0, 6.91), ("ours", 1800.0, 90.0, 6.92),
                                   ("torchvision_memeff", 5000.0, 130.0, 6.91),
                                   ("torchvision_compile", 11000.0, 95.0, 6.90)):
        rows.append({"model": "densenet121", "variant": variant, "what": "memory", "batch": 64, "status": "ok",
                     "loss": loss, "max_memory_allocated_mib": mem})
        rows.append({"model": "densenet121", "variant": variant, "what": "step time, batch 64", "status": "ok",
                     "ms_median": ms, "img_s": 64 / ms * 1e3, "batch": 64})
    rows.append({"model": "densenet121", "variant": "torchvision", "what": "largest batch", "status": "ok",
                 "largest_batch": 700, "complete_search": True})
    rows.append({"model": "densenet121", "variant": "ours", "what": "largest batch", "status": "ok",
                 "largest_batch": 4000, "complete_search": False})
    rows.append({"model": "densenet201", "variant": "ours", "what": "memory", "status": "skipped",
                 "reason": "time budget"})
    return {"rows": rows}


def test_summary_one_screen_with_targets(tmp_path, capsys):
    (tmp_path / "steps.tsv").write_text("environment\tok\t3\tenv.log\ntests\tok\t80\ttests.log\n")
    (tmp_path / "bench_cuda_block_NVIDIA_H200_x.json").write_text(json.dumps(_bench_doc()))
    (tmp_path / "bench_se.json").write_text(json.dumps({"device": "NVIDIA H200", "rows": [
        {"impl": "densenet_fast", "layout": "channels_last", "median_ms": 0.5, "gbps": 4000.0,
         "fraction_of_peak": 0.83, "error": None},
        {"impl": "timm", "layout": "channels_last", "median_ms": 1.5, "gbps": 1300.0, "fraction_of_peak": 0.27,
         "error": None}]}))
    assert gpu_checks.main(["summary", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 40  # one screen
    assert "target step <= 1.0x fastest torchvision: 0.95x met" in out
    assert "target memory <= 1/6 torchvision: 0.150x met" in out
    assert "target largest batch >= 6x torchvision: 5.7x (lower bound) MISSED" in out
    assert "target SE >= 80% of peak bandwidth: met" in out
    assert ">=4000" in out and "memory: skipped" in out and "INCOMPLETE: 1 rows skipped for time" in out
    assert "VERDICT: PASS (2 steps)" in out


def test_summary_verdict_fails_on_any_bad_step(tmp_path, capsys):
    (tmp_path / "steps.tsv").write_text("build\tok\t100\tb.log\nmemcheck\tTIMEOUT\t120\tm.log\nse\tnot-run\t0\t-\n")
    assert gpu_checks.main(["summary", str(tmp_path)]) == 1
    assert "VERDICT: FAIL (2 of 3 steps not ok: memcheck, se)" in capsys.readouterr().out


def test_summary_without_steps_fails(tmp_path):
    assert gpu_checks.main(["summary", str(tmp_path)]) == 1


# --- benchmarks/harness.py (bench_cuda_block's rows): rows as they finish, budget, verdict ------------------

def test_bench_rows_written_as_they_finish(tmp_path):
    path = tmp_path / "out.json"
    rec = bench.Recorder(path, {"device": {"name": "test"}})
    budget = bench.Budget(30.0)
    assert bench.run_row(rec, budget, 1.0, {"variant": "a"}, lambda: {"x": 1.0}) == {"x": 1.0}
    assert json.loads(path.read_text())["rows"] == [{"variant": "a", "x": 1.0, "status": "ok"}]

    def boom():
        raise RuntimeError("CUDA error: an illegal memory access")

    assert bench.run_row(rec, budget, 1.0, {"variant": "b"}, boom) is None
    assert bench.run_row(rec, budget, 60.0, {"variant": "c"}, lambda: {"x": 2.0}) is None  # not enough time left
    rows = json.loads(path.read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok", "failed", "skipped"]
    assert "illegal memory access" in rows[1]["error"] and "time budget" in rows[2]["reason"]
    assert (rec.failed, rec.skipped) == (1, 1)


def test_bench_budget_interrupts_a_long_row(tmp_path):
    rec = bench.Recorder(tmp_path / "out.json", {})
    budget = bench.Budget(0.5)

    def slow():
        try:
            time.sleep(5)
        except Exception:  # noqa: BLE001 - a per-call error handler must not swallow the budget
            pytest.fail("BudgetExceeded was caught as an Exception")
        return {}

    t0 = time.monotonic()
    assert bench.run_row(rec, budget, 0.0, {"variant": "slow"}, slow) is None
    assert time.monotonic() - t0 < 3
    assert rec.doc["rows"][0]["reason"] == "time budget (interrupted)"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_help_lists_usage():
    proc = _run("--help")
    assert proc.returncode == 0 and "Usage: tools/run_gpu_checks.sh" in proc.stdout
