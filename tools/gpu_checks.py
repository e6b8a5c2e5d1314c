"""Python helpers of tools/run_gpu_checks.sh.

    python tools/gpu_checks.py smoke                 the compute-sanitizer workload (needs a GPU)
    python tools/gpu_checks.py junit FILE.xml        test counts; exit 1 on any failure, error or skip
    python tools/gpu_checks.py summary LOG_DIR       the one-screen summary (steps, benchmark, targets)

Everything but ``smoke`` runs on any machine (tests/test_cuda_gpu_checks.py checks it on CPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]

# Targets of issue 13 (H200, bf16, channels_last, batch 64), reported against, not enforced.
STEP_RATIO_TARGET = 1.0      # ours <= 1.0x the fastest torchvision variant
MEMORY_RATIO_TARGET = 1 / 6  # max_memory_allocated <= 1/6 of torchvision's
BATCH_RATIO_TARGET = 6.0     # largest batch >= 6x torchvision's
SE_BANDWIDTH_TARGET = 0.8    # SE kernels >= 80% of peak HBM bandwidth


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


# --- summary -----------------------------------------------------------------------------------------

def read_steps(log_dir: Path) -> List[Dict[str, str]]:
    """steps.tsv rows written by run_gpu_checks.sh: name, status, seconds, log file."""
    path = log_dir / "steps.tsv"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, status, seconds, log = (line.split("\t") + ["", "", ""])[:4]
        rows.append({"name": name, "status": status, "seconds": seconds, "log": log})
    return rows


def bench_table(doc: dict) -> List[str]:
    """Per model: batch-64 step time, img/s, memory and the largest batch of every variant."""
    by: Dict[str, Dict[str, dict]] = {}
    for row in doc.get("rows", []):
        if "variant" not in row or "model" not in row:
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


def summary_lines(log_dir: Path) -> List[str]:
    steps = read_steps(log_dir)
    lines = ["=" * 100, f"GPU checks: {log_dir}"]
    env = log_dir / "environment.txt"
    if env.exists():
        lines += [f"  {line}" for line in env.read_text().splitlines()[:3]]
    for s in steps:
        lines.append(f"  {s['status']:<8} {s['name']:<48} {s['seconds']:>5} s   {s['log']}")
    for path in sorted(log_dir.glob("bench_cuda_block_*.json")):
        doc = json.loads(path.read_text())
        skipped = sum(r.get("status") == "skipped" for r in doc.get("rows", []))
        lines += [f"benchmark: {path.name}" + (f" (INCOMPLETE: {skipped} rows skipped for time)" if skipped else "")]
        lines += bench_table(doc)
    se = log_dir / "bench_se.json"
    if se.exists():
        lines += se_lines(json.loads(se.read_text()))
    bad = [s for s in steps if s["status"] != "ok"]
    lines.append(f"VERDICT: {'PASS' if steps and not bad else 'FAIL'}"
                 + (f" ({len(bad)} of {len(steps)} steps not ok: {', '.join(s['name'] for s in bad)})" if bad else
                    f" ({len(steps)} steps)"))
    lines.append("=" * 100)
    return lines


def cmd_summary(args) -> int:
    lines = summary_lines(Path(args.log_dir))
    print("\n".join(lines))
    return 0 if lines[-2].startswith("VERDICT: PASS") else 1


# --- sanitizer workload --------------------------------------------------------------------------------

def smoke(fused_only: bool = False) -> None:
    """Every CUDA kernel on shapes that reach the tree reductions (4608 rows: 36 chunks, two tree levels),
    grid.y > 1 in the fused GEMM (160 bottleneck channels), fp32, bf16/fp16 autocast and a .half() /
    .bfloat16() model; simple and fused paths; forward and backward; train and eval; tails with odd
    H/W. Small enough to run under compute-sanitizer in well under a minute per tool. fused_only: only
    the runs that reach the shared-memory kernel (racecheck, synccheck)."""
    import os

    import torch

    sys.path.insert(0, str(ROOT))
    import densenet_fast as dnf
    from densenet_fast.ops import dense_block as block_ops

    dev = torch.device("cuda")
    torch.manual_seed(0)
    N, C0, H, W, L, k, bs = 2, 8, 48, 48, 2, 40, 4
    for path in ("fused",) if fused_only else ("simple", "fused"):
        os.environ["DNF_CUDA_BN_GEMM"] = path
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
    sm = sub.add_parser("smoke")
    sm.add_argument("--fused-only", action="store_true")
    j = sub.add_parser("junit")
    j.add_argument("files", nargs="+")
    s = sub.add_parser("summary")
    s.add_argument("log_dir")
    args = ap.parse_args(argv)
    if args.cmd == "smoke":
        smoke(args.fused_only)
        return 0
    return {"junit": cmd_junit, "summary": cmd_summary}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
