"""``python -m benchmarks``: torchvision / timm / torch.compile / densenet_fast DenseNets side by side.

For each model and batch size: training-step peak memory and bytes saved for backward (each measured in
a fresh subprocess per implementation), training-step and eval time (interleaved repeats in this
process), images/s, ratios vs torchvision default on every row, optionally the largest batch under a
memory budget. Writes a terminal table and <out>/<name>.{json,csv,md,png}: every run draws its figure
(bars for one comparison, lines for a batch or depth sweep, the budget's largest batches).

--report regenerates every table and figure of the results folder from its JSON files, gathers them into
<out>/README.md and, for the default folder, rewrites the generated numbers of README.md and docs/*.md.
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
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from benchmarks import report

_BC_DEPTHS = (40, 100, 250)
PRESETS: Dict[str, Dict[str, Any]] = {
    # README command 1: densenet121 at batch 2, three implementations, three repeats (no torch.compile:
    # compiling DenseNet-121 alone takes minutes on a CPU).
    "quick": dict(model="densenet121", batch=2, impls="tv,tv-memeff,dnf", repeats=3, warmup=1, compile=False,
                  name="quick"),
    # The README table: DenseNet-121, 224x224, batch 8, CPU; fp32 rows for every family (eager and
    # torch.compile'd) and bf16-autocast rows for torchvision vs ours. Compiling takes minutes on a CPU.
    "readme-cpu": dict(model="densenet121", batch=8, size=224,
                       impls="tv,tv-memeff,timm,tv-compile,dnf,dnf-compile,dnf-convert", lowp_impls="tv,dnf",
                       dtype="float32,bfloat16", repeats=4, warmup=1, device="cpu", name="readme-cpu"),
    # Issue #12's other rows: densenet121 at batch 32 (fp32), and the deep models: densenet201 at batch 8 and
    # DenseNet-BC-250 (k=24, 32x32) at batch 64 (torchvision's default step would need >12 GiB there, so its
    # memory_efficient variant is the peer).
    "readme-cpu-b32": dict(model="densenet121", batch=32, size=224,
                           impls="tv,tv-memeff,timm,tv-compile,dnf,dnf-compile", dtype="float32", repeats=3,
                           warmup=1, device="cpu", name="readme-cpu-b32"),
    "deep-cpu": dict(model="densenet201", batch=8, size=224, impls="tv,tv-memeff,timm,dnf", dtype="float32",
                     repeats=3, warmup=1, compile=False, device="cpu", name="deep-cpu"),
    "bc250-cpu": dict(model="densenet_bc250_k24", batch=64, impls="tv-memeff,dnf", dtype="float32", repeats=2,
                      warmup=1, compile=False, eval=False, device="cpu", mem_cap="8GiB", name="bc250-cpu"),
    # Issue #19: SE-DenseNet-121 (SE on each block output) folded / not folded vs the plain fused model,
    # 224x224, batch 8, CPU fp32 (training step only); ratios vs dnf in the SE rows' "vs dnf" lines. One
    # thread: on a shared 2-core machine two OpenMP threads stall whenever one is descheduled, which swamps
    # the few-percent differences measured here.
    "se-cpu": dict(model="densenet121", batch=8, size=224, impls="dnf,dnf-se,dnf-se-unfolded", repeats=4,
                   warmup=1, compile=False, eval=False, threads=1, device="cpu", name="se-cpu"),
    # Headline figure 1: memory vs depth, DenseNet-BC k=12 and k=24, 32x32 (memory only). Batch 16,
    # one thread per run (memory does not depend on it; no OpenMP spinning on a busy machine) and a
    # 3 GiB cap per run fit a shared 2-core machine; memory is linear in the batch, so the slopes
    # are those of batch 64 (--batch 64 --mem-cap 16GiB on a larger machine). timm's
    # set_grad_checkpointing saves what memory_efficient saves: add timm-ckpt with --impls.
    "mem-depth": dict(model=",".join([f"densenet_bc{d}" for d in _BC_DEPTHS]
                                     + [f"densenet_bc{d}_k24" for d in _BC_DEPTHS]),
                      batch=16, impls="tv,tv-memeff,dnf", timing=False, eval=False, compile=False,
                      jobs=3, threads=1, mem_cap="3GiB", name="mem-depth"),
    # Headline figure 2: memory vs batch size, densenet121 224x224 (memory only), up to batch 32 (where
    # torchvision's step needs ~4.3 GiB; --sweep-batch 1,4,16,32,64 --mem-cap 16GiB on a larger machine).
    "mem-batch": dict(model="densenet121", sweep_batch="1,4,16,32", impls="tv,tv-memeff,dnf",
                      timing=False, eval=False, compile=False, jobs=1, threads=1, mem_cap="5GiB", name="mem-batch"),
    # Headline figure 3: largest batch under a 768 MiB step peak, and the step time at that batch.
    "budget": dict(model="densenet121", batch=4, impls="tv,tv-memeff,dnf", budget="768MiB", repeats=3, eval=False,
                   compile=False, jobs=1, name="budget"),
    # MONAI DenseNet121 3D (issue 14): batch 2 of 1x96^3 volumes, fp32, CPU; MONAI vs convert() vs our
    # densenet121_3d. Ratios vs MONAI. One job at a time (a MONAI step needs ~1 GiB and ~10-60 s).
    "monai3d-cpu": dict(model="monai_densenet121_3d", batch=2, size=96, impls="monai,monai-convert,dnf-3d",
                        repeats=3, eval=False, compile=False, jobs=1, device="cpu", name="monai3d-cpu"),
    # The same at 1x128^3 (MONAI's step needs ~2.3 GiB: fits a 24 GiB machine).
    "monai3d-128": dict(model="monai_densenet121_3d", batch=2, size=128, impls="monai,monai-convert,dnf-3d",
                        repeats=2, eval=False, compile=False, jobs=1, device="cpu", name="monai3d-cpu-128"),
    # Largest batch of 1x64^3 volumes whose training-step peak fits 512 MiB (memory only: each probe is a
    # fresh process); --budget-axis size searches the volume edge at a fixed batch instead.
    "monai3d-budget": dict(model="monai_densenet121_3d", batch=1, size=64, impls="monai,monai-convert",
                           budget="512MiB", timing=False, eval=False, compile=False, jobs=1, device="cpu",
                           name="monai3d-cpu-budget"),
    # MONAI's 2-D DenseNet121 (torchvision's architecture and weights, MONAI's modules) and its convert(),
    # next to torchvision and our model: 224x224, batch 8, fp32, CPU; ratios vs torchvision.
    "monai2d-cpu": dict(model="densenet121", batch=8, size=224, impls="tv,dnf,monai-2d,monai-2d-convert",
                        repeats=3, compile=False, jobs=1, device="cpu", name="monai2d-cpu"),
}
DEFAULTS: Dict[str, Any] = dict(model="densenet121", batch=8, sweep_batch=None, size=None, impls="all",
                                lowp_impls=None, repeats=5, warmup=1, device="auto", dtype="float32", compile=True,
                                threads=None,
                                timing=True, eval=True, memory=True, budget=None, budget_axis="batch", jobs=None,
                                mem_cap=None,
                                name=None)
DTYPES = ("float32", "bfloat16", "float16")
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


def _dtype_list(text: str) -> List[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names or any(n not in DTYPES for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {list(DTYPES)}, got {text!r}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="named configuration; explicit flags override it")
    p.add_argument("--quick", action="store_true",
                   help="same as --preset quick: densenet121 224x224 batch 2; torchvision, memory_efficient and "
                        "densenet_fast; 3 interleaved repeats")
    p.add_argument("--report", action="store_true",
                   help="regenerate every table and figure in --out from its JSON, gather them into "
                        "<out>/README.md and (default --out) rewrite the numbers of README.md and docs/, then exit")
    p.add_argument("--model", help="comma-separated: densenet121, densenet169, densenet201, densenet161, "
                                   "densenet_bc<depth>[_k<growth>] (DenseNet-BC, 32x32, e.g. densenet_bc100, "
                                   "densenet_bc250_k24), or 'all' (default densenet121)")
    p.add_argument("--batch", type=int, help="batch size (default 8)")
    p.add_argument("--sweep-batch", type=_int_list, metavar="B1,B2,...",
                   help="measure every batch size in the list and plot memory/time vs batch size")
    p.add_argument("--size", type=int, help="input height = width (default: 224, 32 for DenseNet-BC)")
    p.add_argument("--impls", help="'all' or a comma-separated subset of the implementations --list prints "
                                   "(tv, tv-memeff, timm, tv-compile, dnf, dnf-compile, dnf-convert, ...)")
    p.add_argument("--lowp-impls", help="implementations for the bfloat16/float16 rows (default: --impls)")
    p.add_argument("--repeats", type=int, help="timed repeats per implementation (default 5)")
    p.add_argument("--warmup", type=int, help="untimed warm-up calls per implementation (default 1, at least 1)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: cuda when available)")
    p.add_argument("--dtype", type=_dtype_list, metavar="D1,D2",
                   help=f"comma-separated autocast dtypes from {list(DTYPES)} (default float32)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's default)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="leave out the torch.compile'd implementations (slow to compile on CPU)")
    p.add_argument("--no-eval", dest="eval", action="store_false", default=None,
                   help="skip the eval-mode (inference) timing")
    p.add_argument("--no-memory", dest="memory", action="store_false", default=None,
                   help="skip the subprocess memory / saved-bytes runs")
    p.add_argument("--no-timing", dest="timing", action="store_false", default=None, help="skip the step timing")
    p.add_argument("--budget", type=parse_size, metavar="SIZE",
                   help="also find the largest batch whose training-step peak fits SIZE (e.g. 4GiB; slow) "
                        "and time a step at that batch")
    p.add_argument("--budget-max-batch", type=int, default=1024,
                   help="upper limit of the budget search (the batch, or the volume edge with --budget-axis size; "
                        "default %(default)s)")
    p.add_argument("--budget-axis", choices=["batch", "size"],
                   help="what --budget maximises: the batch (default) or, at the fixed --batch, the input size "
                        "(image side / volume edge)")
    p.add_argument("--mem-cap", type=parse_size, metavar="SIZE",
                   help="CPU: each measurement subprocess may allocate at most SIZE (RLIMIT_DATA); a run "
                        "over it is recorded as 'oom' (default: 3/4 of the available RAM / --jobs)")
    p.add_argument("--jobs", type=int, help="subprocess measurements run at once (default: 2 on CPU, 1 on CUDA)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per subprocess (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the input batch (default %(default)s)")
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
    lowp_impls: List[str]  # the implementations measured in the non-float32 dtypes
    repeats: int
    warmup: int
    device: str
    dtypes: List[str]
    threads: int
    compile: bool
    eval: bool
    memory: bool
    timing: bool
    budget_bytes: Optional[int]
    budget_max_batch: int
    budget_axis: str  # "batch" or "size": what the budget search maximises
    jobs: int
    mem_cap_bytes: Optional[int]
    timeout: float
    seed: int
    name: str
    figure: str  # "bars", "batch", "depth" or "budget": what <name>.png shows
    preset: Optional[str] = None
    skipped: Dict[str, str] = field(default_factory=dict)
    progress: bool = True

    def impls_for(self, dtype: str) -> List[str]:
        return self.impls if dtype == "float32" else self.lowp_impls


def _figure_kind(models: List[str], batches: List[int], budget: Optional[int]) -> str:
    from benchmarks.specs import get_spec

    if budget:
        return "budget"
    if len(batches) > 1:
        return "batch"
    if len(models) > 1 and all(get_spec(m).cifar for m in models):
        return "depth"
    return "bars"


def _default_mem_cap(device: str, jobs: int) -> Optional[int]:
    """3/4 of the RAM available now, shared by the parallel jobs (CPU only: CUDA has its own OOM)."""
    if device != "cpu":
        return None
    try:
        import psutil
        available = psutil.virtual_memory().available
    except ImportError:
        return None
    return int(0.75 * available / max(1, jobs))


def resolve(args: argparse.Namespace) -> Settings:
    """Preset values fill what the command line leaves unset; DEFAULTS fill the rest."""
    import torch

    from benchmarks.impls import IMPLS, parse_impls
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
    impls = parse_impls(pick("impls"))
    lowp_impls = parse_impls(pick("lowp_impls")) if pick("lowp_impls") else list(impls)
    dtypes = pick("dtype")
    dtypes = _dtype_list(dtypes) if isinstance(dtypes, str) else dtypes
    compile_ok = pick("compile")
    skipped = {}
    if not compile_ok:
        for name in [n for n in dict.fromkeys(impls + lowp_impls) if IMPLS[n].compiled]:
            skipped[name] = "left out (--no-compile or preset)"
        impls = [n for n in impls if n not in skipped]
        lowp_impls = [n for n in lowp_impls if n not in skipped]
    sweep = pick("sweep_batch")
    batches = (_int_list(sweep) if isinstance(sweep, str) else sweep) or [pick("batch")]
    budget = pick("budget")
    budget = parse_size(budget) if isinstance(budget, str) else budget
    mem_cap = pick("mem_cap")
    mem_cap = parse_size(mem_cap) if isinstance(mem_cap, str) else mem_cap
    jobs = pick("jobs") or (2 if device == "cpu" else 1)
    name = pick("name") or f"{'-'.join(models)}_{device.split(':')[0]}_b{'-'.join(map(str, batches))}"
    return Settings(models=models, batches=batches, size=pick("size"), impls=impls, lowp_impls=lowp_impls,
                    repeats=max(1, pick("repeats")), warmup=max(1, pick("warmup")), device=device,
                    dtypes=dtypes, threads=pick("threads") or torch.get_num_threads(), compile=bool(compile_ok),
                    eval=bool(pick("eval")), memory=bool(pick("memory")), timing=bool(pick("timing")),
                    budget_bytes=budget, budget_max_batch=args.budget_max_batch,
                    budget_axis=pick("budget_axis"), jobs=jobs,
                    mem_cap_bytes=mem_cap if mem_cap is not None else _default_mem_cap(device, jobs),
                    timeout=args.timeout, seed=args.seed, name=name,
                    figure=_figure_kind(models, batches, budget), preset=preset_name, skipped=skipped,
                    progress=not args.no_progress)


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


def _row(s: Settings, model: str, size: int, batch: int, impl: str, dtype: str) -> Dict[str, Any]:
    from benchmarks.impls import IMPLS
    from benchmarks.specs import get_spec

    spec = get_spec(model)
    depth = 2 * sum(spec.block_config) + (4 if spec.cifar else 5)  # conv + BN-ReLU-conv pairs + transitions + fc
    return {"model": model, "depth": depth, "growth_rate": spec.growth_rate, "size": size, "batch": batch,
            "device": s.device, "dtype": dtype, "impl": impl, "label": IMPLS[impl].label, "status": "ok", "note": ""}


def _fail(row: Dict[str, Any], status: str, note: str) -> None:
    if row["status"] == "ok":
        row["status"], row["note"] = status, note


def _job(s: Settings, row: Dict[str, Any], weights: str, tasks: List[str],
         batch: Optional[int] = None, size: Optional[int] = None) -> Dict[str, Any]:
    return dict(model=row["model"], impl=row["impl"], batch=batch or row["batch"], size=size or row["size"],
                device=s.device,
                dtype=row["dtype"], threads=s.threads, weights=weights, tasks=tasks, warmup=1, seed=s.seed,
                mem_cap=s.mem_cap_bytes)


def _worker_failure(s: Settings, result: Dict[str, Any]) -> Tuple[str, str]:
    if not result.get("oom"):
        return "error", f"memory run: {result['error']}"
    cap = f" (over the {s.mem_cap_bytes / 1024 ** 3:.1f} GiB --mem-cap)" if s.mem_cap_bytes else ""
    return "oom", f"out of memory{cap}: {result['error']}"


def _measure_memory(s: Settings, rows: Dict[str, Dict[str, Any]], weights: str, progress: Progress) -> None:
    """Peak memory + saved bytes, one fresh subprocess per implementation; on CPU also the peak under glibc's
    default allocator, in fresh child processes (benchmarks/worker.py, "memory_default")."""
    from benchmarks.runner import run_workers

    names = [n for n, r in rows.items() if r["status"] == "ok"]
    jobs = [_job(s, rows[n], weights, ["memory", "saved", "memory_default"]) for n in names]
    for name, result in zip(names, run_workers(jobs, s.jobs, s.timeout, on_done=progress.tick)):
        if "error" in result:
            _fail(rows[name], *_worker_failure(s, result))
        else:
            rows[name].update(result)


def _load_shared(name: str, model: Any, state: Dict[str, Any]) -> None:
    """Loads the shared weights into a built model, through its implementation's key remap (MONAI 2-D)."""
    from benchmarks.impls import IMPLS

    remap = IMPLS[name].remap
    getattr(model, "_orig_mod", model).load_state_dict(remap(state) if remap else state)


def _on_error(rows: Dict[str, Dict[str, Any]], phase: str) -> Callable[[str, BaseException], None]:
    from benchmarks import measure

    return lambda name, err: _fail(rows[name], "oom" if measure.is_oom(err) else "error",
                                   f"{phase}: {type(err).__name__}: {str(err).splitlines()[0][:200]}")


def _measure_time(s: Settings, rows: Dict[str, Dict[str, Any]], models: Dict[str, Any], state: Dict[str, Any],
                  progress: Progress) -> None:
    """Interleaved training-step and eval timing in this process, plus the eval-logits check."""
    import torch

    from benchmarks import measure
    from benchmarks.impls import baseline_for
    from benchmarks.specs import get_spec
    from benchmarks.timing import interleaved_times, summarize

    first = next(iter(rows.values()))
    device, dtype = torch.device(s.device), getattr(torch, first["dtype"])
    spec = get_spec(first["model"])
    x, y = measure.make_inputs(first["batch"], first["size"], spec.num_classes, device, s.seed, spec.spatial_dims,
                               spec.in_channels)
    live = {n: models[n] for n in rows if n in models and rows[n]["status"] == "ok"}

    for name, model in live.items():  # every implementation starts from the same weights and statistics
        _load_shared(name, model, state)
        model.train()
    fns = {n: (lambda m=m: measure.train_step(m, x, y, dtype)) for n, m in live.items()}
    times = interleaved_times(fns, s.repeats, s.warmup, device, progress.tick, _on_error(rows, "train step"))
    for name, t in times.items():
        if t:
            rows[name].update({f"train_{k}": v for k, v in summarize(t, first["batch"]).items()})
    for model in live.values():
        model.zero_grad(set_to_none=True)
    if not s.eval:
        return
    live = {n: m for n, m in live.items() if rows[n]["status"] == "ok"}
    for name, model in live.items():  # reset the running statistics the timed steps changed, then compare logits
        _load_shared(name, model, state)
        model.eval()
    base = baseline_for(first["model"])
    ref_name = base if base in live else next(iter(live), None)
    logits = {}
    for name, model in live.items():
        try:
            logits[name] = measure.eval_step(model, x, dtype).float()
        except Exception as err:  # noqa: BLE001
            _on_error(rows, "eval")(name, err)
    if ref_name in logits:
        for name, out in logits.items():
            rows[name]["max_abs_diff"] = (out - logits[ref_name]).abs().max().item()
            rows[name]["diff_vs"] = ref_name
    fns = {n: (lambda m=m: measure.eval_step(m, x, dtype)) for n, m in live.items() if n in logits}
    times = interleaved_times(fns, s.repeats, s.warmup, device, progress.tick, _on_error(rows, "eval"))
    for name, t in times.items():
        if t:
            rows[name].update({f"eval_{k}": v for k, v in summarize(t, first["batch"]).items()})
    for model in live.values():
        model.train()


def _budget_search(s: Settings, rows: List[Dict[str, Any]], weights: str) -> None:
    """Largest batch (or, ``--budget-axis size``, input size at the fixed batch) whose training-step peak fits
    --budget, per implementation (subprocess probes)."""
    from benchmarks.runner import largest_batch, run_worker
    from benchmarks.specs import get_spec

    by_size = s.budget_axis == "size"

    latest: Dict[str, Dict[str, Any]] = {}
    for r in rows:  # the largest measured batch of each implementation seeds the search
        if r["status"] == "ok" and (r["impl"] not in latest or r["batch"] > latest[r["impl"]]["batch"]):
            latest[r["impl"]] = r
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if not s.progress:
        tqdm = None
    for impl, ref in latest.items():
        peak = ref.get("peak_bytes") or 0
        if by_size:  # peak ~ size^dims (activations) above the fixed parameter/gradient memory
            dims = get_spec(ref["model"]).spatial_dims
            guess = int(ref["size"] * (s.budget_bytes / peak) ** (1 / dims)) if peak > 0 else ref["size"]
        else:
            guess = int(s.budget_bytes / (peak / ref["batch"])) if peak > 0 else ref["batch"]
        bar = tqdm(desc=f"budget {ref['model']} {impl}", unit="probe", file=sys.stderr, delay=3) if tqdm else None

        def peak_at(b: int, ref: Dict[str, Any] = ref) -> Optional[int]:
            job = _job(s, ref, weights, ["memory"], size=b) if by_size else _job(s, ref, weights, ["memory"], batch=b)
            result = run_worker(job, s.timeout)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(**{"size" if by_size else "batch": b},
                                peak_mib=None if "error" in result else result["peak_bytes"] // 2 ** 20)
            return None if "error" in result else result["peak_bytes"]

        best, probes = largest_batch(peak_at, s.budget_bytes, guess, s.budget_max_batch)
        if bar is not None:
            bar.close()
        for r in rows:
            if r["impl"] == impl:
                r["max_size" if by_size else "max_batch"], r["budget_probes"] = best, probes


def _time_at_budget(s: Settings, rows: List[Dict[str, Any]], models: Dict[str, Any], state: Dict[str, Any],
                    progress: Progress) -> None:
    """Interleaved training steps, each implementation at its own largest batch under --budget.

    Throughput at equal memory: ``budget_img_s`` = max_batch / median step time.
    """
    import torch

    from benchmarks import measure
    from benchmarks.specs import get_spec
    from benchmarks.timing import interleaved_times, summarize

    device = torch.device(s.device)
    by_impl = {r["impl"]: r for r in rows if r.get("max_batch") and r["impl"] in models}
    if not by_impl:
        return
    first = next(iter(by_impl.values()))
    dtype, spec = getattr(torch, first["dtype"]), get_spec(first["model"])
    fns = {}
    for name, row in by_impl.items():
        model = models[name]
        _load_shared(name, model, state)
        model.train()
        x, y = measure.make_inputs(row["max_batch"], row["size"], spec.num_classes, device, s.seed, spec.spatial_dims,
                                   spec.in_channels)
        fns[name] = lambda m=model, x=x, y=y: measure.train_step(m, x, y, dtype)
    progress.add(len(fns) * (s.warmup + s.repeats))
    times = interleaved_times(fns, s.repeats, s.warmup, device, progress.tick,
                              _on_error({n: r for n, r in by_impl.items()}, "step at max batch"))
    for name, t in times.items():
        if t:
            for r in rows:
                if r["impl"] == name:
                    r.update({f"budget_train_{k}": v for k, v in summarize(t, by_impl[name]["max_batch"]).items()})
    for model in models.values():
        model.zero_grad(set_to_none=True)


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
    wanted = list(dict.fromkeys(n for d in s.dtypes for n in s.impls_for(d)))
    available = {n: IMPLS[n].unavailable(spec) for n in wanted}
    models: Dict[str, Any] = {}
    if s.timing:
        for name in wanted:
            if available[name] is None:
                progress.desc(f"{model}: building {name}")
                try:
                    models[name] = build_model(IMPLS[name], spec, state, torch.device(s.device))
                except Exception as err:  # noqa: BLE001
                    available[name] = f"build failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    for dtype in s.dtypes:
        dtype_rows: List[Dict[str, Any]] = []
        for batch in s.batches:
            group = {n: _row(s, model, size, batch, n, dtype) for n in s.impls_for(dtype)}
            for name, reason in available.items():
                if reason is not None and name in group:
                    _fail(group[name], "skipped" if "build failed" not in reason else "error", reason)
            if s.memory:
                progress.desc(f"{model} b{batch} {dtype}: memory (subprocesses)")
                _measure_memory(s, group, weights, progress)
            if s.timing:
                progress.desc(f"{model} b{batch} {dtype}: timing")
                _measure_time(s, group, models, state, progress)
            dtype_rows.extend(group.values())
        for name, reason in s.skipped.items():
            for batch in s.batches:
                row = _row(s, model, size, batch, name, dtype)
                _fail(row, "skipped", reason)
                dtype_rows.append(row)
        if s.budget_bytes and s.memory:
            _budget_search(s, dtype_rows, weights)
            if s.timing:
                progress.desc(f"{model} {dtype}: timing at the largest batch under the budget")
                _time_at_budget(s, dtype_rows, models, state, progress)
        rows.extend(dtype_rows)


def _warnings(rows: List[Dict[str, Any]], machine: Dict[str, Any],
              load_start: Optional[Tuple[float, ...]]) -> List[str]:
    """Terminal lines for timings that should not be quoted: noisy repeats or a busy machine."""
    out = []
    for r in rows:
        for phase in ("train", "eval", "budget_train"):
            if r.get(f"{phase}_noisy"):
                med, low = r[f"{phase}_ms_median"], r[f"{phase}_ms_min"]
                out.append(f"noisy: {r['model']} b{r['batch']} {r['dtype']} {r['impl']} {phase.replace('_', ' ')}: "
                           f"median {med:.0f} ms = {med / low:.1f}x its min {low:.0f} ms")
    if report.is_busy(machine, load_start) and any(r.get("train_ms_median") for r in rows):
        out.append(f"busy machine: other work's load {report.max_load(machine, load_start):.1f} (load average "
                   f"minus this run's threads) on {machine['logical_cores']} cores; the times are not reliable")
    if out:
        out.append("-> rerun on an idle machine (more --repeats help) before quoting these times; memory numbers "
                   "are not affected")
    return out


def _report(out: Path) -> int:
    """--report: the results folder's tables, figures and README; for the committed folder also the generated
    regions of README.md and docs/*.md (benchmarks/doc_numbers.py)."""
    from benchmarks import doc_numbers

    print(f"wrote {report.write_report(out)}")
    if out.resolve() == doc_numbers.RESULTS.resolve():
        import json

        from benchmarks import bench_monai_act, bench_sync_bn
        # the results folders of the scripts with their own records: each .md from its .json
        for folder, markdown in (("sync-bn", bench_sync_bn.markdown), ("monai-act", bench_monai_act.markdown)):
            for record in sorted((out / folder).glob("*.json")):
                record.with_suffix(".md").write_text(markdown(json.loads(record.read_text())))
        for path in doc_numbers.update_docs():
            print(f"updated {path}")
    return 0


def _missing_weights_package(s: Settings) -> Optional[str]:
    """Why the shared weights of a model cannot be made here (torchvision for 2-D models, MONAI for 3-D volumes:
    every implementation loads them), as a message naming the pip install; None when they can."""
    from benchmarks.impls import IMPLS, baseline_for

    for model in s.models:
        reason = IMPLS[baseline_for(model)].unavailable()
        if reason is not None:
            package = IMPLS[baseline_for(model)].requires
            extra = "pip install -e \".[medical]\"" if package == "monai" else "pip install -e \".[bench]\""
            return (f"{model} needs {package} (every implementation loads its weights), but {reason}: "
                    f"pip install {package} (or {extra})")
    return None


def run_cli(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        return _list()
    if args.report:
        return _report(args.out)
    try:
        s = resolve(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    missing = _missing_weights_package(s)
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    import torch

    from benchmarks import plots

    torch.set_num_threads(s.threads)
    device = torch.device(s.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    from benchmarks.impls import IMPLS

    per_batch = sum(
        sum(IMPLS[n].unavailable() is None for n in s.impls_for(d))
        * ((s.warmup + s.repeats) * (s.timing + (s.timing and s.eval)) + s.memory) for d in s.dtypes)
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
    figure = plots.write_figure(rows, machine, settings, s_out / f"{s.name}.png")
    settings["figure_file"] = figure.name if figure else None
    report.write_json(paths[0], machine, settings, rows)
    report.write_csv(paths[1], rows)
    report.write_markdown(paths[2], machine, settings, rows)
    load = (f", load average {load_start[0]:.1f} at start, {machine['load_average'][0]:.1f} at end"
            if load_start and machine.get("load_average") else "")
    print(f"\n{report.machine_line(machine)}{load}; {settings['elapsed_s']:.0f} s (the CPU engine report is in "
          f"{paths[0].name})")
    for line in _warnings(rows, machine, load_start):
        print("WARNING: " + line)
    print("wrote " + ", ".join(str(p) for p in paths))
    if figure:
        print(f"figure: {figure}")
    else:
        print("figure: not written (matplotlib is not installed: pip install matplotlib)")
    return 0
