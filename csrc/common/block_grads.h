// The parameter gradients of a dense block's backward, per layer: what the CPU and CUDA kernels fill
// and return (dense_block_backward's Tensor[] outputs, in schema order).
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace dnf {

struct BlockGrads {
  std::vector<at::Tensor> g1, b1, w1, g2, b2, w2;
  explicit BlockGrads(int64_t layers) : g1(layers), b1(layers), w1(layers), g2(layers), b2(layers), w2(layers) {}
};

}  // namespace dnf
