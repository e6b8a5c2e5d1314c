// Host emulation of the CUDA kernels, for tests on machines without a GPU.
//
// Compiles csrc/cuda/dense_block_impl.h and tail_impl.h with DNF_CUDA_EMULATE: every index functor
// runs in a serial loop over a permutation of its indices (launch.cuh), every ATen call runs on CPU,
// and the code lives in namespace dnf::cuda_emu. Exposed as plain Python functions (not through the
// dispatcher) by tests/test_cuda_emulation.py, which JIT-builds this file. The fused BN+GEMM kernel
// (bn_gemm.cu) is emulated block by block: its per-thread phases (bn_gemm_tile.cuh) run as they are,
// the warp-level WMMA calls are replaced by loops with the same fragment layouts
// (row_major A: element (m, k) at p[m*ldm + k]; col_major B: element (k, n) at p[n*ldm + k]).
#define DNF_CUDA_EMULATE 1

#include <torch/extension.h>

#include "cuda/dense_block_impl.h"
#include "cuda/tail_impl.h"
#include "cuda/bn_gemm_tile.cuh"

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

// One thread block of bn_relu_gemm_kernel, emulated.
template <typename T, bool VEC>
void gemm_block(const T* X, int64_t M, int64_t ld, int64_t c, const float* a, const float* b, const T* W,
                int64_t n_out, T* Y, int64_t bx, int64_t by) {
  using namespace dnf::bn_gemm_tile;
  alignas(128) unsigned char smem[kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + BM * LDS;
  float* Cs = reinterpret_cast<float*>(smem);
  const int64_t m0 = bx * BM, n0 = by * BN;
  std::vector<float> acc(8 * 2 * 2 * 256, 0.0f);  // [warp][i][j][16x16]
  for (int64_t k0 = 0; k0 < c; k0 += BK) {
    for (int tid = kThreads - 1; tid >= 0; --tid) load_tiles<T, VEC>(tid, X, M, ld, c, a, b, W, n_out, m0, n0, k0, As, Bs);
    for (int w = 0; w < 8; ++w)
      for (int kk = 0; kk < BK; kk += 16)
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) {
            const T* pa = As + (warp_row(w) + i * 16) * LDS + kk;
            const T* pb = Bs + (warp_col(w) + j * 16) * LDS + kk;
            float* f = acc.data() + ((w * 2 + i) * 2 + j) * 256;
            for (int m = 0; m < 16; ++m)
              for (int n = 0; n < 16; ++n)
                for (int q = 0; q < 16; ++q)
                  f[m * 16 + n] += static_cast<float>(pa[m * LDS + q]) * static_cast<float>(pb[n * LDS + q]);
          }
  }
  for (int w = 0; w < 8; ++w)
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) {
        float* dst = Cs + (warp_row(w) + i * 16) * LDC + warp_col(w) + j * 16;
        const float* f = acc.data() + ((w * 2 + i) * 2 + j) * 256;
        for (int m = 0; m < 16; ++m)
          for (int n = 0; n < 16; ++n) dst[m * LDC + n] = f[m * 16 + n];
      }
  for (int tid = 0; tid < kThreads; ++tid) store_tile<T>(tid, Cs, M, n_out, m0, n0, Y);
}

// Y [M, n_out] = relu(a*X[:, :c] + b) @ W^T with X [M, ld] (row-major), W [n_out, c], as the kernel computes it.
Tensor bn_relu_gemm(const Tensor& X, int64_t c, const Tensor& a, const Tensor& b, const Tensor& W) {
  using namespace dnf::bn_gemm_tile;
  TORCH_CHECK(X.dim() == 2 && X.is_contiguous() && W.dim() == 2 && W.is_contiguous() && W.size(1) == c &&
              a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat);
  const int64_t M = X.size(0), ld = X.size(1), n_out = W.size(0);
  Tensor Y = at::empty({M, n_out}, X.options());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(X.scalar_type(), "bn_relu_gemm_emu", [&] {
    using T = scalar_t;
    const T *Xp = X.data_ptr<T>(), *Wp = W.data_ptr<T>();
    const bool vec = ld % 8 == 0 && c % 8 == 0 && reinterpret_cast<uintptr_t>(Xp) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(Wp) % 16 == 0;
    for (int64_t bx = 0; bx < (M + BM - 1) / BM; ++bx)
      for (int64_t by = 0; by < (n_out + BN - 1) / BN; ++by) {
        if (vec)
          gemm_block<T, true>(Xp, M, ld, c, a.data_ptr<float>(), b.data_ptr<float>(), Wp, n_out, Y.data_ptr<T>(), bx, by);
        else
          gemm_block<T, false>(Xp, M, ld, c, a.data_ptr<float>(), b.data_ptr<float>(), Wp, n_out, Y.data_ptr<T>(), bx,
                               by);
      }
  });
  return Y;
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
  m.def("bn_relu_gemm", &bn_relu_gemm);
}
