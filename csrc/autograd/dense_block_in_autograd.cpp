// Autograd of densenet_fast::dense_block_in_forward (the InstanceNorm block): saves the block buffer, its
// per-sample statistics, the parameters and the slopes; the backward is the recompute-based dense_block_in_backward
// on a copy of the incoming gradient (no hand-over: no fused reader follows an InstanceNorm block).
#include <torch/library.h>

#include "autograd/common.h"

namespace dnf::autograd {
namespace {

using InForwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(const Tensor&, TensorList, TensorList,
                                                                       TensorList, TensorList, TensorList, TensorList,
                                                                       double, const std::optional<Tensor>&);
using InBackwardResult = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                    std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, Tensor>;
using InBackwardFn = InBackwardResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                      const Tensor&, TensorList, TensorList, TensorList, TensorList, TensorList,
                                      TensorList, double, int64_t, const std::optional<Tensor>&);

std::vector<Tensor> take_n(const variable_list& v, size_t& at, size_t n) {
  std::vector<Tensor> out(v.begin() + at, v.begin() + at + n);
  at += n;
  return out;
}

struct DenseBlockInFunction : public torch::autograd::Function<DenseBlockInFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, TensorList g1, TensorList b1, TensorList w1,
                               TensorList g2, TensorList b2, TensorList w2, double eps,
                               const std::optional<Tensor>& slopes) {
    static auto forward_op = op<InForwardFn>("densenet_fast::dense_block_in_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [buffer, mean, var, mean2, var2] = forward_op.call(input, g1, b1, w1, g2, b2, w2, eps, slopes);
    const bool has_slopes = slopes.has_value() && slopes->defined();
    ctx->saved_data["L"] = static_cast<int64_t>(g1.size());
    ctx->saved_data["C0"] = input.sym_size(1).guard_int(__FILE__, __LINE__);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_slopes"] = has_slopes;
    variable_list saved = {buffer, mean, var, mean2, var2};
    for (TensorList l : {g1, b1, w1, g2, b2, w2}) saved.insert(saved.end(), l.begin(), l.end());
    if (has_slopes) saved.push_back(*slopes);
    ctx->save_for_backward(saved);
    ctx->mark_non_differentiable({mean, var, mean2, var2});
    return {buffer, mean, var, mean2, var2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto backward_op = op<InBackwardFn>("densenet_fast::dense_block_in_backward");
    const variable_list saved = ctx->get_saved_variables();
    const auto L = static_cast<size_t>(ctx->saved_data["L"].toInt());
    const bool has_slopes = ctx->saved_data["has_slopes"].toBool();
    const Tensor& buffer = saved[0];
    size_t at = 5;
    std::vector<std::vector<Tensor>> params(6);
    for (auto& p : params) p = take_n(saved, at, L);
    const std::optional<Tensor> slopes = has_slopes ? std::optional<Tensor>(saved[at]) : std::nullopt;
    const Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(buffer);
    auto result = backward_op.call(grad, buffer, saved[1], saved[2], saved[3], saved[4], params[0], params[1],
                                   params[2], params[3], params[4], params[5], ctx->saved_data["eps"].toDouble(),
                                   ctx->saved_data["C0"].toInt(), slopes);
    // One gradient per forward argument: input, the six lists element by element, none for eps, the slopes'.
    variable_list out = {std::get<0>(result)};
    auto append = [&](const std::vector<Tensor>& g) { out.insert(out.end(), g.begin(), g.end()); };
    append(std::get<1>(result));
    append(std::get<2>(result));
    append(std::get<3>(result));
    append(std::get<4>(result));
    append(std::get<5>(result));
    append(std::get<6>(result));
    out.emplace_back();  // eps
    out.push_back(has_slopes ? std::get<7>(result) : Tensor());
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_in_forward_autograd(
    const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    double eps, const std::optional<Tensor>& slopes) {
  auto out = DenseBlockInFunction::apply(input, g1, b1, w1, g2, b2, w2, eps, slopes);
  return {out[0], out[1], out[2], out[3], out[4]};
}

InBackwardResult dense_block_in_backward_autograd(const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean,
                                                  const Tensor& var, const Tensor& mean2, const Tensor& var2,
                                                  TensorList g1, TensorList b1, TensorList w1, TensorList g2,
                                                  TensorList b2, TensorList w2, double eps, int64_t num_input_features,
                                                  const std::optional<Tensor>& slopes) {
  static auto backward_op = op<InBackwardFn>("densenet_fast::dense_block_in_backward");
  variable_list inputs = flat({{grad_buffer, buffer, mean, var, mean2, var2}, g1, b1, w1, g2, b2, w2});
  if (slopes.has_value() && slopes->defined()) inputs.push_back(*slopes);
  const size_t L = g1.size();
  auto out = not_differentiable(
      "densenet_fast::dense_block_in_backward", "densenet_fast::dense_block_in_forward (fused InstanceNorm block)",
      inputs, [&] {
        auto r = backward_op.call(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, eps,
                                  num_input_features, slopes);
        return flat({{std::get<0>(r)}, std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
                     std::get<5>(r), std::get<6>(r), {std::get<7>(r)}});
      });
  size_t at = 1;
  InBackwardResult result;
  std::get<0>(result) = out[0];
  std::get<1>(result) = take_n(out, at, L);
  std::get<2>(result) = take_n(out, at, L);
  std::get<3>(result) = take_n(out, at, L);
  std::get<4>(result) = take_n(out, at, L);
  std::get<5>(result) = take_n(out, at, L);
  std::get<6>(result) = take_n(out, at, L);
  std::get<7>(result) = out[at];
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, Autograd, m) {
  m.impl("dense_block_in_forward", &dense_block_in_forward_autograd);
  m.impl("dense_block_in_backward", &dense_block_in_backward_autograd);
}

}  // namespace dnf::autograd
