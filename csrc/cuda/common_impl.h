// Host-side helpers shared by the CUDA dense-block and tail operators (and their host emulation).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "cuda/launch.cuh"

namespace dnf::DNF_CUDA_NS {

using at::Tensor;
using at::TensorList;

inline Tensor empty_cl(int64_t N, int64_t C, int64_t H, int64_t W, const at::TensorOptions& opts) {
  return at::empty({N, C, H, W}, opts.memory_format(at::MemoryFormat::ChannelsLast));
}

// [N*H*W, C] row-major view of a channels_last-contiguous [N, C, H, W] tensor (never a copy).
inline Tensor rows_view(const Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast));
  const int64_t C = t.size(1);
  return t.as_strided({t.size(0) * t.size(2) * t.size(3), C}, {C, 1});
}

// [N, C, H, W] channels_last view of a contiguous [N*H*W, C] matrix.
inline Tensor nchw_view(const Tensor& rows, int64_t N, int64_t H, int64_t W) {
  TORCH_INTERNAL_ASSERT(rows.dim() == 2 && rows.is_contiguous() && rows.size(0) == N * H * W);
  return rows.view({N, H, W, rows.size(1)}).permute({0, 3, 1, 2});
}

// The data types the CUDA kernels take (check_input_4d already rejected non-floating types).
inline void check_cuda_input(const Tensor& input, const char* name) {
  const auto st = input.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, name,
              ": expected dtype float32, float16, bfloat16 or float64 on CUDA, got ", st);
#ifndef DNF_CUDA_EMULATE
  TORCH_CHECK(input.is_cuda(), name, ": expected a CUDA tensor, got a tensor on ", input.device());
#endif
}

// Accumulation / BN dtype of a data type: float for float, float16, bfloat16; double for double
// (= stats_dtype(), which the argument checks enforce for every BN tensor).
template <typename T>
using acc_type = at::opmath_type<T>;

template <typename T>
at::TensorOptions acc_options(const Tensor& like) {
  return like.options().dtype(c10::CppTypeToScalarType<acc_type<T>>::value).memory_format(
      at::MemoryFormat::Contiguous);
}

// data pointer of a (possibly strided) BN vector; the contiguous copy, if any, is kept alive in
// `keep` (freed memory is reused only by later work on the same stream, so this is safe).
template <typename acc_t>
const acc_t* vec_ptr(const Tensor& t, std::vector<Tensor>& keep) {
  keep.push_back(t.contiguous());
  return keep.back().data_ptr<acc_t>();
}

}  // namespace dnf::DNF_CUDA_NS
