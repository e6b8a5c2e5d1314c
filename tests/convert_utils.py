"""Helpers shared by tests/test_convert.py and tests/test_training_stack.py (small models, parity checks)."""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Callable, Iterable, List, Optional

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(ROOT))

from conftest import rel_err  # noqa: E402

import densenet_fast  # noqa: E402,F401
from densenet_fast.convert import convert  # noqa: E402


def image_batch(n=2, size=32, dtype=torch.float32, seed=0):
    """A seeded image batch [n, 3, size, size]."""
    return torch.randn(n, 3, size, size, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def tv_small(dtype=torch.float32, **kw) -> nn.Module:
    import torchvision
    args = dict(growth_rate=8, block_config=(2, 3), num_init_features=16, num_classes=5)
    args.update(kw)
    return torchvision.models.DenseNet(**args).to(dtype)


def timm_small(dtype=torch.float32, **kw) -> nn.Module:
    from timm.models.densenet import DenseNet
    args = dict(growth_rate=8, block_config=(2, 3), num_classes=5)
    args.update(kw)
    return DenseNet(**args).to(dtype)


def randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (so gradients/updates are informative)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def pair(make: Callable[[], nn.Module]):
    """(converted, reference): the reference is a deepcopy of the model taken before conversion."""
    model = randomize_bn(make())
    ref = copy.deepcopy(model)
    return convert(model), ref


def grads(model: nn.Module) -> List[Optional[torch.Tensor]]:
    return [p.grad for p in model.parameters()]


def assert_grads_close(a: nn.Module, b: nn.Module, tol: float, per_param: bool = True) -> None:
    ga, gb = grads(a), grads(b)
    names = [n for n, _ in b.named_parameters()]
    for n, x, y in zip(names, ga, gb):
        assert (x is None) == (y is None), f"{n}: grad None mismatch ({x is None} vs {y is None})"
    pairs = [(n, x, y) for n, x, y in zip(names, ga, gb) if y is not None]
    if per_param:
        for n, x, y in pairs:
            assert rel_err(x, y) <= tol, f"grad {n}: relative error {rel_err(x, y):.3e} > {tol:.1e}"
    else:  # fp32: relative to the largest gradient (some BN gradients are ~0 analytically: pure roundoff)
        fa = torch.cat([x.double().flatten() for _, x, _ in pairs])
        fb = torch.cat([y.double().flatten() for _, _, y in pairs])
        assert rel_err(fa, fb) <= tol, f"gradients: relative error {rel_err(fa, fb):.3e} > {tol:.1e}"


def assert_state_close(a: nn.Module, b: nn.Module, tol: float) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb), "state_dict keys differ"
    for k in sb:
        if sb[k].dtype == torch.long:
            assert torch.equal(sa[k], sb[k]), f"{k}: {sa[k]} != {sb[k]}"
        else:
            assert rel_err(sa[k], sb[k]) <= tol, f"{k}: relative error {rel_err(sa[k], sb[k]):.3e} > {tol:.1e}"


def train_steps(models: Iterable[nn.Module], inputs: List[torch.Tensor], lr: float = 0.1,
                tol_out: float = 1e-4, tol_grad: float = 1e-4, per_param: bool = True, momentum: float = 0.9,
                grad_check: Optional[Callable[[nn.Module, nn.Module], None]] = None) -> None:
    """Trains the models side by side with SGD (one step per input), checking outputs and gradients each step
    against the last model's (``grad_check(model, reference)``, default :func:`assert_grads_close`). The loss
    is mean(out**2), in float32 for half-precision outputs."""
    models = list(models)
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum) for m in models]
    for x in inputs:
        outs = []
        for m, opt in zip(models, opts):
            m.train()
            opt.zero_grad(set_to_none=True)
            out = m(x)
            loss_in = out if out.dtype in (torch.float32, torch.float64) else out.float()
            (loss_in ** 2).mean().backward()
            outs.append(out)
        for m, out in zip(models[:-1], outs[:-1]):
            assert rel_err(out, outs[-1]) <= tol_out, f"output relative error {rel_err(out, outs[-1]):.3e}"
            if grad_check is None:
                assert_grads_close(m, models[-1], tol_grad, per_param)
            else:
                grad_check(m, models[-1])
        for opt in opts:
            opt.step()


def saved_tensor_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for backward in one training forward (activation memory)."""
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(v for k, v in seen.items() if k not in params)
