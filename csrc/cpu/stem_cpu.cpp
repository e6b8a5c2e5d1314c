// CPU kernels of the DenseNet stem reader: max_pool(relu(bn(x)), 3, 2, 1) over [N, C, H, W] (3x3/2)
// or [N, C, D, H, W] (3x3x3/2), in the input's own layout (contiguous or channels_last(_3d)), so a
// conv0 output is never copied (docs/design.md §4).
//
// Nothing of the input's size is allocated in the forward. The backward allocates only grad_input:
// the pooling gradient is scattered into it (argmax recomputed from x, ATen's scan order and tie/NaN
// rule), then the ReLU mask and the BN backward are applied to it in place.
// Storage type T (float32, float64, bfloat16: conv0's output under CPU autocast), compute type F = Opmath<T>:
// a bfloat16 stem reads conv0's bfloat16 output and writes bfloat16 gradients (the pooled gradient summed
// in bfloat16, at most 4 (2-D) / 8 (3-D) windows per element), with float BN math and statistics.
#include "cpu/isa_build.h"  // first: which ISA build this is

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/checks.h"
#include "common/nonfinite.h"
#include "cpu/kernels.h"
#include "cpu/workspace.h"

namespace dnf::cpu::DNF_ISA {

using at::Tensor;

// Geometry of the 3x3(x3), stride 2, padding 1 pool. A 2-D input is the 3-D case with D = 1 and a
// depth window of 1 (kd = 1, no depth stride or padding). Element (n, c, d, h, w) of the input lies at
// n*sN + c*sC + ((d*H + h)*W + w)*sP: contiguous (sC = D*H*W, sP = 1) or channels_last (sC = 1, sP = C).
struct StemGeom {
  int64_t N, C, D, H, W, OD, OH, OW, kd, sd, pd;
  int64_t sN, sC, sP;  // input strides (elements)
  int64_t oN, oC, oP;  // output strides
  bool cl;

  explicit StemGeom(const Tensor& x, bool channels_last) : cl(channels_last) {
    const bool three = x.dim() == 5;
    N = x.size(0), C = x.size(1), D = three ? x.size(2) : 1, H = x.size(-2), W = x.size(-1);
    kd = three ? 3 : 1, sd = three ? 2 : 1, pd = three ? 1 : 0;
    OD = three ? (D - 1) / 2 + 1 : 1, OH = (H - 1) / 2 + 1, OW = (W - 1) / 2 + 1;
    const int64_t S = D * H * W, OS = OD * OH * OW;
    sN = C * S, sC = cl ? 1 : S, sP = cl ? C : 1;
    oN = C * OS, oC = cl ? 1 : OS, oP = cl ? C : 1;
  }
  std::vector<int64_t> out_shape(int64_t dim) const {
    return dim == 5 ? std::vector<int64_t>{N, C, OD, OH, OW} : std::vector<int64_t>{N, C, OH, OW};
  }
  // Task t of N*C*OH tasks -> (n, c, oh): channel fastest in channels_last (neighbouring tasks share
  // cache lines), oh fastest in the contiguous layout.
  void task(int64_t t, int64_t& n, int64_t& c, int64_t& oh) const {
    if (cl) {
      c = t % C, oh = (t / C) % OH, n = t / (C * OH);
    } else {
      oh = t % OH, c = (t / OH) % C, n = t / (OH * C);
    }
  }
};

at::MemoryFormat layout_of(const Tensor& x, bool cl) {
  if (!cl) return at::MemoryFormat::Contiguous;
  return x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

// Work (and answer) in channels_last(_3d) when the input is in it and not also contiguous; anything
// else is made contiguous. The fake kernel (densenet_fast/ops/stem.py) applies the same rule.
bool is_channels_last(const Tensor& x) {
  const auto fmt = x.dim() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  return !x.is_contiguous() && x.is_contiguous(fmt);
}

void check_stem(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight, const Tensor& bias,
                double eps) {
  check_tail_args(input, mean, var, weight, bias, eps);
  check_cpu_dtype(input);
}

template <typename T>
struct Fold {
  std::vector<T> a, b, invstd, mean;
};

// In the compute type F (the BN tensors may have the input's own dtype: a model cast with .bfloat16()).
template <typename F>
Fold<F> fold_stem(const Tensor& mean, const Tensor& var, const Tensor& weight, const Tensor& bias, double eps) {
  const int64_t C = mean.numel();
  Fold<F> f{std::vector<F>(C), std::vector<F>(C), std::vector<F>(C), std::vector<F>(C)};
  const Tensor m = as_f<F>(mean), v = as_f<F>(var), w = as_f<F>(weight), bi = as_f<F>(bias);
  fold_channels<F>(C, w.data_ptr<F>(), bi.data_ptr<F>(), m.data_ptr<F>(), v.data_ptr<F>(), eps, f.a.data(),
                   f.b.data(), f.invstd.data());
  std::copy(m.data_ptr<F>(), m.data_ptr<F>() + C, f.mean.begin());
  return f;
}

// Max of relu(a*x + b) over one window and its flat input offset (ATen's rule: scan (d, h, w) in
// order, replace on a strictly greater value or a NaN; the first element of the window always wins
// over the initial -inf).
template <typename T, typename F>
inline void window_max(const T* xc, const StemGeom& g, int64_t od, int64_t oh, int64_t ow, F a, F b, F& best,
                       int64_t& arg) {
  const int64_t d0 = std::max<int64_t>(od * g.sd - g.pd, 0), d1 = std::min(od * g.sd - g.pd + g.kd, g.D);
  const int64_t h0 = std::max<int64_t>(2 * oh - 1, 0), h1 = std::min(2 * oh + 2, g.H);
  const int64_t w0 = std::max<int64_t>(2 * ow - 1, 0), w1 = std::min(2 * ow + 2, g.W);
  best = -std::numeric_limits<F>::infinity();
  arg = ((d0 * g.H + h0) * g.W + w0) * g.sP;
  for (int64_t d = d0; d < d1; ++d)
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t off = ((d * g.H + h) * g.W + w) * g.sP;
        const F v = relu<F>(to_f<F>(xc[off]) * a + b);
        if (v > best || std::isnan(v)) best = v, arg = off;
      }
}

// channels_last: window_max for all C channels of one output pixel at once (the channel loop is the
// vector loop; same scan order and NaN rule per channel). x points at sample n; arg[c] receives the
// winning element's offset (from x) of channel c's window, best[c] its value.
template <typename T, typename F>
inline void window_max_cl(const T* x, const StemGeom& g, int64_t od, int64_t oh, int64_t ow, const Fold<F>& f,
                          F* best, int32_t* pos, int64_t* arg) {
  const int64_t d0 = std::max<int64_t>(od * g.sd - g.pd, 0), d1 = std::min(od * g.sd - g.pd + g.kd, g.D);
  const int64_t h0 = std::max<int64_t>(2 * oh - 1, 0), h1 = std::min(2 * oh + 2, g.H);
  const int64_t w0 = std::max<int64_t>(2 * ow - 1, 0), w1 = std::min(2 * ow + 2, g.W);
  const int64_t C = g.C;
  const F* __restrict__ a = f.a.data();
  const F* __restrict__ b = f.b.data();
  int64_t offs[27];
  offs[0] = 0;  // overwritten below (a window is never empty); GCC cannot see it
  int32_t k = 0;
  for (int64_t d = d0; d < d1; ++d)
    for (int64_t h = h0; h < h1; ++h)
      for (int64_t w = w0; w < w1; ++w) offs[k++] = ((d * g.H + h) * g.W + w) * C;
  {  // the window's first element always wins over the initial -inf
    const T* __restrict__ xr = x + offs[0];
    DNF_SIMD for (int64_t c = 0; c < C; ++c) {
      best[c] = relu<F>(to_f<F>(xr[c]) * a[c] + b[c]);
      pos[c] = 0;
    }
  }
  for (int32_t i = 1; i < k; ++i) {
    const T* __restrict__ xr = x + offs[i];
    DNF_SIMD for (int64_t c = 0; c < C; ++c) {
      const F v = relu<F>(to_f<F>(xr[c]) * a[c] + b[c]);
      // take v when v > best or v is NaN, written as selects so the loop vectorises
      const F cur = best[c];
      const F keep_or_nan = v != v ? v : cur;
      best[c] = v > cur ? v : keep_or_nan;
      pos[c] = v > cur ? i : (v != v ? i : pos[c]);
    }
  }
  if (arg != nullptr)
    for (int64_t c = 0; c < C; ++c) arg[c] = offs[pos[c]];
}

Tensor bn_relu_maxpool_cpu(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
                           const Tensor& bias, bool /*training*/, double eps) {
  check_stem(input, mean, var, weight, bias, eps);
  const bool cl = is_channels_last(input);
  const Tensor X = input.contiguous(layout_of(input, cl));
  const StemGeom g(X, cl);
  Tensor out = empty_mapped(g.out_shape(input.dim()), input.options(), layout_of(input, cl));
  DNF_DISPATCH_CPU_KERNEL(input.scalar_type(), "bn_relu_maxpool_cpu", [&] {
    using T = scalar_t;
    using F = typename Opmath<T>::type;
    const Fold<F> f = fold_stem<F>(mean, var, weight, bias, eps);
    const T* Xp = X.data_ptr<T>();
    T* O = out.data_ptr<T>();
    if (g.cl) {
      at::parallel_for(0, g.N * g.OH, 1, [&](int64_t t0, int64_t t1) {
        std::vector<F> best(g.C);
        std::vector<int32_t> pos(g.C);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = t / g.OH, oh = t % g.OH;
          for (int64_t od = 0; od < g.OD; ++od)
            for (int64_t ow = 0; ow < g.OW; ++ow) {
              window_max_cl<T, F>(Xp + n * g.sN, g, od, oh, ow, f, best.data(), pos.data(), nullptr);
              narrow_rows<T, F>(best.data(), g.C, O + n * g.oN + ((od * g.OH + oh) * g.OW + ow) * g.C);
            }
        }
      });
      return;
    }
    at::parallel_for(0, g.N * g.C * g.OH, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t n, c, oh, arg;
        g.task(t, n, c, oh);
        const T* xc = Xp + n * g.sN + c * g.sC;
        T* oc = O + n * g.oN + c * g.oC;
        for (int64_t od = 0; od < g.OD; ++od)
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            F best;
            window_max<T, F>(xc, g, od, oh, ow, f.a[c], f.b[c], best, arg);
            oc[((od * g.OH + oh) * g.OW + ow) * g.oP] = from_f<T>(best);
          }
      }
    });
  });
  return out;
}

// Per-channel sums of d = relu_grad(u, G) and d*xhat over the whole input, in double, independent of
// the thread count: fixed (n, c, plane-chunk) pieces in the contiguous layout, fixed row chunks in
// channels_last; partials added in a fixed order.
template <typename T, typename F>
void grad_sums(const T* X, const T* G, const StemGeom& g, const Fold<F>& f, std::vector<double>& s1,
               std::vector<double>& s2) {
  const int64_t C = g.C, S = g.D * g.H * g.W;
  const int64_t chunks_per_row = (S + kReduceChunk - 1) / kReduceChunk;  // per (n, c) plane or per n (cl)
  const int64_t units = g.cl ? g.N * chunks_per_row : g.N * C * chunks_per_row;
  std::vector<double> part(units * 2 * C, 0.0);
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      double* p1 = part.data() + u * 2 * C;
      double* p2 = p1 + C;
      const int64_t k = u % chunks_per_row, p0 = k * kReduceChunk, pe = std::min(S, p0 + kReduceChunk);
      if (g.cl) {
        const int64_t n = u / chunks_per_row;
        for (int64_t p = p0; p < pe; ++p) {
          const T* xr = X + n * g.sN + p * C;
          const T* gr = G + n * g.sN + p * C;
          DNF_SIMD for (int64_t c = 0; c < C; ++c) {
            const F x = to_f<F>(xr[c]);
            const F d = bn_relu_grad<F>(x * f.a[c] + f.b[c], to_f<F>(gr[c]));
            p1[c] += d;
            p2[c] += d * ((x - f.mean[c]) * f.invstd[c]);
          }
        }
      } else {
        const int64_t c = (u / chunks_per_row) % C, n = u / (chunks_per_row * C);
        const T* xp = X + n * g.sN + c * g.sC;
        const T* gp = G + n * g.sN + c * g.sC;
        double a1 = 0.0, a2 = 0.0;
        for (int64_t p = p0; p < pe; ++p) {
          const F x = to_f<F>(xp[p]);
          const F d = bn_relu_grad<F>(x * f.a[c] + f.b[c], to_f<F>(gp[p]));
          a1 += d;
          a2 += d * ((x - f.mean[c]) * f.invstd[c]);
        }
        p1[c] += a1, p2[c] += a2;
      }
    }
  });
  s1.assign(C, 0.0), s2.assign(C, 0.0);
  for (int64_t u = 0; u < units; ++u)
    for (int64_t c = 0; c < C; ++c) s1[c] += part[u * 2 * C + c], s2[c] += part[u * 2 * C + C + c];
}

std::tuple<Tensor, Tensor, Tensor> bn_relu_maxpool_backward_cpu(const Tensor& grad_output, const Tensor& input,
                                                                const Tensor& mean, const Tensor& var,
                                                                const Tensor& weight, const Tensor& bias,
                                                                bool training, double eps) {
  check_stem(input, mean, var, weight, bias, eps);
  const bool cl = is_channels_last(input);
  const Tensor X = input.contiguous(layout_of(input, cl));
  const StemGeom g(X, cl);
  check_shape(grad_output, g.out_shape(input.dim()), "grad_output");
  check_float_tensor(grad_output, "grad_output", input);
  const Tensor dO = grad_output.contiguous(layout_of(input, cl));
  Tensor dX = empty_mapped(X.sizes(), X.options(), layout_of(input, cl)).zero_();
  const auto f_opts = input.options().dtype(stats_dtype(input.scalar_type()));
  Tensor dgamma = at::empty({g.C}, f_opts), dbeta = at::empty({g.C}, f_opts);
  DNF_DISPATCH_CPU_KERNEL(input.scalar_type(), "bn_relu_maxpool_backward_cpu", [&] {
    using T = scalar_t;
    using F = typename Opmath<T>::type;
    const Fold<F> f = fold_stem<F>(mean, var, weight, bias, eps);
    const T *Xp = X.data_ptr<T>(), *dOp = dO.data_ptr<T>();
    T* G = dX.data_ptr<T>();
    // 1. Pool backward into dX. Windows of output rows oh and oh + 2 are disjoint (rows 2oh-1..2oh+1),
    //    so the tasks of one oh parity never write the same element: two race-free phases.
    for (int64_t parity = 0; parity < 2 && g.cl; ++parity) {
      const int64_t rows = (g.OH - parity + 1) / 2;  // oh = parity, parity + 2, ...
      at::parallel_for(0, g.N * rows, 1, [&](int64_t t0, int64_t t1) {
        std::vector<F> best(g.C);
        std::vector<int32_t> pos(g.C);
        std::vector<int64_t> arg(g.C);
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t n = t / rows, oh = parity + 2 * (t % rows);
          T* gn = G + n * g.sN;
          for (int64_t od = 0; od < g.OD; ++od)
            for (int64_t ow = 0; ow < g.OW; ++ow) {
              window_max_cl<T, F>(Xp + n * g.sN, g, od, oh, ow, f, best.data(), pos.data(), arg.data());
              const T* orow = dOp + n * g.oN + ((od * g.OH + oh) * g.OW + ow) * g.C;
              for (int64_t c = 0; c < g.C; ++c) gn[arg[c] + c] = from_f<T>(to_f<F>(gn[arg[c] + c]) + to_f<F>(orow[c]));
            }
        }
      });
    }
    for (int64_t parity = 0; parity < 2 && !g.cl; ++parity) {
      const int64_t rows = (g.OH - parity + 1) / 2;  // oh = parity, parity + 2, ...
      at::parallel_for(0, g.N * g.C * rows, 16, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          int64_t n, c, k, arg;
          if (g.cl) {
            c = t % g.C, k = (t / g.C) % rows, n = t / (g.C * rows);
          } else {
            k = t % rows, c = (t / rows) % g.C, n = t / (rows * g.C);
          }
          const int64_t oh = parity + 2 * k;
          const T* xc = Xp + n * g.sN + c * g.sC;
          T* gc = G + n * g.sN + c * g.sC;
          const T* oc = dOp + n * g.oN + c * g.oC;
          for (int64_t od = 0; od < g.OD; ++od)
            for (int64_t ow = 0; ow < g.OW; ++ow) {
              F best;
              window_max<T, F>(xc, g, od, oh, ow, f.a[c], f.b[c], best, arg);
              gc[arg] = from_f<T>(to_f<F>(gc[arg]) + to_f<F>(oc[((od * g.OH + oh) * g.OW + ow) * g.oP]));
            }
        }
      });
    }
    // 2. ReLU mask + BN backward, in place over dX.
    std::vector<double> s1, s2;
    grad_sums<T, F>(Xp, G, g, f, s1, s2);
    const int64_t M = g.N * g.D * g.H * g.W;
    std::vector<F> m1(g.C, F(0)), m2(g.C, F(0));
    F *dg = dgamma.data_ptr<F>(), *db = dbeta.data_ptr<F>();
    for (int64_t c = 0; c < g.C; ++c) {
      db[c] = static_cast<F>(s1[c]), dg[c] = static_cast<F>(s2[c]);
      if (training) m1[c] = static_cast<F>(s1[c] / M), m2[c] = static_cast<F>(s2[c] / M);
    }
    // Rows of C channels (channels_last) or planes of S positions of one channel (contiguous); the mode
    // branch of bn_backward (common/nonfinite.h) hoisted so the inner loop vectorises.
    const int64_t S = g.D * g.H * g.W;
    const int64_t outer = g.cl ? M : g.N * g.C, inner = g.cl ? g.C : S;
    at::parallel_for(0, outer, g.cl ? 64 : 1, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const T* xr = Xp + o * inner;
        T* gr = G + o * inner;
        const int64_t cc = o % g.C;  // the plane's channel (contiguous layout)
        const F *a = f.a.data(), *b = f.b.data(), *mu = f.mean.data(), *is = f.invstd.data();
        const F *p1 = m1.data(), *p2 = m2.data();
        auto elem = [&](auto train, int64_t i, int64_t c) {
          const F x = to_f<F>(xr[i]);
          const F d = bn_relu_grad<F>(x * a[c] + b[c], to_f<F>(gr[i]));
          if constexpr (decltype(train)::value) {
            gr[i] = from_f<T>(bn_backward_train<F>(d, (x - mu[c]) * is[c], a[c], p1[c], p2[c]));
          } else {
            gr[i] = from_f<T>(a[c] * d);
          }
        };
        if (g.cl && training) {
          DNF_SIMD for (int64_t c = 0; c < inner; ++c) elem(std::true_type{}, c, c);
        } else if (g.cl) {
          DNF_SIMD for (int64_t c = 0; c < inner; ++c) elem(std::false_type{}, c, c);
        } else if (training) {
          DNF_SIMD for (int64_t i = 0; i < inner; ++i) elem(std::true_type{}, i, cc);
        } else {
          DNF_SIMD for (int64_t i = 0; i < inner; ++i) elem(std::false_type{}, i, cc);
        }
      }
    });
  });
  return {dX, dgamma.to(weight.scalar_type()), dbeta.to(bias.scalar_type())};
}

}  // namespace dnf::cpu::DNF_ISA

#ifdef DNF_ISA_REGISTERS
namespace dnf::cpu {

DNF_DECLARE_ISA_VARIANTS(bn_relu_maxpool_cpu)
DNF_DECLARE_ISA_VARIANTS(bn_relu_maxpool_backward_cpu)

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("bn_relu_maxpool", DNF_PICK_ISA(bn_relu_maxpool_cpu));
  m.impl("bn_relu_maxpool_backward", DNF_PICK_ISA(bn_relu_maxpool_backward_cpu));
}

}  // namespace dnf::cpu
#endif
