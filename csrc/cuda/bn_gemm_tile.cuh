// Per-thread phases of the fused BN1+ReLU+1x1 GEMM kernel (bn_gemm.cu): staging the normalised X
// tile and the W tile in shared memory, and the bounds-checked epilogue. Written as plain
// C10_HOST_DEVICE functions of (thread index, tile origin) so that tests/test_cuda_emulation.py can
// run the very same code on the host (emu/emulate.cpp emulates the warp-level WMMA part).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "common/bn_math.h"

#if defined(__CUDACC__)
#include <vector_types.h>
#endif

namespace dnf::bn_gemm_tile {

// Tile of Y computed by one thread block: BM rows x BN output channels, K in steps of BK.
constexpr int BM = 64, BN = 128, BK = 32;
constexpr int LDS = BK + 8;  // shared-memory row stride of the A/B tiles (elements): 16-byte rows, fewer bank conflicts
constexpr int LDC = BN + 4;  // row stride of the float staging tile
constexpr int kThreads = 256;  // 8 warps: 2 (rows) x 4 (cols) warps of 32x32
constexpr int kTileBytes = (BM + BN) * LDS * 2;
constexpr int kStageBytes = BM * LDC * 4;
constexpr int kSmemBytes = kTileBytes > kStageBytes ? kTileBytes : kStageBytes;

#if defined(__CUDACC__)
using vec16 = uint4;
#else
struct alignas(16) vec16 {
  uint32_t x, y, z, w;
};
#endif

// A tile (rows m0.. of X, columns k0..: relu(a*x + b) rounded to T, zero outside) and B tile
// (rows n0.. of W, columns k0..; zero outside). VEC: 16-byte accesses, requires ld % 8 == 0,
// c % 8 == 0 and 16-byte aligned X and W; else element accesses.
template <typename T, bool VEC>
C10_HOST_DEVICE inline void load_tiles(int tid, const T* X, int64_t M, int64_t ld, int64_t c, const float* a,
                                       const float* b, const T* W, int64_t n_out, int64_t m0, int64_t n0,
                                       int64_t k0, T* As, T* Bs) {
  if constexpr (VEC) {
    {  // A: BM rows x BK/8 chunks = 256 chunks, one per thread
      const int row = tid / (BK / 8), col = (tid % (BK / 8)) * 8;
      const int64_t gr = m0 + row, gk = k0 + col;
      alignas(16) T v[8];
      if (gr < M && gk < c) {  // c % 8 == 0: the whole chunk is inside
        const vec16 raw = *reinterpret_cast<const vec16*>(X + gr * ld + gk);
        const T* xs = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = static_cast<T>(relu<float>(a[gk + e] * static_cast<float>(xs[e]) + b[gk + e]));
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) v[e] = T(0.0f);
      }
      *reinterpret_cast<vec16*>(As + row * LDS + col) = *reinterpret_cast<const vec16*>(v);
    }
#pragma unroll
    for (int t = 0; t < (BN * BK / 8) / kThreads; ++t) {  // B: 512 chunks, two per thread
      const int q = tid + t * kThreads, row = q / (BK / 8), col = (q % (BK / 8)) * 8;
      const int64_t go = n0 + row, gk = k0 + col;
      vec16 raw{0, 0, 0, 0};
      if (go < n_out && gk < c) raw = *reinterpret_cast<const vec16*>(W + go * c + gk);
      *reinterpret_cast<vec16*>(Bs + row * LDS + col) = raw;
    }
  } else {
    for (int e = tid; e < BM * BK; e += kThreads) {
      const int row = e / BK, col = e % BK;
      const int64_t gr = m0 + row, gk = k0 + col;
      As[row * LDS + col] = (gr < M && gk < c)
                                ? static_cast<T>(relu<float>(a[gk] * static_cast<float>(X[gr * ld + gk]) + b[gk]))
                                : T(0.0f);
    }
    for (int e = tid; e < BN * BK; e += kThreads) {
      const int row = e / BK, col = e % BK;
      const int64_t go = n0 + row, gk = k0 + col;
      Bs[row * LDS + col] = (go < n_out && gk < c) ? W[go * c + gk] : T(0.0f);
    }
  }
}

// Y[m0 + row, n0 + col] = Cs[row, col] rounded to T, inside the matrix only.
template <typename T>
C10_HOST_DEVICE inline void store_tile(int tid, const float* Cs, int64_t M, int64_t n_out, int64_t m0, int64_t n0,
                                       T* Y) {
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int row = e / BN, col = e % BN;
    const int64_t gr = m0 + row, go = n0 + col;
    if (gr < M && go < n_out) Y[gr * n_out + go] = static_cast<T>(Cs[row * LDC + col]);
  }
}

// Origin of warp w's 32x32 sub-tile inside the block tile.
C10_HOST_DEVICE inline int warp_row(int w) { return (w / 4) * 32; }
C10_HOST_DEVICE inline int warp_col(int w) { return (w % 4) * 32; }

// Grid of one bn_relu_gemm launch: blockIdx.x walks the BM-row tiles, blockIdx.y the BN-column tiles.
struct GemmGrid {
  int64_t x, y;
};

// The operands of one bn_relu_gemm call: Y[M, n_out] = relu(a*X[:, :c] + b) W^T, X with leading dim ld.
template <typename T>
struct BnGemmOperands {
  const T* X;
  int64_t M, ld, c;
  const float *a, *b;
  const T* W;
  int64_t n_out;
  T* Y;
};

// The host side of every bn_relu_gemm launch (bn_gemm.cu runs it with a CUDA launcher, the host
// emulation with one that runs the thread blocks serially): the grid, its limits, and the choice of
// the 16-byte path. exec.run<VEC>(op, grid) launches bn_relu_gemm_kernel<T, VEC>.
template <typename T, class Exec>
inline void launch_bn_relu_gemm(const BnGemmOperands<T>& op, const Exec& exec) {
  if (op.M == 0 || op.n_out == 0) return;
  const GemmGrid grid{(op.M + BM - 1) / BM, (op.n_out + BN - 1) / BN};
  TORCH_CHECK(grid.y <= 65535, "bn_relu_gemm: ", op.n_out, " output channels need ", grid.y,
              " column tiles, more than a grid's y dimension allows (65535)");
  TORCH_CHECK(grid.x <= 2147483647, "bn_relu_gemm: ", op.M, " rows need ", grid.x,
              " row tiles, more than a grid's x dimension allows (2^31 - 1)");
  const bool vec = op.ld % 8 == 0 && op.c % 8 == 0 && reinterpret_cast<uintptr_t>(op.X) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(op.W) % 16 == 0;
  if (vec) {
    exec.template run<true>(op, grid);
  } else {
    exec.template run<false>(op, grid);
  }
}

}  // namespace dnf::bn_gemm_tile
