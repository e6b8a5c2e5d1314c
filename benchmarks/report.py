"""Result rows: machine description, ratios vs torchvision, terminal table, JSON / CSV / Markdown files."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from benchmarks.harness import cpu_model
from benchmarks.impls import baseline_for

__all__ = ["machine_info", "machine_line", "memory_convention", "markdown_lines", "add_ratios", "format_table",
           "write_json", "write_csv", "write_markdown", "write_report", "DEFAULT_ALLOC_PEAK", "group_key", "is_busy",
           "max_load", "MIB"]

MIB = 1024 ** 2
# (row key, ratio key): ratios are value / value of the torchvision-default row of the same group.
RATIOS: Tuple[Tuple[str, str], ...] = (("train_ms_median", "train_x"), ("eval_ms_median", "eval_x"),
                                       ("train_ms_min", "train_x_min"), ("eval_ms_min", "eval_x_min"),
                                       ("peak_bytes_default_alloc", "peak_bytes_default_alloc_x"),
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
    def med_min(phase: str) -> str:
        if row.get(f"{phase}_ms_median") is None:
            return "-"
        return (f"{_fmt(row.get(f'{phase}_ms_median'), '.0f')} ({_fmt(row.get(f'{phase}_ms_min'), '.0f')})"
                + (" noisy" if row.get(f"{phase}_noisy") else ""))
    return [row["impl"], med_min("train"), _fmt(row.get("train_img_s"), ".2f"), _x(row.get("train_x")),
            med_min("eval"), _x(row.get("eval_x")),
            _fmt(_mib(row.get("peak_bytes")), ".0f"), _x(row.get("peak_x")),
            _fmt(_mib(row.get("peak_bytes_default_alloc")), ".0f"), _x(row.get("peak_bytes_default_alloc_x")),
            _fmt(_mib(row.get("saved_bytes")), ".0f"), _x(row.get("saved_x")),
            _fmt(row.get("max_batch", row.get("max_size")), "d"), _x(row.get("max_batch_x", row.get("max_size_x"))),
            _fmt(row.get("budget_train_ms_median"), ".0f"), _fmt(row.get("budget_train_img_s"), ".2f"),
            _x(row.get("budget_img_s_x")), _fmt(row.get("max_abs_diff"), ".1e")]


HEADERS = ["impl", "train ms med (min)", "img/s", "vs tv", "eval ms med (min)", "vs tv", "peak MiB", "vs tv",
           "peak MiB default malloc", "vs tv",
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


# The step peak under glibc's default allocator (no MALLOC_MMAP_THRESHOLD_), where a run records it beside the
# fixed-threshold ``peak_bytes``; the tables show it as a column whenever a row has it.
DEFAULT_ALLOC_PEAK = "peak_bytes_default_alloc"

_ISA_FLAGS = (("isa", {"AVX512": "AVX-512", "AVX2": "AVX2"}), ("amx_bf16", {True: "AMX-BF16"}),
              ("bf16_rows", {"avx512_bf16": "AVX512-BF16"}))


def machine_line(machine: Dict[str, Any]) -> str:
    """The machine in one readable line: CPU (or GPU), cores, the instruction sets the kernels use, torch.
    The full engine report stays in the results JSON."""
    if machine.get("gpu"):
        return (f"{machine['gpu']} (CUDA {machine.get('cuda', '?')}); torch {machine.get('torch', '?')}")
    engine = (machine.get("densenet_fast") or {}).get("cpu_engine") or {}
    flags = [names[engine[key]] for key, names in _ISA_FLAGS if engine.get(key) in names]
    ram = machine.get("ram_bytes")
    return (f"{machine.get('cpu_model', 'CPU')}, {machine.get('logical_cores', '?')} logical cores"
            + (f", {ram / 1024 ** 3:.0f} GiB RAM" if ram else "") + (f", {' + '.join(flags)}" if flags else "")
            + f"; torch {machine.get('torch', '?')}"
            + (f", {machine['torch_threads']} thread{'s' if machine['torch_threads'] != 1 else ''}"
               if machine.get("torch_threads") else ""))


def memory_convention(machine: Dict[str, Any]) -> str:
    """How the run's memory was measured, in one sentence."""
    if machine.get("gpu"):
        return "Memory: CUDA `max_memory_allocated` of one training step, in a fresh process per implementation."
    fixed = (", with glibc's mmap threshold fixed at 128 KiB so that RSS follows the live tensors"
             if machine.get("malloc_mmap_threshold") else
             ", under glibc's default allocator (RSS includes heap fragmentation)")
    return ("Memory: growth of the resident set (RSS) over one training step after a warm-up step, gradients "
            f"included, in a fresh process per implementation{fixed}.")


def _ms(row: Dict[str, Any], phase: str, baseline: bool) -> str:
    """``median (min) ms, ratio (ratio of minima)`` of a timed phase, or a dash."""
    med, low = row.get(f"{phase}_ms_median"), row.get(f"{phase}_ms_min")
    if med is None:
        return "—"
    text = f"{med:.0f} ({low:.0f}) ms" if low is not None else f"{med:.0f} ms"
    ratio, ratio_min = row.get(f"{phase}_x"), row.get(f"{phase}_x_min")
    if baseline or ratio is None:
        return text
    return text + f", {ratio:.2f}x" + (f" ({ratio_min:.2f}x)" if ratio_min is not None else "")


def _mem(row: Dict[str, Any], key: str, ratio_key: Optional[str], baseline: bool) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    ratio = None if baseline or ratio_key is None else row.get(ratio_key)
    return f"{value / MIB:.0f} MiB" + (f" ({ratio:.2f}x)" if ratio is not None else "")


def _mem_default_alloc(row: Dict[str, Any], baseline: bool) -> str:
    """The default-allocator peak (median of fresh processes) with its ratio, then the range of the runs."""
    cell = _mem(row, DEFAULT_ALLOC_PEAK, DEFAULT_ALLOC_PEAK + "_x", baseline)
    runs = row.get(DEFAULT_ALLOC_PEAK + "_runs") or []
    return cell + (f"; {min(runs) / MIB:.0f}–{max(runs) / MIB:.0f} ({len(runs)} runs)" if len(runs) > 1 else "")


def _count(row: Dict[str, Any], key: str, baseline: bool) -> str:
    """A budget search's result (largest batch or size) with its ratio, or a dash."""
    value, ratio = row.get(key), None if baseline else row.get(f"{key}_x")
    return "—" if value is None else f"{value}" + (f" ({ratio:.2f}x)" if ratio is not None else "")


def _has(rows: Sequence[Dict[str, Any]], key: str) -> bool:
    return any(r.get(key) is not None for r in rows)


def markdown_lines(machine: Dict[str, Any], settings: Dict[str, Any], rows: List[Dict[str, Any]]) -> List[str]:
    """A table per model/batch/dtype, the machine line and how it was measured above them. Times are
    ``median (min)`` over interleaved repeats; ratios are vs torchvision (MONAI for 3-D rows), by medians,
    with the ratio of the minima in parentheses."""
    add_ratios(rows)
    timed = _has(rows, "train_ms_median") or _has(rows, "budget_train_ms_median")
    timing = (f"times are median (min) of {settings.get('repeats', '?')} interleaved repeats" if timed
              else "memory only")
    lines = [f"Measured {machine.get('timestamp', '?')[:10]} on {machine_line(machine)}. "
             f"Step = forward + cross-entropy + backward; {timing}. {memory_convention(machine)}"]
    if timed and is_busy(machine, settings.get("load_average_start")):
        lines[-1] += (f" **Other work's load was up to {max_load(machine, settings.get('load_average_start')):.1f}"
                      f" on {machine.get('logical_cores')} cores: the times are noisy; prefer the minima.**")
    if settings.get("mem_cap_bytes") and any(r["status"] == "oom" for r in rows):
        lines[-1] += (f" Rows marked (oom) needed more than the {settings['mem_cap_bytes'] / 1024 ** 3:.1f} GiB "
                      f"allowed per measurement (`--mem-cap`).")
    lines[-1] = textwrap.fill(lines[-1], width=116, break_on_hyphens=False, break_long_words=False)
    budget = settings.get("budget_bytes")
    for (model, size, batch, device, dtype), group in _groups(rows).items():
        shape = f"{size}³" if _is_3d(model) else f"{size}x{size}"
        lines += ["", f"**{model}**, {shape}, batch {batch}, {dtype}, {device}", ""]
        cols: List[Tuple[str, Callable[[Dict[str, Any], bool], str]]] = [
            ("Peak memory (train step)", lambda r, b: _mem(r, "peak_bytes", "peak_x", b))]
        if _has(group, DEFAULT_ALLOC_PEAK):
            cols.append(("Peak, default allocator: median, range of the runs", _mem_default_alloc))
        cols.append(("Saved for backward", lambda r, b: _mem(r, "saved_bytes", "saved_x", b)))
        if _has(group, "train_ms_median"):
            cols.append(("Step time, median (min)", lambda r, b: _ms(r, "train", b)))
        if _has(group, "eval_ms_median"):
            cols.append(("Eval time, median (min)", lambda r, b: _ms(r, "eval", b)))
        if budget and _has(group, "max_size"):
            cols.append((f"Max input size in {budget / MIB:g} MiB", lambda r, b: _count(r, "max_size", b)))
        elif budget:
            cols += [(f"Max batch in {budget / MIB:g} MiB", lambda r, b: _count(r, "max_batch", b)),
                     ("Step time at max batch, median (min)", lambda r, b: _ms(r, "budget_train", True)),
                     ("img/s at max batch", lambda r, b: "—" if r.get("budget_train_img_s") is None else
                      f"{r['budget_train_img_s']:.2f}" + ("" if b or r.get("budget_img_s_x") is None
                                                           else f" ({r['budget_img_s_x']:.2f}x)"))]
        lines += ["| Implementation | " + " | ".join(c[0] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r in group:
            base = r["impl"] == baseline_for(model)
            label = r["label"] if r["status"] == "ok" else f"{r['label']} ({r['status']})"
            lines.append(f"| {label} | " + " | ".join(fn(r, base) for _, fn in cols) + " |")
        notes = [f"{r['label']}: {r['note']}" for r in group if r.get("note")]
        notes += [f"{r['label']}: noisy {phase.replace('_', ' ')} time (median "
                  f"{r[f'{phase}_ms_median'] / r[f'{phase}_ms_min']:.1f}x the min)"
                  for r in group for phase in ("train", "eval", "budget_train") if r.get(f"{phase}_noisy")]
        if notes:
            lines += [""] + [f"* {n}" for n in notes]
    bases = sorted({"MONAI's DenseNet" if _is_3d(r["model"]) else "torchvision default" for r in rows})
    lines += ["", f"Ratios: value / {' (2-D) or '.join(bases)}{' (3-D)' if len(bases) > 1 else ''}; for times by "
                  "medians, the ratio of the minima in parentheses."]
    return lines


def write_markdown(path: Path, machine: Dict[str, Any], settings: Dict[str, Any], rows: List[Dict[str, Any]]) -> None:
    """A README-ready table per model/batch with the machine and settings it was measured with."""
    path.write_text("\n".join([f"<!-- generated by: {machine.get('command', '?')} -->"]
                              + markdown_lines(machine, settings, rows)) + "\n")


# The headline runs first (in this order), then any other run in the folder by name.
_REPORT_ORDER = ("readme-cpu", "mem-depth", "mem-batch", "budget", "quick")


def _draw(data: Dict[str, Any], path: Path) -> Optional[Path]:
    """The figure of a run, drawn from its rows (None without matplotlib)."""
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


def _write_micro_markdown(data: Dict[str, Any], md: Path) -> None:
    from benchmarks import micro_report

    md.write_text(micro_report.to_markdown(micro_report.rows(data), micro_report.machine_text(data)))


def write_report(out_dir: Path) -> Path:
    """Regenerates, from every ``<name>.json`` of ``out_dir`` (but those git ignores), its ``<name>.md`` table and
    its figure, and gathers them into ``out_dir/README.md``: per ``python -m benchmarks`` run its command, figure
    and tables; per pytest-benchmark JSON (the operator micro-benchmarks) its micro_report table. Without
    matplotlib the committed figures are kept. Returns the path of the README."""
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
            _write_micro_markdown(data, md)
            lines += md.read_text().splitlines()
            continue
        machine, settings, rows = data.get("machine", {}), data.get("settings", {}), data.get("rows", [])
        lines += ["", f"## {path.stem}", "", f"`{machine.get('command', '?')}` — {settings.get('elapsed_s', '?')} s; "
                  f"files: [{path.name}]({path.name}), [{path.stem}.csv]({path.stem}.csv)", ""]
        figure = _draw(data, out_dir / (settings.get("figure_file") or f"{path.stem}.png"))
        if figure is None and (out_dir / f"{path.stem}.png").exists():  # no matplotlib: the committed figure
            figure = out_dir / f"{path.stem}.png"
        if figure is not None:
            lines += [f"![{path.stem}]({figure.name})", ""]
        write_markdown(md, machine, settings, rows)
        lines += markdown_lines(machine, settings, rows)
    target = out_dir / "README.md"
    target.write_text("\n".join(lines) + "\n")
    return target
