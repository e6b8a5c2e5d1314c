// CPU kernels of the per-layer entry points of the synchronised dense block (docs/design.md §13).
//
// With SyncBatchNorm the statistics of every newly written channel group are all-reduced across the
// process group before the next layer reads them, so the block runs as a Python loop over layers
// (densenet_fast/ops/sync_block.py) with collectives between these stages. They are the 1x1 stage of
// the fused block (csrc/cpu/dense_block_cpu.cpp) as separate operators, with the same tiling: BN1+ReLU
// is the prologue of the GEMM, applied to one cache-sized tile of rows at a time, so the normalised
// input of a layer is never materialised, in the forward or in the backward.
#include "cpu/isa_build.h"  // first: which ISA build this is

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/kernels.h"
#include "cpu/workspace.h"

namespace dnf::cpu::DNF_ISA {

using at::Tensor;


LayerGeometry check_layer_cpu(const Tensor& buffer, int64_t channels, const Tensor& mean, const Tensor& var,
                              const Tensor& weight, const Tensor& bias, const Tensor& conv_weight, double eps) {
  TORCH_CHECK(buffer.scalar_type() == at::kFloat || buffer.scalar_type() == at::kDouble,
              "buffer: expected dtype float32 or float64 on CPU (the synchronised block), got ",
              buffer.scalar_type());
  return check_block_layer_args(buffer, channels, mean, var, weight, bias, conv_weight, eps);
}

// BN tensors as contiguous T (a float32 model's BN tensors are float32 already: no copy).
Tensor bn_arg(const Tensor& t, const Tensor& ref) { return t.to(ref.scalar_type()).contiguous(); }

// Y[N, inter, *] (channels_last) = conv1x1(relu(bn(buffer[:, :channels]))) with the given statistics.
Tensor block_layer_bottleneck_cpu(const Tensor& buffer, int64_t channels, const Tensor& mean, const Tensor& var,
                                  const Tensor& weight, const Tensor& bias, const Tensor& conv_weight,
                                  double eps) {
  const LayerGeometry g = check_layer_cpu(buffer, channels, mean, var, weight, bias, conv_weight, eps);
  const Tensor X = buffer.contiguous(cl_format(g.dims));
  std::vector<int64_t> shape = buffer.sizes().vec();
  shape[1] = g.inter;
  Tensor y = empty_mapped(shape, buffer.options(), cl_format(g.dims));
  AT_DISPATCH_FLOATING_TYPES(buffer.scalar_type(), "block_layer_bottleneck_cpu", [&] {
    using T = scalar_t;
    gemm_engine(buffer.scalar_type());  // chosen once, outside the parallel region
    const Tensor mu = bn_arg(mean, X), vr = bn_arg(var, X), ga = bn_arg(weight, X), be = bn_arg(bias, X);
    const Tensor W = conv_weight.contiguous();
    std::vector<T> a(channels), b(channels), is(channels);
    fold_channels<T>(channels, ga.data_ptr<T>(), be.data_ptr<T>(), mu.data_ptr<T>(), vr.data_ptr<T>(), eps, a.data(),
                     b.data(), is.data());
    RECORD_FUNCTION("dnf_cpu::layer_bn1_relu_gemm", {});
    bn_relu_gemm<T, T>(X.data_ptr<T>(), g.rows, g.Ct, channels, a.data(), b.data(), W.data_ptr<T>(), g.inter,
                       y.data_ptr<T>());
  });
  return y;
}

// Backward of the stage above given dY, with the BN1 statistics treated as constants (the caller adds
// their terms once the sums are all-reduced): grad_buffer[:, :channels] += a*dU, dU = (dY W1) masked by
// U > 0; returns dW1 and the per-channel sums of dU and dU*xhat (the local dbeta1 and dgamma1).
std::tuple<Tensor, Tensor, Tensor> block_layer_bottleneck_backward_cpu(
    const Tensor& grad_y, const Tensor& buffer, int64_t channels, const Tensor& mean, const Tensor& var,
    const Tensor& weight, const Tensor& bias, const Tensor& conv_weight, double eps, Tensor& grad_buffer) {
  const LayerGeometry g = check_layer_cpu(buffer, channels, mean, var, weight, bias, conv_weight, eps);
  std::vector<int64_t> yshape = buffer.sizes().vec();
  yshape[1] = g.inter;
  check_float_tensor(grad_y, "grad_y", buffer);
  check_shape(grad_y, yshape, "grad_y");
  check_float_tensor(grad_buffer, "grad_buffer", buffer);
  check_shape(grad_buffer, buffer.sizes(), "grad_buffer");
  TORCH_CHECK(grad_buffer.is_contiguous(cl_format(g.dims)),
              "grad_buffer: expected a ", g.dims == 3 ? "channels_last_3d" : "channels_last",
              " contiguous tensor (it is updated in place), got strides ", grad_buffer.strides());
  const Tensor X = buffer.contiguous(cl_format(g.dims));
  const Tensor dY = grad_y.contiguous(cl_format(g.dims));
  const int64_t c = channels, inter = g.inter, M = g.rows, Ct = g.Ct;
  Tensor dw1 = at::empty(conv_weight.sizes(), conv_weight.options().memory_format(at::MemoryFormat::Contiguous));
  const auto sopts = buffer.options();
  Tensor sum_du = at::empty({c}, sopts), sum_du_xhat = at::empty({c}, sopts);
  AT_DISPATCH_FLOATING_TYPES(buffer.scalar_type(), "block_layer_bottleneck_backward_cpu", [&] {
    using T = scalar_t;
    using acc_t = typename Acc<T>::type;
    gemm_engine(buffer.scalar_type());
    const Tensor mu_t = bn_arg(mean, X), vr = bn_arg(var, X), ga = bn_arg(weight, X), be = bn_arg(bias, X);
    const Tensor W = conv_weight.contiguous();
    std::vector<T> a(c), b(c), is(c);
    const T* mu = mu_t.data_ptr<T>();
    fold_channels<T>(c, ga.data_ptr<T>(), be.data_ptr<T>(), mu, vr.data_ptr<T>(), eps, a.data(), b.data(), is.data());
    const T* Xp = X.data_ptr<T>();
    const T* dYp = dY.data_ptr<T>();
    const T* W1p = W.data_ptr<T>();
    T* Gp = grad_buffer.data_ptr<T>();
    const int64_t tr = tile_rows(std::max(c, inter), sizeof(T));
    const int64_t ntiles = (M + tr - 1) / tr;
    RECORD_FUNCTION("dnf_cpu::layer_gemm1x1_bn1_backward", {});
    ThreadPartials<T> pw(inter * c);
    ThreadPartials<acc_t> p1(2 * c);
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> U(tr * c), dU(tr * c), ts(2 * c);
      T* dw = pw.mine();
      acc_t* s = p1.mine();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tr, nr = std::min(tr, M - r0);
        bn_relu_tile<T, T>(Xp, Ct, r0, nr, c, a.data(), b.data(), U.data());
        gemm_acc('N', 'T', c, inter, nr, U.data(), c, dYp + r0 * inter, inter, T(1), dw, c);
        gemm_acc('N', 'N', c, nr, inter, W1p, c, dYp + r0 * inter, inter, T(0), dU.data(), c);
        std::fill(ts.begin(), ts.end(), T(0));
        T* ts1 = ts.data();
        T* ts2 = ts.data() + c;
        for (int64_t r = 0; r < nr; ++r) {
          const T* xr = Xp + (r0 + r) * Ct;
          T* gr = Gp + (r0 + r) * Ct;
          const T* ur = U.data() + r * c;
          const T* dur = dU.data() + r * c;
          for (int64_t j = 0; j < c; ++j) {
            const T d = relu_grad<T>(ur[j], dur[j]);
            ts1[j] += d;
            ts2[j] += d * (xr[j] - mu[j]) * is[j];
            gr[j] += a[j] * d;
          }
        }
        for (int64_t j = 0; j < 2 * c; ++j) s[j] += ts[j];
      }
    });
    pw.reduce_into(dw1.data_ptr<T>());
    std::vector<acc_t> sums(2 * c);
    p1.reduce_into(sums.data());
    for (int64_t j = 0; j < c; ++j) {
      sum_du.data_ptr<T>()[j] = static_cast<T>(sums[j]);
      sum_du_xhat.data_ptr<T>()[j] = static_cast<T>(sums[c + j]);
    }
  });
  return {dw1, sum_du, sum_du_xhat};
}

// A [N, C, *] tensor whose channels are contiguous and whose other dimensions form one row stride
// (channels_last, or a channel slice of a channels_last block buffer): (rows, row stride). Else {0, 0}.
std::pair<int64_t, int64_t> row_layout(const Tensor& x) {
  if (x.stride(1) != 1 && x.size(1) != 1) return {0, 0};
  const int64_t ld = x.stride(x.dim() - 1);
  int64_t expect = ld;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) != 1 && x.stride(d) != expect) return {0, 0};
    expect *= x.size(d);
  }
  if (x.size(0) != 1 && x.stride(0) != expect) return {0, 0};
  return {x.numel() / x.size(1), ld};
}

// [rows, C] matrix of a [N, C, *] tensor read in place (see row_layout), else a channels_last copy.
std::pair<Tensor, int64_t> row_matrix(const Tensor& x) {
  const auto [rows, ld] = row_layout(x);
  if (rows != 0 || x.numel() == 0) return {x, ld};
  return {x.contiguous(cl_format(x)), x.size(1)};
}

// [2, C] float64: per-channel sum and sum of squares (or, with ``other``, sum of input and of
// input*other) over every other dimension, accumulated in float64 (a float32 value's square or product
// is exact in float64), in fixed row chunks (thread-count independent). Channel slices of block buffers
// are read in place: no float64 or product temporary (the BN2 backward's sums run at the step's peak).
Tensor channel_sums_cpu(const Tensor& input, const std::optional<Tensor>& other) {
  check_input_4d(input, "input", /*training=*/false);
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "input: expected dtype float32 or float64 on CPU, got ", input.scalar_type());
  const bool dot = other.has_value() && other->defined();
  if (dot) {
    check_float_tensor(*other, "other", input);
    check_shape(*other, input.sizes(), "other");
  }
  const int64_t C = input.size(1);
  const int64_t rows = C == 0 ? 0 : input.numel() / C;
  const auto [X, ldx] = row_matrix(input);
  const auto [Y, ldy] = dot ? row_matrix(*other) : std::pair<Tensor, int64_t>{X, ldx};
  Tensor out = at::zeros({2, C}, input.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "channel_sums_cpu", [&] {
    const scalar_t* xp = X.data_ptr<scalar_t>();
    const scalar_t* yp = Y.data_ptr<scalar_t>();
    const int64_t chunk = reduce_chunk<scalar_t>(rows), nchunks = (rows + chunk - 1) / chunk;
    std::vector<double> part(nchunks * 2 * C, 0.0);
    at::parallel_for(0, nchunks, 1, [&](int64_t b, int64_t e) {
      for (int64_t ch = b; ch < e; ++ch) {
        double* s = part.data() + ch * 2 * C;
        for (int64_t r = ch * chunk; r < std::min(rows, (ch + 1) * chunk); ++r) {
          const scalar_t* row = xp + r * ldx;
          const scalar_t* orow = yp + r * ldy;
          for (int64_t j = 0; j < C; ++j) {
            const double v = static_cast<double>(row[j]);
            s[j] += v;
            s[C + j] += v * static_cast<double>(orow[j]);
          }
        }
      }
    });
    double* o = out.data_ptr<double>();
    for (int64_t ch = 0; ch < nchunks; ++ch)
      for (int64_t j = 0; j < 2 * C; ++j) o[j] += part[ch * 2 * C + j];
  });
  return out;
}

}  // namespace dnf::cpu::DNF_ISA

#ifdef DNF_ISA_REGISTERS
namespace dnf::cpu {

DNF_DECLARE_ISA_VARIANTS(block_layer_bottleneck_cpu)
DNF_DECLARE_ISA_VARIANTS(block_layer_bottleneck_backward_cpu)
DNF_DECLARE_ISA_VARIANTS(channel_sums_cpu)

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("block_layer_bottleneck", DNF_PICK_ISA(block_layer_bottleneck_cpu));
  m.impl("block_layer_bottleneck_backward", DNF_PICK_ISA(block_layer_bottleneck_backward_cpu));
  m.impl("channel_sums", DNF_PICK_ISA(channel_sums_cpu));
}

}  // namespace dnf::cpu
#endif
