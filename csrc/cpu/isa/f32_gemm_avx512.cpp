// The AVX-512 kernel of cpu/f32_gemm.h. Library headers first (isa/prelude.h); only these functions get the
// AVX-512 target, and they run only where f32_kernel_available().
#include "cpu/isa/prelude.h"
#include "cpu/f32_gemm.h"

#include <array>
#include <limits>
#include <type_traits>
#include <utility>

#if DNF_MULTI_ISA
#include <immintrin.h>

#include "cpu/isa/masks.h"

namespace dnf::cpu {

// The AVX-512 build is registered only on CPUs that support it (isa.cpp).
bool f32_kernel_available() { return cpu_isa() == CpuIsa::kAvx512; }

// Panel p of the packed weight (below, with the AVX-512 target): its `cols` <= 32 valid columns.
void pack_panel(const float* W, int64_t k, int64_t cols, int64_t p, float* out);

F32Weight f32_pack_weight(const float* W, int64_t n, int64_t k) {
  TORCH_CHECK(n > 0 && k > 0, "densenet_fast: f32_pack_weight needs n, k > 0, got ", n, ", ", k);
  TORCH_CHECK(16 * k * 4 <= std::numeric_limits<int32_t>::max(), "densenet_fast: f32_pack_weight: k = ", k,
              " too large for 32-bit gather offsets");
  F32Weight P;
  P.k = k, P.n = n, P.panels = (n + kF32Panel - 1) / kF32Panel;
  // Not zeroed: pack_panel writes every value (zeros past column n).
  P.data = AlignedBuffer<float>(P.panels * k * kF32Panel, /*zeroed=*/false);
  // Per call, on the threads: a panel row holds the k-th values of 32 weight rows.
  at::parallel_for(0, P.panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) pack_panel(W, k, std::min(kF32Panel, n - p * kF32Panel), p, P.data.data());
  });
  return P;
}

F32Weight f32_pack_kn(const float* B, int64_t k, int64_t n) {
  TORCH_CHECK(n > 0 && k > 0, "densenet_fast: f32_pack_kn needs n, k > 0, got ", n, ", ", k);
  F32Weight P;
  P.k = k, P.n = n, P.panels = (n + kF32Panel - 1) / kF32Panel;
  P.data = AlignedBuffer<float>(P.panels * k * kF32Panel, /*zeroed=*/true);
  for (int64_t p = 0; p < P.panels; ++p) {
    const int64_t cols = std::min(kF32Panel, n - p * kF32Panel);
    float* out = P.data.data() + p * k * kF32Panel;
    for (int64_t kk = 0; kk < k; ++kk)
      std::copy(B + kk * n + p * kF32Panel, B + kk * n + p * kF32Panel + cols, out + kk * kF32Panel);
  }
  return P;
}

}  // namespace dnf::cpu

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")

namespace dnf::cpu {
namespace {

// max(0, v) returns v when v is NaN, as relu() in bn_math.h. (The zero-masked form: GCC 12 warns that the
// plain _mm512_max_ps's undefined pass-through operand "may be used uninitialized".)
inline __m512 relu16(__m512 v) { return _mm512_maskz_max_ps(__mmask16(0xFFFF), _mm512_setzero_ps(), v); }

// 16 values (those of mask m, the rest zero) as float: a float row, or a bfloat16 row widened.
inline __m512 load16(const float* x, __mmask16 m) { return _mm512_maskz_loadu_ps(m, x); }
inline __m512 load16(const c10::BFloat16* x, __mmask16 m) {
  const __m512i w = _mm512_maskz_cvtepu16_epi32(__mmask16(0xFFFF), _mm256_maskz_loadu_epi16(m, x));
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(__mmask16(0xFFFF), w, 16));
}

// The bfloat16 bits of v rounded to nearest even, NaN a quiet NaN: kernels.h's from_f, 16 lanes at a time (the
// CPUs this stage computes in float32 for have no vcvtneps2bf16).
inline __m512i bf16_bits(__m512 v) {
  constexpr __mmask16 all = 0xFFFF;  // the zero-masked shifts: see relu16
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(all, u, 16), _mm512_set1_epi32(1));
  const __m512i biased = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __m512i r = _mm512_maskz_srli_epi32(all, biased, 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
}

// v as the output stores it (float: itself; bfloat16: rounded), and the store of those 16 lanes (mask m).
inline __m512 as_stored(__m512 v, const float*) { return v; }
inline __m512 as_stored(__m512 v, const c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(__mmask16(0xFFFF), bf16_bits(v), 16));
}
inline void store16(float* p, __mmask16 m, __m512 v) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(c10::BFloat16* p, __mmask16 m, __m512 v) { _mm512_mask_cvtepi32_storeu_epi16(p, m, bf16_bits(v)); }

// relu(a*x + b) of 16 channels (those of mask m).
template <typename S>
inline __m512 bn_relu16(const S* x, const float* a, const float* b, __mmask16 m) {
  return relu16(_mm512_fmadd_ps(load16(x, m), _mm512_maskz_loadu_ps(m, a), _mm512_maskz_loadu_ps(m, b)));
}

// Y[r, 0:width] (and V) for MR rows of the operand U (rows ldu apart) times one weight panel ([k, 32]); Y of the
// storage type S, V of S or float (a bfloat16 V widened: its values rounded to S first).
template <int MR, typename S, typename SV>
void microkernel(const float* U, int64_t ldu, int64_t k, const float* panel, int64_t width, S* Y, int64_t ldy,
                 const float* a2, const float* b2, SV* V) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m512 w0 = _mm512_load_ps(panel + kk * kF32Panel), w1 = _mm512_load_ps(panel + kk * kF32Panel + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 u = _mm512_set1_ps(U[r * ldu + kk]);
      lo[r] = _mm512_fmadd_ps(u, w0, lo[r]);
      hi[r] = _mm512_fmadd_ps(u, w1, hi[r]);
    }
  }
  const __mmask16 m0 = first_n16(width), m1 = first_n16(width - 16);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    store16(Y + r * ldy, m0, lo[r]);
    store16(Y + r * ldy + 16, m1, hi[r]);
  }
  if (V == nullptr) return;
  // V from the accumulators while they are in registers, as Y was stored (rounded, for bfloat16).
  const __m512 a0 = _mm512_maskz_loadu_ps(m0, a2), a1 = _mm512_maskz_loadu_ps(m1, a2 + 16);
  const __m512 c0 = _mm512_maskz_loadu_ps(m0, b2), c1 = _mm512_maskz_loadu_ps(m1, b2 + 16);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    const __m512 v0 = relu16(_mm512_fmadd_ps(as_stored(lo[r], Y), a0, c0));
    const __m512 v1 = relu16(_mm512_fmadd_ps(as_stored(hi[r], Y), a1, c1));
    if constexpr (std::is_same_v<S, SV>) {
      store16(V + r * ldy, m0, v0);
      store16(V + r * ldy + 16, m1, v1);
    } else {
      store16(V + r * ldy, m0, as_stored(v0, Y));
      store16(V + r * ldy + 16, m1, as_stored(v1, Y));
    }
  }
}

template <typename S, typename SV>
using Microkernel = decltype(&microkernel<1, S, SV>);
template <typename S, typename SV, size_t... I>
constexpr std::array<Microkernel<S, SV>, sizeof...(I)> microkernels(std::index_sequence<I...>) {
  return {&microkernel<int(I) + 1, S, SV>...};
}
// [mr - 1]: the last block's rows
template <typename S, typename SV>
constexpr auto kMicrokernels = microkernels<S, SV>(std::make_index_sequence<kF32Rows>());

// U = relu(a*X + b) of rows rows (X of the storage type S), rounded to S (the operand of a bfloat16 stage holds
// bfloat16 values, as on every other path), as float.
template <typename S>
void bn_relu_rows_as_f32(const S* X, int64_t ld, int64_t rows, int64_t c, const float* a, const float* b, float* U,
                         int64_t ldu) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* xr = X + r * ld;
    float* ur = U + r * ldu;
    for (int64_t j = 0; j < c; j += 16) {
      const __mmask16 m = first_n16(c - j);
      _mm512_mask_storeu_ps(ur + j, m, as_stored(bn_relu16(xr + j, a + j, b + j, m), xr));
    }
  }
}

template <typename S, typename SV>
void bn_relu_gemm_rows(const S* X, int64_t ld, int64_t r0, int64_t r1, int64_t c, const float* a, const float* b,
                       const F32Weight& W, S* Y, const float* a2, const float* b2, SV* V) {
  if (r1 <= r0) return;
  TORCH_CHECK(W.k == c, "densenet_fast: f32_bn_relu_gemm_rows: weight packed for k = ", W.k, ", got c = ", c);
  const int64_t n = W.n, ldu = (c + 15) / 16 * 16;  // operand rows on 64-byte boundaries
  AlignedBuffer<float> U(kF32Rows * ldu, /*zeroed=*/false);  // every value read is written by the prologue
  for (int64_t r = r0; r < r1; r += kF32Rows) {
    const int64_t mr = std::min<int64_t>(kF32Rows, r1 - r);
    bn_relu_rows_as_f32(X + r * ld, ld, mr, c, a, b, U.data(), ldu);
    for (int64_t p = 0; p < W.panels; ++p) {
      const int64_t col = p * kF32Panel;
      kMicrokernels<S, SV>[mr - 1](U.data(), ldu, c, W.panel(p), std::min(kF32Panel, n - col), Y + r * n + col, n,
                               a2 ? a2 + col : nullptr, b2 ? b2 + col : nullptr, V ? V + r * n + col : nullptr);
    }
  }
}

// C[i0 + r, j0 : j0 + 32] += sum over the nr rows p of A[p, i0 + r] * U[p, j0 : j0 + 32] (MR values of i; the
// columns of mask m0 / m1).
template <int MR>
void tn_block(const float* A, int64_t lda, const float* U, int64_t ldu, int64_t nr, int64_t i0, int64_t j0,
              __mmask16 m0, __mmask16 m1, float* C, int64_t ldc) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  const float* a = A + i0;
  const float* u = U + j0;
  for (int64_t p = 0; p < nr; ++p, a += lda, u += ldu) {
    const __m512 u0 = _mm512_maskz_loadu_ps(m0, u), u1 = _mm512_maskz_loadu_ps(m1, u + 16);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(a[r]);
      lo[r] = _mm512_fmadd_ps(x, u0, lo[r]);
      hi[r] = _mm512_fmadd_ps(x, u1, hi[r]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* c = C + (i0 + r) * ldc + j0;
    _mm512_mask_storeu_ps(c, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, c), lo[r]));
    _mm512_mask_storeu_ps(c + 16, m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, c + 16), hi[r]));
  }
}
template <size_t... I>
constexpr auto tn_blocks(std::index_sequence<I...>) {
  return std::array<decltype(&tn_block<1>), sizeof...(I)>{&tn_block<int(I) + 1>...};
}
constexpr auto kTnBlocks = tn_blocks(std::make_index_sequence<kF32Rows>());

}  // namespace

void f32_gemm_rows(const float* A, int64_t rows, const F32Weight& B, float* C) {
  const int64_t k = B.k, n = B.n;
  for (int64_t r = 0; r < rows; r += kF32Rows) {
    const int64_t mr = std::min<int64_t>(kF32Rows, rows - r);
    for (int64_t p = 0; p < B.panels; ++p) {
      const int64_t col = p * kF32Panel;
      kMicrokernels<float, float>[mr - 1](A + r * k, k, k, B.panel(p), std::min(kF32Panel, n - col), C + r * n + col,
                                          n, nullptr, nullptr, static_cast<float*>(nullptr));
    }
  }
}

void f32_gemm_tn_acc(const float* A, const float* U, int64_t nr, int64_t k, int64_t n, float* C) {
  for (int64_t j0 = 0; j0 < n; j0 += kF32Panel) {
    const __mmask16 m0 = first_n16(n - j0), m1 = first_n16(n - j0 - 16);
    for (int64_t i0 = 0; i0 < k; i0 += kF32Rows) {
      const int64_t mr = std::min<int64_t>(kF32Rows, k - i0);
      kTnBlocks[mr - 1](A, k, U, n, nr, i0, j0, m0, m1, C, n);
    }
  }
}

// Per k, the panel row is two 16-lane gathers of 32 weight rows' k-th values (element by element: densenet121's
// block-3 weight, 128 x 992, took ~5% of the stage).
void pack_panel(const float* W, int64_t k, int64_t cols, int64_t p, float* out) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(k)));  // element offsets
  const __mmask16 m0 = first_n16(cols), m1 = first_n16(cols - 16);
  const float* w0 = W + p * kF32Panel * k;
  const float* w1 = w0 + 16 * k;
  out += p * k * kF32Panel;
  for (int64_t kk = 0; kk < k; ++kk) {
    _mm512_store_ps(out + kk * kF32Panel, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m0, rows, w0 + kk, 4));
    _mm512_store_ps(out + kk * kF32Panel + 16, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m1, rows, w1 + kk, 4));
  }
}

void f32_bn_relu_rows(const float* X, int64_t ld, int64_t rows, int64_t c, const float* a, const float* b, float* U,
                      int64_t ldu) {
  bn_relu_rows_as_f32(X, ld, rows, c, a, b, U, ldu);
}

void f32_bn_relu_gemm_rows(const float* X, int64_t ld, int64_t r0, int64_t r1, int64_t c, const float* a,
                           const float* b, const F32Weight& W, float* Y, const float* a2, const float* b2, float* V) {
  bn_relu_gemm_rows(X, ld, r0, r1, c, a, b, W, Y, a2, b2, V);
}

void f32_bn_relu_gemm_rows(const c10::BFloat16* X, int64_t ld, int64_t r0, int64_t r1, int64_t c, const float* a,
                           const float* b, const F32Weight& W, c10::BFloat16* Y, const float* a2, const float* b2,
                           c10::BFloat16* V) {
  bn_relu_gemm_rows(X, ld, r0, r1, c, a, b, W, Y, a2, b2, V);
}

void f32_bn_relu_gemm_rows(const c10::BFloat16* X, int64_t ld, int64_t r0, int64_t r1, int64_t c, const float* a,
                           const float* b, const F32Weight& W, c10::BFloat16* Y, const float* a2, const float* b2,
                           float* V) {
  bn_relu_gemm_rows(X, ld, r0, r1, c, a, b, W, Y, a2, b2, V);
}

}  // namespace dnf::cpu

#else  // no x86-64 GCC/Clang build: never available

namespace dnf::cpu {
bool f32_kernel_available() { return false; }
F32Weight f32_pack_weight(const float*, int64_t, int64_t) { TORCH_CHECK(false, "densenet_fast: no AVX-512 build"); }
void f32_bn_relu_gemm_rows(const float*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                           const F32Weight&, float*, const float*, const float*, float*) {
  TORCH_CHECK(false, "densenet_fast: no AVX-512 build");
}
void f32_bn_relu_gemm_rows(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                           const F32Weight&, c10::BFloat16*, const float*, const float*, c10::BFloat16*) {
  TORCH_CHECK(false, "densenet_fast: no AVX-512 build");
}
void f32_bn_relu_gemm_rows(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                           const F32Weight&, c10::BFloat16*, const float*, const float*, float*) {
  TORCH_CHECK(false, "densenet_fast: no AVX-512 build");
}
void f32_bn_relu_rows(const float*, int64_t, int64_t, int64_t, const float*, const float*, float*, int64_t) {
  TORCH_CHECK(false, "densenet_fast: no AVX-512 build");
}
F32Weight f32_pack_kn(const float*, int64_t, int64_t) { TORCH_CHECK(false, "densenet_fast: no AVX-512 build"); }
void f32_gemm_rows(const float*, int64_t, const F32Weight&, float*) {
  TORCH_CHECK(false, "densenet_fast: no AVX-512 build");
}
void f32_gemm_tn_acc(const float*, const float*, int64_t, int64_t, int64_t, float*) {
  TORCH_CHECK(false, "densenet_fast: no AVX-512 build");
}
}  // namespace dnf::cpu

#endif
