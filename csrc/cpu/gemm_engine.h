// GEMM engine of the CPU kernels: one column-major product on raw pointers,
//   C[F] = op(A[T]) * op(B[T]) + beta * C[F],   F = float for bfloat16 operands (fp32 accumulation).
// Two engines, chosen once per process and dtype (gemm_engine.cpp):
//   blas: the Fortran/CBLAS symbols libtorch links (MKL sgemm_/dgemm_, MKL cblas_gemm_bf16bf16f32,
//         which uses AMX/avx512_bf16 where the CPU has them);
//   aten: at::mm on borrowed tensors (any torch build; bfloat16 through float copies of the tile).
//   brgemm (bfloat16 only, CPUs with AMX): oneDNN's brgemm ukernel through ATen (cpublas::brgemm) for the
//         products with a packed weight operand, the forward 1x1 of a bfloat16 block (bn_relu_gemm); the
//         other bfloat16 products of a process on this engine use the blas path.
// Called from inside at::parallel_for: the product runs on the calling thread.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <limits>
#include <vector>

#include "cpu/blas.h"

extern "C" {
// MKL's bf16 GEMM with fp32 output (layout 102 = column-major, trans 111 = N, 112 = T).
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c,
                            int ldc) __attribute__((weak));
}

namespace dnf::cpu {

enum class GemmEngine : int { kBlas = 0, kAten = 1, kBrgemm = 2 };

const char* engine_name(GemmEngine e);
// Whether `e` can multiply operands of `dtype` in this process (its symbols are linked).
bool engine_available(GemmEngine e, at::ScalarType dtype);
// The engine for `dtype`: DNF_CPU_GEMM=blas|aten forces one; otherwise the faster of the available
// ones on a representative tile, measured once per process. Thread-safe.
GemmEngine gemm_engine(at::ScalarType dtype);
// One line per dtype: engine, how it was chosen and the measured rates, for build_info().
std::string engine_report();

// The compute dtype of a bfloat16 block's 1x1 stage (the forward product with its BN-ReLU prologue, the backward's
// recompute, its weight- and input-gradient products): kBFloat16 (bfloat16 operands, float accumulation: the
// engine, or the AMX kernel) or kFloat (the bfloat16 values widened: our float32 kernel or the float32 engine; the
// storage, and so the memory, stays bfloat16). Without bfloat16 hardware MKL and our rows emulate bfloat16, so it
// is measured once per process, both ways on a densenet121 layer; DNF_CPU_BF16_GEMM=bf16|fp32 forces it. Call it
// first outside parallel regions; thread-safe.
at::ScalarType bf16_gemm_compute();

// B = W^T of Y[m, n] = U[m, k] W^T for W [n, k] row-major (a 1x1 conv weight), packed once per call for
// cpublas::brgemm: VNNI pairs along k (k padded to kp = k rounded up to even with a zero row), in blocks of
// nb columns (64, 32 or 16: n must be a multiple of 16, see brgemm_packs).
struct PackedWeightT {
  int64_t k = 0, kp = 0, n = 0, nb = 0;
  std::vector<c10::BFloat16> data;
};
// Whether a [n, k] weight can be packed (n a multiple of 16; any k: odd k is padded).
inline bool brgemm_packs(int64_t n) { return n > 0 && n % 16 == 0; }
PackedWeightT pack_weight_t(const c10::BFloat16* W, int64_t n, int64_t k);
// C[m, n] (row stride ldc, float) = A[m, kp] (row stride lda; A's columns k..kp-1 zero) * B. Inside a parallel
// region: each thread calls brgemm_release_thread() when done (it releases the AMX tile state).
void brgemm_rows(int64_t m, const c10::BFloat16* A, int64_t lda, const PackedWeightT& B, float* C, int64_t ldc);
void brgemm_release_thread();

// Compute type of a storage type: float for bfloat16, the type itself otherwise.
template <typename T> struct Opmath { using type = T; };
template <> struct Opmath<c10::BFloat16> { using type = float; };

namespace detail {
inline at::Tensor colmajor_view(const void* p, int64_t rows, int64_t cols, int64_t ld, char t,
                                at::ScalarType dt) {
  // A column-major [rows x cols] matrix with leading dim ld is a row-major [cols x rows] tensor.
  auto rm = at::from_blob(const_cast<void*>(p), {t == 'N' ? cols : rows, t == 'N' ? rows : cols}, {ld, 1},
                          at::TensorOptions().dtype(dt));
  return t == 'N' ? rm.t() : rm;  // op(X) as a [rows x cols] tensor
}

template <typename T, typename F>
void gemm_aten_acc(char ta, char tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                   int64_t ldb, F beta, F* c, int64_t ldc) {
  const auto dt = c10::CppTypeToScalarType<T>::value;
  const auto ft = c10::CppTypeToScalarType<F>::value;
  at::Tensor A = colmajor_view(a, m, k, lda, ta, dt).to(ft);
  at::Tensor B = colmajor_view(b, k, n, ldb, tb, dt).to(ft);
  at::Tensor C = at::from_blob(c, {n, m}, {ldc, 1}, at::TensorOptions().dtype(ft)).t();
  if (beta == F(0)) {
    at::mm_out(C, A, B);
  } else {
    C.mul_(beta).add_(at::mm(A, B));
  }
}
}  // namespace detail

// The product on a given engine. float / double: same-type accumulation.
template <typename T>
inline void gemm_on(GemmEngine e, char ta, char tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda,
                    const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (e != GemmEngine::kAten) {
    gemm(ta, tb, m, n, k, T(1), a, lda, b, ldb, beta, c, ldc);  // blas.h
  } else {
    detail::gemm_aten_acc<T, T>(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
  }
}

// bfloat16 operands, float accumulation and output.
inline void gemm_on(GemmEngine e, char ta, char tb, int64_t m, int64_t n, int64_t k, const c10::BFloat16* a,
                    int64_t lda, const c10::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (e != GemmEngine::kAten) {  // brgemm: packed products only (bn_relu_gemm); the rest on the BLAS
    detail::check_blas_dims(m, n, k, lda, ldb, ldc);
    cblas_gemm_bf16bf16f32(102, ta == 'N' ? 111 : 112, tb == 'N' ? 111 : 112, int(m), int(n), int(k), 1.0f,
                           reinterpret_cast<const uint16_t*>(a), int(lda), reinterpret_cast<const uint16_t*>(b),
                           int(ldb), beta, c, int(ldc));
  } else {
    detail::gemm_aten_acc<c10::BFloat16, float>(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
  }
}

// The product on the process's engine for T.
template <typename T, typename F>
inline void gemm_acc(char ta, char tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b,
                     int64_t ldb, F beta, F* c, int64_t ldc) {
  gemm_on(gemm_engine(c10::CppTypeToScalarType<T>::value), ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace dnf::cpu
