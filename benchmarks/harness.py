"""The harness of the single-operation benchmark scripts (``bench_cuda_block``, ``bench_se``, ``bench_inference``,
``bench_sync_bn``): each script is its setup (which implementations, on which inputs, what a row records); the
rest lives here, once:

* the command line's shared options (:func:`parser`: description from the docstring, defaults shown,
  ``--repeats``, ``--warmup``, optionally ``--device``);
* timing: the implementations of one case interleaved by ``benchmarks.timing`` (:func:`time_impls`), the
  ``noisy`` flag turned into terminal warnings (:func:`noisy_lines`); peak memory is
  ``benchmarks.measure.step_peak_memory``;
* naming the machine (:func:`device_name`, :func:`device_tag`, :func:`cuda_device_info`,
  :func:`peak_bandwidth_gbs`);
* output: JSON files written atomically (:func:`write_json`), rows appended as they finish under a wall-clock
  budget (:class:`Recorder`, :class:`Budget`, :func:`run_row`), terminal / markdown tables (:func:`table`).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from benchmarks.timing import NOISY_RATIO, interleaved_times, summarize

__all__ = ["parser", "time_impls", "noisy_lines", "cpu_model", "device_name", "device_tag", "cuda_device_info",
           "peak_bandwidth_gbs", "env_var", "write_json", "result_path", "Recorder", "Budget", "BudgetExceeded",
           "run_row", "table", "MIB"]

MIB = 2 ** 20


# -- command line ---------------------------------------------------------------------------------------------------
def parser(doc: Optional[str], repeats: int, warmup: int, device: bool = False) -> argparse.ArgumentParser:
    """A benchmark script's argument parser: the first line of its docstring as description, every default shown,
    ``--repeats`` (timed rounds) and ``--warmup`` (untimed rounds first); ``--device`` (default: CUDA when
    available) when ``device``. The script adds its own options."""
    ap = argparse.ArgumentParser(description=(doc or "").strip().split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--repeats", type=int, default=repeats, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=warmup, help="untimed rounds first")
    if device:
        ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    return ap


# -- timing ---------------------------------------------------------------------------------------------------------
def time_impls(fns: Mapping[str, Callable[[], object]], batch: Union[int, Mapping[str, int]], repeats: int,
               warmup: int, device: torch.device,
               tick: Optional[Callable[[], None]] = None) -> Dict[str, Dict[str, Any]]:
    """Times one call of each implementation, interleaved (``benchmarks.timing.interleaved_times``).

    ``batch``: images per call (one for all, or per implementation), for images/s. Returns, per implementation,
    ``benchmarks.timing.summarize``'s fields (``ms_median, ms_min, img_s, n, noisy``) and ``error``: None, or
    ``"Type: message"`` of the exception that dropped it (the others go on)."""
    errors: Dict[str, str] = {}
    times = interleaved_times(dict(fns), repeats, warmup, device, tick,
                              on_error=lambda n, e: errors.__setitem__(n, f"{type(e).__name__}: {e}"[:2000]))
    sizes = batch if isinstance(batch, Mapping) else {n: batch for n in fns}
    return {n: {**summarize(times[n], sizes[n]), "error": errors.get(n)} for n in fns}


def noisy_lines(rows: Sequence[Mapping[str, Any]], label: Callable[[Mapping[str, Any]], str],
                median: str = "ms_median", minimum: str = "ms_min") -> List[str]:
    """``WARNING:`` lines for the rows whose timings should not be quoted (``noisy``: median > NOISY_RATIO x min);
    ``median`` / ``minimum``: the rows' keys of those times."""
    return [f"WARNING: noisy timing, {label(r)}: median {r[median]:.3g} ms is {r[median] / r[minimum]:.1f}x "
            f"the min (> {NOISY_RATIO}x: other work shared the machine); rerun before quoting it"
            for r in rows if r.get("noisy")]


# -- the machine ----------------------------------------------------------------------------------------------------
# Peak DRAM bandwidth (GB/s) by device name, when the driver reports no memory clock and bus width.
PEAK_BW_GBS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0, "H100": 3350.0,
               "A100-SXM4-80GB": 2039.0, "A100-SXM4-40GB": 1555.0, "A100 80GB PCIe": 1935.0, "A100": 1555.0,
               "L40S": 864.0, "A10": 600.0, "RTX 4090": 1008.0}


def peak_bandwidth_gbs(device: torch.device) -> Optional[float]:
    """Theoretical DRAM bandwidth of a CUDA device (GB/s), or None when unknown."""
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0) or 0
    bus_bits = getattr(props, "memory_bus_width", 0) or 0
    if clock_khz and bus_bits:
        return 2.0 * clock_khz * 1e3 * bus_bits / 8 / 1e9
    return next((v for k, v in PEAK_BW_GBS.items() if k in props.name), None)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; else what the platform module knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """What the numbers were measured on: the GPU's name, or the CPU's model and its logical cores."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {os.cpu_count()} cores"


def device_tag(device: torch.device) -> str:
    """:func:`device_name` as a file-name part (``NVIDIA_H200``)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", device_name(device)).strip("_")


def cuda_device_info(device: torch.device) -> Dict[str, Any]:
    """A CUDA device's name, compute capability, memory, SM count and peak DRAM bandwidth."""
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "capability": f"{props.major}.{props.minor}",
            "total_memory_mib": props.total_memory / MIB, "sm_count": props.multi_processor_count,
            "peak_bandwidth_gbs": peak_bandwidth_gbs(device)}


@contextlib.contextmanager
def env_var(name: str, value: Optional[str]) -> Iterator[None]:
    """Sets (or, for None, removes) an environment variable for the duration of the block."""
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


# -- output ---------------------------------------------------------------------------------------------------------
def write_json(path: Path, doc: Any) -> None:
    """Writes ``doc`` to ``path`` (folders created) through a temporary file, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    tmp.replace(path)


def result_path(folder: Path, benchmark: str, device: torch.device) -> Tuple[Path, str]:
    """``<folder>/<benchmark>_<device tag>_<UTC time>.json`` and the time stamp."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d_%H%M%S")
    return Path(folder) / f"{benchmark}_{device_tag(device)}_{stamp}.json", stamp


class Recorder:
    """Appends rows to a JSON file (``{**header, "rows": [...]}``) as they finish, so a run that is cut short
    still leaves every finished row; counts failed and skipped rows; ``echo`` prints each row."""

    def __init__(self, path: Path, header: dict, echo: bool = True):
        self.path, self.doc, self.echo = Path(path), {**header, "rows": []}, echo
        self.failed = self.skipped = 0
        self.flush()

    def flush(self) -> None:
        write_json(self.path, self.doc)

    def add(self, row: dict) -> None:
        status = row.setdefault("status", "ok")
        self.failed += status == "failed"
        self.skipped += status == "skipped"
        self.doc["rows"].append(row)
        self.flush()
        if self.echo:
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "times_s"}
            print("row", json.dumps(shown, default=str), flush=True)


class BudgetExceeded(BaseException):  # not an Exception: no per-call error handler may swallow it
    pass


class Budget:
    """Wall-clock budget: ``left()`` seconds remain; ``guard()`` interrupts a step that runs past it (SIGALRM)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        def on_alarm(signum, frame):
            raise BudgetExceeded("time budget")

        old = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)


def run_row(rec: Recorder, budget: Budget, need_s: float, base: dict, fn: Callable[[], dict],
            record: bool = True) -> Optional[dict]:
    """Runs ``fn() -> dict`` as one row (recorded as ``{**base, **result}`` unless ``record=False``) when at least
    ``need_s`` seconds are left; else, or when it runs past the budget, records a ``skipped`` row; an exception
    records a ``failed`` row. Returns the result, or None when there is none."""
    if budget.left() < need_s:
        rec.add({**base, "status": "skipped",
                 "reason": f"time budget ({budget.left():.0f} s left, ~{need_s:.0f} s needed)"})
        return None
    try:
        with budget.guard():
            result = fn()
    except BudgetExceeded:
        rec.add({**base, "status": "skipped", "reason": "time budget (interrupted)"})
        return None
    except Exception as err:  # noqa: BLE001 - one broken row must not end the run
        rec.add({**base, "status": "failed", "error": f"{type(err).__name__}: {err}"[:2000]})
        return None
    if record:
        rec.add({**base, **result})
    return result


Column = Tuple[str, Union[str, Callable[[Mapping[str, Any]], Any]], str]


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column], markdown: bool = False) -> str:
    """The rows as a table: ``columns`` are ``(header, key or function of the row, format spec)``; a None value
    shows as ``-``. Aligned text for the terminal, or a markdown table."""
    def cell(row: Mapping[str, Any], get, spec: str) -> str:
        v = get(row) if callable(get) else row.get(get)
        return "-" if v is None else format(v, spec)

    body = [[cell(r, get, spec) for _, get, spec in columns] for r in rows]
    heads = [h for h, _, _ in columns]
    if markdown:
        return "\n".join(["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
                         + ["| " + " | ".join(line) + " |" for line in body])
    widths = [max([len(h)] + [len(line[i]) for line in body]) for i, h in enumerate(heads)]
    # text (format spec "" or "...s") left-aligned, numbers right-aligned
    left = [not spec or spec.endswith("s") for _, _, spec in columns]

    def fmt(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if lf else c.rjust(w) for c, w, lf in zip(cells, widths, left)).rstrip()

    head = fmt(heads)
    return "\n".join([head, "-" * len(head)] + [fmt(line) for line in body])
