// The AVX-512 kernels of cpu/conv3x3_f32.h. Library headers first (isa/prelude.h); only the kernels get the
// AVX-512 target, and they run only where f32_kernel_available() (cpu/f32_gemm.h).
#include "cpu/isa/prelude.h"
#include "cpu/conv3x3_f32.h"

#include <array>
#include <utility>

#if DNF_MULTI_ISA
#include <immintrin.h>

#include "cpu/isa/masks.h"

namespace dnf::cpu {
namespace {

// w [cout, cin, taps] -> panels of `cols` outputs: value (t, i, j) of panel p is src(p*32 + j, i, t) (0 past cols).
template <typename Src>
Conv3x3Weight pack(int64_t taps, int64_t cin, int64_t cout, Src src) {
  TORCH_CHECK(taps > 0 && cin > 0 && cout > 0, "densenet_fast: conv3x3 weight needs taps, cin, cout > 0, got ",
              taps, ", ", cin, ", ", cout);
  Conv3x3Weight P;
  P.taps = taps, P.cin = cin, P.cout = cout, P.panels = (cout + kConvPanel - 1) / kConvPanel;
  P.data = AlignedBuffer<float>(P.panels * taps * cin * kConvPanel, /*zeroed=*/true);
  for (int64_t p = 0; p < P.panels; ++p) {
    float* out = P.data.data() + p * taps * cin * kConvPanel;
    const int64_t cols = std::min(kConvPanel, cout - p * kConvPanel);
    for (int64_t t = 0; t < taps; ++t)
      for (int64_t i = 0; i < cin; ++i)
        for (int64_t j = 0; j < cols; ++j) out[(t * cin + i) * kConvPanel + j] = src(p * kConvPanel + j, i, t);
  }
  return P;
}

}  // namespace

Conv3x3Weight conv3x3_pack_forward(const float* w, int64_t cout, int64_t cin, int64_t taps) {
  return pack(taps, cin, cout, [&](int64_t o, int64_t i, int64_t t) { return w[(o * cin + i) * taps + t]; });
}

Conv3x3Weight conv3x3_pack_input_grad(const float* w, int64_t cout, int64_t cin, int64_t taps) {
  // outputs: the forward's input channels; inputs: its output channels; tap t reads the mirrored tap's weight
  return pack(taps, cout, cin, [&](int64_t c, int64_t o, int64_t t) { return w[(o * cin + c) * taps + taps - 1 - t]; });
}

}  // namespace dnf::cpu

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")

namespace dnf::cpu {
namespace {

constexpr int kRows = 14;  // 14 x 2 accumulators + 2 weight vectors + 1 broadcast: the 32 vector registers

// The taps of one output line that read a line inside the volume: their offsets from the line's padded row of
// the tile's first pixel (in floats, for `cin` channels per row) and their indices.
struct LineTaps {
  int64_t off[27];
  int64_t id[27];
  int n = 0;
};

LineTaps line_taps(const ConvFrame& f, int64_t line, int64_t cin) {
  LineTaps lt;
  const int64_t h = line % f.H, d = (line / f.H) % f.D, Wp = f.W + 2;
  for (int64_t t = 0; t < f.taps(); ++t) {
    const int64_t kw = t % 3, kh = (t / 3) % 3, kd = f.dims == 3 ? t / 9 : 1;
    if (h + kh - 1 < 0 || h + kh - 1 >= f.H || d + kd - 1 < 0 || d + kd - 1 >= f.D) continue;
    lt.off[lt.n] = (((kd - 1) * f.H + (kh - 1)) * Wp + kw) * cin;
    lt.id[lt.n++] = t;
  }
  return lt;
}

// out[r, 0:width] for the MR pixels starting at padded row `base` (rows cin apart): the sum over the line's taps
// and the cin input channels, in registers throughout.
template <int MR>
void conv_tile(const float* base, const LineTaps& lt, int64_t cin, const float* panel, int64_t width, float* out,
               int64_t ld_out) {
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int i = 0; i < lt.n; ++i) {
    const float* U = base + lt.off[i];
    const float* P = panel + lt.id[i] * cin * kConvPanel;
    for (int64_t kk = 0; kk < cin; ++kk) {
      const __m512 w0 = _mm512_load_ps(P + kk * kConvPanel), w1 = _mm512_load_ps(P + kk * kConvPanel + 16);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512 u = _mm512_set1_ps(U[r * cin + kk]);
        lo[r] = _mm512_fmadd_ps(u, w0, lo[r]);
        hi[r] = _mm512_fmadd_ps(u, w1, hi[r]);
      }
    }
  }
  const __mmask16 m0 = first_n16(width), m1 = first_n16(width - 16);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    _mm512_mask_storeu_ps(out + r * ld_out, m0, lo[r]);
    _mm512_mask_storeu_ps(out + r * ld_out + 16, m1, hi[r]);
  }
}

// acc[r * ld_acc + 0:32] += the sum over the chunk's lines [l0, l1) and their pixels of X(pixel + tap, c0 + r) *
// dout(pixel, col:col+32), for the MR input channels c0.. and tap t (pixels whose input is outside: none).
template <int MR>
void weight_grad_tile(const float* X, int64_t cin, const float* dout, int64_t cout, const ConvFrame& f, int64_t l0,
                      int64_t l1, int64_t t, int64_t c0, int64_t col, float* acc, int64_t ld_acc) {
  const int64_t kw = t % 3, kh = (t / 3) % 3, kd = f.dims == 3 ? t / 9 : 1;
  const int64_t w0 = std::max<int64_t>(0, 1 - kw), w1 = std::min<int64_t>(f.W, f.W + 1 - kw);
  const __mmask16 m0 = first_n16(cout - col), m1 = first_n16(cout - col - 16);
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) lo[r] = hi[r] = _mm512_setzero_ps();
  for (int64_t line = l0; line < l1; ++line) {
    const int64_t h = line % f.H, d = (line / f.H) % f.D;
    if (h + kh - 1 < 0 || h + kh - 1 >= f.H || d + kd - 1 < 0 || d + kd - 1 >= f.D) continue;
    const int64_t in_line = line + (kd - 1) * f.H + (kh - 1);
    const float* x = X + (in_line * f.W + w0 + kw - 1) * cin + c0;
    const float* g = dout + (line * f.W + w0) * cout + col;
    for (int64_t w = w0; w < w1; ++w, x += cin, g += cout) {
      const __m512 g0 = _mm512_maskz_loadu_ps(m0, g), g1 = _mm512_maskz_loadu_ps(m1, g + 16);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512 u = _mm512_set1_ps(x[r]);
        lo[r] = _mm512_fmadd_ps(u, g0, lo[r]);
        hi[r] = _mm512_fmadd_ps(u, g1, hi[r]);
      }
    }
  }
  // the chunk's sum added to the running one (sums of chunks: a shorter chain than one running sum)
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
    float* a = acc + r * ld_acc;
    _mm512_store_ps(a, _mm512_add_ps(_mm512_load_ps(a), lo[r]));
    _mm512_store_ps(a + 16, _mm512_add_ps(_mm512_load_ps(a + 16), hi[r]));
  }
}

template <size_t... I>
constexpr auto conv_tiles(std::index_sequence<I...>) {
  return std::array<decltype(&conv_tile<1>), sizeof...(I)>{&conv_tile<int(I) + 1>...};
}
template <size_t... I>
constexpr auto weight_grad_tiles(std::index_sequence<I...>) {
  return std::array<decltype(&weight_grad_tile<1>), sizeof...(I)>{&weight_grad_tile<int(I) + 1>...};
}
constexpr auto kConvTiles = conv_tiles(std::make_index_sequence<kRows>());  // [mr - 1]
constexpr auto kWeightGradTiles = weight_grad_tiles(std::make_index_sequence<kRows>());

// n split into ceil(n / kRows) parts as equal as possible: part i starts at start(i), has size(i) values.
struct EvenSplit {
  int64_t parts, small, big;  // the first `big` parts have small + 1 values
  explicit EvenSplit(int64_t n) : parts((n + kRows - 1) / kRows), small(n / parts), big(n % parts) {}
  int64_t start(int64_t i) const { return i * small + std::min(i, big); }
  int64_t size(int64_t i) const { return small + (i < big ? 1 : 0); }
};

}  // namespace

void conv3x3_f32_lines(const float* Xp, const ConvFrame& f, const Conv3x3Weight& Wt, float* out, int64_t ld_out,
                       int64_t l0, int64_t l1, int64_t xp_line0) {
  TORCH_CHECK(Wt.taps == f.taps(), "densenet_fast: conv3x3_f32_lines: weight packed for ", Wt.taps,
              " taps, frame has ", f.taps());
  const int64_t cin = Wt.cin, Wp = f.W + 2;
  const EvenSplit tiles(f.W);  // 56 -> 4 x 14, 96 -> 7 x 13-14, 7 -> 1 x 7
  for (int64_t line = l0; line < l1; ++line) {
    const LineTaps lt = line_taps(f, line, cin);
    const float* base = Xp + (line - xp_line0) * Wp * cin;
    for (int64_t i = 0; i < tiles.parts; ++i) {
      const int64_t w0 = tiles.start(i), mr = tiles.size(i);
      for (int64_t p = 0; p < Wt.panels; ++p) {
        const int64_t col = p * kConvPanel;
        kConvTiles[mr - 1](base + w0 * cin, lt, cin, Wt.panel(p), std::min(kConvPanel, Wt.cout - col),
                           out + ((line - l0) * f.W + w0) * ld_out + col, ld_out);
      }
    }
  }
}

void conv3x3_f32_weight_grad(const float* X, int64_t cin, const float* dout, int64_t cout, const ConvFrame& f,
                             float* dW) {
  const int64_t taps = f.taps(), panels = (cout + kConvPanel - 1) / kConvPanel, ld_acc = panels * kConvPanel;
  AlignedBuffer<float> acc(taps * cin * ld_acc, /*zeroed=*/true);  // [taps][cin][panels * 32]
  const EvenSplit ctiles(cin);
  const int64_t items = taps * ctiles.parts * panels;
  // Chunks of lines whose rows (X and dout) take about 256 KiB: each item re-reads its chunk from L2.
  const int64_t line_bytes = f.W * (cin + cout) * int64_t(sizeof(float));
  // (32 to 1024 KiB measured within 10% of each other at densenet121's 56x56 and 28x28, batch 8)
  const int64_t chunk = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(line_bytes, 1));
  for (int64_t l0 = 0; l0 < f.lines(); l0 += chunk) {
    const int64_t l1 = std::min(f.lines(), l0 + chunk);
    at::parallel_for(0, items, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t it = i0; it < i1; ++it) {
        const int64_t p = it % panels, ct = (it / panels) % ctiles.parts, t = it / (panels * ctiles.parts);
        const int64_t c0 = ctiles.start(ct), col = p * kConvPanel;
        kWeightGradTiles[ctiles.size(ct) - 1](X, cin, dout, cout, f, l0, l1, t, c0, col,
                                              acc.data() + (t * cin + c0) * ld_acc + col, ld_acc);
      }
    });
  }
  at::parallel_for(0, cout, 1, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o)
      for (int64_t c = 0; c < cin; ++c)
        for (int64_t t = 0; t < taps; ++t) dW[(o * cin + c) * taps + t] = acc.data()[(t * cin + c) * ld_acc + o];
  });
}

double fma_peak_gflops(int64_t iters) {
  // 16 independent accumulators per thread (enough to cover the FMA latency on two ports), all threads at once.
  const int64_t threads = at::get_num_threads();
  std::vector<float> sink(threads * 16, 0.f);
  const auto t0 = std::chrono::steady_clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      __m512 acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_set1_ps(0.001f * float(i));
      const __m512 m = _mm512_set1_ps(0.999999f), a = _mm512_set1_ps(1e-7f);
      for (int64_t it = 0; it < iters; ++it) {
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) acc[i] = _mm512_fmadd_ps(acc[i], m, a);
      }
      for (int i = 0; i < 16; ++i) sink[t * 16 + i] = _mm512_reduce_add_ps(acc[i]);
    }
  });
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  volatile float keep = sink[0];
  (void)keep;
  return 2.0 * 16 * 16 * double(iters) * double(threads) / secs / 1e9;
}

}  // namespace dnf::cpu

#else  // no x86-64 GCC/Clang build: never used (f32_kernel_available() is false)

namespace dnf::cpu {
Conv3x3Weight conv3x3_pack_forward(const float*, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "densenet_fast: no AVX-512 build");
}
Conv3x3Weight conv3x3_pack_input_grad(const float*, int64_t, int64_t, int64_t) {
  TORCH_CHECK(false, "densenet_fast: no AVX-512 build");
}
void conv3x3_f32_lines(const float*, const ConvFrame&, const Conv3x3Weight&, float*, int64_t, int64_t, int64_t,
                       int64_t) {
  TORCH_CHECK(false, "densenet_fast: no AVX-512 build");
}
void conv3x3_f32_weight_grad(const float*, int64_t, const float*, int64_t, const ConvFrame&, float*) {
  TORCH_CHECK(false, "densenet_fast: no AVX-512 build");
}
double fma_peak_gflops(int64_t) { TORCH_CHECK(false, "densenet_fast: no AVX-512 build"); }
}  // namespace dnf::cpu

#endif
