// sync_block_cpu.cpp built for avx512 (csrc/cpu/isa.h).
#include "cpu/isa/prelude.h"
#if DNF_MULTI_ISA
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt")
#define DNF_ISA avx512
#include "cpu/sync_block_cpu.cpp"
#endif
