// Fused BN1 + ReLU + 1x1-conv GEMM of the dense-block forward:
//   Y[r, o] = sum_j relu(a[j] * X[r, j] + b[j]) * W[o, j]   for r < M, o < n_out, j < c,
// with X a column prefix of the block buffer (row stride ld). relu(bn(X)) is applied while the X tile
// is staged in shared memory, so no scratch of the normalised input exists. float16/bfloat16 only
// (tensor cores, float accumulation). The kernel is bn_gemm.cu; the host emulation
// (emu/emulate.cpp) defines the same functions in namespace dnf::cuda_emu.
//
// Path rule (DNF_CUDA_BN_GEMM, read per call by forward and backward alike, so keep it fixed over a
// training step): unset, "" or "simple": the simple path; "fused": the fused kernel for float16 and
// bfloat16 data (float32/float64 have no fused kernel and take the simple path, as documented);
// any other value is an error. "fused" on a GPU below sm_80, or with a binary whose device code for
// the GPU was compiled for an older architecture, is a RuntimeError raised before anything runs
// (never a trap inside the kernel).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdlib>
#include <cstring>

#include "cuda/launch.cuh"

namespace dnf::DNF_CUDA_NS {

constexpr const char* kGemmPathEnv = "DNF_CUDA_BN_GEMM";

// Whether DNF_CUDA_BN_GEMM asks for the fused kernel; a clear error for an unknown value.
inline bool fused_gemm_requested() {
  const char* mode = std::getenv(kGemmPathEnv);
  if (mode == nullptr || *mode == '\0' || std::strcmp(mode, "simple") == 0) return false;
  TORCH_CHECK(std::strcmp(mode, "fused") == 0, kGemmPathEnv, ": expected \"simple\" or \"fused\" (or unset), got \"",
              mode, "\"");
  return true;
}

// The fused path's dispatch rule given the data type, the GPU's compute capability and the
// architecture the kernel's device code for it was compiled for (both as 10*major + minor).
inline bool fused_gemm_applies(at::ScalarType st, int device_cc, int code_cc) {
  if (st != at::kHalf && st != at::kBFloat16) return false;
  TORCH_CHECK(device_cc >= 80, kGemmPathEnv, "=fused: the fused BN+ReLU+1x1 GEMM needs a GPU of compute capability "
              ">= 8.0 (bfloat16 tensor cores), got ", device_cc / 10, ".", device_cc % 10,
              "; unset ", kGemmPathEnv, " to use the simple path");
  TORCH_CHECK(code_cc >= 80, kGemmPathEnv, "=fused: this build of densenet_fast has no device code of the fused "
              "BN+ReLU+1x1 GEMM for compute capability >= 8.0 that this GPU (", device_cc / 10, ".", device_cc % 10,
              ") can run (found: ", code_cc > 0 ? std::to_string(code_cc / 10) + "." + std::to_string(code_cc % 10)
                                               : std::string("none"),
              "); rebuild with TORCH_CUDA_ARCH_LIST including 8.0 or the GPU's own architecture, or unset ",
              kGemmPathEnv);
  return true;
}

// Compute capability of the current device, and the virtual architecture (__CUDA_ARCH__ / 10) of the
// fused kernel's device code it would run for dtype st (0 when the binary has none for it).
void bn_relu_gemm_device_ccs(at::ScalarType st, int& device_cc, int& code_cc);

// The forward's (and the recompute's) choice of the 1x1 path for data of dtype st.
inline bool use_fused_bn_gemm(at::ScalarType st) {
  if (!fused_gemm_requested() || (st != at::kHalf && st != at::kBFloat16)) return false;
  int device_cc = 0, code_cc = 0;
  bn_relu_gemm_device_ccs(st, device_cc, code_cc);
  return fused_gemm_applies(st, device_cc, code_cc);
}

// Runs on the current stream. Defined for every dispatched type; throws for float/double.
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
inline void bn_relu_gemm<float>(const float*, int64_t, int64_t, int64_t, const float*, const float*, const float*,
                                int64_t, float*) {
  TORCH_CHECK(false, "bn_relu_gemm: the fused path takes float16/bfloat16 only");
}

template <>
inline void bn_relu_gemm<double>(const double*, int64_t, int64_t, int64_t, const double*, const double*,
                                 const double*, int64_t, double*) {
  TORCH_CHECK(false, "bn_relu_gemm: the fused path takes float16/bfloat16 only");
}

}  // namespace dnf::DNF_CUDA_NS
