// Execution layer of the CUDA kernels: every custom kernel of csrc/cuda is an *index functor*
// (`C10_HOST_DEVICE void operator()(int64_t i) const`) that handles one independent work item and
// writes only locations owned by that item. `for_each(n, f)` runs f(0..n-1):
//
//   * CUDA build: one generic grid-stride kernel on the current stream of the current device
//     (C10_CUDA_KERNEL_LAUNCH_CHECK after every launch, int64 indices throughout);
//   * DNF_CUDA_EMULATE build (host only, used by tests/test_cuda_emulation.py): the same launch
//     arithmetic (for_each_blocks, grid_stride), with the grid's threads run serially in a permuted
//     order, so the whole CUDA code path (indexing, orchestration, ATen calls) is executable and
//     testable on a machine without a GPU, and any hidden dependency between work items (which would
//     be a race on the GPU) changes the result.
//
// No kernel uses atomics or shared-memory reductions: reductions are fixed-shape trees of such
// functors (see reduce.cuh), so every result is bitwise deterministic run to run.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#ifndef DNF_CUDA_EMULATE
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

// The emulation build lives in its own namespace, so it can never be confused with the real one.
#ifdef DNF_CUDA_EMULATE
#define DNF_CUDA_NS cuda_emu
#else
#define DNF_CUDA_NS cuda
#endif

namespace dnf::DNF_CUDA_NS {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

// Launch configuration of for_each(n, f): one thread per item, capped at kMaxBlocks blocks (the grid-
// stride loop covers the rest). Items are independent, so the grid size never changes results.
inline int64_t for_each_blocks(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return blocks < kMaxBlocks ? blocks : kMaxBlocks;
}

// q = a / b and r = a % b for a >= 0, b > 0, the index decode of every functor (row and column of an
// element, pixel coordinates). Where both fit in 32 bits -- every launch of fewer than 2^32 items, i.e. all
// but the largest tensors -- it divides in 32 bits: a handful of instructions instead of the long 64-bit
// division sequence, several of which each element-wise functor runs per element. The branch is uniform
// across a warp in practice (it depends on the sizes, and on the index only past 2^32).
C10_HOST_DEVICE inline void divmod(int64_t a, int64_t b, int64_t& q, int64_t& r) {
  if (((static_cast<uint64_t>(a) | static_cast<uint64_t>(b)) >> 32) == 0) {
    const uint32_t a32 = static_cast<uint32_t>(a), b32 = static_cast<uint32_t>(b), q32 = a32 / b32;
    q = q32;
    r = a32 - q32 * b32;
  } else {
    q = a / b;
    r = a - q * b;
  }
}

// The body of every for_each thread: items tid, tid + stride, ... below n.
template <class F>
C10_HOST_DEVICE inline void grid_stride(int64_t n, int64_t tid, int64_t stride, const F& f) {
  for (int64_t i = tid; i < n; i += stride) f(i);
}

#ifdef DNF_CUDA_EMULATE

// Sets nothing: the emulation runs on the host.
struct DeviceScope {
  explicit DeviceScope(const at::Tensor&) {}
};

// Visits 0..n-1 in the order i*p mod n (p prime, coprime with n): a permutation that is far from
// sequential, so a work item that reads another item's output gets caught by the tests.
template <class G>
void permuted(int64_t n, const G& g) {
  int64_t p = 1000003;
  while (std::gcd(p, n) != 1) ++p;
  int64_t i = 0;
  for (int64_t t = 0; t < n; ++t) {
    g(i);
    i = (i + p) % n;
  }
}

// The item count of every for_each launch since the last clear (the tests count launches and their width).
inline std::vector<int64_t>& launch_log() {
  static std::vector<int64_t> log;
  return log;
}

// The real launch arithmetic (for_each_blocks, grid_stride), with the threads of the whole grid run
// one after another in a permuted order.
template <class F>
void for_each(int64_t n, const F& f) {
  if (n <= 0) return;
  launch_log().push_back(n);
  const int64_t threads = for_each_blocks(n) * kThreads;
  permuted(threads, [&](int64_t tid) { grid_stride(n, tid, threads, f); });
}

#else

// Makes the input's device current for the op (kernels and ATen calls then use its current stream).
struct DeviceScope {
  c10::cuda::CUDAGuard guard;
  explicit DeviceScope(const at::Tensor& t) : guard(t.device()) {}
};

template <class F>
__global__ void __launch_bounds__(kThreads) for_each_kernel(int64_t n, F f) {
  grid_stride(n, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
              static_cast<int64_t>(blockDim.x) * gridDim.x, f);
}

template <class F>
void for_each(int64_t n, const F& f) {
  if (n <= 0) return;
  const int64_t blocks = for_each_blocks(n);
  for_each_kernel<F><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(n, f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#endif

}  // namespace dnf::DNF_CUDA_NS
