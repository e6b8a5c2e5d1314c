"""Memory of MONAI's DenseNet121 with act= ReLU / LeakyReLU / PReLU and norm=, before and after convert().

Issue 28 item 6: one fresh process per (act, norm, model), CPU, float32, one training step.

Per row: the step's peak RSS growth after a warm-up step (``measure.step_peak_memory``: VmHWM reset, gradients
included, glibc's mmap threshold fixed at 128 KiB as ``benchmarks/runner.py`` fixes it) and the bytes autograd
saves for the backward (``measure.saved_tensor_bytes``), and for the converted model what ``convert()`` fused and
left alone (``dnf.conversion_report``). With LeakyReLU / PReLU ``convert()`` fuses the dense blocks (slope kernels)
and leaves the transitions and the head on MONAI's modules; with ``norm="instance"`` it leaves everything alone.

Usage::

    python -m benchmarks.bench_monai_act [--dims 2|3] [--batch N] [--size S] [--threads T]
        [--rows relu,leakyrelu,prelu,relu:instance,leakyrelu:instance] [--name cpu-2d]
        [--out benchmarks/results/monai-act]

writes ``<out>/<name>.json`` (machine, settings, rows) and ``<out>/<name>.md`` (:func:`markdown`, the table the
``monai-act:<name>`` regions of docs/medical.md show; ``benchmarks/doc_numbers.py``). Defaults: 2-D 128², batch 4
(``--name cpu-2d``); ``--dims 3``: 64³, batch 1, the three activations with batch norm (``--name cpu-3d``).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running from a source checkout
    sys.path.insert(0, str(ROOT))

ACTS = {"relu": "relu", "leakyrelu": ("leakyrelu", {"negative_slope": 0.1}), "prelu": "prelu"}
NORMS = {"batch": "batch", "instance": "instance"}  # instance: convert() leaves every block alone (for reference)
# per spatial_dims: the rows ("act" or "act:norm"), the input edge, the batch, the results name
DEFAULTS: Dict[int, Dict[str, Any]] = {
    2: {"rows": "relu,leakyrelu,prelu,relu:instance,leakyrelu:instance", "size": 128, "batch": 4, "name": "cpu-2d"},
    3: {"rows": "relu,leakyrelu,prelu", "size": 64, "batch": 1, "name": "cpu-3d"},
}
OUT = ROOT / "benchmarks" / "results" / "monai-act"

__all__ = ["ACTS", "NORMS", "DEFAULTS", "parse_rows", "run", "markdown", "main"]


def parse_rows(text: str) -> List[Tuple[str, str]]:
    """``"relu,leakyrelu:instance"`` -> ``[("relu", "batch"), ("leakyrelu", "instance")]``."""
    rows = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        act, _, norm = item.partition(":")
        norm = norm or "batch"
        if act not in ACTS or norm not in NORMS:
            raise ValueError(f"row {item!r}: expected ACT[:NORM] with ACT in {sorted(ACTS)}, NORM in {sorted(NORMS)}")
        rows.append((act, norm))
    return rows


def _act_text(act: str) -> str:
    """The ``act=`` argument as the MONAI user writes it."""
    spec = ACTS[act]
    return f'"{spec}"' if isinstance(spec, str) else f'("{spec[0]}", {json.dumps(spec[1])})'


def _worker(act: str, norm: str, convert: bool, dims: int, batch: int, size: int, threads: int) -> Dict[str, Any]:
    import torch
    from monai.networks.nets import DenseNet121

    from benchmarks.measure import saved_tensor_bytes, step_peak_memory

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2, act=ACTS[act], norm=NORMS[norm])
    row: Dict[str, Any] = {"act": act, "norm": norm, "model": "converted" if convert else "MONAI"}
    if convert:
        import densenet_fast as dnf

        dnf.convert(model, warn=False)
        r = dnf.conversion_report(model)
        row.update(blocks_fused=r.count("ConcatDenseBlock"), converted=[list(c) for c in r.converted],
                   left_alone=[list(c) for c in r.left_alone])
    x = torch.randn(batch, 1, *([size] * dims))
    y = torch.randint(0, 2, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    peak = step_peak_memory(step, torch.device("cpu"), warmup=1, before=lambda: opt.zero_grad(set_to_none=True))
    saved = saved_tensor_bytes(model, x, y)
    row.update(peak_bytes=peak["peak_bytes"], mem_method=peak["mem_method"], saved_bytes=saved["saved_bytes"],
               saved_param_bytes=saved["saved_param_bytes"],
               param_grad_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    return row


def run(dims: int, batch: int, size: int, threads: int, rows: List[Tuple[str, str]], echo: bool = True
        ) -> List[Dict[str, Any]]:
    """Every (act, norm) of ``rows``, MONAI's model then the converted one, each in a fresh interpreter."""
    from benchmarks.runner import MMAP_THRESHOLD

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)
    out = []
    for act, norm in rows:
        for conv in ("0", "1"):
            cmd = [sys.executable, "-m", "benchmarks.bench_monai_act", "--dims", str(dims), "--batch", str(batch),
                   "--size", str(size), "--threads", str(threads), "--worker", act, norm, conv]
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
            if res.returncode:
                raise RuntimeError(f"worker {act}/{norm}/{conv} failed:\n{res.stderr[-3000:]}")
            r = json.loads(res.stdout.strip().splitlines()[-1])
            out.append(r)
            if echo:
                print(f"{act:10s} {norm:8s} {r['model']:9s}  step peak {r['peak_bytes'] / 2**20:8.1f} MiB  "
                      f"saved {r['saved_bytes'] / 2**20:8.1f} MiB  {_fused_text(r) if conv == '1' else ''}",
                      flush=True)
    return out


def _fused_text(row: Dict[str, Any]) -> str:
    """What convert() fused (dense blocks, transitions, the final norm + head) and, if it fused anything, which of
    those it left on MONAI's modules."""
    def parts(entries: List[List[str]], fused: bool) -> List[str]:
        kind = (lambda name, what: what.split(" ")[0]) if fused else (lambda name, what: name.split(".")[-1])
        blocks = sum(1 for n, w in entries if kind(n, w).startswith(("ConcatDenseBlock", "denseblock")))
        trans = sum(1 for n, w in entries if kind(n, w).startswith(("Transition", "transition")))
        head = any(n == "" for n, _ in entries)
        out = [f"{blocks} dense block{'s' if blocks != 1 else ''}"] if blocks else []
        out += [f"{trans} transition{'s' if trans != 1 else ''}"] if trans else []
        return out + (["final norm + head"] if head else [])
    done = parts(row.get("converted", []), True)
    left = parts(row.get("left_alone", []), False)
    if not done:
        return "nothing"
    return ", ".join(done) + (f" (left alone: {', '.join(left)})" if left else "")


def _wrap(text: str) -> str:
    """A paragraph wrapped at 116 characters, as benchmarks/doc_numbers.py wraps its prose."""
    return textwrap.fill(text, width=116, break_on_hyphens=False, break_long_words=False)


def _pairs(data: Dict[str, Any]) -> List[Tuple[Dict[str, Any], Optional[Dict[str, Any]]]]:
    """(MONAI row, converted row or None) per (act, norm), in the run's order."""
    rows = data["rows"]
    keys = list(dict.fromkeys((r["act"], r["norm"]) for r in rows))
    pairs = []
    for key in keys:
        by = {r["model"]: r for r in rows if (r["act"], r["norm"]) == key}
        if "MONAI" in by:
            pairs.append((by["MONAI"], by.get("converted")))
    return pairs


def markdown(data: Dict[str, Any]) -> str:
    """The run's table: per (act, norm) MONAI's step peak and saved bytes, the converted model's, their ratios
    (converted / MONAI) and what ``convert()`` fused; a caption with the model, the settings and the machine."""
    from benchmarks.report import is_busy, machine_line, max_load

    m, st = data["machine"], data["settings"]
    shape = f"{st['size']}" + {2: "²", 3: "³"}.get(st["spatial_dims"], f"^{st['spatial_dims']}")
    busy = is_busy(m, st.get("load_average_start"))
    caption = (f"MONAI DenseNet121 {st['spatial_dims']}-D, 1 channel {shape}, batch {st['batch']}, float32, CPU, "
               f"memory only; measured {m.get('timestamp', '?')[:10]} on {machine_line(m)}"
               + (f"; other work loaded the machine (load up to {max_load(m, st.get('load_average_start')):.1f} "
                  f"on {m.get('logical_cores', '?')} cores)" if busy else "") + ".")
    mib = lambda v: "—" if v is None else f"{v / 2**20:.1f} MiB"  # noqa: E731

    def ratio(a: Optional[Dict[str, Any]], b: Dict[str, Any], key: str) -> str:
        return "—" if a is None or not b.get(key) else f"{a[key] / b[key]:.2f}"

    lines = [_wrap(caption), "",
             "| `act` | `norm` | MONAI step peak | converted step peak | ratio | MONAI saved | converted saved "
             "| ratio | `convert()` fused |", "|---" * 9 + "|"]
    for base, conv in _pairs(data):
        lines.append("| " + " | ".join([
            f"`{_act_text(base['act'])}`", f'`"{base["norm"]}"`', mib(base["peak_bytes"]),
            mib(conv and conv["peak_bytes"]), ratio(conv, base, "peak_bytes"), mib(base["saved_bytes"]),
            mib(conv and conv["saved_bytes"]), ratio(conv, base, "saved_bytes"),
            _fused_text(conv) if conv else "—"]) + " |")
    grads = {r.get("param_grad_bytes") for r in data["rows"]} - {None}
    note = ("Step peak: RSS growth over one SGD training step after a warm-up step (VmHWM reset), gradients included"
            + (f" (the parameter gradients alone: {mib(max(grads))})" if grads else "")
            + ", one fresh process per cell, glibc's mmap threshold fixed at 128 KiB. Saved: bytes autograd keeps "
            "for the backward. Ratios: converted / MONAI.")
    return "\n".join(lines + ["", _wrap(note)]) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    ap.add_argument("--dims", type=int, default=2, choices=sorted(DEFAULTS), help="spatial_dims (default: 2)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: 4 in 2-D, 1 in 3-D)")
    ap.add_argument("--size", type=int, default=None, help="input edge (default: 128 in 2-D, 64 in 3-D)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process (default: 2)")
    ap.add_argument("--rows", default=None,
                    help=f"comma-separated ACT[:NORM] (NORM default batch); ACT in {', '.join(ACTS)}, NORM in "
                         f"{', '.join(NORMS)} (default: {DEFAULTS[2]['rows']} in 2-D, {DEFAULTS[3]['rows']} in 3-D)")
    ap.add_argument("--name", default=None, help="results name (default: cpu-2d / cpu-3d)")
    ap.add_argument("--out", default=str(OUT), help="output folder (default: benchmarks/results/monai-act)")
    ap.add_argument("--worker", nargs=3, metavar=("ACT", "NORM", "CONVERT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    d = DEFAULTS[a.dims]
    batch, size = a.batch or d["batch"], a.size or d["size"]
    if a.worker:
        act, norm, conv = a.worker
        print(json.dumps(_worker(act, norm, conv == "1", a.dims, batch, size, a.threads)))
        return
    try:
        rows = parse_rows(a.rows or d["rows"])
    except ValueError as e:
        ap.error(str(e))
    import torch

    from benchmarks import harness
    from benchmarks.runner import MMAP_THRESHOLD

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", MMAP_THRESHOLD)  # the workers' setting, as machine_info records
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    measured = run(a.dims, batch, size, a.threads, rows)
    from benchmarks.report import machine_info

    torch.set_num_threads(a.threads)  # the workers' threads, as machine_info records them
    data = {"machine": machine_info(torch.device("cpu")),
            "settings": {"benchmark": "monai_act", "model": "monai DenseNet121", "spatial_dims": a.dims,
                         "in_channels": 1, "out_channels": 2, "batch": batch, "size": size, "threads": a.threads,
                         "dtype": "float32", "device": "cpu", "optimizer": "SGD", "warmup_steps": 1,
                         "acts": {k: ACTS[k] for k in dict.fromkeys(r[0] for r in rows)},
                         "load_average_start": load_start},
            "rows": measured}
    out = Path(a.out)
    name = a.name or d["name"]
    harness.write_json(out / f"{name}.json", data)
    (out / f"{name}.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
