// densenet_fast's own bfloat16 3x3 (3x3x3) convolution of the dense layer on AMX, its forward and (as a forward
// with the weight transposed and mirrored) its input gradient (stride 1, padding 1, no bias; docs/design.md §16):
// float accumulation, each output rounded to bfloat16 once, as oneDNN's bfloat16 convolution under CPU autocast.
//
// An implicit GEMM on the tile unit: the input is a few samples at a time in a frame that pads each by a zero pixel
// on every side (`AmxConvFrame`), so the rows a tap reads are the output rows shifted by a constant and every tap
// is one 16-row tile load straight from the frame (no packing of the activation). Per block of 32 consecutive frame
// rows and 32 output channels, 4 float result tiles sum every tap and input channel; the rows that are padding in
// the output are computed and dropped (2/W of the work in 2-D). The k new channels are rounded and written straight
// into their columns of the block buffer (the input gradient's over V's rows). Each output value is summed by one thread in one order: bitwise the same
// on any thread count.
// Runs where amx_kernel_available() (cpu/amx_gemm.h) and amx_conv3x3_fits(): input and output channels multiples
// of 32.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cpu/aligned_buffer.h"

namespace dnf::cpu {

inline bool amx_conv3x3_fits(int64_t cin, int64_t cout) {
  return cin > 0 && cin % 32 == 0 && cout > 0 && cout % 32 == 0;
}

// N samples of D x H x W pixels (D = 1 in 2-D), each padded by one zero pixel on every side ((D+2) x (H+2) x (W+2)
// rows; in 2-D no depth padding), one after the other, and 32 zero rows after them (the last blocks' tile loads
// run past the end). A tap never reaches past its sample's padding.
struct AmxConvFrame {
  int64_t N = 1, D = 1, H = 0, W = 0, dims = 2;
  int64_t taps() const { return dims == 3 ? 27 : 9; }
  int64_t Dp() const { return dims == 3 ? D + 2 : 1; }
  int64_t plane() const { return (H + 2) * (W + 2); }
  int64_t sample_rows() const { return Dp() * plane(); }
  int64_t rows() const { return N * sample_rows() + 32; }
  // The frame row of pixel (d, h, w) of sample n.
  int64_t row(int64_t n, int64_t d, int64_t h, int64_t w) const {
    return n * sample_rows() + ((dims == 3 ? d + 1 : 0) * (H + 2) + h + 1) * (W + 2) + w + 1;
  }
};

// The weight w [cout, cin, taps] (float32 master, contiguous) rounded to bfloat16 and packed as the tile unit's
// second operand: per (tap, 32 input channels, 16 output channels), a 16 x 64-byte tile of (even, odd) input-channel
// pairs.
struct AmxConvWeight {
  int64_t taps = 0, cin = 0, cout = 0;
  AlignedBuffer<c10::BFloat16> data;
  const c10::BFloat16* tile(int64_t t, int64_t kb, int64_t cb) const {
    return data.data() + ((t * (cin / 32) + kb) * (cout / 16) + cb) * 512;
  }
};
AmxConvWeight amx_conv3x3_pack(const float* w, int64_t cout, int64_t cin, int64_t taps);
// The input gradient's weight from the same w [cout, cin, taps]: the transposed convolution as a forward one with cin
// outputs and cout inputs, its taps mirrored.
AmxConvWeight amx_conv3x3_pack_input_grad(const float* w, int64_t cout, int64_t cin, int64_t taps);

// out[pixel p of the frame's samples, 0:cout] (rows ld_out apart, in channels_last order) = the convolution of the
// padded frame Vp ([f.rows(), cin], its padding zero, 64-byte aligned); on the intra-op threads (call outside
// parallel regions).
void amx_conv3x3_frame(const c10::BFloat16* Vp, const AmxConvFrame& f, const AmxConvWeight& W, c10::BFloat16* out,
                        int64_t ld_out);

}  // namespace dnf::cpu
