"""PNG plots of a batch-size sweep: memory and step time vs batch size, one line per implementation."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from benchmarks.report import MIB

__all__ = ["plot_sweep"]

# (row key, axis label, scale): one panel each, skipped when no row has the value.
PANELS = (("peak_bytes", "training-step peak memory (MiB)", 1 / MIB),
          ("saved_bytes", "saved for backward (MiB)", 1 / MIB),
          ("train_ms_median", "training step time, median (ms)", 1.0),
          ("eval_ms_median", "eval forward time, median (ms)", 1.0))


def plot_sweep(rows: List[Dict[str, Any]], out_dir: Path, name: str) -> List[Path]:
    """One PNG per model/size/dtype with at least two batch sizes; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")  # headless: files only
    import matplotlib.pyplot as plt

    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["size"], r["device"], r["dtype"]), []).append(r)
    paths: List[Path] = []
    for (model, size, device, dtype), group in groups.items():
        if len({r["batch"] for r in group}) < 2:
            continue
        panels = [p for p in PANELS if any(r.get(p[0]) is not None for r in group)]
        if not panels:
            continue
        cols = 2 if len(panels) > 1 else 1
        nrows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(6 * cols, 4 * nrows), squeeze=False)
        flat = list(axes.flat)
        for ax in flat[len(panels):]:
            ax.set_visible(False)
        impls = list(dict.fromkeys(r["impl"] for r in group))
        batches = sorted({r["batch"] for r in group})
        for ax, (key, label, scale) in zip(flat, panels):
            for impl in impls:
                pts = sorted((r["batch"], r[key] * scale) for r in group if r["impl"] == impl and r.get(key) is not None)
                if pts:
                    label_impl = next(r["label"] for r in group if r["impl"] == impl)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label_impl)
            ax.set_xlabel("batch size")
            ax.set_ylabel(label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(batches, [str(b) for b in batches])  # the measured batch sizes, not 2^k
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
        flat[0].legend(fontsize="small")
        fig.suptitle(f"{model} {size}x{size} {dtype} {device}")
        fig.tight_layout()
        path = out_dir / f"{name}_{model}_{size}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
