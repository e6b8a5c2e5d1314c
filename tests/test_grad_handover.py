"""The gradient hand-over (docs/design.md §11): a block whose only reader is a fused transition / final norm
inside FusedFeatures updates that reader's fresh input gradient in place (densenet_fast::dense_block_backward_inplace)
instead of copying it into a new working gradient. Same gradients as the copying path and as torchvision."""
from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import rel_err

import densenet_fast as dnf
import densenet_fast.nn.fused_features as ff
import densenet_fast.ops.dense_block as block_ops
from densenet_fast.ops.common import handovers_taken

KW = dict(growth_rate=5, block_config=(3, 2), num_init_features=13, bn_size=3, num_classes=7)


def _grads(model, x):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    model(x).square().sum().backward()
    return [x.grad] + [p.grad for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_handover_is_taken_and_changes_nothing(monkeypatch, dtype, train):
    ref = torchvision.models.DenseNet(**KW).to(dtype).train(train)
    ours = dnf.DenseNet(**KW).to(dtype).train(train)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 3, 29, 23, dtype=dtype)
    with torch.no_grad():
        state = {k: v.clone() for k, v in ours.state_dict().items()}
    before = handovers_taken()  # block backward passes that took a handed-over gradient (the C++ autograd)
    handed = _grads(ours, x)
    assert handovers_taken() - before == 2  # both blocks: their only readers are a transition and the final norm
    # The copying path (no hand-over marks), from the same state, gives bit-identical gradients.
    ours.load_state_dict(state)
    monkeypatch.setattr(ff, "mark_sole_reader", lambda t: t)
    before = handovers_taken()
    copied = _grads(ours, x)
    assert handovers_taken() == before
    for a, b in zip(handed, copied):
        assert torch.equal(a, b)
    if dtype == torch.float64:  # and torchvision's, to the fp64 budget
        for a, b in zip(handed, _grads(ref, x)):
            assert rel_err(a, b) <= 1e-9


def test_no_handover_for_a_gradient_someone_else_may_hold():
    """A block called on its own (its buffer is the module's output): the caller's gradient is never updated."""
    torch.manual_seed(0)
    block = dnf.DenseBlock(3, 13, 3, 5, 0.0).double()
    x = torch.randn(2, 13, 7, 6, dtype=torch.float64, requires_grad=True)
    y = block(x)
    g = torch.randn_like(y).contiguous(memory_format=torch.channels_last)
    kept = g.clone()
    y.backward(g)
    assert torch.equal(g, kept)


def test_inplace_op_rejects_a_gradient_it_cannot_reuse():
    block = dnf.DenseBlock(2, 4, 2, 3, 0.0)
    x = torch.randn(2, 4, 5, 5)
    p = block.block_params()
    out = block_ops.fused_dense_block(x, p, training=True)
    g = torch.randn(2, 10, 5, 5)  # contiguous, not channels_last
    with pytest.raises(RuntimeError, match="grad_buffer: expected a Float channels_last tensor to update in place"):
        torch.ops.densenet_fast.dense_block_backward_inplace(
            g, out.buffer, out.mean, out.var, out.mean2, out.var2, *p[:6], [], [], [], [], None, 0.0, True, 1e-5, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inplace_op_opcheck(dtype):
    block = dnf.DenseBlock(2, 5, 2, 3, 0.0).to(dtype)
    x = torch.randn(2, 5, 5, 3, dtype=dtype)
    p = block.block_params()
    out = block_ops.fused_dense_block(x, p, training=True)
    g = torch.randn(2, 11, 5, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    args = (g, out.buffer.detach(), out.mean, out.var, out.mean2, out.var2, *[[t.detach() for t in ts] for ts in p[:6]],
            [], [], [], [], None, 0.0, True, 1e-5, 5)
    # Eager-only operator (never traced: can_reuse_grad in csrc/autograd/dense_block_autograd.cpp): schema, fake
    # kernel, no autograd.
    torch.library.opcheck(torch.ops.densenet_fast.dense_block_backward_inplace, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    # and it computes what the copying op computes
    want = torch.ops.densenet_fast.dense_block_backward(*args)
    got = torch.ops.densenet_fast.dense_block_backward_inplace(g.clone(), *args[1:])
    for a, b in zip([want[0]] + [t for ts in want[1:] for t in ts], [got[0]] + [t for ts in got[1:] for t in ts]):
        assert torch.equal(a, b)
