// Building blocks of the CPU dense-block kernels. Every 4-D activation is channels_last, i.e. a
// row-major [rows = N*H*W, ld] matrix whose columns are channels; a layer's input is a column prefix.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/bn_math.h"
#include "common/layout.h"
#include "cpu/amx_gemm.h"
#include "cpu/bf16_rows.h"
#include "cpu/f32_gemm.h"
#include "cpu/gemm_engine.h"

// The including kernel source names the ISA build (csrc/cpu/isa.h): base, avx2 or avx512.
#ifndef DNF_ISA
#error "define DNF_ISA (base, avx2 or avx512) before including cpu/kernels.h"
#endif

// Vectorise the loop that follows even where the compiler cannot prove its pointers do not alias
// (every inner loop over channels here reads and writes distinct arrays); without it GCC leaves
// loops with more than a few pointers scalar, with a data-dependent branch per ReLU.
#define DNF_SIMD _Pragma("omp simd")

namespace dnf::cpu::DNF_ISA {

using ::dnf::cl_format;  // common/layout.h: by spatial dims or by tensor

// The activation dtypes of the CPU kernels: float32, float64 and bfloat16 (CPU autocast), computed in
// Opmath<T> below.
#define DNF_DISPATCH_CPU_KERNEL(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, TYPE, NAME, __VA_ARGS__)

inline void check_cpu_dtype(const at::Tensor& input) {
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16,
              "input: expected dtype float32, float64 or bfloat16 on CPU, got ", st);
}

// A per-channel tensor (BN parameters or statistics, a gate) in the compute type F, contiguous: it may have
// the input's own dtype (a model cast with .bfloat16()).
template <typename F>
inline at::Tensor as_f(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<F>::value).contiguous();
}

// Conversions between the storage type T and the compute type F in the element loops. For bfloat16
// they are plain integer ops the compiler vectorises (c10::BFloat16's own conversion branches on NaN
// per element): widening is a shift; narrowing rounds to nearest even, NaN stays a quiet NaN.
template <typename F, typename T>
inline F to_f(T v) { return static_cast<F>(v); }
template <>
inline float to_f<float, c10::BFloat16>(c10::BFloat16 v) {
  uint32_t u = uint32_t(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
template <typename T, typename F>
inline T from_f(F v) { return static_cast<T>(v); }
template <>
inline c10::BFloat16 from_f<c10::BFloat16, float>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(v != v ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

// v rounded to the storage type T, held as O: T itself, or F (a bfloat16 value widened again, for a pass that
// computes in float32 on it).
template <typename T, typename O, typename F>
inline O stored_as(F v) {
  if constexpr (std::is_same_v<O, T>) {
    return from_f<T>(v);
  } else {
    return to_f<O>(from_f<T>(v));
  }
}

// Accumulation type of reductions: double, so statistics of long rows stay exact to well below the
// parity budgets (the stem BN gradient of a 121-layer network amplifies any roundoff).
template <typename T> struct Acc { using type = double; };

// Rows of a tile so that a [rows, channels] tile stays resident in the per-core L2 (~256 KiB).
inline int64_t tile_rows(int64_t channels, int64_t elem_size, int64_t target_bytes = 256 * 1024) {
  const int64_t target = target_bytes / std::max<int64_t>(1, channels * elem_size);
  return std::clamp<int64_t>(target, 16, 1024);
}

// The normalised input tile of the forward 1x1 (bn_relu_gemm): larger than the other tiles, since a skinny
// tile (densenet121's block 3: 66 rows of 992 channels at 256 KiB) runs the BLAS at ~0.8x of its rate on
// 132 rows; 512 KiB stays inside the per-core L2 of current Xeons (2 MiB) and EPYCs (1 MiB).
inline constexpr int64_t kGemmTileBytes = 512 * 1024;
inline constexpr int64_t kBrgemmMinRowsPerThread = 2048;

// Row chunks for reductions, a function of the row count only, so the result does not depend on the number of
// threads: ~64 chunks of 16 to kReduceChunk rows, which two to a few dozen threads share evenly (one fixed 2048-row
// chunk left densenet121's block 3, 1568 rows, and block 4, 392 rows, on one thread). float64 keeps the fixed
// chunks: its results are the parity reference against torchvision's, where densenet169's gradients sit at 0.9x the
// suite's bound (tests/conftest.py: any reordering of the sums moves them by ~1.5x), and its speed is not a target.
constexpr int64_t kReduceChunk = 2048;
template <typename T>
inline int64_t reduce_chunk(int64_t rows) {
  if constexpr (std::is_same_v<T, double>) return kReduceChunk;
  return std::clamp<int64_t>((rows + 63) / 64, 16, kReduceChunk);
}

// mean and biased variance of columns [c0, c0+width) of x[rows, ld], in F = Opmath<T>: one pass over memory, each
// chunk of rows summed twice while it is in cache (its values, then their squared deviations from the chunk's mean),
// the chunks combined in acc_t (the pairwise update of Chan, Golub and LeVeque: exact up to each chunk's own
// roundoff). Inside a chunk bfloat16 data sums in float (at most kReduceChunk values of bfloat16 precision: the
// double sums took as long as the block's forward 1x1 product on an AMX Xeon), other types in acc_t.
template <typename T, typename F = typename Opmath<T>::type>
void column_moments(const T* x, int64_t rows, int64_t ld, int64_t c0, int64_t width, F* mean_out,
                    F* var_out) {
  using acc_t = typename Acc<T>::type;
  using chunk_t = std::conditional_t<std::is_same_v<T, c10::BFloat16>, float, acc_t>;
  const int64_t chunk = reduce_chunk<T>(rows), nchunks = (rows + chunk - 1) / chunk;
  // per chunk: the sum of its values, and of their squared deviations from its mean rounded to F (mu_c below)
  std::vector<acc_t> sums(nchunks * width), m2s(nchunks * width);
  auto rows_in = [&](int64_t ch) { return std::min(rows, (ch + 1) * chunk) - ch * chunk; };
  auto center = [&](int64_t ch, int64_t j) { return static_cast<F>(sums[ch * width + j] / acc_t(rows_in(ch))); };
  at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
    std::vector<chunk_t> s(width);
    std::vector<F> mu(width);
    for (int64_t ch = b; ch < e; ++ch) {
      const int64_t r0 = ch * chunk, r1 = std::min(rows, r0 + chunk);
      chunk_t* sp = s.data();
      std::fill(s.begin(), s.end(), chunk_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = x + r * ld + c0;
        DNF_SIMD for (int64_t j = 0; j < width; ++j) sp[j] += static_cast<chunk_t>(to_f<F>(row[j]));
      }
      for (int64_t j = 0; j < width; ++j) {
        sums[ch * width + j] = static_cast<acc_t>(s[j]);
        mu[j] = center(ch, j);
      }
      const F* mp = mu.data();
      std::fill(s.begin(), s.end(), chunk_t(0));
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = x + r * ld + c0;
        DNF_SIMD for (int64_t j = 0; j < width; ++j) {
          const F d = to_f<F>(row[j]) - mp[j];
          sp[j] += static_cast<chunk_t>(d * d);
        }
      }
      for (int64_t j = 0; j < width; ++j) m2s[ch * width + j] = static_cast<acc_t>(s[j]);
    }
  });
  for (int64_t j = 0; j < width; ++j) {
    acc_t total = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) total += sums[ch * width + j];
    const acc_t m = total / acc_t(rows);
    // sum (x - m)^2 = sum (x - mu_c)^2 + 2 (mu_c - m) sum (x - mu_c) + n_c (mu_c - m)^2, chunk by chunk
    acc_t m2 = 0;
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      const acc_t n = acc_t(rows_in(ch));
      const acc_t mu_c = static_cast<acc_t>(center(ch, j)), dm = mu_c - m;
      m2 += m2s[ch * width + j] + 2 * dm * (sums[ch * width + j] - n * mu_c) + n * dm * dm;
    }
    mean_out[j] = static_cast<F>(m);
    var_out[j] = static_cast<F>(m2 / acc_t(rows));
  }
}

// Per-channel folded BN: a = gamma*invstd, b = beta - mean*a; also returns invstd.
template <typename F>
void fold_channels(int64_t c, const F* gamma, const F* beta, const F* mean, const F* var, double eps,
                   F* a, F* b, F* invstd) {
  for (int64_t j = 0; j < c; ++j) {
    invstd[j] = invstd_from_var<F>(var[j], eps);
    fold_bn<F>(gamma[j], beta[j], mean[j], invstd[j], a[j], b[j]);
  }
}

// The activation after a folded BN on channel j: relu(z), or with per-channel slopes s (LeakyReLU / PReLU)
// leaky(z, s[j]).
template <bool kSlopes, typename F>
inline F bn_act(F z, const F* s, int64_t j) {
  if constexpr (kSlopes) {
    return leaky<F>(z, s[j]);
  } else {
    return relu<F>(z);
  }
}

// out[j] = act(a[j]*x[j] + b[j]), j < c: computed in F, rounded to T and held as O (T, or F for a bfloat16 pass
// computed in float32: stored_as). The one loop of bn_relu_tile and bn_relu_rows.
template <bool kSlopes, typename T, typename F, typename O>
inline void bn_act_row(const T* x, int64_t c, const F* a, const F* b, const F* s, O* out) {
  DNF_SIMD for (int64_t j = 0; j < c; ++j) {
    out[j] = stored_as<T, O>(bn_act<kSlopes, F>(to_f<F>(x[j]) * a[j] + b[j], s, j));
  }
}

// U[r, j] = act(a[j]*x[r0+r, j] + b[j]) for a tile of `rows` rows and the first c columns (computed in F, rounded to
// T: the GEMM operand, held as T or, for a bfloat16 stage computed in float32, widened again to F); act is ReLU,
// or with per-channel slopes s, LeakyReLU / PReLU (portable loop: the native bfloat16 rows compute ReLU only).
// U's rows are ldu >= c apart; columns c..ldu-1 are zeroed (the brgemm path's even-k padding).
template <typename T, typename F, typename O>
inline void bn_relu_tile(const T* x, int64_t ld, int64_t r0, int64_t rows, int64_t c, const F* a,
                         const F* b, O* U, int64_t ldu = -1, const F* s = nullptr) {
  if (ldu < 0) ldu = c;
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<O, T> && std::is_same_v<F, float>) {
    if (s == nullptr && native_bf16_rows()) return bn_relu_rows_native(x + r0 * ld, ld, rows, c, a, b, U, ldu);
  }
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + (r0 + r) * ld;
    O* ur = U + r * ldu;
    if (s == nullptr) {
      bn_act_row<false, T, F, O>(xr, c, a, b, s, ur);
    } else {
      bn_act_row<true, T, F, O>(xr, c, a, b, s, ur);
    }
    for (int64_t j = c; j < ldu; ++j) ur[j] = O(0);
  }
}

// The float values of n bfloat16 values (a weight, widened once per call for a stage computed in float32).
inline std::vector<float> widened(const c10::BFloat16* x, int64_t n) {
  std::vector<float> out(n);
  DNF_SIMD for (int64_t i = 0; i < n; ++i) out[i] = to_f<float>(x[i]);
  return out;
}

// out[i] = x[i] in the storage type, i < n.
template <typename T, typename F>
inline void narrow_rows(const F* x, int64_t n, T* out) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<F, float>) {
    if (native_bf16_rows()) return narrow_native(x, n, out);
  }
  DNF_SIMD for (int64_t i = 0; i < n; ++i) out[i] = from_f<T>(x[i]);
}

// V = relu(a*Y + b) (leaky(a*Y + b, s) with slopes s) for rows [r0, r0+rows) of [*, c] matrices, V of Y's type or
// F; V may alias Y.
template <typename T, typename F, typename O = T>
inline void bn_relu_rows(const T* Y, int64_t r0, int64_t rows, int64_t c, const F* a, const F* b, O* V,
                         const F* s = nullptr) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<O, T> && std::is_same_v<F, float>) {
    if (s == nullptr && native_bf16_rows()) return bn_relu_rows_native(Y + r0 * c, c, rows, c, a, b, V + r0 * c, c);
  }
  for (int64_t r = r0; r < r0 + rows; ++r) {
    if (s == nullptr) {
      bn_act_row<false, T, F, O>(Y + r * c, c, a, b, s, V + r * c);
    } else {
      bn_act_row<true, T, F, O>(Y + r * c, c, a, b, s, V + r * c);
    }
  }
}

// V = relu(a*Y + b) (leaky(a*Y + b, s) with slopes s) on a [rows, c] matrix, V of Y's type or F; V may alias Y.
template <typename T, typename F, typename O>
void bn_relu_out(const T* Y, int64_t rows, int64_t c, const F* a, const F* b, O* V, const F* s = nullptr) {
  at::parallel_for(0, rows, 256, [&](int64_t r0, int64_t r1) { bn_relu_rows<T, F>(Y, r0, r1 - r0, c, a, b, V, s); });
}

// The tile loop of bn_relu_gemm below, its operands of type Op: T's own (bfloat16 products on the bfloat16 engine)
// or, for a bfloat16 stage computed in float32, F (the bfloat16 values widened: the prologue's rounded rows, W).
// s1, s2: LeakyReLU / PReLU slopes of the prologue and of V (nullptr: ReLU). V: of type VO, T or (a bfloat16
// block whose 3x3 pass computes in float32) F holding the bfloat16 values.
template <typename T, typename F, typename Op, typename VO = T>
void bn_relu_gemm_tiles(const T* X, int64_t rows, int64_t ld, int64_t c, const F* a, const F* b, const Op* W,
                        int64_t n_out, T* Y, const F* a2, const F* b2, VO* V, const F* s1, const F* s2) {
  // Tiles of about kGemmTileBytes, their count a multiple of the threads (no thread idles in the last round:
  // densenet121's block 4 at batch 8 has 392 rows, 3 tiles of 132 rows on 2 threads ran at 0.76x of 4 of 98).
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t target = tile_rows(c, sizeof(Op), kGemmTileBytes);
  const int64_t rounds = ((rows + target - 1) / target + nt - 1) / nt;
  const int64_t tr = (rows + rounds * nt - 1) / (rounds * nt);
  const int64_t ntiles = (rows + tr - 1) / tr;
  // The brgemm engine multiplies with W^T packed once for all tiles. Rules: the output width a multiple of 16,
  // and at least kBrgemmMinRowsPerThread rows per thread (below that packing the weight costs more than the
  // faster tiles save: densenet121's blocks 3-4 at batch 8, 0.38x / 0.37x of oneDNN vs 0.46x / 0.62x on the
  // BLAS); otherwise the BLAS.
  PackedWeightT packed;
  bool use_brgemm = false;
  if constexpr (std::is_same_v<Op, c10::BFloat16>) {
    use_brgemm = gemm_engine(at::kBFloat16) == GemmEngine::kBrgemm && brgemm_packs(n_out) &&
                 rows >= kBrgemmMinRowsPerThread * nt;
    if (use_brgemm) packed = pack_weight_t(W, n_out, c);
  }
  const int64_t ldu = use_brgemm ? packed.kp : c;  // the brgemm path's even-k padding
  auto multiply = [&](const Op* U, int64_t nr, F* y) {  // y[nr, n_out] = U[nr, c] W^T
    if constexpr (std::is_same_v<Op, c10::BFloat16>) {
      if (use_brgemm) return brgemm_rows(nr, U, ldu, packed, y, n_out);
    }
    gemm_acc('T', 'N', n_out, nr, c, W, c, U, c, F(0), y, n_out);
  };
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<Op> U(tr * ldu);
    std::vector<F> Yt(std::is_same_v<T, F> ? 0 : tr * n_out);  // the product's float tile (bfloat16)
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * tr, nr = std::min(tr, rows - r0);
      bn_relu_tile<T, F>(X, ld, r0, nr, c, a, b, U.data(), ldu, s1);
      if constexpr (std::is_same_v<T, F>) {
        multiply(U.data(), nr, Y + r0 * n_out);
      } else {
        multiply(U.data(), nr, Yt.data());
        narrow_rows<T, F>(Yt.data(), nr * n_out, Y + r0 * n_out);
      }
      if (V != nullptr) bn_relu_rows<T, F>(Y, r0, nr, n_out, a2, b2, V, s2);
    }
    if (use_brgemm) brgemm_release_thread();
  });
}

// bn_relu_gemm (below) with the product in the storage type's own operands. With slopes the product runs on the
// tile loop (BLAS / oneDNN / brgemm, the portable prologue): our AMX and AVX-512 float32 kernels compute a ReLU
// prologue only (docs/design.md §3, "Other activations").
template <typename T, typename F, typename VO = T>
void bn_relu_gemm_stored(const T* X, int64_t rows, int64_t ld, int64_t c, const F* a, const F* b, const T* W,
                         int64_t n_out, T* Y, const F* a2, const F* b2, VO* V, const F* s1 = nullptr,
                         const F* s2 = nullptr) {
  const bool relu_only = s1 == nullptr && (V == nullptr || s2 == nullptr);
  if constexpr (std::is_same_v<T, c10::BFloat16> && !std::is_same_v<VO, T>) {
    // A widened V (a float32 3x3 pass): our AMX kernel writes bfloat16 only, so it computes Y and V follows in
    // one pass over Y (AMX CPUs run their 3x3 passes in bfloat16 unless DNF_CPU_BF16_CONV=fp32 forces float32).
    if (relu_only && V != nullptr && amx_kernel_fits(n_out) && use_amx_kernel()) {
      bn_relu_gemm_stored<T, F, T>(X, rows, ld, c, a, b, W, n_out, Y, a2, b2, nullptr, s1, nullptr);
      bn_relu_out<T, F>(Y, rows, n_out, a2, b2, V);
      return;
    }
  }
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<VO, T>) {
    // On AMX CPUs our own AMX kernel, prologue and narrowing pipelined per 32 rows (cpu/amx_gemm.h), whatever
    // the engine chosen for the other products (it beats all three on this stage: they multiply a tile
    // whose prologue and narrowing run before and after); each thread takes one contiguous range of blocks.
    if (relu_only && amx_kernel_fits(n_out) && use_amx_kernel()) {
      const AmxWeight P = amx_pack_weight(W, n_out, c);
      at::parallel_for(0, (rows + 31) / 32, 1, [&](int64_t b0, int64_t b1) {
        amx_bn_relu_gemm_rows(X, ld, b0 * 32, std::min(rows, b1 * 32), c, a, b, P, Y, a2, b2, V);
      });
      return;
    }
  }
  if constexpr (std::is_same_v<T, float> && std::is_same_v<VO, T>) {
    // Our own AVX-512 kernel where it measured faster than the engine (cpu/f32_gemm.h): prologue and product per
    // kF32Rows rows, the operand never repacked; each thread takes one contiguous range of blocks.
    if (relu_only && use_f32_kernel()) {
      const F32Weight P = f32_pack_weight(W, n_out, c);
      at::parallel_for(0, (rows + kF32Rows - 1) / kF32Rows, 1, [&](int64_t b0, int64_t b1) {
        f32_bn_relu_gemm_rows(X, ld, b0 * kF32Rows, std::min(rows, b1 * kF32Rows), c, a, b, P, Y, a2, b2, V);
      });
      return;
    }
  }
  bn_relu_gemm_tiles<T, F, T, VO>(X, rows, ld, c, a, b, W, n_out, Y, a2, b2, V, s1, s2);
}

// bn_relu_gemm of a bfloat16 stage computed in float32 (bf16_gemm_compute(), gemm_engine.h): the weight widened
// once per call, the prologue writes its bfloat16-rounded rows as float, the product runs on our float32 kernel
// (ReLU only) or the float32 engine, and Y (and V, from the rounded Y) are rounded to bfloat16 once: the values of
// the bfloat16 path, only the order of the float sums differs.
template <typename VO = c10::BFloat16>
void bn_relu_gemm_widened(const c10::BFloat16* X, int64_t rows, int64_t ld, int64_t c, const float* a,
                          const float* b, const c10::BFloat16* W, int64_t n_out, c10::BFloat16* Y,
                          const float* a2, const float* b2, VO* V, const float* s1 = nullptr,
                          const float* s2 = nullptr) {
  const std::vector<float> Wf = widened(W, n_out * c);
  const bool relu_only = s1 == nullptr && (V == nullptr || s2 == nullptr);
  if (relu_only && use_f32_kernel()) {
    const F32Weight P = f32_pack_weight(Wf.data(), n_out, c);
    at::parallel_for(0, (rows + kF32Rows - 1) / kF32Rows, 1, [&](int64_t b0, int64_t b1) {
      f32_bn_relu_gemm_rows(X, ld, b0 * kF32Rows, std::min(rows, b1 * kF32Rows), c, a, b, P, Y, a2, b2, V);
    });
    return;
  }
  bn_relu_gemm_tiles<c10::BFloat16, float, float, VO>(X, rows, ld, c, a, b, Wf.data(), n_out, Y, a2, b2, V, s1, s2);
}

// Y[rows, n_out] (T: the product is accumulated in F and rounded once, as a bfloat16 convolution's output
// under autocast) = act(a*X[:, :c] + b) @ W^T with W [n_out, c] row-major, tile by tile: the normalised
// input exists only as one cache-sized tile per thread. With V, also V = act(a2*Y + b2) on each tile while
// it is in cache (the backward's recompute, whose BN2 statistics are known), from the rounded Y.
// s1, s2: per-channel slopes of a LeakyReLU / PReLU in place of either ReLU (nullptr: ReLU). A bfloat16
// stage computes in bfloat16 or float32, as measured (bf16_gemm_compute()); call it outside parallel regions.
// V of type VO: T, or F holding T's values (bn_relu_gemm_into<T, F, F>: the input of a float32 3x3 pass).
template <typename T, typename F, typename VO>
void bn_relu_gemm_into(const T* X, int64_t rows, int64_t ld, int64_t c, const F* a, const F* b,
                       const T* W, int64_t n_out, T* Y, const F* a2, const F* b2, VO* V, const F* s1 = nullptr,
                       const F* s2 = nullptr) {
  if (rows == 0) return;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    if (bf16_gemm_compute() == at::kFloat) {
      return bn_relu_gemm_widened<VO>(X, rows, ld, c, a, b, W, n_out, Y, a2, b2, V, s1, s2);
    }
  }
  bn_relu_gemm_stored<T, F, VO>(X, rows, ld, c, a, b, W, n_out, Y, a2, b2, V, s1, s2);
}

template <typename T, typename F>
void bn_relu_gemm(const T* X, int64_t rows, int64_t ld, int64_t c, const F* a, const F* b,
                  const T* W, int64_t n_out, T* Y, const F* a2 = nullptr, const F* b2 = nullptr,
                  T* V = nullptr, const F* s1 = nullptr, const F* s2 = nullptr) {
  bn_relu_gemm_into<T, F, T>(X, rows, ld, c, a, b, W, n_out, Y, a2, b2, V, s1, s2);
}

// The two products of the 1x1 backward on a tile of nr rows, operands of type Op (T's own, or float for a
// bfloat16 stage computed in float32): dw[inter, c] += dY^T U and dU[nr, c] = dY W, column-major as the BLAS
// sees them (U [nr, c], dY [nr, inter], W [inter, c] row-major).
template <typename Op, typename F>
inline void gemm1x1_backward_products(const Op* U, const Op* dY, const Op* W, int64_t nr, int64_t c, int64_t inter,
                                      F* dw, F* dU) {
  gemm_acc('N', 'T', c, inter, nr, U, c, dY, inter, F(1), dw, c);
  gemm_acc('N', 'N', c, nr, inter, W, c, dY, inter, F(0), dU, c);
}

// Per-thread partial sums, reduced in thread order (deterministic for a given thread count).
template <typename T>
struct ThreadPartials {
  int64_t width;
  std::vector<T> data;
  ThreadPartials(int64_t w) : width(w), data(static_cast<size_t>(at::get_num_threads()) * w, T(0)) {}
  T* mine() { return data.data() + static_cast<int64_t>(at::get_thread_num()) * width; }
  // Outside parallel regions; split over the threads by columns (a weight gradient's partials are up to a few
  // hundred thousand values), each column summed in thread order.
  template <typename U>
  void reduce_into(U* out, bool accumulate = false) const {
    const int64_t nt = static_cast<int64_t>(data.size()) / width;
    at::parallel_for(0, width, 16384, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        T s = accumulate ? T(out[j]) : T(0);
        for (int64_t t = 0; t < nt; ++t) s += data[t * width + j];
        out[j] = static_cast<U>(s);
      }
    });
  }
};

}  // namespace dnf::cpu::DNF_ISA
