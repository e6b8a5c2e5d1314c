"""The PyTorch training stack around densenet_fast models and converted torchvision models.

torch.compile(fullgraph=True), CPU autocast (bfloat16), channels_last, DistributedDataParallel and
SyncBatchNorm over gloo (2 processes), gradient accumulation, zero_grad(set_to_none=True), frozen
parameters, no_grad / inference_mode, and the double-backward error.
"""
from __future__ import annotations

import copy
import socket
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from convert_utils import (
    assert_grads_close,
    assert_state_close,
    image_batch,
    pair,
    randomize_bn,
    train_steps,
    tv_small,
)
from torch import nn

import densenet_fast as dnf
from densenet_fast.convert import set_impl
from densenet_fast.ops._no_double_backward import DoubleBackwardError

torchvision = pytest.importorskip("torchvision")




# -- torch.compile -------------------------------------------------------------------------------------


@pytest.fixture
def _inductor_fresh():
    # No FX-graph / autotune caches: a cache entry compiled against an older fake kernel would be reused.
    import torch._inductor.config as cfg
    torch._dynamo.reset()
    with cfg.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compile_converted_model_training_step(_inductor_fresh):
    model, ref = pair(lambda: tv_small(growth_rate=4, block_config=(2, 2), num_init_features=8))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break raises
    x = image_batch(size=16)
    out = compiled(x)
    out.square().mean().backward()
    out_ref = ref(x)
    out_ref.square().mean().backward()
    assert rel_err(out, out_ref) < 1e-4
    assert_grads_close(model, ref, 1e-4, per_param=False)
    assert_state_close(model, ref, 1e-4)  # running stats updated once, as eager


@pytest.mark.filterwarnings("ignore:dynamo_pgo force disabled")
def test_compile_densenet_fast_model_inference(_inductor_fresh):
    model = randomize_bn(dnf.densenet_bc(depth=16, growth_rate=4)).eval()
    x = image_batch(size=16)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        assert rel_err(compiled(x), model(x)) < 1e-5


# -- autocast, channels_last ---------------------------------------------------------------------------


def test_cpu_autocast_bfloat16_matches_torchvision_precision():
    model, ref_ac = pair(tv_small)
    ref32 = copy.deepcopy(ref_ac)
    x = image_batch(n=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        out_ac = ref_ac(x)
    out32 = ref32(x)
    assert out.dtype == out_ac.dtype == torch.bfloat16
    for m, o in ((model, out), (ref_ac, out_ac), (ref32, out32)):
        o.float().square().mean().backward()
    err_tv = rel_err(out_ac, out32)  # torchvision's own bf16 error
    assert 0 < err_tv < 0.2
    # the fused blocks compute in float32: no worse than torchvision under autocast (vs float32)
    assert rel_err(out, out32) <= 1.5 * err_tv + 1e-3
    assert rel_err(out, out_ac) <= 2.5 * err_tv + 1e-3
    g, g_ac, g32 = (torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (model, ref_ac, ref32))
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert rel_err(g, g32) <= 1.5 * rel_err(g_ac, g32) + 1e-3
    assert_state_close(model, ref32, 5e-2)  # running statistics of a bf16 forward


def test_channels_last_model_and_inputs():
    model, ref = pair(tv_small)
    model.to(memory_format=torch.channels_last)
    xs = [image_batch(seed=s).contiguous(memory_format=torch.channels_last) for s in range(2)]
    train_steps([model, ref], xs, per_param=False)
    assert_state_close(model, ref, 1e-4)


# -- training-loop idioms --------------------------------------------------------------------------------


def test_gradient_accumulation_and_zero_grad_set_to_none():
    model, ref = pair(lambda: tv_small(torch.float64))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (model, ref)]
    for step in range(2):
        for m, opt in zip((model, ref), opts):
            opt.zero_grad(set_to_none=True)
            assert all(p.grad is None for p in m.parameters())
            for micro in range(2):  # two micro-batches accumulated into one step
                (m(image_batch(dtype=torch.float64, seed=10 * step + micro)).square().mean() / 2).backward()
        assert_grads_close(model, ref, 1e-8)
        for opt in opts:
            opt.step()
    assert_state_close(model, ref, 1e-9)
    # set_to_none=False: grads are zeroed in place and accumulate identically
    for m, opt in zip((model, ref), opts):
        opt.zero_grad(set_to_none=False)
        assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
        m(image_batch(dtype=torch.float64, seed=7)).sum().backward()
    assert_grads_close(model, ref, 1e-8)


@pytest.mark.parametrize("frozen", ["features", "denseblock1", "norms"])
def test_frozen_parameters(frozen):
    model, ref = pair(lambda: tv_small(torch.float64))
    for m in (model, ref):
        if frozen == "features":
            params = m.features.parameters()
        elif frozen == "denseblock1":
            params = m.features.denseblock1.parameters()
        else:
            params = [p for mod in m.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters()]
        for p in params:
            p.requires_grad_(False)
    xs = [image_batch(dtype=torch.float64, seed=s) for s in range(2)]
    trainable = [[p for p in m.parameters() if p.requires_grad] for m in (model, ref)]
    opts = [torch.optim.SGD(ps, lr=0.1) for ps in trainable]
    for x in xs:
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            m(x).square().mean().backward()
        assert_grads_close(model, ref, 1e-8)  # also: None exactly where the reference has None
        for opt in opts:
            opt.step()
    assert_state_close(model, ref, 1e-9)  # running stats still update in train mode
    # input gradient through frozen fused blocks
    xg, xr = (image_batch(dtype=torch.float64).requires_grad_() for _ in range(2))
    model(xg).sum().backward()
    ref(xr).sum().backward()
    assert rel_err(xg.grad, xr.grad) < 1e-8


def test_no_grad_and_inference_mode():
    model, ref = pair(lambda: tv_small(torch.float64))
    x = image_batch(dtype=torch.float64)
    with torch.no_grad():  # train-mode forward without autograd: batch statistics, running stats updated
        out, out_ref = model(x), ref(x)
    assert not out.requires_grad and rel_err(out, out_ref) < 1e-10
    assert_state_close(model, ref, 1e-10)
    model.eval(), ref.eval()
    with torch.inference_mode():
        out, out_ref = model(x), ref(x)
    assert out.is_inference() and rel_err(out, out_ref) < 1e-10
    with torch.no_grad():
        assert rel_err(model(x), ref(x)) < 1e-10


def test_double_backward_raises_clearly_and_reference_path_supports_it():
    model, ref = pair(lambda: tv_small(torch.float64, block_config=(2, 2)))
    x = image_batch(dtype=torch.float64).requires_grad_()
    loss = model(x).square().mean()
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)  # first order with create_graph: fine
    xr = x.detach().clone().requires_grad_()
    (gxr,) = torch.autograd.grad(ref(xr).square().mean(), xr, create_graph=True)
    assert rel_err(gx, gxr) < 1e-8
    with pytest.raises(DoubleBackwardError, match="double backward.*not supported.*set_impl"):
        gx.square().sum().backward()
    assert issubclass(DoubleBackwardError, RuntimeError)
    # the documented way out: the reference path, which torchvision's double backward matches
    for m in (model, ref):
        m.zero_grad(set_to_none=True)
    set_impl(model, "reference")
    x1, x2 = (x.detach().clone().requires_grad_() for _ in range(2))
    for m, xi in ((model, x1), (ref, x2)):
        (g,) = torch.autograd.grad(m(xi).square().mean(), xi, create_graph=True)
        g.square().sum().backward()
    assert_grads_close(model, ref, 1e-7)
    set_impl(model, "fused")


# -- DistributedDataParallel and SyncBatchNorm (2 processes, gloo) ---------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results():
    import ddp_worker
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        outfile = str(Path(tmp) / "rank0.pt")
        mp.spawn(ddp_worker.worker, args=(2, _free_port(), outfile), nprocs=2, join=True)
        return torch.load(outfile, weights_only=False)


def _single_process_ddp_reference(mode: str, steps: int = 2):
    """What DDP computes, in one process: each rank's shard through its replica (local BN statistics; rank 0's
    buffers broadcast before every forward), gradients averaged. In eval mode this is plain global-batch SGD."""
    import ddp_worker
    torch.manual_seed(0)
    model = randomize_bn(tv_small(torch.float64))  # unconverted torchvision
    model.train(mode == "train")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grads = []
    for step in range(steps):
        x = ddp_worker.shards(step)
        opt.zero_grad(set_to_none=True)
        if mode == "eval":  # no batch statistics: the global batch in one go is exactly DDP's gradient
            model(x).square().mean().backward()
        else:
            buffers0 = {k: v.clone() for k, v in model.named_buffers()}
            per_shard = []
            for shard in x.chunk(2):
                with torch.no_grad():
                    for k, v in model.named_buffers():
                        v.copy_(buffers0[k])
                model.zero_grad(set_to_none=True)
                model(shard).square().mean().backward()
                per_shard.append(([p.grad.clone() for p in model.parameters()],
                                  {k: v.clone() for k, v in model.named_buffers()}))
            with torch.no_grad():
                for k, v in model.named_buffers():
                    v.copy_(per_shard[0][1][k])  # rank 0's buffers
            for i, p in enumerate(model.parameters()):
                p.grad = (per_shard[0][0][i] + per_shard[1][0][i]) / 2
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads, model.state_dict()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_ddp_gradients_match_single_process(distributed_results, mode):
    res = distributed_results["ddp"][mode]
    grads, state = _single_process_ddp_reference(mode)
    for step, (gd, gr) in enumerate(zip(res["grads"], grads)):
        fd, fr = torch.cat([g.flatten() for g in gd]), torch.cat([g.flatten() for g in gr])
        assert rel_err(fd, fr) < 1e-9, f"step {step}: DDP gradients differ ({rel_err(fd, fr):.2e})"
    for k, v in state.items():
        if v.dtype == torch.long:
            assert torch.equal(res["state"][k], v), k
        else:
            assert rel_err(res["state"][k], v) < 1e-9, k


def test_fused_sync_batchnorm_matches_sync_batchnorm_and_global_batch(distributed_results):
    # The converted models take densenet_fast's synchronised fused path (docs/design.md §13); "plain" runs
    # torch's own nn.SyncBatchNorm (through the worker's CPU shim of its kernels).
    import ddp_worker
    res = distributed_results["sync_bn"]
    plain = res["plain"]
    assert "SyncBatchNorm" in plain["types"]
    for key in ("sync_then_convert", "convert_then_sync"):
        conv = res[key]
        assert "DenseBlock" in conv["types"] and "SyncBatchNorm" in conv["types"]
        for a, b in zip(conv["outs"], plain["outs"]):
            assert rel_err(a, b) < 1e-10, key
        for ga, gb in zip(conv["grads"], plain["grads"]):
            assert all(rel_err(x, y) < 1e-10 for x, y in zip(ga, gb)), key
        for k, v in plain["state"].items():
            assert torch.equal(conv["state"][k], v) if v.dtype == torch.long else rel_err(conv["state"][k], v) < 1e-10
    assert not any("reference path" in w for w in res["warnings"]), res["warnings"]  # fused, not the fallback
    # SyncBatchNorm semantics: one process on the global batch with plain BatchNorm gives the same numbers
    torch.manual_seed(0)
    model = randomize_bn(tv_small(torch.float64, block_config=(2, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(2):
        x = ddp_worker.shards(10 + step)
        opt.zero_grad(set_to_none=True)
        out = model(x)
        # each rank's loss is the mean over its shard; SyncBN + gradient averaging = mean over the global batch
        out.square().mean().backward()
        assert rel_err(torch.cat([plain["outs"][step], out[2:]]), out) < 1e-10
        fd = torch.cat([g.flatten() for g in plain["grads"][step]])
        fr = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert rel_err(fd, fr) < 1e-9
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(plain["state"][k], v) if v.dtype == torch.long else rel_err(plain["state"][k], v) < 1e-9, k
