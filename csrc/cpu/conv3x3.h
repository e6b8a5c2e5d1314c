// The dense layer's 3x3 (3x3x3) convolution, stride 1, padding 1, through ATen (oneDNN), and the dtype a
// bfloat16 block computes it in (docs/design.md §14).
//
// A bfloat16 block keeps its buffer, V and their gradients in bfloat16; each pass of its convolution
// (forward, input gradient, weight gradient) computes in bfloat16 or, on the bfloat16 operands widened, in
// float32, chosen once per process and rank:
//   * speed: on CPUs without bfloat16 dot products oneDNN emulates bfloat16 at a fraction of its float32 rate
//     (its weight gradient ~6x slower than float32 measured on an AVX-512 Xeon with native bfloat16 taken away), so
//     each pass runs in float32 where oneDNN has no bfloat16 instructions (no AVX512_BF16/AMX, or
//     ONEDNN_MAX_CPU_ISA below them) and elsewhere in whichever dtype measured faster on a densenet121-sized layer;
//   * correctness: oneDNN's jit_bf16 backward-weights convolution (the kernel of AVX-512 CPUs without AMX) returns
//     garbage for a 3-D input of depth 2 (oneDNN 3.12 in torch 2.14.1); a probe of that case decides whether a
//     3-D weight gradient may run in bfloat16 at all.
// DNF_CPU_BF16_CONV=bf16|fp32 forces the speed choice (the probe still guards the 3-D weight gradient).
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace dnf::cpu {

enum class ConvPass : int { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };

// new = conv(x, w): x [N, C, (D,) H, W], w [k, C, 3, 3(, 3)] of x's dtype; the result in the compute dtype
// (float32 for a bfloat16 x computed in float32: the caller's copy into the buffer rounds it once).
at::Tensor conv3x3(const at::Tensor& x, const at::Tensor& w, int64_t dims);
// dW (float32 for a bfloat16 pass computed in float32; the caller casts to the weight's dtype).
at::Tensor conv3x3_weight_grad(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w, int64_t dims);
// dX, the transposed convolution of dout (needs only the weight), in dout's dtype.
at::Tensor conv3x3_input_grad(const at::Tensor& dout, const at::Tensor& w, int64_t dims);

// The 3x3 weight as pass `pass` of a block storing `storage` multiplies with it: the master weight (float32 for a
// bfloat16 block under autocast) rounded to `storage`, in the pass's compute dtype, channels_last (the input's
// layout: ATen would copy it to that layout in each call).
at::Tensor conv3x3_weight(const at::Tensor& master, at::ScalarType storage, int64_t dims, ConvPass pass);

// The dtype pass `pass` of a bfloat16 block of rank `dims` computes in (kBFloat16 or kFloat). The first call
// per rank measures (call it outside parallel regions); thread-safe.
at::ScalarType bf16_conv_compute(int64_t dims, ConvPass pass);
// JSON object {"2d": {"forward": dtype, "input_grad": ..., "weight_grad": ..., "how": ...}, "3d": {...}} of
// the choices made so far in this process (a rank not used yet: "not chosen yet").
std::string bf16_conv_report();

}  // namespace dnf::cpu
