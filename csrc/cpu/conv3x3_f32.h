// densenet_fast's own float32 3x3 (3x3x3) convolution of the dense layer (stride 1, padding 1, no bias), forward
// and both backward products, on AVX-512 (docs/design.md §15).
//
// An implicit GEMM over the channels_last rows, register-blocked as the 1x1 kernel (cpu/f32_gemm.h): a tile of up
// to 14 consecutive pixels of one output line times one panel of 32 output channels (28 accumulators), summed
// over the taps and the input channels without leaving the registers. The input is read in a frame padded by one
// zero pixel at both ends of every line (`ConvFrame`), so a tap's rows are the tile's rows shifted by a constant;
// taps whose line falls outside the volume (the top and bottom rows, the first and last depth slices) are skipped,
// so no padded lines exist. The forward writes its k channels straight into their columns of the block buffer;
// the input gradient is the same kernel on the output gradient with the weight mirrored and transposed; the weight
// gradient sums over pixels per (tap, 14 input channels, 32 output channels) item, the items split between the
// threads, so every value is summed in one order whatever the thread count (bitwise deterministic).
#pragma once

#include <cstdint>

#include "cpu/aligned_buffer.h"

namespace dnf::cpu {

// N samples of D x H x W pixels (D = 1 in 2-D) as rows in channels_last order: `lines()` lines of W pixels, line
// (n*D + d)*H + h. Padded: every line gets one zero pixel before and after (line * (W + 2) + w + 1 is pixel w).
struct ConvFrame {
  int64_t N = 0, D = 1, H = 0, W = 0, dims = 2;
  int64_t taps() const { return dims == 3 ? 27 : 9; }
  int64_t lines() const { return N * D * H; }
  int64_t rows() const { return lines() * W; }
  int64_t padded_rows() const { return lines() * (W + 2); }
};

// A 3x3 weight packed for conv3x3_f32_lines: per panel of 32 output channels, [taps][cin][32] (channels past cout
// zero).
inline constexpr int64_t kConvPanel = 32;
struct Conv3x3Weight {
  int64_t taps = 0, cin = 0, cout = 0, panels = 0;
  AlignedBuffer<float> data;
  const float* panel(int64_t p) const { return data.data() + p * taps * cin * kConvPanel; }
};

// The forward's weight from w [cout, cin, taps] (contiguous, PyTorch's layout).
Conv3x3Weight conv3x3_pack_forward(const float* w, int64_t cout, int64_t cin, int64_t taps);
// The input gradient's weight from the same w: the transposed convolution as a forward one with cin outputs and
// cout inputs, its taps mirrored.
Conv3x3Weight conv3x3_pack_input_grad(const float* w, int64_t cout, int64_t cin, int64_t taps);

// out[(line - l0) * W + w, 0:cout] (rows ld_out apart: `out` is the row of line l0's first pixel) for lines
// [l0, l1): the convolution of the padded input Xp ([lines, W + 2, W.cin], zero at each line's two padding pixels),
// whose first line is line xp_line0 of the frame (a window of lines: it must hold every line the taps of [l0, l1)
// read inside the volume). Serial: call once per thread and range.
void conv3x3_f32_lines(const float* Xp, const ConvFrame& f, const Conv3x3Weight& W, float* out, int64_t ld_out,
                       int64_t l0, int64_t l1, int64_t xp_line0 = 0);

// dW [cout, cin, taps] = the weight gradient of out = conv(X, w): X [f.rows(), cin] and dout [f.rows(), cout],
// dense rows. Runs on the intra-op threads (call outside parallel regions).
void conv3x3_f32_weight_grad(const float* X, int64_t cin, const float* dout, int64_t cout, const ConvFrame& f,
                             float* dW);

// GFLOP/s of a bare AVX-512 FMA loop (`iters` x 16 FMAs of 16 lanes per thread) on all intra-op threads at once:
// the machine's float32 FMA peak, for the benchmarks' roofline.
double fma_peak_gflops(int64_t iters);

}  // namespace dnf::cpu
