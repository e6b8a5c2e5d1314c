// Every header the CPU kernel sources include, parsed before a wrapper's `#pragma GCC target`, so
// torch's and the standard library's inline functions keep the baseline ISA (isa.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/block_grads.h"
#include "common/bn_math.h"
#include "common/checks.h"
#include "common/layout.h"
#include "common/nonfinite.h"
#include "cpu/conv3x3.h"
#include "cpu/gemm_engine.h"
#include "cpu/isa.h"
