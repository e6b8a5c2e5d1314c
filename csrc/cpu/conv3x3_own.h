// Which engine runs a float32 dense layer's 3x3 passes, oneDNN (through ATen, cpu/conv3x3.h) or our own kernel
// (cpu/conv3x3_f32.h), and the tensor-level calls of our kernel (docs/design.md §15); and the same for a bfloat16
// layer's forward and input gradient on our AMX kernel (cpu/conv3x3_bf16.h, §16).
//
// Chosen per shape (rank, D, H, W, input and output channels) and pass, the first time the shape is seen: our
// kernel where it is available (the AVX-512 kernels are the registered ones) and measured on the block's batch (up
// to 32 MiB of input) no slower than 1.1x oneDNN (the margin: oneDNN's result still has to be copied into the block
// buffer, ours is written there). DNF_CPU_CONV3X3=own|onednn forces either (own: where available); under
// torch.use_deterministic_algorithms(True) our kernel runs untimed (a timed choice may differ between processes, and
// with it the result's last bits). build_info()["cpu_engine"]["conv3x3"] reports every choice made.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "cpu/conv3x3.h"
#include "cpu/conv3x3_bf16.h"
#include "cpu/conv3x3_f32.h"

namespace dnf::cpu {

// The frame of a [N, C, (D,) H, W] activation.
ConvFrame conv_frame(int64_t N, int64_t D, int64_t H, int64_t W, int64_t dims);

// Whether pass `pass` of a float32 3x3 convolution on frame f with cin inputs and cout outputs runs on our kernel.
// The first call per shape measures (call it outside parallel regions); thread-safe.
bool own_conv3x3(const ConvFrame& f, int64_t cin, int64_t cout, ConvPass pass);
// JSON object {"how": ..., "shapes": {"2d 56x56 128->32": {"forward": "own"|"onednn", ..., "times": ...}}}.
std::string own_conv3x3_report();

// Seconds [forward, input_grad, weight_grad] x [oneDNN, own] of the passes on x [N, cin, ...], dout [N, cout, ...]
// (channels_last) and w [cout, cin, 3..] (contiguous), the best of `rounds` alternating rounds.
std::vector<double> time_passes_for_op(const ConvFrame& f, const at::Tensor& x, const at::Tensor& dout,
                                       const at::Tensor& w, int64_t rounds);

// A float [f.padded_rows(), c] matrix, zero (its padding pixels stay so; the caller fills the rest).
// From the mapped pool, returned to the OS when freed (OnFree::kUnmap: a call's private workspace, workspace.h).
at::Tensor zero_padded_lines(const ConvFrame& f, int64_t c);
// The padded rows of src's [f.rows(), c] dense rows into dst (padded, its padding already zero).
void pad_lines(const float* src, const ConvFrame& f, int64_t c, float* dst);

// out rows [f.rows(), cout] (ld_out apart) = the forward of the padded input Xp with weight w [cout, cin, 3..];
// on the intra-op threads.
void own_conv3x3_forward(const float* Xp, const ConvFrame& f, const Conv3x3Weight& w, float* out, int64_t ld_out);
// Lines [l0, l1) only (out: line l0's first row), Xp a window of the padded lines from line xp_line0 (it holds
// every line the taps read: conv3x3_halo_lines() on each side); on the intra-op threads.
void own_conv3x3_lines(const float* Xp, const ConvFrame& f, const Conv3x3Weight& w, float* out, int64_t ld_out,
                       int64_t l0, int64_t l1, int64_t xp_line0 = 0);
// Whether pass `pass` (the forward or the input gradient) of a bfloat16 block's 3x3 with cin inputs and cout outputs
// (the pass's own: the input gradient's are the layer's k and C_in) runs on our AMX kernel (conv3x3_bf16.h): wherever
// it is available and fits, unless DNF_CPU_CONV3X3=onednn; rule: a 3-D input gradient stays on oneDNN unless forced.
// The weight gradient stays on oneDNN.
bool own_bf16_conv3x3(int64_t cin, int64_t cout, ConvPass pass, int64_t dims);
AmxConvFrame amx_conv_frame(int64_t N, int64_t D, int64_t H, int64_t W, int64_t dims);
// The frame row of the first pixel of line `line` ((n*D + d)*H + h) of g's samples.
int64_t amx_frame_line_row(const AmxConvFrame& g, int64_t line);
// A bfloat16 [g.rows(), cin] frame, zero; from the mapped pool, returned to the OS when freed.
at::Tensor zero_amx_frame(const AmxConvFrame& g, int64_t cin);
// g's samples' dense rows src ([pixels, c], channels_last order) into the frame's interior (its padding untouched);
// on the intra-op threads.
void fill_amx_frame(const c10::BFloat16* src, const AmxConvFrame& g, int64_t c, c10::BFloat16* frame);

// The lines a window of output lines reads beyond its ends: one (the rows above and below) in 2-D, a slice and
// one line (the depth neighbours) in 3-D.
inline int64_t conv3x3_halo_lines(const ConvFrame& f) { return f.dims == 3 ? f.H + 1 : 1; }

}  // namespace dnf::cpu
