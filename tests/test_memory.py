"""The CPU kernels' mapped pool (csrc/cpu/workspace.h, docs/design.md §11): tensors that behave like any other,
bounded retention, thread safety, and the backward's input gradient taken a few samples at a time.

Memory targets (the step's peak under glibc's default allocator) live in the benchmarks
(``python -m benchmarks``: ``peak_bytes_default_alloc`` beside ``peak_bytes``), not here.
"""
from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import rel_err
from convert_utils import image_batch, randomize_bn, tv_small
from torch import nn

import densenet_fast as dnf

MIB = 2 ** 20


def _stats() -> dict:
    return json.loads(torch.ops.densenet_fast.cpu_pool_stats())


def _block_output(n: int = 4, size: int = 40, c0: int = 64) -> torch.Tensor:
    """A block buffer big enough for the pool (>= 1 MiB): [n, c0 + 2*16, size, size] float32."""
    torch.manual_seed(0)
    block = dnf.DenseBlock(2, c0, 4, 16).train()
    x = torch.randn(n, c0, size, size)
    return block(x)


def test_block_buffer_comes_from_the_pool_and_behaves_like_a_tensor():
    torch.ops.densenet_fast.cpu_pool_release()
    before = _stats()
    with torch.no_grad():
        out = _block_output()
    assert out.nbytes >= MIB and _stats()["live_bytes"] >= before["live_bytes"] + out.nbytes
    ref = out.clone()
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), ref)
    out.mul_(2).mul_(0.5)  # in place, exact
    assert torch.equal(out.contiguous(), ref.contiguous())
    shared = out.clone().share_memory_()
    assert shared.is_shared() and torch.equal(shared, ref)
    flat = out.detach().permute(0, 2, 3, 1).view(-1)  # the buffer's own storage, [rows * C]
    flat.resize_(flat.numel() * 2)  # a larger storage, through the storage's allocator (the pool's)
    assert torch.equal(flat[: ref.numel()], ref.permute(0, 2, 3, 1).reshape(-1))
    del out, flat
    assert _stats()["live_bytes"] == before["live_bytes"]


def test_pool_resident_bytes_stay_within_its_high_water_mark():
    model = randomize_bn(dnf.densenet_bc(depth=16, num_classes=5)).train()
    x = image_batch(16, size=32)
    torch.ops.densenet_fast.cpu_pool_release()
    for _ in range(3):
        model(x).sum().backward()
        s = _stats()
        assert s["live_bytes"] + s["free_bytes"] <= s["high_water_bytes"], s
    assert s["reuses"] > 0  # a second step reuses the first one's mappings
    torch.ops.densenet_fast.cpu_pool_release()
    s = _stats()
    assert s["free_bytes"] == 0 and s["high_water_bytes"] == s["live_bytes"], s


@pytest.mark.parametrize("n,size", [(1, 48), (3, 41), (8, 33)])
def test_backward_input_gradient_in_sample_chunks_matches_torchvision_fp64(n, size):
    """The 3x3 input gradient of the block's backward runs a few samples at a time (dz written over V): the
    gradients of a block stay torchvision's in float64 for any batch split, odd sizes included."""
    import torchvision

    torch.manual_seed(n)
    tv = randomize_bn(torchvision.models.densenet.DenseNet(growth_rate=32, block_config=(2,), num_init_features=64,
                                                           num_classes=3)).double().train()
    ours = dnf.convert(copy.deepcopy(tv))
    x = torch.randn(n, 3, size * 2, size * 2, dtype=torch.float64)
    for m in (tv, ours):
        m(x).square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), tv.parameters()):
        assert rel_err(a.grad, b.grad) <= 1e-9, name


def _steps(model: nn.Module, inputs) -> list:
    grads = []
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x in inputs:
        opt.zero_grad(set_to_none=True)
        model(x).logsumexp(1).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
    return grads


def test_two_models_stepping_in_two_threads_match_their_sequential_steps():
    """Two models training in two Python threads share the pool (and glibc): each gets the gradients and
    weights it gets alone."""
    torch.manual_seed(0)
    models = [dnf.convert(randomize_bn(tv_small(growth_rate=16, num_init_features=32), seed=s)).train() for s in (1, 2)]
    inputs = [[image_batch(4, size=64, seed=10 * t + i) for i in range(3)] for t in range(2)]
    alone = [_steps(copy.deepcopy(m), xs) for m, xs in zip(models, inputs)]
    results, errors = [None, None], []

    def run(t):
        try:
            results[t] = _steps(models[t], inputs[t])
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t in range(2):
        for step, (got, want) in enumerate(zip(results[t], alone[t])):
            for g, w in zip(got, want):
                assert torch.equal(g, w), (t, step)


def test_worker_records_default_allocator_peaks(tmp_path):
    """benchmarks/worker.py "memory_default": fresh child workers without the fixed mmap threshold, their peaks,
    median and spread in the record (the columns beside ``peak_bytes``)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.impls import torchvision_model
    from benchmarks.specs import get_spec
    from benchmarks.worker import default_allocator_env, run_job

    assert default_allocator_env({"MALLOC_MMAP_THRESHOLD_": "131072", "GLIBC_TUNABLES": "x", "PATH": "/bin"}) == {
        "PATH": "/bin"}
    spec = get_spec("densenet_bc16")
    torch.manual_seed(0)
    torch.save(torchvision_model(spec).state_dict(), tmp_path / "w.pt")
    job = dict(model=spec.name, impl="dnf", batch=2, size=8, device="cpu", dtype="float32", threads=1,
               weights=str(tmp_path / "w.pt"), tasks=["memory_default"], warmup=1, seed=0, default_alloc_runs=2)
    out = run_job(job)
    runs = out["peak_bytes_default_alloc_runs"]
    assert len(runs) == 2 and all(r > 0 for r in runs), out
    assert min(runs) <= out["peak_bytes_default_alloc"] <= out["peak_bytes_default_alloc_max"] == max(runs)
    assert out["peak_default_alloc_spread"] == pytest.approx((max(runs) - min(runs)) / min(runs))


def test_se_folded_reader_hands_its_input_gradient_to_the_block():
    """SE-DenseNet (gate folded into the transition / final norm): the block takes its reader's fresh input
    gradient over (dense_block_backward_inplace), as without SE: no block-sized copy at the backward's peak."""
    from densenet_fast.ops.common import handovers_taken

    model = randomize_bn(dnf.densenet_bc(depth=16, num_classes=5, se_ratio=0.5)).train()
    before = handovers_taken()  # block backward passes that took a handed-over gradient (the C++ autograd)
    model(image_batch(3, size=16)).sum().backward()
    assert handovers_taken() - before == 3  # every block: its only reader is a folded transition / final norm


_POOL_PROBE = """
import hashlib, json, torch, densenet_fast as dnf
torch.manual_seed(0)
model = dnf.densenet_bc(depth=16, num_classes=5).train()
x = torch.randn(4, 3, 40, 40)
model(x).sum().backward()
digest = hashlib.sha256(b"".join(p.grad.numpy().tobytes() for p in model.parameters())).hexdigest()
print(json.dumps({"pool": dnf.build_info()["cpu_pool"], "stats": dnf.cpu_pool_stats(), "grads": digest}))
"""


@pytest.mark.parametrize("switch", ["0", "1", ""])
def test_pool_switch_sends_tensors_to_torchs_allocator_with_identical_results(switch):
    """DNF_CPU_POOL=0 (an allocator of the user's own): no mapping is made, build_info says so, and the step's
    gradients are bitwise those of the pool (same kernels, other memory)."""
    def run(value):
        # (the timed choices pinned: a near tie can go either way in two processes, and with it the last bits)
        env = {**os.environ, "DNF_CPU_POOL": value, "DNF_CPU_GEMM": "blas", "DNF_CPU_BF16_GEMM": "fp32"}
        if dnf.build_info()["cpu_engine"]["kernels_isa"] == "avx512":
            env.update(DNF_CPU_CONV3X3="own", DNF_CPU_F32_KERNEL="1")
        out = subprocess.run([sys.executable, "-c", _POOL_PROBE], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    got, pooled = run(switch), run("1")
    on = switch != "0"
    assert got["pool"] is on and got["stats"]["enabled"] is on
    assert (got["stats"]["maps"] > 0) is on  # the block buffers are >= 1 MiB here
    assert got["grads"] == pooled["grads"]


def test_pool_switch_refuses_a_bad_value():
    out = subprocess.run([sys.executable, "-c", "import densenet_fast"], env={**os.environ, "DNF_CPU_POOL": "off"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "DNF_CPU_POOL: expected one of 1, 0 (or unset), got 'off'" in out.stderr
