"""Memory of a MONAI DenseNet121 built with ``act=`` ReLU / LeakyReLU / PReLU, before and after ``convert()``
(issue 28 item 6): one fresh process per (activation, model), CPU, float32, one training step.

Reports the step's peak RSS growth after a warm-up step (``measure.step_peak_memory``: VmHWM reset) and the
bytes autograd saves for the backward (``measure.saved_tensor_bytes``). With LeakyReLU / PReLU ``convert()``
fuses the dense blocks (slope kernels) and leaves the transitions and the head on MONAI's modules.

    python -m benchmarks.bench_monai_act [--dims 2|3] [--batch N] [--size S] [--threads T] [--norm batch|instance]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

ACTS = {"relu": "relu", "leakyrelu": ("leakyrelu", {"negative_slope": 0.1}), "prelu": "prelu"}
NORMS = {"batch": "batch", "instance": "instance"}  # instance: convert() leaves every block alone (for reference)


def _worker(act: str, convert: bool, dims: int, batch: int, size: int, threads: int, norm: str) -> dict:
    import torch
    from monai.networks.nets import DenseNet121

    from benchmarks.measure import saved_tensor_bytes, step_peak_memory

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = DenseNet121(spatial_dims=dims, in_channels=1, out_channels=2, act=ACTS[act], norm=NORMS[norm])
    report = ""
    if convert:
        import densenet_fast as dnf

        dnf.convert(model, warn=False)
        r = dnf.conversion_report(model)
        report = f"{r.count('ConcatDenseBlock')} blocks fused, {len(r.left_alone)} left alone"
    x = torch.randn(batch, 1, *([size] * dims))
    y = torch.randint(0, 2, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    peak = step_peak_memory(step, torch.device("cpu"), warmup=1, before=lambda: opt.zero_grad(set_to_none=True))
    saved = saved_tensor_bytes(model, x, y)
    return dict(act=act, convert=convert, peak_mib=peak["peak_bytes"] / 2**20,
                saved_mib=saved["saved_bytes"] / 2**20, method=peak["mem_method"], report=report)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dims", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--norm", default="batch", choices=list(NORMS))
    ap.add_argument("--acts", default=",".join(ACTS))
    ap.add_argument("--worker", nargs=2)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(_worker(a.worker[0], a.worker[1] == "1", a.dims, a.batch, a.size, a.threads, a.norm)))
        return
    rows = []
    acts = a.acts.split(",")
    for act in acts:
        for conv in ("0", "1"):
            cmd = [sys.executable, "-m", "benchmarks.bench_monai_act", "--dims", str(a.dims), "--batch", str(a.batch),
                   "--size", str(a.size), "--threads", str(a.threads), "--norm", a.norm, "--worker", act, conv]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['act']:10s} {'convert' if r['convert'] else 'MONAI  '}  step peak {r['peak_mib']:8.1f} MiB  "
                  f"saved {r['saved_mib']:8.1f} MiB  {r['report']}", flush=True)
    for act in acts:
        base, conv = [r for r in rows if r["act"] == act]
        print(f"{act:10s} converted/MONAI: step peak {conv['peak_mib'] / base['peak_mib']:.2f}, "
              f"saved {conv['saved_mib'] / base['saved_mib']:.2f}")


if __name__ == "__main__":
    main()
