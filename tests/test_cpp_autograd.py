"""The fused operators' autograd is C++ (csrc/autograd/): a small C++ program trains one step of a fused block
through the registered operators — no Python autograd involved — and matches the step Python takes, which in
turn matches torchvision's block (the reference).

The program is compiled by the test (torch.utils.cpp_extension.load_inline, as a library of one operator,
``dnf_cpp_test::train_step``, that the dispatcher calls; ~1-2 min on a loaded 2-core machine).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, tv_block_pair
from torch.utils import cpp_extension

import densenet_fast as dnf  # noqa: F401  (registers torch.ops.densenet_fast)

# One SGD step of dense block -> transition -> mean of squares, in C++: the forward through the dispatcher (the
# operators' Autograd kernels record the graph), torch::autograd::backward, then the update.
_SOURCE = r"""
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/library.h>

using at::Tensor;
using at::TensorList;

namespace {

std::vector<Tensor> leaves(TensorList ts) {
  std::vector<Tensor> out;
  for (const Tensor& t : ts) out.push_back(t.detach().clone().set_requires_grad(true));
  return out;
}

// (loss, block input gradient, then every parameter after the update: the block's 6 lists, then the
// transition's norm weight, bias and conv weight)
std::vector<Tensor> train_step(const Tensor& x, TensorList g1, TensorList b1, TensorList w1, TensorList g2,
                               TensorList b2, TensorList w2, const Tensor& tw, const Tensor& tb, const Tensor& tcw,
                               double lr, double eps) {
  static auto block = c10::Dispatcher::singleton().findSchemaOrThrow("densenet_fast::dense_block_forward", "")
      .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
          const Tensor&, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
          TensorList, TensorList, TensorList, const std::optional<Tensor>&, double, bool, double)>();
  static auto transition = c10::Dispatcher::singleton().findSchemaOrThrow("densenet_fast::transition_forward", "")
      .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
                    double, const std::optional<Tensor>&)>();
  at::AutoGradMode grad(true);
  Tensor input = x.detach().clone().set_requires_grad(true);
  std::vector<std::vector<Tensor>> p = {leaves(g1), leaves(b1), leaves(w1), leaves(g2), leaves(b2), leaves(w2),
                                        leaves({tw, tb, tcw})};
  std::vector<Tensor> none;
  auto [buffer, mean, var, mean2, var2] = block.call(input, p[0], p[1], p[2], p[3], p[4], p[5], none, none, none,
                                                     none, std::nullopt, 0.0, true, eps);
  TORCH_CHECK(!mean.requires_grad(), "the block's statistics are not differentiable");
  Tensor out = transition.call(buffer, mean, var, p[6][0], p[6][1], p[6][2], true, eps, std::nullopt);
  Tensor loss = out.square().mean();
  torch::autograd::backward({loss});
  std::vector<Tensor> result = {loss.detach(), input.grad()};
  at::NoGradGuard no_grad;
  for (auto& list : p) {
    for (Tensor& t : list) {
      TORCH_CHECK(t.grad().defined(), "a parameter got no gradient");
      result.push_back(t.detach() - lr * t.grad());
    }
  }
  return result;
}

}  // namespace

TORCH_LIBRARY(dnf_cpp_test, m) {
  m.def("train_step(Tensor x, Tensor[] g1, Tensor[] b1, Tensor[] w1, Tensor[] g2, Tensor[] b2, Tensor[] w2, "
        "Tensor tw, Tensor tb, Tensor tcw, float lr, float eps) -> Tensor[]");
  m.impl("train_step", c10::DispatchKey::CompositeExplicitAutograd, TORCH_FN(train_step));
}
"""


@pytest.fixture(scope="module")
def cpp_train_step():
    cpp_extension.load_inline("dnf_cpp_autograd_test", cpp_sources=[_SOURCE], is_python_module=False,
                              extra_cflags=["-O1"], verbose=False)
    return torch.ops.dnf_cpp_test.train_step


def _python_step(block, transition, x, lr):
    """The same step in Python, through the modules (the fused operators, their C++ autograd)."""
    x = x.clone().requires_grad_(True)
    buf = block.fused_forward(x)
    out = transition.fused_forward(buf.buffer, buf.mean, buf.var)
    loss = out.square().mean()
    loss.backward()
    params = [t for ts in block.block_params()[:6] for t in ts] + [transition.norm.weight, transition.norm.bias,
                                                                    transition.conv.weight]
    return [loss.detach(), x.grad] + [(t - lr * t.grad).detach() for t in params]


def _reference_step(ref_block, ref_transition, x, lr):
    """torchvision's _DenseBlock and _Transition (the reference)."""
    x = x.clone().requires_grad_(True)
    loss = ref_transition(ref_block(x)).square().mean()
    loss.backward()
    layers = list(ref_block.values())
    params = [getattr(layer, n).weight if n[-1] != "b" else getattr(layer, n[:-1]).bias
              for n in ("norm1", "norm1b", "conv1", "norm2", "norm2b", "conv2") for layer in layers]
    params += [ref_transition.norm.weight, ref_transition.norm.bias, ref_transition.conv.weight]
    return [loss.detach(), x.grad] + [(t - lr * t.grad).detach() for t in params]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_cpp_program_trains_one_step_like_python(cpp_train_step, dtype):
    from torchvision.models.densenet import _Transition

    torch.manual_seed(0)
    ref_block, block = tv_block_pair(3, 5, 2, 3, dtype)
    ref_transition = _Transition(14, 7).to(dtype)
    transition = dnf.Transition(14, 7).to(dtype)
    transition.load_state_dict(ref_transition.state_dict())
    x = torch.randn(2, 5, 9, 7, dtype=dtype)
    lr, eps = 0.1, block.denselayer1.norm1.eps
    p = block.block_params()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "autograd kernel was not registered" warning on the C++ path either
        got = cpp_train_step(x, *p[:6], transition.norm.weight, transition.norm.bias, transition.conv.weight, lr, eps)
    want = _python_step(block, transition, x, lr)
    assert len(got) == len(want) == 2 + 6 * 3 + 3
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"result {i}: the C++ step differs from Python's (rel err {rel_err(a, b):.2e})"
    ref = _reference_step(ref_block, ref_transition, x, lr)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    for i, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) <= tol, f"result {i} vs torchvision: {rel_err(a, b):.2e}"


def test_cpp_double_backward_error_names_the_operator():
    """The double-backward refusal is C++ too: differentiating a gradient through the fused transition raises."""
    torch.manual_seed(1)
    x = torch.randn(2, 6, 4, 6, dtype=torch.float64, requires_grad=True)
    mean, var = torch.ops.densenet_fast.channel_moments(x.detach())
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    cw = torch.randn(3, 6, 1, 1, dtype=torch.float64, requires_grad=True)
    out = torch.ops.densenet_fast.transition_forward(x, mean, var, w, b, cw, True, 1e-5)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    ref = F.avg_pool2d(F.conv2d(F.relu(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)), cw), 2)
    (gxr,) = torch.autograd.grad(ref.square().sum(), x, create_graph=True)
    assert rel_err(gx, gxr) < 1e-9
    with pytest.raises(RuntimeError, match=r"double backward through densenet_fast::transition_forward .*"
                                           r"densenet_fast::transition_backward\) is not differentiable"):
        gx.sum().backward()
