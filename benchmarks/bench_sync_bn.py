"""SyncBatchNorm across processes: all-reduced volume and step peak memory per rank, fused vs torchvision.

Runs ``--world`` gloo processes on the CPU (one thread each), each training step on its own batch of
``--batch`` images of ``--size``² with every norm an ``nn.SyncBatchNorm``; no DDP (the gradient all-reduce
is the same for every implementation and not counted). Implementations, each in fresh processes:

* ``dnf-sync``: ``densenet_fast.densenet121(sync_bn=True)``: the synchronised fused path (docs/design.md §13);
* ``tv-syncbn``: torchvision densenet121 + ``nn.SyncBatchNorm.convert_sync_batchnorm``. torch's SyncBatchNorm
  has no CPU kernels, so the five CUDA-only ATen kernels it calls get plain CPU implementations
  (``tests/ddp_worker.install_cpu_sync_bn_shim``): its real Python code path and collectives run; its memory
  is that of the shim's kernels;
* ``tv``: torchvision densenet121 with plain BatchNorm (per-process statistics), the memory reference: torch's
  SyncBatchNorm saves the same tensors for backward as BatchNorm (input, weight, mean, invstd, counts);
* ``dnf``: ``densenet_fast.densenet121()`` with plain BatchNorm (the fused operators): what synchronising costs.

Per implementation and rank: the step peak memory (peak RSS growth of a step after a warm-up step,
``benchmarks.measure.step_peak_memory``, with glibc's mmap threshold fixed at 128 KiB so that RSS follows the
live tensors), the median step time, and every collective of a step, counted by
wrapping ``torch.distributed.all_reduce`` / ``all_gather`` / ``all_gather_into_tensor``: calls, values and
bytes each rank contributes. Also, from the model's geometry, the channels whose statistics each side
exchanges per forward (torchvision: every SyncBatchNorm's input channels; fused: each block's input, each
layer's bottleneck and new channels, the stem).

Usage::

    python -m benchmarks.bench_sync_bn [--world 2] [--batch 2] [--size 224] [--out benchmarks/results/sync-bn]

writes ``<out>/cpu.json`` (machine, settings, every rank's row, the summary) and ``<out>/cpu.md`` (a table). Its own
folder: ``python -m benchmarks --report`` gathers the model runs of ``benchmarks/results/`` only.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running from a source checkout
    sys.path.insert(0, str(ROOT))

IMPLS = ("dnf-sync", "tv-syncbn", "tv", "dnf")

__all__ = ["IMPLS", "fused_sync_channels", "torch_sync_channels", "run"]


def torch_sync_channels(model: nn.Module) -> int:
    """Channels whose statistics torch's SyncBatchNorm exchanges per forward: every norm's input channels."""
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def fused_sync_channels(model: nn.Module) -> Dict[str, int]:
    """Channels whose statistics (forward) and merged gradient sums (backward) the synchronised fused path
    all-reduces per step: per block its input and each layer's bottleneck + new channels; the stem's input;
    in the backward also the last layer's channels (read by the transition / final norm). Transitions and the
    final norm reuse the block's statistics."""
    from densenet_fast.nn.dense_block import DenseBlock
    fwd = bwd = 0
    for m in model.modules():
        if isinstance(m, DenseBlock):
            layers = m._layers()
            c0, k, inter = layers[0].norm1.num_features, layers[0].conv2.out_channels, layers[0].conv1.out_channels
            fwd += c0 + len(layers) * (inter + k)
            bwd += c0 + len(layers) * (inter + k)
    stem = model.features.norm0.num_features
    return {"forward": fwd + stem, "backward": bwd + stem}


class _Traffic:
    """Counts the collectives of torch.distributed's Python API (SyncBatchNorm's and densenet_fast's)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_into_tensor")

    def __init__(self) -> None:
        self.calls = self.values = self.bytes = 0
        self.by_name: Dict[str, int] = {}
        self._orig = {n: getattr(dist, n) for n in self.NAMES}
        self.on = False

    def install(self) -> None:
        for name, fn in self._orig.items():
            def counting(*args, _fn=fn, _name=name, **kwargs):
                if self.on:
                    t = args[1] if _name != "all_reduce" else args[0]  # the tensor this rank contributes
                    self.calls += 1
                    self.values += t.numel()
                    self.bytes += t.numel() * t.element_size()
                    self.by_name[_name] = self.by_name.get(_name, 0) + 1
                return _fn(*args, **kwargs)
            setattr(dist, name, counting)

    def reset(self) -> None:
        self.calls = self.values = self.bytes = 0
        self.by_name = {}


def _model(impl: str) -> nn.Module:
    import torchvision

    import densenet_fast as dnf
    torch.manual_seed(0)
    ref = torchvision.models.densenet121()
    if impl == "dnf-sync":
        model = dnf.densenet121(sync_bn=True)
        model.load_state_dict(ref.state_dict())
        return model
    if impl == "tv-syncbn":
        return nn.SyncBatchNorm.convert_sync_batchnorm(ref)
    if impl == "dnf":
        model = dnf.densenet121()
        model.load_state_dict(ref.state_dict())
        return model
    return ref


def _worker(rank: int, world: int, port: int, impl: str, batch: int, size: int, repeats: int, out: str) -> None:
    from benchmarks.measure import make_inputs, step_peak_memory, train_step
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if impl == "tv-syncbn":
            sys.path.insert(0, str(ROOT / "tests"))
            from ddp_worker import install_cpu_sync_bn_shim
            install_cpu_sync_bn_shim()
        traffic = _Traffic()
        traffic.install()
        model = _model(impl).train()
        x, y = make_inputs(batch, size, 1000, torch.device("cpu"), seed=rank)
        traffic.on = True
        train_step(model, x, y)  # warm-up, and the step whose collectives are counted
        traffic.on = False
        counted = {"calls": traffic.calls, "values": traffic.values, "bytes": traffic.bytes,
                   "by_name": traffic.by_name}
        mem = step_peak_memory(lambda: train_step(model, x, y), torch.device("cpu"), warmup=1,
                               before=lambda: model.zero_grad(set_to_none=True))
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            train_step(model, x, y)
            times.append(time.perf_counter() - t0)
        row = {"impl": impl, "rank": rank, "collectives": counted, **mem, "step_median_s": statistics.median(times),
               "step_min_s": min(times)}
        if impl in ("dnf-sync", "tv-syncbn"):
            row["channels"] = (fused_sync_channels(model) if impl == "dnf-sync"
                               else {"forward": torch_sync_channels(model), "backward": torch_sync_channels(model)})
        rows: List[dict] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(rows, row)
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(world: int = 2, batch: int = 2, size: int = 224, repeats: int = 3, impls=IMPLS) -> dict:
    """Runs every implementation in ``world`` fresh processes; returns the JSON record."""
    import torch.multiprocessing as mp
    # A fixed mmap threshold (glibc): every allocation >= 128 KiB is its own mapping, returned to the OS when
    # freed, so the RSS peak follows the live tensors instead of the heap's fragmentation (the default
    # threshold grows with the first large frees and then keeps freed blocks in the heap). Read by the
    # spawned interpreters at startup; the same for every implementation.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    rows = []
    for impl in impls:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rows.json")
            mp.spawn(_worker, args=(world, _free_port(), impl, batch, size, repeats, out), nprocs=world, join=True)
            rows += json.loads(Path(out).read_text())
    by = {impl: [r for r in rows if r["impl"] == impl] for impl in impls}
    summary = {}
    if "dnf-sync" in by and "tv-syncbn" in by:
        ours, theirs = by["dnf-sync"][0], by["tv-syncbn"][0]
        summary["bytes_ratio_vs_tv_syncbn"] = ours["collectives"]["bytes"] / theirs["collectives"]["bytes"]
        summary["values_ratio_vs_tv_syncbn"] = ours["collectives"]["values"] / theirs["collectives"]["values"]
        summary["forward_channels_ratio"] = ours["channels"]["forward"] / theirs["channels"]["forward"]
        peak = lambda impl: max(r["peak_bytes"] for r in by[impl])  # noqa: E731
        summary["peak_ratio_vs_tv_syncbn"] = peak("dnf-sync") / peak("tv-syncbn")
        if "tv" in by:
            summary["peak_ratio_vs_tv"] = peak("dnf-sync") / peak("tv")
        if "dnf" in by:
            summary["peak_ratio_vs_dnf_unsynchronised"] = peak("dnf-sync") / peak("dnf")
    import torchvision

    from benchmarks.report import machine_info
    grad_bytes = sum(p.numel() * 4 for p in torchvision.models.densenet121().parameters())  # float32 gradients
    settings = {"benchmark": "sync_bn", "model": "densenet121", "world": world, "batch_per_rank": batch,
                "size": size, "threads_per_rank": 1, "backend": "gloo", "device": "cpu", "repeats": repeats,
                "param_grad_bytes": grad_bytes}
    return {"machine": machine_info(torch.device("cpu")), "settings": settings, "rows": rows, "summary": summary}


def markdown(record: dict) -> str:
    """A table of the record: per implementation the largest rank's step peak, the median step time and the
    collectives of one training step (what each rank contributes)."""
    m, st = record["machine"], record["settings"]
    lines = [f"{st['model']} {st['size']}x{st['size']}, {st['world']} processes x batch {st['batch_per_rank']} "
             f"(gloo, CPU, {st['threads_per_rank']} thread each) on {m.get('cpu_model')}, "
             f"{m.get('logical_cores')} cores (shared machine: times are noisy; load average "
             f"{', '.join(f'{v:.1f}' for v in m.get('load_average') or [])}). The step peak includes the "
             f"{st['param_grad_bytes'] / 2**20:.1f} MiB of parameter gradients the step allocates.", "",
             "| implementation | step peak / rank | step time (median) | all-reduce/gather calls | values | bytes "
             "| channels fwd + bwd |", "|---|---|---|---|---|---|---|"]
    for impl in dict.fromkeys(r["impl"] for r in record["rows"]):
        rows = [r for r in record["rows"] if r["impl"] == impl]
        c = rows[0]["collectives"]
        ch = rows[0].get("channels")
        lines.append(f"| {impl} | {max(r['peak_bytes'] for r in rows) / 2**20:.0f} MiB | "
                     f"{statistics.median(r['step_median_s'] for r in rows):.2f} s | {c['calls']} | {c['values']} | "
                     f"{c['bytes'] / 1024:.0f} KiB | {ch['forward'] + ch['backward'] if ch else '-'} |")
    lines += ["", "Summary: " + ", ".join(f"{k} {v:.3f}" for k, v in record["summary"].items()), ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="processes (ranks)")
    p.add_argument("--batch", type=int, default=2, help="batch size per rank")
    p.add_argument("--size", type=int, default=224, help="input height = width")
    p.add_argument("--repeats", type=int, default=3, help="timed steps")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated implementations")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sync-bn"), help="output file stem")
    a = p.parse_args(argv)
    record = run(a.world, a.batch, a.size, a.repeats, tuple(a.impls.split(",")))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cpu.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "cpu.md").write_text(markdown(record))
    for r in record["rows"]:
        c = r["collectives"]
        print(f"{r['impl']:10s} rank {r['rank']}: peak {r['peak_bytes'] / 2**20:8.1f} MiB  step "
              f"{r['step_median_s']:.2f} s  collectives {c['calls']:4d} calls {c['values']:8d} values "
              f"{c['bytes'] / 1024:8.1f} KiB  channels {r.get('channels')}")
    print(json.dumps(record["summary"], indent=1))


if __name__ == "__main__":
    main()
