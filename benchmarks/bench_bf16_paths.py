"""bf16 autocast on every CPU (issue 27): densenet121's training step in float32 and under CPU bfloat16 autocast,
densenet_fast and torchvision side by side, on this CPU as it is and on stand-ins for CPUs without bfloat16
hardware (native bfloat16 and AMX taken away from torch and from our kernels by environment switches).

Per configuration: one fresh process times the four steps interleaved (warm-up, then rounds; minimum and median),
then one fresh process per step measures its steady peak RSS growth (a warm-up step, VmHWM reset, one step with
its gradients allocated in it), with glibc's mmap threshold fixed at 128 KiB and with the default allocator.

    python -m benchmarks.bench_bf16_paths                      # writes benchmarks/results/bf16-paths/cpu.{json,md}
    python -m benchmarks.bench_bf16_paths --repeats 3 --batch 4 --out /tmp/bf16  # quicker
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

CONFIGS: Dict[str, Dict[str, str]] = {
    "this CPU": {},
    # An AVX-512 CPU without AVX512_BF16 or AMX (issue 27's Intel Xeon model 207).
    "stand-in: AVX-512, no bf16 hardware": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                                            "DNF_CPU_BF16_ROWS": "portable"},
}
STEPS = ("densenet_fast fp32", "densenet_fast bf16", "torchvision fp32", "torchvision bf16")


def _child_env(config: Dict[str, str], threshold: bool, threads: int) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DNF_") and k not in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                                   "MALLOC_MMAP_THRESHOLD_")}
    env.update(config)
    env["OMP_NUM_THREADS"] = str(threads)
    if threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    return env


def _worker(args: argparse.Namespace) -> Dict[str, Any]:
    """Runs in the child: the steps named by --steps, timed interleaved, or the one step's memory."""
    import torch
    import torchvision

    import densenet_fast as dnf
    from benchmarks.measure import make_inputs, step_peak_memory, train_step
    from benchmarks.timing import interleaved_times

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x, y = make_inputs(args.batch, 224, 1000, torch.device("cpu"))
    models = {"densenet_fast": dnf.densenet121(), "torchvision": torchvision.models.densenet121()}
    models["torchvision"].load_state_dict(models["densenet_fast"].state_dict())

    def step(name: str):
        impl, dt = name.split()
        dtype = torch.bfloat16 if dt == "bf16" else torch.float32
        return lambda: train_step(models[impl], x, y, dtype)

    names = args.steps.split(",")
    out: Dict[str, Any] = {"cpu_engine": dnf.build_info()["cpu_engine"]}
    if args.mode == "time":
        times = interleaved_times({n: step(n) for n in names}, repeats=args.repeats, warmup=1,
                                  device=torch.device("cpu"))
        out["ms"] = {n: sorted(1e3 * t for t in ts) for n, ts in times.items()}
    else:
        out["peak_bytes"] = step_peak_memory(step(names[0]), torch.device("cpu"))["peak_bytes"]
    return out


def _run_child(config: Dict[str, str], args: argparse.Namespace, mode: str, steps: str,
               threshold: bool = True) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_bf16_paths", "--child", mode, "--steps", steps,
           "--batch", str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    r = subprocess.run(cmd, cwd=ROOT, env=_child_env(config, threshold, args.threads), capture_output=True,
                       text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark child failed ({steps}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _median(v: List[float]) -> float:
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    from benchmarks.harness import cpu_model

    record: Dict[str, Any] = {"cpu_model": cpu_model(), "threads": args.threads, "batch": args.batch,
                              "torch": torch.__version__, "configs": {}}
    for name, config in CONFIGS.items():
        load_before = os.getloadavg()
        timed = _run_child(config, args, "time", ",".join(STEPS))
        entry: Dict[str, Any] = {"env": config, "ms": timed["ms"], "cpu_engine": timed["cpu_engine"],
                                 "load_avg": {"before": list(load_before), "after": list(os.getloadavg())},
                                 "peak_mb": {}, "peak_mb_default_allocator": {}}
        for step in STEPS:
            for threshold, key in ((True, "peak_mb"), (False, "peak_mb_default_allocator")):
                entry[key][step] = _run_child(config, args, "memory", step, threshold)["peak_bytes"] / 2**20
        record["configs"][name] = entry
        print(render_config(name, entry), flush=True)
    return record


def render_config(name: str, e: Dict[str, Any]) -> str:
    ms = {s: (min(v), _median(v)) for s, v in e["ms"].items()}
    rows = [f"### {name}", ""]
    if "load_avg" in e:  # the machine's 1/5/15-minute load averages around the timing (2 threads want 2 idle cores)
        rows += ["Load average before / after the timing: " + " / ".join(
            ", ".join(f"{v:.2f}" for v in e["load_avg"][k]) for k in ("before", "after")), ""]
    rows += ["| step | ms median (min) | peak MiB (default allocator) |", "|---|---|---|"]
    for s in STEPS:
        rows.append(f"| {s} | {ms[s][1]:.0f} ({ms[s][0]:.0f}) | {e['peak_mb'][s]:.0f} "
                    f"({e['peak_mb_default_allocator'][s]:.0f}) |")
    ours_bf16, ours_fp32 = ms["densenet_fast bf16"], ms["densenet_fast fp32"]
    tv_bf16 = ms["torchvision bf16"]
    peak = {k: e[k]["torchvision bf16"] / e[k]["densenet_fast bf16"] for k in ("peak_mb", "peak_mb_default_allocator")}
    conv = e["cpu_engine"]["bf16_conv"]["2d"]
    rows += ["", f"* our bf16 step / our fp32 step: {ours_bf16[1] / ours_fp32[1]:.2f}x by medians, "
                 f"{ours_bf16[0] / ours_fp32[0]:.2f}x by minima (target <= 1.0)",
             f"* our bf16 step / torchvision's bf16 step: {ours_bf16[1] / tv_bf16[1]:.2f}x by medians, "
             f"{ours_bf16[0] / tv_bf16[0]:.2f}x by minima (target <= 0.5)",
             f"* our bf16 peak / torchvision's bf16 peak: 1/{peak['peak_mb']:.1f} (default allocator "
             f"1/{peak['peak_mb_default_allocator']:.1f}; target <= 1/6)",
             f"* bf16 3x3 passes: 2-D {conv['forward']}/{conv['input_grad']}/{conv['weight_grad']}"
             f" (forward/input grad/weight grad); bf16 rows {e['cpu_engine']['bf16_rows']}, "
             f"AMX kernel {e['cpu_engine']['amx_kernel']}", ""]
    return "\n".join(rows)


def render(record: Dict[str, Any]) -> str:
    head = [f"# bf16 autocast on every CPU: densenet121 training step, batch {record['batch']}, 224x224",
            "", f"{record['cpu_model']}, {record['threads']} threads, torch {record['torch']}. Steps timed "
            "interleaved in one process per configuration; peaks in a fresh process per step (glibc mmap threshold "
            "fixed at 128 KiB; the default allocator's figure in parentheses). Generated by "
            "`python -m benchmarks.bench_bf16_paths`.", ""]
    if "load_avg" in record:  # a run's load averages at its start and end (records before per-config ones)
        head += ["Load average at the start / end of the run: " + " / ".join(
            ", ".join(f"{v:.2f}" for v in record["load_avg"][k]) for k in ("start", "end")), ""]
    return "\n".join(head + [render_config(n, e) for n, e in record["configs"].items()])


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "bf16-paths" / "cpu"), help="path stem of the .json and .md written")
    p.add_argument("--child", choices=["time", "memory"], dest="mode", help=argparse.SUPPRESS)
    p.add_argument("--steps", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.mode:
        print(json.dumps(_worker(args)))
        return 0
    record = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(record, indent=1) + "\n")
    Path(args.out + ".md").write_text(render(record) + "\n")
    print(f"wrote {args.out}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
