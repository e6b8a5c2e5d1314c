// AVX-512 lane masks of the first n lanes (n <= 0: none), for the loads and stores of a row's last, partial
// vector in the AVX-512 kernels of csrc/cpu/isa/ (f32_gemm, amx_gemm, bf16_rows). Included before a source's
// target pragma, so every source emits the same baseline code for them (isa/prelude.h's rule); they inline into
// the AVX-512 functions.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace dnf::cpu {

inline __mmask16 first_n16(int64_t n) {
  return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1u);
}
inline __mmask32 first_n32(int64_t n) {
  return n >= 32 ? __mmask32(0xFFFFFFFFu) : n <= 0 ? __mmask32(0) : __mmask32((1u << n) - 1u);
}

}  // namespace dnf::cpu
