"""DenseNet training steps on one CUDA GPU: densenet_fast vs torchvision, within a hard time budget.

Setup: densenet121 and densenet201, 224x224, ``torch.autocast("cuda", dtype=torch.bfloat16)``,
channels_last; a step is ``benchmarks.measure.train_step`` (zero_grad, forward, cross-entropy,
backward), timed by the harness (``benchmarks.harness``: interleaved, rows written as they finish,
wall-clock budget). Variants share their initial weights:

* ``ours``                 dnf.densenetXXX() (fused blocks, transitions, final norm; default 1x1 path)
* ``ours_fused_gemm``      the same with DNF_CUDA_BN_GEMM=fused (opt-in; not in the default list)
* ``torchvision``          torchvision.models.densenetXXX()
* ``torchvision_memeff``   torchvision.models.densenetXXX(memory_efficient=True)
* ``torchvision_compile``  torch.compile(torchvision.models.densenetXXX())

Rows, in this order per model: each variant's loss (must agree with torchvision's) and
``max_memory_allocated`` at batch 64; the interleaved step times at batch 64; the hot spots of issue 30
(``hot_spot_rows``: dropout, statistics, odd-size transitions, side by side); the largest batch that
fits for ours and torchvision (doubling, then bisection to ~6%), with memory and time there. Every
row is appended to the JSON file (benchmarks/results/bench_cuda_block_<gpu>_<time>.json) as soon as it
finishes; a row that does not start before ``--budget-s`` has run out is written as
``{"status": "skipped", "reason": "time budget"}`` (rows run in priority order: batch-64 memory and
loss, batch-64 times, largest batches, torch.compile, times at the largest batches). Exit code: 1 when a
row failed (an error or a loss mismatch), else 0; the file's ``complete`` says whether every row ran.

Usage::

    python -m benchmarks.bench_cuda_block [--models densenet121,densenet201] [--budget-s 240] [--repeats 10]
"""
from __future__ import annotations

import contextlib
import gc
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # running from a source checkout
    sys.path.insert(0, str(ROOT))

import densenet_fast as dnf  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.harness import Budget, Recorder, run_row  # noqa: E402
from benchmarks.measure import is_oom, make_inputs, step_peak_memory, train_step  # noqa: E402
from benchmarks.runner import largest_batch  # noqa: E402

RESULTS_DIR = ROOT / "benchmarks" / "results"
FUSED_ENV = "DNF_CUDA_BN_GEMM"
VARIANTS = ("ours", "torchvision", "torchvision_memeff", "torchvision_compile")
ALL_VARIANTS = VARIANTS + ("ours_fused_gemm",)
MAX_BATCH_VARIANTS = ("ours", "torchvision")
DTYPE = torch.bfloat16
LOSS_RTOL = 0.02  # bf16 autocast: every variant's first loss within 2% of torchvision's


class Variant:
    """One model variant; ``step(x, y)`` runs one training step under bf16 autocast."""

    def __init__(self, name: str, model: nn.Module):
        self.name, self.model = name, model
        self.env_value = "fused" if name == "ours_fused_gemm" else None

    def _env(self):
        return harness.env_var(FUSED_ENV, self.env_value) if self.env_value else contextlib.nullcontext()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        with self._env():
            train_step(self.model, x, y, DTYPE)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        with self._env(), torch.autocast("cuda", dtype=DTYPE):
            return F.cross_entropy(self.model(x), y).item()


def setup_variants(model: str, names: List[str], device: torch.device) -> Dict[str, Variant]:
    """The setup: every variant of ``model`` with torchvision's initial weights, channels_last, in train mode."""
    import torchvision

    torch.manual_seed(0)
    base = getattr(torchvision.models, model)()
    out = {}
    for name in names:
        if name.startswith("ours"):
            m = getattr(dnf, model)()
        else:
            m = getattr(torchvision.models, model)(memory_efficient=(name == "torchvision_memeff"))
        m.load_state_dict(base.state_dict())
        m = m.to(device).to(memory_format=torch.channels_last).train()
        out[name] = Variant(name, torch.compile(m) if name == "torchvision_compile" else m)
    return out


def inputs(n: int, device: torch.device):
    """A batch of ``n`` 224x224 images (channels_last) and class targets."""
    x, y = make_inputs(n, 224, 1000, device)
    return x.to(memory_format=torch.channels_last), y


def free(device: torch.device) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(device)


def peak_memory(v: Variant, n: int, device: torch.device) -> dict:
    """``max_memory_allocated`` of one step at batch ``n`` after a warm-up step, and its part above what was
    resident before the step (``benchmarks.measure.step_peak_memory``)."""
    x, y = inputs(n, device)
    m = step_peak_memory(lambda: v.step(x, y), device, warmup=1)
    return {"max_memory_allocated_mib": (m["peak_bytes"] + m["baseline_bytes"]) / harness.MIB,
            "peak_above_resident_mib": m["peak_bytes"] / harness.MIB}


def fits(v: Variant, n: int, device: torch.device) -> bool:
    try:
        v.step(*inputs(n, device))
        torch.cuda.synchronize(device)
        return True
    except Exception as err:  # noqa: BLE001
        if not is_oom(err):
            raise
        return False
    finally:
        v.model.zero_grad(set_to_none=True)
        free(device)


class _OutOfTime(Exception):
    pass


def largest_fitting_batch(v: Variant, device: torch.device, start: int, limit: int, seconds: float) -> tuple:
    """(largest batch <= limit that fits, found to ~6% by ``benchmarks.runner.largest_batch`` from ``start``,
    doubling; whether the search finished within ``seconds``: if not, the batch is a lower bound)."""
    stop, best = time.monotonic() + seconds, [0]

    def peak_at(b: int) -> Optional[int]:  # 0 "bytes" when it fits, None when it does not
        if time.monotonic() > stop:
            raise _OutOfTime
        if not fits(v, b, device):
            return None
        best[0] = max(best[0], b)
        return 0

    try:
        return largest_batch(peak_at, 0, start, limit, growth=2.0, rel_tol=1 / 16)[0], True
    except _OutOfTime:
        return best[0], False


class ModelBench:
    """The variants of one model and the rows measured on them, phase by phase (see run_phases)."""

    def __init__(self, rec: Recorder, budget: Budget, model: str, names: List[str], args, device: torch.device):
        self.rec, self.budget, self.model, self.args, self.device = rec, budget, model, args, device
        self.variants = setup_variants(model, names, device)
        self.losses: Dict[str, float] = {}
        self.largest: Dict[str, int] = {}
        self.data64 = inputs(args.batch, device)

    def memory(self, names: List[str]) -> None:
        """Loss (vs torchvision's) and max_memory_allocated of one step at batch 64, per variant."""
        x, y = self.data64
        for name in sorted((n for n in names if n in self.variants), key=lambda n: n != "torchvision"):
            v = self.variants[name]

            def row(v=v):
                loss = v.loss(x, y)
                self.losses[v.name] = loss
                out = {"loss": loss, **peak_memory(v, self.args.batch, self.device)}
                ref = self.losses.get("torchvision")
                if ref is not None:
                    out["loss_rel_diff_vs_torchvision"] = diff = abs(loss - ref) / abs(ref)
                    if diff > LOSS_RTOL:
                        out["status"] = "failed"
                        out["error"] = (f"loss {loss:.5f} differs from torchvision's {ref:.5f} by more than "
                                        f"{LOSS_RTOL:.0%}")
                return out

            # torch.compile compiles in its first step: a larger estimate.
            run_row(self.rec, self.budget, 90.0 if name.endswith("compile") else 10.0,
                    {"model": self.model, "variant": name, "batch": self.args.batch, "what": "memory"}, row)
            free(self.device)

    def timing(self, label: str, batches: Dict[str, int], repeats: int) -> None:
        """Interleaved step times (harness.time_impls) of the variants whose memory row passed."""
        batches = {n: b for n, b in batches.items() if n in self.losses and b}
        if not batches:
            return

        def measure() -> dict:
            data = {n: inputs(b, self.device) for n, b in batches.items()}
            fns = {n: (lambda v=self.variants[n], d=data[n]: v.step(*d)) for n in batches}
            res = harness.time_impls(fns, batches, repeats, self.args.warmup, self.device)
            return {n: {**r, "batch": batches[n]} for n, r in res.items()}

        need = 5.0 + 0.5 * repeats * len(batches) * max(1, max(batches.values()) // self.args.batch)
        res = run_row(self.rec, self.budget, min(need, 60.0), {"model": self.model, "what": f"step time, {label}"},
                      lambda: {"variants": measure()}, record=False)
        for n, r in (res or {}).get("variants", {}).items():
            self.rec.add({"model": self.model, "variant": n, "what": f"step time, {label}",
                          "status": "failed" if r["error"] else "ok", **r})
        free(self.device)

    def largest_batches(self) -> None:
        for name in [n for n in MAX_BATCH_VARIANTS if n in self.losses]:
            def row(v=self.variants[name]):
                search_s = min(self.args.max_batch_s, self.budget.left() - 20.0)
                b, complete = largest_fitting_batch(v, self.device, self.args.batch, self.args.max_batch_limit,
                                                    search_s)
                self.largest[v.name] = b
                return {"largest_batch": b, "complete_search": complete, "limit": self.args.max_batch_limit,
                        **(peak_memory(v, b, self.device) if b else {})}

            run_row(self.rec, self.budget, 30.0, {"model": self.model, "variant": name, "what": "largest batch"}, row)
            free(self.device)


# --- hot spots (issue 30): each a side-by-side timing whose rows are ready to compare across commits ------

def _time_row(rec: Recorder, budget: Budget, what: str, fns: Dict[str, object], batch: int, args,
              device: torch.device) -> None:
    """One interleaved timing of ``fns`` (name -> callable), a row per name: ``{"model": "hot spot", ...}``."""
    res = run_row(rec, budget, 15.0, {"model": "hot spot", "what": what},
                  lambda: {"variants": harness.time_impls(fns, batch, args.repeats, args.warmup, device)},
                  record=False)
    for n, r in (res or {}).get("variants", {}).items():
        rec.add({"model": "hot spot", "variant": n, "what": what, "status": "failed" if r["error"] else "ok", **r})
    free(device)


def hot_spot_rows(rec: Recorder, budget: Budget, args, device: torch.device) -> None:
    """The CUDA hot spots of issue 30, measured where they show:

    * dropout: a densenet121 training step with drop_rate 0.2 (its channels_last masks) vs 0.0;
    * moments: ``dnf.ops.channel_moments`` (one pass, wide first level) vs ``torch.var_mean`` on the
      narrow 7x7 batch-64 tensors of the last block (k = 32 new channels, 128 bottleneck channels) and a
      56x56 one, bf16 channels_last;
    * the transition backward at odd vs even H/W (15x15 vs 14x14; the odd one adds the dropped-pixel NaN
      rule, now a column reduction), bf16 channels_last."""
    x, y = inputs(args.batch, device)
    torch.manual_seed(0)
    models = {f"ours_drop{p}": dnf.densenet121(drop_rate=p).to(device).to(memory_format=torch.channels_last).train()
              for p in (0.0, 0.2)}
    steps = {n: (lambda m=m: train_step(m, x, y, DTYPE)) for n, m in models.items()}
    _time_row(rec, budget, "hot spot: densenet121 step, dropout", steps, args.batch, args, device)
    del models, steps
    for shape in ((64, 32, 7, 7), (64, 128, 7, 7), (64, 256, 56, 56)):
        t = torch.randn(shape, device=device, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
        _time_row(rec, budget, f"hot spot: channel moments {list(shape)}",
                  {"densenet_fast": lambda t=t: dnf.ops.channel_moments(t),
                   "torch.var_mean": lambda t=t: torch.var_mean(t.float(), (0, 2, 3), correction=0)}, shape[0],
                  args, device)
    fns = {}
    for hw in (14, 15):
        t = torch.randn(64, 512, hw, hw, device=device, dtype=DTYPE).contiguous(memory_format=torch.channels_last)
        t.requires_grad_()
        mean, var = dnf.ops.channel_moments(t.detach())
        w, b = torch.ones(512, device=device), torch.zeros(512, device=device)
        cw = torch.randn(256, 512, 1, 1, device=device, dtype=DTYPE)
        g = torch.randn(64, 256, hw // 2, hw // 2, device=device, dtype=DTYPE)

        def fwd_bwd(t=t, mean=mean, var=var, w=w, b=b, cw=cw, g=g):
            out = dnf.ops.transition(t, mean, var, w, b, cw, training=True)
            torch.autograd.grad(out, t, g.contiguous(memory_format=torch.channels_last))

        fns[f"{hw}x{hw}"] = fwd_bwd
    _time_row(rec, budget, "hot spot: transition fwd+bwd [64, 512, H, W], odd vs even", fns, args.batch, args, device)


# Phases in priority order, so that a tight budget cuts the least important rows: batch-64 memory and
# loss, batch-64 times, the hot spots (seconds), largest batches, the torch.compile'd variant (minutes of
# compilation), times at the largest batches. Each phase runs for every model before the next starts.
def run_phases(benches: List[ModelBench], args) -> None:
    eager = [n for n in ALL_VARIANTS if not n.endswith("compile")]
    for mb in benches:
        mb.memory(eager)
    for mb in benches:
        mb.timing("batch 64", {n: args.batch for n in eager}, args.repeats)
    if benches and not args.no_hot_spots:
        hot_spot_rows(benches[0].rec, benches[0].budget, args, benches[0].device)
    if not args.no_max_batch:
        for mb in benches:
            mb.largest_batches()
    for mb in benches:
        if "torchvision_compile" in mb.variants:
            mb.memory(["torchvision_compile"])
            mb.timing("batch 64, torch.compile vs ours", {n: args.batch for n in ("ours", "torchvision_compile")},
                      args.repeats)
    for mb in benches:
        mb.timing("largest batch", dict(mb.largest), max(2, args.repeats // 4))


def main(argv: Optional[List[str]] = None) -> int:
    ap = harness.parser(__doc__, repeats=10, warmup=2)
    ap.add_argument("--models", default="densenet121,densenet201", help="comma-separated torchvision models")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {','.join(ALL_VARIANTS)}")
    ap.add_argument("--batch", type=int, default=64, help="batch size of the timed steps")
    ap.add_argument("--max-batch-limit", type=int, default=16384, help="upper limit of the largest-batch search")
    ap.add_argument("--max-batch-s", type=float, default=60.0, help="time cap of one largest-batch search")
    ap.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search")
    ap.add_argument("--no-hot-spots", action="store_true", help="skip the hot-spot rows (hot_spot_rows)")
    ap.add_argument("--budget-s", type=float, default=300.0, help="hard wall-clock budget of the whole run")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    args = ap.parse_args(argv)
    budget = Budget(args.budget_s)
    if not torch.cuda.is_available():
        print("bench_cuda_block: needs a CUDA GPU", file=sys.stderr)
        return 1
    info = dnf.build_info()
    if not info.get("cuda_kernels_registered"):
        print("bench_cuda_block: densenet_fast was built without CUDA kernels", file=sys.stderr)
        return 1
    names = [n for n in args.variants.split(",") if n]
    unknown = sorted(set(names) - set(ALL_VARIANTS))
    if unknown:
        print(f"--variants: unknown {unknown}; expected a subset of {ALL_VARIANTS}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    import torchvision

    path, stamp = harness.result_path(args.out, "bench_cuda_block", device)
    rec = Recorder(path, {
        "benchmark": "bench_cuda_block", "when": stamp, "device": harness.cuda_device_info(device),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                     "torchvision": torchvision.__version__, "densenet_fast": info.get("version"),
                     "python": platform.python_version()},
        "settings": {"image": 224, "autocast": "bfloat16", "memory_format": "channels_last",
                     "step": "benchmarks.measure.train_step (zero_grad, forward, cross-entropy, backward)",
                     "repeats": args.repeats, "warmup": args.warmup, "budget_s": args.budget_s},
    })
    print(f"writing {path}", flush=True)
    benches = []
    for model in [m for m in args.models.split(",") if m]:
        try:
            benches.append(ModelBench(rec, budget, model, names, args, device))
        except Exception as err:  # noqa: BLE001 - e.g. building the variants failed
            rec.add({"model": model, "status": "failed", "error": f"{type(err).__name__}: {err}"[:2000]})
    run_phases(benches, args)
    rec.doc["complete"] = rec.skipped == 0
    rec.flush()
    timed = [r for r in rec.doc["rows"] if r.get("what", "").startswith("step time")]
    for line in harness.noisy_lines(timed, lambda r: f"{r['model']} {r['variant']} {r['what']}"):
        print(line)
    print(f"wrote {path}: {len(rec.doc['rows'])} rows, {rec.failed} failed, {rec.skipped} skipped for time")
    return 1 if rec.failed else 0


if __name__ == "__main__":
    sys.exit(main())
