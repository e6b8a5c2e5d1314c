"""SyncBatchNorm across processes: all-reduced volume and step peak memory per rank, fused vs torch's.

Runs ``--world`` gloo processes on the CPU (one thread each), each training step on its own batch with every
norm an ``nn.SyncBatchNorm``; no DDP (the gradient all-reduce is the same for every implementation and not
counted). Two cases (``--cases``), each implementation in fresh processes:

* ``2d``: densenet121, 2 processes x batch 2 of 3x224x224 images (``--batch``, ``--size``);
  ``dnf-sync``: ``densenet_fast.densenet121(sync_bn=True)``, the synchronised fused path (docs/design.md §13);
  ``tv-syncbn``: torchvision densenet121 + ``nn.SyncBatchNorm.convert_sync_batchnorm``; ``tv``: torchvision
  with plain BatchNorm (per-process statistics); ``dnf``: ``densenet_fast.densenet121()`` with plain BatchNorm;
* ``3d``: MONAI's DenseNet121 for volumes (``spatial_dims=3``, 1 input channel, 2 classes), 2 processes x batch 1
  of 1x64x64x64 volumes (``--batch-3d``, ``--size-3d``); ``dnf-sync``: ``densenet_fast.DenseNet3d(..., sync_bn=True)``
  with MONAI's weights; ``monai-syncbn``: MONAI + ``nn.SyncBatchNorm.convert_sync_batchnorm``; ``monai``: MONAI
  with plain BatchNorm; ``dnf``: ``DenseNet3d`` with plain BatchNorm.

torch's SyncBatchNorm has no CPU kernels, so the five CUDA-only ATen kernels it calls get plain CPU
implementations (``tests/ddp_worker.install_cpu_sync_bn_shim``, the stand-ins the tests use): its real Python
code path and collectives run; its memory is that of the stand-in kernels. The plain-BatchNorm rows are the
memory reference (torch's SyncBatchNorm saves the same tensors for backward as BatchNorm: input, weight, mean,
invstd, counts) and what synchronising costs the fused path.

Per implementation and rank: the step peak memory (peak RSS growth of a step after a warm-up step,
``benchmarks.measure.step_peak_memory``, with glibc's mmap threshold fixed at 128 KiB so that RSS follows the
live tensors), the median step time, and every collective of a step, counted by
wrapping ``torch.distributed.all_reduce`` / ``all_gather`` / ``all_gather_into_tensor``: calls, values and
bytes each rank contributes. Also, from the model's geometry, the channels whose statistics each side
exchanges per forward (torch: every SyncBatchNorm's input channels; fused: each block's input, each
layer's bottleneck and new channels, the stem).

Usage::

    python -m benchmarks.bench_sync_bn [--cases 2d,3d] [--world 2] [--batch 2] [--size 224] [--batch-3d 1]
        [--size-3d 64] [--out benchmarks/results/sync-bn]

writes ``<out>/cpu.json`` (machine, and per case its settings, every rank's row, the summary) and
``<out>/cpu.md`` (a table per case). Its own folder: ``python -m benchmarks --report`` gathers the model runs of
``benchmarks/results/`` only.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running from a source checkout
    sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

# case -> its model and input, and its implementations: the fused synchronised one, torch's SyncBatchNorm on the
# reference model, the reference model with plain BatchNorm, the fused one with plain BatchNorm.
CASES: Dict[str, dict] = {
    "2d": {"model": "densenet121", "spatial_dims": 2, "in_channels": 3, "classes": 1000, "batch": 2, "size": 224,
           "impls": ("dnf-sync", "tv-syncbn", "tv", "dnf")},
    "3d": {"model": "monai DenseNet121 (spatial_dims=3)", "spatial_dims": 3, "in_channels": 1, "classes": 2,
           "batch": 1, "size": 64, "impls": ("dnf-sync", "monai-syncbn", "monai", "dnf")},
}
IMPLS = CASES["2d"]["impls"]
_TORCH_SYNC = ("tv-syncbn", "monai-syncbn")

__all__ = ["CASES", "IMPLS", "fused_sync_channels", "torch_sync_channels", "run"]


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


def _model(case: str, impl: str) -> nn.Module:
    """The case's model for ``impl``, every implementation with the same weights (the reference model's)."""
    import densenet_fast as dnf
    torch.manual_seed(0)
    if case == "3d":
        from monai.networks.nets import DenseNet121
        c = CASES["3d"]
        ref = DenseNet121(spatial_dims=3, in_channels=c["in_channels"], out_channels=c["classes"])
        if impl in ("dnf-sync", "dnf"):
            model = dnf.DenseNet3d(3, c["in_channels"], c["classes"], sync_bn=impl == "dnf-sync")
            model.load_state_dict(ref.state_dict())
            return model
        return nn.SyncBatchNorm.convert_sync_batchnorm(ref) if impl == "monai-syncbn" else ref
    import torchvision
    ref = torchvision.models.densenet121()
    if impl in ("dnf-sync", "dnf"):
        model = dnf.densenet121(sync_bn=impl == "dnf-sync")
        model.load_state_dict(ref.state_dict())
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(ref) if impl == "tv-syncbn" else ref


def _worker(rank: int, world: int, port: int, case: str, impl: str, batch: int, size: int, repeats: int,
            warmup: int, out: str) -> None:
    from benchmarks.measure import make_inputs, step_peak_memory, time_once, train_step
    from benchmarks.timing import summarize
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        if impl in _TORCH_SYNC:
            sys.path.insert(0, str(ROOT / "tests"))
            from ddp_worker import install_cpu_sync_bn_shim
            install_cpu_sync_bn_shim()
        traffic = _Traffic()
        traffic.install()
        model = _model(case, impl).train()
        c = CASES[case]
        x, y = make_inputs(batch, size, c["classes"], torch.device("cpu"), seed=rank, spatial_dims=c["spatial_dims"],
                           in_channels=c["in_channels"])
        traffic.on = True
        train_step(model, x, y)  # warm-up, and the step whose collectives are counted
        traffic.on = False
        counted = {"calls": traffic.calls, "values": traffic.values, "bytes": traffic.bytes,
                   "by_name": traffic.by_name}
        mem = step_peak_memory(lambda: train_step(model, x, y), torch.device("cpu"), warmup=1,
                               before=lambda: model.zero_grad(set_to_none=True))
        # One implementation per set of processes, so nothing to interleave: the ranks start each step together.
        times = []
        for r in range(warmup + repeats):
            dist.barrier()
            dt = time_once(lambda: train_step(model, x, y), torch.device("cpu"))
            if r >= warmup:
                times.append(dt)
        s = summarize(times, batch)
        row = {"impl": impl, "rank": rank, "collectives": counted, **mem, "step_median_s": s["ms_median"] / 1e3,
               "step_min_s": s["ms_min"] / 1e3, "noisy": s["noisy"]}
        if impl == "dnf-sync":
            row["channels"] = fused_sync_channels(model)
        elif impl in _TORCH_SYNC:
            row["channels"] = {"forward": torch_sync_channels(model), "backward": torch_sync_channels(model)}
        if impl in ("dnf-sync",) + _TORCH_SYNC:
            row["param_grad_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
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


def run(world: int = 2, batch: int = 2, size: int = 224, repeats: int = 3, impls=None, case: str = "2d",
        warmup: int = 0) -> dict:
    """Runs every implementation of ``case`` in ``world`` fresh processes; returns the case's JSON record."""
    import torch.multiprocessing as mp
    # A fixed mmap threshold (glibc): every allocation >= 128 KiB is its own mapping, returned to the OS when
    # freed, so the RSS peak follows the live tensors instead of the heap's fragmentation (the default
    # threshold grows with the first large frees and then keeps freed blocks in the heap). Read by the
    # spawned interpreters at startup; the same for every implementation.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    impls = tuple(impls or CASES[case]["impls"])
    unknown = set(impls) - set(CASES[case]["impls"])
    if unknown:
        raise ValueError(f"impls: expected some of {CASES[case]['impls']} for case {case!r}, got {sorted(unknown)}")
    rows = []
    for impl in impls:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rows.json")
            mp.spawn(_worker, args=(world, _free_port(), case, impl, batch, size, repeats, warmup, out), nprocs=world,
                     join=True)
            rows += json.loads(Path(out).read_text())
    by = {impl: [r for r in rows if r["impl"] == impl] for impl in impls}
    summary = {}
    torch_sync, plain = CASES[case]["impls"][1:3]
    peak = lambda impl: max(r["peak_bytes"] for r in by[impl])  # noqa: E731
    if "dnf-sync" in by and torch_sync in by:
        ours, theirs = by["dnf-sync"][0], by[torch_sync][0]
        summary[f"bytes_ratio_vs_{torch_sync}"] = ours["collectives"]["bytes"] / theirs["collectives"]["bytes"]
        summary[f"values_ratio_vs_{torch_sync}"] = ours["collectives"]["values"] / theirs["collectives"]["values"]
        summary["forward_channels_ratio"] = ours["channels"]["forward"] / theirs["channels"]["forward"]
        summary[f"peak_ratio_vs_{torch_sync}"] = peak("dnf-sync") / peak(torch_sync)
    if "dnf-sync" in by and plain in by:
        summary[f"peak_ratio_vs_{plain}"] = peak("dnf-sync") / peak(plain)
    if "dnf-sync" in by and "dnf" in by:
        summary["peak_ratio_vs_dnf_unsynchronised"] = peak("dnf-sync") / peak("dnf")
    grad_bytes = next((r["param_grad_bytes"] for r in rows if "param_grad_bytes" in r), None)
    c = CASES[case]
    settings = {"benchmark": "sync_bn", "case": case, "model": c["model"], "spatial_dims": c["spatial_dims"],
                "in_channels": c["in_channels"], "world": world, "batch_per_rank": batch, "size": size,
                "threads_per_rank": 1, "backend": "gloo", "device": "cpu", "repeats": repeats, "warmup": warmup,
                "param_grad_bytes": grad_bytes}
    return {"settings": settings, "rows": rows, "summary": summary}


def _impl_rows(case: dict) -> List[dict]:
    """One row per implementation of a case: the largest rank's step peak, the median over ranks of the median
    step time, rank 0's collectives and channels."""
    out = []
    for impl in dict.fromkeys(r["impl"] for r in case["rows"]):
        rows = [r for r in case["rows"] if r["impl"] == impl]
        ch = rows[0].get("channels")
        out.append({"impl": impl, "peak_mib": max(r["peak_bytes"] for r in rows) / 2**20,
                    "step_s": statistics.median(r["step_median_s"] for r in rows),
                    "step_min_s": min(r.get("step_min_s", r["step_median_s"]) for r in rows), **rows[0]["collectives"],
                    "channels": ch["forward"] + ch["backward"] if ch else None})
    return out


COLUMNS = [("implementation", "impl", ""), ("step peak / rank", lambda r: f"{r['peak_mib']:.1f} MiB", ""),
           ("step time, median (min)", lambda r: f"{r['step_s']:.2f} ({r['step_min_s']:.2f}) s", ""),
           ("all-reduce/gather calls", "calls", "d"),
           ("values", "values", "d"), ("bytes", lambda r: f"{r['bytes'] / 1024:.0f} KiB", ""),
           ("channels fwd + bwd", "channels", "d")]


def markdown(record: dict) -> str:
    """Tables of the record: per case and implementation the largest rank's step peak, the step time (median over
    ranks of each rank's median; the smallest minimum in parentheses) and the collectives of one training step
    (what each rank contributes)."""
    from benchmarks.report import is_busy, machine_line

    m = record["machine"]
    load = m.get("load_average") or []
    lines = [f"Measured {m.get('timestamp', '?')[:10]} on {machine_line(m)}; gloo, one thread per process"
             + (f"; other work on the machine (load average {', '.join(f'{v:.1f}' for v in load)}): the times are "
                "noisy" if is_busy(m, None) else "") + "."]
    for case in record["cases"].values():
        st = case["settings"]
        shape = "x".join([str(st["size"])] * st["spatial_dims"])
        grads = st["param_grad_bytes"]
        lines += ["", f"**{st['model']}**, {st['in_channels']}x{shape}, {st['world']} processes x batch "
                  f"{st['batch_per_rank']}" + (f". The step peak includes the {grads / 2**20:.1f} MiB of parameter "
                                                f"gradients the step allocates." if grads else "."), "",
                  harness.table(_impl_rows(case), COLUMNS, markdown=True),
                  "", "Summary: " + ", ".join(f"{k} {v:.3f}" for k, v in case["summary"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = harness.parser(__doc__, repeats=3, warmup=0)
    p.add_argument("--cases", default=",".join(CASES), help="comma-separated: 2d, 3d")
    p.add_argument("--world", type=int, default=2, help="processes (ranks)")
    p.add_argument("--batch", type=int, default=CASES["2d"]["batch"], help="batch size per rank (2-D case)")
    p.add_argument("--size", type=int, default=CASES["2d"]["size"], help="input height = width (2-D case)")
    p.add_argument("--batch-3d", type=int, default=CASES["3d"]["batch"], help="batch size per rank (3-D case)")
    p.add_argument("--size-3d", type=int, default=CASES["3d"]["size"], help="volume edge (3-D case)")
    p.add_argument("--impls", default=None, help="comma-separated subset of each case's implementations")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sync-bn"), help="output folder")
    a = p.parse_args(argv)
    from benchmarks.report import machine_info
    cases = [c for c in a.cases.split(",") if c]
    for c in cases:
        if c not in CASES:
            p.error(f"--cases: expected some of {', '.join(CASES)}, got {c!r}")
    record = {"machine": machine_info(torch.device("cpu")), "cases": {}}
    for c in cases:
        batch, size = (a.batch_3d, a.size_3d) if c == "3d" else (a.batch, a.size)
        impls = [i for i in a.impls.split(",") if i in CASES[c]["impls"]] if a.impls else None
        record["cases"][c] = run(a.world, batch, size, a.repeats, impls, case=c, warmup=a.warmup)
    out = Path(a.out)
    harness.write_json(out / "cpu.json", record)
    (out / "cpu.md").write_text(markdown(record))
    for c, rec in record["cases"].items():
        for r in rec["rows"]:
            k = r["collectives"]
            print(f"{c} {r['impl']:12s} rank {r['rank']}: peak {r['peak_bytes'] / 2**20:8.1f} MiB  step "
                  f"{r['step_median_s']:.2f} s  collectives {k['calls']:4d} calls {k['values']:8d} values "
                  f"{k['bytes'] / 1024:8.1f} KiB  channels {r.get('channels')}")
        print(c, json.dumps(rec["summary"], indent=1))
        for line in harness.noisy_lines([{**r, "ms_median": r["step_median_s"] * 1e3, "ms_min": r["step_min_s"] * 1e3}
                                         for r in rec["rows"]], lambda r: f"{c} {r['impl']} rank {r['rank']}"):
            print(line)


if __name__ == "__main__":
    main()
