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

#include "common/bn_math.h"

namespace dnf::cuda {
namespace {

namespace wmma = nvcuda::wmma;

template <typename T> struct WmmaType;
template <> struct WmmaType<c10::Half> { using type = __half; };
template <> struct WmmaType<c10::BFloat16> { using type = __nv_bfloat16; };

constexpr int BM = 64, BN = 128, BK = 32, LDS = BK + 8, LDC = BN + 4, kGemmThreads = 256;
constexpr int kTileBytes = (BM + BN) * LDS * 2;
constexpr int kStageBytes = BM * LDC * 4;
constexpr int kSmemBytes = kTileBytes > kStageBytes ? kTileBytes : kStageBytes;

// VEC: 16-byte loads (ld, c multiples of 8 and 16-byte aligned pointers); otherwise element loads.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kGemmThreads)
bn_relu_gemm_kernel(const T* __restrict__ X, int64_t M, int64_t ld, int64_t c, const float* __restrict__ a,
                    const float* __restrict__ b, const T* __restrict__ W, int64_t n_out, T* __restrict__ Y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using WT = typename WmmaType<T>::type;
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);  // [BM][LDS], row r = a row of X
  T* Bs = As + BM * LDS;               // [BN][LDS], row o = an output channel
  float* Cs = reinterpret_cast<float*>(smem);  // [BM][LDC], after the K loop
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * BM, n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 4, wn = warp % 4;  // 2 x 4 warps of 32x32

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  for (int64_t k0 = 0; k0 < c; k0 += BK) {
    if constexpr (VEC) {
      // A: 64 rows x 4 chunks of 8 = 256 chunks, one per thread.
      {
        const int row = tid / 4, col = (tid % 4) * 8;
        const int64_t gr = m0 + row, gk = k0 + col;
        alignas(16) T v[8];
        if (gr < M && gk < c) {  // c % 8 == 0: the whole chunk is inside
          const uint4 raw = *reinterpret_cast<const uint4*>(X + gr * ld + gk);
          const T* xs = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int e = 0; e < 8; ++e)
            v[e] = static_cast<T>(relu<float>(a[gk + e] * static_cast<float>(xs[e]) + b[gk + e]));
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) v[e] = T(0.0f);
        }
        *reinterpret_cast<uint4*>(As + row * LDS + col) = *reinterpret_cast<const uint4*>(v);
      }
      // B: 128 rows x 4 chunks = 512 chunks, two per thread.
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int q = tid + t * kGemmThreads, row = q / 4, col = (q % 4) * 8;
        const int64_t go = n0 + row, gk = k0 + col;
        uint4 raw = make_uint4(0, 0, 0, 0);
        if (go < n_out && gk < c) raw = *reinterpret_cast<const uint4*>(W + go * c + gk);
        *reinterpret_cast<uint4*>(Bs + row * LDS + col) = raw;
      }
    } else {
      for (int e = tid; e < BM * BK; e += kGemmThreads) {
        const int row = e / BK, col = e % BK;
        const int64_t gr = m0 + row, gk = k0 + col;
        As[row * LDS + col] = (gr < M && gk < c)
                                  ? static_cast<T>(relu<float>(a[gk] * static_cast<float>(X[gr * ld + gk]) + b[gk]))
                                  : T(0.0f);
      }
      for (int e = tid; e < BN * BK; e += kGemmThreads) {
        const int row = e / BK, col = e % BK;
        const int64_t go = n0 + row, gk = k0 + col;
        Bs[row * LDS + col] = (go < n_out && gk < c) ? W[go * c + gk] : T(0.0f);
      }
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, WT, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, WT, wmma::col_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const WT*>(As + (wm * 32 + i * 16) * LDS + kk), LDS);
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::load_matrix_sync(fb[j], reinterpret_cast<const WT*>(Bs + (wn * 32 + j * 16) * LDS + kk), LDS);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  // Stage the float tile in shared memory, then round and store it with bounds checks.
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < BM * BN; e += kGemmThreads) {
    const int row = e / BN, col = e % BN;
    const int64_t gr = m0 + row, go = n0 + col;
    if (gr < M && go < n_out) Y[gr * n_out + go] = static_cast<T>(Cs[row * LDC + col]);
  }
#else
  // Built only for sm_80+ in practice (TORCH_CUDA_ARCH_LIST); bn_relu_gemm_supported() checks the device.
  __trap();
#endif
}

template <typename T>
void launch(const T* X, int64_t M, int64_t ld, int64_t c, const float* a, const float* b, const T* W,
            int64_t n_out, T* Y) {
  if (M == 0 || n_out == 0) return;
  const dim3 grid(static_cast<unsigned>((M + BM - 1) / BM), static_cast<unsigned>((n_out + BN - 1) / BN));
  TORCH_CHECK((n_out + BN - 1) / BN <= 65535, "bn_relu_gemm: too many output channels (", n_out, ")");
  const bool vec = ld % 8 == 0 && c % 8 == 0 && reinterpret_cast<uintptr_t>(X) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(W) % 16 == 0;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (vec) {
    bn_relu_gemm_kernel<T, true><<<grid, kGemmThreads, 0, stream>>>(X, M, ld, c, a, b, W, n_out, Y);
  } else {
    bn_relu_gemm_kernel<T, false><<<grid, kGemmThreads, 0, stream>>>(X, M, ld, c, a, b, W, n_out, Y);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool bn_relu_gemm_supported(at::ScalarType st) {
  if (st != at::kHalf && st != at::kBFloat16) return false;
  int device = 0, major = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;  // WMMA bfloat16 needs sm_80
}

template <>
void bn_relu_gemm<c10::Half>(const c10::Half* X, int64_t M, int64_t ld, int64_t c, const float* a, const float* b,
                             const c10::Half* W, int64_t n_out, c10::Half* Y) {
  launch<c10::Half>(X, M, ld, c, a, b, W, n_out, Y);
}

template <>
void bn_relu_gemm<c10::BFloat16>(const c10::BFloat16* X, int64_t M, int64_t ld, int64_t c, const float* a,
                                 const float* b, const c10::BFloat16* W, int64_t n_out, c10::BFloat16* Y) {
  launch<c10::BFloat16>(X, M, ld, c, a, b, W, n_out, Y);
}

template <>
void bn_relu_gemm<float>(const float*, int64_t, int64_t, int64_t, const float*, const float*, const float*, int64_t,
                         float*) {
  TORCH_CHECK(false, "bn_relu_gemm: the fused path takes float16/bfloat16 only");
}

template <>
void bn_relu_gemm<double>(const double*, int64_t, int64_t, int64_t, const double*, const double*, const double*,
                          int64_t, double*) {
  TORCH_CHECK(false, "bn_relu_gemm: the fused path takes float16/bfloat16 only");
}

}  // namespace dnf::cuda
