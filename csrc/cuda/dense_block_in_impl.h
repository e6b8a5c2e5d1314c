// The CUDA InstanceNorm dense-block operators dense_block_in_forward / _backward (docs/design.md §3, "InstanceNorm
// blocks"; csrc/cpu/dense_block_in_cpu.cpp is the executable specification). Included by dense_block_in_cuda.cu and,
// for the host emulation of the tests, by emu/emulate.cpp.
//
// dense_block_impl.h's BN block with per-sample statistics: in channels_last a sample's rows are the contiguous range
// [n*S, (n+1)*S) (S = (D*)H*W), so every per-channel step (moments, fold, prologue, backward sums, epilogue,
// finalisation) runs once per sample on that row range with the sample's folded scale/shift [N, c] -- the same
// functors of block_kernels.cuh / reduce.cuh, with the math of common/bn_math.h. Statistics of a buffer column are
// computed once, when it is written ([N, Ct]); the merged backward keeps S1, S2 per (sample, channel). No running
// statistics and no dropout: train and eval compute the same. The 1x1 conv takes the simple path (the per-sample
// fold into a workspace U [rows, c], then one cuBLAS GEMM over all rows): the fused tensor-core GEMM's prologue
// reads one scale/shift per channel for the whole batch, so it stays BN-only (DNF_CUDA_BN_GEMM=fused does not apply
// here). Optional LeakyReLU / PReLU slopes as dense_block_act_* (the slope variants of the functors).
// Cost of the per-sample loop: about N times the launches of the BN block, each over 1/N of the rows.
#pragma once

#include "common/block_grads.h"
#include "common/in_checks.h"
#include "cuda/block_kernels.cuh"
#include "cuda/common_impl.h"
#include "cuda/reduce.cuh"

namespace dnf::DNF_CUDA_NS {

// Per-sample mean / biased variance of columns [c0, c0+width) of X [N*S, ld] into mean/var [N, ldm] at column c0.
template <typename T, typename acc_t>
void per_sample_moments(const T* X, int64_t N, int64_t S, int64_t ld, int64_t c0, int64_t width, acc_t* mean,
                    acc_t* var, int64_t ldm, const at::TensorOptions& acc_opts) {
  for (int64_t n = 0; n < N; ++n)
    column_moments<T, acc_t, acc_t>(X + n * S * ld, S, ld, c0, width, mean + n * ldm + c0, var + n * ldm + c0,
                                    acc_opts);
}

// Per-sample fold of c channels: a, b, invstd [N, c] from gamma, beta [c] and mean, var [N, ldm].
template <typename acc_t>
void per_sample_fold(int64_t N, int64_t c, const acc_t* gamma, const acc_t* beta, const acc_t* mean, const acc_t* var,
                  int64_t ldm, double eps, acc_t* a, acc_t* b, acc_t* invstd) {
  for (int64_t n = 0; n < N; ++n)
    for_each(c, FoldBn<acc_t>{gamma, beta, mean + n * ldm, var + n * ldm, eps, a + n * c, b + n * c, invstd + n * c});
}

// out[:, :width] = act(a*x + b) per sample: x [N*S, ldx], out [N*S, ldo], a, b [N, width] (x and out may alias).
template <typename T, typename acc_t>
void per_sample_norm_act(const T* x, int64_t ldx, T* out, int64_t ldo, int64_t width, int64_t N, int64_t S,
                     const acc_t* a, const acc_t* b, const acc_t* slope) {
  for (int64_t n = 0; n < N; ++n)
    for_each(S * width, BnReluApply<T, acc_t>{x + n * S * ldx, ldx, out + n * S * ldo, ldo, width, a + n * width,
                                              b + n * width, slope});
}

template <typename T>
void in_forward_impl(const BlockGeometry& g, Tensor& buffer, TensorList g1, TensorList b1, TensorList w1,
                     TensorList g2, TensorList b2, TensorList w2, double eps, Tensor& mean, Tensor& var,
                     Tensor& mean2, Tensor& var2, const Tensor& slopes) {
  using acc_t = acc_type<T>;
  const auto acc_opts = acc_options<T>(buffer);
  const int64_t N = g.N, S = g.rows() / g.N, M = g.rows(), Ct = g.Ct, inter = g.inter, k = g.k;
  T* X = buffer.data_ptr<T>();
  acc_t *mu = mean.data_ptr<acc_t>(), *vr = var.data_ptr<acc_t>();
  const acc_t* SL = slopes.defined() ? slopes.data_ptr<acc_t>() : nullptr;  // nullptr: ReLU
  per_sample_moments<T, acc_t>(X, N, S, Ct, 0, g.C0, mu, vr, Ct, acc_opts);

  Tensor fold1 = at::empty({3, N * Ct}, acc_opts), fold2 = at::empty({3, N * inter}, acc_opts);
  acc_t *a1 = fold1.data_ptr<acc_t>(), *bb1 = a1 + N * Ct, *is1 = a1 + 2 * N * Ct;
  acc_t *a2 = fold2.data_ptr<acc_t>(), *bb2 = a2 + N * inter, *is2 = a2 + 2 * N * inter;
  Tensor y = at::empty({M, inter}, buffer.options());  // Y, then V = act(in2(Y)) in place
  T* Y = y.data_ptr<T>();
  const Tensor v4 = spatial_view(y, g);
  Tensor u_flat = at::empty({M * (Ct - k)}, buffer.options());  // act(in1(prefix)) of every layer, widest prefix

  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t c = g.in_channels(l);
    const acc_t* sl1 = SL == nullptr ? nullptr : SL + slope_offset(g, l);
    const acc_t* sl2 = SL == nullptr ? nullptr : sl1 + c;
    std::vector<Tensor> keep;
    per_sample_fold<acc_t>(N, c, vec_ptr<acc_t>(g1[l], keep), vec_ptr<acc_t>(b1[l], keep), mu, vr, Ct, eps, a1, bb1,
                        is1);
    Tensor u = u_flat.narrow(0, 0, M * c).view({M, c});
    per_sample_norm_act<T, acc_t>(X, Ct, u.data_ptr<T>(), c, c, N, S, a1, bb1, sl1);
    at::mm_out(y, u, w1[l].contiguous().view({inter, c}).t());
    acc_t *m2 = mean2.data_ptr<acc_t>() + l * N * inter, *v2 = var2.data_ptr<acc_t>() + l * N * inter;
    per_sample_moments<T, acc_t>(Y, N, S, inter, 0, inter, m2, v2, inter, acc_opts);
    per_sample_fold<acc_t>(N, inter, vec_ptr<acc_t>(g2[l], keep), vec_ptr<acc_t>(b2[l], keep), m2, v2, inter, eps, a2,
                        bb2, is2);
    per_sample_norm_act<T, acc_t>(Y, inter, Y, inter, inter, N, S, a2, bb2, sl2);
    const Tensor out = conv3x3(v4, w2[l], g.dims).contiguous(cl_format(g.dims));
    for_each(M * k, StoreNewFeatures<T, acc_t>{out.data_ptr<T>(), X, Ct, c, k, MaskView{}, acc_t(1)});
    per_sample_moments<T, acc_t>(X, N, S, Ct, c, k, mu, vr, Ct, acc_opts);
  }
}

template <typename T>
void in_backward_impl(const BlockGeometry& g, const Tensor& buffer, Tensor& G, const Tensor& mean, const Tensor& var,
                      const Tensor& mean2, const Tensor& var2, TensorList g1, TensorList b1, TensorList w1,
                      TensorList g2, TensorList b2, TensorList w2, double eps, BlockGrads& out, const Tensor& slopes,
                      Tensor& grad_slopes) {
  using acc_t = acc_type<T>;
  const auto acc_opts = acc_options<T>(buffer);
  const auto opts = buffer.options().memory_format(at::MemoryFormat::Contiguous);
  const int64_t N = g.N, S = g.rows() / g.N, M = g.rows(), Ct = g.Ct, inter = g.inter, k = g.k;
  const T* X = buffer.data_ptr<T>();
  acc_t* Gp = G.data_ptr<acc_t>();
  const acc_t* mu = mean.data_ptr<acc_t>();
  const acc_t* SL = slopes.defined() ? slopes.data_ptr<acc_t>() : nullptr;
  const int nsums = SL == nullptr ? 2 : 3;
  if (SL != nullptr) grad_slopes = at::empty({slope_offset(g, g.L)}, acc_opts);

  // Merged IN1 backward scalars per (sample, channel): S1 = sum gamma*dbeta, S2 = sum gamma*dgamma of the readers.
  Tensor Ssum = at::zeros({2, N * Ct}, acc_opts), shared_is = at::empty({N * Ct}, acc_opts);
  acc_t *S1 = Ssum.data_ptr<acc_t>(), *S2 = S1 + N * Ct, *isv = shared_is.data_ptr<acc_t>();
  for_each(N * Ct, FoldBn<acc_t>{nullptr, nullptr, nullptr, var.data_ptr<acc_t>(), eps, nullptr, nullptr, isv});
  auto finalize = [&](int64_t c0, int64_t width) {
    for (int64_t n = 0; n < N; ++n)
      for_each(S * width, FinalizeGrad<T, acc_t>{Gp + n * S * Ct, X + n * S * Ct, Ct, c0, width, S, mu + n * Ct,
                                                 isv + n * Ct, S1 + n * Ct, S2 + n * Ct});
  };
  // Per-sample BN backward sums [nsums, width] of `term_at(n)` over sample n's S rows, their epilogue with the
  // sample's row count (dbeta, dgamma into per [N, 2, width]; m [N, 2, width] when given; S1/S2 of the sample), and
  // the sums over samples: (dbeta, dgamma, slope gradient or undefined).
  auto sample_sums = [&](int64_t width, auto term_at, acc_t* m, const acc_t* gamma, acc_t* s1, acc_t* s2) {
    Tensor per = at::empty({N, nsums, width}, acc_opts);
    for (int64_t n = 0; n < N; ++n) {
      Tensor sums = nsums == 2 ? column_sums<acc_t, 2>(S, width, term_at(n, std::false_type{}), acc_opts)
                               : column_sums<acc_t, 3>(S, width, term_at(n, std::true_type{}), acc_opts);
      acc_t* p = per.data_ptr<acc_t>() + n * nsums * width;
      for_each(width, BnGradEpilogue<acc_t>{sums.data_ptr<acc_t>(), width, S, true, p, p + width,
                                            m == nullptr ? nullptr : m + n * 2 * width, gamma,
                                            s1 == nullptr ? nullptr : s1 + n * Ct, s2 == nullptr ? nullptr : s2 + n * Ct});
      if (nsums == 3) per[n][2].copy_(sums[2]);
    }
    const Tensor tot = per.sum(0);
    return std::make_tuple(tot[0], tot[1], nsums == 3 ? tot[2] : Tensor());
  };

  Tensor fold1 = at::empty({3, N * Ct}, acc_opts), fold2 = at::empty({3, N * inter}, acc_opts);
  acc_t *a1 = fold1.data_ptr<acc_t>(), *bb1 = a1 + N * Ct, *is1 = a1 + 2 * N * Ct;
  acc_t *a2 = fold2.data_ptr<acc_t>(), *bb2 = a2 + N * inter, *is2 = a2 + 2 * N * inter;
  Tensor m2buf = at::empty({N, 2, inter}, acc_opts);
  acc_t* m2 = m2buf.data_ptr<acc_t>();
  Tensor u_flat = at::empty({M * (Ct - k)}, opts);  // U of the layer, then its gradient dU
  Tensor y = at::empty({M, inter}, opts), v = at::empty({M, inter}, opts), dout = at::empty({M, k}, opts);
  T *Y = y.data_ptr<T>(), *V = v.data_ptr<T>();
  const Tensor v4 = spatial_view(v, g), dout4 = spatial_view(dout, g);

  for (int64_t l = g.L - 1; l >= 0; --l) {
    const int64_t c = g.in_channels(l);
    // Every reader of layer l's channels is done: their gradient is final (the last layer's have none).
    if (block_channels_have_reader(l, g.L)) finalize(c, k);
    const acc_t* sl1 = SL == nullptr ? nullptr : SL + slope_offset(g, l);
    const acc_t* sl2 = SL == nullptr ? nullptr : sl1 + c;
    std::vector<Tensor> keep;
    const acc_t* gamma1 = vec_ptr<acc_t>(g1[l], keep);
    per_sample_fold<acc_t>(N, c, gamma1, vec_ptr<acc_t>(b1[l], keep), mu, var.data_ptr<acc_t>(), Ct, eps, a1, bb1, is1);
    const acc_t* mu2 = mean2.data_ptr<acc_t>() + l * N * inter;
    per_sample_fold<acc_t>(N, inter, vec_ptr<acc_t>(g2[l], keep), vec_ptr<acc_t>(b2[l], keep), mu2,
                        var2.data_ptr<acc_t>() + l * N * inter, inter, eps, a2, bb2, is2);
    const Tensor W1 = w1[l].contiguous().view({inter, c});

    // Recompute the bottleneck as the forward did: U = act(in1(X[:, :c])), Y = U W1^T, V = act(in2(Y)).
    Tensor u = u_flat.narrow(0, 0, M * c).view({M, c});
    T* U = u.data_ptr<T>();
    per_sample_norm_act<T, acc_t>(X, Ct, U, c, c, N, S, a1, bb1, sl1);
    at::mm_out(y, u, W1.t());
    per_sample_norm_act<T, acc_t>(Y, inter, V, inter, inter, N, S, a2, bb2, sl2);

    // conv3x3 backward (cuDNN; deterministic algorithms when requested, as ATen decides).
    for_each(M * k, GradOfNewFeatures<T, acc_t>{Gp, dout.data_ptr<T>(), Ct, c, k, MaskView{}, acc_t(1)});
    auto conv_grads = conv3x3_backward(dout4, v4, w2[l], g.dims);
    Tensor dv = std::get<0>(conv_grads).contiguous(cl_format(g.dims));
    out.w2[l] = std::get<1>(conv_grads).contiguous();
    T* dV = dv.data_ptr<T>();

    // IN2 + activation backward per sample; dV becomes dY in place.
    auto [db2, dg2, ds2] = sample_sums(
        inter,
        [&](int64_t n, auto act) {
          const int64_t o = n * S * inter, f = n * inter;
          return Bn2BackwardTerm<T, acc_t, decltype(act)::value>{V + o, dV + o, Y + o, mu2 + f, is2 + f, inter,
                                                                  a2 + f, bb2 + f, sl2};
        },
        m2, nullptr, nullptr, nullptr);
    out.b2[l] = db2.contiguous(), out.g2[l] = dg2.contiguous();
    if (ds2.defined()) grad_slopes.narrow(0, slope_offset(g, l) + c, inter).copy_(ds2);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t o = n * S * inter, f = n * inter;
      for_each(S * inter, Bn2BackwardApply<T, acc_t>{V + o, Y + o, dV + o, mu2 + f, is2 + f, a2 + f,
                                                     m2 + n * 2 * inter, inter, true, bb2 + f, sl2});
    }
    const Tensor dy = rows_view(dv);

    // 1x1 conv backward: dW1 = dY^T U (float accumulation for half data), then dU = dY W1 over U.
    out.w1[l] = at::empty(conv_weight_shape(inter, c, 1, g.dims), opts);
    Tensor dw1 = out.w1[l].view({inter, c});
    mm_weight_grad_out(dw1, dy.t(), u);
    at::mm_out(u, dy, W1);

    // IN1 + activation backward into G, and this reader's per-sample contribution to S1/S2.
    auto [db1, dg1, ds1] = sample_sums(
        c,
        [&](int64_t n, auto act) {
          return Bn1BackwardTerm<T, acc_t, decltype(act)::value>{X + n * S * Ct, Ct, U + n * S * c, c, a1 + n * c,
                                                                  bb1 + n * c, mu + n * Ct, is1 + n * c,
                                                                  Gp + n * S * Ct, sl1};
        },
        nullptr, gamma1, S1, S2);
    out.b1[l] = db1.contiguous(), out.g1[l] = dg1.contiguous();
    if (ds1.defined()) grad_slopes.narrow(0, slope_offset(g, l), c).copy_(ds1);
  }
  finalize(0, g.C0);
  norm_grads_as_param_dtypes(out, g1, b1, g2, b2);
}

inline Tensor defined_or_empty(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->contiguous() : Tensor();
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_in_forward(
    const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
    double eps, const c10::optional<Tensor>& slopes_in) {
  const BlockGeometry g = check_in_block_args(input, g1, b1, w1, g2, b2, w2, eps, slopes_in);
  check_cuda_input(input, "input");
  const Tensor slopes = defined_or_empty(slopes_in);
  const DeviceScope scope(input);
  Tensor buffer = empty_cl(g.shape(g.Ct), input.options());
  buffer.narrow(1, 0, g.C0).copy_(input);
  const auto sopts = input.options().dtype(stats_dtype(input.scalar_type()));
  Tensor mean = at::empty({g.N, g.Ct}, sopts), var = at::empty({g.N, g.Ct}, sopts);
  Tensor mean2 = at::empty({g.L, g.N, g.inter}, sopts), var2 = at::empty({g.L, g.N, g.inter}, sopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "dense_block_in_forward_cuda", [&] {
    in_forward_impl<scalar_t>(g, buffer, g1, b1, w1, g2, b2, w2, eps, mean, var, mean2, var2, slopes);
  });
  return {buffer, mean, var, mean2, var2};
}

inline std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                  std::vector<Tensor>, std::vector<Tensor>, Tensor>
dense_block_in_backward(const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean, const Tensor& var,
                        const Tensor& mean2, const Tensor& var2, TensorList g1, TensorList b1, TensorList w1,
                        TensorList g2, TensorList b2, TensorList w2, double eps, int64_t num_input_features,
                        const c10::optional<Tensor>& slopes_in) {
  const BlockGeometry g = check_in_backward_args(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2,
                                                 eps, num_input_features, slopes_in);
  check_cuda_input(buffer, "buffer");
  const Tensor slopes = defined_or_empty(slopes_in);
  const DeviceScope scope(buffer);
  const Tensor X = buffer.contiguous(cl_format(buffer));
  const auto acc_dtype = stats_dtype(buffer.scalar_type());
  Tensor G = empty_cl(g.shape(g.Ct), buffer.options().dtype(acc_dtype));
  G.copy_(grad_buffer);
  BlockGrads out(g.L);
  Tensor grad_slopes;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, buffer.scalar_type(), "dense_block_in_backward_cuda", [&] {
    const auto as_acc = [&](const Tensor& t) { return t.to(acc_dtype).contiguous(); };
    in_backward_impl<scalar_t>(g, X, G, as_acc(mean), as_acc(var), as_acc(mean2), as_acc(var2), g1, b1, w1, g2, b2,
                               w2, eps, out, slopes, grad_slopes);
  });
  Tensor grad_input = empty_cl(g.shape(g.C0), buffer.options());
  grad_input.copy_(G.narrow(1, 0, g.C0));
  if (!grad_slopes.defined()) grad_slopes = at::empty({0}, buffer.options().dtype(acc_dtype));
  return {grad_input, out.g1, out.b1, out.w1, out.g2, out.b2, out.w2, grad_slopes};
}

}  // namespace dnf::DNF_CUDA_NS
