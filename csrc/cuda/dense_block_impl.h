// The CUDA dense-block operators (docs/design.md §3; csrc/cpu/dense_block_cpu.cpp is the
// executable specification). Included by dense_block_cuda.cu and, for the host emulation of the
// tests, by emu/emulate.cpp.
//
// Forward of layer l (c = C0 + l*k input channels, inter = bn_size*k):
//   fold BN1 (shared batch stats or running stats) -> a, b;
//   Y = relu(a*X[:, :c] + b) @ W1^T   [simple: BN1+ReLU into a per-block scratch, cuBLAS GEMM;
//                                       fused (half/bf16, DNF_CUDA_BN_GEMM=fused): bn_gemm.cu];
//   BN2 batch stats of Y (training), V = relu(BN2(Y)) in place, conv3x3 (cuDNN), dropout, store the
//   k new channels into the buffer, and their batch stats (training).
// Backward: reverse sweep with a float (double for double) gradient buffer G of the whole block,
// recompute U, Y (with the same 1x1 path as the forward, so BN2's masks and xhat see the very Y its
// statistics came from), V; conv3x3 backward (cuDNN); BN2/ReLU backward; dW1 = dY^T U (float
// accumulation and output for half data: K = N*H*W); dU = dY W1; BN1/ReLU backward into G plus
// per-channel S1/S2; finalize a layer's channels once all their readers are done (merged BN1
// backward, common/bn_math.h). NaN/Inf: the rules of common/nonfinite.h, as the CPU kernels.
// BN tensors: float (double for double), or the data dtype for a float16/bfloat16 model; BN always
// computes in float, and BN gradients come back in their parameter's dtype.
// LeakyReLU / PReLU blocks (dense_block_act_*): `slopes` (packed per layer, common/checks.h slope_offset) replace
// both ReLUs by leaky(z, slope) (common/bn_math.h); their backward follows the pre-activation z and also returns
// the slopes' gradient. They take the simple 1x1 path (the fused GEMM's prologue computes ReLU only).
#pragma once

#include "common/block_grads.h"
#include "common/nonfinite.h"
#include "cuda/block_kernels.cuh"
#include "cuda/bn_gemm.h"
#include "cuda/common_impl.h"
#include "cuda/reduce.cuh"

namespace dnf::DNF_CUDA_NS {

// H: the height, or depth*height of a 5-D mask (its depth and height are read as one dimension).
inline MaskView mask_view(const c10::optional<Tensor>& mask, int64_t l, int64_t k, int64_t H, int64_t W) {
  MaskView v;
  if (!mask.has_value() || !mask->defined()) return v;
  const int64_t sd = mask->dim() - 4;  // 1 for a 5-D mask
  TORCH_CHECK(sd == 0 || mask->size(2) == 1 || mask->stride(2) == mask->size(3) * mask->stride(3),
              "dropout_mask: expected a 5-D mask whose depth and height are contiguous, got strides ",
              mask->strides());
  v.p = mask->data_ptr<bool>();
  v.sN = mask->stride(0);
  v.sC = mask->stride(1);
  v.sH = mask->stride(2 + sd);
  v.sW = mask->stride(3 + sd);
  v.HW = H * W;
  v.W = W;
  v.ch0 = l * k;
  return v;
}

template <typename acc_t>
acc_t inverse_keep(const c10::optional<Tensor>& mask, double p) {
  return (mask.has_value() && mask->defined()) ? static_cast<acc_t>(1.0 / (1.0 - p)) : acc_t(1);
}

// Per-layer BN statistics: the block's shared batch statistics (training) or the layer's running ones.
struct LayerStats {
  const Tensor* shared_mean;
  const Tensor* shared_var;
  TensorList running_mean, running_var;
  bool training;
  template <typename acc_t>
  std::pair<const acc_t*, const acc_t*> get(int64_t l, int64_t offset, std::vector<Tensor>& keep) const {
    if (training)
      return {shared_mean->data_ptr<acc_t>() + offset, shared_var->data_ptr<acc_t>() + offset};
    return {vec_ptr<acc_t>(running_mean[l], keep), vec_ptr<acc_t>(running_var[l], keep)};
  }
};

template <typename T>
void dense_block_forward_impl(const BlockGeometry& g, Tensor& buffer, TensorList g1, TensorList b1, TensorList w1,
                              TensorList g2, TensorList b2, TensorList w2, TensorList rm1, TensorList rv1,
                              TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
                              bool training, double eps, Tensor& mean, Tensor& var, Tensor& mean2, Tensor& var2,
                              const Tensor& slopes = Tensor()) {
  using acc_t = acc_type<T>;
  const auto acc_opts = acc_options<T>(buffer);
  const int64_t M = g.rows(), Ct = g.Ct, inter = g.inter, k = g.k;
  T* X = buffer.data_ptr<T>();
  const acc_t* SL = slopes.defined() ? slopes.data_ptr<acc_t>() : nullptr;  // nullptr: ReLU
  const bool fused = SL == nullptr && use_fused_bn_gemm(buffer.scalar_type());
  const LayerStats st1{&mean, &var, rm1, rv1, training};
  const LayerStats st2{&mean2, &var2, rm2, rv2, training};
  if (training) column_moments<T, acc_t, acc_t>(X, M, Ct, 0, g.C0, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>(), acc_opts);

  Tensor fold1 = at::empty({3, Ct}, acc_opts), fold2 = at::empty({3, inter}, acc_opts);
  acc_t *a1 = fold1.data_ptr<acc_t>(), *bb1 = a1 + Ct, *is1 = a1 + 2 * Ct;
  acc_t *a2 = fold2.data_ptr<acc_t>(), *bb2 = a2 + inter, *is2 = a2 + 2 * inter;
  Tensor y = at::empty({M, inter}, buffer.options());  // Y, then V = relu(bn2(Y)) in place
  T* Y = y.data_ptr<T>();
  const Tensor v4 = spatial_view(y, g);
  // Simple path: one scratch for relu(bn1(prefix)) of every layer, sized for the widest prefix.
  Tensor u_flat = fused ? Tensor() : at::empty({M * (Ct - k)}, buffer.options());
  const acc_t inv_keep = inverse_keep<acc_t>(mask, p);

  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t c = g.in_channels(l);
    const acc_t* sl1 = SL == nullptr ? nullptr : SL + slope_offset(g, l);  // the activations' slopes after BN1, BN2
    const acc_t* sl2 = SL == nullptr ? nullptr : sl1 + c;
    std::vector<Tensor> keep;
    const auto s1 = st1.get<acc_t>(l, 0, keep);
    for_each(c, FoldBn<acc_t>{vec_ptr<acc_t>(g1[l], keep), vec_ptr<acc_t>(b1[l], keep), s1.first, s1.second, eps,
                              a1, bb1, is1});
    const Tensor W1 = w1[l].contiguous().view({inter, c});
    if (fused) {
      bn_relu_gemm(X, M, Ct, c, a1, bb1, W1.data_ptr<T>(), inter, Y);
    } else {
      Tensor u = u_flat.narrow(0, 0, M * c).view({M, c});
      for_each(M * c, BnReluApply<T, acc_t>{X, Ct, u.data_ptr<T>(), c, c, a1, bb1, sl1});
      at::mm_out(y, u, W1.t());
    }
    if (training)
      column_moments<T, acc_t, acc_t>(Y, M, inter, 0, inter, mean2.data_ptr<acc_t>() + l * inter,
                                      var2.data_ptr<acc_t>() + l * inter, acc_opts);
    const auto s2 = st2.get<acc_t>(l, l * inter, keep);
    for_each(inter, FoldBn<acc_t>{vec_ptr<acc_t>(g2[l], keep), vec_ptr<acc_t>(b2[l], keep), s2.first, s2.second,
                                  eps, a2, bb2, is2});
    for_each(M * inter, BnReluApply<T, acc_t>{Y, inter, Y, inter, inter, a2, bb2, sl2});
    const Tensor out = conv3x3(v4, w2[l], g.dims).contiguous(cl_format(g.dims));
    for_each(M * k, StoreNewFeatures<T, acc_t>{out.data_ptr<T>(), X, Ct, c, k, mask_view(mask, l, k, g.D * g.H, g.W),
                                               inv_keep});
    if (training)
      column_moments<T, acc_t, acc_t>(X, M, Ct, c, k, mean.data_ptr<acc_t>() + c, var.data_ptr<acc_t>() + c,
                                      acc_opts);
  }
}

template <typename T>
void dense_block_backward_impl(const BlockGeometry& g, const Tensor& buffer, Tensor& G, const Tensor& mean,
                               const Tensor& var, const Tensor& mean2, const Tensor& var2, TensorList g1,
                               TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
                               TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2,
                               const c10::optional<Tensor>& mask, double p, bool training, double eps,
                               BlockGrads& out, const Tensor& slopes = Tensor(), Tensor* grad_slopes = nullptr) {
  using acc_t = acc_type<T>;
  const auto acc_opts = acc_options<T>(buffer);
  const auto opts = buffer.options().memory_format(at::MemoryFormat::Contiguous);
  const int64_t M = g.rows(), Ct = g.Ct, inter = g.inter, k = g.k;
  const T* X = buffer.data_ptr<T>();
  acc_t* Gp = G.data_ptr<acc_t>();
  const acc_t* SL = slopes.defined() ? slopes.data_ptr<acc_t>() : nullptr;  // nullptr: ReLU
  const bool fused = SL == nullptr && use_fused_bn_gemm(buffer.scalar_type());
  if (SL != nullptr) *grad_slopes = at::empty({slope_offset(g, g.L)}, acc_opts);
  const LayerStats st1{&mean, &var, rm1, rv1, training};
  const LayerStats st2{&mean2, &var2, rm2, rv2, training};

  // Merged BN1 backward scalars S1 = sum gamma*dbeta, S2 = sum gamma*dgamma over a channel's readers.
  Tensor S = at::zeros({2, Ct}, acc_opts);
  acc_t *S1 = S.data_ptr<acc_t>(), *S2 = S1 + Ct;
  Tensor shared_is = at::empty({training ? Ct : 0}, acc_opts);
  if (training)
    for_each(Ct, FoldBn<acc_t>{nullptr, nullptr, nullptr, var.data_ptr<acc_t>(), eps, nullptr, nullptr,
                               shared_is.data_ptr<acc_t>()});
  auto finalize = [&](int64_t c0, int64_t width) {
    if (!training) return;
    for_each(M * width, FinalizeGrad<T, acc_t>{Gp, X, Ct, c0, width, M, mean.data_ptr<acc_t>(),
                                               shared_is.data_ptr<acc_t>(), S1, S2});
  };

  Tensor fold1 = at::empty({3, Ct}, acc_opts), fold2 = at::empty({3, inter}, acc_opts);
  acc_t *a1 = fold1.data_ptr<acc_t>(), *bb1 = a1 + Ct, *is1 = a1 + 2 * Ct;
  acc_t *a2 = fold2.data_ptr<acc_t>(), *bb2 = a2 + inter, *is2 = a2 + 2 * inter;
  Tensor m2 = at::empty({2, inter}, acc_opts);
  Tensor u_flat = at::empty({M * (Ct - k)}, opts);  // U of the layer, then its gradient dU
  Tensor y = at::empty({M, inter}, opts), v = at::empty({M, inter}, opts), dout = at::empty({M, k}, opts);
  T *Y = y.data_ptr<T>(), *V = v.data_ptr<T>();
  const Tensor v4 = spatial_view(v, g), dout4 = spatial_view(dout, g);
  const acc_t inv_keep = inverse_keep<acc_t>(mask, p);

  for (int64_t l = g.L - 1; l >= 0; --l) {
    const int64_t c = g.in_channels(l);
    const acc_t* sl1 = SL == nullptr ? nullptr : SL + slope_offset(g, l);
    const acc_t* sl2 = SL == nullptr ? nullptr : sl1 + c;
    // Every reader of layer l's channels is done: their gradient is final (the last layer's have none).
    if (block_channels_have_reader(l, g.L)) finalize(c, k);
    std::vector<Tensor> keep;
    const auto s1 = st1.get<acc_t>(l, 0, keep);
    const acc_t* gamma1 = vec_ptr<acc_t>(g1[l], keep);
    for_each(c, FoldBn<acc_t>{gamma1, vec_ptr<acc_t>(b1[l], keep), s1.first, s1.second, eps, a1, bb1, is1});
    const auto s2 = st2.get<acc_t>(l, l * inter, keep);
    for_each(inter, FoldBn<acc_t>{vec_ptr<acc_t>(g2[l], keep), vec_ptr<acc_t>(b2[l], keep), s2.first, s2.second,
                                  eps, a2, bb2, is2});
    const Tensor W1 = w1[l].contiguous().view({inter, c});

    // Recompute the bottleneck: U = relu(bn1(X[:, :c])), Y = U W1^T, V = relu(bn2(Y)).
    Tensor u = u_flat.narrow(0, 0, M * c).view({M, c});
    T* U = u.data_ptr<T>();
    for_each(M * c, BnReluApply<T, acc_t>{X, Ct, U, c, c, a1, bb1, sl1});
    if (fused) {
      bn_relu_gemm(X, M, Ct, c, a1, bb1, W1.data_ptr<T>(), inter, Y);  // bitwise the forward's Y
    } else {
      at::mm_out(y, u, W1.t());
    }
    for_each(M * inter, BnReluApply<T, acc_t>{Y, inter, V, inter, inter, a2, bb2, sl2});

    // conv3x3 backward (cuDNN; deterministic algorithms when requested, as ATen decides).
    for_each(M * k, GradOfNewFeatures<T, acc_t>{Gp, dout.data_ptr<T>(), Ct, c, k, mask_view(mask, l, k, g.D * g.H, g.W),
                                                inv_keep});
    auto conv_grads = conv3x3_backward(dout4, v4, w2[l], g.dims);
    Tensor dv = std::get<0>(conv_grads).contiguous(cl_format(g.dims));
    out.w2[l] = std::get<1>(conv_grads).contiguous();
    T* dV = dv.data_ptr<T>();

    // BN2 + ReLU backward; dV becomes dY in place. Slopes: a third sum, the slopes' gradient.
    Tensor sums2;
    if (SL == nullptr) {
      sums2 = column_sums<acc_t, 2>(M, inter, Bn2BackwardTerm<T, acc_t>{V, dV, Y, s2.first, is2, inter}, acc_opts);
    } else {
      sums2 = column_sums<acc_t, 3>(
          M, inter, Bn2BackwardTerm<T, acc_t, true>{V, dV, Y, s2.first, is2, inter, a2, bb2, sl2}, acc_opts);
      grad_slopes->narrow(0, slope_offset(g, l) + c, inter).copy_(sums2[2]);
    }
    out.b2[l] = at::empty({inter}, acc_opts);
    out.g2[l] = at::empty({inter}, acc_opts);
    for_each(inter, BnGradEpilogue<acc_t>{sums2.data_ptr<acc_t>(), inter, M, training, out.b2[l].data_ptr<acc_t>(),
                                          out.g2[l].data_ptr<acc_t>(), m2.data_ptr<acc_t>(), nullptr, nullptr,
                                          nullptr});
    for_each(M * inter, Bn2BackwardApply<T, acc_t>{V, Y, dV, s2.first, is2, a2, m2.data_ptr<acc_t>(), inter,
                                                   training, bb2, sl2});
    const Tensor dy = rows_view(dv);

    // 1x1 conv backward: dW1 = dY^T U (float accumulation for half data), then dU = dY W1 over U.
    out.w1[l] = at::empty(conv_weight_shape(inter, c, 1, g.dims), opts);
    Tensor dw1 = out.w1[l].view({inter, c});
    mm_weight_grad_out(dw1, dy.t(), u);
    at::mm_out(u, dy, W1);

    // BN1 + ReLU backward into G, and this reader's contribution to S1/S2.
    Tensor sums1;
    if (SL == nullptr) {
      sums1 = column_sums<acc_t, 2>(M, c, Bn1BackwardTerm<T, acc_t>{X, Ct, U, c, a1, bb1, s1.first, is1, Gp}, acc_opts);
    } else {
      sums1 = column_sums<acc_t, 3>(
          M, c, Bn1BackwardTerm<T, acc_t, true>{X, Ct, U, c, a1, bb1, s1.first, is1, Gp, sl1}, acc_opts);
      grad_slopes->narrow(0, slope_offset(g, l), c).copy_(sums1[2]);
    }
    out.b1[l] = at::empty({c}, acc_opts);
    out.g1[l] = at::empty({c}, acc_opts);
    for_each(c, BnGradEpilogue<acc_t>{sums1.data_ptr<acc_t>(), c, M, training, out.b1[l].data_ptr<acc_t>(),
                                      out.g1[l].data_ptr<acc_t>(), nullptr, gamma1, S1, S2});
  }
  finalize(0, g.C0);
  norm_grads_as_param_dtypes(out, g1, b1, g2, b2);
}

// slopes: undefined for dense_block_forward (ReLU), the packed LeakyReLU / PReLU slopes for dense_block_act_forward.
inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> block_forward_entry(
    const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
    bool training, double eps, const Tensor& slopes_in) {
  check_cuda_input(input, "input");
  const BlockGeometry g = check_dense_block_args(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p,
                                                 training, eps);
  if (slopes_in.defined()) check_block_slopes(slopes_in, g, input);
  const Tensor slopes = slopes_in.defined() ? slopes_in.contiguous() : slopes_in;
  const DeviceScope scope(input);
  Tensor buffer = empty_cl(g.shape(g.Ct), input.options());
  buffer.narrow(1, 0, g.C0).copy_(input);
  const auto sopts = input.options().dtype(stats_dtype(input.scalar_type()));
  Tensor mean = at::empty({training ? g.Ct : 0}, sopts), var = at::empty({training ? g.Ct : 0}, sopts);
  Tensor mean2 = at::empty({training ? g.L : 0, g.inter}, sopts), var2 = at::empty({training ? g.L : 0, g.inter}, sopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dense_block_forward_cuda", [&] {
    dense_block_forward_impl<scalar_t>(g, buffer, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training,
                                       eps, mean, var, mean2, var2, slopes);
  });
  return {buffer, mean, var, mean2, var2};
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_forward(
    const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
    bool training, double eps) {
  return block_forward_entry(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps, Tensor());
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_act_forward(
    const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
    bool training, double eps, const Tensor& slopes) {
  TORCH_CHECK(slopes.defined(), "slopes: expected a tensor, got None");
  return block_forward_entry(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps, slopes);
}

using BlockBackwardResult = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                       std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>;

inline BlockBackwardResult block_backward_entry(
    const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean, const Tensor& var, const Tensor& mean2,
    const Tensor& var2, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
    bool training, double eps, int64_t num_input_features, const Tensor& slopes_in, Tensor* grad_slopes) {
  check_cuda_input(buffer, "buffer");
  const BlockGeometry g = check_dense_block_backward_args(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2,
                                                          b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps,
                                                          num_input_features);
  if (slopes_in.defined()) check_block_slopes(slopes_in, g, buffer);
  const Tensor slopes = slopes_in.defined() ? slopes_in.contiguous() : slopes_in;
  const DeviceScope scope(buffer);
  const Tensor X = buffer.contiguous(cl_format(buffer));
  const auto acc_dtype = stats_dtype(buffer.scalar_type());
  Tensor G = empty_cl(g.shape(g.Ct), buffer.options().dtype(acc_dtype));
  G.copy_(grad_buffer);
  BlockGrads out(g.L);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(), "dense_block_backward_cuda", [&] {
    const auto as_acc = [&](const Tensor& t) { return t.to(acc_dtype).contiguous(); };
    dense_block_backward_impl<scalar_t>(g, X, G, as_acc(mean), as_acc(var), as_acc(mean2), as_acc(var2), g1, b1, w1,
                                        g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps, out, slopes,
                                        grad_slopes);
  });
  Tensor grad_input = empty_cl(g.shape(g.C0), buffer.options());
  grad_input.copy_(G.narrow(1, 0, g.C0));
  return {grad_input, out.g1, out.b1, out.w1, out.g2, out.b2, out.w2};
}

inline BlockBackwardResult dense_block_backward(
    const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean, const Tensor& var, const Tensor& mean2,
    const Tensor& var2, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
    bool training, double eps, int64_t num_input_features) {
  return block_backward_entry(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2,
                              mask, p, training, eps, num_input_features, Tensor(), nullptr);
}

// The backward of dense_block_act_forward: dense_block_backward's results and the packed slopes' gradient.
inline std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                  std::vector<Tensor>, std::vector<Tensor>, Tensor>
dense_block_act_backward(const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean, const Tensor& var,
                         const Tensor& mean2, const Tensor& var2, TensorList g1, TensorList b1, TensorList w1,
                         TensorList g2, TensorList b2, TensorList w2, TensorList rm1, TensorList rv1, TensorList rm2,
                         TensorList rv2, const c10::optional<Tensor>& mask, double p, bool training, double eps,
                         int64_t num_input_features, const Tensor& slopes) {
  TORCH_CHECK(slopes.defined(), "slopes: expected a tensor, got None");
  Tensor grad_slopes;
  auto [gi, dg1, db1, dw1, dg2, db2, dw2] =
      block_backward_entry(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2,
                           mask, p, training, eps, num_input_features, slopes, &grad_slopes);
  return {gi, dg1, db1, dw1, dg2, db2, dw2, grad_slopes};
}

}  // namespace dnf::DNF_CUDA_NS
