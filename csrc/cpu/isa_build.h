// Included first by every CPU kernel source (dense_block_cpu.cpp, tail_cpu.cpp, stem_cpu.cpp,
// sync_block_cpu.cpp): compiled as itself a source is the baseline-ISA build, which also registers the
// operators; the wrappers in csrc/cpu/isa/ include it again with DNF_ISA set (avx2, avx512; isa.h).
#pragma once

#ifndef DNF_ISA
#define DNF_ISA base
#define DNF_ISA_REGISTERS 1
#endif

#include "cpu/isa.h"
