// The activation layout of every operator, CPU and CUDA: channels_last (4-D) / channels_last_3d (5-D), so a
// [N, C, (D,) H, W] tensor is the row-major [rows, C] matrix the kernels work on (docs/design.md §2).
#pragma once

#include <ATen/ATen.h>

namespace dnf {

// An uninitialised tensor of `shape` (4-D or 5-D) in that layout.
inline at::Tensor empty_cl(at::IntArrayRef shape, const at::TensorOptions& opts) {
  return at::empty(shape, opts.memory_format(shape.size() == 5 ? at::MemoryFormat::ChannelsLast3d
                                                                : at::MemoryFormat::ChannelsLast));
}

}  // namespace dnf
