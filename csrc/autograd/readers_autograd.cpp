// Autograd of the BN readers: the transition, the final norm + ReLU + pool, the stem's BN-ReLU-max-pool, and
// the per-sample moments (the SE squeeze). Each saves its input and BN tensors (and the SE gate when gated);
// the backward calls the operator's backward kernel. With training=True, mean/var are the batch statistics of
// the input and get no gradient (the backward kernels include their terms).
#include <torch/library.h>

#include "autograd/common.h"
#include "autograd/handover.h"

namespace dnf::autograd {
namespace {

using OptTensor = std::optional<Tensor>;

Tensor defined_or_none(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }
OptTensor as_optional(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// A reader of a block buffer that nothing else reads (FusedFeatures) tags its input gradient so that the
// block's backward may update it in place (handover.h).
Tensor fresh_if(AutogradContext* ctx, const Tensor& grad_input) {
  if (ctx->saved_data["hand_over"].toBool()) handover::mark_fresh(grad_input);
  return grad_input;
}

void save_scalars(AutogradContext* ctx, const Tensor& input, bool training, double eps) {
  ctx->saved_data["training"] = training;
  ctx->saved_data["eps"] = eps;
  ctx->saved_data["hand_over"] = handover::is_sole_reader(input);
}

// -- transition: avg_pool(conv1x1(relu(bn(gate * input)))) ------------------------------------------------

using TransitionFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            bool, double, const OptTensor&);
using TransitionBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool,
    double, const OptTensor&);

struct TransitionFunction : public torch::autograd::Function<TransitionFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& mean, const Tensor& var,
                               const Tensor& weight, const Tensor& bias, const Tensor& conv_weight, bool training,
                               double eps, const OptTensor& gate) {
    static auto forward_op = op<TransitionFn>("densenet_fast::transition_forward");
    save_scalars(ctx, input, training, eps);
    ctx->save_for_backward({input, mean, var, weight, bias, conv_weight, defined_or_none(gate)});
    at::AutoDispatchBelowADInplaceOrView guard;
    return {forward_op.call(input, mean, var, weight, bias, conv_weight, training, eps, gate)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto backward_op = op<TransitionBackwardFn>("densenet_fast::transition_backward");
    const auto s = ctx->get_saved_variables();
    auto [gx, gw, gb, gc, gg] = backward_op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5],
                                                 ctx->saved_data["training"].toBool(),
                                                 ctx->saved_data["eps"].toDouble(), as_optional(s[6]));
    return {fresh_if(ctx, gx), Tensor(), Tensor(), gw, gb, gc, Tensor(), Tensor(), s[6].defined() ? gg : Tensor()};
  }
};

Tensor transition_forward_autograd(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
                                   const Tensor& bias, const Tensor& conv_weight, bool training, double eps,
                                   const OptTensor& gate) {
  return TransitionFunction::apply(input, mean, var, weight, bias, conv_weight, training, eps, gate)[0];
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> transition_backward_autograd(
    const Tensor& grad, const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
    const Tensor& bias, const Tensor& conv_weight, bool training, double eps, const OptTensor& gate) {
  static auto backward_op = op<TransitionBackwardFn>("densenet_fast::transition_backward");
  auto out = not_differentiable(
      "densenet_fast::transition_backward", "densenet_fast::transition_forward (fused transition)",
      flat({{grad, input, mean, var, weight, bias, conv_weight}, gate.has_value() ? TensorList(*gate) : TensorList()}),
      [&] {
        auto r = backward_op.call(grad, input, mean, var, weight, bias, conv_weight, training, eps, gate);
        return variable_list{std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r)};
      });
  return {out[0], out[1], out[2], out[3], out[4]};
}

// -- final norm: mean_hw(relu(bn(gate * input))) -> [N, C] -----------------------------------------------

using PoolFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, double,
                      const OptTensor&);
using PoolBackwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                  const Tensor&, const Tensor&, const Tensor&, bool,
                                                                  double, const OptTensor&);

struct NormReluPoolFunction : public torch::autograd::Function<NormReluPoolFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& mean, const Tensor& var,
                               const Tensor& weight, const Tensor& bias, bool training, double eps,
                               const OptTensor& gate) {
    static auto forward_op = op<PoolFn>("densenet_fast::norm_relu_pool_forward");
    save_scalars(ctx, input, training, eps);
    ctx->save_for_backward({input, mean, var, weight, bias, defined_or_none(gate)});
    at::AutoDispatchBelowADInplaceOrView guard;
    return {forward_op.call(input, mean, var, weight, bias, training, eps, gate)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto backward_op = op<PoolBackwardFn>("densenet_fast::norm_relu_pool_backward");
    const auto s = ctx->get_saved_variables();
    auto [gx, gw, gb, gg] = backward_op.call(grads[0], s[0], s[1], s[2], s[3], s[4],
                                             ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
                                             as_optional(s[5]));
    return {fresh_if(ctx, gx), Tensor(), Tensor(), gw, gb, Tensor(), Tensor(), s[5].defined() ? gg : Tensor()};
  }
};

Tensor norm_relu_pool_forward_autograd(const Tensor& input, const Tensor& mean, const Tensor& var,
                                       const Tensor& weight, const Tensor& bias, bool training, double eps,
                                       const OptTensor& gate) {
  return NormReluPoolFunction::apply(input, mean, var, weight, bias, training, eps, gate)[0];
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_relu_pool_backward_autograd(
    const Tensor& grad, const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
    const Tensor& bias, bool training, double eps, const OptTensor& gate) {
  static auto backward_op = op<PoolBackwardFn>("densenet_fast::norm_relu_pool_backward");
  auto out = not_differentiable(
      "densenet_fast::norm_relu_pool_backward",
      "densenet_fast::norm_relu_pool_forward (fused final norm + ReLU + pool)",
      flat({{grad, input, mean, var, weight, bias}, gate.has_value() ? TensorList(*gate) : TensorList()}), [&] {
        auto r = backward_op.call(grad, input, mean, var, weight, bias, training, eps, gate);
        return variable_list{std::get<0>(r), std::get<1>(r), std::get<2>(r), std::get<3>(r)};
      });
  return {out[0], out[1], out[2], out[3]};
}

// -- stem: max_pool(relu(bn(input)), 3, 2, 1) ---------------------------------------------------------------

using StemFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, bool, double);
using StemBackwardFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                          const Tensor&, const Tensor&, bool, double);

struct StemFunction : public torch::autograd::Function<StemFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& mean, const Tensor& var,
                               const Tensor& weight, const Tensor& bias, bool training, double eps) {
    static auto forward_op = op<StemFn>("densenet_fast::bn_relu_maxpool");
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->save_for_backward({input, mean, var, weight, bias});
    at::AutoDispatchBelowADInplaceOrView guard;
    return {forward_op.call(input, mean, var, weight, bias, training, eps)};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto backward_op = op<StemBackwardFn>("densenet_fast::bn_relu_maxpool_backward");
    const auto s = ctx->get_saved_variables();
    auto [gx, gw, gb] = backward_op.call(grads[0], s[0], s[1], s[2], s[3], s[4], ctx->saved_data["training"].toBool(),
                                         ctx->saved_data["eps"].toDouble());
    return {gx, Tensor(), Tensor(), gw, gb, Tensor(), Tensor()};
  }
};

Tensor bn_relu_maxpool_autograd(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
                                const Tensor& bias, bool training, double eps) {
  return StemFunction::apply(input, mean, var, weight, bias, training, eps)[0];
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_maxpool_backward_autograd(const Tensor& grad, const Tensor& input,
                                                                     const Tensor& mean, const Tensor& var,
                                                                     const Tensor& weight, const Tensor& bias,
                                                                     bool training, double eps) {
  static auto backward_op = op<StemBackwardFn>("densenet_fast::bn_relu_maxpool_backward");
  auto out = not_differentiable("densenet_fast::bn_relu_maxpool_backward",
                                "densenet_fast::bn_relu_maxpool (fused stem BN + ReLU + max-pool)",
                                {grad, input, mean, var, weight, bias}, [&] {
                                  auto r = backward_op.call(grad, input, mean, var, weight, bias, training, eps);
                                  return variable_list{std::get<0>(r), std::get<1>(r), std::get<2>(r)};
                                });
  return {out[0], out[1], out[2]};
}

// -- per-sample moments: the mean (the SE squeeze) is differentiable, the variance is not -----------------

using MomentsFn = std::tuple<Tensor, Tensor>(const Tensor&);

struct SampleMomentsFunction : public torch::autograd::Function<SampleMomentsFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input) {
    static auto forward_op = op<MomentsFn>("densenet_fast::sample_moments");
    ctx->saved_data["shape"] = input.sym_sizes();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [mean, var] = forward_op.call(input);
    ctx->mark_non_differentiable({var});
    return {mean, var};
  }
  // d mean_hw(x) / dx = 1/HW at every position: an expanded [N, C, 1..] view of input's shape, no copy
  // (autograd adds it into the block buffer's gradient).
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    if (!grads[0].defined()) return {Tensor()};
    const std::vector<c10::SymInt> shape = ctx->saved_data["shape"].toSymIntVector();
    c10::SymInt hw = 1;
    std::vector<c10::SymInt> view = {shape[0], shape[1]};
    for (size_t d = 2; d < shape.size(); ++d) {
      hw = hw * shape[d];
      view.emplace_back(1);
    }
    return {grads[0].div(c10::Scalar(hw)).reshape_symint(view).expand_symint(shape)};
  }
};

std::tuple<Tensor, Tensor> sample_moments_autograd(const Tensor& input) {
  auto out = SampleMomentsFunction::apply(input);
  return {out[0], out[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, Autograd, m) {
  m.impl("transition_forward", &transition_forward_autograd);
  m.impl("transition_backward", &transition_backward_autograd);
  m.impl("norm_relu_pool_forward", &norm_relu_pool_forward_autograd);
  m.impl("norm_relu_pool_backward", &norm_relu_pool_backward_autograd);
  m.impl("bn_relu_maxpool", &bn_relu_maxpool_autograd);
  m.impl("bn_relu_maxpool_backward", &bn_relu_maxpool_backward_autograd);
  m.impl("sample_moments", &sample_moments_autograd);
}

}  // namespace dnf::autograd
