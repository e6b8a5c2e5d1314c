// Fused BN1 + ReLU + 1x1-conv GEMM of the dense-block forward (CUDA build only):
//   Y[r, o] = sum_j relu(a[j] * X[r, j] + b[j]) * W[o, j]   for r < M, o < n_out, j < c,
// with X a column prefix of the block buffer (row stride ld). relu(bn(X)) is applied while the X tile
// is staged in shared memory, so no scratch of the normalised input exists. float16/bfloat16 only
// (tensor cores, float accumulation); the caller falls back to the simple path otherwise.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

namespace dnf::cuda {

bool bn_relu_gemm_supported(at::ScalarType st);

// Runs on the current stream. Defined for every dispatched type; throws for unsupported ones.
template <typename T>
void bn_relu_gemm(const T* X, int64_t M, int64_t ld, int64_t c, const at::opmath_type<T>* a,
                  const at::opmath_type<T>* b, const T* W, int64_t n_out, T* Y);

template <>
void bn_relu_gemm<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, const float*, const float*,
                             const c10::Half*, int64_t, c10::Half*);
template <>
void bn_relu_gemm<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, const float*, const float*,
                                 const c10::BFloat16*, int64_t, c10::BFloat16*);
template <>
void bn_relu_gemm<float>(const float*, int64_t, int64_t, int64_t, const float*, const float*, const float*, int64_t,
                         float*);
template <>
void bn_relu_gemm<double>(const double*, int64_t, int64_t, int64_t, const double*, const double*, const double*,
                          int64_t, double*);

}  // namespace dnf::cuda
