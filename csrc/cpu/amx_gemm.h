// densenet_fast's own AMX kernel for the forward 1x1 of a bfloat16 block (and its backward recompute):
//   Y[rows, n] = relu(a * X[:, :c] + b) @ W^T   (bfloat16 out, float accumulation, rounded once),
// optionally V = relu(a2 * Y + b2) from the rounded Y. Per block of 32 rows the BN-ReLU prologue writes the
// normalised rows into an L1-resident operand, the tile unit multiplies it with the packed weight, and
// the float result is narrowed in cache: one pass over X, one write of Y (cpublas::brgemm on whole tiles
// runs the prologue, the product and the narrowing as three passes, and needs >= 2048 rows per thread to
// pay for its packing). The three are software-pipelined: block i's tiles run while the vector units write
// block i+1's operand and narrow block i-1's result. Software prefetch of the rows ahead and streaming
// stores of Y measured no faster.
// Runs where amx_kernel_available(): AMX-BF16 and AVX512_BF16, the OS granted the tile state, the AVX-512
// kernels registered; for output widths n that are multiples of 32.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

#include "cpu/aligned_buffer.h"

namespace dnf::cpu {

bool amx_kernel_available();
// amx_kernel_available() and not turned off with DNF_CPU_AMX_KERNEL=0 (then bn_relu_gemm's tile loop runs
// these products on the process's GEMM engine: the tests run every engine both ways).
bool use_amx_kernel();
inline bool amx_kernel_fits(int64_t n) { return n > 0 && n % 32 == 0; }

// W [n, k] row-major packed for the tile unit: k padded to kp (a multiple of 32) with zeros and, within each
// k-step of 32, in the operand's order (the even k, then the odd: amx_gemm_amx.cpp); per column block of 16
// and k-step, a 16 x 64-byte tile of consecutive pairs.
struct AmxWeight {
  int64_t k = 0, kp = 0, n = 0;
  AlignedBuffer<c10::BFloat16> data;
  const c10::BFloat16* tiles() const { return data.data(); }
};
AmxWeight amx_pack_weight(const c10::BFloat16* W, int64_t n, int64_t k);

// Rows [r0, r1) of the product above (X rows ld apart, Y / V rows n apart). Called once per thread and
// range; configures and releases the tile state itself.
void amx_bn_relu_gemm_rows(const c10::BFloat16* X, int64_t ld, int64_t r0, int64_t r1, int64_t c, const float* a,
                           const float* b, const AmxWeight& W, c10::BFloat16* Y, const float* a2, const float* b2,
                           c10::BFloat16* V);

}  // namespace dnf::cpu
