"""Ratios of a pytest-benchmark JSON (``pytest benchmarks/ --benchmark-json=F``): per group, each
implementation's minimum time, GFLOP/s where the test recorded its work, and throughput vs the group's
baseline (oneDNN's 1x1 convolution for the 1x1-stage groups, torchvision otherwise).

    python -m benchmarks.micro_report F [--markdown OUT]
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from typing import Any, Dict, List

BASELINES = ("onednn-conv1x1", "torchvision")


def _impl(bench: Dict[str, Any]) -> str:
    return bench["params"].get("impl", bench["name"])


def rows(data: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per benchmark: group, impl, min seconds, GFLOP/s, throughput vs the group baseline."""
    groups: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"]].append(b)
    out = []
    for group, benches in groups.items():
        base = next((b for name in BASELINES for b in benches if _impl(b) == name), None)
        for b in benches:
            t = b["stats"]["min"]
            gflop = b.get("extra_info", {}).get("gflop")
            out.append(dict(group=group, impl=_impl(b), min_ms=t * 1e3, gflops=gflop / t if gflop else None,
                            vs_base=base["stats"]["min"] / t if base else None))
    return out


def to_markdown(table: List[Dict[str, Any]], machine: str) -> str:
    lines = [f"Machine: {machine}", "", "| group | implementation | min ms | GFLOP/s | throughput vs baseline |",
             "|---|---|---|---|---|"]
    for r in table:
        gf = "-" if r["gflops"] is None else f"{r['gflops']:.0f}"
        vs = "-" if r["vs_base"] is None else f"{r['vs_base']:.2f}x"
        lines.append(f"| {r['group']} | {r['impl']} | {r['min_ms']:.2f} | {gf} | {vs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("json", help="a pytest-benchmark --benchmark-json file")
    p.add_argument("--markdown", help="also write the table here")
    args = p.parse_args()
    with open(args.json) as f:
        data = json.load(f)
    info = data.get("machine_info", {})
    cpu = info.get("cpu", {})
    machine = f"{cpu.get('brand_raw', info.get('processor', '?'))}, {cpu.get('count', '?')} CPUs"
    text = to_markdown(rows(data), machine)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
