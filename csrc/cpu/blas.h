// Column-major GEMM on raw pointers for the tiled CPU kernels: C = alpha*op(A)*op(B) + beta*C.
// Calls the Fortran BLAS that libtorch links (MKL on x86, OpenBLAS elsewhere); where that symbol is
// absent it goes through at::mm on borrowed tensors. Called from inside at::parallel_for, where the
// BLAS runs single-threaded, so each thread multiplies its own cache-resident tile.
#pragma once

#include <ATen/ATen.h>

#include <limits>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace dnf::cpu {

namespace detail {
// Fortran BLAS takes 32-bit int sizes: refuse (instead of truncating) anything that does not fit.
inline void check_blas_dims(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax && ldc <= kMax,
              "densenet_fast: GEMM dimension exceeds the 32-bit BLAS limit (m=", m, ", n=", n, ", k=", k,
              ", lda=", lda, ", ldb=", ldb, ", ldc=", ldc, ")");
}

// Same product through ATen, for BLAS builds that do not export the Fortran symbols.
template <typename T>
void gemm_aten(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda,
               const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // A column-major [rows x cols] matrix with leading dim ld is a row-major [cols x rows] tensor.
  auto colmajor = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, char t) {
    auto rm = at::from_blob(const_cast<T*>(p), {t == 'N' ? cols : rows, t == 'N' ? rows : cols},
                            {ld, 1}, opts);
    return t == 'N' ? rm.t() : rm;  // op(X) as a [rows x cols] tensor
  };
  at::Tensor A = colmajor(a, m, k, lda, ta);
  at::Tensor B = colmajor(b, k, n, ldb, tb);
  at::Tensor C = at::from_blob(c, {n, m}, {ldc, 1}, opts).t();
  at::Tensor prod = at::mm(A, B);
  if (beta == T(0)) {
    C.copy_(prod.mul_(alpha));
  } else {
    C.mul_(beta).add_(prod, alpha);
  }
}
}  // namespace detail

inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  detail::check_blas_dims(m, n, k, lda, ldb, ldc);
  if (sgemm_ != nullptr) {
    const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    detail::gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

inline void gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                 int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  detail::check_blas_dims(m, n, k, lda, ldb, ldc);
  if (dgemm_ != nullptr) {
    const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
    dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    detail::gemm_aten(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

}  // namespace dnf::cpu
