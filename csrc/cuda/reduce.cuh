// Deterministic per-column reductions over a channels_last activation viewed as a row-major matrix
// [rows = N*H*W, ld]. A reduction is described by a *term*, `term(r, j, s)`, which adds the NV
// contributions of row r, column j to the accumulators s[0..NV). The rows are cut in fixed chunks
// of kRowsPerChunk (a function of the row count only, never of the device or the grid), each
// (chunk, column) item sums its rows in order, and the chunk partials are summed by a fixed-fan-in
// tree (the moments: one pass, below). Accumulation is in acc_t (float for float/half/bfloat16 data, double for double); no atomics,
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
    int64_t chunk, j;
    divmod(i, width, chunk, j);
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
    int64_t o, q;
    divmod(i, cols, o, q);
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

// --- moments: one pass over memory (two-pass chunks, Chan's merge up the tree) -------------------------
//
// Mean and biased variance of a column reduction read the data from memory once: the first level sums a
// chunk's rows, then sums their squared deviations from the chunk's mean (the same rows again, now in
// cache) and keeps (sum, M2) per (chunk, column); each tree level merges up to kTreeFanIn of them in a
// fixed order by Chan et al.'s pairwise formula, and the last level writes the results: 1 +
// ceil(log32(chunks)) launches per statistics call (two-pass sums over the whole column took
// 2 * (1 + levels) + 2, reading the data twice). Carrying sums rather than running means keeps the
// non-finite semantics of the CPU kernels (csrc/common/nonfinite.h): an Inf makes the mean Inf and the
// variance NaN, where a running-mean update would turn the mean into NaN.

// The moments' first level has at least kMomentItems work items where it can: rows per chunk start at
// kRowsPerChunk and halve (down to 16) while the level would be narrower, so small images and narrow
// layers (7x7 at batch 64, k = 32 new channels) still fill the GPU. A function of the sizes only, so the
// result is bitwise reproducible on any device.
constexpr int64_t kMomentItems = int64_t(1) << 15;
constexpr int64_t kMinMomentChunk = 16;

inline int64_t moment_chunk_rows(int64_t rows, int64_t width) {
  int64_t chunk = kRowsPerChunk;
  while (chunk > kMinMomentChunk && ceil_div(rows, chunk) * width < kMomentItems) chunk /= 2;
  return chunk;
}

// Columns [c0, c0 + width) of x[rows, ld] (a channels_last activation).
template <typename T, typename acc_t>
struct ColumnValue {
  const T* x;
  int64_t ld, c0;
  C10_HOST_DEVICE acc_t operator()(int64_t r, int64_t j) const { return static_cast<acc_t>(x[r * ld + c0 + j]); }
};

// Per-sample statistics of X [N, HW, C]: column col = n*C + j, row p = the spatial position.
template <typename T, typename acc_t>
struct SampleValue {
  const T* X;
  int64_t C, HW;
  C10_HOST_DEVICE acc_t operator()(int64_t p, int64_t col) const {
    int64_t n, j;
    divmod(col, C, n, j);
    return static_cast<acc_t>(X[(n * HW + p) * C + j]);
  }
};

// Where a level puts (sum, M2) of group g, column j: part [groups, 2, width], or, at the last level
// (part == nullptr), mean_out[j] = sum / rows and var_out[j] = M2 / rows.
template <typename acc_t, typename out_t>
struct MomentSink {
  acc_t* part;
  out_t *mean_out, *var_out;
  int64_t width, rows;
  C10_HOST_DEVICE void put(int64_t g, int64_t j, acc_t sum, acc_t m2) const {
    if (part != nullptr) {
      part[(g * 2) * width + j] = sum;
      part[(g * 2 + 1) * width + j] = m2;
    } else {
      mean_out[j] = static_cast<out_t>(sum / static_cast<acc_t>(rows));
      var_out[j] = static_cast<out_t>(m2 / static_cast<acc_t>(rows));
    }
  }
};

// Level 1: the sum of a chunk's rows, then the sum of their squared deviations from the chunk's mean.
template <typename acc_t, typename out_t, class Value>
struct MomentPartials {
  Value value;
  int64_t rows, chunk_rows;
  MomentSink<acc_t, out_t> sink;
  C10_HOST_DEVICE void operator()(int64_t i) const {
    int64_t chunk, j;
    divmod(i, sink.width, chunk, j);
    const int64_t r0 = chunk * chunk_rows, r1 = r0 + chunk_rows < rows ? r0 + chunk_rows : rows;
    acc_t sum = acc_t(0), m2 = acc_t(0);
    for (int64_t r = r0; r < r1; ++r) sum += value(r, j);
    const acc_t mean = sum / static_cast<acc_t>(r1 - r0);
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t d = value(r, j) - mean;
      m2 += d * d;
    }
    sink.put(chunk, j, sum, m2);
  }
};

// One tree level: group o merges inputs t in [o*kTreeFanIn, (o+1)*kTreeFanIn) below n_in, in order (Chan
// et al.: M2 = M2a + M2b + (mean_b - mean_a)^2 * na*nb/(na + nb)); input t covers rows
// [t*span, (t+1)*span) below rows.
template <typename acc_t, typename out_t>
struct MomentMerge {
  const acc_t* in;
  int64_t n_in, span;
  MomentSink<acc_t, out_t> sink;
  C10_HOST_DEVICE acc_t count(int64_t t) const {
    const int64_t left = sink.rows - t * span;
    return static_cast<acc_t>(left < span ? left : span);
  }
  C10_HOST_DEVICE void operator()(int64_t i) const {
    const int64_t width = sink.width;
    int64_t o, j;
    divmod(i, width, o, j);
    const int64_t t0 = o * kTreeFanIn, t1 = t0 + kTreeFanIn < n_in ? t0 + kTreeFanIn : n_in;
    acc_t sum = in[(t0 * 2) * width + j], m2 = in[(t0 * 2 + 1) * width + j], n = count(t0);
    for (int64_t t = t0 + 1; t < t1; ++t) {
      const acc_t nb = count(t), sb = in[(t * 2) * width + j];
      const acc_t delta = sb / nb - sum / n;
      m2 += in[(t * 2 + 1) * width + j] + delta * delta * (n * nb / (n + nb));
      sum += sb;
      n += nb;
    }
    sink.put(o, j, sum, m2);
  }
};

// Mean and biased variance of `width` columns of `rows` values (value(r, j)), in out_t.
template <typename acc_t, typename out_t, class Value>
void moments(const Value& value, int64_t rows, int64_t width, out_t* mean_out, out_t* var_out,
             const at::TensorOptions& acc_opts) {
  TORCH_INTERNAL_ASSERT(rows > 0 && width > 0);
  const MomentSink<acc_t, out_t> last{nullptr, mean_out, var_out, width, rows};
  const int64_t chunk = moment_chunk_rows(rows, width);
  int64_t n = ceil_div(rows, chunk), span = chunk;
  if (n == 1) {
    for_each(width, MomentPartials<acc_t, out_t, Value>{value, rows, chunk, last});
    return;
  }
  at::Tensor part = at::empty({n, 2 * width}, acc_opts);
  for_each(n * width, MomentPartials<acc_t, out_t, Value>{value, rows, chunk,
                                                          {part.data_ptr<acc_t>(), nullptr, nullptr, width, rows}});
  while (true) {
    const int64_t n_out = ceil_div(n, kTreeFanIn);
    if (n_out == 1) {
      for_each(width, MomentMerge<acc_t, out_t>{part.data_ptr<acc_t>(), n, span, last});
      return;
    }
    at::Tensor next = at::empty({n_out, 2 * width}, acc_opts);
    for_each(n_out * width, MomentMerge<acc_t, out_t>{part.data_ptr<acc_t>(), n, span,
                                                      {next.data_ptr<acc_t>(), nullptr, nullptr, width, rows}});
    part = next;  // the caching allocator reuses the old block only for later work on this stream
    n = n_out;
    span *= kTreeFanIn;
  }
}

// Mean and biased variance of columns [c0, c0 + width) of x[rows, ld].
template <typename T, typename acc_t, typename out_t>
void column_moments(const T* x, int64_t rows, int64_t ld, int64_t c0, int64_t width, out_t* mean_out,
                    out_t* var_out, const at::TensorOptions& acc_opts) {
  moments<acc_t, out_t>(ColumnValue<T, acc_t>{x, ld, c0}, rows, width, mean_out, var_out, acc_opts);
}

}  // namespace dnf::DNF_CUDA_NS
