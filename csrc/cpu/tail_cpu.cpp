// CPU kernels of the BN-ReLU readers that follow a dense block: the transition
// (BN -> ReLU -> 1x1 conv -> 2x2(x2) avg pool) and the final norm (BN -> ReLU -> global avg pool),
// on 4-D [N, C, H, W] and 5-D [N, C, D, H, W] inputs.
// Both take the BN statistics as arguments (the block's shared batch statistics in training) and
// never store their BN/ReLU output; the backward recomputes it tile by tile. An optional SE gate
// g [N, C] is folded into the prologue (docs/design.md §5): the reader normalises y = g*x without
// y ever existing, i.e. relu((a*g)*x + b); the backward returns dx = g*dy and dgate = sum_hw x*dy.
// Storage type T (float32, float64, bfloat16: CPU autocast) and compute type F = Opmath<T> (float for
// bfloat16): a bfloat16 reader reads and writes bfloat16 activations and gradients, multiplies bfloat16
// operands with float accumulation (a float32 master conv weight is cast once per call) and keeps its BN
// math, statistics and parameter gradients in float.
#include "cpu/isa_build.h"  // first: which ISA build this is

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "common/checks.h"
#include "common/nonfinite.h"
#include "cpu/kernels.h"
#include "cpu/workspace.h"

namespace dnf::cpu::DNF_ISA {

using at::Tensor;

struct Folded {
  Tensor a, b, invstd;  // per-channel, dtype of the input
};

template <typename F>
Folded fold(const Tensor& mean, const Tensor& var, const Tensor& weight, const Tensor& bias, double eps) {
  const int64_t C = mean.numel();
  const auto opts = mean.options().dtype(c10::CppTypeToScalarType<F>::value);
  Folded f{at::empty({C}, opts), at::empty({C}, opts), at::empty({C}, opts)};
  const Tensor m = as_f<F>(mean), v = as_f<F>(var), w = as_f<F>(weight), bi = as_f<F>(bias);
  fold_channels<F>(C, w.data_ptr<F>(), bi.data_ptr<F>(), m.data_ptr<F>(), v.data_ptr<F>(), eps,
                   f.a.data_ptr<F>(), f.b.data_ptr<F>(), f.invstd.data_ptr<F>());
  return f;
}

// The per-sample view of the optional gate: row n of the effective BN scale ag (a*g, or a itself) and
// of the gate (g, or ones) -- stride 0 when ungated, so one code path serves both (x*1 is exact).
template <typename T>
struct Gate {
  std::vector<T> ag, g;
  int64_t stride = 0;  // C when gated, 0 otherwise
  bool on = false;
  Gate(const c10::optional<Tensor>& gate, const T* a, int64_t N, int64_t C) {
    on = gate.has_value() && gate->defined();
    stride = on ? C : 0;
    ag.assign(on ? N * C : C, T(0));
    g.assign(on ? N * C : C, T(1));
    if (!on) {
      std::copy(a, a + C, ag.begin());
      return;
    }
    const Tensor gc = as_f<T>(*gate);
    const T* gp = gc.data_ptr<T>();
    for (int64_t i = 0; i < N * C; ++i) {
      g[i] = gp[i];
      ag[i] = a[i % C] * gp[i];
    }
  }
  const T* a_row(int64_t n) const { return ag.data() + n * stride; }
  const T* g_row(int64_t n) const { return g.data() + n * stride; }
};

// sample_moments takes float32/float64 (the readers and channel_moments check_cpu_dtype: also bfloat16).
void check_cpu(const Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "input: expected dtype float32 or float64 on CPU, got ", input.scalar_type());
}

void check_transition(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
                      const Tensor& bias, const Tensor& conv_weight, double eps) {
  check_transition_args(input, mean, var, weight, bias, conv_weight, eps);
  check_cpu_dtype(input);
}

// Spatial geometry of the transition's average pool: 2x2 over [H, W] (2-D, D = D2 = kd = 1) or
// 2x2x2 over [D, H, W] (3-D, kd = 2), floor mode.
struct PoolDims {
  int64_t N, D, H, W, D2, H2, W2, kd;
  PoolDims(const Tensor& x)
      : N(x.size(0)), D(x.dim() == 5 ? x.size(2) : 1), H(x.size(-2)), W(x.size(-1)),
        D2(x.dim() == 5 ? D / 2 : 1), H2(H / 2), W2(W / 2), kd(x.dim() == 5 ? 2 : 1) {}
  int64_t taps() const { return kd * 4; }
  std::vector<int64_t> out_shape(int64_t C, int64_t dims) const {
    return dims == 3 ? std::vector<int64_t>{N, C, D2, H2, W2} : std::vector<int64_t>{N, C, H2, W2};
  }
};

// P[r, :] for output rows [q0, q0+nr): the 2x2(x2) average of relu(a*x + b) (avg_pool, floor mode);
// `a` is the (gated) scale of each sample (Gate::a_row).
// Summed in F, stored as T (the GEMM operand).
template <typename T, typename F>
void pooled_tile(const T* X, int64_t C, const PoolDims& pd, int64_t q0, int64_t nr, const Gate<F>& gs, const F* b,
                 T* P) {
  const int64_t H = pd.H, W = pd.W, H2 = pd.H2, W2 = pd.W2, D2 = pd.D2;
  std::vector<F> acc(C);
  F* pr = acc.data();
  for (int64_t r = 0; r < nr; ++r) {
    const int64_t q = q0 + r, nd = q / (H2 * W2), oh = (q / W2) % H2, ow = q % W2;
    const int64_t n = nd / D2, od = nd % D2;
    const F* a = gs.a_row(n);
    for (int64_t j = 0; j < C; ++j) pr[j] = F(0);
    for (int64_t dz = 0; dz < pd.kd; ++dz) {
      const int64_t base = ((n * pd.D + pd.kd * od + dz) * H + 2 * oh) * W + 2 * ow;
      const T* x00 = X + base * C;
      const T* x01 = x00 + C;
      const T* x10 = X + (base + W) * C;
      const T* x11 = x10 + C;
      DNF_SIMD for (int64_t j = 0; j < C; ++j) {
        const F s = relu<F>(to_f<F>(x00[j]) * a[j] + b[j]) + relu<F>(to_f<F>(x01[j]) * a[j] + b[j]) +
                    relu<F>(to_f<F>(x10[j]) * a[j] + b[j]) + relu<F>(to_f<F>(x11[j]) * a[j] + b[j]);
        pr[j] += s;
      }
    }
    T* pt = P + r * C;
    const F taps = F(pd.taps());
    DNF_SIMD for (int64_t j = 0; j < C; ++j) pt[j] = from_f<T>(pr[j] / taps);
  }
}

// O[nr, Cout] = P[nr, C] W^T for W [Cout, C]; bfloat16 through the float tile Ot (nr * Cout values).
template <typename T, typename F>
void product_rows(int64_t nr, int64_t Cout, int64_t C, const T* P, const T* W, F* Ot, T* O) {
  if constexpr (std::is_same_v<T, F>) {
    gemm_acc('T', 'N', Cout, nr, C, W, C, P, C, F(0), O, Cout);
  } else {
    gemm_acc('T', 'N', Cout, nr, C, W, C, P, C, F(0), Ot, Cout);
    narrow_rows<T, F>(Ot, nr * Cout, O);
  }
}

Tensor transition_forward_cpu(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
                              const Tensor& bias, const Tensor& conv_weight, bool /*training*/, double eps,
                              const c10::optional<Tensor>& gate) {
  check_transition(input, mean, var, weight, bias, conv_weight, eps);
  check_gate(gate, input);
  const PoolDims pd(input);
  const int64_t C = input.size(1), M2 = pd.N * pd.D2 * pd.H2 * pd.W2, Cout = conv_weight.size(0);
  const Tensor X = input.contiguous(cl_format(input));
  Tensor out = empty_mapped(pd.out_shape(Cout, input.dim() - 2), input.options(), cl_format(input));
  DNF_DISPATCH_CPU_KERNEL(input.scalar_type(), "transition_forward_cpu", [&] {
    using T = scalar_t;
    using F = typename Opmath<T>::type;
    const Folded f = fold<F>(mean, var, weight, bias, eps);
    const Tensor Wc = conv_weight.to(input.scalar_type()).contiguous();  // a float32 master weight: cast here
    const T *Xp = X.data_ptr<T>(), *Wp = Wc.data_ptr<T>();
    const F* b = f.b.data_ptr<F>();
    const Gate<F> gs(gate, f.a.data_ptr<F>(), pd.N, C);
    T* O = out.data_ptr<T>();
    const int64_t tr = tile_rows(C, sizeof(T));
    const int64_t ntiles = (M2 + tr - 1) / tr;
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> P(tr * C);
      std::vector<F> Ot(std::is_same_v<T, F> ? 0 : tr * Cout);  // the product's float tile (bfloat16)
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t q0 = t * tr, nr = std::min(tr, M2 - q0);
        pooled_tile<T, F>(Xp, C, pd, q0, nr, gs, b, P.data());
        product_rows<T, F>(nr, Cout, C, P.data(), Wp, Ot.data(), O + q0 * Cout);
      }
    });
  });
  return out;
}

// Shared BN-ReLU backward of a reader whose gradient w.r.t. the ReLU output at input row r is
// scale * up[r] (a row of C values in F, or nullptr where the row received none). X holds N samples of HW
// rows; the reader normalises y = g*x (g = gs.g_row(n), ones when ungated), so with dy the BN
// backward of y: dX = g*dy, and dgate[n, :] = sum over sample n's rows of x*dy (when dgate != nullptr).
// Writes dX, dgamma, dbeta (a, mean, invstd: the BN of y).
template <typename T, typename F, typename UpRow>
void bn_relu_backward(const T* X, int64_t N, int64_t HW, int64_t C, const Gate<F>& gs, const F* a, const F* b,
                      const F* mean, const F* invstd, bool training, F scale, UpRow up, T* dX, F* dgamma, F* dbeta,
                      F* dgate) {
  using acc_t = typename Acc<T>::type;
  const int64_t M = N * HW;
  const int64_t chunk = reduce_chunk<T>(M), nchunks = (M + chunk - 1) / chunk;
  std::vector<acc_t> part(nchunks * 2 * C, acc_t(0));
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      acc_t* s = part.data() + ch * 2 * C;
      for (int64_t r = ch * chunk; r < std::min(M, (ch + 1) * chunk); ++r) {
        const F* u = up(r);
        const T* xr = X + r * C;
        const F *ag = gs.a_row(r / HW), *g = gs.g_row(r / HW);
        if (u == nullptr) {
          // A row the floor-mode pool drops gets a zero gradient; torch still adds 0 * xhat to
          // dgamma, which is NaN where xhat is not finite.
          for (int64_t j = 0; j < C; ++j) s[C + j] += F(0) * ((g[j] * to_f<F>(xr[j]) - mean[j]) * invstd[j]);
          continue;
        }
        DNF_SIMD for (int64_t j = 0; j < C; ++j) {
          const F x = to_f<F>(xr[j]);
          const F d = relu_grad<F>(relu<F>(x * ag[j] + b[j]), scale * u[j]);
          s[j] += d;
          s[C + j] += d * (g[j] * x - mean[j]) * invstd[j];
        }
      }
    }
  });
  std::vector<acc_t> sums(2 * C, acc_t(0));
  for (int64_t ch = 0; ch < nchunks; ++ch)
    for (int64_t j = 0; j < 2 * C; ++j) sums[j] += part[ch * 2 * C + j];
  std::vector<F> m1(C), m2(C);
  for (int64_t j = 0; j < C; ++j) {
    dbeta[j] = static_cast<F>(sums[j]);
    dgamma[j] = static_cast<F>(sums[C + j]);
    m1[j] = training ? static_cast<F>(sums[j] / M) : F(0);
    m2[j] = training ? static_cast<F>(sums[C + j] / M) : F(0);
  }
  // Chunks inside each sample, so the gate gradient's sums do not depend on the thread count.
  const int64_t per_sample = (HW + chunk - 1) / chunk;
  std::vector<acc_t> gpart(dgate != nullptr ? N * per_sample * C : 0, acc_t(0));
  at::parallel_for(0, N * per_sample, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t n = i / per_sample, k = i % per_sample;
      const F *ag = gs.a_row(n), *g = gs.g_row(n);
      acc_t* gp = dgate != nullptr ? gpart.data() + i * C : nullptr;
      for (int64_t r = n * HW + k * chunk; r < n * HW + std::min(HW, (k + 1) * chunk); ++r) {
        const F* u = up(r);
        const T* xr = X + r * C;
        T* dr = dX + r * C;
        if (u == nullptr) {
          for (int64_t j = 0; j < C; ++j) {
            const F x = to_f<F>(xr[j]);
            const F dy = bn_backward<F>(F(0), (g[j] * x - mean[j]) * invstd[j], a[j], m1[j], m2[j], training);
            dr[j] = from_f<T>(g[j] * dy);
            if (gp != nullptr) gp[j] += x * dy;
          }
          continue;
        }
        // bn_backward (common/nonfinite.h: training = the batch-statistics backward, eval = a*d) with
        // its mode and gate-gradient branches made compile-time, so the channel loop vectorises.
        auto row = [&](auto train, auto grad_gate) {
          DNF_SIMD for (int64_t j = 0; j < C; ++j) {
            const F x = to_f<F>(xr[j]);
            const F d = relu_grad<F>(relu<F>(x * ag[j] + b[j]), scale * u[j]);
            F dy;
            if constexpr (decltype(train)::value) {
              dy = bn_backward_train<F>(d, (g[j] * x - mean[j]) * invstd[j], a[j], m1[j], m2[j]);
            } else {
              dy = a[j] * d;
            }
            dr[j] = from_f<T>(g[j] * dy);
            if constexpr (decltype(grad_gate)::value) gp[j] += x * dy;
          }
        };
        using yes = std::true_type;
        using no = std::false_type;
        if (training) {
          gp != nullptr ? row(yes{}, yes{}) : row(yes{}, no{});
        } else {
          gp != nullptr ? row(no{}, yes{}) : row(no{}, no{});
        }
      }
    }
  });
  if (dgate != nullptr) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t j = 0; j < C; ++j) {
        acc_t v = 0;
        for (int64_t k = 0; k < per_sample; ++k) v += gpart[(n * per_sample + k) * C + j];
        dgate[n * C + j] = static_cast<F>(v);
      }
  }
}

// grad of the optional gate: [N, C] in the compute type when gated (returned in the gate's dtype), an empty
// [0] tensor otherwise (the schema's output).
Tensor gate_grad_like(const c10::optional<Tensor>& gate, const Tensor& input) {
  if (gate.has_value() && gate->defined())
    return at::empty({input.size(0), input.size(1)}, gate->options().dtype(stats_dtype(input.scalar_type())));
  return at::empty({0}, input.options());
}

Tensor gate_grad_in_gate_dtype(const Tensor& dgate, const c10::optional<Tensor>& gate) {
  return gate.has_value() && gate->defined() ? dgate.to(gate->scalar_type()) : dgate;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> transition_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
    const Tensor& bias, const Tensor& conv_weight, bool training, double eps, const c10::optional<Tensor>& gate) {
  check_transition(input, mean, var, weight, bias, conv_weight, eps);
  check_gate(gate, input);
  const PoolDims pd(input);
  const int64_t N = pd.N, C = input.size(1), D = pd.D, H = pd.H, W = pd.W, D2 = pd.D2, H2 = pd.H2, W2 = pd.W2;
  const int64_t M2 = N * D2 * H2 * W2, Cout = conv_weight.size(0);
  check_shape(grad_output, pd.out_shape(Cout, input.dim() - 2), "grad_output");
  check_float_tensor(grad_output, "grad_output", input);
  const Tensor X = input.contiguous(cl_format(input));
  const Tensor dO = grad_output.contiguous(cl_format(input));
  Tensor dX = empty_mapped(X.sizes(), X.options(), cl_format(input));
  const auto f_opts = input.options().dtype(stats_dtype(input.scalar_type()));
  Tensor dgamma = at::empty({C}, f_opts), dbeta = at::empty({C}, f_opts);
  Tensor dWc = at::empty(conv_weight.sizes(), f_opts);
  Tensor dgate = gate_grad_like(gate, input);
  DNF_DISPATCH_CPU_KERNEL(input.scalar_type(), "transition_backward_cpu", [&] {
    using T = scalar_t;
    using F = typename Opmath<T>::type;
    const Folded f = fold<F>(mean, var, weight, bias, eps);
    const Tensor Wc = conv_weight.to(input.scalar_type()).contiguous(), mu = as_f<F>(mean);
    const T *Xp = X.data_ptr<T>(), *Wp = Wc.data_ptr<T>();
    const F *a = f.a.data_ptr<F>(), *b = f.b.data_ptr<F>();
    const Gate<F> gs(gate, a, N, C);
    const T* dOp = dO.data_ptr<T>();
    // dP = dOut * Wc (pooled-input gradient, a quarter of the block's size, in F) and dWc = dOut^T * P.
    Tensor dP = empty_mapped({M2, C}, f_opts, at::MemoryFormat::Contiguous);
    F* dPp = dP.data_ptr<F>();
    const int64_t tr = tile_rows(C, sizeof(F));
    const int64_t ntiles = (M2 + tr - 1) / tr;
    ThreadPartials<F> pw(Cout * C);
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> P(tr * C);
      F* dw = pw.mine();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t q0 = t * tr, nr = std::min(tr, M2 - q0);
        pooled_tile<T, F>(Xp, C, pd, q0, nr, gs, b, P.data());
        gemm_acc('N', 'T', C, Cout, nr, P.data(), C, dOp + q0 * Cout, Cout, F(1), dw, C);
        gemm_acc('N', 'N', C, nr, Cout, Wp, C, dOp + q0 * Cout, Cout, F(0), dPp + q0 * C, C);
      }
    });
    pw.reduce_into(dWc.data_ptr<F>());
    const bool odd_d = pd.kd == 2 && D % 2 != 0;
    if (H % 2 != 0 || W % 2 != 0 || odd_d) {
      // torch convolves before pooling, so its dWc also holds 0 * relu(bn(x)) of the pixels the
      // floor-mode pool drops: NaN in column j wherever such a value is not finite. Same here.
      std::vector<char> nonfinite(C, 0);
      auto scan = [&](int64_t nd, int64_t h, int64_t w) {
        const T* xr = Xp + ((nd * H + h) * W + w) * C;
        const F* ag = gs.a_row(nd / D);
        for (int64_t j = 0; j < C; ++j)
          nonfinite[j] |= dropped_pixel_poisons_dwc<F>(relu<F>(to_f<F>(xr[j]) * ag[j] + b[j]));
      };
      for (int64_t nd = 0; nd < N * D; ++nd) {
        if (odd_d && nd % D == D - 1) {  // the whole last depth slice is dropped
          for (int64_t h = 0; h < H; ++h) for (int64_t w = 0; w < W; ++w) scan(nd, h, w);
          continue;
        }
        if (H % 2 != 0) for (int64_t w = 0; w < W; ++w) scan(nd, H - 1, w);
        if (W % 2 != 0) for (int64_t h = 0; h < H; ++h) scan(nd, h, W - 1);
      }
      F* dW = dWc.data_ptr<F>();
      for (int64_t j = 0; j < C; ++j)
        if (nonfinite[j])
          for (int64_t o = 0; o < Cout; ++o) dW[o * C + j] = std::numeric_limits<F>::quiet_NaN();
    }
    auto up = [&](int64_t r) -> const F* {
      const int64_t nd = r / (H * W), h = (r / W) % H, w = r % W, n = nd / D, d = nd % D;
      if (h >= 2 * H2 || w >= 2 * W2 || d >= pd.kd * D2) return nullptr;  // dropped by the floor-mode pool
      return dPp + (((n * D2 + d / pd.kd) * H2 + h / 2) * W2 + w / 2) * C;
    };
    bn_relu_backward<T, F>(Xp, N, D * H * W, C, gs, a, b, mu.data_ptr<F>(), f.invstd.data_ptr<F>(), training,
                           F(1) / F(pd.taps()), up, dX.data_ptr<T>(), dgamma.data_ptr<F>(), dbeta.data_ptr<F>(),
                           gs.on ? dgate.data_ptr<F>() : nullptr);
  });
  // Parameter gradients in their parameters' dtypes (float32 masters under autocast: no copy).
  return {dX, dgamma.to(weight.scalar_type()), dbeta.to(bias.scalar_type()),
          dWc.to(conv_weight.scalar_type()).contiguous(), gate_grad_in_gate_dtype(dgate, gate)};
}

Tensor norm_relu_pool_forward_cpu(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
                                  const Tensor& bias, bool /*training*/, double eps, const c10::optional<Tensor>& gate) {
  check_tail_args(input, mean, var, weight, bias, eps);
  check_gate(gate, input);
  check_cpu_dtype(input);
  const int64_t N = input.size(0), C = input.size(1), HW = input.numel() / (N * C);  // D*H*W in 3-D
  const Tensor X = input.contiguous(cl_format(input));
  Tensor out = at::empty({N, C}, input.options());
  DNF_DISPATCH_CPU_KERNEL(input.scalar_type(), "norm_relu_pool_forward_cpu", [&] {
    using T = scalar_t;
    using F = typename Opmath<T>::type;
    using acc_t = typename Acc<T>::type;
    const Folded f = fold<F>(mean, var, weight, bias, eps);
    const T* Xp = X.data_ptr<T>();
    const F* b = f.b.data_ptr<F>();
    const Gate<F> gs(gate, f.a.data_ptr<F>(), N, C);
    T* O = out.data_ptr<T>();
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      std::vector<acc_t> s(C);
      for (int64_t n = n0; n < n1; ++n) {
        const F* a = gs.a_row(n);
        std::fill(s.begin(), s.end(), acc_t(0));
        for (int64_t p = 0; p < HW; ++p) {
          const T* xr = Xp + (n * HW + p) * C;
          DNF_SIMD for (int64_t j = 0; j < C; ++j) s[j] += relu<F>(to_f<F>(xr[j]) * a[j] + b[j]);
        }
        for (int64_t j = 0; j < C; ++j) O[n * C + j] = from_f<T>(static_cast<F>(s[j] / HW));
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> norm_relu_pool_backward_cpu(
    const Tensor& grad_output, const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
    const Tensor& bias, bool training, double eps, const c10::optional<Tensor>& gate) {
  check_tail_args(input, mean, var, weight, bias, eps);
  check_gate(gate, input);
  check_cpu_dtype(input);
  const int64_t N = input.size(0), C = input.size(1), HW = input.numel() / (N * C);  // D*H*W in 3-D
  check_shape(grad_output, {N, C}, "grad_output");
  check_float_tensor(grad_output, "grad_output", input);
  const Tensor X = input.contiguous(cl_format(input));
  Tensor dX = empty_mapped(X.sizes(), X.options(), cl_format(input));
  const auto f_opts = input.options().dtype(stats_dtype(input.scalar_type()));
  Tensor dgamma = at::empty({C}, f_opts), dbeta = at::empty({C}, f_opts);
  Tensor dgate = gate_grad_like(gate, input);
  DNF_DISPATCH_CPU_KERNEL(input.scalar_type(), "norm_relu_pool_backward_cpu", [&] {
    using T = scalar_t;
    using F = typename Opmath<T>::type;
    const Folded f = fold<F>(mean, var, weight, bias, eps);
    const Tensor mu = as_f<F>(mean), dO = as_f<F>(grad_output);  // [N, C]: small
    const F* dOp = dO.data_ptr<F>();
    const Gate<F> gs(gate, f.a.data_ptr<F>(), N, C);
    auto up = [&](int64_t r) -> const F* { return dOp + (r / HW) * C; };
    bn_relu_backward<T, F>(X.data_ptr<T>(), N, HW, C, gs, f.a.data_ptr<F>(), f.b.data_ptr<F>(), mu.data_ptr<F>(),
                           f.invstd.data_ptr<F>(), training, F(1) / F(HW), up, dX.data_ptr<T>(),
                           dgamma.data_ptr<F>(), dbeta.data_ptr<F>(), gs.on ? dgate.data_ptr<F>() : nullptr);
  });
  return {dX, dgamma.to(weight.scalar_type()), dbeta.to(bias.scalar_type()), gate_grad_in_gate_dtype(dgate, gate)};
}

std::tuple<Tensor, Tensor> channel_moments_cpu(const Tensor& input) {
  check_input_4d(input, "input", /*training=*/false);
  check_cpu_dtype(input);
  const int64_t C = input.size(1);
  const Tensor X = input.contiguous(cl_format(input));
  // bfloat16 (conv0's output under CPU autocast): read as it is, the moments in float32 (no float32 copy).
  const auto opts = input.options().dtype(stats_dtype(input.scalar_type()));
  Tensor mean = at::empty({C}, opts), var = at::empty({C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, input.scalar_type(), "channel_moments_cpu", [&] {
    using F = typename Opmath<scalar_t>::type;
    column_moments<scalar_t>(X.data_ptr<scalar_t>(), X.numel() / C, C, 0, C, mean.data_ptr<F>(), var.data_ptr<F>());
  });
  return {mean, var};
}

// Per-sample, per-channel mean and biased variance over the spatial positions -> ([N, C], [N, C]):
// the SE squeeze (the mean) and what the gated readers' batch statistics are combined from. Two passes,
// each one parallel region over fixed row chunks inside each sample (deterministic), fp64 accumulation.
std::tuple<Tensor, Tensor> sample_moments_cpu(const Tensor& input) {
  check_input_4d(input, "input", /*training=*/false);
  check_cpu(input);
  const int64_t N = input.size(0), C = input.size(1), HW = input.numel() / (N * C);
  const Tensor X = input.contiguous(cl_format(input));
  Tensor mean = at::empty({N, C}, input.options()), var = at::empty({N, C}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "sample_moments_cpu", [&] {
    using T = scalar_t;
    using acc_t = typename Acc<T>::type;
    const T* Xp = X.data_ptr<T>();
    const int64_t chunk = reduce_chunk<T>(N * HW), per_sample = (HW + chunk - 1) / chunk;
    std::vector<acc_t> part(N * per_sample * C);
    std::vector<T> mu(N * C);
    // part[(n, k), j] = sum over chunk k of sample n of term(x, mu[n, j]).
    auto pass = [&](auto term, T* out) {
      at::parallel_for(0, N * per_sample, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t n = i / per_sample, k = i % per_sample;
          acc_t* s = part.data() + i * C;
          std::fill(s, s + C, acc_t(0));
          const T* m = mu.data() + n * C;
          for (int64_t p = k * chunk; p < std::min(HW, (k + 1) * chunk); ++p) {
            const T* xr = Xp + (n * HW + p) * C;
            DNF_SIMD for (int64_t j = 0; j < C; ++j) s[j] += term(xr[j], m[j]);
          }
        }
      });
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < C; ++j) {
          acc_t v = 0;
          for (int64_t k = 0; k < per_sample; ++k) v += part[(n * per_sample + k) * C + j];
          out[n * C + j] = static_cast<T>(v / HW);
        }
    };
    pass([](T x, T) { return acc_t(x); }, mu.data());
    std::copy(mu.begin(), mu.end(), mean.data_ptr<T>());
    pass([](T x, T m) { const acc_t d = acc_t(x) - acc_t(m); return d * d; }, var.data_ptr<T>());
  });
  return {mean, var};
}

}  // namespace dnf::cpu::DNF_ISA

#ifdef DNF_ISA_REGISTERS
namespace dnf::cpu {

DNF_DECLARE_ISA_VARIANTS(sample_moments_cpu)
DNF_DECLARE_ISA_VARIANTS(transition_forward_cpu)
DNF_DECLARE_ISA_VARIANTS(transition_backward_cpu)
DNF_DECLARE_ISA_VARIANTS(norm_relu_pool_forward_cpu)
DNF_DECLARE_ISA_VARIANTS(norm_relu_pool_backward_cpu)
DNF_DECLARE_ISA_VARIANTS(channel_moments_cpu)

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("sample_moments", DNF_PICK_ISA(sample_moments_cpu));
  m.impl("transition_forward", DNF_PICK_ISA(transition_forward_cpu));
  m.impl("transition_backward", DNF_PICK_ISA(transition_backward_cpu));
  m.impl("norm_relu_pool_forward", DNF_PICK_ISA(norm_relu_pool_forward_cpu));
  m.impl("norm_relu_pool_backward", DNF_PICK_ISA(norm_relu_pool_backward_cpu));
  m.impl("channel_moments", DNF_PICK_ISA(channel_moments_cpu));
}

}  // namespace dnf::cpu
#endif
