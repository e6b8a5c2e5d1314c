"""Ratios of a pytest-benchmark JSON (``pytest benchmarks/ --benchmark-json=F``): per group, each
implementation's minimum and median time, GFLOP/s (at the minimum) where the test recorded its work, and
throughput vs the group's baseline (oneDNN's 1x1 convolution for the 1x1-stage groups, torchvision otherwise)
by minima and by medians. A test that timed several implementations interleaved itself records them in
``extra_info["interleaved"]`` ({impl: {"ms_min", "ms_median"}}); its group's rows come from there.

    python -m benchmarks.micro_report F [--markdown OUT]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple

BASELINES = ("onednn-conv1x1", "torchvision")


def _impl(bench: Dict[str, Any]) -> str:
    return bench["params"].get("impl", bench["name"])


def _row(group: str, impl: str, t_min: float, t_med: float, gflop: Optional[float],
         base: Optional[Tuple[float, float]]) -> Dict[str, Any]:
    return dict(group=group, impl=impl, min_ms=t_min * 1e3, median_ms=t_med * 1e3,
                gflops=gflop / t_min if gflop else None, vs_base=base[0] / t_min if base else None,
                vs_base_median=base[1] / t_med if base else None)


def rows(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per implementation and group: min and median ms, GFLOP/s, throughput vs the group baseline
    (by minima and by medians)."""
    groups: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    out = []
    for group, benches in groups.items():
        inter = next((b["extra_info"] for b in benches if "interleaved" in b.get("extra_info", {})), None)
        if inter is not None:
            times = {k: (v["ms_min"] / 1e3, v["ms_median"] / 1e3) for k, v in inter["interleaved"].items()}
            base = next((times[name] for name in BASELINES if name in times), None)
            out += [_row(group, k, t[0], t[1], inter.get("gflop"), base) for k, t in times.items()]
            continue
        b0 = next((b for name in BASELINES for b in benches if _impl(b) == name), None)
        base = (b0["stats"]["min"], b0["stats"]["median"]) if b0 else None
        out += [_row(group, _impl(b), b["stats"]["min"], b["stats"]["median"], b.get("extra_info", {}).get("gflop"),
                     base) for b in benches]
    return out


def to_markdown(table: List[Dict[str, Any]], machine: str) -> str:
    lines = [f"Machine: {machine}", "",
             "| group | implementation | min ms | median ms | GFLOP/s | vs baseline (min) | vs baseline (median) |",
             "|---|---|---|---|---|---|---|"]
    for r in table:
        gf = "-" if r["gflops"] is None else f"{r['gflops']:.0f}"
        vs = "-" if r["vs_base"] is None else f"{r['vs_base']:.2f}x"
        vm = "-" if r["vs_base_median"] is None else f"{r['vs_base_median']:.2f}x"
        lines.append(f"| {r['group']} | {r['impl']} | {r['min_ms']:.2f} | {r['median_ms']:.2f} | {gf} | {vs} | {vm} |")
    return "\n".join(lines) + "\n"


def machine_text(data: Dict[str, Any]) -> str:
    """The CPU of a pytest-benchmark JSON, as its ``machine_info`` records it."""
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {})
    return f"{cpu.get('brand_raw', info.get('processor', '?'))}, {cpu.get('count', '?')} CPUs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("json", help="a pytest-benchmark --benchmark-json file")
    p.add_argument("--markdown", help="also write the table here")
    args = p.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    text = to_markdown(rows(data), machine_text(data))
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
