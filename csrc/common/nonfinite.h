// The NaN/Inf rules of the fused operators, shared by every backend (csrc/cpu and csrc/cuda call
// these; the CPU block's vectorised eval loop spells out bn_backward's eval rule, a*dy). Each rule reproduces what torchvision's modules
// compute for non-finite values, so a NaN/Inf in the data propagates exactly as it does there.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

#include "common/bn_math.h"

namespace dnf {

// Gradient of x through u = relu(a*x + b) (the forward's rounding of u is the caller's): zero where
// u <= 0, passed through elsewhere, including where u is NaN (threshold_backward's rule).
template <typename T>
C10_HOST_DEVICE inline T bn_relu_grad(T pre_activation, T grad) {
  return relu_grad<T>(relu<T>(pre_activation), grad);
}

// BN backward of one element given the gradient dy of the BN output. Training: the full batch-
// statistics backward. Eval: a*dy exactly, with no xhat term, so a non-finite input does not turn its
// own (or anyone's) gradient into NaN through 0*xhat (torch's eval BN backward is a*dy too).
template <typename T>
C10_HOST_DEVICE inline T bn_backward(T dy, T xhat, T a, T mean_dy, T mean_dy_xhat, bool training) {
  return training ? bn_backward_train<T>(dy, xhat, a, mean_dy, mean_dy_xhat) : a * dy;
}

// Whether the channels written by layer l of an L-layer block have a BN reader inside the block, i.e.
// need the merged BN1 finalize g -= invstd/n (S1 + xhat*S2). The last layer's channels have none:
// their gradient is final as given, and "finalising" it with S1 = S2 = 0 would still turn it into NaN
// wherever xhat is not finite.
C10_HOST_DEVICE inline bool block_channels_have_reader(int64_t l, int64_t L) { return l + 1 < L; }

// Transition (BN-ReLU-conv1x1-avgpool2x2, pooled before the conv): torch convolves before pooling,
// so its conv-weight gradient also holds 0 * relu(bn(x)) of the pixels a floor-mode pool drops (the
// last row / column of an odd H / W). Column j of dWc is NaN wherever such a value is not finite.
template <typename T>
C10_HOST_DEVICE inline bool dropped_pixel_poisons_dwc(T relu_out) {
#if defined(__CUDA_ARCH__)
  return !::isfinite(relu_out);
#else
  return !std::isfinite(relu_out);
#endif
}

}  // namespace dnf
