"""Worker processes of tests/test_sync_bn.py: the fused SyncBatchNorm path over gloo on CPU.

Each rank trains, on its own (uneven) slice of a global batch, converted / densenet_fast models whose norms are
``nn.SyncBatchNorm``; rank 0 saves every rank's results for the parent process, which compares them with
one process training the unconverted torchvision model (plain BatchNorm) on the global batch. No CPU shim of
torch's SyncBatchNorm kernels is installed here: torch's own ``SyncBatchNorm`` raises on CPU tensors, so any
norm that did not take densenet_fast's synchronised path fails the run.
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
from convert_utils import randomize_bn, timm_small, tv_small  # noqa: E402

import densenet_fast as dnf  # noqa: E402
from densenet_fast.convert import convert  # noqa: E402

MODEL = dict(growth_rate=4, block_config=(2, 3), num_init_features=8, num_classes=5, bn_size=2)
MONAI = dict(spatial_dims=3, in_channels=1, out_channels=3, init_features=4, growth_rate=2, block_config=(2, 2),
             bn_size=2)
# 2-D: stem 10x10 -> pool 5x5 (odd: the transition's pool drops a row and a column) -> 2x2.
# 3-D, odd and unequal sizes: 11x9x7 -> stem 6x5x4 -> pool 3x3x2 (the transition's pool drops a plane) ->
# transition 1x1x1: a rank with batch 1 has one value per channel in the last block, which SyncBatchNorm
# accepts (the global batch has more).
INPUT = {"torchvision": (3, 20, 20), "monai3d": (1, 11, 9, 7), "timm": (3, 20, 20)}
STEPS = 2


def base_model(family: str = "torchvision") -> nn.Module:
    torch.manual_seed(0)
    if family == "torchvision":
        return randomize_bn(tv_small(torch.float64, **MODEL))
    if family == "timm":  # BatchNormAct2d norms; timm's convert_sync_batchnorm makes them SyncBatchNormAct
        return randomize_bn(timm_small(torch.float64, growth_rate=4, block_config=(2, 2), bn_size=2))
    from monai.networks.nets import DenseNet
    return randomize_bn(DenseNet(**MONAI)).double()


def global_batch(step: int, n: int, family: str = "torchvision") -> torch.Tensor:
    return torch.randn(n, *INPUT[family], dtype=torch.float64, generator=torch.Generator().manual_seed(100 + step))


def local_slice(x: torch.Tensor, batches, rank: int) -> torch.Tensor:
    start = sum(batches[:rank])
    return x[start:start + batches[rank]]


class Traffic:
    """Counts the all-reduces that go through torch.distributed.all_reduce (the synchronised path's only collective)."""

    def __init__(self):
        self.calls = self.values = 0
        self._orig = dist.all_reduce

    def __enter__(self):
        def counting(tensor, *args, **kwargs):
            self.calls += 1
            self.values += tensor.numel()
            return self._orig(tensor, *args, **kwargs)
        dist.all_reduce = counting
        return self

    def __exit__(self, *exc):
        dist.all_reduce = self._orig


def _models(family: str, base: nn.Module):
    from densenet_fast.nn.sync_batchnorm import DistributedDataParallel as DDP  # accepts CPU SyncBatchNorm
    sync = nn.SyncBatchNorm.convert_sync_batchnorm
    if family == "timm":
        from timm.layers import convert_sync_batchnorm
        return {"sync_then_convert": convert(convert_sync_batchnorm(copy.deepcopy(base))),
                "convert_then_sync": convert_sync_batchnorm(convert(copy.deepcopy(base)))}
    if family == "torchvision":
        ours = dnf.DenseNet(**MODEL, sync_bn=True).double()
    else:
        ours = dnf.DenseNet3d(**MONAI, sync_bn=True).double()
    ours.load_state_dict(base.state_dict())
    models = {
        "sync_then_convert": convert(sync(copy.deepcopy(base))),
        "convert_then_sync": sync(convert(copy.deepcopy(base))),
        "densenet_fast_sync_bn": ours,
    }
    if family == "torchvision":
        models["ddp"] = DDP(convert(sync(copy.deepcopy(base))))
        # torch.compile: the synchronised modules are graph breaks (torch.compiler.disable), the rest is traced.
        models["compiled"] = torch.compile(convert(sync(copy.deepcopy(base))), backend="aot_eager")
    return models


def subgroups(world: int):
    """Ranks of the two process groups of the ``process_group`` run (4 ranks): {0, 1} and {2, 3}."""
    return [list(range(world // 2)), list(range(world // 2, world))]


def run(rank: int, world: int, batches) -> dict:
    n_global = sum(batches)
    res = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for family in INPUT:
            for name, model in _models(family, base_model(family)).items():
                res[f"{family}/{name}"] = _train(model, name, family, rank, world, batches, n_global)
        # An empty batch on a rank: a clear error on every rank, before any collective (no hang).
        model = convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base_model())))
        try:
            model(global_batch(0, 1)[:0])
            res["empty_batch_error"] = None
        except ValueError as err:
            res["empty_batch_error"] = str(err)
        if world == 4:  # SyncBatchNorm(process_group=...): statistics shared within {0, 1} and within {2, 3}
            groups = [dist.new_group(ranks) for ranks in subgroups(world)]  # every rank creates every group
            mine = groups[rank * 2 // world]
            model = convert(nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base_model()), mine))
            res["torchvision/process_group"] = _train(model, "process_group", "torchvision", rank, world, batches,
                                                      n_global, group=mine)
    res["warnings"] = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    return res


def _train(model, name, family, rank, world, batches, n_global, group=None) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    r = {"outs": [], "grads": [], "calls": [], "values": []}
    for step in range(STEPS):
        x = local_slice(global_batch(step, n_global, family), batches, rank)
        opt.zero_grad(set_to_none=True)
        with Traffic() as traffic:
            out = model(x)
            # Each rank's share of the global loss mean over samples of out**2; DDP averages gradients over
            # ranks, so its ranks' losses are scaled by the world size.
            n_loss = n_global if group is None else sum(batches[r] for r in dist.get_process_group_ranks(group))
            loss = out.square().sum() / n_loss
            (loss * world if name == "ddp" else loss).backward()
        if name != "ddp":
            for p in model.parameters():  # the rank-summed gradient (over the norms' process group)
                dist.all_reduce(p.grad, group=group)
        r["outs"].append(out.detach().clone())
        r["grads"].append([p.grad.clone() for p in model.parameters()])
        r["calls"].append(traffic.calls)
        r["values"].append(traffic.values)
        opt.step()
    module = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    r["state"] = {k: v.clone() for k, v in module.state_dict().items()}
    module.eval()  # SyncBatchNorm in eval: running statistics, no collective
    with torch.no_grad(), Traffic() as traffic:
        r["eval_out"] = module(local_slice(global_batch(STEPS, n_global, family), batches, rank)).clone()
    r["eval_calls"] = traffic.calls
    return r


def worker(rank: int, world: int, port: int, outfile: str, batches) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = run(rank, world, batches)
        gathered = [None] * world
        dist.all_gather_object(gathered, result)
        if rank == 0:
            torch.save(gathered, outfile)
    finally:
        dist.destroy_process_group()
