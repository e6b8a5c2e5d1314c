"""Python helpers of tools/run_gpu_checks.sh (the GPU verdict, in phases; tools/README.md).

    python3 tools/gpu_checks.py estimates              step, estimate and cap in seconds (the script's plan)
    python3 tools/gpu_checks.py preflight              versions, GPU, toolkit, headers, packages (needs torch)
    python3 tools/gpu_checks.py probe-source           the CUDA source of the preflight's probe kernel
    python3 tools/gpu_checks.py build-info             the built extension has CUDA kernels for this GPU
    python3 tools/gpu_checks.py classify STEP RC DIR   a finished step's status: ok, FAILED, TIMEOUT, UNSUPPORTED
    python3 tools/gpu_checks.py smoke [--fused-only]   the compute-sanitizer workload (needs a GPU)
    python3 tools/gpu_checks.py junit FILE.xml         test counts; exit 1 on any failure, error or skip
    python3 tools/gpu_checks.py build-errors LOG       the first compiler errors of a build log
    python3 tools/gpu_checks.py summary DIR [--phases P ...]   the one-screen summary; exit 0 / 1 / 3
    python3 tools/gpu_checks.py simulate STEP STATUS   a canned stand-in for a step (the script's CPU tests)

Everything but ``smoke``, ``preflight`` and ``build-info`` runs on any machine (tests/test_cuda_gpu_checks.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]

# Targets of issue 13 (H200, bf16, channels_last, batch 64), reported against, not enforced.
STEP_RATIO_TARGET = 1.0      # ours <= 1.0x the fastest torchvision variant
MEMORY_RATIO_TARGET = 1 / 6  # max_memory_allocated <= 1/6 of torchvision's
BATCH_RATIO_TARGET = 6.0     # largest batch >= 6x torchvision's
SE_BANDWIDTH_TARGET = 0.8    # SE kernels >= 80% of peak HBM bandwidth

# --- the plan ------------------------------------------------------------------------------------------

# Each step's phase, estimate and cap (seconds) on the device (16 cores, H100/H200). The estimates add what
# was measured CPU-side here (tools/README.md, "Time budget": interpreter start and imports, pytest
# collection, torch.compile / opcheck tracing, the compile time of every source file from ninja's log)
# to the GPU work. The script gives a step min(cap, time left - the estimates of this call's later steps),
# so the estimates decide what a short budget cuts (the benchmark first), the caps bound a hung step.
STEPS: Dict[str, Tuple[str, int, int]] = {
    # step: (phase, estimate, cap)
    "environment": ("preflight", 15, 40),      # torch import ~5 s, nvidia-smi ~1 s, nvcc --version
    "sanitizer-probe": ("preflight", 20, 60),  # nvcc of a 20-line kernel ~5 s, two runs, sanitizer start ~5 s
    "build": ("build", 300, 480),              # cold: slowest .cu file for one arch; cached: ~20 s
    "build-info": ("build", 15, 60),
    "tests": ("tests", 200, 400),              # 103 tests, collected in 23 s here; opcheck / torch.compile dominate
    "fused-tests": ("tests", 120, 300),        # 43 tests, collected in 19 s here
    "memcheck": ("sanitizer", 150, 300),       # memcheck slows our kernels ~10-50x; cuBLAS/cuDNN unfiltered
    "racecheck": ("sanitizer", 60, 180),       # one kernel instrumented, the fused-path half of the smoke
    "synccheck": ("sanitizer", 45, 150),
    "bench": ("bench", 240, 480),              # --budget-s is its own limit less 40 s of imports/teardown
    "se": ("bench", 45, 90),                   # Triton JIT + timm SEModule under torch.compile
}
PHASES = ("preflight", "build", "tests", "sanitizer", "bench")


def cmd_estimates(args) -> int:
    for name, (_, est, cap) in STEPS.items():
        print(name, est, cap)
    return 0


# --- junit -------------------------------------------------------------------------------------------

def junit_counts(path: Path) -> Dict[str, object]:
    """tests, failures, errors, skipped (with the skipped tests' ids and reasons) of a junit XML file."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts: Dict[str, object] = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "skipped_tests": [],
                                 "failed_tests": []}
    for suite in suites:
        for case in suite.iter("testcase"):
            counts["tests"] += 1
            name = f"{case.get('classname')}::{case.get('name')}"
            for tag, key in (("failure", "failures"), ("error", "errors"), ("skipped", "skipped")):
                node = case.find(tag)
                if node is not None:
                    counts[key] += 1
                    (counts["skipped_tests"] if tag == "skipped" else counts["failed_tests"]).append(
                        f"{name}: {(node.get('message') or '').strip()[:200]}")
    return counts


def junit_verdict(counts: Dict[str, object]) -> bool:
    """A test file passes when it ran tests and none failed, errored or was skipped (skips count as
    failures: on the GPU machine every test of these files must run)."""
    return counts["tests"] > 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0


def cmd_junit(args) -> int:
    ok = True
    for path in args.files:
        c = junit_counts(Path(path))
        good = junit_verdict(c)
        ok &= good
        print(f"{path}: {c['tests']} tests, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped"
              f" -> {'PASS' if good else 'FAIL'}")
        for line in c["failed_tests"] + [f"SKIPPED (counts as a failure) {s}" for s in c["skipped_tests"]]:
            print(f"  {line}")
    return 0 if ok else 1


# --- preflight ---------------------------------------------------------------------------------------

def _version_of(cmd: List[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"not available ({err})"
    lines = [ln for ln in out.splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "no output"


def cmd_preflight(args) -> int:
    """Everything the later phases need, one line each; exit 1 when the GPU or a build prerequisite is missing
    (package gaps are reported: the tests that need them would be skips, which the verdict counts as failures)."""
    import importlib.util
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    ok = True
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    lines = [f"python {sys.version.split()[0]} ({sys.executable}); torch {torch.__version__}, "
             f"CUDA {torch.version.cuda}, cuDNN {cudnn}"]
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        lines.insert(0, f"GPU {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                        f"{p.multi_processor_count} SMs)")
    else:
        lines.insert(0, "GPU: none visible to torch")
        ok = False
    cuda_home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home or "", "bin", "nvcc")
    lines.append(f"CUDA_HOME {cuda_home}: nvcc {_version_of([nvcc, '--version'])}")
    if not os.path.isfile(nvcc):
        ok = False
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    lines.append(f"Python.h {'found' if header.exists() else 'MISSING'} ({header})")
    ok &= header.exists()
    lines.append(f"ninja {'found' if cpp_extension.is_ninja_available() else 'MISSING (the build would be serial)'}")
    missing = [m for m in ("pytest", "pytest_timeout", "torchvision", "timm", "triton")
               if importlib.util.find_spec(m) is None]
    lines.append("packages: " + ("all found" if not missing else "MISSING " + ", ".join(missing)))
    ok &= not ({"pytest", "torchvision"} & set(missing))
    print("\n".join(lines))
    log_dir = Path(os.environ.get("LOG_DIR", "."))
    if log_dir.is_dir():
        (log_dir / "environment.txt").write_text("\n".join(lines[:2]) + "\n")
    return 0 if ok else 1


PROBE_SOURCE = r"""// The preflight's probe: a kernel built by this toolkit must run on this GPU (also under
// compute-sanitizer).
#include <cstdio>
__global__ void probe(int* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = 2 * i;
}
int main() {
  const int n = 1000;
  int* d = nullptr;
  if (cudaMalloc(&d, n * sizeof(int)) != cudaSuccess) { std::printf("cudaMalloc failed\n"); return 1; }
  probe<<<(n + 255) / 256, 256>>>(d, n);
  int h[n];
  const cudaError_t err = cudaMemcpy(h, d, sizeof(h), cudaMemcpyDeviceToHost);
  cudaFree(d);
  if (err != cudaSuccess || h[n - 1] != 2 * (n - 1)) {
    std::printf("probe failed: %s\n", cudaGetErrorString(err));
    return 1;
  }
  std::printf("probe ok\n");
  return 0;
}
"""


def cmd_probe_source(args) -> int:
    print(PROBE_SOURCE, end="")
    return 0


def cmd_build_info(args) -> int:
    import torch

    sys.path.insert(0, str(ROOT))
    import densenet_fast as dnf

    info = dnf.build_info()
    print(info)
    cap = "%d.%d" % torch.cuda.get_device_capability()
    archs = str(info.get("cuda_archs", ""))
    problems = [msg for bad, msg in ((not info["cuda"], "extension built without CUDA kernels"),
                                     (not info["cuda_kernels_registered"], "CUDA kernels not registered"),
                                     (cap not in archs and cap.replace(".", "") not in archs,
                                      f"no device code for this GPU (sm {cap}) in {archs!r}")) if bad]
    for msg in problems:
        print(f"ERROR: {msg}")
    return 1 if problems else 0


# --- step status -------------------------------------------------------------------------------------

# What compute-sanitizer prints where it cannot instrument the device (e.g. under gVisor: "Device not
# supported", then error 999 at the first allocation), as opposed to errors it found in our kernels.
SANITIZER_UNSUPPORTED = re.compile(r"Device not supported|not supported on this (device|platform)|"
                                   r"unsupported on this device|compute-sanitizer not found|"
                                   r"Failed to initialize|LibraryNotLoaded", re.I)
SANITIZER_STEPS = ("sanitizer-probe", "memcheck", "racecheck", "synccheck")
PYTEST_STEPS = ("tests", "fused-tests")


def classify(name: str, rc: int, log_dir: Path) -> str:
    """Status of a finished step from its exit code and files: TIMEOUT (timeout's 124 / 137), UNSUPPORTED (a
    sanitizer step on a device compute-sanitizer cannot instrument; the probe records why in
    sanitizer.unsupported, which the later sanitizer steps read), FAILED (a non-zero exit; a pytest step
    whose junit file shows a skip or no test), else ok."""
    log = log_dir / f"{name}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    if rc in (124, 137):
        return "TIMEOUT"
    if name in SANITIZER_STEPS and rc != 0:
        m = SANITIZER_UNSUPPORTED.search(text)
        if m or rc == 3:
            if name == "sanitizer-probe":
                line = next((ln for ln in text.splitlines() if m and m.group(0) in ln), "exit code 3")
                (log_dir / "sanitizer.unsupported").write_text(line.strip() + "\n")
            return "UNSUPPORTED"
    if rc != 0:
        return "FAILED"
    if name in PYTEST_STEPS:
        xml = log_dir / f"{name}.xml"
        if not xml.exists() or not junit_verdict(junit_counts(xml)):
            return "FAILED"
    return "ok"


def cmd_classify(args) -> int:
    print(classify(args.name, int(args.rc), Path(args.log_dir)))
    return 0


# --- build errors ----------------------------------------------------------------------------------------

# nvcc / cudafe: `file.cu(12): error: ...`; gcc / clang: `file.cpp:12:5: error: ...` (also `fatal error`);
# ptxas / nvcc driver errors; the linker.
_COMPILER_ERROR = re.compile(r"^(?P<loc>\S+\(\d+\)): (catastrophic )?error( #\S+)?: |"
                             r"^(?P<loc2>\S+:\d+(:\d+)?): (fatal )?error: |"
                             r"^(ptxas|nvcc|nvlink) (fatal|error)\b|"
                             r"undefined reference to |^collect2: error")
# Lines that belong to the error above them: nvcc's source line and caret, "detected during", notes.
_CONTEXT = re.compile(r"^\s+(\^|\S.*)$|^\s*detected during|: note: |^\s+required from")


def build_errors(text: str, limit: int = 5, context: int = 3) -> List[str]:
    """The first `limit` distinct compiler errors of a build log (each with up to `context` lines that belong
    to it), in the order they appear: the compiler's own words, not setuptools' traceback below them. Falls
    back to the log's last lines that mention an error when no compiler error is recognised (a missing
    nvcc, a CUDA version mismatch, ...)."""
    lines = text.splitlines()
    out: List[str] = []
    seen = set()
    for i, line in enumerate(lines):
        if not _COMPILER_ERROR.search(line):
            continue
        key = re.sub(r"^\S+?[(:]\d+.*?: ", "", line).strip()  # the same message from another job
        if (line.strip(), key) in seen or key in seen:
            continue
        seen.add(key)
        block = [line.rstrip()]
        for nxt in lines[i + 1:i + 1 + context]:
            if _COMPILER_ERROR.search(nxt) or not _CONTEXT.search(nxt) or nxt.startswith("["):
                break
            block.append(nxt.rstrip())
        out += block
        if len(seen) >= limit:
            break
    if out:
        failed = [ln[len("FAILED: "):] for ln in lines if ln.startswith("FAILED: ")]
        if failed:
            out.append(f"(ninja: {len(failed)} target(s) failed: {', '.join(Path(f).name for f in failed[:4])})")
        return out
    tail = [ln.rstrip() for ln in lines if re.search(r"error|Error|ERROR|fatal", ln)]
    return (tail[-limit:] or [ln.rstrip() for ln in lines if ln.strip()][-limit:])


def cmd_build_errors(args) -> int:
    print("\n".join(build_errors(Path(args.log).read_text(errors="replace"))))
    return 0


def bench_table(doc: dict) -> List[str]:
    """Per model: batch-64 step time, img/s, memory and the largest batch of every variant."""
    by: Dict[str, Dict[str, dict]] = {}
    for row in doc.get("rows", []):
        if "variant" not in row or "model" not in row or row["model"] == "hot spot":
            continue
        entry = by.setdefault(row["model"], {}).setdefault(row["variant"], {})
        what = row.get("what", "")
        if what == "memory":
            entry["mem"] = row.get("max_memory_allocated_mib")
            entry["loss"] = row.get("loss")
        elif what.startswith("step time, batch 64") and "ms" not in entry:  # compile: its own group with ours
            entry["ms"], entry["img_s"] = row.get("ms_median"), row.get("img_s")
        elif what == "largest batch":
            entry["max_batch"] = row.get("largest_batch")
            if row.get("complete_search") is False:
                entry["max_batch_note"] = ">="
        if row.get("status") != "ok":
            entry.setdefault("notes", []).append(f"{what}: {row.get('status')}")
    lines = []
    for model, variants in by.items():
        lines.append(f"{model} (224, bf16 autocast, channels_last, batch 64)")
        lines.append(f"  {'variant':<22}{'step ms':>9}{'img/s':>8}{'max MiB':>10}{'max batch':>11}{'loss':>9}  notes")
        for name, e in variants.items():
            def f(v, spec):
                return format(v, spec) if isinstance(v, (int, float)) else "-"
            mb = (e.get("max_batch_note", "") + str(e["max_batch"])) if e.get("max_batch") is not None else "-"
            lines.append(f"  {name:<22}{f(e.get('ms'), '9.1f'):>9}{f(e.get('img_s'), '8.0f'):>8}"
                         f"{f(e.get('mem'), '10.0f'):>10}{mb:>11}{f(e.get('loss'), '9.4f'):>9}  "
                         + "; ".join(e.get("notes", [])))
        lines += target_lines(variants)
    return lines


def target_lines(variants: Dict[str, dict]) -> List[str]:
    ours, tv = variants.get("ours", {}), variants.get("torchvision", {})
    out = []
    base_ms = [variants[n]["ms"] for n in ("torchvision", "torchvision_memeff", "torchvision_compile")
               if variants.get(n, {}).get("ms")]
    if ours.get("ms") and base_ms:
        r = ours["ms"] / min(base_ms)
        out.append(f"  target step <= {STEP_RATIO_TARGET:.1f}x fastest torchvision: {r:.2f}x "
                   f"{'met' if r <= STEP_RATIO_TARGET else 'MISSED'}")
    if ours.get("mem") and tv.get("mem"):
        r = ours["mem"] / tv["mem"]
        out.append(f"  target memory <= 1/6 torchvision: {r:.3f}x {'met' if r <= MEMORY_RATIO_TARGET else 'MISSED'}")
    if ours.get("max_batch") and tv.get("max_batch"):
        r = ours["max_batch"] / tv["max_batch"]
        bound = " (lower bound)" if ours.get("max_batch_note") else ""
        out.append(f"  target largest batch >= 6x torchvision: {r:.1f}x{bound} "
                   f"{'met' if r >= BATCH_RATIO_TARGET else 'MISSED'}")
    return out


def hot_spot_lines(doc: dict) -> List[str]:
    """The hot-spot rows of bench_cuda_block (its hot_spot_rows: side-by-side timings), one line each."""
    rows = [r for r in doc.get("rows", []) if r.get("model") == "hot spot" and "variant" in r]
    return ["hot spots (ms, median):"] * bool(rows) + [
        f"  {r['what'][len('hot spot: '):]:<52} {r['variant']:<16} "
        + (f"{r['ms_median']:8.3f}" if r.get("status") == "ok" and r.get("ms_median") else str(r.get("status")))
        for r in rows]


def se_lines(doc: dict) -> List[str]:
    lines = [f"SE fwd+bwd on {doc.get('device')} (N=64, C=256, 56x56 bf16): ms, achieved HBM GB/s, % of peak"]
    for r in doc.get("rows", []):
        frac = r.get("fraction_of_peak")
        lines.append(f"  {r['impl']:<14} {r['layout']:<14} {r.get('median_ms') or float('nan'):8.3f} ms "
                     f"{r.get('gbps') or float('nan'):7.0f} GB/s " + (f"{100 * frac:4.0f}%" if frac else "   -")
                     + (f"  ERROR {r['error']}" if r.get("error") else ""))
        if r["impl"] == "densenet_fast" and frac:
            lines.append(f"  target SE >= {SE_BANDWIDTH_TARGET:.0%} of peak bandwidth: "
                         f"{'met' if frac >= SE_BANDWIDTH_TARGET else 'MISSED'}")
    return lines


# --- summary -----------------------------------------------------------------------------------------

def read_steps(log_dir: Path) -> List[Dict[str, str]]:
    """steps.tsv rows written by run_gpu_checks.sh (name, status, seconds, limit, log), the latest row of each
    step (a phase run again in a later call replaces its earlier rows), in the order of STEPS."""
    path = log_dir / "steps.tsv"
    if not path.exists():
        return []
    latest: Dict[str, Dict[str, str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, status, seconds, limit, log = (line.split("\t") + ["", "", "", ""])[:5]
        latest[name] = {"name": name, "status": status, "seconds": seconds, "limit": limit, "log": log}
    order = list(STEPS)
    return sorted(latest.values(), key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))


def _log(log_dir: Path, name: str) -> str:
    path = log_dir / f"{name}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def pytest_details(log_dir: Path, name: str, status: str) -> List[str]:
    """How far a pytest step got and what failed: the junit file (written also on the timeout's SIGINT),
    else the -v lines of the log; the selected count from pytest's `collected` line."""
    text = _log(log_dir, name)
    m = re.search(r"(\d+) selected", text) or re.search(r"collected (\d+) items?", text)
    total = int(m.group(1)) if m else None
    xml = log_dir / f"{name}.xml"
    out = []
    if xml.exists():
        c = junit_counts(xml)
        done, passed = c["tests"], c["tests"] - c["failures"] - c["errors"] - c["skipped"]
        bad = c["failed_tests"] + [f"SKIPPED (counts as a failure) {s}" for s in c["skipped_tests"]]
    else:
        results = re.findall(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", text, re.M)
        done, passed = len(results), sum(r == "PASSED" for _, r in results)
        bad = [f"{t}: {r}" for t, r in results if r != "PASSED"]
    of = f" of {total}" if total is not None else ""
    head = f"{done}{of} tests finished, {passed} passed"
    if status == "TIMEOUT":
        head = f"INCOMPLETE: {done}{of} tests finished before the limit, {passed} passed"
    out.append(head)
    out += bad[:6] + ([f"... {len(bad) - 6} more in {name}.xml"] if len(bad) > 6 else [])
    if status == "FAILED" and not done:
        out += [ln for ln in text.splitlines() if ln.strip()][-6:]
    return out


def sanitizer_details(log_dir: Path, name: str, status: str) -> List[str]:
    text = _log(log_dir, name)
    if status == "UNSUPPORTED":
        why = (log_dir / "sanitizer.unsupported")
        reason = why.read_text().strip() if why.exists() else (SANITIZER_UNSUPPORTED.search(text) or [""])[0]
        return [f"compute-sanitizer cannot check this device: {reason} (reported, not a failure of the kernels)"]
    findings = [ln.strip() for ln in text.splitlines()
                if ln.startswith("=========") and ln.strip("= \n") and "ERROR SUMMARY" not in ln
                and "COMPUTE-SANITIZER" not in ln]
    summary = [ln.strip() for ln in text.splitlines() if "ERROR SUMMARY" in ln or "RACECHECK SUMMARY" in ln]
    tail = [] if findings else [ln for ln in text.splitlines() if ln.strip()][-5:]
    return summary[-1:] + findings[:8] + tail


def step_details(log_dir: Path, step: Dict[str, str]) -> List[str]:
    name, status = step["name"], step["status"]
    if name in PYTEST_STEPS and status != "not-run":
        return pytest_details(log_dir, name, status)
    if status in ("ok", "not-run"):
        return []
    if name == "build":
        return ["first compiler errors:"] + build_errors(_log(log_dir, name))
    if name in SANITIZER_STEPS:
        return sanitizer_details(log_dir, name, status)
    if status == "TIMEOUT" and name == "bench":
        return [f"INCOMPLETE: stopped at its limit ({step['limit']} s); the rows it finished are below"]
    if status == "TIMEOUT":
        return [f"INCOMPLETE: stopped at its limit ({step['limit']} s); the end of {name}.log:"] + \
            [ln for ln in _log(log_dir, name).splitlines() if ln.strip()][-3:]
    return [ln for ln in _log(log_dir, name).splitlines() if ln.strip()][-6:]


def verdict(statuses: List[str]) -> str:
    """FAIL when a step failed, INCOMPLETE when one ran out of time, was not run or could not be checked
    (UNSUPPORTED), PASS when every step is ok; NOTHING RUN without steps."""
    if not statuses:
        return "NOTHING RUN"
    if "FAILED" in statuses:
        return "FAIL"
    if any(s != "ok" for s in statuses):
        return "INCOMPLETE"
    return "PASS"


def summary_lines(log_dir: Path, phases: Optional[List[str]] = None) -> List[str]:
    steps = read_steps(log_dir)
    phases = list(phases or PHASES)
    lines = ["=" * 100, f"GPU checks, this call: {' '.join(phases)}  (logs: gpu_checks.tar.gz = {log_dir})"]
    env = log_dir / "environment.txt"
    if env.exists():
        lines += [f"  {line}" for line in env.read_text().splitlines()[:2]]
    for s in steps:
        phase = STEPS.get(s["name"], ("?",))[0]
        lines.append(f"  {s['status']:<11} {phase:<9} {s['name']:<16} {s['seconds']:>4} s of {s['limit'] or '-':>4}")
        lines += [f"      {d}"[:200] for d in step_details(log_dir, s)]
    for path in sorted(log_dir.glob("bench_cuda_block_*.json")):
        doc = json.loads(path.read_text())
        skipped = sum(r.get("status") == "skipped" for r in doc.get("rows", []))
        lines += [f"benchmark: {path.name}" + (f" (INCOMPLETE: {skipped} rows skipped for time)" if skipped else "")]
        lines += bench_table(doc) + hot_spot_lines(doc)
    se = log_dir / "bench_se.json"
    if se.exists():
        lines += se_lines(json.loads(se.read_text()))
    recorded = {STEPS.get(s["name"], ("?",))[0] for s in steps}
    this_call = [s["status"] for s in steps if STEPS.get(s["name"], ("?",))[0] in phases]
    missing = [p for p in PHASES if p not in recorded]
    lines.append(f"phases recorded: {', '.join(p for p in PHASES if p in recorded) or 'none'}"
                 + (f"; not run yet: {', '.join(missing)}" if missing else ""))
    bad = [s["name"] for s in steps if s["status"] != "ok" and STEPS.get(s["name"], ("?",))[0] in phases]
    overall = verdict([s["status"] for s in steps] + ["not-run"] * len(missing))
    lines.append(f"VERDICT (this call): {verdict(this_call)}"
                 + (f"  [not ok: {', '.join(bad)}]" if bad else ""))
    lines.append(f"VERDICT (all phases): {overall}")
    lines.append("=" * 100)
    return lines


def cmd_summary(args) -> int:
    lines = summary_lines(Path(args.log_dir), args.phases)
    print("\n".join(lines))
    this_call = lines[-3].split(": ", 1)[1]
    return {"PASS": 0, "INCOMPLETE": 3}.get(this_call.split()[0], 1)


# --- simulated steps (tests/test_cuda_gpu_checks.py) ------------------------------------------------------

_SIM_BUILD_FAIL = """\
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 CUDA_HOME=/usr/local/cuda
running build_ext
[1/18] c++ -MMD -MF build/temp/csrc/ops.o.d -c csrc/ops.cpp -o build/temp/csrc/ops.o -O3
[2/18] /usr/local/cuda/bin/nvcc -c csrc/cuda/tail_cuda.cu -o build/temp/csrc/cuda/tail_cuda.o
FAILED: build/temp/csrc/cuda/dense_block_cuda.o
/usr/local/cuda/bin/nvcc -c csrc/cuda/dense_block_cuda.cu -o build/temp/csrc/cuda/dense_block_cuda.o
csrc/cuda/reduce.cuh(57): error: identifier "kRowsPerChunkX" is undefined
      const int64_t r1 = r0 + kRowsPerChunkX < rows ? r0 + kRowsPerChunk : rows;
                              ^
          detected during instantiation of "void dnf::cuda::ColumnPartials<acc_t, NV, Term>::operator()(int64_t)"
[3/18] c++ -MMD -MF build/temp/csrc/cpu/tail_cpu.o.d -c csrc/cpu/tail_cpu.cpp
csrc/cpu/tail_cpu.cpp:12:5: warning: unused variable 'n' [-Wunused-variable]
1 error detected in the compilation of "csrc/cuda/dense_block_cuda.cu".
ninja: build stopped: subcommand failed.
Traceback (most recent call last):
  File "torch/utils/cpp_extension.py", line 2400, in _run_ninja_build
    subprocess.run(
subprocess.CalledProcessError: Command '['ninja', '-v', '-j', '16']' returned non-zero exit status 1.

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "setup.py", line 120, in <module>
RuntimeError: Error compiling objects for extension
"""


def _sim_junit(path: Path, n: int, failed: int = 0) -> None:
    cases = "".join(f'<testcase classname="tests.test_cuda_dense_block" name="test_{i}" time="0.5">'
                    + (f'<failure message="assert max err 3e-2 &lt;= 1e-4 (case {i})"/>' if i < failed else "")
                    + "</testcase>" for i in range(n))
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="{n}">{cases}'
                    "</testsuite></testsuites>")


def _sim_bench(log_dir: Path, status: str) -> None:
    rows = []
    for variant, mem, ms in (("torchvision", 12000.0, 100.0), ("ours", 1800.0, 90.0)):
        rows.append({"model": "densenet121", "variant": variant, "what": "memory", "status": "ok", "loss": 6.91,
                     "max_memory_allocated_mib": mem})
        rows.append({"model": "densenet121", "variant": variant, "what": "step time, batch 64", "status": "ok",
                     "ms_median": ms, "img_s": 64e3 / ms})
    rows.append({"model": "hot spot", "variant": "densenet_fast", "what": "hot spot: channel moments [64, 32, 7, 7]",
                 "status": "ok", "ms_median": 0.011})
    if status == "fail":
        rows.append({"model": "densenet201", "variant": "ours", "what": "memory", "status": "failed",
                     "error": "CUDA error: an illegal memory access was encountered"})
    rows.append({"model": "densenet201", "variant": "ours", "what": "memory", "status": "skipped",
                 "reason": "time budget"})
    (log_dir / "bench_cuda_block_SIMULATED_GPU_x.json").write_text(json.dumps({"rows": rows, "complete": False}))


def simulate(name: str, status: str, log_dir: Path) -> int:
    """Prints what the real step prints for STATUS (ok, fail, timeout, unsupported), writes its files (junit,
    benchmark JSON, environment.txt) and exits as it would; `timeout` waits to be stopped by the step's limit."""
    if name == "environment":
        (log_dir / "environment.txt").write_text("GPU SIMULATED (sm_90, 80 GiB, 132 SMs)\n"
                                                 "python 3.12.3; torch 2.11.0\n")
        print("GPU: none visible to torch" if status == "fail" else "GPU SIMULATED (sm_90, 80 GiB, 132 SMs)")
    elif name == "sanitizer-probe":
        print("probe ok")
        if status == "unsupported":
            print("========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"
                  "========= Target application returned an error")
            return 1
        print("nvcc fatal : Unsupported gpu architecture" if status == "fail" else "========= ERROR SUMMARY: 0 errors")
    elif name == "build":
        print(_SIM_BUILD_FAIL if status == "fail" else "[18/18] c++ -shared ... -o densenet_fast/_C.so")
    elif name in PYTEST_STEPS:
        print("collected 46 items / 3 deselected / 43 selected")
        n = 43 if status != "timeout" else 17
        for i in range(n):
            print(f"tests/test_cuda_dense_block.py::test_{i} {'FAILED' if status == 'fail' and i < 2 else 'PASSED'}")
        _sim_junit(log_dir / f"{name}.xml", n, failed=2 if status == "fail" else 0)
    elif name in ("memcheck", "racecheck", "synccheck"):
        if status == "unsupported":
            print("========= Error: Device not supported")
            return 1
        if status == "fail":
            print("========= COMPUTE-SANITIZER\n========= Invalid __global__ read of size 2 bytes\n"
                  "=========     at void dnf::cuda::for_each_kernel<dnf::cuda::MaskView>(long, F)+0x1f0\n"
                  "=========     by thread (3,0,0) in block (7,0,0)\n========= ERROR SUMMARY: 1 error")
            return 1
        print("smoke ok\n========= ERROR SUMMARY: 0 errors")
    elif name == "bench":
        _sim_bench(log_dir, status)
    elif name == "se":
        (log_dir / "bench_se.json").write_text(json.dumps({"device": "SIMULATED", "rows": [
            {"impl": "densenet_fast", "layout": "channels_last", "median_ms": 0.5, "gbps": 4000.0,
             "fraction_of_peak": 0.83, "error": None}]}))
    sys.stdout.flush()
    if status == "timeout":
        time.sleep(120)
    return {"ok": 0, "timeout": 0, "unsupported": 3}.get(status, 1)


def cmd_simulate(args) -> int:
    return simulate(args.name, args.status, Path(os.environ.get("LOG_DIR", ".")))


# --- sanitizer workload --------------------------------------------------------------------------------

def smoke(fused_only: bool = False) -> None:
    """Every CUDA kernel on shapes that reach the tree reductions (4608 and 4606 rows: 36 chunks, two tree
    levels), grid.y > 1 in the fused GEMM (160 bottleneck channels), fp32, bf16/fp16 autocast and a .half() /
    .bfloat16() model; simple and fused paths; forward and backward; train and eval; tails with odd
    H/W. Two block geometries: channel counts that are multiples of 8 (the fused GEMM's 16-byte path) and
    odd ones (C0 = 7, k = 13: its element-wise path), odd H/W for the second. Small enough to run under
    compute-sanitizer in well under a minute per tool. fused_only: only the runs that reach the
    shared-memory kernel (racecheck, synccheck)."""
    import torch

    sys.path.insert(0, str(ROOT))
    import densenet_fast as dnf
    from densenet_fast.ops import dense_block as block_ops

    dev = torch.device("cuda")
    torch.manual_seed(0)
    geometries = ((2, 8, 48, 48, 2, 40, 4),   # N, C0, H, W, L, k, bn_size: 16-byte path
                  (2, 7, 47, 49, 2, 13, 4))   # odd channels (ld, c not multiples of 8), odd H/W
    for path in ("fused",) if fused_only else ("simple", "fused"):
        os.environ["DNF_CUDA_BN_GEMM"] = path
        for N, C0, H, W, L, k, bs in geometries:
            for mode in ("fp32", "bf16-autocast", "fp16-autocast", "bf16-model", "fp16-model")[int(fused_only):]:
                blk = dnf.DenseBlock(L, C0, bs, k, drop_rate=0.2).to(dev)
                dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode[:4], torch.float32)
                model_dtype = dtype if mode.endswith("model") else torch.float32
                blk = blk.to(model_dtype)
                for training in (True, False):
                    blk.train(training)
                    x = torch.randn(N, C0, H, W, device=dev, dtype=model_dtype, requires_grad=True)
                    with torch.autocast("cuda", dtype=dtype, enabled=mode.endswith("autocast")):
                        res = block_ops.fused_dense_block(x, blk.block_params(), training=training,
                                                          drop_rate=0.2 if training else 0.0)
                    res.buffer.float().square().mean().backward()
    os.environ.pop("DNF_CUDA_BN_GEMM")
    for dtype in () if fused_only else (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(N, 12, 49, 47, device=dev).to(dtype)
        w = torch.ones(12, device=dev, requires_grad=True)
        b = torch.zeros(12, device=dev, requires_grad=True)
        cw = torch.randn(5, 12, 1, 1, device=dev, dtype=dtype, requires_grad=True)
        for training in (True, False):
            mean, var = dnf.ops.channel_moments(x)
            xr = x.clone().requires_grad_()
            dnf.ops.transition(xr, mean, var, w, b, cw, training=training).float().sum().backward()
            dnf.ops.norm_relu_pool(xr, mean, var, w, b, training=training).float().sum().backward()
    torch.cuda.synchronize()
    print("smoke ok")


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("estimates", "preflight", "probe-source", "build-info"):
        sub.add_parser(name)
    sm = sub.add_parser("smoke")
    sm.add_argument("--fused-only", action="store_true")
    j = sub.add_parser("junit")
    j.add_argument("files", nargs="+")
    c = sub.add_parser("classify")
    c.add_argument("name")
    c.add_argument("rc")
    c.add_argument("log_dir")
    b = sub.add_parser("build-errors")
    b.add_argument("log")
    s = sub.add_parser("summary")
    s.add_argument("log_dir")
    s.add_argument("--phases", nargs="*", choices=PHASES)
    si = sub.add_parser("simulate")
    si.add_argument("name", choices=list(STEPS))
    si.add_argument("status", choices=("ok", "fail", "timeout", "unsupported"))
    args = ap.parse_args(argv)
    if args.cmd == "smoke":
        smoke(args.fused_only)
        return 0
    return {"estimates": cmd_estimates, "preflight": cmd_preflight, "probe-source": cmd_probe_source,
            "build-info": cmd_build_info, "junit": cmd_junit, "classify": cmd_classify,
            "build-errors": cmd_build_errors, "summary": cmd_summary, "simulate": cmd_simulate}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
