// The AMX kernel of cpu/conv3x3_bf16.h. Library headers first (isa/prelude.h); only the kernel gets the AMX /
// AVX512_BF16 target, and it runs only where amx_kernel_available().
#include "cpu/isa/prelude.h"
#include "cpu/amx_gemm.h"
#include "cpu/bf16_rows.h"
#include "cpu/isa/amx_tile_config.h"
#include "cpu/conv3x3_bf16.h"

namespace dnf::cpu {

namespace {

// The packed weight of a forward convolution with `cout` outputs and `cin` inputs whose value at (output o, input i,
// tap t) is value(o, i, t) (a float32 master value, rounded here once, as conv3x3_weight in cpu/conv3x3.cpp rounds
// oneDNN's weight): tile (t, kb, cb) holds value(cb*16 + col, kb*32 + 2p + e, t) at (p*16 + col)*2 + e.
template <typename Value>
AmxConvWeight pack(int64_t cout, int64_t cin, int64_t taps, Value value) {
  TORCH_CHECK(amx_conv3x3_fits(cin, cout), "densenet_fast: amx_conv3x3_pack needs input and output channels "
              "multiples of 32, got ", cin, " and ", cout);
  AmxConvWeight P;
  P.taps = taps, P.cin = cin, P.cout = cout;
  const int64_t ksteps = cin / 32, cblocks = cout / 16;
  // Per call (every layer of every step), so on the threads: one tile per task.
  P.data = AlignedBuffer<c10::BFloat16>(taps * cin * cout, /*zeroed=*/false);
  const bool native = native_bf16_rows();
  at::parallel_for(0, taps * ksteps * cblocks, 1, [&](int64_t i0, int64_t i1) {
    alignas(64) float tile[512];
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t cb = i % cblocks, kb = (i / cblocks) % ksteps, t = i / (cblocks * ksteps);
      for (int64_t col = 0; col < 16; ++col)
        for (int64_t q = 0; q < 32; ++q) tile[((q / 2) * 16 + col) * 2 + q % 2] = value(cb * 16 + col, kb * 32 + q, t);
      c10::BFloat16* dst = P.data.data() + i * 512;
      if (native) {
        narrow_native(tile, 512, dst);
      } else {
        for (int64_t q = 0; q < 512; ++q) dst[q] = c10::BFloat16(tile[q]);
      }
    }
  });
  return P;
}

}  // namespace

AmxConvWeight amx_conv3x3_pack(const float* w, int64_t cout, int64_t cin, int64_t taps) {
  return pack(cout, cin, taps, [&](int64_t o, int64_t i, int64_t t) { return w[(o * cin + i) * taps + t]; });
}

AmxConvWeight amx_conv3x3_pack_input_grad(const float* w, int64_t cout, int64_t cin, int64_t taps) {
  return pack(cin, cout, taps,
              [&](int64_t o, int64_t i, int64_t t) { return w[(i * cin + o) * taps + (taps - 1 - t)]; });
}

}  // namespace dnf::cpu

#if DNF_MULTI_ISA && defined(__linux__)
#include <immintrin.h>

#pragma GCC target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

namespace dnf::cpu {

void amx_conv3x3_frame(const c10::BFloat16* Vp, const AmxConvFrame& f, const AmxConvWeight& W, c10::BFloat16* out,
                       int64_t ld_out) {
  TORCH_CHECK(W.taps == f.taps(), "densenet_fast: amx_conv3x3_frame: a ", W.taps, "-tap weight on a ", f.dims,
              "-D frame");
  const int64_t cin = W.cin, ksteps = cin / 32, cpairs = W.cout / 32, taps = W.taps;
  const int64_t Wp = f.W + 2, Hp = f.H + 2;
  int64_t shift[27];
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t kw = t % 3, kh = (t / 3) % 3, kd = t / 9;
    shift[t] = ((f.dims == 3 ? (kd - 1) * Hp : 0) + kh - 1) * Wp + kw - 1;
  }
  // Blocks of 32 rows from the first sample's first pixel to the last sample's last one.
  const int64_t r_a = f.row(0, 0, 0, 0), r_b = f.row(f.N - 1, f.D - 1, f.H - 1, f.W - 1) + 1;
  const int64_t nblocks = (r_b - r_a + 31) / 32;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    // Tiles 0-3: the 32 x 32 float result block; 4-5: its two 16-row halves of the input; 6-7: two 16-channel
    // weight tiles.
    const TileConfig cfg = TileConfig::full(8);
    _tile_loadconfig(&cfg);
    alignas(64) float res[32 * 32];
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t r0 = r_a + bi * 32;
      for (int64_t cp = 0; cp < cpairs; ++cp) {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t t = 0; t < taps; ++t) {
          const c10::BFloat16* a = Vp + (r0 + shift[t]) * cin;
          for (int64_t kb = 0; kb < ksteps; ++kb) {
            _tile_loadd(4, a + kb * 32, cin * 2);
            _tile_loadd(5, a + 16 * cin + kb * 32, cin * 2);
            _tile_loadd(6, W.tile(t, kb, 2 * cp), 64);
            _tile_loadd(7, W.tile(t, kb, 2 * cp + 1), 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, res, 128);
        _tile_stored(1, res + 16, 128);
        _tile_stored(2, res + 16 * 32, 128);
        _tile_stored(3, res + 16 * 32 + 16, 128);
        // The block's output pixels (its padding rows dropped), rounded once.
        for (int64_t r = 0; r < 32 && r0 + r < r_b; ++r) {
          const int64_t q = r0 + r, w = q % Wp - 1, line = q / Wp, h = line % Hp - 1;
          if (w < 0 || w >= f.W || h < 0 || h >= f.H) continue;
          const int64_t slab = line / Hp;  // (n, padded d) in 3-D, n in 2-D
          const int64_t n = f.dims == 3 ? slab / f.Dp() : slab, d = f.dims == 3 ? slab % f.Dp() - 1 : 0;
          if (d < 0 || d >= f.D) continue;
          const int64_t p = ((n * f.D + d) * f.H + h) * f.W + w;
          const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_load_ps(res + r * 32 + 16), _mm512_load_ps(res + r * 32));
          _mm512_storeu_si512(out + p * ld_out + cp * 32, (__m512i)v);
        }
      }
    }
    _tile_release();
  });
}

}  // namespace dnf::cpu

#else  // no x86-64 Linux GCC/Clang build: never available (amx_kernel_available() is false)

namespace dnf::cpu {
void amx_conv3x3_frame(const c10::BFloat16*, const AmxConvFrame&, const AmxConvWeight&, c10::BFloat16*, int64_t) {
  TORCH_CHECK(false, "densenet_fast: no AMX build");
}
}  // namespace dnf::cpu

#endif
