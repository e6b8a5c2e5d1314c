"""Our float32 3x3 kernel against oneDNN, and the fp32 step's roofline (issue 32); our bfloat16 AMX 3x3 passes.

Three measurements in one process (2 threads by default), float32 on the CPU, and a fourth in bfloat16 on AMX CPUs:

1. the machine's FMA peak: a bare AVX-512 FMA loop on all threads (``torch.ops.densenet_fast.fma_peak_gflops``);
2. per dense-layer 3x3 shape (densenet121's four blocks at batch 8, densenet161's block 3, MONAI's 3-D block 1),
   each pass (forward, input gradient, weight gradient) on our kernel and on oneDNN, alternating rounds, the best
   of each (``own_conv3x3_times``): ms, GFLOP/s and the share of the peak;
3. densenet121's training step (224², batch 8): densenet_fast with the 3x3 engine chosen per shape (the default),
   with oneDNN forced (``DNF_CPU_CONV3X3=onednn``, the previous state) and torchvision, interleaved (minimum and
   median); the step's FLOPs (torch's FLOP counter on torchvision's step) over its time against the peak; and the
   profiled self time of each stage of the two densenet_fast steps with the FLOP rate of the GEMM stages;
4. on AMX CPUs, bfloat16: per shape whose channels are multiples of 32, the forward and the input gradient on our
   AMX kernel and on oneDNN (``own_conv3x3_bf16_times``: ours on a frame laid out beforehand, as the block's BN2 +
   ReLU writes it; the input gradient's frame fill and both weight packings timed), alternating rounds, the best of
   each;
   and densenet121's step under CPU bfloat16 autocast with the default engines, with ``DNF_CPU_CONV3X3=onednn`` and
   torchvision, interleaved.

    python -m benchmarks.bench_conv3x3              # writes benchmarks/results/conv3x3/cpu.{json,md}
    python -m benchmarks.bench_conv3x3 --repeats 3 --out /tmp/c3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

# name -> (batch, input channels (the bottleneck), output channels (growth), spatial size)
SHAPES = {
    "densenet121 block 1": (8, 128, 32, (56, 56)),
    "densenet121 block 2": (8, 128, 32, (28, 28)),
    "densenet121 block 3": (8, 128, 32, (14, 14)),
    "densenet121 block 4": (8, 128, 32, (7, 7)),
    "densenet161 block 3": (8, 192, 48, (14, 14)),
    "MONAI DenseNet121 3-D block 1 (96³ input)": (2, 128, 32, (24, 24, 24)),
}
PASSES = ("forward", "input_grad", "weight_grad")

# The profiled stages of a step: name -> profiler ranges / ops whose self times add up to it.
STAGES = {
    "1x1 forward + recompute": ["dnf_cpu::bn1_relu_gemm"],
    "1x1 backward (BN1 backward, both products)": ["dnf_cpu::gemm1x1_bn1_backward"],
    "3x3, our kernel (3 passes)": ["dnf_cpu::conv3x3", "dnf_cpu::conv3x3_input_grad",
                                   "dnf_cpu::conv3x3_weight_grad"],
    "3x3 + conv0 on oneDNN, with copies": ["aten::mkldnn_convolution", "aten::convolution_backward",
                                           "aten::_convolution", "aten::copy_"],
    "statistics": ["dnf_cpu::moments", "densenet_fast::channel_moments"],
    "BN2 and finalize element passes": ["dnf_cpu::bn2_relu", "dnf_cpu::bn2_backward", "dnf_cpu::finalize"],
    "transitions, stem, final norm": ["densenet_fast::transition_forward", "densenet_fast::transition_backward",
                                      "densenet_fast::bn_relu_maxpool", "densenet_fast::bn_relu_maxpool_backward",
                                      "densenet_fast::norm_relu_pool_forward",
                                      "densenet_fast::norm_relu_pool_backward"],
}


def _conv_flops(n: int, cin: int, cout: int, spatial) -> float:
    taps = 3 ** len(spatial)
    pixels = 1
    for s in spatial:
        pixels *= s
    return 2.0 * n * pixels * cin * cout * taps


def densenet121_gemm_flops(batch: int, size: int = 224) -> Dict[str, float]:
    """FLOPs per training step of densenet121's dense layers: the 1x1 forward (run twice: forward and the
    backward's recompute), its backward (two products), and the 3x3's three passes."""
    one = three = 0.0
    side, c0 = size // 4, 64
    for layers in (6, 12, 24, 16):
        rows = batch * side * side
        for i in range(layers):
            one += 2.0 * rows * (c0 + 32 * i) * 128
            three += 2.0 * rows * 128 * 32 * 9
        c0 = (c0 + 32 * layers) // 2
        side //= 2
    return {"1x1 forward + recompute": 2 * one, "1x1 backward (BN1 backward, both products)": 2 * one,
            "3x3 (3 passes)": 3 * three}


def measure_peak(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    return max(torch.ops.densenet_fast.fma_peak_gflops(20_000_000) for _ in range(5))


def measure_shapes(repeats: int, peak: float) -> List[Dict[str, Any]]:
    import torch

    rows = []
    for name, (n, cin, cout, sp) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, cin, *sp, generator=g).relu()
        w = torch.randn(cout, cin, *([3] * len(sp)), generator=g) * 0.05
        d = torch.randn(n, cout, *sp, generator=g)
        secs = torch.ops.densenet_fast.own_conv3x3_times(x, d, w, repeats)
        flops = _conv_flops(n, cin, cout, sp)
        row: Dict[str, Any] = {"shape": name, "batch": n, "cin": cin, "cout": cout, "spatial": list(sp),
                               "gflop": flops / 1e9}
        for i, p in enumerate(PASSES):
            onednn, own = secs[2 * i], secs[2 * i + 1]
            row[p] = {"onednn_ms": onednn * 1e3, "own_ms": own * 1e3, "own_gflops": flops / own / 1e9,
                      "onednn_gflops": flops / onednn / 1e9, "own_peak_share": flops / own / 1e9 / peak}
        rows.append(row)
    return rows


def measure_bf16(batch: int, repeats: int) -> Dict[str, Any]:
    """Our AMX 3x3 passes against oneDNN's in bfloat16, and densenet121's autocast step (see the module docstring)."""
    import torch
    import torchvision

    import densenet_fast as dnf
    from benchmarks.measure import make_inputs, train_step
    from benchmarks.timing import interleaved_times

    rows = []
    for name, (n, cin, cout, sp) in SHAPES.items():
        if cin % 32 or cout % 32:
            continue
        g = torch.Generator().manual_seed(0)
        fmt = torch.channels_last if len(sp) == 2 else torch.channels_last_3d
        x = torch.randn(n, cin, *sp, generator=g).relu().bfloat16().contiguous(memory_format=fmt)
        w = torch.randn(cout, cin, *([3] * len(sp)), generator=g) * 0.05
        d = torch.randn(n, cout, *sp, generator=g).bfloat16().contiguous(memory_format=fmt)
        secs = torch.ops.densenet_fast.own_conv3x3_bf16_times(x, d, w, repeats)
        fwd, ig = {"onednn": secs[0], "own": secs[1]}, {"onednn": secs[2], "own": secs[3]}
        flops = _conv_flops(n, cin, cout, sp)
        rows.append({"shape": name, "batch": n, "cin": cin, "cout": cout, "spatial": list(sp), "gflop": flops / 1e9,
                     **{p: {"onednn_ms": t["onednn"] * 1e3, "own_ms": t["own"] * 1e3,
                            "own_gflops": flops / t["own"] / 1e9} for p, t in (("forward", fwd), ("input_grad", ig))}})
    torch.manual_seed(0)
    x, y = make_inputs(batch, 224, 1000, torch.device("cpu"))
    ours, tv = dnf.densenet121(), torchvision.models.densenet121()
    tv.load_state_dict(ours.state_dict())

    def ours_with(engine: str):
        def run():
            if engine:
                os.environ["DNF_CPU_CONV3X3"] = engine
            try:
                train_step(ours, x, y, torch.bfloat16)
            finally:
                os.environ.pop("DNF_CPU_CONV3X3", None)
        return run

    fns = {"densenet_fast bf16": ours_with(""), "densenet_fast bf16, 3x3 on oneDNN": ours_with("onednn"),
           "torchvision bf16": lambda: train_step(tv, x, y, torch.bfloat16)}
    load_before = os.getloadavg()
    times = interleaved_times(fns, repeats=repeats, warmup=1, device=torch.device("cpu"))
    steps = {}
    for name, ts in times.items():
        ms = sorted(1e3 * t for t in ts)
        steps[name] = {"ms": ms, "min_ms": ms[0], "median_ms": statistics.median(ms)}
    return {"shapes": rows, "step": {"batch": batch, "steps": steps, "load_avg": {
        "before": list(load_before), "after": list(os.getloadavg())}},
        "engines": dnf.build_info()["cpu_engine"]["conv3x3"]["bfloat16"]}


def measure_step(batch: int, repeats: int, peak: float) -> Dict[str, Any]:
    import torch
    import torchvision
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    import densenet_fast as dnf
    from benchmarks.measure import make_inputs, train_step
    from benchmarks.timing import interleaved_times

    torch.manual_seed(0)
    x, y = make_inputs(batch, 224, 1000, torch.device("cpu"))
    ours, tv = dnf.densenet121(), torchvision.models.densenet121()
    tv.load_state_dict(ours.state_dict())
    with FlopCounterMode(display=False) as counter:
        train_step(tv, x, y)
    step_flops = float(counter.get_total_flops())

    def ours_with(engine: str):
        def run():
            if engine:
                os.environ["DNF_CPU_CONV3X3"] = engine
            try:
                train_step(ours, x, y)
            finally:
                os.environ.pop("DNF_CPU_CONV3X3", None)
        return run

    fns = {"densenet_fast": ours_with(""), "densenet_fast, 3x3 on oneDNN": ours_with("onednn"),
           "torchvision": lambda: train_step(tv, x, y)}
    load_before = os.getloadavg()
    times = interleaved_times(fns, repeats=repeats, warmup=1, device=torch.device("cpu"))
    out: Dict[str, Any] = {"batch": batch, "step_gflop": step_flops / 1e9, "steps": {},
                           "load_avg": {"before": list(load_before), "after": list(os.getloadavg())}}
    for name, ts in times.items():
        ms = sorted(1e3 * t for t in ts)
        out["steps"][name] = {"ms": ms, "min_ms": ms[0], "median_ms": statistics.median(ms),
                              "peak_share_at_min": step_flops / (ms[0] / 1e3) / 1e9 / peak}
    gemm_flops = densenet121_gemm_flops(batch)
    out["stages"] = {}
    for name, engine in (("densenet_fast", ""), ("densenet_fast, 3x3 on oneDNN", "onednn")):
        runs: List[Dict[str, float]] = []
        for _ in range(3):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fns[name]()
            self_ms = {e.key: e.self_cpu_time_total / 1e3 for e in prof.key_averages()}
            stage = {s: sum(self_ms.get(k, 0.0) for k in keys) for s, keys in STAGES.items()}
            stage["copy_ calls"] = sum(e.count for e in prof.key_averages() if e.key == "aten::copy_")
            stage["profiled total"] = sum(self_ms.values())
            runs.append(stage)
        best = {s: min(r[s] for r in runs) for s in runs[0]}
        rates = {}
        for s, f in gemm_flops.items():
            ms = best.get(s)
            if s == "3x3 (3 passes)":
                ms = best["3x3, our kernel (3 passes)"] + best["3x3 + conv0 on oneDNN, with copies"]
            rates[s] = {"gflop": f / 1e9, "ms": ms, "gflops": f / (ms / 1e3) / 1e9 if ms else None,
                        "peak_share": f / (ms / 1e3) / 1e9 / peak if ms else None}
        out["stages"][name] = {"self_ms": best, "gemm_rates": rates}
    out["conv3x3_choice"] = dnf.build_info()["cpu_engine"]["conv3x3"]
    return out


def markdown(data: Dict[str, Any]) -> str:
    lines = [f"{data['cpu_model']}, {data['threads']} threads, torch {data['torch']}; FMA peak (bare AVX-512 FMA "
             f"loop, all threads): **{data['peak_gflops']:.0f} GFLOP/s**.", "",
             "| 3x3 shape (float32) | GFLOP | pass | oneDNN, ms | ours, ms | ours / oneDNN | ours, GFLOP/s "
             "(share of peak) |", "|---|---|---|---|---|---|---|"]
    for r in data["shapes"]:
        for i, p in enumerate(PASSES):
            c = r[p]
            head = f"{r['shape']} [{r['batch']}, {r['cin']}→{r['cout']}, {'x'.join(map(str, r['spatial']))}]"
            lines.append(f"| {head if i == 0 else ''} | {r['gflop']:.2f} | {p} | {c['onednn_ms']:.2f} | "
                         f"{c['own_ms']:.2f} | {c['own_ms'] / c['onednn_ms']:.2f}x | {c['own_gflops']:.0f} "
                         f"({100 * c['own_peak_share']:.0f}%) |")
    st = data["step"]
    tv = st["steps"]["torchvision"]
    lines += ["", f"densenet121 224², batch {st['batch']}, training step ({st['step_gflop']:.0f} GFLOP by torch's "
              f"FLOP counter), {len(tv['ms'])} interleaved rounds; load average before/after "
              f"{st['load_avg']['before'][0]:.1f}/{st['load_avg']['after'][0]:.1f}:", "",
              "| step | median (min), ms | vs torchvision (medians) | FLOP rate at the minimum, share of peak |",
              "|---|---|---|---|"]
    for name, s in st["steps"].items():
        lines.append(f"| {name} | {s['median_ms']:.0f} ({s['min_ms']:.0f}) | "
                     f"{s['median_ms'] / tv['median_ms']:.2f}x | {100 * s['peak_share_at_min']:.0f}% |")
    names = list(st["stages"])
    lines += ["", "Profiled self time per stage (best of 3 profiled steps, ms; the GEMM stages' FLOP rate as a share "
              "of the peak):", "", "| stage | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for stage in list(STAGES) + ["copy_ calls", "profiled total"]:
        cells = []
        for n in names:
            v = st["stages"][n]["self_ms"][stage]
            cells.append(f"{v:.0f}" if stage != "copy_ calls" else f"{v:.0f} calls")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    for g in st["stages"][names[0]]["gemm_rates"]:
        cells = []
        for n in names:
            r = st["stages"][n]["gemm_rates"][g]
            cells.append(f"{r['gflops']:.0f} GFLOP/s ({100 * r['peak_share']:.0f}%)")
        lines.append(f"| rate: {g}, {st['stages'][names[0]]['gemm_rates'][g]['gflop']:.1f} GFLOP | "
                     + " | ".join(cells) + " |")
    if data.get("bf16"):
        b = data["bf16"]
        lines += ["", "bfloat16 on AMX: our kernel against oneDNN (the best of alternating rounds; ours on a frame "
                  "laid out beforehand, as the block's BN2 + ReLU writes it):", "",
                  "| 3x3 shape (bfloat16) | GFLOP | pass | oneDNN, ms | ours, ms | ours / oneDNN | ours, GFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        for r in b["shapes"]:
            for i, p in enumerate(("forward", "input_grad")):
                c = r[p]
                head = f"{r['shape']} [{r['batch']}, {r['cin']}→{r['cout']}, {'x'.join(map(str, r['spatial']))}]"
                lines.append(f"| {head if i == 0 else ''} | {r['gflop']:.2f} | {p} | {c['onednn_ms']:.2f} | "
                             f"{c['own_ms']:.2f} | {c['own_ms'] / c['onednn_ms']:.2f}x | {c['own_gflops']:.0f} |")
        bs = b["step"]
        tvb = bs["steps"]["torchvision bf16"]
        lines += ["", f"densenet121 224², batch {bs['batch']}, training step under CPU bfloat16 autocast, "
                  f"{len(tvb['ms'])} interleaved rounds; load average before/after "
                  f"{bs['load_avg']['before'][0]:.1f}/{bs['load_avg']['after'][0]:.1f}:", "",
                  "| step | median (min), ms | vs torchvision (medians) |", "|---|---|---|"]
        for name, sb in bs["steps"].items():
            lines.append(f"| {name} | {sb['median_ms']:.0f} ({sb['min_ms']:.0f}) | "
                         f"{sb['median_ms'] / tvb['median_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="interleaved step rounds (and kernel rounds)")
    ap.add_argument("--out", type=Path, default=RESULTS / "conv3x3")
    a = ap.parse_args(argv)
    os.environ.pop("DNF_CPU_CONV3X3", None)
    import torch

    import densenet_fast  # noqa: F401 - loads the operators
    from benchmarks.harness import cpu_model

    torch.set_num_threads(a.threads)
    peak = measure_peak(a.threads)
    data: Dict[str, Any] = {"cpu_model": cpu_model(), "threads": a.threads, "torch": torch.__version__,
                            "peak_gflops": peak, "command": "python -m benchmarks.bench_conv3x3"}
    data["shapes"] = measure_shapes(a.repeats, peak)
    data["step"] = measure_step(a.batch, a.repeats, peak)
    if densenet_fast.build_info()["cpu_engine"]["amx_kernel"]:
        data["bf16"] = measure_bf16(a.batch, a.repeats)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "cpu.json").write_text(json.dumps(data, indent=1) + "\n")
    (a.out / "cpu.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
