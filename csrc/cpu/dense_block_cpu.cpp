// CPU kernels of the fused dense block (DESIGN.md section 3).
//
// The block lives in one channels_last(_3d) buffer X[rows = N*(D*)H*W, Ct]: layer l reads the column prefix
// [0, c_l) and writes its k new columns right after it, so concatenation is free. BN1 statistics of
// a column are computed once, when the column is written. BN1+ReLU is applied tile by tile as the
// prologue of the 1x1-conv GEMM, so no layer materialises its normalised input. The backward sweeps
// the layers in reverse with one gradient buffer G, recomputing each bottleneck.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/checks.h"
#include "cpu/kernels.h"

namespace dnf::cpu {
namespace {

using at::Tensor;
using at::TensorList;

// channels_last (2-D) / channels_last_3d (3-D) layout of a block activation: a [rows, C] matrix.
at::MemoryFormat cl_format(int64_t dims) {
  return dims == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

Tensor empty_cl(const BlockGeometry& g, int64_t C, const at::TensorOptions& opts) {
  return at::empty(g.shape(C), opts.memory_format(cl_format(g.dims)));
}

// The layers' 3x3 (3x3x3) convolution, stride 1, padding 1, through ATen (oneDNN).
Tensor conv3x3(const Tensor& x, const Tensor& w, int64_t dims) {
  const std::vector<int64_t> ones(dims, 1), zeros(dims, 0);
  return at::convolution(x, w, {}, ones, ones, ones, false, zeros, 1);
}

// Its input and weight gradients.
std::tuple<Tensor, Tensor> conv3x3_backward(const Tensor& dout, const Tensor& x, const Tensor& w, int64_t dims) {
  const std::vector<int64_t> ones(dims, 1), zeros(dims, 0);
  auto grads = at::convolution_backward(dout, x, w, c10::nullopt, ones, ones, ones, false, zeros, 1,
                                        {true, true, false});
  return {std::get<0>(grads), std::get<1>(grads)};
}

void check_cpu_dtype(const Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "input: expected dtype float32 or float64 on CPU (use torch.autocast for bfloat16), got ",
              input.scalar_type());
}

// Per-layer BN statistics: the block's shared batch statistics in training, the layer's own
// running statistics in eval.
template <typename T>
const T* layer_stat(bool training, const Tensor& shared, TensorList running, int64_t l,
                    std::vector<Tensor>& keep) {
  if (training) return shared.data_ptr<T>();
  keep.push_back(running[l].contiguous());
  return keep.back().data_ptr<T>();
}

// Multiplies the conv output of layer l by its dropout mask, as F.dropout does: x * (mask / (1-p)).
Tensor apply_dropout(const Tensor& x, const c10::optional<Tensor>& mask, int64_t l, int64_t k, double p) {
  if (!mask.has_value() || !mask->defined()) return x;
  return x * mask->narrow(1, l * k, k).to(x.scalar_type()).div_(1.0 - p);
}

template <typename T>
void forward_impl(const BlockGeometry& g, Tensor& buffer, TensorList g1, TensorList b1, TensorList w1,
                  TensorList g2, TensorList b2, TensorList w2, TensorList rm1, TensorList rv1,
                  TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
                  bool training, double eps, Tensor& mean, Tensor& var, Tensor& mean2, Tensor& var2) {
  const int64_t M = g.rows(), Ct = g.Ct, inter = g.inter;
  T* X = buffer.data_ptr<T>();
  if (training) column_moments<T>(X, M, Ct, 0, g.C0, mean.data_ptr<T>(), var.data_ptr<T>());
  Tensor y = empty_cl(g, inter, buffer.options());
  T* Y = y.data_ptr<T>();
  std::vector<T> a(Ct), b(Ct), is(Ct), a2(inter), bb2(inter), is2(inter);
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t c = g.in_channels(l);
    std::vector<Tensor> keep;
    const Tensor gamma1 = g1[l].contiguous(), beta1 = b1[l].contiguous();
    const Tensor gamma2 = g2[l].contiguous(), beta2 = b2[l].contiguous(), W1 = w1[l].contiguous();
    fold_channels<T>(c, gamma1.data_ptr<T>(), beta1.data_ptr<T>(), layer_stat<T>(training, mean, rm1, l, keep),
                     layer_stat<T>(training, var, rv1, l, keep), eps, a.data(), b.data(), is.data());
    bn_relu_gemm<T>(X, M, Ct, c, a.data(), b.data(), W1.data_ptr<T>(), inter, Y);
    const T* mu2;
    const T* v2;
    if (training) {
      column_moments<T>(Y, M, inter, 0, inter, mean2.data_ptr<T>() + l * inter, var2.data_ptr<T>() + l * inter);
      mu2 = mean2.data_ptr<T>() + l * inter;
      v2 = var2.data_ptr<T>() + l * inter;
    } else {
      mu2 = layer_stat<T>(false, mean2, rm2, l, keep);
      v2 = layer_stat<T>(false, var2, rv2, l, keep);
    }
    fold_channels<T>(inter, gamma2.data_ptr<T>(), beta2.data_ptr<T>(), mu2, v2, eps, a2.data(), bb2.data(), is2.data());
    bn_relu_inplace<T>(Y, M, inter, a2.data(), bb2.data());
    Tensor out = apply_dropout(conv3x3(y, w2[l], g.dims), mask, l, g.k, p);
    buffer.narrow(1, c, g.k).copy_(out);
    if (training) column_moments<T>(X, M, Ct, c, g.k, mean.data_ptr<T>() + c, var.data_ptr<T>() + c);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> dense_block_forward_cpu(
    const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2, TensorList b2,
    TensorList w2, TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2,
    const c10::optional<Tensor>& mask, double p, bool training, double eps) {
  const BlockGeometry g = check_dense_block_args(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask,
                                                 p, training, eps);
  check_cpu_dtype(input);
  Tensor buffer = empty_cl(g, g.Ct, input.options());
  buffer.narrow(1, 0, g.C0).copy_(input);
  const auto opts = input.options();
  Tensor mean = at::empty({training ? g.Ct : 0}, opts), var = at::empty({training ? g.Ct : 0}, opts);
  Tensor mean2 = at::empty({training ? g.L : 0, g.inter}, opts), var2 = at::empty({training ? g.L : 0, g.inter}, opts);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dense_block_forward_cpu", [&] {
    forward_impl<scalar_t>(g, buffer, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps,
                           mean, var, mean2, var2);
  });
  return {buffer, mean, var, mean2, var2};
}

struct BlockGrads {
  std::vector<Tensor> g1, b1, w1, g2, b2, w2;
};

template <typename T>
void backward_impl(const BlockGeometry& g, const Tensor& buffer, Tensor& G, const Tensor& mean,
                   const Tensor& var, const Tensor& mean2, const Tensor& var2, TensorList g1, TensorList b1,
                   TensorList w1, TensorList g2, TensorList b2, TensorList w2, TensorList rm1, TensorList rv1,
                   TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
                   bool training, double eps, BlockGrads& out) {
  using acc_t = typename Acc<T>::type;
  const int64_t M = g.rows(), Ct = g.Ct, inter = g.inter;
  const T* X = buffer.data_ptr<T>();
  T* Gp = G.data_ptr<T>();
  // Merged BN1 backward of all readers of a channel: S1 = sum gamma*dbeta, S2 = sum gamma*dgamma.
  std::vector<acc_t> S1(Ct, 0), S2(Ct, 0);
  std::vector<T> shared_is(training ? Ct : 0);
  if (training) {
    const T* v = var.data_ptr<T>();
    for (int64_t j = 0; j < Ct; ++j) shared_is[j] = invstd_from_var<T>(v[j], eps);
  }
  auto finalize = [&](int64_t c0, int64_t width) {
    if (!training) return;
    const T* mu = mean.data_ptr<T>();
    at::parallel_for(0, M, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = X + r * Ct;
        T* gr = Gp + r * Ct;
        for (int64_t j = c0; j < c0 + width; ++j) {
          const T xhat = (xr[j] - mu[j]) * shared_is[j];
          gr[j] = finalize_grad<T>(gr[j], xhat, shared_is[j] / T(M), T(S1[j]), T(S2[j]));
        }
      }
    });
  };

  Tensor y = empty_cl(g, inter, buffer.options());
  Tensor v = at::empty_like(y);
  T* Y = y.data_ptr<T>();
  T* V = v.data_ptr<T>();
  std::vector<T> a(Ct), b(Ct), is(Ct), a2(inter), bb2(inter), is2(inter);
  for (int64_t l = g.L - 1; l >= 0; --l) {
    const int64_t c = g.in_channels(l);
    // Every reader of layer l's channels is done: their gradient is final. The last layer's channels
    // have no reader in the block, so there is nothing to finalise (and 0 * a non-finite xhat must
    // not turn their gradient into NaN).
    if (l < g.L - 1) finalize(c, g.k);
    std::vector<Tensor> keep;
    const Tensor gamma1 = g1[l].contiguous(), beta1 = b1[l].contiguous(), W1 = w1[l].contiguous();
    const Tensor gamma2 = g2[l].contiguous(), beta2 = b2[l].contiguous();
    const T* mu1 = layer_stat<T>(training, mean, rm1, l, keep);
    fold_channels<T>(c, gamma1.data_ptr<T>(), beta1.data_ptr<T>(), mu1,
                     layer_stat<T>(training, var, rv1, l, keep), eps, a.data(), b.data(), is.data());
    const T* mu2 = training ? mean2.data_ptr<T>() + l * inter : layer_stat<T>(false, mean2, rm2, l, keep);
    const T* v2 = training ? var2.data_ptr<T>() + l * inter : layer_stat<T>(false, var2, rv2, l, keep);
    fold_channels<T>(inter, gamma2.data_ptr<T>(), beta2.data_ptr<T>(), mu2, v2, eps, a2.data(), bb2.data(), is2.data());

    // Recompute the bottleneck: Y = W1 * relu(bn1(X)), V = relu(bn2(Y)).
    bn_relu_gemm<T>(X, M, Ct, c, a.data(), b.data(), W1.data_ptr<T>(), inter, Y);
    at::parallel_for(0, M, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < inter; ++j) V[r * inter + j] = relu<T>(Y[r * inter + j] * a2[j] + bb2[j]);
    });

    // 3x3 conv backward (oneDNN through ATen).
    Tensor dout = apply_dropout(G.narrow(1, c, g.k), mask, l, g.k, p);
    auto conv_grads = conv3x3_backward(dout, v, w2[l], g.dims);
    Tensor dv = std::get<0>(conv_grads).contiguous(cl_format(g.dims));
    out.w2[l] = std::get<1>(conv_grads).contiguous();  // as the fake kernel declares, on every backend
    T* dV = dv.data_ptr<T>();

    // BN2 + ReLU backward, in place: dV becomes dY.
    ThreadPartials<acc_t> p2(2 * inter);
    at::parallel_for(0, M, 256, [&](int64_t r0, int64_t r1) {
      acc_t* s = p2.mine();
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t j = 0; j < inter; ++j) {
          const T dz = relu_grad<T>(V[r * inter + j], dV[r * inter + j]);
          dV[r * inter + j] = dz;
          s[j] += dz;
          s[inter + j] += dz * (Y[r * inter + j] - mu2[j]) * is2[j];
        }
    });
    std::vector<acc_t> sum2(2 * inter);
    p2.reduce_into(sum2.data());
    out.b2[l] = at::empty({inter}, buffer.options());
    out.g2[l] = at::empty({inter}, buffer.options());
    for (int64_t j = 0; j < inter; ++j) {
      out.b2[l].data_ptr<T>()[j] = static_cast<T>(sum2[j]);
      out.g2[l].data_ptr<T>()[j] = static_cast<T>(sum2[inter + j]);
    }
    {
      std::vector<T> m1(inter), m2(inter);
      for (int64_t j = 0; j < inter; ++j) {
        m1[j] = training ? static_cast<T>(sum2[j] / M) : T(0);
        m2[j] = training ? static_cast<T>(sum2[inter + j] / M) : T(0);
      }
      at::parallel_for(0, M, 256, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t j = 0; j < inter; ++j) {
            // Eval: dY = a*dz exactly (no xhat term, so a non-finite Y does not poison dY).
            const T xhat = (Y[r * inter + j] - mu2[j]) * is2[j];
            dV[r * inter + j] = training ? bn_backward_train<T>(dV[r * inter + j], xhat, a2[j], m1[j], m2[j])
                                         : a2[j] * dV[r * inter + j];
          }
      });
    }

    // 1x1 conv + BN1/ReLU backward, tile by tile with the recomputed input tile:
    // dW1 += dY^T U, dU = dY W1 masked by U > 0, G[:, :c] += a*dU, per-channel sums of dU, dU*xhat.
    const int64_t tr = tile_rows(std::max(c, inter), sizeof(T));
    const int64_t ntiles = (M + tr - 1) / tr;
    ThreadPartials<T> pw(inter * c);
    ThreadPartials<acc_t> p1(2 * c);
    const T* W1p = W1.data_ptr<T>();
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> U(tr * c), dU(tr * c), ts(2 * c);
      T* dw = pw.mine();
      acc_t* s = p1.mine();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tr, nr = std::min(tr, M - r0);
        bn_relu_tile<T>(X, Ct, r0, nr, c, a.data(), b.data(), U.data());
        gemm('N', 'T', c, inter, nr, T(1), U.data(), c, dV + r0 * inter, inter, T(1), dw, c);
        gemm('N', 'N', c, nr, inter, T(1), W1p, c, dV + r0 * inter, inter, T(0), dU.data(), c);
        std::fill(ts.begin(), ts.end(), T(0));
        for (int64_t r = 0; r < nr; ++r) {
          const T* xr = X + (r0 + r) * Ct;
          T* gr = Gp + (r0 + r) * Ct;
          const T* ur = U.data() + r * c;
          const T* dur = dU.data() + r * c;
          for (int64_t j = 0; j < c; ++j) {
            const T d = relu_grad<T>(ur[j], dur[j]);
            ts[j] += d;
            ts[c + j] += d * (xr[j] - mu1[j]) * is[j];
            gr[j] += a[j] * d;
          }
        }
        for (int64_t j = 0; j < 2 * c; ++j) s[j] += ts[j];
      }
    });
    out.w1[l] = at::empty(conv_weight_shape(inter, c, 1, g.dims), buffer.options());
    pw.reduce_into(out.w1[l].data_ptr<T>());
    std::vector<acc_t> sum1(2 * c);
    p1.reduce_into(sum1.data());
    out.b1[l] = at::empty({c}, buffer.options());
    out.g1[l] = at::empty({c}, buffer.options());
    const T* gam = gamma1.data_ptr<T>();
    for (int64_t j = 0; j < c; ++j) {
      out.b1[l].data_ptr<T>()[j] = static_cast<T>(sum1[j]);
      out.g1[l].data_ptr<T>()[j] = static_cast<T>(sum1[c + j]);
      S1[j] += gam[j] * sum1[j];
      S2[j] += gam[j] * sum1[c + j];
    }
  }
  finalize(0, g.C0);
}

std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
           std::vector<Tensor>, std::vector<Tensor>>
dense_block_backward_cpu(const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean, const Tensor& var,
                         const Tensor& mean2, const Tensor& var2, TensorList g1, TensorList b1, TensorList w1,
                         TensorList g2, TensorList b2, TensorList w2, TensorList rm1, TensorList rv1,
                         TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
                         bool training, double eps, int64_t num_input_features) {
  TORCH_CHECK(buffer.dim() == 4 || buffer.dim() == 5, "buffer: expected a 4-D or 5-D tensor, got ", buffer.dim(), "-D");
  TORCH_CHECK(num_input_features >= 1 && num_input_features < buffer.size(1),
              "num_input_features: expected a value in [1, ", buffer.size(1), "), got ", num_input_features);
  const Tensor input_meta = buffer.narrow(1, 0, num_input_features);
  const BlockGeometry g = check_dense_block_args(input_meta, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask,
                                                 p, training, eps);
  check_cpu_dtype(buffer);
  TORCH_CHECK(g.Ct == buffer.size(1), "buffer: expected ", g.Ct, " channels (C0 + L*k), got ", buffer.size(1));
  check_shape(grad_buffer, buffer.sizes(), "grad_buffer");
  check_float_tensor(grad_buffer, "grad_buffer", buffer);  // stats dtype == buffer dtype on CPU
  if (training) check_block_stats(g, buffer, mean, var, mean2, var2);
  const Tensor X = buffer.contiguous(cl_format(g.dims));
  Tensor G = empty_cl(g, g.Ct, buffer.options());
  G.copy_(grad_buffer);
  BlockGrads out{std::vector<Tensor>(g.L), std::vector<Tensor>(g.L), std::vector<Tensor>(g.L),
                 std::vector<Tensor>(g.L), std::vector<Tensor>(g.L), std::vector<Tensor>(g.L)};
  AT_DISPATCH_FLOATING_TYPES(buffer.scalar_type(), "dense_block_backward_cpu", [&] {
    backward_impl<scalar_t>(g, X, G, mean.contiguous(), var.contiguous(), mean2.contiguous(), var2.contiguous(),
                            g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps, out);
  });
  Tensor grad_input = G.narrow(1, 0, g.C0).clone(cl_format(g.dims));
  return {grad_input, out.g1, out.b1, out.w1, out.g2, out.b2, out.w2};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("dense_block_forward", &dense_block_forward_cpu);
  m.impl("dense_block_backward", &dense_block_backward_cpu);
}

}  // namespace dnf::cpu
