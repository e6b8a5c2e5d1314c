// The ISA of the registered CPU kernels (isa.h): torch's CPU capability, capped by the CPU's own
// report (a wrong ATEN_CPU_CAPABILITY must not run instructions the CPU lacks), or DNF_CPU_ISA.
#include "cpu/isa.h"
#include "cpu/switches.h"

#include <ATen/Version.h>

#include <string>

namespace dnf::cpu {
namespace {

CpuIsa cpu_supports() {
#if DNF_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma"))
    return CpuIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
      __builtin_cpu_supports("f16c"))
    return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBase;
}

// torch's own choice for its kernels ("AVX512", "AVX2", "DEFAULT", ...; ATEN_CPU_CAPABILITY honoured).
CpuIsa torch_capability() {
  const std::string cap = at::get_cpu_capability();
  if (cap == "AVX512") return CpuIsa::kAvx512;
  if (cap == "AVX2") return CpuIsa::kAvx2;
  return CpuIsa::kBase;
}

// Runs while the library loads (operator registration), so it never throws: densenet_fast/_extension.py
// rejects a malformed DNF_CPU_ISA before loading and warns when the request was capped.
CpuIsa choose() {
  const CpuIsa supported = cpu_supports();
  CpuIsa want = torch_capability();
  const std::string v = cpu_switch_nothrow("DNF_CPU_ISA", {"base", "avx2", "avx512"});
  if (v == "base") want = CpuIsa::kBase;
  else if (v == "avx2") want = CpuIsa::kAvx2;
  else if (v == "avx512") want = CpuIsa::kAvx512;
  return static_cast<int>(want) <= static_cast<int>(supported) ? want : supported;
}

}  // namespace

CpuIsa cpu_isa() {
  static const CpuIsa isa = choose();
  return isa;
}

const char* isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "base";
  }
}

}  // namespace dnf::cpu
