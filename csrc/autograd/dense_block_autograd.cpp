// Autograd of densenet_fast::dense_block_forward (the whole block): saves the block buffer, its statistics
// and the parameters; the backward is the recompute-based dense_block_backward, or its _inplace variant on
// a gradient handed over by the block's only reader (handover.h, docs/design.md §11).
#include <torch/library.h>

#include "autograd/common.h"
#include "autograd/handover.h"

namespace dnf::autograd {
namespace {

using ForwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
    TensorList, TensorList, const std::optional<Tensor>&, double, bool, double);
using BackwardResult = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                  std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>;
using BackwardFn = BackwardResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                  const Tensor&, TensorList, TensorList, TensorList, TensorList, TensorList,
                                  TensorList, TensorList, TensorList, TensorList, TensorList,
                                  const std::optional<Tensor>&, double, bool, double, int64_t);

using ActForwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
    TensorList, TensorList, const std::optional<Tensor>&, double, bool, double, const Tensor&);
using ActBackwardResult = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                     std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, Tensor>;
using ActBackwardFn = ActBackwardResult(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                        const Tensor&, TensorList, TensorList, TensorList, TensorList, TensorList,
                                        TensorList, TensorList, TensorList, TensorList, TensorList,
                                        const std::optional<Tensor>&, double, bool, double, int64_t, const Tensor&);

// The CPU kernels' working gradient has the buffer's dtype for these (bfloat16 included).
bool can_reuse_grad(const Tensor& grad, const Tensor& buffer) {
  const auto t = buffer.scalar_type();
  return !c10::GradMode::is_enabled() && buffer.device().is_cpu() &&
         (t == at::kFloat || t == at::kDouble || t == at::kBFloat16) && handover::can_take_over(grad, buffer);
}

std::vector<Tensor> take(const variable_list& v, size_t& at, size_t n) {
  std::vector<Tensor> out(v.begin() + at, v.begin() + at + n);
  at += n;
  return out;
}

struct DenseBlockFunction : public torch::autograd::Function<DenseBlockFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, TensorList g1, TensorList b1, TensorList w1,
                               TensorList g2, TensorList b2, TensorList w2, TensorList rm1, TensorList rv1,
                               TensorList rm2, TensorList rv2, const std::optional<Tensor>& mask, double p,
                               bool training, double eps) {
    static auto forward_op = op<ForwardFn>("densenet_fast::dense_block_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [buffer, mean, var, mean2, var2] =
        forward_op.call(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps);
    ctx->saved_data["L"] = static_cast<int64_t>(g1.size());
    ctx->saved_data["R"] = static_cast<int64_t>(training ? 0 : rm1.size());  // saved running-statistics lists
    ctx->saved_data["R_in"] = static_cast<int64_t>(rm1.size());  // given (read in eval only)
    // The channel count of a model is static: a traced (symbolic) input is specialised on it.
    ctx->saved_data["C0"] = input.sym_size(1).guard_int(__FILE__, __LINE__);
    ctx->saved_data["p"] = p;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_mask"] = mask.has_value() && mask->defined();
    // Saved: the buffer, the statistics and the parameters; the running statistics only in eval (in
    // training the operator does not read them, and they are updated in place after the forward).
    variable_list saved = {buffer, mean, var, mean2, var2};
    for (TensorList l : {g1, b1, w1, g2, b2, w2}) saved.insert(saved.end(), l.begin(), l.end());
    if (!training) {
      for (TensorList l : {rm1, rv1, rm2, rv2}) saved.insert(saved.end(), l.begin(), l.end());
    }
    if (mask.has_value() && mask->defined()) saved.push_back(*mask);
    ctx->save_for_backward(saved);
    // The statistics get no gradient: the readers' backward includes their terms.
    ctx->mark_non_differentiable({mean, var, mean2, var2});
    return {buffer, mean, var, mean2, var2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto backward_op = op<BackwardFn>("densenet_fast::dense_block_backward");
    static auto inplace_op = op<BackwardFn>("densenet_fast::dense_block_backward_inplace");
    const variable_list saved = ctx->get_saved_variables();
    const auto L = static_cast<size_t>(ctx->saved_data["L"].toInt());
    const auto R = static_cast<size_t>(ctx->saved_data["R"].toInt());
    const bool has_mask = ctx->saved_data["has_mask"].toBool();
    const Tensor& buffer = saved[0];
    size_t at = 5;
    std::vector<std::vector<Tensor>> params(10);
    for (size_t i = 0; i < 10; ++i) params[i] = take(saved, at, i < 6 ? L : R);
    const std::optional<Tensor> mask = has_mask ? std::optional<Tensor>(saved[at]) : std::nullopt;
    Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(buffer);
    const bool reuse = can_reuse_grad(grad, buffer);
    if (reuse) handover::count_taken();
    auto result = (reuse ? inplace_op : backward_op)
                      .call(grad, buffer, saved[1], saved[2], saved[3], saved[4], params[0], params[1], params[2],
                            params[3], params[4], params[5], params[6], params[7], params[8], params[9], mask,
                            ctx->saved_data["p"].toDouble(), ctx->saved_data["training"].toBool(),
                            ctx->saved_data["eps"].toDouble(), ctx->saved_data["C0"].toInt());
    // One gradient per forward argument, list elements one by one: input, the six parameter lists, then
    // none for the running statistics, the mask and the scalars.
    variable_list out = {std::get<0>(result)};
    auto append = [&](const std::vector<Tensor>& g) { out.insert(out.end(), g.begin(), g.end()); };
    append(std::get<1>(result));
    append(std::get<2>(result));
    append(std::get<3>(result));
    append(std::get<4>(result));
    append(std::get<5>(result));
    append(std::get<6>(result));
    out.resize(out.size() + 4 * static_cast<size_t>(ctx->saved_data["R_in"].toInt()) + 4);
    return out;
  }
};

// dense_block_act_forward (LeakyReLU / PReLU slopes): as DenseBlockFunction, the slopes saved too and given their
// gradient. The backward always works on a copy of the incoming gradient (no hand-over: the fused transition and
// final norm, which hand theirs over, compute ReLU).
struct DenseBlockActFunction : public torch::autograd::Function<DenseBlockActFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& input, TensorList g1, TensorList b1, TensorList w1,
                               TensorList g2, TensorList b2, TensorList w2, TensorList rm1, TensorList rv1,
                               TensorList rm2, TensorList rv2, const std::optional<Tensor>& mask, double p,
                               bool training, double eps, const Tensor& slopes) {
    static auto forward_op = op<ActForwardFn>("densenet_fast::dense_block_act_forward");
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [buffer, mean, var, mean2, var2] =
        forward_op.call(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps, slopes);
    ctx->saved_data["L"] = static_cast<int64_t>(g1.size());
    ctx->saved_data["R"] = static_cast<int64_t>(training ? 0 : rm1.size());
    ctx->saved_data["R_in"] = static_cast<int64_t>(rm1.size());
    ctx->saved_data["C0"] = input.sym_size(1).guard_int(__FILE__, __LINE__);
    ctx->saved_data["p"] = p;
    ctx->saved_data["training"] = training;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_mask"] = mask.has_value() && mask->defined();
    variable_list saved = {buffer, mean, var, mean2, var2, slopes};
    for (TensorList l : {g1, b1, w1, g2, b2, w2}) saved.insert(saved.end(), l.begin(), l.end());
    if (!training) {
      for (TensorList l : {rm1, rv1, rm2, rv2}) saved.insert(saved.end(), l.begin(), l.end());
    }
    if (mask.has_value() && mask->defined()) saved.push_back(*mask);
    ctx->save_for_backward(saved);
    ctx->mark_non_differentiable({mean, var, mean2, var2});
    return {buffer, mean, var, mean2, var2};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto backward_op = op<ActBackwardFn>("densenet_fast::dense_block_act_backward");
    const variable_list saved = ctx->get_saved_variables();
    const auto L = static_cast<size_t>(ctx->saved_data["L"].toInt());
    const auto R = static_cast<size_t>(ctx->saved_data["R"].toInt());
    const bool has_mask = ctx->saved_data["has_mask"].toBool();
    const Tensor& buffer = saved[0];
    size_t at = 6;
    std::vector<std::vector<Tensor>> params(10);
    for (size_t i = 0; i < 10; ++i) params[i] = take(saved, at, i < 6 ? L : R);
    const std::optional<Tensor> mask = has_mask ? std::optional<Tensor>(saved[at]) : std::nullopt;
    Tensor grad = grads[0].defined() ? grads[0] : at::zeros_like(buffer);
    auto result = backward_op.call(grad, buffer, saved[1], saved[2], saved[3], saved[4], params[0], params[1],
                                   params[2], params[3], params[4], params[5], params[6], params[7], params[8],
                                   params[9], mask, ctx->saved_data["p"].toDouble(),
                                   ctx->saved_data["training"].toBool(), ctx->saved_data["eps"].toDouble(),
                                   ctx->saved_data["C0"].toInt(), saved[5]);
    variable_list out = {std::get<0>(result)};
    auto append = [&](const std::vector<Tensor>& g) { out.insert(out.end(), g.begin(), g.end()); };
    append(std::get<1>(result));
    append(std::get<2>(result));
    append(std::get<3>(result));
    append(std::get<4>(result));
    append(std::get<5>(result));
    append(std::get<6>(result));
    out.resize(out.size() + 4 * static_cast<size_t>(ctx->saved_data["R_in"].toInt()) + 4);
    out.push_back(std::get<7>(result));
    return out;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_act_forward_autograd(
    const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const std::optional<Tensor>& mask, double p,
    bool training, double eps, const Tensor& slopes) {
  auto out = DenseBlockActFunction::apply(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps,
                                          slopes);
  return {out[0], out[1], out[2], out[3], out[4]};
}

ActBackwardResult dense_block_act_backward_autograd(
    const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean, const Tensor& var, const Tensor& mean2,
    const Tensor& var2, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const std::optional<Tensor>& mask, double p,
    bool training, double eps, int64_t num_input_features, const Tensor& slopes) {
  static auto backward_op = op<ActBackwardFn>("densenet_fast::dense_block_act_backward");
  variable_list inputs = flat({{grad_buffer, buffer, mean, var, mean2, var2, slopes}, g1, b1, w1, g2, b2, w2, rm1,
                               rv1, rm2, rv2});
  if (mask.has_value() && mask->defined()) inputs.push_back(*mask);
  const size_t L = g1.size();
  auto out = not_differentiable(
      "densenet_fast::dense_block_act_backward", "densenet_fast::dense_block_act_forward (fused dense block)", inputs,
      [&] {
        auto r = backward_op.call(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2,
                                  rv2, mask, p, training, eps, num_input_features, slopes);
        return flat({{std::get<0>(r)}, std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
                     std::get<5>(r), std::get<6>(r), {std::get<7>(r)}});
      });
  size_t at = 1;
  ActBackwardResult result;
  std::get<0>(result) = out[0];
  std::get<1>(result) = take(out, at, L);
  std::get<2>(result) = take(out, at, L);
  std::get<3>(result) = take(out, at, L);
  std::get<4>(result) = take(out, at, L);
  std::get<5>(result) = take(out, at, L);
  std::get<6>(result) = take(out, at, L);
  std::get<7>(result) = out[at];
  return result;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_forward_autograd(
    const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const std::optional<Tensor>& mask, double p,
    bool training, double eps) {
  auto out = DenseBlockFunction::apply(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps);
  return {out[0], out[1], out[2], out[3], out[4]};
}

BackwardResult dense_block_backward_autograd(const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean,
                                             const Tensor& var, const Tensor& mean2, const Tensor& var2, TensorList g1,
                                             TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
                                             TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2,
                                             const std::optional<Tensor>& mask, double p, bool training, double eps,
                                             int64_t num_input_features) {
  static auto backward_op = op<BackwardFn>("densenet_fast::dense_block_backward");
  variable_list inputs = flat({{grad_buffer, buffer, mean, var, mean2, var2}, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2,
                               rv2});
  if (mask.has_value() && mask->defined()) inputs.push_back(*mask);
  const size_t L = g1.size();
  auto out = not_differentiable(
      "densenet_fast::dense_block_backward", "densenet_fast::dense_block_forward (fused dense block)", inputs, [&] {
        auto r = backward_op.call(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2,
                                  rv2, mask, p, training, eps, num_input_features);
        return flat({{std::get<0>(r)}, std::get<1>(r), std::get<2>(r), std::get<3>(r), std::get<4>(r),
                     std::get<5>(r), std::get<6>(r)});
      });
  size_t at = 1;
  BackwardResult result;
  std::get<0>(result) = out[0];
  std::get<1>(result) = take(out, at, L);
  std::get<2>(result) = take(out, at, L);
  std::get<3>(result) = take(out, at, L);
  std::get<4>(result) = take(out, at, L);
  std::get<5>(result) = take(out, at, L);
  std::get<6>(result) = take(out, at, L);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, Autograd, m) {
  m.impl("dense_block_forward", &dense_block_forward_autograd);
  m.impl("dense_block_backward", &dense_block_backward_autograd);
  m.impl("dense_block_act_forward", &dense_block_act_forward_autograd);
  m.impl("dense_block_act_backward", &dense_block_act_backward_autograd);
}

}  // namespace dnf::autograd
