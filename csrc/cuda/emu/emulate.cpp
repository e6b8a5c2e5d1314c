// Host emulation of the CUDA kernels, for tests on machines without a GPU.
//
// Compiles csrc/cuda/dense_block_impl.h and tail_impl.h with DNF_CUDA_EMULATE: every index functor
// runs in a serial loop over a permutation of its indices (launch.cuh), every ATen call runs on CPU,
// and the code lives in namespace dnf::cuda_emu. Exposed as plain Python functions (not through the
// dispatcher) by tests/test_cuda_emulation.py, which JIT-builds this file. The fused tensor-core GEMM
// (bn_gemm.cu) is GPU only and is not covered here.
#define DNF_CUDA_EMULATE 1

#include <torch/extension.h>

#include "cuda/dense_block_impl.h"
#include "cuda/tail_impl.h"

namespace {

using at::Tensor;
using Vec = std::vector<Tensor>;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> block_forward(const Tensor& input, Vec g1, Vec b1, Vec w1, Vec g2,
                                                                 Vec b2, Vec w2, Vec rm1, Vec rv1, Vec rm2, Vec rv2,
                                                                 c10::optional<Tensor> mask, double p, bool training,
                                                                 double eps) {
  return dnf::cuda_emu::dense_block_forward(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps);
}

std::tuple<Tensor, Vec, Vec, Vec, Vec, Vec, Vec> block_backward(const Tensor& grad, const Tensor& buffer,
                                                                const Tensor& mean, const Tensor& var,
                                                                const Tensor& mean2, const Tensor& var2, Vec g1, Vec b1,
                                                                Vec w1, Vec g2, Vec b2, Vec w2, Vec rm1, Vec rv1,
                                                                Vec rm2, Vec rv2, c10::optional<Tensor> mask, double p,
                                                                bool training, double eps, int64_t c0) {
  return dnf::cuda_emu::dense_block_backward(grad, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, rm1, rv1,
                                             rm2, rv2, mask, p, training, eps, c0);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dense_block_forward", &block_forward);
  m.def("dense_block_backward", &block_backward);
  m.def("transition_forward", &dnf::cuda_emu::transition_forward);
  m.def("transition_backward", &dnf::cuda_emu::transition_backward);
  m.def("norm_relu_pool_forward", &dnf::cuda_emu::norm_relu_pool_forward);
  m.def("norm_relu_pool_backward", &dnf::cuda_emu::norm_relu_pool_backward);
  m.def("channel_moments", &dnf::cuda_emu::channel_moments);
}
