"""``python -m benchmarks``: torchvision / timm / torch.compile / densenet_fast DenseNets side by side.

For each model and batch size: training-step peak memory and bytes saved for backward (each measured in
a fresh subprocess per implementation), training-step and eval time (interleaved repeats in this
process), images/s, ratios vs torchvision default on every row, optionally the largest batch under a
memory budget. Writes a terminal table and <out>/<name>.{json,csv,md} (+ PNG plots for --sweep-batch).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

PRESETS: Dict[str, Dict[str, Any]] = {
    # README command 1: finishes in under a minute on 2 idle CPU cores (no torch.compile: compiling
    # DenseNet-121 alone takes minutes there).
    "quick": dict(model="densenet121", batch=2, impls="tv,tv-memeff,dnf", repeats=3, warmup=1, compile=False,
                  name="quick"),
    # The README headline: DenseNet-121, 224x224, batch 8, fp32, CPU, every implementation.
    "readme-cpu": dict(model="densenet121", batch=8, size=224, impls="all", repeats=5, warmup=1, device="cpu",
                       dtype="float32", name="readme-cpu"),
}
DEFAULTS: Dict[str, Any] = dict(model="densenet121", batch=8, size=None, impls="all", repeats=5, warmup=1,
                                device="auto", dtype="float32", compile=True, name=None)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024 ** 2,
          "g": 1e9, "gb": 1e9, "gib": 1024 ** 3}


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '2.5GB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 4GiB, 512MiB or 2GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _int_list(text: str) -> List[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="named configuration; explicit flags override it")
    p.add_argument("--quick", action="store_true", help="same as --preset quick (< 1 min on 2 CPU cores)")
    p.add_argument("--model", help="comma-separated: densenet121, densenet169, densenet201, densenet161, "
                                   "densenet_bc100 (DenseNet-BC-100 k=12, 32x32), or 'all' (default densenet121)")
    p.add_argument("--batch", type=int, help="batch size (default 8)")
    p.add_argument("--sweep-batch", type=_int_list, metavar="B1,B2,...",
                   help="measure every batch size in the list and plot memory/time vs batch size")
    p.add_argument("--size", type=int, help="input height = width (default: 224, 32 for DenseNet-BC)")
    p.add_argument("--impls", help="'all' or comma-separated subset of: tv, tv-memeff, timm, timm-ckpt, "
                                   "tv-compile, dnf, dnf-ref, dnf-convert")
    p.add_argument("--repeats", type=int, help="timed repeats per implementation (default 5)")
    p.add_argument("--warmup", type=int, help="untimed warm-up calls per implementation (default 1, at least 1)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="autocast dtype (default float32)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="leave out torch.compile (slow to compile on CPU)")
    p.add_argument("--no-eval", action="store_true", help="skip the eval-mode (inference) timing")
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory / saved-bytes runs")
    p.add_argument("--no-timing", action="store_true", help="skip the step timing")
    p.add_argument("--budget", type=parse_size, metavar="SIZE",
                   help="also find the largest batch whose training-step peak fits SIZE (e.g. 4GiB; slow)")
    p.add_argument("--budget-max-batch", type=int, default=1024, help="upper limit of the budget search")
    p.add_argument("--jobs", type=int, help="subprocess measurements run at once (default: 2 on CPU, 1 on CUDA)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per subprocess")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the input batch")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="output folder (default benchmarks/results)")
    p.add_argument("--name", help="output file stem (default: the preset, else derived from the settings)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true", help="list models and implementations, then exit")
    return p


@dataclass
class Settings:
    models: List[str]
    batches: List[int]
    size: Optional[int]
    impls: List[str]
    repeats: int
    warmup: int
    device: str
    dtype: str
    threads: int
    compile: bool
    eval: bool
    memory: bool
    timing: bool
    budget_bytes: Optional[int]
    budget_max_batch: int
    jobs: int
    timeout: float
    seed: int
    name: str
    preset: Optional[str] = None
    skipped: Dict[str, str] = field(default_factory=dict)
    progress: bool = True


def resolve(args: argparse.Namespace) -> Settings:
    """Preset values fill what the command line leaves unset; DEFAULTS fill the rest."""
    import torch

    from benchmarks.impls import parse_impls
    from benchmarks.specs import MODELS, get_spec

    preset_name = "quick" if args.quick else args.preset
    preset = PRESETS.get(preset_name or "", {})

    def pick(key: str) -> Any:
        value = getattr(args, key, None)
        return value if value is not None else preset.get(key, DEFAULTS[key])

    model_text = pick("model")
    models = list(MODELS) if model_text == "all" else [get_spec(m).name for m in model_text.split(",") if m.strip()]
    device = pick("device")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    impls = parse_impls(pick("impls"))
    compile_ok = pick("compile")
    skipped = {}
    if not compile_ok and "tv-compile" in impls:
        impls.remove("tv-compile")
        skipped["tv-compile"] = "left out (--no-compile or preset)"
    batches = args.sweep_batch or [pick("batch")]
    name = pick("name") or f"{'-'.join(models)}_{device.split(':')[0]}_b{'-'.join(map(str, batches))}"
    return Settings(models=models, batches=batches, size=pick("size"), impls=impls,
                    repeats=max(1, pick("repeats")), warmup=max(1, pick("warmup")), device=device,
                    dtype=pick("dtype"), threads=torch.get_num_threads(), compile=bool(compile_ok),
                    eval=not args.no_eval, memory=not args.no_memory, timing=not args.no_timing,
                    budget_bytes=args.budget, budget_max_batch=args.budget_max_batch,
                    jobs=args.jobs or (2 if device == "cpu" else 1), timeout=args.timeout, seed=args.seed,
                    name=name, preset=preset_name, skipped=skipped, progress=not args.no_progress)


class Progress:
    """A tqdm bar on stderr (shown only once a run has lasted a few seconds), or nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, delay=3, file=sys.stderr, unit="step", dynamic_ncols=True)
            except ImportError:
                pass

    def desc(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text, refresh=True)

    def tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def add(self, n: int) -> None:
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _list() -> int:
    from benchmarks.impls import IMPLS
    from benchmarks.specs import MODELS

    print("models:")
    for spec in MODELS.values():
        print(f"  {spec.name:16s} k={spec.growth_rate} blocks={spec.block_config} input {spec.size}x{spec.size}")
    print("implementations:")
    for impl in IMPLS.values():
        reason = impl.unavailable()
        print(f"  {impl.name:12s} {impl.label}" + (f"  [unavailable: {reason}]" if reason else ""))
    return 0


def _row(s: Settings, model: str, size: int, batch: int, impl: str) -> Dict[str, Any]:
    from benchmarks.impls import IMPLS

    return {"model": model, "size": size, "batch": batch, "device": s.device, "dtype": s.dtype, "impl": impl,
            "label": IMPLS[impl].label, "status": "ok", "note": ""}


def _fail(row: Dict[str, Any], status: str, note: str) -> None:
    if row["status"] == "ok":
        row["status"], row["note"] = status, note


def _measure_memory(s: Settings, rows: Dict[str, Dict[str, Any]], weights: str, progress: Progress) -> None:
    """Peak memory + saved bytes, one fresh subprocess per implementation."""
    from benchmarks.runner import run_workers

    names = [n for n, r in rows.items() if r["status"] == "ok"]
    jobs = [dict(model=rows[n]["model"], impl=n, batch=rows[n]["batch"], size=rows[n]["size"], device=s.device,
                 dtype=s.dtype, threads=s.threads, weights=weights, tasks=["memory", "saved"], warmup=1, seed=s.seed)
            for n in names]
    for name, result in zip(names, run_workers(jobs, s.jobs, s.timeout, on_done=progress.tick)):
        if "error" in result:
            _fail(rows[name], "oom" if result.get("oom") else "error", f"memory run: {result['error']}")
        else:
            rows[name].update(result)


def _measure_time(s: Settings, rows: Dict[str, Dict[str, Any]], models: Dict[str, Any], state: Dict[str, Any],
                  progress: Progress) -> None:
    """Interleaved training-step and eval timing in this process, plus the eval-logits check."""
    import torch

    from benchmarks import measure
    from benchmarks.impls import BASELINE
    from benchmarks.specs import get_spec
    from benchmarks.timing import interleaved_times, summarize

    device, dtype = torch.device(s.device), getattr(torch, s.dtype)
    first = next(iter(rows.values()))
    spec = get_spec(first["model"])
    x, y = measure.make_inputs(first["batch"], first["size"], spec.num_classes, device, s.seed, spec.spatial_dims,
                               spec.in_channels)
    live = {n: m for n, m in models.items() if rows[n]["status"] == "ok"}

    def on_error(phase: str) -> Callable[[str, BaseException], None]:
        return lambda name, err: _fail(rows[name], "oom" if measure.is_oom(err) else "error",
                                       f"{phase}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")

    for name, model in live.items():  # every implementation starts from the same weights and statistics
        getattr(model, "_orig_mod", model).load_state_dict(state)
        model.train()
    fns = {n: (lambda m=m: measure.train_step(m, x, y, dtype)) for n, m in live.items()}
    times = interleaved_times(fns, s.repeats, s.warmup, device, progress.tick, on_error("train step"))
    for name, t in times.items():
        if t:
            rows[name].update({f"train_{k}": v for k, v in summarize(t, first["batch"]).items()})
    for model in live.values():
        model.zero_grad(set_to_none=True)
    if not s.eval:
        return
    live = {n: m for n, m in live.items() if rows[n]["status"] == "ok"}
    for model in live.values():  # reset the running statistics the timed steps changed, then compare logits
        getattr(model, "_orig_mod", model).load_state_dict(state)
        model.eval()
    ref_name = BASELINE if BASELINE in live else next(iter(live), None)
    logits = {}
    for name, model in live.items():
        try:
            logits[name] = measure.eval_step(model, x, dtype).float()
        except Exception as err:  # noqa: BLE001
            on_error("eval")(name, err)
    if ref_name in logits:
        for name, out in logits.items():
            rows[name]["max_abs_diff"] = (out - logits[ref_name]).abs().max().item()
            rows[name]["diff_vs"] = ref_name
    fns = {n: (lambda m=m: measure.eval_step(m, x, dtype)) for n, m in live.items() if n in logits}
    times = interleaved_times(fns, s.repeats, s.warmup, device, progress.tick, on_error("eval"))
    for name, t in times.items():
        if t:
            rows[name].update({f"eval_{k}": v for k, v in summarize(t, first["batch"]).items()})
    for model in live.values():
        model.train()


def _budget_search(s: Settings, model: str, size: int, rows: List[Dict[str, Any]], weights: str) -> None:
    """Largest batch whose training-step peak fits --budget, per implementation (subprocess probes)."""
    from benchmarks.runner import largest_batch, run_worker

    latest: Dict[str, Dict[str, Any]] = {}
    for r in rows:  # the largest measured batch of each implementation seeds the search
        if r["model"] == model and r["status"] == "ok" and (r["impl"] not in latest or r["batch"] > latest[r["impl"]]["batch"]):
            latest[r["impl"]] = r
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if not s.progress:
        tqdm = None
    for impl, ref in latest.items():
        per_image = (ref.get("peak_bytes") or 0) / ref["batch"]
        guess = int(s.budget_bytes / per_image) if per_image > 0 else ref["batch"]
        bar = tqdm(desc=f"budget {model} {impl}", unit="probe", file=sys.stderr, delay=3) if tqdm else None

        def peak_at(b: int, impl: str = impl) -> Optional[int]:
            result = run_worker(dict(model=model, impl=impl, batch=b, size=size, device=s.device, dtype=s.dtype,
                                     threads=s.threads, weights=weights, tasks=["memory"], warmup=1, seed=s.seed),
                                s.timeout)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(batch=b, peak_mib=None if "error" in result else result["peak_bytes"] // 2 ** 20)
            return None if "error" in result else result["peak_bytes"]

        best, probes = largest_batch(peak_at, s.budget_bytes, guess, s.budget_max_batch)
        if bar is not None:
            bar.close()
        for r in rows:
            if r["model"] == model and r["impl"] == impl:
                r["max_batch"], r["budget_probes"] = best, probes


def _run_model(s: Settings, model: str, rows: List[Dict[str, Any]], progress: Progress, tmp: str) -> None:
    import torch

    from benchmarks.impls import IMPLS, build_model, torchvision_model
    from benchmarks.specs import get_spec

    spec = get_spec(model)
    size = s.size or spec.size
    torch.manual_seed(s.seed)
    state = torchvision_model(spec).state_dict()  # the one set of weights every implementation loads
    weights = os.path.join(tmp, f"{model}.pt")
    torch.save(state, weights)
    available = {n: IMPLS[n].unavailable(spec) for n in s.impls}
    models: Dict[str, Any] = {}
    if s.timing:
        for name in s.impls:
            if available[name] is None:
                progress.desc(f"{model}: building {name}")
                try:
                    models[name] = build_model(IMPLS[name], spec, state, torch.device(s.device))
                except Exception as err:  # noqa: BLE001
                    available[name] = f"build failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    model_rows: List[Dict[str, Any]] = []
    for batch in s.batches:
        group = {n: _row(s, model, size, batch, n) for n in s.impls}
        for name, reason in available.items():
            if reason is not None:
                _fail(group[name], "skipped" if "build failed" not in reason else "error", reason)
        if s.memory:
            progress.desc(f"{model} b{batch}: memory (subprocesses)")
            _measure_memory(s, group, weights, progress)
        if s.timing:
            progress.desc(f"{model} b{batch}: timing")
            _measure_time(s, group, models, state, progress)
        model_rows.extend(group.values())
    for name, reason in s.skipped.items():
        for batch in s.batches:
            row = _row(s, model, size, batch, name)
            _fail(row, "skipped", reason)
            model_rows.append(row)
    if s.budget_bytes and s.memory:
        _budget_search(s, model, size, model_rows, weights)
    rows.extend(model_rows)


def run_cli(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        return _list()
    try:
        s = resolve(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import torch

    from benchmarks import plots, report

    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    from benchmarks.impls import IMPLS

    runnable = sum(IMPLS[n].unavailable() is None for n in s.impls)
    per_batch = runnable * ((s.warmup + s.repeats) * (s.timing + (s.timing and s.eval)) + s.memory)
    progress = Progress(s.progress, per_batch * len(s.batches) * len(s.models))
    start = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dnf-bench-") as tmp:
        try:
            for model in s.models:
                _run_model(s, model, rows, progress, tmp)
        finally:
            progress.close()
    report.add_ratios(rows)
    machine = report.machine_info(device)
    settings = asdict(s) | {"elapsed_s": round(time.perf_counter() - start, 1), "load_average_start": load_start}
    print(report.format_table(rows, s.budget_bytes))
    s_out = args.out
    s_out.mkdir(parents=True, exist_ok=True)
    paths = [s_out / f"{s.name}.json", s_out / f"{s.name}.csv", s_out / f"{s.name}.md"]
    report.write_json(paths[0], machine, settings, rows)
    report.write_csv(paths[1], rows)
    report.write_markdown(paths[2], machine, settings, rows)
    if len(s.batches) > 1:
        paths += plots.plot_sweep(rows, s_out, s.name)
    load = (f", load average {load_start[0]:.1f} at start, {machine['load_average'][0]:.1f} at end"
            if load_start and machine.get("load_average") else "")
    print(f"\n{machine.get('gpu') or machine['cpu_model']} ({machine['logical_cores']} cores{load}), "
          f"torch {machine['torch']}, {s.threads} threads; {settings['elapsed_s']:.0f} s")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
