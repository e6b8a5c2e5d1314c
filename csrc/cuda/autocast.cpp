// AutocastCUDA kernels: under torch.autocast("cuda", dtype=D) the dense block (ReLU and LeakyReLU / PReLU, BatchNorm
// and InstanceNorm) and the transition run with their input and conv weights cast to D (cached casts, as for F.conv2d), while every
// BatchNorm tensor (weights, biases, running statistics, activation slopes) stays float32: the kernels compute BN in
// float32 for float16/bfloat16 data and the argument checks expect float32 BN tensors there.
// float64 inputs, and tensors autocast does not handle, pass through unchanged. The other operators
// (BN-only readers, statistics, backward ops) fall through to their CUDA kernels in the dtypes given.
// The casts happen above the Autograd key, so gradients flow back to the float32 master weights.
//
// The host emulation (emu/emulate.cpp) compiles this file too, with DNF_CUDA_EMULATE: the same cast
// logic for the CPU device under torch.autocast("cpu"), calling the emulated operators directly
// instead of through the dispatcher, and without the registration.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#ifdef DNF_CUDA_EMULATE
#define DNF_AUTOCAST_NS cuda_emu
#else
#define DNF_AUTOCAST_NS cuda
#endif

namespace dnf::DNF_AUTOCAST_NS {
namespace autocast {

using at::Tensor;
using at::TensorList;
#ifdef DNF_CUDA_EMULATE
constexpr auto kDevice = c10::DeviceType::CPU;
constexpr auto kAutocastKey = c10::DispatchKey::AutocastCPU;
#else
constexpr auto kDevice = c10::DeviceType::CUDA;
constexpr auto kAutocastKey = c10::DispatchKey::AutocastCUDA;
#endif

using BlockForwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
    TensorList, TensorList, const std::optional<Tensor>&, double, bool, double);
using BlockActForwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList,
    TensorList, TensorList, const std::optional<Tensor>&, double, bool, double, const Tensor&);
using BlockInForwardFn = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, TensorList, TensorList, TensorList, TensorList, TensorList, TensorList, double,
    const std::optional<Tensor>&);
using TransitionForwardFn = Tensor(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, bool, double, const std::optional<Tensor>&);

// `call` runs the operator below autocast (the dispatcher's next kernel, or the emulated operator).
template <class Call>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_forward(
    const Call& call, const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2,
    TensorList w2, TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const std::optional<Tensor>& mask,
    double p, bool training, double eps) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  if (!at::autocast::is_eligible(input, kDevice))
    return call(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps);
  const auto dtype = at::autocast::get_autocast_dtype(kDevice);
  const std::vector<Tensor> w1c = at::autocast::cached_cast(dtype, w1, kDevice);
  const std::vector<Tensor> w2c = at::autocast::cached_cast(dtype, w2, kDevice);
  return call(at::autocast::cached_cast(dtype, input, kDevice), g1, b1, w1c, g2, b2, w2c, rm1, rv1, rm2, rv2, mask, p,
              training, eps);
}

// The LeakyReLU / PReLU block: as dense_block_forward, its slopes (BN dtype) stay float32.
template <class Call>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_act_forward(
    const Call& call, const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2,
    TensorList w2, TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const std::optional<Tensor>& mask,
    double p, bool training, double eps, const Tensor& slopes) {
  return dense_block_forward(
      [&](const Tensor& x, TensorList a1, TensorList a2, TensorList a3, TensorList a4, TensorList a5, TensorList a6,
          TensorList a7, TensorList a8, TensorList a9, TensorList a10, const std::optional<Tensor>& m, double q,
          bool t, double e) { return call(x, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, m, q, t, e, slopes); },
      input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps);
}

// The InstanceNorm block: as dense_block_forward (no running statistics or dropout); its norm weights, biases and
// slopes stay float32.
template <class Call>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_in_forward(
    const Call& call, const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2,
    TensorList w2, double eps, const std::optional<Tensor>& slopes) {
  return dense_block_forward(
      [&](const Tensor& x, TensorList a1, TensorList a2, TensorList a3, TensorList a4, TensorList a5, TensorList a6,
          TensorList, TensorList, TensorList, TensorList, const std::optional<Tensor>&, double, bool,
          double e) { return call(x, a1, a2, a3, a4, a5, a6, e, slopes); },
      input, g1, b1, w1, g2, b2, w2, {}, {}, {}, {}, std::nullopt, 0.0, true, eps);
}

// The SE gate, like the BN tensors, stays float32.
template <class Call>
Tensor transition_forward(const Call& call, const Tensor& input, const Tensor& mean, const Tensor& var,
                          const Tensor& weight, const Tensor& bias, const Tensor& conv_weight, bool training,
                          double eps, const std::optional<Tensor>& gate) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kAutocastKey);
  if (!at::autocast::is_eligible(input, kDevice))
    return call(input, mean, var, weight, bias, conv_weight, training, eps, gate);
  const auto dtype = at::autocast::get_autocast_dtype(kDevice);
  return call(at::autocast::cached_cast(dtype, input, kDevice), mean, var, weight, bias,
              at::autocast::cached_cast(dtype, conv_weight, kDevice), training, eps, gate);
}

#ifndef DNF_CUDA_EMULATE
namespace {

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_forward_kernel(
    const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const std::optional<Tensor>& mask, double p,
    bool training, double eps) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("densenet_fast::dense_block_forward", "")
                       .typed<BlockForwardFn>();
  return dense_block_forward([&](const auto&... a) { return op.call(a...); }, input, g1, b1, w1, g2, b2, w2, rm1,
                             rv1, rm2, rv2, mask, p, training, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_act_forward_kernel(
    const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const std::optional<Tensor>& mask, double p,
    bool training, double eps, const Tensor& slopes) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("densenet_fast::dense_block_act_forward", "")
                       .typed<BlockActForwardFn>();
  return dense_block_act_forward([&](const auto&... a) { return op.call(a...); }, input, g1, b1, w1, g2, b2, w2, rm1,
                                 rv1, rm2, rv2, mask, p, training, eps, slopes);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_in_forward_kernel(
    const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    double eps, const std::optional<Tensor>& slopes) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("densenet_fast::dense_block_in_forward", "")
                       .typed<BlockInForwardFn>();
  return dense_block_in_forward([&](const auto&... a) { return op.call(a...); }, input, g1, b1, w1, g2, b2, w2, eps,
                                slopes);
}

Tensor transition_forward_kernel(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
                                 const Tensor& bias, const Tensor& conv_weight, bool training, double eps,
                                 const std::optional<Tensor>& gate) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("densenet_fast::transition_forward", "")
                       .typed<TransitionForwardFn>();
  return transition_forward([&](const auto&... a) { return op.call(a...); }, input, mean, var, weight, bias,
                            conv_weight, training, eps, gate);
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, AutocastCUDA, m) {
  m.impl("dense_block_forward", &dense_block_forward_kernel);
  m.impl("dense_block_act_forward", &dense_block_act_forward_kernel);
  m.impl("dense_block_in_forward", &dense_block_in_forward_kernel);
  m.impl("transition_forward", &transition_forward_kernel);
}
#endif

}  // namespace autocast
}  // namespace dnf::DNF_AUTOCAST_NS
