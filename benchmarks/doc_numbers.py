"""The measured numbers of README.md and docs/*.md, generated from the committed results.

A Markdown file marks each generated region with a pair of comments::

    <!-- generated: NAME -->
    ...written by render()...
    <!-- end generated -->

``python -m benchmarks --report`` rewrites every region from ``benchmarks/results/`` (:data:`BLOCKS` says what
each NAME holds); ``tests/test_bench_tooling.py`` checks that the committed files equal that output, so the
text and the results cannot drift. Prose outside the regions carries no measured number.
"""
from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from benchmarks import report

__all__ = ["BLOCKS", "render", "render_file", "doc_files", "update_docs", "ROOT", "RESULTS"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# docs/design.md is the design (no measured numbers); every other Markdown file of docs/ and the README is checked.
_NOT_GENERATED = {"design.md"}
_REGION = re.compile(r"(<!-- generated: (?P<name>[\w:.-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)
HEADLINE_RUN = "readme-cpu"  # the README's headline table: densenet121 224², batch 8, CPU
GPU_RUN = "readme-gpu"  # the same on a GPU, once a run exists
_HEADLINE_IMPLS = {"float32": ("tv", "tv-memeff", "tv-compile", "dnf"), "bfloat16": ("tv", "dnf")}
_SHORT = {"tv": "torchvision", "tv-memeff": "tv memory_efficient", "tv-compile": "tv + torch.compile",
          "dnf": "**densenet_fast**"}
_DTYPE = {"float32": "fp32", "bfloat16": "bf16 autocast", "float16": "fp16 autocast"}


def doc_files(root: Path = ROOT) -> List[Path]:
    """README.md and docs/*.md (not docs/design.md)."""
    return [root / "README.md"] + sorted(p for p in (root / "docs").glob("*.md") if p.name not in _NOT_GENERATED)


def _load(name: str, results: Path) -> Dict[str, Any]:
    path = results / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"generated region needs the results file {path}, which does not exist")
    return json.loads(path.read_text())


def _run_table(name: str, results: Path) -> str:
    """``run:NAME``: the tables of ``benchmarks/results/NAME.json``, as ``python -m benchmarks`` writes them."""
    data = _load(name, results)
    return "\n".join(report.markdown_lines(data["machine"], data["settings"], data["rows"]))


def _wrap(text: str) -> str:
    """A prose paragraph wrapped at 116 characters (README lines stay under 120)."""
    return textwrap.fill(text, width=116, break_on_hyphens=False, break_long_words=False)


def _headline(results: Path) -> str:
    """``headline``: densenet121 224², batch 8: the CPU rows users compare, and the GPU row (or its absence).
    Compact cells (ratios by medians) so that every line fits 120 characters."""
    data = _load(HEADLINE_RUN, results)
    rows, machine = data["rows"], data["machine"]
    report.add_ratios(rows)
    default = any(r.get(report.DEFAULT_ALLOC_PEAK) is not None for r in rows)
    head = (["", "dtype", "Step, ms", "Eval, ms", "Step peak, MiB"]
            + (["Peak, default allocator"] if default else []) + ["Saved for backward, MiB"])

    def ms(r: Dict[str, Any], phase: str) -> str:
        med, low, ratio = r.get(f"{phase}_ms_median"), r.get(f"{phase}_ms_min"), r.get(f"{phase}_x")
        if med is None:
            return "—"
        return f"{med:.0f} ({low:.0f})" + ("" if r["impl"] == "tv" or ratio is None else f", {ratio:.2f}x")

    def mib(r: Dict[str, Any], key: str) -> str:
        value, ratio = r.get(key), r.get(f"{key}_x" if key == report.DEFAULT_ALLOC_PEAK else
                                         {"peak_bytes": "peak_x", "saved_bytes": "saved_x"}[key])
        if value is None:
            return "—"
        return f"{value / report.MIB:.0f}" + ("" if r["impl"] == "tv" or ratio is None else f", {ratio:.2f}x")

    intro = (f"densenet121, 224², batch {rows[0]['batch']}, training step (forward + loss + backward) and eval "
             f"forward. CPU: {report.machine_line(machine)}; measured {machine['timestamp'][:10]}"
             + (" while other work loaded the machine: prefer the minima" if report.is_busy(
                 machine, data["settings"].get("load_average_start")) else "") + ".")
    lines = [_wrap(intro), "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    by_key = {(r["dtype"], r["impl"]): r for r in rows}
    for dtype, impls in _HEADLINE_IMPLS.items():
        for impl in impls:
            r = by_key.get((dtype, impl))
            if r is None:
                continue
            cells = [_SHORT.get(impl, r["label"]), _DTYPE[dtype], ms(r, "train"), ms(r, "eval"), mib(r, "peak_bytes")]
            if default:
                cells.append(mib(r, report.DEFAULT_ALLOC_PEAK))
            cells.append(mib(r, "saved_bytes"))
            lines.append("| " + " | ".join(cells) + " |")
    gpu = results / f"{GPU_RUN}.json"
    if not gpu.exists():
        lines.append("| " + " | ".join(["GPU", "", "not yet measured on a GPU"] + [""] * (len(head) - 3)) + " |")
    note = ("Times: median (minimum) of interleaved repeats; ratios vs torchvision, by medians. "
            + report.memory_convention(machine)
            + (" The default-allocator column is the same step without that setting." if default else ""))
    lines += ["", _wrap(note)]
    if gpu.exists():
        lines += ["", _run_table(GPU_RUN, results)]
    return "\n".join(lines)


def _slopes(name: str, results: Path) -> str:
    """``slopes:NAME``: log-log growth of saved bytes and step peak with depth, per implementation and growth rate."""
    from benchmarks.plots import loglog_slope

    data = _load(name, results)
    rows = data["rows"]
    lines = ["| Implementation | k | saved for backward: slope | step peak: slope | deepest measured |",
             "|---|---|---|---|---|"]
    for impl in dict.fromkeys(r["impl"] for r in rows):
        for k in sorted({r["growth_rate"] for r in rows}):
            line = sorted((r for r in rows if r["impl"] == impl and r["growth_rate"] == k
                           and r.get("saved_bytes")), key=lambda r: r["depth"])
            if not line:
                continue

            def slope(key: str, line: List[Dict[str, Any]] = line) -> str:
                pts = [(r["depth"], r[key]) for r in line if r.get(key)]
                value = loglog_slope([p[0] for p in pts], [p[1] for p in pts])
                return "—" if value is None else f"{value:.2f}"
            deepest = line[-1]
            lines.append(f"| {deepest['label']} | {k} | {slope('saved_bytes')} | {slope('peak_bytes')} | depth "
                         f"{deepest['depth']}: {deepest['saved_bytes'] / report.MIB:.0f} MiB saved, "
                         f"{deepest['peak_bytes'] / report.MIB:.0f} MiB peak |")
    return "\n".join(lines + ["", "Slope of log(memory) vs log(depth) over the measured depths: 1 is linear growth, "
                                   "2 quadratic."])


def _micro(name: str, results: Path) -> str:
    """``micro:NAME``: the pytest-benchmark run ``NAME.json`` as ``python -m benchmarks.micro_report`` prints it."""
    from benchmarks import micro_report

    data = _load(name, results)
    return micro_report.to_markdown(micro_report.rows(data), micro_report.machine_text(data)).rstrip("\n")


def _sync_bn(name: str, results: Path) -> str:
    """``sync-bn:NAME``: ``benchmarks/results/sync-bn/NAME.json`` as ``benchmarks.bench_sync_bn`` writes it."""
    from benchmarks import bench_sync_bn

    return bench_sync_bn.markdown(_load(name, results / "sync-bn")).rstrip("\n")


def _monai_act(name: str, results: Path) -> str:
    """``monai-act:NAME``: ``benchmarks/results/monai-act/NAME.json`` as ``benchmarks.bench_monai_act`` writes it."""
    from benchmarks import bench_monai_act

    return bench_monai_act.markdown(_load(name, results / "monai-act")).rstrip("\n")


def _conv3x3(name: str, results: Path) -> str:
    """``conv3x3:NAME``: ``benchmarks/results/conv3x3/NAME.json`` as ``benchmarks.bench_conv3x3`` writes it."""
    from benchmarks import bench_conv3x3

    return bench_conv3x3.markdown(_load(name, results / "conv3x3")).rstrip("\n")


# NAME (before the first ':') -> generator(argument after the ':', results folder)
BLOCKS: Dict[str, Callable[[Optional[str], Path], str]] = {
    "headline": lambda arg, results: _headline(results),
    "run": _run_table,
    "slopes": _slopes,
    "micro": _micro,
    "sync-bn": _sync_bn,
    "monai-act": _monai_act,
    "conv3x3": _conv3x3,
}


def render(name: str, results: Path = RESULTS) -> str:
    """The text of region ``name`` (``kind`` or ``kind:argument``) from the results folder."""
    kind, _, arg = name.partition(":")
    if kind not in BLOCKS:
        raise ValueError(f"generated region {name!r}: unknown kind {kind!r}, expected one of {sorted(BLOCKS)}")
    return BLOCKS[kind](arg or None, results)


def render_file(text: str, results: Path = RESULTS) -> str:
    """``text`` with every generated region rewritten."""
    return _REGION.sub(lambda m: m.group(1) + render(m.group("name"), results) + "\n" + m.group(4), text)


def regions(text: str) -> List[Tuple[str, str]]:
    """(name, body) of every generated region of ``text``."""
    return [(m.group("name"), m.group("body")) for m in _REGION.finditer(text)]


def update_docs(root: Path = ROOT, results: Path = RESULTS) -> List[Path]:
    """Rewrites the generated regions of README.md and docs/*.md; returns the files that changed."""
    changed = []
    for path in doc_files(root):
        text = path.read_text()
        new = render_file(text, results)
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed
