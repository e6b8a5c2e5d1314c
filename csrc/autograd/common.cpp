#include "autograd/common.h"

namespace dnf::autograd {

std::string double_backward_message(const std::string& op, const std::string& what) {
  return "densenet_fast: double backward through " + what + " is not supported: its backward (" + op +
         ") is not differentiable. For higher-order gradients (gradient penalties, Hessian-vector products, ...) use "
         "the reference PyTorch path: densenet_fast.convert.set_impl(model, 'reference') (any model holding "
         "densenet_fast modules, converted or not), DenseNet(..., impl='reference'), or an unconverted model.";
}

namespace {

// Its forward runs the backward operator; its backward raises.
struct NotDifferentiable : public torch::autograd::Function<NotDifferentiable> {
  static variable_list forward(AutogradContext* ctx, TensorList inputs, std::string message,
                               const std::function<variable_list()>& run) {
    ctx->saved_data["message"] = message;
    at::AutoDispatchBelowADInplaceOrView guard;
    return run();
  }
  static variable_list backward(AutogradContext* ctx, variable_list) {
    TORCH_CHECK(false, ctx->saved_data["message"].toStringRef());
  }
};

}  // namespace

variable_list not_differentiable(const char* op, const char* what, const variable_list& inputs,
                                 const std::function<variable_list()>& run) {
  return NotDifferentiable::apply(TensorList(inputs), double_backward_message(op, what), run);
}

variable_list flat(std::initializer_list<TensorList> lists) {
  variable_list out;
  for (TensorList l : lists) out.insert(out.end(), l.begin(), l.end());
  return out;
}

}  // namespace dnf::autograd
