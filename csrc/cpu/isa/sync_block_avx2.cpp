// sync_block_cpu.cpp built for avx2 (csrc/cpu/isa.h).
#include "cpu/isa/prelude.h"
#if DNF_MULTI_ISA
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,popcnt")
#define DNF_ISA avx2
#include "cpu/sync_block_cpu.cpp"
#endif
