// The AMX kernel of cpu/amx_gemm.h. Library headers first (isa/prelude.h); only these functions get the
// AMX / AVX512_BF16 target, and they run only where amx_kernel_available().
#include "cpu/isa/prelude.h"
#include "cpu/amx_gemm.h"
#include "cpu/bf16_rows.h"
#include "cpu/isa/amx_tile_config.h"
#include "cpu/switches.h"

#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#if DNF_MULTI_ISA && defined(__linux__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cpu/isa/masks.h"

namespace dnf::cpu {
namespace {
constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl: request permission for an XSAVE feature
constexpr long kXfeatureXtiledata = 18;     // the AMX tile data
}  // namespace

bool amx_kernel_available() {
  static const bool ok = [] {
    __builtin_cpu_init();
    if (!native_bf16_rows() || !__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-bf16"))
      return false;
    // Linux hands out the tile state on request (oneDNN makes the same call); granted once per process.
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
}

bool use_amx_kernel() {
  static const bool on = [] {
    // "1" is the default made explicit: the kernel runs wherever it is available.
    return amx_kernel_available() && cpu_switch("DNF_CPU_AMX_KERNEL", {"0", "1"}) != "0";
  }();
  return on;
}

// Below, with the AVX-512 target: rows [r0, r1) of W with k permuted to the operand's order (even_odd_rows), and
// one 16-column block of the packed weight.
void even_odd_rows(const c10::BFloat16* W, int64_t k, int64_t kp, int64_t r0, int64_t r1, c10::BFloat16* out);
void pack_column_block(const c10::BFloat16* W, int64_t k, int64_t ksteps, int64_t cb, c10::BFloat16* out);

AmxWeight amx_pack_weight(const c10::BFloat16* W, int64_t n, int64_t k) {
  TORCH_CHECK(amx_kernel_fits(n), "densenet_fast: amx_pack_weight needs n a multiple of 32, got ", n);
  TORCH_CHECK(16 * k * 2 <= std::numeric_limits<int32_t>::max(), "densenet_fast: amx_pack_weight: k = ", k,
              " too large for 32-bit gather offsets");
  AmxWeight P;
  P.k = k, P.kp = (k + 31) / 32 * 32, P.n = n;
  P.data = AlignedBuffer<c10::BFloat16>(P.kp * n, /*zeroed=*/false);  // every tile is written whole
  const int64_t ksteps = P.kp / 32;
  // W with k in the operand's even/odd order, zero-padded to kp (so every k-step packs with whole gathers).
  AlignedBuffer<c10::BFloat16> Weo(n * P.kp, /*zeroed=*/false);
  // Per call, so on the threads (densenet121's block 3 weight, 128 x 992: 25-40 us element by element on one
  // thread, 10-25% of the whole stage at batch 8); each column block permutes its own 16 rows first.
  at::parallel_for(0, n / 16, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t cb = c0; cb < c1; ++cb) {
      even_odd_rows(W, k, P.kp, cb * 16, cb * 16 + 16, Weo.data());
      pack_column_block(Weo.data(), P.kp, ksteps, cb, P.data.data());
    }
  });
  return P;
}

}  // namespace dnf::cpu

#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

namespace dnf::cpu {
namespace {

constexpr int64_t kRows = 32;  // rows per block: two 16-row A tiles

}  // namespace

// Position q of every 32-wide k chunk of the operand holds k = 2q (q < 16) or 2(q - 16) + 1: the BN-ReLU
// prologue widens the even and the odd bfloat16 values of a 32-value load with one shift and one mask (no
// widening shuffle) and narrows them back with one vcvtne2ps2bf16 as [even 16 | odd 16]; the weight's k follows.
// (Measured on this Xeon with a standalone copy: 1-4% faster than the natural order, the most on block 2.)
constexpr int kEvenOdd[32] = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                              1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};

void even_odd_rows(const c10::BFloat16* W, int64_t k, int64_t kp, int64_t r0, int64_t r1, c10::BFloat16* out) {
  __m512i idx = _mm512_setzero_si512();
  {
    alignas(64) int16_t ix[32];
    for (int q = 0; q < 32; ++q) ix[q] = static_cast<int16_t>(kEvenOdd[q]);
    idx = _mm512_load_si512(ix);
  }
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t j = 0; j < kp; j += 32)
      _mm512_storeu_si512(out + r * kp + j,
                          _mm512_permutexvar_epi16(idx, _mm512_maskz_loadu_epi16(first_n32(k - j), W + r * k + j)));
}

// Tile (cb, kb) holds W[cb*16 + col, kb*32 + 2p + e] at (p*16 + col)*2 + e: per pair-row p, one 32-bit gather
// of the (k, k+1) pairs of the 16 weight rows; the last k-step, where k is not a multiple of 32, element by
// element (its padding stays zero).
void pack_column_block(const c10::BFloat16* W, int64_t k, int64_t ksteps, int64_t cb, c10::BFloat16* out) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(k * 2)));  // byte offsets
  const c10::BFloat16* w = W + cb * 16 * k;
  for (int64_t kb = 0; kb < ksteps; ++kb) {
    c10::BFloat16* tile = out + (cb * ksteps + kb) * 512;
    if ((kb + 1) * 32 <= k) {
      for (int64_t p = 0; p < 16; ++p)
        _mm512_store_si512(tile + p * 32, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), 0xFFFF, rows,
                                                                         w + kb * 32 + 2 * p, 1));
    } else {
      for (int64_t p = 0; p < 16; ++p)
        for (int64_t col = 0; col < 16; ++col)
          for (int64_t e = 0; e < 2; ++e) {
            const int64_t kk = kb * 32 + 2 * p + e;
            if (kk < k) tile[(p * 16 + col) * 2 + e] = w[col * k + kk];
          }
    }
  }
}

namespace {
// u[0, kp) = relu(a*x + b) in the even/odd order above; ae / be: a and b in that order, zero past c (so is u).
// max(0, v) returns v when v is NaN, as relu() in bn_math.h.
inline void bn_relu_row_even_odd(const c10::BFloat16* x, int64_t c, const float* ae, const float* be,
                                 c10::BFloat16* u, int64_t kp) {
  // The zero-masked forms of the shift and the max: GCC 12 warns that the plain ones' undefined pass-through
  // operand "may be used uninitialized".
  constexpr __mmask16 kAll = 0xFFFF;
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t j = 0; j < kp; j += 32) {
    const __m512i v = _mm512_maskz_loadu_epi16(first_n32(c - j), x + j);
    const __m512 even = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAll, v, 16));
    const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
    const __m512 ue =
        _mm512_maskz_max_ps(kAll, zero, _mm512_fmadd_ps(even, _mm512_load_ps(ae + j), _mm512_load_ps(be + j)));
    const __m512 uo = _mm512_maskz_max_ps(kAll, zero,
                                          _mm512_fmadd_ps(odd, _mm512_load_ps(ae + j + 16), _mm512_load_ps(be + j + 16)));
    _mm512_store_si512(u + j, (__m512i)_mm512_cvtne2ps_pbh(uo, ue));
  }
}
}  // namespace

void amx_bn_relu_gemm_rows(const c10::BFloat16* X, int64_t ld, int64_t r0, int64_t r1, int64_t c, const float* a,
                           const float* b, const AmxWeight& W, c10::BFloat16* Y, const float* a2, const float* b2,
                           c10::BFloat16* V) {
  if (r1 <= r0) return;
  const int64_t kp = W.kp, n = W.n, ksteps = kp / 32, nblocks = (r1 - r0 + kRows - 1) / kRows;
  // Tiles 0-3: the 32 x 32 float result block; 4-5: the two 16-row halves of U; 6-7: two 16-column weight tiles.
  const TileConfig cfg = TileConfig::full(8);
  _tile_loadconfig(&cfg);
  // Two operands and two float results, 64-byte aligned (a tile row across two cache lines loads at half
  // speed: block 2's product ran 2.9x slower from a 16-byte aligned operand). The results' second copy is
  // offset by 64 floats so that the tile stores into one and the narrowing loads from the other do not
  // alias on the low 12 address bits.
  const int64_t u_size = kRows * kp, yt_size = kRows * n + 64;
  // Not zeroed: the prologue writes every operand row (k padding and rows past r1 as zeros), the tile stores
  // every result value the narrowing reads.
  AlignedBuffer<c10::BFloat16> U(2 * u_size, /*zeroed=*/false);
  AlignedBuffer<float> Yt(2 * yt_size, /*zeroed=*/false);
  const c10::BFloat16* wp = W.tiles();
  AlignedBuffer<float> ab_eo(2 * kp, /*zeroed=*/false);  // a, then b, in the operand's k order
  float* ae = ab_eo.data();
  float* be = ab_eo.data() + kp;
  for (int64_t q = 0; q < kp; ++q) {
    const int64_t src = q / 32 * 32 + kEvenOdd[q % 32];
    ae[q] = src < c ? a[src] : 0.0f;
    be[q] = src < c ? b[src] : 0.0f;
  }
  auto prologue_row = [&](int64_t rb, int64_t r, c10::BFloat16* u) {  // row r of the block at rb into u
    if (rb + r < r1) bn_relu_row_even_odd(X + (rb + r) * ld, c, ae, be, u + r * kp, kp);
    else std::memset(static_cast<void*>(u + r * kp), 0, sizeof(c10::BFloat16) * kp);
  };
  auto narrow_row = [&](int64_t rb, int64_t r, const float* yt) {  // row r of the block at rb out of yt
    if (rb + r >= r1) return;
    narrow_native(yt + r * n, n, Y + (rb + r) * n);
    if (V != nullptr) bn_relu_rows_native(Y + (rb + r) * n, n, 1, n, a2, b2, V + (rb + r) * n, n);
  };
  // Software pipeline: while the tile unit multiplies block i, the vector units write block i+1's operand
  // and narrow block i-1's result, a row after every few tile steps, so the three overlap (measured on a
  // Xeon: 15% faster than running them in turn; the vector work alone is ~60% of the tile loop's time).
  for (int64_t r = 0; r < kRows; ++r) prologue_row(r0, r, U.data());
  const int64_t steps = (n / 32) * ksteps;
  for (int64_t i = 0; i < nblocks; ++i) {
    const int64_t rb = r0 + i * kRows;
    const c10::BFloat16* u = U.data() + (i & 1) * u_size;
    c10::BFloat16* u_next = U.data() + ((i + 1) & 1) * u_size;
    float* yt = Yt.data() + (i & 1) * yt_size;
    const float* yt_prev = Yt.data() + ((i + 1) & 1) * yt_size;
    int64_t pro = i + 1 < nblocks ? 0 : kRows, nar = i > 0 ? 0 : kRows;  // next rows to do (kRows: none)
    for (int64_t nb = 0; nb < n / 32; ++nb) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const c10::BFloat16* w0 = wp + (2 * nb) * ksteps * 512;
      const c10::BFloat16* w1 = wp + (2 * nb + 1) * ksteps * 512;
      for (int64_t kb = 0; kb < ksteps; ++kb) {
        _tile_loadd(4, u + kb * 32, kp * 2);
        _tile_loadd(5, u + 16 * kp + kb * 32, kp * 2);
        _tile_loadd(6, w0 + kb * 512, 64);
        _tile_loadd(7, w1 + kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        const int64_t due = kRows * (nb * ksteps + kb + 1) / steps;  // rows of each side due after this step
        for (; pro < due; ++pro) prologue_row(rb + kRows, pro, u_next);
        for (; nar < due; ++nar) narrow_row(rb - kRows, nar, yt_prev);
      }
      _tile_stored(0, yt + nb * 32, n * 4);
      _tile_stored(1, yt + nb * 32 + 16, n * 4);
      _tile_stored(2, yt + 16 * n + nb * 32, n * 4);
      _tile_stored(3, yt + 16 * n + nb * 32 + 16, n * 4);
    }
  }
  const int64_t last = nblocks - 1;
  for (int64_t r = 0; r < kRows; ++r) narrow_row(r0 + last * kRows, r, Yt.data() + (last & 1) * yt_size);
  _tile_release();
}

}  // namespace dnf::cpu

#else  // no x86-64 Linux GCC/Clang build: never available

namespace dnf::cpu {
bool amx_kernel_available() { return false; }
bool use_amx_kernel() { return false; }
AmxWeight amx_pack_weight(const c10::BFloat16*, int64_t, int64_t) {
  TORCH_CHECK(false, "densenet_fast: no AMX build");
}
void amx_bn_relu_gemm_rows(const c10::BFloat16*, int64_t, int64_t, int64_t, int64_t, const float*, const float*,
                           const AmxWeight&, c10::BFloat16*, const float*, const float*, c10::BFloat16*) {
  TORCH_CHECK(false, "densenet_fast: no AMX build");
}
}  // namespace dnf::cpu

#endif
