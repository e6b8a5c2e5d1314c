"""The non-GPU logic of the GPU verdict (tools/run_gpu_checks.sh, tools/gpu_checks.py) and of the GPU
benchmark's row bookkeeping (benchmarks/harness.py, used by benchmarks/bench_cuda_block.py), on any machine."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
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

STEPS = ("environment", "sanitizer-probe", "build", "build-info", "tests", "fused-tests", "memcheck", "racecheck",
         "synccheck", "bench", "se")


def _run(*args, **kw):
    env = dict(os.environ, PYTHON=sys.executable, **kw.pop("env", {}))
    env.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def _planned(stdout: str) -> dict:
    """{step: timeout} of a dry run (None: not run for lack of time)."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("[dry-run] ") and len(parts) > 3 and parts[2] in ("timeout", "not"):
            out[parts[1]] = int(parts[3].rstrip("s")) if parts[2] == "timeout" else None
    return out


def test_script_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_dry_run_plans_every_step(tmp_path):
    proc = _run("--dry-run", env={"LOG_DIR": str(tmp_path / "log")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert tuple(_planned(proc.stdout)) == STEPS
    assert not (tmp_path / "log").exists()  # a dry run leaves nothing behind
    # all five phases in one 540-s call do not fit: the plan says so instead of starving a step silently
    assert "WARNING" in proc.stdout and "fewer phases" in proc.stdout


@pytest.mark.parametrize("phases", [["preflight", "build"], ["tests"], ["sanitizer"], ["bench"]])
def test_each_documented_call_fits_its_budget(tmp_path, phases):
    """The calls of tools/README.md: each phase's steps get at least their estimates within 540 s."""
    proc = _run(*phases, "--dry-run", "--prebuilt" if phases[0] != "preflight" else "--budget-s",
                *([] if phases[0] != "preflight" else ["540"]), env={"LOG_DIR": str(tmp_path / "log")})
    assert proc.returncode == 0, proc.stderr
    planned = _planned(proc.stdout)
    assert planned and all(planned.values()) and "WARNING" not in proc.stdout
    assert {gpu_checks.STEPS[n][0] for n in planned} == set(phases)
    assert all(gpu_checks.STEPS[n][1] <= t <= gpu_checks.STEPS[n][2] for n, t in planned.items())


def test_dry_run_prebuilt_and_skips(tmp_path):
    proc = _run("--dry-run", "--prebuilt", "--skip", "bench,sanitizer", env={"LOG_DIR": str(tmp_path / "log")})
    assert proc.returncode == 0, proc.stderr
    assert list(_planned(proc.stdout)) == ["environment", "sanitizer-probe", "build-info", "tests", "fused-tests"]


def test_estimates_match_the_plan():
    rows = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_checks.py"), "estimates"], capture_output=True,
                          text=True, check=True).stdout.split("\n")
    assert [r.split()[0] for r in rows if r] == list(STEPS)
    assert all(0 < gpu_checks.STEPS[n][1] <= gpu_checks.STEPS[n][2] <= 540 for n in STEPS)


@pytest.mark.parametrize("args,message", [(["--budget-s", "soon"], "--budget-s: expected whole seconds"),
                                          (["--fast"], "unknown argument: --fast"),
                                          (["testz"], "unknown argument: testz")])
def test_bad_arguments(args, message):
    proc = _run(*args)
    assert proc.returncode == 2 and message in proc.stderr


def test_no_interpreter_still_writes_a_summary(tmp_path):
    """An image without `python`/`python3` that imports torch: a clear summary in $OUT, not 127s."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("bash", "dirname", "date", "mkdir", "rm", "touch", "tee", "tar", "gzip", "cat", "basename"):
        if shutil.which(tool):
            (bindir / tool).symlink_to(shutil.which(tool))
    env = {"PATH": str(bindir), "PYTHON": "", "LOG_DIR": str(tmp_path / "log"), "OUT": str(tmp_path / "out"),
           "HOME": str(tmp_path)}
    proc = subprocess.run([str(bindir / "bash"), str(SCRIPT), "preflight"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "no Python interpreter that imports torch" in summary and "VERDICT: FAIL" in summary


def _simulate(tmp_path, *args, sim):
    env = {"LOG_DIR": str(tmp_path / "log"), "OUT": str(tmp_path / "out")}
    penv = dict(os.environ, PYTHON=sys.executable, **env)
    proc = subprocess.run(["bash", str(SCRIPT), *args, "--simulate", sim], cwd=ROOT, env=penv, capture_output=True,
                          text=True, timeout=120)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_checks.tar.gz", "summary.txt"]  # two files back
    with tarfile.open(out / "gpu_checks.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    return proc, (out / "summary.txt").read_text(), names


def test_simulated_build_failure_reports_the_first_compiler_error(tmp_path):
    proc, summary, names = _simulate(tmp_path, "preflight", "build",
                                     sim="environment=ok,sanitizer-probe=ok,build=fail,build-info=ok")
    assert proc.returncode == 1
    assert 'csrc/cuda/reduce.cuh(57): error: identifier "kRowsPerChunkX" is undefined' in summary
    assert "detected during instantiation" in summary and "dense_block_cuda.o" in summary
    assert "Traceback" not in summary and "RuntimeError" not in summary  # setuptools' noise stays in the log
    assert "build-info" not in summary  # nothing runs after a failed build
    assert "VERDICT (this call): FAIL" in summary and "not run yet: tests, sanitizer, bench" in summary
    assert {"build.log", "steps.tsv", "environment.txt"} <= names
    assert summary in proc.stdout  # the console's last screen is the summary


def test_simulated_sanitizer_unsupported_is_reported_not_failed(tmp_path):
    proc, summary, _ = _simulate(tmp_path, "preflight", sim="environment=ok,sanitizer-probe=unsupported")
    assert proc.returncode == 3
    assert "compute-sanitizer cannot check this device" in summary and "Device not supported" in summary
    assert "VERDICT (this call): INCOMPLETE" in summary
    assert (tmp_path / "log" / "sanitizer.unsupported").exists()  # the sanitizer phase reads it


def test_simulated_phases_accumulate_across_calls(tmp_path):
    """Separate calls on one warm machine: each call's summary and archive hold every phase so far."""
    proc, _, _ = _simulate(tmp_path, "preflight", "build", sim="environment=ok,sanitizer-probe=ok,build=ok,"
                                                              "build-info=ok")
    assert proc.returncode == 0
    proc, summary, names = _simulate(tmp_path, "tests", "--prebuilt", sim="tests=timeout,fused-tests=fail")
    assert proc.returncode == 1
    assert "INCOMPLETE: 17 of 43 tests finished before the limit, 17 passed" in summary
    assert "test_0: assert max err 3e-2" in summary
    assert {"build.log", "tests.log", "tests.xml", "fused-tests.xml"} <= names
    proc, summary, _ = _simulate(tmp_path, "sanitizer", "--prebuilt",
                                 sim="memcheck=fail,racecheck=ok,synccheck=timeout")
    assert proc.returncode == 1
    assert "Invalid __global__ read of size 2 bytes" in summary and "ERROR SUMMARY: 1 error" in summary
    assert "TIMEOUT     sanitizer synccheck" in summary
    proc, summary, _ = _simulate(tmp_path, "bench", "--prebuilt", sim="bench=timeout,se=ok")
    assert proc.returncode == 3  # a benchmark cut by its limit is incomplete, not a failure
    assert "VERDICT (this call): INCOMPLETE" in summary and "INCOMPLETE: 1 rows skipped for time" in summary
    assert re.search(r"channel moments \[64, 32, 7, 7\] +densenet_fast +0.011", summary)  # the hot-spot rows
    assert "phases recorded: preflight, build, tests, sanitizer, bench" in summary
    assert "VERDICT (all phases): FAIL" in summary
    assert len(summary.splitlines()) <= 60


def test_simulated_all_ok_passes(tmp_path):
    sim = ",".join(f"{n}=ok" for n in STEPS)
    proc, summary, _ = _simulate(tmp_path, "all", sim=sim)
    assert proc.returncode == 0, summary
    assert "VERDICT (this call): PASS" in summary and "VERDICT (all phases): PASS" in summary


def test_preflight_clears_the_record(tmp_path):
    _simulate(tmp_path, "tests", sim="build=fail,build-info=ok,tests=ok,fused-tests=ok")
    _, summary, _ = _simulate(tmp_path, "preflight", sim="environment=ok,sanitizer-probe=ok")
    assert "build" not in summary.split("phases recorded")[0]


BUILD_LOG = """[1/3] /usr/local/cuda/bin/nvcc -c a.cu
[2/3] c++ -c b.cpp
FAILED: build/b.o
c++ -c b.cpp
csrc/cpu/b.cpp:10:3: error: 'foo' was not declared in this scope
   10 |   foo();
      |   ^~~
csrc/cpu/b.cpp:10:3: error: 'foo' was not declared in this scope
FAILED: build/a.o
csrc/cuda/a.cu(5): error: expected a ";"
csrc/cuda/a.cuh(9): catastrophic error: cannot open source file "missing.h"
ninja: build stopped: subcommand failed.
Traceback (most recent call last):
RuntimeError: Error compiling objects for extension
"""


def test_build_errors_first_distinct_compiler_errors():
    errs = gpu_checks.build_errors(BUILD_LOG)
    assert errs[0] == "csrc/cpu/b.cpp:10:3: error: 'foo' was not declared in this scope"
    assert "   10 |   foo();" in errs
    assert sum("'foo' was not declared" in e for e in errs) == 1  # the same error of another job once
    assert 'csrc/cuda/a.cu(5): error: expected a ";"' in errs
    assert any("catastrophic error" in e for e in errs)
    assert errs[-1] == "(ninja: 2 target(s) failed: b.o, a.o)"


def test_build_errors_without_a_compiler_error_fall_back_to_error_lines():
    log = "running build_ext\nOSError: CUDA_HOME environment variable is not set.\nsome other line\n"
    assert gpu_checks.build_errors(log) == ["OSError: CUDA_HOME environment variable is not set."]


@pytest.mark.parametrize("text,rc,status", [
    ("========= Error: Device not supported\n", 1, "UNSUPPORTED"),
    ("========= Invalid __global__ write of size 4\n========= ERROR SUMMARY: 1 error\n", 1, "FAILED"),
    ("smoke ok\n========= ERROR SUMMARY: 0 errors\n", 0, "ok"),
    ("", 124, "TIMEOUT"),
    ("", 137, "TIMEOUT"),
])
def test_classify_sanitizer(tmp_path, text, rc, status):
    (tmp_path / "memcheck.log").write_text(text)
    assert gpu_checks.classify("memcheck", rc, tmp_path) == status


def test_classify_pytest_skip_is_a_failure(tmp_path):
    (tmp_path / "tests.log").write_text("")
    (tmp_path / "tests.xml").write_text(JUNIT.format(n=2, extra='<testcase classname="t" name="b"><skipped '
                                                           'message="needs a CUDA GPU"/></testcase>'))
    assert gpu_checks.classify("tests", 0, tmp_path) == "FAILED"
    (tmp_path / "tests.xml").write_text(JUNIT.format(n=1, extra=""))
    assert gpu_checks.classify("tests", 0, tmp_path) == "ok"


def test_smoke_reaches_the_element_wise_gemm_variant():
    """The sanitizer workload has a block whose ld and c are not multiples of 8 (bn_relu_gemm_kernel's
    element-wise variant) besides the 16-byte one."""
    import inspect
    src = inspect.getsource(gpu_checks.smoke)
    geoms = re.findall(r"\((\d+), (\d+), (\d+), (\d+), (\d+), (\d+), (\d+)\)", src)
    widths = [(int(c0), int(c0) + int(L) * int(k)) for _, c0, _, _, L, k, _ in geoms]
    assert any(c0 % 8 == 0 and ct % 8 == 0 for c0, ct in widths)
    assert any(c0 % 8 != 0 and ct % 8 != 0 for c0, ct in widths)


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
    (tmp_path / "steps.tsv").write_text("environment\tok\t3\t30\tenvironment.log\nbench\tok\t80\t300\tbench.log\n")
    (tmp_path / "bench_cuda_block_NVIDIA_H200_x.json").write_text(json.dumps(_bench_doc()))
    (tmp_path / "bench_se.json").write_text(json.dumps({"device": "NVIDIA H200", "rows": [
        {"impl": "densenet_fast", "layout": "channels_last", "median_ms": 0.5, "gbps": 4000.0,
         "fraction_of_peak": 0.83, "error": None},
        {"impl": "timm", "layout": "channels_last", "median_ms": 1.5, "gbps": 1300.0, "fraction_of_peak": 0.27,
         "error": None}]}))
    assert gpu_checks.main(["summary", str(tmp_path), "--phases", "preflight", "bench"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 40  # one screen
    assert "target step <= 1.0x fastest torchvision: 0.95x met" in out
    assert "target memory <= 1/6 torchvision: 0.150x met" in out
    assert "target largest batch >= 6x torchvision: 5.7x (lower bound) MISSED" in out
    assert "target SE >= 80% of peak bandwidth: met" in out
    assert ">=4000" in out and "memory: skipped" in out and "INCOMPLETE: 1 rows skipped for time" in out
    assert "VERDICT (this call): PASS" in out and "VERDICT (all phases): INCOMPLETE" in out


def test_summary_verdict_fails_on_any_bad_step(tmp_path, capsys):
    (tmp_path / "steps.tsv").write_text("build\tok\t100\t300\tb.log\nmemcheck\tTIMEOUT\t120\t120\tm.log\n"
                                        "se\tnot-run\t0\t0\t-\nracecheck\tFAILED\t9\t60\tr.log\n")
    assert gpu_checks.main(["summary", str(tmp_path), "--phases", "build", "sanitizer", "bench"]) == 1
    out = capsys.readouterr().out
    assert "VERDICT (this call): FAIL  [not ok: memcheck, racecheck, se]" in out


def test_summary_timeouts_are_incomplete_not_failures(tmp_path, capsys):
    (tmp_path / "steps.tsv").write_text("memcheck\tTIMEOUT\t120\t120\tm.log\nracecheck\tok\t9\t60\tr.log\n")
    assert gpu_checks.main(["summary", str(tmp_path), "--phases", "sanitizer"]) == 3
    assert "VERDICT (this call): INCOMPLETE" in capsys.readouterr().out


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


def _documented_calls():
    text = (ROOT / "tools" / "README.md").read_text()
    return re.findall(r"^\| \d \| `(bash tools/run_gpu_checks\.sh [^`]*)` \| (\d+) \|", text, re.M)


def test_documented_device_calls_are_valid(tmp_path):
    """tools/README.md's device calls: at most 2000 characters, timeout_s <= 600 with a minute above the
    script's own budget, and each is a valid plan (a dry run of the same arguments)."""
    calls = _documented_calls()
    assert len(calls) == 3
    for command, timeout_s in calls:
        assert len(command) <= 2000 and int(timeout_s) <= 600
        args = command.split()[2:]
        assert int(timeout_s) - int(args[args.index("--budget-s") + 1]) >= 60
        proc = _run(*args, "--dry-run", env={"LOG_DIR": str(tmp_path / "log")})
        assert proc.returncode == 0, proc.stderr
        assert _planned(proc.stdout)
