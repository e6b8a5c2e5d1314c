"""Fused SyncBatchNorm (docs/design.md §13): multi-process parity with one process on the global batch, the
per-layer operators of the synchronised block, and the collectives' count and volume.

The distributed tests spawn 2 and 4 gloo processes on CPU (tests/sync_bn_worker.py) with uneven per-rank
batches, one rank holding a single sample. SyncBatchNorm's definition is the oracle: each rank's outputs,
the rank-summed gradients and the running statistics equal those of one process training the unconverted
torchvision model (plain BatchNorm) on the global batch, in float64 to 1e-9.
"""
from __future__ import annotations

import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_rel, rel_err

import densenet_fast  # noqa: F401  (registers the operators)

torchvision = pytest.importorskip("torchvision")
_ops = torch.ops.densenet_fast

WORLDS = {"2-ranks": (3, 1), "4-ranks": (2, 1, 3, 2)}  # per-rank batch sizes (uneven; a rank with batch 1)
MODELS = [f"torchvision/{m}" for m in ("sync_then_convert", "convert_then_sync", "densenet_fast_sync_bn", "ddp",
                                       "compiled")]
MODELS += [f"monai3d/{m}" for m in ("sync_then_convert", "convert_then_sync", "densenet_fast_sync_bn")]
MODELS += [f"timm/{m}" for m in ("sync_then_convert", "convert_then_sync")]
TOL = 1e-9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", params=list(WORLDS))
def dist_run(request):
    import sync_bn_worker
    import torch.multiprocessing as mp
    batches = WORLDS[request.param]
    with tempfile.TemporaryDirectory() as tmp:
        outfile = str(Path(tmp) / "ranks.pt")
        mp.spawn(sync_bn_worker.worker, args=(len(batches), _free_port(), outfile, batches), nprocs=len(batches),
                 join=True)
        return batches, torch.load(outfile, weights_only=False)


@pytest.fixture(scope="module")
def reference():
    """One process, unconverted torchvision model with plain BatchNorm, on the global batch of every step."""
    import sync_bn_worker as w

    def run(family: str, n_global: int, lo: int = 0, hi=None):
        """Trains on samples [lo, hi) of each step's global batch (hi=None: all)."""
        hi = n_global if hi is None else hi
        model = w.base_model(family)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        outs, grads = [], []
        for step in range(w.STEPS):
            opt.zero_grad(set_to_none=True)
            out = model(w.global_batch(step, n_global, family)[lo:hi])
            (out.square().sum() / (hi - lo)).backward()
            outs.append(out.detach().clone())
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        model.eval()
        with torch.no_grad():
            eval_out = model(w.global_batch(w.STEPS, n_global, family)[lo:hi])
        return {"outs": outs, "grads": grads, "state": state, "eval_out": eval_out,
                "names": [n for n, _ in model.named_parameters()]}
    cache = {}
    def get(*key):
        if key not in cache:
            cache[key] = run(*key)
        return cache[key]
    return get


@pytest.mark.parametrize("name", MODELS)
def test_each_rank_matches_one_process_on_the_global_batch(dist_run, reference, name):
    import sync_bn_worker as w
    batches, ranks = dist_run
    ref = reference(name.split("/")[0], sum(batches))
    for rank, res in enumerate(ranks):
        r = res[name]
        for step in range(w.STEPS):
            want = w.local_slice(ref["outs"][step], batches, rank)
            assert_close_rel(r["outs"][step], want, TOL, f"rank {rank} step {step} output")
            # Each gradient relative to its own magnitude, floored at 1e-6 of the model's largest: the stem norm's
            # gradients are analytically ~0 where every reader of its output is a training-mode BatchNorm
            # (MONAI's 3-D stem here), and then pure roundoff in both computations.
            top = max(g.abs().max().item() for g in ref["grads"][step])
            for pname, g, g_ref in zip(ref["names"], r["grads"][step], ref["grads"][step]):
                err = (g - g_ref).abs().max().item() / max(g_ref.abs().max().item(), 1e-6 * top)
                assert err <= TOL, f"rank {rank} step {step} rank-summed grad {pname}: relative error {err:.3e}"
        for key, v in ref["state"].items():  # running statistics (and parameters after two SGD steps)
            if v.dtype == torch.long:
                assert torch.equal(r["state"][key], v), f"rank {rank} {key}"
            else:
                assert_close_rel(r["state"][key], v, TOL, f"rank {rank} {key}")
        assert_close_rel(r["eval_out"], w.local_slice(ref["eval_out"], batches, rank), TOL, f"rank {rank} eval")
        assert r["eval_calls"] == 0  # eval: running statistics, no collective


def test_process_group_is_honoured(dist_run, reference):
    # 4 ranks, norms synchronised within {0, 1} and within {2, 3}: each half equals one process on its half of
    # the global batch (the other half's samples never enter its statistics).
    import sync_bn_worker as w
    batches, ranks = dist_run
    if len(batches) != 4:
        pytest.skip("the process_group run uses 4 ranks")
    for members in w.subgroups(4):
        lo, hi = sum(batches[:members[0]]), sum(batches[:members[-1] + 1])
        ref = reference("torchvision", sum(batches), lo, hi)
        sub = [batches[r] for r in members]
        for i, rank in enumerate(members):
            r = ranks[rank]["torchvision/process_group"]
            for step in range(w.STEPS):
                assert_close_rel(r["outs"][step], w.local_slice(ref["outs"][step], sub, i), TOL, f"rank {rank} out")
                for pname, g, g_ref in zip(ref["names"], r["grads"][step], ref["grads"][step]):
                    assert_close_rel(g, g_ref, TOL, f"rank {rank} step {step} grad {pname}")
            for key, v in ref["state"].items():
                if v.dtype != torch.long:
                    assert_close_rel(r["state"][key], v, TOL, f"rank {rank} {key}")


def _expected_traffic(batches_unused=None):
    """(all-reduce calls, values) per training step of the worker's model, counted from its geometry: per block,
    one all-reduce of the input's (Σx, Σx²) and count, then per layer the bottleneck's and the new channels';
    in the backward per layer the BN2 sums and the merged (S1, S2) of the channels it wrote (the last layer's
    because the transition / final norm read them), and the input's. The stem: its statistics and their
    gradient. Transitions and the final norm use the block's statistics: no collective of their own."""
    import sync_bn_worker as w
    k, inter = w.MODEL["growth_rate"], w.MODEL["bn_size"] * w.MODEL["growth_rate"]
    c0 = w.MODEL["num_init_features"]
    calls, values = 2, (2 * c0 + 1) + 2 * c0  # stem
    for L in w.MODEL["block_config"]:
        calls += (1 + 2 * L) + (2 * L + 1)
        values += (2 * c0 + 1 + 2 * L * (inter + k)) + (2 * L * (inter + k) + 2 * c0)
        c0 = (c0 + L * k) // 2
    return calls, values


def test_collectives_are_per_layer_and_linear_in_depth(dist_run):
    batches, ranks = dist_run
    calls, values = _expected_traffic()
    for res in ranks:
        for name in ("sync_then_convert", "convert_then_sync", "densenet_fast_sync_bn", "ddp", "compiled"):
            assert res[f"torchvision/{name}"]["calls"] == [calls] * 2, name
            assert res[f"torchvision/{name}"]["values"] == [values] * 2, name


def test_empty_batch_on_a_rank_is_a_clear_error(dist_run):
    _, ranks = dist_run
    for res in ranks:
        assert res["empty_batch_error"] is not None and "expected a non-empty batch on every rank" in \
            res["empty_batch_error"], res["empty_batch_error"]


def test_no_reference_path_fallback(dist_run):
    _, ranks = dist_run
    for res in ranks:
        assert not [m for m in res["warnings"] if "reference" in m], res["warnings"]


# -- the per-layer operators (single process) -------------------------------------------------------------


def _buffer(n, ct, spatial, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ct, *spatial, dtype=dtype, generator=g) * 1.5 + 0.3
    return x.contiguous(memory_format=torch.channels_last_3d if len(spatial) == 3 else torch.channels_last)


def _layer_args(c, inter, dims, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(c, dtype=dtype, generator=g) * 0.2
    var = torch.rand(c, dtype=dtype, generator=g) + 0.5
    weight = torch.rand(c, dtype=dtype, generator=g) + 0.5
    bias = torch.randn(c, dtype=dtype, generator=g) * 0.3
    conv = torch.randn(inter, c, *([1] * dims), dtype=dtype, generator=g) / c ** 0.5
    return mean, var, weight, bias, conv


SHAPES = [((3, 11, (5, 7)), 6, 7), ((1, 9, (3, 1, 5)), 9, 5), ((2, 13, (4, 3)), 1, 3)]  # (buffer, channels, inter)


def _reference_bottleneck(buf, c, mean, var, weight, bias, conv, eps):
    """torch's own BatchNorm (eval, given statistics) -> ReLU -> 1x1 convolution."""
    u = torch.relu(F.batch_norm(buf[:, :c], mean, var, weight, bias, False, 0.0, eps))
    return F.conv3d(u, conv) if buf.dim() == 5 else F.conv2d(u, conv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_block_layer_bottleneck_matches_torch(shape, dtype):
    (n, ct, spatial), c, inter = shape
    buf = _buffer(n, ct, spatial, dtype)
    args = _layer_args(c, inter, len(spatial), dtype)
    y = _ops.block_layer_bottleneck(buf, c, *args, 1e-5)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert_close_rel(y, _reference_bottleneck(buf, c, *args, 1e-5), tol, "Y")
    fmt = torch.channels_last_3d if len(spatial) == 3 else torch.channels_last
    assert y.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_block_layer_bottleneck_backward_matches_autograd(shape, dtype):
    (n, ct, spatial), c, inter = shape
    buf = _buffer(n, ct, spatial, dtype)
    mean, var, weight, bias, conv = _layer_args(c, inter, len(spatial), dtype)
    dy = _buffer(n, inter, spatial, dtype, seed=5)
    g0 = _buffer(n, ct, spatial, dtype, seed=6)
    G = g0.clone(memory_format=torch.channels_last_3d if len(spatial) == 3 else torch.channels_last)
    dw, s1, s2 = _ops.block_layer_bottleneck_backward(dy, buf, c, mean, var, weight, bias, conv, 1e-5, G)
    # torch autograd with constant statistics: d/dx, d/dconv, d/dbias (= Σ dU), d/dweight (= Σ dU·x̂)
    xr = buf.clone().requires_grad_()
    wr, br, cr = weight.clone().requires_grad_(), bias.clone().requires_grad_(), conv.clone().requires_grad_()
    _reference_bottleneck(xr, c, mean, var, wr, br, cr, 1e-5).backward(dy)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    assert_close_rel(G[:, :c], g0[:, :c] + xr.grad[:, :c], tol, "grad_buffer[:, :c]")
    assert torch.equal(G[:, c:], g0[:, c:])  # columns the layer does not read are untouched
    assert_close_rel(dw, cr.grad, tol, "grad_conv_weight")
    assert_close_rel(s1, br.grad, tol, "sum_du")
    assert_close_rel(s2, wr.grad, tol, "sum_du_xhat")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_sums_of_a_buffer_slice(dtype):
    buf = _buffer(3, 10, (5, 3), dtype) + 100.0  # large mean: the squares' float64 sums stay exact
    sl = buf[:, 4:7]
    s = _ops.channel_sums(sl)
    want = torch.stack([sl.double().sum((0, 2, 3)), sl.double().square().sum((0, 2, 3))])
    assert s.dtype == torch.float64
    assert_close_rel(s, want, 1e-14, "channel sums")
    nchw = buf.contiguous()[:, 4:7]  # not a row layout: read through a copy
    assert_close_rel(_ops.channel_sums(nchw), want, 1e-14, "channel sums (NCHW)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("spatial", [(5, 3), (3, 1, 5)], ids=["2d", "3d"])
def test_channel_sums_with_other(dtype, spatial):
    # Σx and Σx·other (the BN2 backward's Σdz, Σdz·x̂), float64 accumulation, slices of two buffers read in place.
    a = _buffer(3, 10, spatial, dtype)[:, 2:9]
    b = _buffer(3, 8, spatial, dtype, seed=4)[:, 1:8]
    dims = [0] + list(range(2, a.dim()))
    want = torch.stack([a.double().sum(dims), (a.double() * b.double()).sum(dims)])
    got = _ops.channel_sums(a, b)
    assert got.dtype == torch.float64 and got.shape == (2, 7)
    assert_close_rel(got, want, 1e-14, "channel sums with other")
    assert_close_rel(_ops.channel_sums(a.contiguous(), b.contiguous()), want, 1e-14, "NCHW copies")
    assert torch.equal(_ops.channel_sums(a, None), _ops.channel_sums(a))
    with pytest.raises(RuntimeError, match=r"other: expected shape \[3, 7, "):
        _ops.channel_sums(a, b[:, :6])
    with pytest.raises(RuntimeError, match=r"other: expected dtype"):
        _ops.channel_sums(a, b.to(torch.float16))


def test_composites_match_cpu_kernels():
    # The ATen composites serve as the CUDA kernels of the three operators: same results as the C++ CPU ones.
    from densenet_fast.ops import sync_block as sb
    buf = _buffer(2, 11, (5, 4), torch.float64)
    args = _layer_args(7, 5, 2, torch.float64)
    assert_close_rel(sb.bottleneck_composite(buf, 7, *args, 1e-5), _ops.block_layer_bottleneck(buf, 7, *args, 1e-5),
                     1e-13, "bottleneck")
    dy = _buffer(2, 5, (5, 4), torch.float64, seed=3)
    G1, G2 = torch.zeros_like(buf), torch.zeros_like(buf)
    a = sb.bottleneck_backward_composite(dy, buf, 7, *args, 1e-5, G1)
    b = _ops.block_layer_bottleneck_backward(dy, buf, 7, *args, 1e-5, G2)
    for x, y, what in zip((*a, G1), (*b, G2), ("dw", "sum_du", "sum_du_xhat", "grad_buffer")):
        assert_close_rel(x, y, 1e-12, what)
    assert_close_rel(sb.channel_sums_composite(buf[:, 2:5]), _ops.channel_sums(buf[:, 2:5]), 1e-14, "sums")
    assert_close_rel(sb.channel_sums_composite(buf[:, 2:5], buf[:, 6:9]), _ops.channel_sums(buf[:, 2:5], buf[:, 6:9]),
                     1e-14, "sums with other")


@pytest.mark.parametrize("op", ["block_layer_bottleneck", "block_layer_bottleneck_backward", "channel_sums",
                                "channel_sums_other"])
def test_opcheck(op):
    buf = _buffer(2, 9, (3, 5), torch.float64)
    args = _layer_args(6, 4, 2, torch.float64)
    if op == "channel_sums":
        call = (buf,)
    elif op == "channel_sums_other":
        op, call = "channel_sums", (buf, _buffer(2, 9, (3, 5), torch.float64, seed=3))
    elif op == "block_layer_bottleneck":
        call = (buf, 6, *args, 1e-5)
    else:
        call = (_buffer(2, 4, (3, 5), torch.float64, 2), buf, 6, *args, 1e-5, torch.zeros_like(buf))
    torch.library.opcheck(getattr(_ops, op).default, call, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("bad, match", [
    (dict(channels=0), r"channels: expected a value in \[1, 9\].*got 0"),
    (dict(channels=10), r"channels: expected a value in \[1, 9\].*got 10"),
    (dict(mean=torch.zeros(5, dtype=torch.float64)), r"mean: expected shape \[6\], got \[5\]"),
    (dict(var=torch.ones(6, dtype=torch.float32)), r"var: expected dtype Double"),
    (dict(conv=torch.zeros(4, 6, 3, 3, dtype=torch.float64)), r"conv_weight: expected shape \[4, 6, 1, 1\]"),
    (dict(eps=0.0), r"eps: expected a positive value, got 0"),
    (dict(buf=torch.zeros(2, 9, 3, 5, dtype=torch.float16)), r"buffer: expected dtype float32 or float64"),
])
def test_bad_layer_arguments_name_the_argument(bad, match):
    buf = bad.get("buf", _buffer(2, 9, (3, 5), torch.float64))
    mean, var, weight, bias, conv = _layer_args(6, 4, 2, torch.float64)
    mean, var, conv = bad.get("mean", mean), bad.get("var", var), bad.get("conv", conv)
    with pytest.raises(RuntimeError, match=match):
        _ops.block_layer_bottleneck(buf, bad.get("channels", 6), mean, var, weight, bias, conv, bad.get("eps", 1e-5))


def test_grad_buffer_must_be_channels_last():
    buf = _buffer(2, 9, (3, 5), torch.float64)
    args = _layer_args(6, 4, 2, torch.float64)
    dy = _buffer(2, 4, (3, 5), torch.float64, 2)
    with pytest.raises(RuntimeError, match=r"grad_buffer: expected a channels_last contiguous tensor"):
        _ops.block_layer_bottleneck_backward(dy, buf, 6, *args, 1e-5, torch.zeros(2, 9, 3, 5, dtype=torch.float64))


def test_sync_models_without_process_group_run_the_plain_fused_path():
    # SyncBatchNorm without an initialised process group is plain BatchNorm: the fused kernels, no warning.
    import copy
    import warnings

    from convert_utils import randomize_bn, train_steps, tv_small

    import densenet_fast as dnf
    base = randomize_bn(tv_small(torch.float64))
    ref = copy.deepcopy(base)
    model = dnf.convert(torch.nn.SyncBatchNorm.convert_sync_batchnorm(base))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train_steps([model, ref], [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(2)],
                    tol_out=1e-10, tol_grad=1e-9)
    assert rel_err(model.features.norm5.running_var, ref.features.norm5.running_var) < 1e-10


# -- the synchronised block in one process (a one-rank group: the collectives are identities) -------------


@pytest.fixture
def one_rank_group():
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("spatial", [(5, 7), (3, 4, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("drop_rate", [0.0, 0.3])
def test_sync_block_equals_fused_block_in_one_process(one_rank_group, spatial, drop_rate):
    # One rank: SyncBatchNorm's statistics are the batch's, so the synchronised block (Python loop, per-layer
    # operators) must give the fused operator's results, including dropout with the same mask.
    from densenet_fast.ops import BlockParams, fused_dense_block
    from densenet_fast.ops.sync_block import sync_dense_block
    dims = len(spatial)
    g = torch.Generator().manual_seed(7)
    L, c0, k, inter = 3, 5, 3, 4
    p = [[], [], [], [], [], [], [], [], [], []]
    for i in range(L):
        c = c0 + i * k
        p[0].append(torch.rand(c, dtype=torch.float64, generator=g) + 0.5)
        p[1].append(torch.randn(c, dtype=torch.float64, generator=g) * 0.2)
        p[2].append(torch.randn(inter, c, *[1] * dims, dtype=torch.float64, generator=g) / c ** 0.5)
        p[3].append(torch.rand(inter, dtype=torch.float64, generator=g) + 0.5)
        p[4].append(torch.randn(inter, dtype=torch.float64, generator=g) * 0.2)
        p[5].append(torch.randn(k, inter, *[3] * dims, dtype=torch.float64, generator=g) / (9 * inter) ** 0.5)
        p[6].append(torch.zeros(c, dtype=torch.float64))
        p[7].append(torch.ones(c, dtype=torch.float64))
        p[8].append(torch.zeros(inter, dtype=torch.float64))
        p[9].append(torch.ones(inter, dtype=torch.float64))
    x = torch.randn(2, c0, *spatial, dtype=torch.float64, generator=g)
    mask = (torch.rand(2, L * k, *spatial, generator=g) > drop_rate) if drop_rate else None
    runs = []
    for fn in ("fused", "sync"):
        params = BlockParams(*[[t.clone().requires_grad_(i < 6) for t in ts] for i, ts in enumerate(p)])
        xi = x.clone().requires_grad_()
        if fn == "fused":
            out = fused_dense_block(xi, params, training=True, drop_rate=drop_rate, dropout_mask=mask)
        else:
            out = sync_dense_block(xi, params, group=one_rank_group, drop_rate=drop_rate, dropout_mask=mask)
            assert out.count == x.numel() // c0
        w = torch.randn(out.buffer.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        (out.buffer * w).sum().backward()
        runs.append((out, xi.grad, [t.grad for ts in params[:6] for t in ts]))
    (fo, fdx, fgrads), (so, sdx, sgrads) = runs
    for name in ("buffer", "mean", "var", "mean2", "var2"):
        assert_close_rel(getattr(so, name), getattr(fo, name), 1e-12, name)
    assert_close_rel(sdx, fdx, 1e-11, "grad input")
    for i, (a, b) in enumerate(zip(sgrads, fgrads)):
        assert_close_rel(a, b, 1e-11, f"param grad {i}")


def test_sync_block_refuses_half_precision(one_rank_group):
    from densenet_fast.ops import BlockParams
    from densenet_fast.ops.sync_block import sync_dense_block
    x = torch.randn(2, 4, 5, 5, dtype=torch.bfloat16)
    p = BlockParams([torch.ones(4)], [torch.zeros(4)], [torch.randn(4, 4, 1, 1, dtype=torch.bfloat16)], [torch.ones(4)],
                    [torch.zeros(4)], [torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)], [torch.zeros(4)],
                    [torch.ones(4)], [torch.zeros(4)], [torch.ones(4)])
    with pytest.raises(RuntimeError, match=r"input: the synchronised block computes in float32 or float64, got "
                                           r"torch.bfloat16"):
        sync_dense_block(x, p, group=one_rank_group)


@pytest.mark.parametrize("kind", ["transition", "norm_relu_pool", "stem", "bn"])
def test_bn_reader_gradients_through_its_statistics(kind):
    # A reader fed with differentiable batch statistics (torch's own mean/var of x) must give training-mode
    # BatchNorm's gradients: its dmean/dvar carry the statistics' terms that its eval-mode kernel leaves out.
    from densenet_fast.ops.sync_stats import bn_reader
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 6, 9, 7, dtype=torch.float64, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.rand(6, dtype=torch.float64, generator=g) + 0.5
    b = torch.randn(6, dtype=torch.float64, generator=g) * 0.3
    cw = torch.randn(4, 6, 1, 1, dtype=torch.float64, generator=g) if kind == "transition" else None

    def torch_reader(xi, wi, bi, ci):
        u = F.batch_norm(xi, None, None, wi, bi, True, 0.0, 1e-5)
        if kind == "bn":
            return u
        u = torch.relu(u)
        if kind == "transition":
            return F.avg_pool2d(F.conv2d(u, ci), 2)
        if kind == "stem":
            return F.max_pool2d(u, 3, 2, 1)
        return u.mean((2, 3))

    results = []
    for ours in (True, False):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        ci = cw.clone().requires_grad_() if cw is not None else None
        if ours:
            mean, var = xi.mean((0, 2, 3)), xi.var((0, 2, 3), unbiased=False)
            out = bn_reader(kind, xi, mean, var, wi, bi, ci, eps=1e-5)
        else:
            out = torch_reader(xi, wi, bi, ci)
        (out * torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))).sum().backward()
        results.append([out] + [t.grad for t in (xi, wi, bi, ci) if t is not None])
    for name, a, e in zip(("out", "dx", "dweight", "dbias", "dconv"), *results):
        assert_close_rel(a, e, 1e-10, f"{kind} {name}")


def _torch_training_reader(kind, xi, wi, bi, ci):
    """torch's training-mode BatchNorm (batch statistics) followed by the reader's ReLU / pooling / convolution."""
    u = F.batch_norm(xi, None, None, wi, bi, True, 0.0, 1e-5)
    if kind == "bn":
        return u
    u = torch.relu(u)
    three_d = xi.dim() == 5
    if kind == "transition":
        return F.avg_pool3d(F.conv3d(u, ci), 2) if three_d else F.avg_pool2d(F.conv2d(u, ci), 2)
    if kind == "stem":
        return F.max_pool3d(u, 3, 2, 1) if three_d else F.max_pool2d(u, 3, 2, 1)
    return u.mean(tuple(range(2, xi.dim())))


@pytest.mark.parametrize("spatial", [(9, 7), (5, 3, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("kind", ["transition", "norm_relu_pool", "stem", "bn"])
def test_sync_bn_reader_is_training_batch_norm(one_rank_group, kind, spatial):
    # The reader that computes its own synchronised statistics (stem, lone SyncBatchNorm): in a one-rank group its
    # statistics are the batch's, so output and every gradient are training-mode BatchNorm's; running statistics
    # are fed from the returned global mean/var.
    from densenet_fast.ops.sync_stats import sync_bn_reader
    g = torch.Generator().manual_seed(12)
    fmt = torch.channels_last_3d if len(spatial) == 3 else torch.channels_last
    x = torch.randn(3, 6, *spatial, dtype=torch.float64, generator=g).contiguous(memory_format=fmt) * 1.3 + 0.4
    w = torch.rand(6, dtype=torch.float64, generator=g) + 0.5
    b = torch.randn(6, dtype=torch.float64, generator=g) * 0.3
    cw = torch.randn(4, 6, *[1] * len(spatial), dtype=torch.float64, generator=g) if kind == "transition" else None
    results = []
    for ours in (True, False):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, w, b))
        ci = cw.clone().requires_grad_() if cw is not None else None
        if ours:
            out, mean, var, count = sync_bn_reader(kind, xi, wi, bi, ci, group=one_rank_group, eps=1e-5)
            assert count == x.numel() // 6 and not mean.requires_grad
            dims = [0] + list(range(2, x.dim()))
            assert_close_rel(mean, x.mean(dims), 1e-13, "mean")
            assert_close_rel(var, x.var(dims, unbiased=False), 1e-13, "var")
        else:
            out = _torch_training_reader(kind, xi, wi, bi, ci)
        (out * torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))).sum().backward()
        results.append([out] + [t.grad for t in (xi, wi, bi, ci) if t is not None])
    for name, a, e in zip(("out", "dx", "dweight", "dbias", "dconv"), *results):
        assert_close_rel(a, e, 1e-10, f"{kind} {name}")


def test_block_reader_hands_its_gradient_over(one_rank_group):
    # bn_reader(hand_over=True) tags the input gradient it allocates (owns_grad): the synchronised block's backward
    # then updates it in place instead of copying it; gradients are the same either way.
    from densenet_fast.ops import BlockParams
    from densenet_fast.ops.common import owns_grad
    from densenet_fast.ops.sync_block import sync_dense_block
    from densenet_fast.ops.sync_stats import bn_reader
    g = torch.Generator().manual_seed(5)
    L, c0, k, inter = 2, 3, 2, 4
    p = [[], [], [], [], [], []]
    for i in range(L):
        c = c0 + i * k
        p[0].append(torch.rand(c, dtype=torch.float64, generator=g) + 0.5)
        p[1].append(torch.randn(c, dtype=torch.float64, generator=g) * 0.2)
        p[2].append(torch.randn(inter, c, 1, 1, dtype=torch.float64, generator=g) / c ** 0.5)
        p[3].append(torch.rand(inter, dtype=torch.float64, generator=g) + 0.5)
        p[4].append(torch.randn(inter, dtype=torch.float64, generator=g) * 0.2)
        p[5].append(torch.randn(k, inter, 3, 3, dtype=torch.float64, generator=g) / (9 * inter) ** 0.5)
    running = [[torch.zeros(c0 + i * k, dtype=torch.float64) for i in range(L)],
               [torch.ones(c0 + i * k, dtype=torch.float64) for i in range(L)],
               [torch.zeros(inter, dtype=torch.float64)] * L, [torch.ones(inter, dtype=torch.float64)] * L]
    x = torch.randn(2, c0, 5, 7, dtype=torch.float64, generator=g)
    ct = c0 + L * k
    w, b = torch.rand(ct, dtype=torch.float64, generator=g) + 0.5, torch.randn(ct, dtype=torch.float64, generator=g)
    cw = torch.randn(3, ct, 1, 1, dtype=torch.float64, generator=g)
    runs = []
    for hand_over in (False, True):
        params = BlockParams(*[[t.clone().requires_grad_() for t in ts] for ts in p], *running)
        xi = x.clone().requires_grad_()
        blk = sync_dense_block(xi, params, group=one_rank_group)
        seen = []
        blk.buffer.register_hook(lambda grad: seen.append(owns_grad(grad)))
        out = bn_reader("transition", blk.buffer, blk.mean, blk.var, w, b, cw, eps=1e-5, hand_over=hand_over)
        (out * torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))).sum().backward()
        assert seen == [hand_over]
        runs.append([xi.grad] + [t.grad for ts in params[:6] for t in ts])
    for i, (a, e) in enumerate(zip(*runs)):
        assert torch.equal(a, e), f"gradient {i}"
