// Building blocks of the CPU dense-block kernels. Every 4-D activation is channels_last, i.e. a
// row-major [rows = N*H*W, ld] matrix whose columns are channels; a layer's input is a column prefix.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common/bn_math.h"
#include "cpu/blas.h"

namespace dnf::cpu {

// Accumulation type of reductions: double for float data, so statistics of long rows stay exact
// to well below the 1e-4 parity budget.
template <typename T> struct Acc { using type = double; };

// Rows of a tile so that a [rows, channels] tile stays cache resident (~128 KiB).
inline int64_t tile_rows(int64_t channels, int64_t elem_size) {
  const int64_t target = (128 * 1024) / std::max<int64_t>(1, channels * elem_size);
  return std::clamp<int64_t>(target, 16, 1024);
}

// Fixed row chunks for reductions: the result does not depend on the number of threads.
constexpr int64_t kReduceChunk = 2048;

// mean and biased variance of columns [c0, c0+width) of x[rows, ld] (two-pass).
template <typename T>
void column_moments(const T* x, int64_t rows, int64_t ld, int64_t c0, int64_t width, T* mean_out,
                    T* var_out) {
  using acc_t = typename Acc<T>::type;
  const int64_t nchunks = (rows + kReduceChunk - 1) / kReduceChunk;
  std::vector<acc_t> part(nchunks * width, acc_t(0));
  std::vector<acc_t> mean(width, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      acc_t* p = part.data() + ch * width;
      const int64_t r1 = std::min(rows, (ch + 1) * kReduceChunk);
      for (int64_t r = ch * kReduceChunk; r < r1; ++r) {
        const T* row = x + r * ld + c0;
        for (int64_t j = 0; j < width; ++j) p[j] += row[j];
      }
    }
  });
  for (int64_t ch = 0; ch < nchunks; ++ch)
    for (int64_t j = 0; j < width; ++j) mean[j] += part[ch * width + j];
  for (int64_t j = 0; j < width; ++j) mean[j] /= rows;
  std::fill(part.begin(), part.end(), acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t ch = b; ch < e; ++ch) {
      acc_t* p = part.data() + ch * width;
      const int64_t r1 = std::min(rows, (ch + 1) * kReduceChunk);
      for (int64_t r = ch * kReduceChunk; r < r1; ++r) {
        const T* row = x + r * ld + c0;
        for (int64_t j = 0; j < width; ++j) {
          const acc_t d = row[j] - mean[j];
          p[j] += d * d;
        }
      }
    }
  });
  for (int64_t j = 0; j < width; ++j) {
    acc_t v = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) v += part[ch * width + j];
    mean_out[j] = static_cast<T>(mean[j]);
    var_out[j] = static_cast<T>(v / rows);
  }
}

// Per-channel folded BN: a = gamma*invstd, b = beta - mean*a; also returns invstd.
template <typename T>
void fold_channels(int64_t c, const T* gamma, const T* beta, const T* mean, const T* var, double eps,
                   T* a, T* b, T* invstd) {
  for (int64_t j = 0; j < c; ++j) {
    invstd[j] = invstd_from_var<T>(var[j], eps);
    fold_bn<T>(gamma[j], beta[j], mean[j], invstd[j], a[j], b[j]);
  }
}

// U[r, j] = relu(a[j]*x[r0+r, j] + b[j]) for a tile of `rows` rows and the first c columns.
template <typename T>
inline void bn_relu_tile(const T* x, int64_t ld, int64_t r0, int64_t rows, int64_t c, const T* a,
                         const T* b, T* U) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + (r0 + r) * ld;
    T* ur = U + r * c;
    for (int64_t j = 0; j < c; ++j) ur[j] = relu<T>(xr[j] * a[j] + b[j]);
  }
}

// Y[rows, n_out] = relu(a*X[:, :c] + b) @ W^T with W [n_out, c] row-major, tile by tile: the
// normalised input exists only as one cache-sized tile per thread.
template <typename T>
void bn_relu_gemm(const T* X, int64_t rows, int64_t ld, int64_t c, const T* a, const T* b,
                  const T* W, int64_t n_out, T* Y) {
  const int64_t tr = tile_rows(c, sizeof(T));
  const int64_t ntiles = (rows + tr - 1) / tr;
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> U(tr * c);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tr, nr = std::min(tr, rows - r0);
      bn_relu_tile(X, ld, r0, nr, c, a, b, U.data());
      gemm('T', 'N', n_out, nr, c, T(1), W, c, U.data(), c, T(0), Y + r0 * n_out, n_out);
    }
  });
}

// In place: y = relu(a*y + b) on a [rows, c] matrix.
template <typename T>
void bn_relu_inplace(T* y, int64_t rows, int64_t c, const T* a, const T* b) {
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* yr = y + r * c;
      for (int64_t j = 0; j < c; ++j) yr[j] = relu<T>(yr[j] * a[j] + b[j]);
    }
  });
}

// Per-thread partial sums, reduced in thread order (deterministic for a given thread count).
template <typename T>
struct ThreadPartials {
  int64_t width;
  std::vector<T> data;
  ThreadPartials(int64_t w) : width(w), data(static_cast<size_t>(at::get_num_threads()) * w, T(0)) {}
  T* mine() { return data.data() + static_cast<int64_t>(at::get_thread_num()) * width; }
  template <typename U>
  void reduce_into(U* out, bool accumulate = false) const {
    const int64_t nt = static_cast<int64_t>(data.size()) / width;
    for (int64_t j = 0; j < width; ++j) {
      T s = accumulate ? T(out[j]) : T(0);
      for (int64_t t = 0; t < nt; ++t) s += data[t * width + j];
      out[j] = static_cast<U>(s);
    }
  }
};

}  // namespace dnf::cpu
