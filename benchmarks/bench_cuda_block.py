"""DenseNet-121 training step on CUDA: densenet_fast's fused kernels vs torchvision.

Setup: 224x224 inputs, channels_last, ``torch.autocast("cuda", dtype=torch.bfloat16)``, SGD with
momentum. Variants (all share the same initial weights):

* ``ours``                  dnf.densenet121 (fused dense blocks/transitions/final norm), simple 1x1 path
* ``ours_fused_gemm``       the same with DNF_CUDA_BN_GEMM=fused (BN1+ReLU fused into the 1x1 GEMM)
* ``torchvision``           torchvision.models.densenet121()            (memory_efficient=False, default)
* ``torchvision_memeff``    torchvision.models.densenet121(memory_efficient=True)  (checkpointing)
* ``torchvision_compile``   torch.compile(torchvision.models.densenet121())

For each variant: the largest batch that fits (doubling from 64, then bisection), the peak memory
``torch.cuda.max_memory_allocated`` of one step, and the median step time over interleaved repeats
(every repeat runs each variant once, in turn, so clock and thermal drift hit all alike), at batch 64
and at the variant's largest batch. Then the achieved memory bandwidth of the bottleneck kernels of
the 1x1 stage (BN1+ReLU apply and the GEMM, or the fused GEMM) over dense block 3 of the model,
from the profiler's kernel times and the bytes those kernels must move, against the device's peak.

Writes benchmarks/results/bench_cuda_block_<device>_<time>.json (device, versions, settings, results).

Usage::

    python -m benchmarks.bench_cuda_block [--batch 64] [--repeats 20] [--no-max-batch] [--variants ours,torchvision]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running from a source checkout
    sys.path.insert(0, str(ROOT))

import densenet_fast as dnf  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
FUSED_ENV = "DNF_CUDA_BN_GEMM"
VARIANTS = ("ours", "ours_fused_gemm", "torchvision", "torchvision_memeff", "torchvision_compile")

# Peak DRAM bandwidth (GB/s) by device name, used when the driver does not report clock and bus width.
PEAK_BW_GBS = {"H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0, "H200": 4800.0,
               "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0, "A100-PCIE-40GB": 1555.0,
               "A100 80GB PCIe": 1935.0, "A100": 1555.0, "L40S": 864.0, "A10": 600.0, "RTX 4090": 1008.0}


def peak_bandwidth_gbs(device: torch.device) -> Optional[float]:
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    for key, value in PEAK_BW_GBS.items():
        if key in props.name:
            return value
    return None


@contextlib.contextmanager
def env(name: str, value: Optional[str]):
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


class Variant:
    def __init__(self, name: str, model: nn.Module, env_value: Optional[str] = None):
        self.name, self.model, self.env_value = name, model, env_value
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(self, x: torch.Tensor, target: torch.Tensor) -> None:
        with env(FUSED_ENV, self.env_value):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(self.model(x), target)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def build_variants(names: List[str], device: torch.device) -> List[Variant]:
    import torchvision

    torch.manual_seed(0)
    base = torchvision.models.densenet121()
    out = []
    for name in names:
        if name.startswith("ours"):
            m = dnf.densenet121()
            m.load_state_dict(base.state_dict())
            env_value = "fused" if name == "ours_fused_gemm" else "simple"
        else:
            m = torchvision.models.densenet121(memory_efficient=(name == "torchvision_memeff"))
            m.load_state_dict(base.state_dict())
            env_value = None
        m = m.to(device).to(memory_format=torch.channels_last).train()
        if name == "torchvision_compile":
            m = torch.compile(m)
        out.append(Variant(name, m, env_value))
    return out


def batch(n: int, device: torch.device):
    x = torch.randn(n, 3, 224, 224, device=device).to(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (n,), device=device)


def fits(v: Variant, n: int, device: torch.device) -> bool:
    try:
        x, t = batch(n, device)
        for _ in range(2):
            v.step(x, t)
        torch.cuda.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        v.opt.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()


def max_batch(v: Variant, device: torch.device, start: int, limit: int) -> int:
    lo, hi = 0, start
    while hi <= limit and fits(v, hi, device):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > max(1, lo // 32):  # bisect to ~3%
        mid = (lo + hi) // 2
        if fits(v, mid, device):
            lo = mid
        else:
            hi = mid
    return lo


def peak_memory(v: Variant, n: int, device: torch.device) -> Dict[str, float]:
    x, t = batch(n, device)
    v.step(x, t)  # warm (allocator, compile)
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    v.step(x, t)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return {"peak_allocated_mib": peak / 2**20, "peak_above_resident_mib": (peak - before) / 2**20}


def interleaved_times(variants: List[Variant], n_of: Callable[[Variant], int], device: torch.device, warmup: int,
                      repeats: int) -> Dict[str, List[float]]:
    data = {v.name: batch(n_of(v), device) for v in variants}
    for v in variants:
        for _ in range(warmup):
            v.step(*data[v.name])
    times: Dict[str, List[float]] = {v.name: [] for v in variants}
    for _ in range(repeats):
        for v in variants:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            v.step(*data[v.name])
            end.record()
            end.synchronize()
            times[v.name].append(start.elapsed_time(end))
    return times


def block3_bandwidth(device: torch.device, n: int, peak_gbs: Optional[float]) -> List[dict]:
    """Achieved bandwidth of the 1x1-stage kernels over one forward of densenet121's block 3."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    L, C0, k, bs, H = 24, 256, 32, 4, 14
    from densenet_fast.ops.dense_block import fused_dense_block

    params = dnf.DenseBlock(L, C0, bs, k).to(device).block_params()
    x = torch.randn(n, C0, H, H, device=device, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    M, inter, es = n * H * H, bs * k, 2
    widths = [C0 + l * k for l in range(L)]
    bytes_apply = sum(2 * M * c + 2 * M * inter for c in widths) * es  # BN1 apply (r X, w U) + BN2 apply (r/w Y)
    bytes_gemm = sum(M * c + M * inter + inter * c for c in widths) * es  # r U (or X), r W1, w Y
    rows = []
    for path in ("simple", "fused"):
        with env(FUSED_ENV, path), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            for _ in range(3):  # the op itself (its AutocastCUDA kernel casts the conv weights)
                fused_dense_block(x, params, training=True)
            torch.cuda.synchronize(device)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fused_dense_block(x, params, training=True)
                torch.cuda.synchronize(device)
        kernels: Dict[str, float] = {}
        for evt in prof.key_averages():
            if evt.device_type.name != "CUDA" and "cuda" not in str(evt.device_type).lower():
                continue
            us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0.0)
            kernels[evt.key] = kernels.get(evt.key, 0.0) + us
        apply_us = sum(t for key, t in kernels.items() if "BnReluApply" in key)
        fused_us = sum(t for key, t in kernels.items() if "bn_relu_gemm_kernel" in key)
        gemm_us = sum(t for key, t in kernels.items()
                      if re.search(r"gemm|cutlass|xmma|sm\d+_", key, re.I) and "bn_relu_gemm" not in key)
        if path == "simple":
            stages = [("bn_relu_apply (BN1 into scratch + BN2, simple path)", apply_us, bytes_apply),
                      ("cuBLAS 1x1 GEMMs (simple path)", gemm_us, bytes_gemm),
                      ("1x1 stage total (simple path)", apply_us + gemm_us, bytes_gemm)]
        else:
            stages = [("bn_relu_gemm_kernel (fused path)", fused_us, bytes_gemm),
                      ("1x1 stage total (fused path, + BN2 apply)", fused_us + apply_us, bytes_gemm)]
        for name, us, nbytes in stages:
            gbs = nbytes / (us * 1e-6) / 1e9 if us > 0 else None
            rows.append({"kernel": name, "time_ms": us / 1e3, "bytes_model_mib": nbytes / 2**20, "achieved_gbs": gbs,
                         "fraction_of_peak": (gbs / peak_gbs) if (gbs and peak_gbs) else None})
        rows.append({"kernel": f"top kernels ({path})",
                     "top": sorted(((k_, t / 1e3) for k_, t in kernels.items()), key=lambda kv: -kv[1])[:8]})
    return rows


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--max-batch-limit", type=int, default=2048)
    ap.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda_block: needs a CUDA GPU")
    info = dnf.build_info()
    if not info["cuda_kernels_registered"]:
        raise SystemExit("bench_cuda_block: densenet_fast was built without CUDA kernels")
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    names = [n for n in args.variants.split(",") if n]
    variants = build_variants(names, device)
    peak_gbs = peak_bandwidth_gbs(device)
    props = torch.cuda.get_device_properties(device)
    import torchvision

    result: dict = {
        "benchmark": "bench_cuda_block",
        "when": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": {"name": props.name, "capability": f"{props.major}.{props.minor}",
                   "total_memory_mib": props.total_memory / 2**20, "sm_count": props.multi_processor_count,
                   "peak_bandwidth_gbs": peak_gbs},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                     "torchvision": torchvision.__version__, "densenet_fast": info["version"],
                     "python": platform.python_version()},
        "build_info": info,
        "settings": {"model": "densenet121", "image": 224, "autocast": "bfloat16", "memory_format": "channels_last",
                     "optimizer": "SGD(momentum=0.9)", "repeats": args.repeats, "warmup": args.warmup},
        "variants": {},
    }
    failed = []
    for v in variants:
        entry: dict = {}
        try:
            entry["batch64"] = {"batch": args.batch, **peak_memory(v, args.batch, device)}
            if not args.no_max_batch:
                entry["max_batch"] = max_batch(v, device, args.batch, args.max_batch_limit)
                entry["at_max_batch"] = {"batch": entry["max_batch"], **peak_memory(v, entry["max_batch"], device)}
        except Exception as err:  # report and go on with the other variants
            entry["error"] = f"{type(err).__name__}: {err}"
            failed.append(v)
        result["variants"][v.name] = entry
        gc.collect()
        torch.cuda.empty_cache()
    ok = [v for v in variants if v not in failed]
    for label, n_of in (("batch64", lambda v: args.batch),
                        ("at_max_batch", lambda v: result["variants"][v.name].get("max_batch", args.batch))):
        if label == "at_max_batch" and args.no_max_batch:
            continue
        times = interleaved_times(ok, n_of, device, args.warmup, args.repeats)
        for v in ok:
            med = statistics.median(times[v.name])
            result["variants"][v.name].setdefault(label, {}).update(
                {"step_ms_median": med, "step_ms_all": times[v.name], "images_per_s": n_of(v) / med * 1e3})
        gc.collect()
        torch.cuda.empty_cache()
    if any(v.name.startswith("ours") for v in ok):
        result["bottleneck_bandwidth_block3"] = block3_bandwidth(device, args.batch, peak_gbs)

    args.out.mkdir(parents=True, exist_ok=True)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", props.name).strip("_")
    path = args.out / f"bench_cuda_block_{tag}_{_dt.datetime.now().strftime('%Y%m%d_%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    for name, entry in result["variants"].items():
        b64 = entry.get("batch64", {})
        print(f"{name:22s} batch {args.batch}: {b64.get('step_ms_median', float('nan')):8.2f} ms  "
              f"peak {b64.get('peak_allocated_mib', float('nan')):8.0f} MiB  max batch {entry.get('max_batch', '-')}"
              + (f"  ERROR {entry['error']}" if "error" in entry else ""))
    for row in result.get("bottleneck_bandwidth_block3", []):
        if "achieved_gbs" in row and row["achieved_gbs"]:
            frac = row["fraction_of_peak"]
            print(f"{row['kernel']:55s} {row['time_ms']:7.3f} ms {row['achieved_gbs']:7.0f} GB/s"
                  + (f" ({100 * frac:.0f}% of peak)" if frac else ""))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
