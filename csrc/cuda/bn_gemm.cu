// Fused BN1 + ReLU + 1x1 conv of the dense-block forward (bn_gemm.h), the opt-in "fused" path
// (DNF_CUDA_BN_GEMM=fused). Tensor-core WMMA tiles (m16n16k16, float accumulation), one thread
// block per 64x128 tile of Y; the X tile is normalised (a*x + b, ReLU, rounded to T exactly as the
// simple path rounds U) while it is staged in shared memory. No atomics and no split-K: each
// output element is summed in one fixed order, so results are deterministic.
#include "cuda/bn_gemm.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <string>

#include "cuda/bn_gemm_tile.cuh"

namespace dnf::cuda {
namespace {

namespace wmma = nvcuda::wmma;
using namespace dnf::bn_gemm_tile;

template <typename T> struct WmmaType;
template <> struct WmmaType<c10::Half> { using type = __half; };
template <> struct WmmaType<c10::BFloat16> { using type = __nv_bfloat16; };

// One thread block per BM x BN tile of Y; the per-thread staging and epilogue are in
// bn_gemm_tile.cuh (shared with the host emulation), the warp-level WMMA part is here.
template <typename T, bool VEC>
__global__ void __launch_bounds__(bn_gemm_tile::kThreads)
bn_relu_gemm_kernel(const T* __restrict__ X, int64_t M, int64_t ld, int64_t c, const float* __restrict__ a,
                    const float* __restrict__ b, const T* __restrict__ W, int64_t n_out, T* __restrict__ Y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using WT = typename WmmaType<T>::type;
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);          // [BM][LDS], row r = a row of X
  T* Bs = As + BM * LDS;                       // [BN][LDS], row o = an output channel
  float* Cs = reinterpret_cast<float*>(smem);  // [BM][LDC], after the K loop
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int tid = threadIdx.x, warp = tid / 32, wr = warp_row(warp), wc = warp_col(warp);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < c; k0 += BK) {
    load_tiles<T, VEC>(tid, X, M, ld, c, a, b, W, n_out, m0, n0, k0, As, Bs);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const WT*>(As + (wr + i * 16) * LDS + kk), LDS);
#pragma unroll
      for (int j = 0; j < 2; ++j)  // B tile stored [n][k]: column-major K x N with ldm = LDS
        wmma::load_matrix_sync(fb[j], reinterpret_cast<const WT*>(Bs + (wc + j * 16) * LDS + kk), LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();  // the tiles are overwritten next (and reused as Cs after the loop)
  }

#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wr + i * 16) * LDC + wc + j * 16, acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  store_tile<T>(tid, Cs, M, n_out, m0, n0, Y);
#else
  // Unreachable: use_fused_bn_gemm() (bn_gemm.h) refuses, with a RuntimeError, to take the fused path
  // when the device code it would run was compiled for an architecture below sm_80.
  __trap();
#endif
}

// Launches bn_relu_gemm_kernel<T, VEC> on the current stream (the launcher of launch_bn_relu_gemm).
struct CudaLauncher {
  template <bool VEC, typename T>
  void run(const BnGemmOperands<T>& op, GemmGrid grid) const {
    const dim3 blocks(static_cast<unsigned>(grid.x), static_cast<unsigned>(grid.y));
    bn_relu_gemm_kernel<T, VEC><<<blocks, bn_gemm_tile::kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        op.X, op.M, op.ld, op.c, op.a, op.b, op.W, op.n_out, op.Y);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

template <typename T>
int kernel_code_cc() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, bn_relu_gemm_kernel<T, false>) != cudaSuccess) {
    (void)cudaGetLastError();  // no device code for this GPU: clear the error, report "none"
    return 0;
  }
  return attr.ptxVersion;  // the virtual architecture the code was compiled for (__CUDA_ARCH__ / 10)
}

}  // namespace

void bn_relu_gemm_device_ccs(at::ScalarType st, int& device_cc, int& code_cc) {
  int device = 0, major = 0, minor = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  device_cc = 10 * major + minor;
  code_cc = st == at::kBFloat16 ? kernel_code_cc<c10::BFloat16>() : kernel_code_cc<c10::Half>();
}

template <>
void bn_relu_gemm<c10::Half>(const c10::Half* X, int64_t M, int64_t ld, int64_t c, const float* a, const float* b,
                             const c10::Half* W, int64_t n_out, c10::Half* Y) {
  launch_bn_relu_gemm(BnGemmOperands<c10::Half>{X, M, ld, c, a, b, W, n_out, Y}, CudaLauncher{});
}

template <>
void bn_relu_gemm<c10::BFloat16>(const c10::BFloat16* X, int64_t M, int64_t ld, int64_t c, const float* a,
                                 const float* b, const c10::BFloat16* W, int64_t n_out, c10::BFloat16* Y) {
  launch_bn_relu_gemm(BnGemmOperands<c10::BFloat16>{X, M, ld, c, a, b, W, n_out, Y}, CudaLauncher{});
}

}  // namespace dnf::cuda
