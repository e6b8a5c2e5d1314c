// Row kernels of the bfloat16 path for CPUs with AVX512_BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and
// later): one vcvtne2ps2bf16 narrows 32 values, where the portable loops (kernels.h: from_f) round with
// integer arithmetic, ~10 instructions per 16 values. They are the BN-ReLU prologue of every 1x1 product
// (half of the forward 1x1's time on an AMX CPU with the portable loop). Rounding: to nearest even, NaN
// stays NaN, as from_f; the instruction also flushes float32 denormals (|v| < 1.2e-38) to zero.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace dnf::cpu {

// Whether the kernels below may run: the CPU has AVX512_BF16 and the AVX-512 kernels are the ones
// registered (DNF_CPU_ISA=avx2|base turns them off too). Decided once.
bool native_bf16_rows();
// "avx512_bf16" or "portable": what the bfloat16 element loops use, for build_info().
const char* bf16_rows_name();

// U[r, j] = relu(a[j] * x[r, j] + b[j]) for r < rows, j < c; U's columns c..ldu-1 are zeroed.
// x: rows ld apart, U: rows ldu >= c apart.
void bn_relu_rows_native(const c10::BFloat16* x, int64_t ld, int64_t rows, int64_t c, const float* a,
                         const float* b, c10::BFloat16* U, int64_t ldu);

// out[i] = x[i] rounded to bfloat16, i < n.
void narrow_native(const float* x, int64_t n, c10::BFloat16* out);

}  // namespace dnf::cpu
