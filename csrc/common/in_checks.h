// Argument checks of the InstanceNorm dense block (dense_block_in_forward / _backward), one set for the CPU kernels
// (csrc/cpu/dense_block_in_cpu.cpp adds its dtype rule), the CUDA kernels and their host emulation.
#pragma once

#include <c10/util/accumulate.h>

#include "common/checks.h"

namespace dnf {

// dense_block_forward's checks without running statistics or dropout, plus InstanceNorm's own: more than one
// spatial element per sample (ValueError with F.instance_norm's message); the slopes when given.
inline BlockGeometry check_in_block_args(const at::Tensor& input, at::TensorList g1, at::TensorList b1,
                                         at::TensorList w1, at::TensorList g2, at::TensorList b2, at::TensorList w2,
                                         double eps, const c10::optional<at::Tensor>& slopes) {
  if (input.defined() && (input.dim() == 4 || input.dim() == 5) && input.numel() > 0) {
    TORCH_CHECK_VALUE(c10::multiply_integers(input.sizes().slice(2)) > 1,
                      "Expected more than 1 spatial element when training, got input size torch.Size(",
                      input.sizes(), ")");
  }
  const BlockGeometry g = check_dense_block_args(input, g1, b1, w1, g2, b2, w2, {}, {}, {}, {}, c10::nullopt, 0.0,
                                                 /*training=*/true, eps);
  if (slopes.has_value() && slopes->defined()) check_block_slopes(*slopes, g, input);
  return g;
}

// The backward's: the buffer [N, C0 + L*k, ...], grad_buffer like it, the forward's arguments and its per-sample
// statistics mean/var [N, Ct], mean2/var2 [L, N, inter].
inline BlockGeometry check_in_backward_args(const at::Tensor& grad_buffer, const at::Tensor& buffer,
                                            const at::Tensor& mean, const at::Tensor& var, const at::Tensor& mean2,
                                            const at::Tensor& var2, at::TensorList g1, at::TensorList b1,
                                            at::TensorList w1, at::TensorList g2, at::TensorList b2,
                                            at::TensorList w2, double eps, int64_t num_input_features,
                                            const c10::optional<at::Tensor>& slopes) {
  TORCH_CHECK(buffer.dim() == 4 || buffer.dim() == 5,
              "buffer: expected a 4-D tensor [N, C, H, W] or a 5-D tensor [N, C, D, H, W], got ", buffer.dim(),
              "-D with shape ", buffer.sizes());
  TORCH_CHECK(num_input_features >= 1 && num_input_features < buffer.size(1),
              "num_input_features: expected a value in [1, ", buffer.size(1), "), got ", num_input_features);
  const BlockGeometry g =
      check_in_block_args(buffer.narrow(1, 0, num_input_features), g1, b1, w1, g2, b2, w2, eps, slopes);
  TORCH_CHECK(g.Ct == buffer.size(1), "buffer: expected ", g.Ct, " channels (C0 + L*k), got ", buffer.size(1));
  check_shape(grad_buffer, buffer.sizes(), "grad_buffer");
  check_float_tensor(grad_buffer, "grad_buffer", buffer);
  for (auto item : {std::make_pair("mean", &mean), std::make_pair("var", &var)}) {
    check_float_tensor(*item.second, item.first, buffer, /*bn_tensor=*/true);
    check_shape(*item.second, {g.N, g.Ct}, item.first);
  }
  for (auto item : {std::make_pair("mean2", &mean2), std::make_pair("var2", &var2)}) {
    check_float_tensor(*item.second, item.first, buffer, /*bn_tensor=*/true);
    check_shape(*item.second, {g.L, g.N, g.inter}, item.first);
  }
  return g;
}

}  // namespace dnf
