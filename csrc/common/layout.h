// The activation layout of every operator, CPU and CUDA: channels_last (4-D) / channels_last_3d (5-D), so a
// [N, C, (D,) H, W] tensor is the row-major [rows, C] matrix the kernels work on (docs/design.md §2).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace dnf {

// The layout of an activation with `spatial_dims` (2 or 3) spatial dimensions, i.e. of rank spatial_dims + 2.
inline at::MemoryFormat cl_format(int64_t spatial_dims) {
  return spatial_dims == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// The layout of a 4-D / 5-D activation `t` (by its rank).
inline at::MemoryFormat cl_format(const at::Tensor& t) { return cl_format(t.dim() - 2); }

// An uninitialised tensor of `shape` (4-D or 5-D) in that layout.
inline at::Tensor empty_cl(at::IntArrayRef shape, const at::TensorOptions& opts) {
  return at::empty(shape, opts.memory_format(cl_format(static_cast<int64_t>(shape.size()) - 2)));
}

}  // namespace dnf
