// Batch-norm algebra shared by the CPU and CUDA kernels of the fused dense block.
//
// A BN followed by ReLU is folded into one per-channel affine map: u = relu(a*x + b) with
// a = gamma*invstd and b = beta - mean*a. The backward of all BN readers of a channel is merged:
// each reader r adds a_r*du_r to the channel's gradient and gamma_r*dbeta_r, gamma_r*dgamma_r to
// two per-channel scalars S1, S2; once every reader is done the channel is finalised with
// g -= invstd/n * (S1 + xhat*S2).  (docs/design.md §3.)
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>

namespace dnf {

template <typename T>
C10_HOST_DEVICE inline T invstd_from_var(T var, double eps) {
  return T(1) / ::sqrt(var + static_cast<T>(eps));
}

// Folded BN scale and shift of one channel.
template <typename T>
C10_HOST_DEVICE inline void fold_bn(T gamma, T beta, T mean, T invstd, T& a, T& b) {
  a = gamma * invstd;
  b = beta - mean * a;
}

// NaN propagates, as torch.relu (clamp_min) does: only values < 0 are replaced.
template <typename T>
C10_HOST_DEVICE inline T relu(T v) {
  return v < T(0) ? T(0) : v;
}

// Gradient through a ReLU given its output, as torch's threshold_backward(grad, result, 0): zero
// where the output is <= 0, passed through elsewhere (including where the output is NaN).
template <typename T>
C10_HOST_DEVICE inline T relu_grad(T out, T grad) {
  return out <= T(0) ? T(0) : grad;
}

// A LeakyReLU / PReLU with slope s of the channel, as torch.nn.functional.leaky_relu and torch.prelu compute it:
// z where z > 0, s*z elsewhere (NaN propagates). ReLU is not this with s = 0 (relu(-inf) = 0, 0*-inf = NaN): the
// kernels keep relu() for it.
template <typename T>
C10_HOST_DEVICE inline T leaky(T z, T s) {
  return z > T(0) ? z : s * z;
}

// Gradient through leaky(z, s) given its input z, as torch's leaky_relu_backward and prelu's input gradient: the
// slope where z <= 0 (z = 0 included).
template <typename T>
C10_HOST_DEVICE inline T leaky_grad(T z, T s, T grad) {
  return z > T(0) ? grad : s * grad;
}

// One element's term of a PReLU slope gradient (torch's prelu weight gradient: z*grad where z <= 0, else 0).
template <typename T>
C10_HOST_DEVICE inline T leaky_slope_grad(T z, T grad) {
  return z > T(0) ? T(0) : z * grad;
}

// Final correction of a channel's gradient once every training-mode BN reader has contributed.
template <typename T>
C10_HOST_DEVICE inline T finalize_grad(T g, T xhat, T invstd_over_n, T s1, T s2) {
  return g - invstd_over_n * (s1 + xhat * s2);
}

// Full training-mode BN backward of one element given the channel's reduced sums.
template <typename T>
C10_HOST_DEVICE inline T bn_backward_train(T dy, T xhat, T a, T sum_dy_over_n, T sum_dy_xhat_over_n) {
  return a * (dy - sum_dy_over_n - xhat * sum_dy_xhat_over_n);
}

// Unbiased variance for running_var updates, as nn.BatchNorm2d does.
template <typename T>
C10_HOST_DEVICE inline T unbiased_var(T biased_var, int64_t n) {
  return n > 1 ? biased_var * T(n) / T(n - 1) : biased_var;
}

}  // namespace dnf
