// Per-ISA builds of the CPU kernels (docs/design.md §12).
//
// The element loops of the kernels (BN-ReLU prologues, statistics, BN backward) are compiled for the
// baseline x86-64 ISA so the wheel runs on any CPU, and, on x86-64 with GCC/Clang, once more for AVX2
// and for AVX-512: each kernel source (dense_block_cpu.cpp, tail_cpu.cpp) is included by a wrapper in
// csrc/cpu/isa/ under `#pragma GCC target`, with DNF_ISA naming its namespace (dnf::cpu::avx2,
// dnf::cpu::avx512; the source compiled as itself is dnf::cpu::base and holds the registration). The
// wrappers parse every library header first (isa/prelude.h), so only our code gets the wider ISA and
// no inline function of torch or the standard library is emitted twice with different instructions.
// The operators registered are those of the ISA chosen once at load: torch's CPU capability
// (ATEN_CPU_CAPABILITY is honoured), capped by what the CPU reports, or DNF_CPU_ISA=base|avx2|avx512.
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DNF_MULTI_ISA 1
#else
#define DNF_MULTI_ISA 0
#endif

namespace dnf::cpu {

enum class CpuIsa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The ISA whose kernels are registered (decided once; thread-safe).
CpuIsa cpu_isa();
const char* isa_name(CpuIsa isa);

// The kernel of the chosen ISA among the three builds of the same function.
template <typename Fn>
Fn* pick_isa(Fn* base, Fn* avx2, Fn* avx512) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return avx512;
    case CpuIsa::kAvx2: return avx2;
    default: return base;
  }
}

}  // namespace dnf::cpu

// Declares the wider-ISA builds of base::fn (same type) and yields the chosen one's address.
#if DNF_MULTI_ISA
#define DNF_DECLARE_ISA_VARIANTS(fn)                              \
  namespace avx2 { decltype(::dnf::cpu::base::fn) fn; }          \
  namespace avx512 { decltype(::dnf::cpu::base::fn) fn; }
#define DNF_PICK_ISA(fn) ::dnf::cpu::pick_isa(&base::fn, &avx2::fn, &avx512::fn)
#else
#define DNF_DECLARE_ISA_VARIANTS(fn)
#define DNF_PICK_ISA(fn) (&base::fn)
#endif
