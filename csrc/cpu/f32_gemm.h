// densenet_fast's own AVX-512 kernel for the forward 1x1 of a float32 block (and its backward recompute):
//   Y[rows, n] = relu(a * X[:, :c] + b) @ W^T,   optionally V = relu(a2 * Y + b2).
// Per block of 14 rows the BN-ReLU prologue writes the normalised rows into an L1-resident operand; a
// register-blocked microkernel (14 rows x 32 columns = 28 accumulators) multiplies it with the weight, packed
// once per call in panels of 32 columns, broadcasting the operand along k. The operand is read where the
// prologue wrote it, never repacked: MKL's sgemm on the same tile packs it again (8% of densenet121's block-2
// stage) and loses its rate on the skinny tiles of blocks 3-4. One pass over X, one write of Y (and V).
// Runs where f32_kernel_available() (the AVX-512 kernels are the ones registered) and use_f32_kernel() says
// it measured faster than the process's GEMM engine (gemm_engine.cpp); any n and c.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <string>

#include "cpu/aligned_buffer.h"

namespace dnf::cpu {

bool f32_kernel_available();
// f32_kernel_available(), not turned off with DNF_CPU_F32_KERNEL=0, and faster than the prologue + the
// float32 engine's product on a representative tile, measured once per process (gemm_engine.cpp). Off, the
// stage runs bn_relu_gemm's tile loop on the engine.
bool use_f32_kernel();
// How use_f32_kernel() decided, for build_info().
std::string f32_kernel_report();

// W [n, k] row-major as W^T in panels of kPanel columns: panel p holds W^T[:, p*32 : p*32+32] row-major
// ([k, 32], columns past n zero).
inline constexpr int64_t kF32Panel = 32;
// Rows per block: 14 x 2 accumulators + 2 weight vectors + 1 broadcast operand fill the 32 vector registers.
inline constexpr int64_t kF32Rows = 14;
struct F32Weight {
  int64_t k = 0, n = 0, panels = 0;
  AlignedBuffer<float> data;
  const float* panel(int64_t p) const { return data.data() + p * k * kF32Panel; }
};
F32Weight f32_pack_weight(const float* W, int64_t n, int64_t k);

// Rows [r0, r1) of the product above (X rows ld apart, Y / V rows n apart). Called once per thread and range.
void f32_bn_relu_gemm_rows(const float* X, int64_t ld, int64_t r0, int64_t r1, int64_t c, const float* a,
                           const float* b, const F32Weight& W, float* Y, const float* a2, const float* b2, float* V);

// The same for a bfloat16 stage computed in float32 (bf16_gemm_compute(), gemm_engine.h): X widened by the
// prologue, W packed from the widened weight, Y rounded to bfloat16 once and V computed from the rounded Y (as
// every other path of the stage does), with the portable rounding (kernels.h: from_f).
void f32_bn_relu_gemm_rows(const c10::BFloat16* X, int64_t ld, int64_t r0, int64_t r1, int64_t c, const float* a,
                           const float* b, const F32Weight& W, c10::BFloat16* Y, const float* a2, const float* b2,
                           c10::BFloat16* V);
// ... with V's bfloat16 values widened to float (the input of a 3x3 pass computed in float32, conv3x3.h).
void f32_bn_relu_gemm_rows(const c10::BFloat16* X, int64_t ld, int64_t r0, int64_t r1, int64_t c, const float* a,
                           const float* b, const F32Weight& W, c10::BFloat16* Y, const float* a2, const float* b2,
                           float* V);

// The two products of the float32 1x1 backward on a tile (kernels.h: gemm1x1_backward_products), on the same
// register blocking (docs/design.md §15): dU [nr, n] = dY [nr, k] B, B [k, n] packed by f32_pack_kn; and
// dW [k, n] += dY^T U, U [nr, n], accumulated in registers over the tile's rows (14 x 32 blocks of dW). Serial:
// called per tile on the threads. Every row pitch is the matrix's width.
F32Weight f32_pack_kn(const float* B, int64_t k, int64_t n);
void f32_gemm_rows(const float* A, int64_t rows, const F32Weight& B, float* C);
void f32_gemm_tn_acc(const float* A, const float* U, int64_t nr, int64_t k, int64_t n, float* C);

// U[r, j] = relu(a[j] * X[r, j] + b[j]), r < rows, j < c (U rows ldu apart): the prologue alone, with the
// same instructions, for the measurement against the engine.
void f32_bn_relu_rows(const float* X, int64_t ld, int64_t rows, int64_t c, const float* a, const float* b, float* U,
                      int64_t ldu);

}  // namespace dnf::cpu
