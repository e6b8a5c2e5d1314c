// The AVX512_BF16 row kernels (cpu/bf16_rows.h). Library headers are parsed before the target pragma
// (isa/prelude.h), so only these functions use the wider ISA; they run only where native_bf16_rows().
#include "cpu/isa/prelude.h"
#include "cpu/bf16_rows.h"
#include "cpu/switches.h"

#if DNF_MULTI_ISA
#include <immintrin.h>

#include "cpu/isa/masks.h"

namespace dnf::cpu {

bool native_bf16_rows() {
  // DNF_CPU_BF16_ROWS=portable runs the portable loops on any CPU (and so turns the AMX kernel off, which
  // needs these): what a CPU without AVX512_BF16 runs; "native" runs these where the CPU has them (the default).
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && cpu_isa() == CpuIsa::kAvx512 &&
           cpu_switch("DNF_CPU_BF16_ROWS", {"native", "portable"}) != "portable";
  }();
  return ok;
}
const char* bf16_rows_name() { return native_bf16_rows() ? "avx512_bf16" : "portable"; }

}  // namespace dnf::cpu

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma")

namespace dnf::cpu {
namespace {

// The zero-masked forms of the widening, the shift and the max, with every lane on: GCC 12 warns that the plain
// ones' undefined pass-through operand "may be used uninitialized" (as in f32_gemm_avx512.cpp, amx_gemm_amx.cpp).
constexpr __mmask16 kAllLanes = 0xFFFF;

// 16 values (those of mask m, the rest zero) widened to float.
inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAllLanes, _mm512_maskz_cvtepu16_epi32(kAllLanes, h), 16));
}

// relu(a*x + b); max(0, v) returns v when v is NaN (the second operand), as relu() in bn_math.h.
inline __m512 bn_relu16(const c10::BFloat16* x, const float* a, const float* b, __mmask16 m) {
  const __m512 v = _mm512_fmadd_ps(load16(x, m), _mm512_maskz_loadu_ps(m, a), _mm512_maskz_loadu_ps(m, b));
  return _mm512_maskz_max_ps(kAllLanes, _mm512_setzero_ps(), v);
}

}  // namespace

void bn_relu_rows_native(const c10::BFloat16* x, int64_t ld, int64_t rows, int64_t c, const float* a,
                         const float* b, c10::BFloat16* U, int64_t ldu) {
  for (int64_t r = 0; r < rows; ++r) {
    const c10::BFloat16* xr = x + r * ld;
    c10::BFloat16* ur = U + r * ldu;
    int64_t j = 0;
    for (; j + 32 <= c; j += 32) {
      const __m512 lo = bn_relu16(xr + j, a + j, b + j, kAllLanes);
      const __m512 hi = bn_relu16(xr + j + 16, a + j + 16, b + j + 16, kAllLanes);
      _mm512_storeu_si512(ur + j, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
    for (; j < c; j += 16) {
      const __mmask16 m = first_n16(c - j);
      _mm256_mask_storeu_epi16(ur + j, m, (__m256i)_mm512_cvtneps_pbh(bn_relu16(xr + j, a + j, b + j, m)));
    }
    for (j = c; j < ldu; ++j) ur[j] = c10::BFloat16(0.0f);
  }
}

void narrow_native(const float* x, int64_t n, c10::BFloat16* out) {
  int64_t i = 0;
  for (; i + 32 <= n; i += 32)
    _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + i + 16), _mm512_loadu_ps(x + i)));
  for (; i < n; i += 16) {
    const __mmask16 m = first_n16(n - i);
    _mm256_mask_storeu_epi16(out + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + i)));
  }
}

}  // namespace dnf::cpu

#else  // no x86-64 GCC/Clang: the portable loops only

namespace dnf::cpu {
bool native_bf16_rows() {
  cpu_switch("DNF_CPU_BF16_ROWS", {"native", "portable"});  // a bad value is refused on every build
  return false;
}
const char* bf16_rows_name() { return "portable"; }
void bn_relu_rows_native(const c10::BFloat16*, int64_t, int64_t, int64_t, const float*, const float*,
                         c10::BFloat16*, int64_t) {
  TORCH_CHECK(false, "densenet_fast: no AVX512_BF16 build");
}
void narrow_native(const float*, int64_t, c10::BFloat16*) { TORCH_CHECK(false, "densenet_fast: no AVX512_BF16 build"); }
}  // namespace dnf::cpu

#endif
