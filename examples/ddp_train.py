"""Data-parallel training of a densenet_fast DenseNet with DistributedDataParallel (gloo on CPU, NCCL on GPUs).

    torchrun --nproc_per_node=2 examples/ddp_train.py                  # 2 CPU processes, gloo: ~15 s (2 shared cores)
    torchrun --nproc_per_node=2 examples/ddp_train.py --converted      # a converted torchvision DenseNet
    torchrun --nproc_per_node=2 examples/ddp_train.py --sync-bn        # synchronised BatchNorm, also on CPU
    torchrun --nproc_per_node=4 examples/ddp_train.py --device cuda --sync-bn --steps 100
    python examples/ddp_train.py                                        # also runs as a single process

Each process trains on its shard of a synthetic dataset (``DistributedSampler``); DDP averages the
gradients, rank 0 prints progress. BatchNorm statistics are per process, as with ``nn.BatchNorm2d``
under DDP. ``--sync-bn`` makes every norm an ``nn.SyncBatchNorm`` (``sync_bn=True``, or
``convert_sync_batchnorm`` for the converted model): the fused blocks, transitions, final norm and stem
then normalise with the statistics of the global batch, all-reduced across the processes
(docs/design.md §13), on GPUs and also on CPUs over gloo, where torch's own SyncBatchNorm does not run
(``densenet_fast.DistributedDataParallel`` is torch's DDP accepting SyncBatchNorm in a CPU module).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

try:
    import densenet_fast as dnf
except ImportError:  # running from a source checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import densenet_fast as dnf
from densenet_fast import DistributedDataParallel as DDP  # noqa: E402  (torch's DDP; also CPU SyncBatchNorm)
from densenet_fast.convert import convert  # noqa: E402


def build_model(args) -> torch.nn.Module:
    if args.converted:
        import torchvision
        model = torchvision.models.DenseNet(growth_rate=12, block_config=(6, 6, 6), num_init_features=24,
                                            num_classes=10)
        if args.sync_bn:  # before or after convert(): the same model
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return convert(model)
    return dnf.densenet_bc(depth=args.depth, growth_rate=12, num_classes=10, sync_bn=args.sync_bn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--depth", type=int, default=40, help="DenseNet-BC depth (6n+4)")
    p.add_argument("--converted", action="store_true", help="train a converted torchvision DenseNet instead")
    p.add_argument("--samples", type=int, default=128, help="synthetic dataset size")
    p.add_argument("--batch-size", type=int, default=8, help="per-process batch size")
    p.add_argument("--steps", type=int, default=6, help="optimizer steps (0: one full epoch)")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train")
    p.add_argument("--sync-bn", action="store_true", help="nn.SyncBatchNorm: global-batch statistics")
    args = p.parse_args()

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        if distributed:  # don't oversubscribe the cores: split them between the processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = build_model(args).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model

    g = torch.Generator().manual_seed(1234)  # same synthetic dataset in every process
    data = TensorDataset(torch.randn(args.samples, 3, 32, 32, generator=g), torch.randint(10, (args.samples,),
                                                                                          generator=g))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0) if distributed else None
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, shuffle=sampler is None, drop_last=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    if rank == 0:
        print(f"{world} process(es), {device}, {type(model).__name__}, global batch {args.batch_size * world}, "
              f"{torch.get_num_threads()} threads/process", flush=True)

    step, epoch, t0 = 0, 0, time.perf_counter()
    ddp.train()
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # DDP all-reduces (averages) the gradients here
            opt.step()
            step += 1
            if distributed:  # for the log only: the mean loss over processes
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= world
            if rank == 0:
                print(f"epoch {epoch} step {step:4d}  loss {loss.item():.4f}  "
                      f"{(time.perf_counter() - t0) / step:.2f} s/step", flush=True)
            if args.steps and step >= args.steps:
                break
        epoch += 1
        if not args.steps or step >= args.steps:
            break
    if distributed:
        # parameters are identical on every rank after DDP training: check it
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        same = torch.equal(flat, ref)
        # with --sync-bn the running statistics are the global batch's, the same on every rank
        stats = torch.cat([b.detach().double().flatten() for n, b in model.named_buffers() if "running" in n])
        stats_ref = stats.clone()
        dist.broadcast(stats_ref, 0)
        stats_diff = (stats - stats_ref).abs().max().item()
        if rank == 0:
            print(f"done: {step} steps; parameters identical across ranks: {same}; running statistics: max "
                  f"difference from rank 0 {stats_diff:.1e}")
        dist.destroy_process_group()
    else:
        print(f"done: {step} steps")


if __name__ == "__main__":
    main()
