// Host-side helpers shared by the CUDA dense-block and tail operators (and their host emulation).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/block_grads.h"
#include "common/checks.h"
#include "common/layout.h"
#include "cuda/launch.cuh"

namespace dnf::DNF_CUDA_NS {

using at::Tensor;
using at::TensorList;

using ::dnf::cl_format;  // common/layout.h: the [rows, C] matrix layout, by spatial dims or by tensor
using ::dnf::empty_cl;

// [N*(D*)H*W, C] row-major view of a channels_last(_3d)-contiguous [N, C, (D,) H, W] tensor (never a copy).
inline Tensor rows_view(const Tensor& t) {
  TORCH_INTERNAL_ASSERT((t.dim() == 4 || t.dim() == 5) && t.is_contiguous(cl_format(t)));
  const int64_t C = t.size(1);
  return t.as_strided({t.numel() / C, C}, {C, 1});
}

// [N, C, (D,) H, W] channels_last(_3d) view of a contiguous [rows, C] matrix of the block's geometry.
inline Tensor spatial_view(const Tensor& rows, const BlockGeometry& g) {
  TORCH_INTERNAL_ASSERT(rows.dim() == 2 && rows.is_contiguous() && rows.size(0) == g.rows());
  if (g.dims == 3) return rows.view({g.N, g.D, g.H, g.W, rows.size(1)}).permute({0, 4, 1, 2, 3});
  return rows.view({g.N, g.H, g.W, rows.size(1)}).permute({0, 3, 1, 2});
}

// The layers' 3x3 (3x3x3) convolution, stride 1, padding 1 (cuDNN through ATen), and its backward.
inline Tensor conv3x3(const Tensor& x, const Tensor& w, int64_t dims) {
  const std::vector<int64_t> ones(dims, 1), zeros(dims, 0);
  return at::convolution(x, w, {}, ones, ones, ones, false, zeros, 1);
}

inline std::tuple<Tensor, Tensor> conv3x3_backward(const Tensor& dout, const Tensor& x, const Tensor& w,
                                                   int64_t dims) {
  const std::vector<int64_t> ones(dims, 1), zeros(dims, 0);
  auto grads = at::convolution_backward(dout, x, w, c10::nullopt, ones, ones, ones, false, zeros, 1,
                                        {true, true, false});
  return {std::get<0>(grads), std::get<1>(grads)};
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

// data pointer (as acc_t) of a BN vector of any strides and of dtype acc_t or, for a float16/bfloat16
// model, the data dtype (BN then still computes in float). The converted / contiguous copy, if any, is
// kept alive in `keep` (freed memory is reused only by later work on the same stream, so this is safe).
template <typename acc_t>
const acc_t* vec_ptr(const Tensor& t, std::vector<Tensor>& keep) {
  keep.push_back(t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous());
  return keep.back().data_ptr<acc_t>();
}

// A BN gradient computed in acc_t, returned in the dtype of its parameter (as the fake kernels declare).
inline Tensor as_param_dtype(const Tensor& grad, const Tensor& param) {
  return grad.scalar_type() == param.scalar_type() ? grad : grad.to(param.scalar_type());
}

// Every layer's norm gradients (out.g1, b1, g2, b2) in their parameters' dtypes (the BN and InstanceNorm blocks).
inline void norm_grads_as_param_dtypes(BlockGrads& out, at::TensorList g1, at::TensorList b1, at::TensorList g2,
                                       at::TensorList b2) {
  for (size_t l = 0; l < g1.size(); ++l) {
    out.g1[l] = as_param_dtype(out.g1[l], g1[l]);
    out.b1[l] = as_param_dtype(out.b1[l], b1[l]);
    out.g2[l] = as_param_dtype(out.g2[l], g2[l]);
    out.b2[l] = as_param_dtype(out.b2[l], b2[l]);
  }
}

// out = a @ b for a weight gradient whose K (a reduction over every pixel of the batch, N*H*W) is
// large: float16/bfloat16 operands are accumulated *and* written in float (cuBLAS with a float C
// matrix through aten::mm.dtype, so no split-K partial is ever rounded to half precision), then
// rounded once to the operands' dtype into out. Where aten::mm.dtype has no kernel (torch < 2.8: warned
// once; the host emulation) the same float GEMM runs on float copies of the operands, without tensor
// cores. float/double: plain GEMM.
inline void mm_weight_grad_out(Tensor& out, const Tensor& a, const Tensor& b) {
  const auto st = a.scalar_type();
  if (st != at::kHalf && st != at::kBFloat16) {
    at::mm_out(out, a, b);
    return;
  }
#ifndef DNF_CUDA_EMULATE
  // Looked up by name at run time, so this compiles against any torch.
  static const auto mm_dtype = c10::Dispatcher::singleton().findOp({"aten::mm", "dtype"});
  if (mm_dtype.has_value() && mm_dtype->hasKernelForDispatchKey(c10::DispatchKey::CUDA)) {
    static const auto op = mm_dtype->typed<Tensor(const Tensor&, const Tensor&, at::ScalarType)>();
    out.copy_(op.call(a, b, at::kFloat));
    return;
  }
  // The documented slow path of torch < 2.8 (docs/cuda.md), said once rather than taken silently.
  TORCH_WARN_ONCE("densenet_fast: this torch has no CUDA kernel for aten::mm.dtype (torch < 2.8), so the ",
                  "float16/bfloat16 weight-gradient GEMMs of the dense blocks and transitions run as float32 GEMMs ",
                  "on float32 copies (no tensor cores: slower, same accuracy). torch >= 2.8 runs them on tensor ",
                  "cores with float accumulation.");
#endif
  out.copy_(at::mm(a.to(at::kFloat), b.to(at::kFloat)));
}

}  // namespace dnf::DNF_CUDA_NS
