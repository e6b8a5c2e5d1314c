"""The PNG figure every ``python -m benchmarks`` run writes next to its JSON (matplotlib, Agg backend).

One figure per run, chosen by what the run measured (``settings["figure"]``):

* ``bars``   — one comparison: training-step peak memory, bytes saved for backward, step time and eval
  time per implementation, each bar annotated with its ratio to torchvision (one row per dtype/batch);
* ``batch``  — a batch-size sweep: the same quantities vs batch size, one line per implementation;
* ``depth``  — DenseNet-BC of several depths: saved bytes and step peak vs depth on log-log axes, one
  line per implementation and growth rate, with the fitted slope in the legend (2 = quadratic);
* ``budget`` — the largest batch under ``--budget`` per implementation and the step time / throughput
  at that batch.

Memory is CPU peak-RSS growth or CUDA ``max_memory_allocated`` — whichever the rows were measured with
(the title says which); the figures do not care.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchmarks.impls import baseline_for
from benchmarks.report import MIB, group_key

__all__ = ["write_figure", "plot_bars", "plot_batch", "plot_depth", "plot_budget", "loglog_slope"]

Row = Dict[str, Any]
# (row key, ratio key, axis label, scale)
MEMORY = (("peak_bytes", "peak_x", "training-step peak memory (MiB)", 1 / MIB),
          ("saved_bytes", "saved_x", "saved for backward (MiB)", 1 / MIB))
TIME = (("train_ms_median", "train_x", "training step (ms): bar = median, — = min", 1.0),
        ("eval_ms_median", "eval_x", "eval forward (ms): bar = median, — = min", 1.0))
# a timed quantity's minimum, drawn beside its median (a busy machine inflates medians, rarely minima)
_MIN_OF = {"train_ms_median": "train_ms_min", "eval_ms_median": "eval_ms_min",
           "budget_train_ms_median": "budget_train_ms_min"}
_COLORS = {"tv": "#d62728", "tv-memeff": "#ff7f0e", "timm": "#8c564b", "timm-ckpt": "#e377c2",
           "tv-compile": "#9467bd", "dnf": "#1f77b4", "dnf-compile": "#17becf", "dnf-ref": "#7f7f7f",
           "dnf-convert": "#2ca02c"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    return plt


def _color(impl: str) -> str:
    return _COLORS.get(impl, "#bcbd22")


def _memory_method(machine: Dict[str, Any]) -> str:
    return "CUDA max_memory_allocated" if machine.get("gpu") else "peak RSS growth"


def _where(machine: Dict[str, Any]) -> str:
    """The machine in a few words, for figure titles."""
    if machine.get("gpu"):
        return f"{machine['gpu']}, torch {machine.get('torch', '?')}"
    return (f"{machine.get('cpu_model', 'CPU')}, {machine.get('logical_cores', '?')} cores, "
            f"torch {machine.get('torch', '?')}")


def _busy_note(machine: Dict[str, Any], settings: Dict[str, Any], rows: Sequence[Row]) -> str:
    from benchmarks.report import is_busy

    timed = any(r.get("train_ms_median") or r.get("budget_train_ms_median") for r in rows)
    return " — busy machine: times are noisy" if timed and is_busy(machine, settings.get("load_average_start")) else ""


def _finish(fig, path: Path, title: str) -> Path:
    plt = _pyplot()
    fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": legends placed below the axes are kept
    plt.close(fig)
    return path


def _short(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 10 else f"{value:.2g}"


def _ok(rows: Sequence[Row], key: str) -> List[Row]:
    return [r for r in rows if r.get(key) is not None]


def _min_markers(ax, bars, shown: Sequence[Row], key: str) -> None:
    """A black line across each timed bar at its minimum (the bar is the median; the label above says both)."""
    low_key = _MIN_OF.get(key)
    for bar, r in zip(bars, shown):
        if low_key and r.get(low_key) is not None:
            ax.hlines(r[low_key], bar.get_x(), bar.get_x() + bar.get_width(), colors="black", linewidth=2, zorder=3)


# -- one comparison -----------------------------------------------------------------------------------
def plot_bars(rows: Sequence[Row], machine: Dict[str, Any], settings: Dict[str, Any], path: Path) -> Optional[Path]:
    """Bars per implementation of each measured quantity, one row of panels per model/batch/dtype."""
    groups: Dict[Tuple[Any, ...], List[Row]] = {}
    for r in rows:
        groups.setdefault(group_key(r), []).append(r)
    panels = [p for p in MEMORY + TIME if any(r.get(p[0]) is not None for r in rows)]
    if not panels:
        return None
    plt = _pyplot()
    most = max(len(g) for g in groups.values())  # wider panels for many bars: their labels must not overlap
    fig, axes = plt.subplots(len(groups), len(panels), figsize=(max(4.2, 0.85 * most) * len(panels),
                                                                3.8 * len(groups)), squeeze=False)
    for axrow, ((model, size, batch, device, dtype), group) in zip(axes, groups.items()):
        for ax, (key, ratio_key, label, scale) in zip(axrow, panels):
            shown = _ok(group, key)
            values = [r[key] * scale for r in shown]
            bars = ax.bar(range(len(shown)), values, color=[_color(r["impl"]) for r in shown])
            _min_markers(ax, bars, shown, key)
            for bar, r in zip(bars, shown):
                ratio = r.get(ratio_key) if r["impl"] != baseline_for(r["model"]) else None
                low = r.get(_MIN_OF.get(key, ""))
                text = (_short(bar.get_height()) + (f" ({_short(low)})" if low is not None else "")
                        + (f"\n{ratio:.2f}x" if ratio is not None else ""))
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize="x-small", xytext=(0, 2), textcoords="offset points")
            ax.set_xticks(range(len(shown)), [r["label"] for r in shown], rotation=35, ha="right", fontsize="x-small")
            ax.set_ylabel(label, fontsize="small")
            ax.set_ylim(0, max(values, default=1) * 1.25)
            ax.set_title(f"{model} {size}² batch {batch} {dtype}", fontsize="small")
            ax.grid(True, axis="y", alpha=0.3)
    title = (f"{_where(machine)} — memory: {_memory_method(machine)}; ratios vs torchvision"
             f"{_busy_note(machine, settings, rows)}")
    return _finish(fig, path, title)


def _min_line(ax, rows: Sequence[Row], key: str, impl: str, x: str) -> None:
    """The minima of a timed quantity as a thin dotted line in the implementation's colour (the solid line is
    the median); nothing for memory."""
    low_key = _MIN_OF.get(key)
    pts = sorted((r[x], r[low_key]) for r in rows if r["impl"] == impl and low_key and r.get(low_key) is not None)
    if pts:
        ax.plot(*zip(*pts), linestyle=":", marker="_", markersize=8, linewidth=1, color=_color(impl))


# -- batch-size sweep ---------------------------------------------------------------------------------
def plot_batch(rows: Sequence[Row], machine: Dict[str, Any], settings: Dict[str, Any], path: Path) -> Optional[Path]:
    """Memory (and time, when measured) vs batch size, one line per implementation; a row per model/dtype."""
    groups: Dict[Tuple[Any, ...], List[Row]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["size"], r["dtype"]), []).append(r)
    panels = [p for p in MEMORY + TIME if any(r.get(p[0]) is not None for r in rows)]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(groups), len(panels), figsize=(5 * len(panels), 4 * len(groups)), squeeze=False)
    for axrow, ((model, size, dtype), group) in zip(axes, groups.items()):
        batches = sorted({r["batch"] for r in group})
        for ax, (key, _, label, scale) in zip(axrow, panels):
            for impl in dict.fromkeys(r["impl"] for r in group):
                pts = sorted((r["batch"], r[key] * scale) for r in _ok(group, key) if r["impl"] == impl)
                if pts:
                    name = next(r["label"] for r in group if r["impl"] == impl)
                    failed = [r["batch"] for r in group if r["impl"] == impl and r["status"] == "oom"]
                    ax.plot(*zip(*pts), marker="o", color=_color(impl),
                            label=name + (f" (b≥{min(failed)}: over the memory cap)" if failed else ""))
                    _min_line(ax, group, key, impl, "batch")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(batches, [str(b) for b in batches])  # the measured batch sizes, not 2^k
            ax.minorticks_off()
            ax.set_xlabel("batch size")
            ax.set_ylabel(label, fontsize="small")
            ax.set_title(f"{model} {size}² {dtype}", fontsize="small")
            ax.grid(True, which="both", alpha=0.3)
        axrow[0].legend(fontsize="small")
    title = f"{_where(machine)} — memory: {_memory_method(machine)}{_busy_note(machine, settings, rows)}"
    return _finish(fig, path, title)


# -- depth sweep --------------------------------------------------------------------------------------
def loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log(y) vs log(x): 1 for linear growth, 2 for quadratic (None if < 2 points)."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    var = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / var if var else None


def plot_depth(rows: Sequence[Row], machine: Dict[str, Any], settings: Dict[str, Any], path: Path) -> Optional[Path]:
    """Saved bytes and step peak vs network depth, log-log; solid/dashed lines per growth rate."""
    panels = [p for p in MEMORY + TIME[:1] if any(r.get(p[0]) is not None for r in rows)]
    if not panels:
        return None
    plt = _pyplot()
    growths = sorted({r["growth_rate"] for r in rows})
    styles = dict(zip(growths, ["-", "--", ":", "-."]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 7.0), squeeze=False)
    for ax, (key, _, label, scale) in zip(axes[0], panels):
        for impl in dict.fromkeys(r["impl"] for r in rows):
            for k in growths:
                line = [r for r in rows if r["impl"] == impl and r["growth_rate"] == k]
                pts = sorted((r["depth"], r[key] * scale) for r in _ok(line, key) if r[key] > 0)
                if not pts:
                    continue
                slope = loglog_slope([p[0] for p in pts], [p[1] for p in pts])
                failed = sorted(r["depth"] for r in line if r["status"] == "oom")
                name = (f"{line[0]['label']} k={k}" + (f", slope {slope:.2f}" if slope is not None else "")
                        + (f" (depth ≥ {failed[0]}: over the cap)" if failed else ""))
                ax.plot(*zip(*pts), marker="o", linestyle=styles[k], color=_color(impl), label=name)
                if key in _MIN_OF:
                    _min_line(ax, line, key, impl, "depth")
        depths = sorted({r["depth"] for r in rows})
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
        ax.set_xlabel("DenseNet-BC depth")
        ax.set_ylabel(label, fontsize="small")
        ax.grid(True, which="both", alpha=0.3)
        # below the axes: inside, the legend covered densenet_fast's lowest lines
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    first = rows[0]
    cap = settings.get("mem_cap_bytes")
    title = (f"DenseNet-BC {first['size']}² batch {first['batch']} {first['dtype']} — {_where(machine)}; memory: "
             f"{_memory_method(machine)}" + (f", {cap / 1024 ** 3:.0f} GiB cap per run" if cap else "")
             + _busy_note(machine, settings, rows))
    return _finish(fig, path, title)


# -- memory budget ------------------------------------------------------------------------------------
def plot_budget(rows: Sequence[Row], machine: Dict[str, Any], settings: Dict[str, Any], path: Path) -> Optional[Path]:
    """Per implementation: largest batch under the budget, step time and images/s at that batch."""
    best: Dict[str, Row] = {}
    for r in rows:
        if r.get("max_batch") is not None:
            best.setdefault(r["impl"], r)
    if not best:
        return None
    shown = list(best.values())
    panels = [("max_batch", "max_batch_x", "largest batch under the budget", "{:.0f}"),
              ("budget_train_ms_median", None, "step time at that batch (ms): bar = median, — = min", "{:.0f}"),
              ("budget_train_img_s", "budget_img_s_x", "images/s at that batch", "{:.2f}")]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in shown)]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (key, ratio_key, label, fmt) in zip(axes[0], panels):
        values = [r.get(key) or 0 for r in shown]
        bars = ax.bar(range(len(shown)), values, color=[_color(r["impl"]) for r in shown])
        _min_markers(ax, bars, shown, key)
        for bar, r in zip(bars, shown):
            ratio = r.get(ratio_key) if ratio_key else None
            low = r.get(_MIN_OF.get(key, ""))
            text = ("—" if r.get(key) is None else fmt.format(r[key])) + (f" ({low:.0f})" if low is not None else "")
            text += f"\n{ratio:.2f}x" if ratio is not None and r["impl"] != baseline_for(r["model"]) else ""
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize="x-small", xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(shown)), [r["label"] for r in shown], rotation=35, ha="right", fontsize="x-small")
        ax.set_ylabel(label, fontsize="small")
        ax.set_ylim(0, max(values, default=1) * 1.25 or 1)
        ax.grid(True, axis="y", alpha=0.3)
    first = shown[0]
    budget = settings.get("budget_bytes") or 0
    title = (f"{first['model']} {first['size']}² {first['dtype']}: training-step peak ≤ {budget / 1024 ** 3:g} GiB "
             f"({_memory_method(machine)}) — {_where(machine)}{_busy_note(machine, settings, rows)}")
    return _finish(fig, path, title)


PLOTTERS = {"bars": plot_bars, "batch": plot_batch, "depth": plot_depth, "budget": plot_budget}


def write_figure(rows: Sequence[Row], machine: Dict[str, Any], settings: Dict[str, Any], path: Path) -> Optional[Path]:
    """Writes the run's figure (kind ``settings["figure"]``) to ``path``; None without matplotlib or data."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    return PLOTTERS[settings.get("figure") or "bars"](rows, machine, settings, Path(path))
