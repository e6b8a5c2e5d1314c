// Deterministic per-column reductions over a channels_last activation viewed as a row-major matrix
// [rows = N*H*W, ld]. A reduction is described by a *term*, `term(r, j, s)`, which adds the NV
// contributions of row r, column j to the accumulators s[0..NV). The rows are cut in fixed chunks
// of kRowsPerChunk (a function of the row count only, never of the device or the grid), each
// (chunk, column) item sums its rows in order, and the chunk partials are summed by a fixed-fan-in
// tree. Accumulation is in acc_t (float for float/half/bfloat16 data, double for double); no atomics,
// so results are bitwise reproducible whatever at::globalContext().deterministicAlgorithms() says.
#pragma once

#include "cuda/launch.cuh"

namespace dnf::DNF_CUDA_NS {

constexpr int64_t kRowsPerChunk = 128;
constexpr int64_t kTreeFanIn = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Level 1: part[chunk, v, j] = sum over the rows r of `chunk` of term(r, j)[v].
template <typename acc_t, int NV, class Term>
struct ColumnPartials {
  Term term;
  int64_t rows, width;
  acc_t* part;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t chunk = i / width, j = i - chunk * width;
    const int64_t r0 = chunk * kRowsPerChunk;
    const int64_t r1 = r0 + kRowsPerChunk < rows ? r0 + kRowsPerChunk : rows;
    acc_t s[NV];
    for (int v = 0; v < NV; ++v) s[v] = acc_t(0);
    for (int64_t r = r0; r < r1; ++r) term(r, j, s);
    for (int v = 0; v < NV; ++v) part[(chunk * NV + v) * width + j] = s[v];
  }
};

// One tree level: out[o, q] = sum of in[t, q] for t in [o*kTreeFanIn, (o+1)*kTreeFanIn), in order.
template <typename acc_t>
struct TreeSum {
  const acc_t* in;
  acc_t* out;
  int64_t n_in, cols;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t o = i / cols, q = i - o * cols;
    const int64_t t1 = (o + 1) * kTreeFanIn < n_in ? (o + 1) * kTreeFanIn : n_in;
    acc_t s = acc_t(0);
    for (int64_t t = o * kTreeFanIn; t < t1; ++t) s += in[t * cols + q];
    out[i] = s;
  }
};

// Sums of `term` over all rows: a [NV, width] tensor of acc_t (acc_opts: dtype and device).
template <typename acc_t, int NV, class Term>
at::Tensor column_sums(int64_t rows, int64_t width, const Term& term, const at::TensorOptions& acc_opts) {
  TORCH_INTERNAL_ASSERT(rows > 0 && width > 0);
  int64_t n = ceil_div(rows, kRowsPerChunk);
  at::Tensor part = at::empty({n, NV * width}, acc_opts);
  for_each(n * width, ColumnPartials<acc_t, NV, Term>{term, rows, width, part.data_ptr<acc_t>()});
  while (n > 1) {
    const int64_t n_out = ceil_div(n, kTreeFanIn);
    at::Tensor next = at::empty({n_out, NV * width}, acc_opts);
    for_each(n_out * NV * width, TreeSum<acc_t>{part.data_ptr<acc_t>(), next.data_ptr<acc_t>(), n, NV * width});
    part = next;  // the caching allocator reuses the old block only for later work on this stream
    n = n_out;
  }
  return part.view({NV, width});
}

// --- moments -------------------------------------------------------------------------------------

template <typename T, typename acc_t>
struct ValueTerm {
  const T* x;
  int64_t ld, c0;
  C10_HOST_DEVICE void operator()(int64_t r, int64_t j, acc_t* s) const {
    s[0] += static_cast<acc_t>(x[r * ld + c0 + j]);
  }
};

template <typename T, typename acc_t>
struct CenteredSquareTerm {
  const T* x;
  int64_t ld, c0;
  const acc_t* mean;
  C10_HOST_DEVICE void operator()(int64_t r, int64_t j, acc_t* s) const {
    const acc_t d = static_cast<acc_t>(x[r * ld + c0 + j]) - mean[j];
    s[0] += d * d;
  }
};

// out[j] = sums[j] / rows (and the acc_t value into keep[j] when keep is not null).
template <typename acc_t, typename out_t>
struct DivideByRows {
  const acc_t* sums;
  int64_t rows;
  acc_t* keep;
  out_t* out;
  C10_HOST_DEVICE void operator()(int64_t j) const {
    const acc_t v = sums[j] / static_cast<acc_t>(rows);
    if (keep != nullptr) keep[j] = v;
    out[j] = static_cast<out_t>(v);
  }
};

// Mean and biased variance (two passes) of columns [c0, c0 + width) of x[rows, ld].
template <typename T, typename acc_t, typename out_t>
void column_moments(const T* x, int64_t rows, int64_t ld, int64_t c0, int64_t width, out_t* mean_out,
                    out_t* var_out, const at::TensorOptions& acc_opts) {
  at::Tensor mean = at::empty({width}, acc_opts);
  acc_t* m = mean.data_ptr<acc_t>();
  at::Tensor s1 = column_sums<acc_t, 1>(rows, width, ValueTerm<T, acc_t>{x, ld, c0}, acc_opts);
  for_each(width, DivideByRows<acc_t, out_t>{s1.data_ptr<acc_t>(), rows, m, mean_out});
  at::Tensor s2 = column_sums<acc_t, 1>(rows, width, CenteredSquareTerm<T, acc_t>{x, ld, c0, m}, acc_opts);
  for_each(width, DivideByRows<acc_t, out_t>{s2.data_ptr<acc_t>(), rows, nullptr, var_out});
}

}  // namespace dnf::DNF_CUDA_NS
