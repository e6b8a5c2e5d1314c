"""Result rows: machine description, ratios vs torchvision, terminal table, JSON / CSV / Markdown files."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from benchmarks.harness import cpu_model
from benchmarks.impls import baseline_for

__all__ = ["machine_info", "add_ratios", "format_table", "write_json", "write_csv", "write_markdown",
           "write_report", "group_key", "is_busy", "max_load", "MIB"]

MIB = 1024 ** 2
# (row key, ratio key): ratios are value / value of the torchvision-default row of the same group.
RATIOS: Tuple[Tuple[str, str], ...] = (("train_ms_median", "train_x"), ("eval_ms_median", "eval_x"),
                                       ("peak_bytes", "peak_x"), ("saved_bytes", "saved_x"),
                                       ("max_batch", "max_batch_x"), ("max_size", "max_size_x"),
                                       ("budget_train_img_s", "budget_img_s_x"))


def _version(module: str) -> Optional[str]:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - absent or broken: just not recorded
        return None


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() + ("-dirty" if dirty else "")) if out.returncode == 0 else None


def _program() -> str:
    """How this run was started, as a user would type it."""
    argv0 = Path(sys.argv[0])
    return "python -m benchmarks" if argv0.name == "__main__.py" and argv0.parent.name == "benchmarks" else argv0.name


def machine_info(device: torch.device) -> Dict[str, Any]:
    """What the numbers were measured on: CPU, cores, RAM, load, GPU, library versions, build info."""
    import densenet_fast as dnf

    try:
        import psutil
        ram, physical = psutil.virtual_memory().total, psutil.cpu_count(logical=False)
    except ImportError:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        physical = None
    info: Dict[str, Any] = {
        "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([_program()] + sys.argv[1:]),
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical,
        "ram_bytes": ram,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        # the memory workers' glibc mmap threshold (benchmarks/runner.py): RSS then follows live tensors
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", "128 KiB (benchmarks/runner.py)"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torchvision": _version("torchvision"),
        "timm": _version("timm"),
        "densenet_fast": dnf.build_info(),
        "git_commit": _git_commit(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def _mmap_note(machine: Dict[str, Any]) -> str:
    if machine.get("gpu") or not machine.get("malloc_mmap_threshold"):  # GPU runs; runs from before the rule
        return ""
    return ", glibc mmap threshold fixed at 128 KiB so that RSS follows the live tensors"


def max_load(machine: Dict[str, Any], load_start: Optional[Sequence[float]]) -> float:
    """The load of *other* work (1-minute load average, 0 where unknown): the larger of the load at the run's
    start and the load at its end minus the run's own threads (``torch_threads``, which the benchmark keeps
    busy itself; counting them flagged every run on a 2-core machine as busy)."""
    loads = [load_start[0]] if load_start else []
    end = machine.get("load_average")
    if end:
        loads.append(max(0.0, end[0] - (machine.get("torch_threads") or 0)))
    return max(loads, default=0.0)


def is_busy(machine: Dict[str, Any], load_start: Optional[Sequence[float]]) -> bool:
    """Other work on a CPU machine: a load of other work (:func:`max_load`) above half its logical cores
    (GPU runs: never)."""
    return not machine.get("gpu") and max_load(machine, load_start) > 0.5 * (machine.get("logical_cores") or 1)


def _is_3d(model: str) -> bool:
    return baseline_for(model) != "tv"


def group_key(row: Dict[str, Any]) -> Tuple[Any, ...]:
    return row["model"], row["size"], row["batch"], row["device"], row["dtype"]


# SE-DenseNet rows (benchmarks/impls.py) are also compared with the plain fused model (the issue #19 targets).
SE_BASELINE = "dnf"
SE_RATIOS: Tuple[Tuple[str, str], ...] = (("train_ms_median", "train_x_dnf"), ("peak_bytes", "peak_x_dnf"),
                                          ("saved_bytes", "saved_x_dnf"))


def add_ratios(rows: List[Dict[str, Any]]) -> None:
    """Adds ``*_x`` ratios vs the baseline row (torchvision default; MONAI for 3-D models) of the same
    model/size/batch (in place), and for the SE-DenseNet rows ``*_x_dnf`` ratios and ``saved_extra_bytes``
    vs the plain fused row."""
    base = {group_key(r): r for r in rows if r["impl"] == baseline_for(r["model"])}
    se_base = {group_key(r): r for r in rows if r["impl"] == SE_BASELINE}
    for row in rows:
        ref = base.get(group_key(row))
        for key, ratio in RATIOS:
            value, ref_value = row.get(key), (ref or {}).get(key)
            row[ratio] = value / ref_value if value is not None and ref_value else None
        plain = se_base.get(group_key(row))
        if row["impl"].startswith("dnf-se") and plain is not None:
            for key, ratio in SE_RATIOS:
                value, ref_value = row.get(key), plain.get(key)
                row[ratio] = value / ref_value if value is not None and ref_value else None
            if row.get("saved_bytes") is not None and plain.get("saved_bytes") is not None:
                row["saved_extra_bytes"] = row["saved_bytes"] - plain["saved_bytes"]


def _se_lines(group: Sequence[Dict[str, Any]]) -> List[str]:
    """One line per SE-DenseNet row: its ratios vs the plain fused model and the extra bytes it saves."""
    def extra(r: Dict[str, Any]) -> str:
        return "-" if r.get("saved_extra_bytes") is None else f"{r['saved_extra_bytes'] / 1024:+.0f} KiB"
    return [f"  {r['impl']} vs {SE_BASELINE}: step {_x(r.get('train_x_dnf'))}, peak {_x(r.get('peak_x_dnf'))}, "
            f"saved {_x(r.get('saved_x_dnf'))} ({extra(r)})"
            for r in group if r["impl"].startswith("dnf-se") and any(r.get(k) is not None for _, k in SE_RATIOS)]


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _x(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _mib(value: Optional[int]) -> Optional[float]:
    return None if value is None else value / MIB


def _cells(row: Dict[str, Any]) -> List[str]:
    if row["status"] != "ok" and not any(row.get(k) is not None for k in ("train_ms_median", "peak_bytes")):
        return [row["impl"]] + ["-"] * (len(HEADERS) - 1)
    train = (f"{_fmt(row.get('train_ms_median'), '.0f')} ({_fmt(row.get('train_ms_min'), '.0f')})"
             + (" noisy" if row.get("train_noisy") else "") if row.get("train_ms_median") is not None else "-")
    return [row["impl"], train, _fmt(row.get("train_img_s"), ".2f"), _x(row.get("train_x")),
            _fmt(row.get("eval_ms_median"), ".0f"), _x(row.get("eval_x")),
            _fmt(_mib(row.get("peak_bytes")), ".0f"), _x(row.get("peak_x")),
            _fmt(_mib(row.get("saved_bytes")), ".0f"), _x(row.get("saved_x")),
            _fmt(row.get("max_batch", row.get("max_size")), "d"), _x(row.get("max_batch_x", row.get("max_size_x"))),
            _fmt(row.get("budget_train_ms_median"), ".0f"), _fmt(row.get("budget_train_img_s"), ".2f"),
            _x(row.get("budget_img_s_x")), _fmt(row.get("max_abs_diff"), ".1e")]


HEADERS = ["impl", "train ms med (min)", "img/s", "vs tv", "eval ms", "vs tv", "peak MiB", "vs tv",
           "saved MiB", "vs tv", "max batch", "vs tv", "ms at max", "img/s at max", "vs tv", "|dlogits|"]


def _groups(rows: Iterable[Dict[str, Any]]) -> Dict[Tuple[Any, ...], List[Dict[str, Any]]]:
    groups: Dict[Tuple[Any, ...], List[Dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    return groups


def _notes(rows: Sequence[Dict[str, Any]]) -> List[str]:
    return [f"  {r['impl']}: {r['status']}: {r['note']}" for r in rows if r.get("note")]


def format_table(rows: List[Dict[str, Any]], budget: Optional[int] = None) -> str:
    """Plain-text table, one block per model/size/batch, ratios vs torchvision default on every row."""
    out: List[str] = []
    for (model, size, batch, device, dtype), group in _groups(rows).items():
        out.append(f"\n{model}  {size}x{size}  batch {batch}  {dtype}  {device}"
                   + (f"  (max batch: largest under a {budget / MIB:.0f} MiB step peak)" if budget else ""))
        table = [HEADERS] + [_cells(r) for r in group]
        keep = [i for i in range(len(HEADERS)) if any(row[i] != "-" for row in table[1:]) or i == 0]
        table = [[row[i] for i in keep] for row in table]
        widths = [max(len(row[i]) for row in table) for i in range(len(keep))]
        for n, row in enumerate(table):
            out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
            if n == 0:
                out.append("  ".join("-" * w for w in widths))
        out.extend(_notes(group))
        out.extend(_se_lines(group))
    out.append("\nvs tv: value / torchvision default (time: < 1 is faster; memory: < 1 is smaller). "
               "peak: training-step peak above the resident model; saved: activations autograd keeps for "
               "backward; |dlogits|: max |eval logits - torchvision's|"
               + ("; max batch: largest batch under the budget, with the step time and img/s there" if budget else "")
               + "; noisy: median > 1.3x min.")
    return "\n".join(out)


def write_json(path: Path, machine: Dict[str, Any], settings: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    path.write_text(json.dumps({"machine": machine, "settings": settings, "rows": rows}, indent=2, default=str) + "\n")


def write_csv(path: Path, rows: List[Dict[str, Any]]) -> None:
    keys: List[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def _engine(machine: Dict[str, Any]) -> str:
    engine = machine.get("densenet_fast", {}).get("cpu_engine")
    return f" (CPU engine: {engine})" if engine else ""


def write_markdown(path: Path, machine: Dict[str, Any], settings: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    """A README-ready table per model/batch with the machine and settings it was measured with."""
    cpu = (f"{machine['cpu_model']}, {machine['logical_cores']} logical cores, "
           f"{machine['ram_bytes'] / 1024**3:.0f} GiB RAM")
    where = machine.get("gpu") or cpu
    timed = any(r.get("train_ms_median") is not None for r in rows)
    timing = (f"times are the median (min) of {settings['repeats']} interleaved repeats" if timed
              else "memory only, no timing")
    lines = [f"<!-- generated by: {machine['command']} -->",
             f"Measured {machine['timestamp'][:10]} on {where}; torch {machine['torch']} "
             f"({machine['torch_threads']} threads), densenet_fast {machine['densenet_fast']['version']}"
             f"{_engine(machine)}"
             f"{' @ ' + machine['git_commit'] if machine.get('git_commit') else ''}. "
             f"Step = forward + cross-entropy + backward; {timing}; memory is measured in a fresh process per "
             f"implementation "
             f"({'CUDA max_memory_allocated' if machine.get('gpu') else 'peak RSS growth'} of one training step"
             f"{_mmap_note(machine)})."]
    if timed and is_busy(machine, settings.get("load_average_start")):
        lines[-1] += (f" **The machine was busy (other work's load up to "
                      f"{max_load(machine, settings.get('load_average_start')):.1f} on "
                      f"{machine['logical_cores']} cores): the times are noisy.**")
    if settings.get("mem_cap_bytes") and any(r["status"] == "oom" for r in rows):
        lines[-1] += (f" Rows marked (oom) needed more than the {settings['mem_cap_bytes'] / 1024 ** 3:.1f} GiB "
                      f"allowed per measurement (`--mem-cap`).")
    budget = settings.get("budget_bytes")
    for (model, size, batch, device, dtype), group in _groups(rows).items():
        shape = f"{size}³" if _is_3d(model) else f"{size}x{size}"
        lines += ["", f"**{model}**, {shape}, batch {batch}, {dtype}, {device}", ""]
        head = ["Implementation", "Peak memory (train step)", "Saved for backward", "Step time", "img/s",
                "Eval time"]
        by_size = any(r.get("max_size") for r in group)
        if budget and by_size:
            head += [f"Max input size in {budget / 1024**2:g} MiB (batch {batch})"]
        elif budget:
            head += [f"Max batch in {budget / 1024**2:g} MiB", "Step time at max batch", "img/s at max batch"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in group:
            def cell(value: Optional[float], unit: str, ratio: Optional[float], spec: str = ".0f") -> str:
                if value is None:
                    return "—"
                text = f"{value:{spec}}" + (f" {unit}" if unit else "")
                return text + (f" ({ratio:.2f}x)" if ratio is not None and r["impl"] != baseline_for(model) else "")
            cells = [r["label"] if r["status"] == "ok" else f"{r['label']} ({r['status']})",
                     cell(_mib(r.get("peak_bytes")), "MiB", r.get("peak_x")),
                     cell(_mib(r.get("saved_bytes")), "MiB", r.get("saved_x")),
                     cell(r.get("train_ms_median"), "ms", r.get("train_x")),
                     "—" if r.get("train_img_s") is None else f"{r['train_img_s']:.2f}",
                     cell(r.get("eval_ms_median"), "ms", r.get("eval_x"))]
            if budget and by_size:
                cells += [cell(r.get("max_size"), "", r.get("max_size_x"), "d")]
            elif budget:
                cells += [cell(r.get("max_batch"), "", r.get("max_batch_x"), "d"),
                          cell(r.get("budget_train_ms_median"), "ms", None),
                          cell(r.get("budget_train_img_s"), "", r.get("budget_img_s_x"), ".2f")]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"{r['label']}: {r['note']}" for r in group if r.get("note")]
        notes += [f"{r['label']}: noisy {phase} time (median {r[f'{phase}_ms_median'] / r[f'{phase}_ms_min']:.1f}x "
                  f"the min)" for r in group for phase in ("train", "eval", "budget_train") if r.get(f"{phase}_noisy")]
        if notes:
            lines += [""] + [f"* {n}" for n in notes]
    bases = sorted({"MONAI's DenseNet" if _is_3d(r["model"]) else "torchvision default" for r in rows})
    lines += ["", f"Ratios in parentheses: value / {' (2-D) or '.join(bases)}{' (3-D)' if len(bases) > 1 else ''}."]
    path.write_text("\n".join(lines) + "\n")


# The headline runs first (in this order), then any other run in the folder by name.
_REPORT_ORDER = ("readme-cpu", "mem-depth", "mem-batch", "budget", "quick")


def _draw(data: Dict[str, Any], path: Path) -> Optional[Path]:
    """The figure of a run saved without one (an older run, or matplotlib was missing), from its rows."""
    from benchmarks import plots  # plots imports this module

    settings = dict(data.get("settings", {}))
    if settings.get("figure") not in plots.PLOTTERS:  # runs from before figures: what they measured
        settings["figure"] = ("budget" if settings.get("budget_bytes") else
                              "batch" if len(settings.get("batches") or []) > 1 else "bars")
    return plots.write_figure(data.get("rows", []), data.get("machine", {}), settings, path)


def _ignored_by_git(path: Path) -> bool:
    """Whether git ignores ``path`` (the local ``--quick`` run's files stay out of the committed results)."""
    try:
        return subprocess.run(["git", "check-ignore", "-q", path.name], cwd=path.parent, capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout: report everything
        return False


def write_report(out_dir: Path) -> Path:
    """Gathers every ``<name>.json`` of ``out_dir`` (but those git ignores) into ``out_dir/README.md``: per
    ``python -m benchmarks`` run its command, figure (drawn from the JSON where the run has none) and tables
    (its ``<name>.md``); per pytest-benchmark JSON (the operator micro-benchmarks) its micro_report table
    (``<name>.md``). Returns the path."""
    out_dir = Path(out_dir)
    runs = sorted((p for p in out_dir.glob("*.json") if not _ignored_by_git(p)),
                  key=lambda p: (_REPORT_ORDER.index(p.stem) if p.stem in _REPORT_ORDER else len(_REPORT_ORDER),
                                 p.stem))
    lines = ["# Benchmark results", "",
             "Generated by `python -m benchmarks --report` from the runs in this folder; each section is one "
             "`python -m benchmarks` run (its JSON and CSV hold every number, the machine and the settings) or "
             "one pytest-benchmark run of the operator micro-benchmarks.", ""]
    lines += [f"* [{p.stem}](#{p.stem})" for p in runs]
    for path in runs:
        data = json.loads(path.read_text())
        md = out_dir / f"{path.stem}.md"
        if "benchmarks" in data and "rows" not in data:  # pytest-benchmark's JSON
            lines += ["", f"## {path.stem}", "", f"`pytest benchmarks/ --benchmark-json={path.name}`, then "
                      f"`python -m benchmarks.micro_report {path.name} --markdown {md.name}`; file: "
                      f"[{path.name}]({path.name})", ""]
            if md.exists():
                lines += md.read_text().splitlines()
            continue
        machine, settings = data.get("machine", {}), data.get("settings", {})
        lines += ["", f"## {path.stem}", "", f"`{machine.get('command', '?')}` — {settings.get('elapsed_s', '?')} s; "
                  f"files: [{path.name}]({path.name}), [{path.stem}.csv]({path.stem}.csv)", ""]
        figure = out_dir / (settings.get("figure_file") or f"{path.stem}.png")
        if not figure.exists():
            figure = _draw(data, figure)
        if figure is not None:
            lines += [f"![{path.stem}]({figure.name})", ""]
        if md.exists():
            lines += [line for line in md.read_text().splitlines() if not line.startswith("<!--")]
    target = out_dir / "README.md"
    target.write_text("\n".join(lines) + "\n")
    return target
