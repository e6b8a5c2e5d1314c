// The tile configuration our AMX kernels load (_tile_loadconfig): palette 1, 64-byte aligned (cpu/amx_gemm.h,
// cpu/conv3x3_bf16.h). Plain data: no ISA-specific code, so it may be included anywhere.
#pragma once

#include <cstdint>

namespace dnf::cpu {

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  // Tiles 0..n-1 as 16 rows of 64 bytes (every tile both kernels use).
  static TileConfig full(int n) {
    TileConfig c;
    for (int t = 0; t < n; ++t) c.rows[t] = 16, c.colsb[t] = 64;
    return c;
  }
};

}  // namespace dnf::cpu
