// CPU kernels of the fused dense block with InstanceNorm (dense_block_in_forward / _backward; docs/design.md §3,
// "InstanceNorm blocks").
//
// The block buffer and the recompute-based backward are those of dense_block_cpu.cpp; what changes is that every
// norm normalises each (sample, channel) with that sample's statistics. In channels_last a sample's rows are the
// contiguous range [n*S, (n+1)*S) (S = (D*)H*W), so each per-channel step of the BN kernels runs per sample on its
// row range with per-sample folded scale/shift: statistics of a buffer column are still computed once, when the
// column is written ([N, Ct]); the merged backward of a column's readers keeps S1, S2 per (sample, channel).
// No running statistics (MONAI's InstanceNorm default, track_running_stats=False): train and eval compute the same.
//
// Built for the baseline ISA only (no csrc/cpu/isa/ wrapper): the products run in the BLAS / the engine kernels,
// the element loops are the portable ones.
#include "cpu/isa_build.h"  // first: which ISA build this is

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include "common/block_grads.h"
#include "common/checks.h"
#include "common/in_checks.h"
#include "common/layout.h"
#include "common/nonfinite.h"
#include "cpu/conv3x3.h"
#include "cpu/kernels.h"
#include "cpu/workspace.h"

#include <type_traits>

namespace dnf::cpu::DNF_ISA {
namespace {

using at::Tensor;
using at::TensorList;

// The checks of dense_block_in_forward (common/in_checks.h, shared with the CUDA kernels) and the CPU dtype rule.
BlockGeometry check_in_args(const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2,
                            TensorList b2, TensorList w2, double eps, const c10::optional<Tensor>& slopes) {
  const BlockGeometry g = check_in_block_args(input, g1, b1, w1, g2, b2, w2, eps, slopes);
  check_cpu_dtype(input);
  return g;
}

Tensor empty_in(const BlockGeometry& g, int64_t C, const at::TensorOptions& opts, OnFree on_free = OnFree::kKeep) {
  return empty_mapped(g.shape(C), opts, cl_format(g.dims), on_free);
}

// Per-sample mean / biased variance of columns [c0, c0+width) of X[rows, ld] into mean/var [N, ldm] at c0.
template <typename T, typename F>
void sample_column_moments(const T* X, const BlockGeometry& g, int64_t ld, int64_t c0, int64_t width, F* mean,
                           F* var, int64_t ldm) {
  const int64_t S = g.rows() / g.N;
  for (int64_t n = 0; n < g.N; ++n) {
    column_moments<T>(X + n * S * ld, S, ld, c0, width, mean + n * ldm + c0, var + n * ldm + c0);
  }
}

// Per-sample folded norm of c channels: a, b, invstd [N, c] from gamma, beta [c] and mean, var [N, ldm].
template <typename F>
void fold_samples(int64_t N, int64_t c, const F* gamma, const F* beta, const F* mean, const F* var, int64_t ldm,
                  double eps, F* a, F* b, F* invstd) {
  for (int64_t n = 0; n < N; ++n) {
    fold_channels<F>(c, gamma, beta, mean + n * ldm, var + n * ldm, eps, a + n * c, b + n * c, invstd + n * c);
  }
}

template <typename T>
void in_forward_impl(const BlockGeometry& g, Tensor& buffer, TensorList g1, TensorList b1, TensorList w1,
                     TensorList g2, TensorList b2, TensorList w2, double eps, Tensor& mean, Tensor& var,
                     Tensor& mean2, Tensor& var2, const Tensor& slopes) {
  using F = typename Opmath<T>::type;
  const F* Sl = slopes.defined() ? slopes.data_ptr<F>() : nullptr;
  const int64_t N = g.N, S = g.rows() / g.N, Ct = g.Ct, inter = g.inter;
  gemm_engine(buffer.scalar_type());
  if (std::is_same_v<T, c10::BFloat16>) bf16_conv_compute(g.dims, ConvPass::kForward);
  T* X = buffer.data_ptr<T>();
  F* mu = mean.data_ptr<F>();
  F* vr = var.data_ptr<F>();
  sample_column_moments<T, F>(X, g, Ct, 0, g.C0, mu, vr, Ct);
  Tensor y = empty_in(g, inter, buffer.options());
  T* Y = y.data_ptr<T>();  // Y, then V = act(in2(Y)) in place
  std::vector<F> a(N * Ct), b(N * Ct), is(N * Ct), a2(N * inter), bb2(N * inter), is2(N * inter);
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t c = g.in_channels(l);
    const Tensor gamma1 = as_f<F>(g1[l]), beta1 = as_f<F>(b1[l]);
    const Tensor gamma2 = as_f<F>(g2[l]), beta2 = as_f<F>(b2[l]);
    const Tensor W1 = w1[l].to(buffer.scalar_type()).contiguous();
    const F* s1 = Sl ? Sl + slope_offset(g, l) : nullptr;
    const F* s2 = s1 ? s1 + c : nullptr;
    fold_samples<F>(N, c, gamma1.data_ptr<F>(), beta1.data_ptr<F>(), mu, vr, Ct, eps, a.data(), b.data(), is.data());
    for (int64_t n = 0; n < N; ++n) {
      bn_relu_gemm<T, F>(X + n * S * Ct, S, Ct, c, a.data() + n * c, b.data() + n * c, W1.data_ptr<T>(), inter,
                         Y + n * S * inter, nullptr, nullptr, nullptr, s1);
    }
    F* m2 = mean2.data_ptr<F>() + l * N * inter;
    F* v2 = var2.data_ptr<F>() + l * N * inter;
    sample_column_moments<T, F>(Y, g, inter, 0, inter, m2, v2, inter);
    fold_samples<F>(N, inter, gamma2.data_ptr<F>(), beta2.data_ptr<F>(), m2, v2, inter, eps, a2.data(), bb2.data(),
                    is2.data());
    for (int64_t n = 0; n < N; ++n) {
      bn_relu_out<T, F>(Y + n * S * inter, S, inter, a2.data() + n * inter, bb2.data() + n * inter,
                        Y + n * S * inter, s2);
    }
    buffer.narrow(1, c, g.k).copy_(conv3x3(y, w2[l].to(y.scalar_type()), g.dims));
    sample_column_moments<T, F>(X, g, Ct, c, g.k, mu, vr, Ct);
  }
}

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

ForwardResult dense_block_in_forward_cpu(const Tensor& input, TensorList g1, TensorList b1, TensorList w1,
                                         TensorList g2, TensorList b2, TensorList w2, double eps,
                                         const c10::optional<Tensor>& slopes_in) {
  const BlockGeometry g = check_in_args(input, g1, b1, w1, g2, b2, w2, eps, slopes_in);
  const Tensor slopes = slopes_in.has_value() && slopes_in->defined() ? slopes_in->contiguous() : Tensor();
  Tensor buffer = empty_in(g, g.Ct, input.options());
  buffer.narrow(1, 0, g.C0).copy_(input);
  const auto opts = input.options().dtype(stats_dtype(input.scalar_type()));
  Tensor mean = at::empty({g.N, g.Ct}, opts), var = at::empty({g.N, g.Ct}, opts);
  Tensor mean2 = at::empty({g.L, g.N, g.inter}, opts), var2 = at::empty({g.L, g.N, g.inter}, opts);
  DNF_DISPATCH_CPU_KERNEL(input.scalar_type(), "dense_block_in_forward_cpu", [&] {
    in_forward_impl<scalar_t>(g, buffer, g1, b1, w1, g2, b2, w2, eps, mean, var, mean2, var2, slopes);
  });
  return {buffer, mean, var, mean2, var2};
}

// One layer's per-sample folds ([N, c] and [N, inter]) and its 1x1 weight, for the backward.
template <typename F>
struct InLayerFold {
  int64_t c = 0;
  std::vector<F> a1, b1, invstd1, a2, b2, invstd2;
  const F* mean1 = nullptr;  // [N, Ct] (the block's)
  const F* mean2 = nullptr;  // [N, inter] (the layer's)
  const F* s1 = nullptr;
  const F* s2 = nullptr;
  int64_t slope_off = 0;
  Tensor gamma1, W1;
};

// The backward of an InstanceNorm block: dense_block_cpu.cpp's BlockBackward with per-sample statistics and
// per-sample sums. G: the working gradient of the whole buffer (in the buffer's dtype).
template <typename T>
class InBlockBackward {
  using F = typename Opmath<T>::type;
  using acc_t = typename Acc<T>::type;

 public:
  InBlockBackward(const BlockGeometry& g, const Tensor& buffer, const Tensor& G, const Tensor& mean, const Tensor& var,
                  const Tensor& mean2, const Tensor& var2, TensorList g1, TensorList b1, TensorList w1, TensorList g2,
                  TensorList b2, TensorList w2, double eps, const Tensor& slopes, BlockGrads& out, Tensor& grad_slopes)
      : g_(g), buffer_(buffer), g1_(g1), b1_(b1), w1_(w1), g2_(g2), b2_(b2), w2_(w2), eps_(eps), slopes_(slopes),
        out_(out), grad_slopes_(grad_slopes), N_(g.N), S_(g.rows() / g.N), M_(g.rows()), X_(buffer.data_ptr<T>()),
        G_(G.data_ptr<T>()), mean_(mean.data_ptr<F>()), mean2_(mean2.data_ptr<F>()), var2_(var2.data_ptr<F>()),
        f_opts_(buffer.options().dtype(c10::CppTypeToScalarType<F>::value)), S1_(g.N * g.Ct, 0), S2_(g.N * g.Ct, 0),
        invstd_(g.N * g.Ct),
        Y_(empty_in(g, g.inter, buffer.options(), OnFree::kUnmap)),
        V_(empty_in(g, g.inter, buffer.options(), OnFree::kUnmap)),
        dout_(empty_in(g, g.k, buffer.options(), OnFree::kUnmap)) {
    const F* v = var.data_ptr<F>();
    for (int64_t i = 0; i < g.N * g.Ct; ++i) invstd_[i] = invstd_from_var<F>(v[i], eps);
    if (slopes.defined()) grad_slopes_ = at::zeros({slope_offset(g, g.L)}, f_opts_);
  }

  Tensor run() {
    gemm_engine(buffer_.scalar_type());
    if (std::is_same_v<T, c10::BFloat16>) bf16_conv_compute(g_.dims, ConvPass::kForward);
    for (int64_t l = g_.L - 1; l >= 0; --l) {
      const InLayerFold<F> f = fold_layer(l);
      for (int64_t n = 0; n < N_; ++n) {  // Stage 1: Y and V = act(in2(Y)), as the forward computed them
        bn_relu_gemm<T, F>(X_ + n * S_ * g_.Ct, S_, g_.Ct, f.c, f.a1.data() + n * f.c, f.b1.data() + n * f.c,
                           f.W1.template data_ptr<T>(), g_.inter, Y_.data_ptr<T>() + n * S_ * g_.inter,
                           f.a2.data() + n * g_.inter, f.b2.data() + n * g_.inter,
                           V_.data_ptr<T>() + n * S_ * g_.inter, f.s1, f.s2);
      }
      const std::vector<F> m = conv3x3_backward(l, f);
      gemm1x1_in1_backward(l, f, m.data(), m.data() + N_ * g_.inter);
    }
    Y_.reset(), V_.reset(), dout_.reset();
    Tensor grad_input = empty_in(g_, g_.C0, buffer_.options());
    finalized_columns(0, g_.C0, true, grad_input.data_ptr<T>());
    return grad_input;
  }

 private:
  InLayerFold<F> fold_layer(int64_t l) {
    const int64_t inter = g_.inter;
    InLayerFold<F> f;
    f.c = g_.in_channels(l);
    f.a1.resize(N_ * f.c), f.b1.resize(N_ * f.c), f.invstd1.resize(N_ * f.c);
    f.a2.resize(N_ * inter), f.b2.resize(N_ * inter), f.invstd2.resize(N_ * inter);
    f.gamma1 = as_f<F>(g1_[l]);
    const Tensor beta1 = as_f<F>(b1_[l]), gamma2 = as_f<F>(g2_[l]), beta2 = as_f<F>(b2_[l]);
    f.W1 = w1_[l].to(buffer_.scalar_type()).contiguous();
    f.mean1 = mean_;
    // var: only through invstd_ (the shared one); fold from it per sample
    for (int64_t n = 0; n < N_; ++n) {
      const F* gm = f.gamma1.template data_ptr<F>();
      const F* bt = beta1.data_ptr<F>();
      for (int64_t j = 0; j < f.c; ++j) {
        const int64_t i = n * g_.Ct + j;
        f.invstd1[n * f.c + j] = invstd_[i];
        fold_bn<F>(gm[j], bt[j], mean_[i], invstd_[i], f.a1[n * f.c + j], f.b1[n * f.c + j]);
      }
    }
    f.mean2 = mean2_ + l * N_ * inter;
    fold_samples<F>(N_, inter, gamma2.data_ptr<F>(), beta2.data_ptr<F>(), f.mean2, var2_ + l * N_ * inter, inter,
                    eps_, f.a2.data(), f.b2.data(), f.invstd2.data());
    if (slopes_.defined()) {
      f.slope_off = slope_offset(g_, l);
      f.s1 = slopes_.data_ptr<F>() + f.slope_off;
      f.s2 = f.s1 + f.c;
    }
    return f;
  }

  // Stage 2 and 3: the layer's output gradient (final), the 3x3 weight gradient from V, the input gradient a few
  // samples at a time, each turned into dz = act'(..) dV over V's rows with the per-sample sums of dz and dz*xhat2.
  // Returns the per-sample means [m1 (N*inter), m2 (N*inter)] for stage 4.
  std::vector<F> conv3x3_backward(int64_t l, const InLayerFold<F>& f) {
    const int64_t inter = g_.inter;
    finalized_columns(f.c, g_.k, block_channels_have_reader(l, g_.L), dout_.data_ptr<T>());
    const Tensor W2 = w2_[l].to(buffer_.scalar_type()).contiguous(cl_format(g_.dims));
    out_.w2[l] = conv3x3_weight_grad(dout_, V_, W2, g_.dims).to(w2_[l].scalar_type()).contiguous();
    const int64_t per_chunk = std::max<int64_t>(1, std::min<int64_t>(N_, (int64_t(2) << 20) /
                                                                           std::max<int64_t>(1, S_ * inter * 4)));
    const int64_t nsums = f.s2 ? 3 : 2;
    std::vector<acc_t> sums(N_ * nsums * inter, acc_t(0));  // per sample: dz, dz*xhat2 (, slope terms)
    for (int64_t n0 = 0; n0 < N_; n0 += per_chunk) {
      const int64_t nb = std::min(per_chunk, N_ - n0);
      const Tensor dv = conv3x3_input_grad(dout_.narrow(0, n0, nb), W2, g_.dims).contiguous(cl_format(g_.dims));
      for (int64_t n = n0; n < n0 + nb; ++n) {
        in2_backward_sample(f, n, dv.data_ptr<T>() + (n - n0) * S_ * inter, sums.data() + n * nsums * inter);
      }
    }
    Tensor db2 = at::zeros({inter}, f_opts_), dg2 = at::zeros({inter}, f_opts_);
    std::vector<F> means(2 * N_ * inter);
    std::vector<acc_t> tot(nsums * inter, acc_t(0));
    for (int64_t n = 0; n < N_; ++n) {
      const acc_t* s = sums.data() + n * nsums * inter;
      for (int64_t j = 0; j < nsums * inter; ++j) tot[j] += s[j];
      for (int64_t j = 0; j < inter; ++j) {
        means[n * inter + j] = static_cast<F>(s[j] / S_);
        means[N_ * inter + n * inter + j] = static_cast<F>(s[inter + j] / S_);
      }
    }
    for (int64_t j = 0; j < inter; ++j) {
      db2.data_ptr<F>()[j] = static_cast<F>(tot[j]);
      dg2.data_ptr<F>()[j] = static_cast<F>(tot[inter + j]);
    }
    if (f.s2 != nullptr) {
      F* ds2 = grad_slopes_.data_ptr<F>() + f.slope_off + f.c;
      for (int64_t j = 0; j < inter; ++j) ds2[j] = static_cast<F>(tot[2 * inter + j]);
    }
    out_.b2[l] = db2, out_.g2[l] = dg2;
    return means;
  }

  // Sample n's rows of V_ become dz; its sums go to `s` [nsums * inter] (fixed row chunks: thread-count independent).
  void in2_backward_sample(const InLayerFold<F>& f, int64_t n, const T* dV, acc_t* s) {
    const int64_t inter = g_.inter, nsums = f.s2 ? 3 : 2;
    const T* Y = Y_.data_ptr<T>() + n * S_ * inter;
    T* dZ = V_.data_ptr<T>() + n * S_ * inter;
    const F* a2 = f.a2.data() + n * inter;
    const F* b2 = f.b2.data() + n * inter;
    const F* mu2 = f.mean2 + n * inter;
    const F* is2 = f.invstd2.data() + n * inter;
    const F* s2 = f.s2;
    const int64_t chunk = reduce_chunk<T>(S_), nchunks = (S_ + chunk - 1) / chunk;
    std::vector<acc_t> part(nchunks * nsums * inter, acc_t(0));
    at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch) {
        acc_t* ts1 = part.data() + ch * nsums * inter;
        acc_t* ts2 = ts1 + inter;
        acc_t* ts3 = ts1 + (s2 ? 2 * inter : 0);
        for (int64_t r = ch * chunk; r < std::min(S_, (ch + 1) * chunk); ++r) {
          const T* yr = Y + r * inter;
          const T* dvr = dV + r * inter;
          T* dzr = dZ + r * inter;
          if (s2 == nullptr) {
            DNF_SIMD for (int64_t j = 0; j < inter; ++j) {
              const F yj = to_f<F>(yr[j]);
              const F vj = to_f<F>(from_f<T>(relu<F>(yj * a2[j] + b2[j])));
              const F dz = relu_grad<F>(vj, to_f<F>(dvr[j]));
              dzr[j] = from_f<T>(dz);
              ts1[j] += dz;
              ts2[j] += dz * (yj - mu2[j]) * is2[j];
            }
          } else {
            DNF_SIMD for (int64_t j = 0; j < inter; ++j) {
              const F yj = to_f<F>(yr[j]);
              const F zj = yj * a2[j] + b2[j];
              const F dvj = to_f<F>(dvr[j]);
              const F dz = leaky_grad<F>(zj, s2[j], dvj);
              dzr[j] = from_f<T>(dz);
              ts1[j] += dz;
              ts2[j] += dz * (yj - mu2[j]) * is2[j];
              ts3[j] += leaky_slope_grad<F>(zj, dvj);
            }
          }
        }
      }
    });
    for (int64_t ch = 0; ch < nchunks; ++ch) {
      for (int64_t j = 0; j < nsums * inter; ++j) s[j] += part[ch * nsums * inter + j];
    }
  }

  // Stage 4, per tile of one sample's rows: dY from dz (IN2 backward with the sample's means), then the 1x1 conv +
  // IN1/act backward with the recomputed input tile U: dW1 += dY^T U, dU = dY W1 through act', G[:, :c] += a1*dU,
  // and the per-(sample, channel) sums of dU and dU*xhat1 (the merged finalisation's S1, S2).
  void gemm1x1_in1_backward(int64_t l, const InLayerFold<F>& f, const F* m1, const F* m2) {
    const int64_t c = f.c, inter = g_.inter, Ct = g_.Ct, S = S_;
    const int64_t nsums = f.s1 ? 3 : 2;
    const T* Y = Y_.data_ptr<T>();
    T* dV = V_.data_ptr<T>();
    const T* X = X_;
    T* G = G_;
    const T* W1 = f.W1.template data_ptr<T>();
    const int64_t tr = tile_rows(std::max(c, inter), sizeof(F));
    const int64_t tps = (S + tr - 1) / tr;  // tiles per sample
    ThreadPartials<F> dw_partials(inter * c);
    ThreadPartials<acc_t> sum_partials(N_ * nsums * c);
    at::parallel_for(0, N_ * tps, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> U(tr * c);
      std::vector<F> dU(tr * c), ts(nsums * c);
      F* dw = dw_partials.mine();
      acc_t* sp = sum_partials.mine();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t n = t / tps;
        const int64_t r0 = n * S + (t % tps) * tr, nr = std::min(tr, (n + 1) * S - r0);
        const F *a2 = f.a2.data() + n * inter, *mu2 = f.mean2 + n * inter, *is2 = f.invstd2.data() + n * inter;
        const F *mm1 = m1 + n * inter, *mm2 = m2 + n * inter;
        for (int64_t r = r0; r < r0 + nr; ++r) {
          const T* yr = Y + r * inter;
          T* dvr = dV + r * inter;
          DNF_SIMD for (int64_t j = 0; j < inter; ++j) {
            const F xhat = (to_f<F>(yr[j]) - mu2[j]) * is2[j];
            dvr[j] = from_f<T>(bn_backward_train<F>(to_f<F>(dvr[j]), xhat, a2[j], mm1[j], mm2[j]));
          }
        }
        const F *a1 = f.a1.data() + n * c, *b1 = f.b1.data() + n * c, *is1 = f.invstd1.data() + n * c;
        const F* mu1 = f.mean1 + n * Ct;
        const F* s1 = f.s1;
        bn_relu_tile<T, F>(X, Ct, r0, nr, c, a1, b1, U.data(), -1, s1);
        gemm_acc('N', 'T', c, inter, nr, U.data(), c, dV + r0 * inter, inter, F(1), dw, c);
        gemm_acc('N', 'N', c, nr, inter, W1, c, dV + r0 * inter, inter, F(0), dU.data(), c);
        std::fill(ts.begin(), ts.end(), F(0));
        F* ts1 = ts.data();
        F* ts2 = ts.data() + c;
        F* ts3 = ts.data() + (s1 ? 2 * c : 0);
        for (int64_t r = 0; r < nr; ++r) {
          const T* xr = X + (r0 + r) * Ct;
          T* gr = G + (r0 + r) * Ct;
          const T* ur = U.data() + r * c;
          const F* dur = dU.data() + r * c;
          if (s1 == nullptr) {
            DNF_SIMD for (int64_t j = 0; j < c; ++j) {
              const F d = relu_grad<F>(to_f<F>(ur[j]), dur[j]);
              ts1[j] += d;
              ts2[j] += d * (to_f<F>(xr[j]) - mu1[j]) * is1[j];
              gr[j] = from_f<T>(to_f<F>(gr[j]) + a1[j] * d);
            }
          } else {
            DNF_SIMD for (int64_t j = 0; j < c; ++j) {
              const F xj = to_f<F>(xr[j]);
              const F zj = xj * a1[j] + b1[j];
              const F d = leaky_grad<F>(zj, s1[j], dur[j]);
              ts1[j] += d;
              ts2[j] += d * (xj - mu1[j]) * is1[j];
              ts3[j] += leaky_slope_grad<F>(zj, dur[j]);
              gr[j] = from_f<T>(to_f<F>(gr[j]) + a1[j] * d);
            }
          }
        }
        acc_t* s = sp + n * nsums * c;
        for (int64_t j = 0; j < nsums * c; ++j) s[j] += ts[j];
      }
    });
    out_.w1[l] = at::empty(conv_weight_shape(inter, c, 1, g_.dims), w1_[l].options());
    if (out_.w1[l].scalar_type() == buffer_.scalar_type()) {
      dw_partials.reduce_into(out_.w1[l].data_ptr<T>());
    } else {
      dw_partials.reduce_into(out_.w1[l].data_ptr<F>());  // float32 master weight of a bfloat16 block
    }
    std::vector<acc_t> sums(N_ * nsums * c);
    sum_partials.reduce_into(sums.data());
    std::vector<acc_t> db(c, acc_t(0)), dg(c, acc_t(0)), dsl(c, acc_t(0));
    const F* gamma = f.gamma1.template data_ptr<F>();
    for (int64_t n = 0; n < N_; ++n) {
      const acc_t* s = sums.data() + n * nsums * c;
      for (int64_t j = 0; j < c; ++j) {
        db[j] += s[j];
        dg[j] += s[c + j];
        if (nsums == 3) dsl[j] += s[2 * c + j];
        S1_[n * Ct + j] += gamma[j] * s[j];
        S2_[n * Ct + j] += gamma[j] * s[c + j];
      }
    }
    out_.b1[l] = at::empty({c}, f_opts_);
    out_.g1[l] = at::empty({c}, f_opts_);
    for (int64_t j = 0; j < c; ++j) {
      out_.b1[l].data_ptr<F>()[j] = static_cast<F>(db[j]);
      out_.g1[l].data_ptr<F>()[j] = static_cast<F>(dg[j]);
    }
    if (f.s1 != nullptr) {
      F* ds1 = grad_slopes_.data_ptr<F>() + f.slope_off;
      for (int64_t j = 0; j < c; ++j) ds1[j] = static_cast<F>(dsl[j]);
    }
  }

  // Columns [c0, c0+width) of G, finalised per (sample, channel) once every reader is done (when `finalize`: the
  // channels have a reader), written as T into the dense [rows, width] matrix `dst`.
  void finalized_columns(int64_t c0, int64_t width, bool finalize, T* dst) {
    const int64_t Ct = g_.Ct, S = S_;
    const T* X = X_;
    const T* G = G_;
    const F* mean = mean_;
    const F* invstd = invstd_.data();
    const acc_t* S1 = S1_.data();
    const acc_t* S2 = S2_.data();
    at::parallel_for(0, M_, 256, [&](int64_t r0, int64_t r1) {
      std::vector<F> s1(width), s2(width), isn(width);
      int64_t cur = -1;
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = X + r * Ct + c0;
        const T* gr = G + r * Ct + c0;
        T* dr = dst + r * width;
        if (!finalize) {
          std::copy(gr, gr + width, dr);
          continue;
        }
        const int64_t n = r / S;
        const F* mu = mean + n * Ct + c0;
        const F* is = invstd + n * Ct + c0;
        if (n != cur) {
          for (int64_t j = 0; j < width; ++j) {
            s1[j] = F(S1[n * Ct + c0 + j]);
            s2[j] = F(S2[n * Ct + c0 + j]);
            isn[j] = is[j] / F(S);
          }
          cur = n;
        }
        const F *ps1 = s1.data(), *ps2 = s2.data(), *pisn = isn.data();
        DNF_SIMD for (int64_t j = 0; j < width; ++j) {
          const F xhat = (to_f<F>(xr[j]) - mu[j]) * is[j];
          dr[j] = from_f<T>(finalize_grad<F>(to_f<F>(gr[j]), xhat, pisn[j], ps1[j], ps2[j]));
        }
      }
    });
  }

  const BlockGeometry& g_;
  const Tensor& buffer_;
  TensorList g1_, b1_, w1_, g2_, b2_, w2_;
  const double eps_;
  const Tensor& slopes_;
  BlockGrads& out_;
  Tensor& grad_slopes_;
  const int64_t N_, S_, M_;
  const T* X_;
  T* G_;
  const F* mean_;
  const F* mean2_;
  const F* var2_;
  const at::TensorOptions f_opts_;
  std::vector<acc_t> S1_, S2_;  // [N, Ct]: merged sums gamma*dbeta, gamma*dgamma of every reader
  std::vector<F> invstd_;       // [N, Ct]
  Tensor Y_, V_, dout_;
};

using InBackwardResult = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                    std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, Tensor>;

InBackwardResult dense_block_in_backward_cpu(const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean,
                                             const Tensor& var, const Tensor& mean2, const Tensor& var2,
                                             TensorList g1, TensorList b1, TensorList w1, TensorList g2,
                                             TensorList b2, TensorList w2, double eps, int64_t num_input_features,
                                             const c10::optional<Tensor>& slopes_in) {
  const BlockGeometry g = check_in_backward_args(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2,
                                                eps, num_input_features, slopes_in);
  check_cpu_dtype(buffer);
  const Tensor slopes = slopes_in.has_value() && slopes_in->defined() ? slopes_in->contiguous() : Tensor();
  const Tensor X = buffer.contiguous(cl_format(g.dims));
  Tensor G = empty_in(g, g.Ct, buffer.options());
  G.copy_(grad_buffer);
  BlockGrads out(g.L);
  Tensor grad_input, grad_slopes;
  DNF_DISPATCH_CPU_KERNEL(buffer.scalar_type(), "dense_block_in_backward_cpu", [&] {
    using F = typename Opmath<scalar_t>::type;
    const Tensor m = as_f<F>(mean), v = as_f<F>(var), m2 = as_f<F>(mean2), v2 = as_f<F>(var2);
    grad_input = InBlockBackward<scalar_t>(g, X, G, m, v, m2, v2, g1, b1, w1, g2, b2, w2, eps, slopes, out,
                                           grad_slopes)
                     .run();
  });
  if (!grad_slopes.defined()) grad_slopes = at::empty({0}, buffer.options().dtype(stats_dtype(buffer.scalar_type())));
  return {grad_input, out.g1, out.b1, out.w1, out.g2, out.b2, out.w2, grad_slopes};
}

}  // namespace
}  // namespace dnf::cpu::DNF_ISA

#ifdef DNF_ISA_REGISTERS
TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("dense_block_in_forward", &dnf::cpu::base::dense_block_in_forward_cpu);
  m.impl("dense_block_in_backward", &dnf::cpu::base::dense_block_in_backward_cpu);
}
#endif
