"""Worker processes for the DistributedDataParallel / SyncBatchNorm tests (gloo, CPU, 2 processes).

Run by tests/test_training_stack.py through ``torch.multiprocessing.spawn``; rank 0 saves its results
with ``torch.save`` for the parent process, which compares them with single-process references.

SyncBatchNorm on CPU: ``nn.SyncBatchNorm`` refuses non-GPU tensors when a process group is initialised
and the ATen kernels it calls (``batch_norm_stats``, ``batch_norm_gather_stats_with_counts``,
``batch_norm_elemt``, ``batch_norm_backward_reduce``, ``batch_norm_backward_elemt``) exist only for
CUDA. :func:`install_cpu_sync_bn_shim` registers straightforward CPU implementations of those five
kernels and lets SyncBatchNorm accept CPU tensors, **in the worker processes only**, so that the real
``nn.SyncBatchNorm`` code path (all_gather of the statistics, all_reduce in the backward) runs over gloo.
"""
from __future__ import annotations

import copy
import os
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert_utils import randomize_bn, tv_small  # noqa: E402

from densenet_fast.convert import convert  # noqa: E402

_LIBS = []


def install_cpu_sync_bn_shim():
    """Installs the shim; returns a function that undoes the SyncBatchNorm device check patch."""
    lib = torch.library.Library("aten", "IMPL")
    _LIBS.append(lib)

    def _shape(x):
        return [1, -1] + [1] * (x.dim() - 2)

    def _dims(x):
        return [d for d in range(x.dim()) if d != 1]

    def stats(x, eps):
        mean = x.mean(_dims(x))
        var = x.var(_dims(x), unbiased=False)
        return mean, (var + eps).rsqrt()

    def gather(x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts):
        counts = counts.to(mean_all.dtype).view(-1, 1)
        total = counts.sum()
        mean = (counts * mean_all).sum(0) / total
        var_all = invstd_all.pow(-2) - eps
        var = (counts * (var_all + (mean_all - mean) ** 2)).sum(0) / total
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
        if running_var is not None:
            running_var.mul_(1 - momentum).add_(var * total / (total - 1), alpha=momentum)
        return mean, (var + eps).rsqrt()

    def elemt(x, weight, bias, mean, invstd, eps):
        y = (x - mean.view(_shape(x))) * invstd.view(_shape(x))
        if weight is not None:
            y = y * weight.view(_shape(x))
        if bias is not None:
            y = y + bias.view(_shape(x))
        return y

    def backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
        sum_dy = dy.sum(_dims(x))
        sum_dy_xmu = (dy * (x - mean.view(_shape(x)))).sum(_dims(x))
        gw = sum_dy_xmu * invstd if weight_g else None
        gb = sum_dy if bias_g else None
        return sum_dy, sum_dy_xmu, gw, gb

    def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        total = count.sum().to(x.dtype)
        s = _shape(x)
        w = weight.view(s) if weight is not None else 1.0
        xmu = x - mean.view(s)
        return (dy - (sum_dy / total).view(s) - xmu * (invstd ** 2 * sum_dy_xmu / total).view(s)) * \
            invstd.view(s) * w

    lib.impl("batch_norm_stats", stats, "CPU")
    lib.impl("batch_norm_gather_stats_with_counts", gather, "CPU")
    lib.impl("batch_norm_elemt", elemt, "CPU")
    lib.impl("batch_norm_backward_reduce", backward_reduce, "CPU")
    lib.impl("batch_norm_backward_elemt", backward_elemt, "CPU")
    # SyncBatchNorm.forward accepts devices named by this function (GPU backends and the privateuse1 one).
    original = torch._C._get_privateuse1_backend_name
    torch._C._get_privateuse1_backend_name = lambda: "cpu"

    def undo():
        torch._C._get_privateuse1_backend_name = original
    return undo


def shards(seed: int, n_global: int = 4, size: int = 32, dtype=torch.float64):
    x = torch.randn(n_global, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    return x


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def run_ddp(rank: int, world: int, steps: int = 2):
    """Converted torchvision model in DDP: per-step gradients, then the final state."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    base = randomize_bn(tv_small(torch.float64))
    out = {}
    for mode in ("train", "eval"):
        model = convert(copy.deepcopy(base))
        model.train(mode == "train")
        ddp = DDP(model)
        opt = _sgd(ddp)
        out[mode] = {"grads": []}
        for step in range(steps):
            x = shards(step).chunk(world)[rank]
            opt.zero_grad(set_to_none=True)
            ddp(x).square().mean().backward()
            out[mode]["grads"].append(_grads(model))
            opt.step()
        out[mode]["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def run_sync_bn(rank: int, world: int, steps: int = 2):
    """SyncBatchNorm: converted-after-sync, sync-after-converted (densenet_fast's synchronised fused path) and
    unconverted models (torch's SyncBatchNorm through the shim), gradients averaged by hand."""
    undo = install_cpu_sync_bn_shim()
    try:
        return _run_sync_bn(rank, world, steps)
    finally:
        undo()


def _run_sync_bn(rank: int, world: int, steps: int):
    torch.manual_seed(0)
    base = randomize_bn(tv_small(torch.float64, block_config=(2, 2)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = {
            "plain": nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base)),
            "sync_then_convert": convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))),
            "convert_then_sync": nn.SyncBatchNorm.convert_sync_batchnorm(convert(copy.deepcopy(base))),
        }
        opts = {k: _sgd(m) for k, m in models.items()}
        res = {k: {"outs": [], "grads": []} for k in models}
        for step in range(steps):
            x = shards(10 + step).chunk(world)[rank]
            for k, m in models.items():
                opts[k].zero_grad(set_to_none=True)
                y = m(x)
                y.square().mean().backward()
                for p in m.parameters():  # what DDP would do: average gradients over ranks
                    dist.all_reduce(p.grad)
                    p.grad /= world
                res[k]["outs"].append(y.detach().clone())
                res[k]["grads"].append(_grads(m))
                opts[k].step()
        for k, m in models.items():
            res[k]["state"] = {n: v.clone() for n, v in m.state_dict().items()}
            res[k]["types"] = sorted({type(mod).__name__ for mod in m.modules()})
    res["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return res


def worker(rank: int, world: int, port: int, outfile: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {"ddp": run_ddp(rank, world), "sync_bn": run_sync_bn(rank, world)}
        if rank == 0:
            torch.save(result, outfile)
    finally:
        dist.destroy_process_group()
