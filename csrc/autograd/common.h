// Shared pieces of the operators' autograd kernels (the Autograd dispatch key, as torchvision's
// csrc/ops/autograd/): typed handles to call an operator below autograd, and the kernel of a backward
// operator, which refuses to be differentiated (double backward) with the message below.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <string>
#include <vector>

namespace dnf::autograd {

using at::Tensor;
using at::TensorList;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// densenet_fast::<name> with the C++ signature Sig (resolved once per call site: `static auto op = ...`).
template <class Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The error of differentiating a backward operator; `what` names the forward operator.
std::string double_backward_message(const std::string& op, const std::string& what);

// Runs `run` (the backward operator below autograd) so that its outputs, when they require grad
// (create_graph=True), raise double_backward_message when differentiated: without this, autograd would
// treat them as constants and return wrong second derivatives. `inputs`: every tensor argument.
variable_list not_differentiable(const char* op, const char* what, const variable_list& inputs,
                                 const std::function<variable_list()>& run);

// Flattens lists of tensors, in order, for not_differentiable's `inputs`.
variable_list flat(std::initializer_list<TensorList> lists);

}  // namespace dnf::autograd
