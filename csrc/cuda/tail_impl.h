// The CUDA kernels of the BN-ReLU readers that follow a dense block (csrc/cpu/tail_cpu.cpp is the
// specification): transition_forward/backward, norm_relu_pool_forward/backward (each with an optional
// SE gate folded into the prologue, docs/design.md §5), channel_moments, sample_moments.
// Neither reader stores its BN/ReLU output: the transition pools relu(bn(x)) first (a quarter of
// the rows) and runs its 1x1 conv as a cuBLAS GEMM on the pooled rows; the backward recomputes.
#pragma once

#include "common/nonfinite.h"
#include "cuda/block_kernels.cuh"
#include "cuda/common_impl.h"
#include "cuda/reduce.cuh"

namespace dnf::DNF_CUDA_NS {

// Folded BN of a tail reader: acc_t [3, C] = (a, b, invstd).
template <typename T>
Tensor fold_tail(const Tensor& mean, const Tensor& var, const Tensor& weight, const Tensor& bias, double eps,
                 std::vector<Tensor>& keep) {
  using acc_t = acc_type<T>;
  const int64_t C = mean.numel();
  Tensor f = at::empty({3, C}, acc_options<T>(mean));
  acc_t* p = f.data_ptr<acc_t>();
  for_each(C, FoldBn<acc_t>{vec_ptr<acc_t>(weight, keep), vec_ptr<acc_t>(bias, keep), vec_ptr<acc_t>(mean, keep),
                            vec_ptr<acc_t>(var, keep), eps, p, p + C, p + 2 * C});
  return f;
}

// The prologue scale of a reader with an optional gate [N, C]: ag = a*g and g in acc_t (kept alive in
// `keep`), or the BN's own a with stride 0.
template <typename T>
GatedScale<acc_type<T>> gated_scale(const Tensor& f, const c10::optional<Tensor>& gate, int64_t N,
                                    std::vector<Tensor>& keep) {
  using acc_t = acc_type<T>;
  const int64_t C = f.size(1);
  const acc_t* a = f.data_ptr<acc_t>();
  if (!gate.has_value() || !gate->defined()) return {a, nullptr, 0};
  const acc_t* g = vec_ptr<acc_t>(*gate, keep);
  keep.push_back(at::empty({N, C}, f.options()));
  acc_t* ag = keep.back().data_ptr<acc_t>();
  for_each(N * C, ScaleByGate<acc_t>{a, g, C, ag});
  return {ag, g, C};
}

inline bool has_gate(const c10::optional<Tensor>& gate) { return gate.has_value() && gate->defined(); }

inline void check_transition(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
                             const Tensor& bias, const Tensor& conv_weight, double eps) {
  check_cuda_input(input, "input");
  check_transition_args(input, mean, var, weight, bias, conv_weight, eps);
}

// The transition's pool geometry: 2x2 over [H, W] of a 4-D input, 2x2x2 over [D, H, W] of a 5-D one.
inline PoolGeometry pool_geometry(const Tensor& input) {
  const int64_t H = input.size(-2), W = input.size(-1);
  PoolGeometry pg{H, W, H / 2, W / 2};
  if (input.dim() == 5) {
    pg.D = input.size(2);
    pg.D2 = pg.D / 2;
    pg.kd = 2;
  }
  return pg;
}

inline std::vector<int64_t> pooled_shape(const Tensor& input, const PoolGeometry& pg, int64_t Cout) {
  if (input.dim() == 5) return {input.size(0), Cout, pg.D2, pg.H2, pg.W2};
  return {input.size(0), Cout, pg.H2, pg.W2};
}

// P = avgpool2(relu(bn(X))) as a [N*(D2*)H2*W2, C] matrix (gs: the per-sample prologue scale).
template <typename T>
Tensor pooled_input(const Tensor& X, const Tensor& f, const GatedScale<acc_type<T>>& gs, const PoolGeometry& pg) {
  using acc_t = acc_type<T>;
  const int64_t N = X.size(0), C = X.size(1), M2 = N * pg.D2 * pg.H2 * pg.W2;
  Tensor P = at::empty({M2, C}, X.options().memory_format(at::MemoryFormat::Contiguous));
  for_each(M2 * C, PoolBnRelu<T, acc_t>{X.data_ptr<T>(), C, pg, gs, f.data_ptr<acc_t>() + C, P.data_ptr<T>()});
  return P;
}

inline Tensor transition_forward(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
                                 const Tensor& bias, const Tensor& conv_weight, bool /*training*/, double eps,
                                 const c10::optional<Tensor>& gate) {
  check_transition(input, mean, var, weight, bias, conv_weight, eps);
  check_gate(gate, input);
  const DeviceScope scope(input);
  const int64_t C = input.size(1), Cout = conv_weight.size(0);
  const PoolGeometry pg = pool_geometry(input);
  const Tensor X = input.contiguous(cl_format(input));
  Tensor out = empty_cl(pooled_shape(input, pg, Cout), input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "transition_forward_cuda", [&] {
    std::vector<Tensor> keep;
    const Tensor f = fold_tail<scalar_t>(mean, var, weight, bias, eps, keep);
    const Tensor P = pooled_input<scalar_t>(X, f, gated_scale<scalar_t>(f, gate, input.size(0), keep), pg);
    Tensor out2d = rows_view(out);
    at::mm_out(out2d, P, conv_weight.contiguous().view({Cout, C}).t());
  });
  return out;
}

// Shared BN + ReLU backward of a tail reader given the gradient w.r.t. its ReLU output (`up`); with a
// gate (gs.g != nullptr) also dgate [N, C] = sum_hw x*dy, reduced per sample (acc_t).
template <typename T, class Up>
void tail_bn_backward(const Tensor& X, const Tensor& f, const GatedScale<acc_type<T>>& gs, const Tensor& mean,
                      bool training, const Up& up, Tensor& dX, Tensor& dgamma, Tensor& dbeta, Tensor* dgate,
                      std::vector<Tensor>& keep) {
  using acc_t = acc_type<T>;
  const int64_t N = X.size(0), C = X.size(1), M = X.numel() / C, HW = M / N;
  const auto acc_opts = acc_options<T>(X);
  const acc_t *a = f.data_ptr<acc_t>(), *b = a + C, *is = a + 2 * C;
  const acc_t* mu = vec_ptr<acc_t>(mean, keep);
  const TailElement<T, acc_t, Up> e{X.data_ptr<T>(), C, HW, gs, b, mu, is, up};
  const Tensor sums = column_sums<acc_t, 2>(M, C, TailBackwardTerm<T, acc_t, Up>{e}, acc_opts);
  Tensor m = at::empty({2, C}, acc_opts);
  for_each(C, BnGradEpilogue<acc_t>{sums.data_ptr<acc_t>(), C, M, training, dbeta.data_ptr<acc_t>(),
                                    dgamma.data_ptr<acc_t>(), m.data_ptr<acc_t>(), nullptr, nullptr, nullptr});
  for_each(M * C, TailBackwardApply<T, acc_t, Up>{e, a, m.data_ptr<acc_t>(), dX.data_ptr<T>(), training});
  if (dgate != nullptr)
    *dgate = column_sums<acc_t, 1>(HW, N * C, GateGradTerm<T, acc_t, Up>{e, a, m.data_ptr<acc_t>(), training},
                                   acc_opts).view({N, C});
}

// The backward's grad_gate: dgate (acc_t) in the gate's dtype, or an empty [0] tensor when ungated.
inline Tensor gate_grad(const c10::optional<Tensor>& gate, const Tensor& dgate, const Tensor& input) {
  if (!has_gate(gate)) return at::empty({0}, input.options());
  return as_param_dtype(dgate, *gate);
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> transition_backward(
    const Tensor& grad_output, const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
    const Tensor& bias, const Tensor& conv_weight, bool training, double eps, const c10::optional<Tensor>& gate) {
  check_transition(input, mean, var, weight, bias, conv_weight, eps);
  check_gate(gate, input);
  const int64_t C = input.size(1), Cout = conv_weight.size(0);
  const PoolGeometry pg = pool_geometry(input);
  check_shape(grad_output, pooled_shape(input, pg, Cout), "grad_output");
  check_float_tensor(grad_output, "grad_output", input);
  const DeviceScope scope(input);
  const Tensor X = input.contiguous(cl_format(input));
  const Tensor dO = rows_view(grad_output.contiguous(cl_format(input)));  // [M2, Cout]
  const auto sopts = input.options().dtype(stats_dtype(input.scalar_type()));
  Tensor dX = empty_cl(input.sizes(), input.options());
  Tensor dgamma = at::empty({C}, sopts), dbeta = at::empty({C}, sopts);
  Tensor dWc = at::empty(conv_weight_shape(Cout, C, 1, input.dim() - 2),
                         input.options().memory_format(at::MemoryFormat::Contiguous));
  Tensor dgate;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "transition_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<Tensor> keep;
    const Tensor f = fold_tail<scalar_t>(mean, var, weight, bias, eps, keep);
    const GatedScale<acc_t> gs = gated_scale<scalar_t>(f, gate, input.size(0), keep);
    // dWc = dOut^T P (P recomputed), dP = dOut Wc: the pooled gradient, a quarter of the input's size.
    const Tensor P = pooled_input<scalar_t>(X, f, gs, pg);
    Tensor dWc2d = dWc.view({Cout, C});
    mm_weight_grad_out(dWc2d, dO.t(), P);  // K = N*H2*W2: float accumulation for half data
    if (pg.H % 2 != 0 || pg.W % 2 != 0 || (pg.kd == 2 && pg.D % 2 != 0)) {  // NaN rule of the dropped pixels
      // (common/nonfinite.h)
      const DroppedPixels px{pg.D, pg.H, pg.W, pg.kd * pg.D2, 2 * pg.H2, 2 * pg.W2};
      const Tensor bad = column_sums<acc_t, 1>(
          input.size(0) * px.per_sample(), C,
          DroppedNonfiniteTerm<scalar_t, acc_t>{X.data_ptr<scalar_t>(), px, C, gs, f.data_ptr<acc_t>() + C},
          acc_options<scalar_t>(X));
      for_each(Cout * C, PoisonColumns<scalar_t, acc_t>{bad.data_ptr<acc_t>(), C, dWc.data_ptr<scalar_t>()});
    }
    const Tensor dP = at::mm(dO, conv_weight.contiguous().view({Cout, C}));
    tail_bn_backward<scalar_t>(X, f, gs, mean, training, AvgPool2Up<scalar_t, acc_t>{dP.data_ptr<scalar_t>(), pg, C},
                               dX, dgamma, dbeta, has_gate(gate) ? &dgate : nullptr, keep);
  });
  return {dX, as_param_dtype(dgamma, weight), as_param_dtype(dbeta, bias), dWc, gate_grad(gate, dgate, input)};
}

inline Tensor norm_relu_pool_forward(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
                                     const Tensor& bias, bool /*training*/, double eps,
                                     const c10::optional<Tensor>& gate) {
  check_cuda_input(input, "input");
  check_tail_args(input, mean, var, weight, bias, eps);
  check_gate(gate, input);
  const DeviceScope scope(input);
  const int64_t N = input.size(0), C = input.size(1), HW = input.numel() / (N * C);  // (D*)H*W
  const Tensor X = input.contiguous(cl_format(input));
  Tensor out = at::empty({N, C}, input.options().memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "norm_relu_pool_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<Tensor> keep;
    const Tensor f = fold_tail<scalar_t>(mean, var, weight, bias, eps, keep);
    const acc_t* fp = f.data_ptr<acc_t>();
    for_each(N * C, NormReluPool<scalar_t, acc_t>{X.data_ptr<scalar_t>(), HW, C, gated_scale<scalar_t>(f, gate, N, keep),
                                                  fp + C, out.data_ptr<scalar_t>()});
  });
  return out;
}

inline std::tuple<Tensor, Tensor, Tensor, Tensor> norm_relu_pool_backward(
    const Tensor& grad_output, const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
    const Tensor& bias, bool training, double eps, const c10::optional<Tensor>& gate) {
  check_cuda_input(input, "input");
  check_tail_args(input, mean, var, weight, bias, eps);
  check_gate(gate, input);
  const int64_t N = input.size(0), C = input.size(1), HW = input.numel() / (N * C);  // (D*)H*W
  check_shape(grad_output, {N, C}, "grad_output");
  check_float_tensor(grad_output, "grad_output", input);
  const DeviceScope scope(input);
  const Tensor X = input.contiguous(cl_format(input));
  const Tensor dO = grad_output.contiguous();
  const auto sopts = input.options().dtype(stats_dtype(input.scalar_type()));
  Tensor dX = empty_cl(input.sizes(), input.options());
  Tensor dgamma = at::empty({C}, sopts), dbeta = at::empty({C}, sopts);
  Tensor dgate;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "norm_relu_pool_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<Tensor> keep;
    const Tensor f = fold_tail<scalar_t>(mean, var, weight, bias, eps, keep);
    tail_bn_backward<scalar_t>(X, f, gated_scale<scalar_t>(f, gate, N, keep), mean, training,
                               GlobalPoolUp<scalar_t, acc_t>{dO.data_ptr<scalar_t>(), HW, C}, dX, dgamma, dbeta,
                               has_gate(gate) ? &dgate : nullptr, keep);
  });
  return {dX, as_param_dtype(dgamma, weight), as_param_dtype(dbeta, bias), gate_grad(gate, dgate, input)};
}

// Per-channel mean and biased variance, in stats_dtype(input) as the fake kernel
// (densenet_fast/ops/tail.py) declares; accumulated in float (double for double).
inline std::tuple<Tensor, Tensor> channel_moments(const Tensor& input) {
  check_cuda_input(input, "input");
  check_input_4d(input, "input", /*training=*/false);
  const DeviceScope scope(input);
  const int64_t C = input.size(1), M = input.numel() / C;
  const Tensor X = input.contiguous(cl_format(input));
  // BN statistics in stats_dtype(input): float32 for half inputs, as the fake kernel declares.
  const auto sopts = input.options().dtype(stats_dtype(input.scalar_type())).memory_format(at::MemoryFormat::Contiguous);
  Tensor mean = at::empty({C}, sopts), var = at::empty({C}, sopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "channel_moments_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    column_moments<scalar_t, acc_t, acc_t>(X.data_ptr<scalar_t>(), M, C, 0, C, mean.data_ptr<acc_t>(),
                                           var.data_ptr<acc_t>(), acc_options<scalar_t>(input));
  });
  return {mean, var};
}

// Per-sample, per-channel mean and biased variance [N, C] over the spatial positions (one pass, as
// column reductions of N*C columns over HW rows), in stats_dtype(input) as the fake kernel declares.
inline std::tuple<Tensor, Tensor> sample_moments(const Tensor& input) {
  check_cuda_input(input, "input");
  check_input_4d(input, "input", /*training=*/false);
  const DeviceScope scope(input);
  const int64_t N = input.size(0), C = input.size(1), HW = input.numel() / (N * C);
  const Tensor X = input.contiguous(cl_format(input));
  const auto sopts = input.options().dtype(stats_dtype(input.scalar_type())).memory_format(at::MemoryFormat::Contiguous);
  Tensor mean = at::empty({N, C}, sopts), var = at::empty({N, C}, sopts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "sample_moments_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const auto acc_opts = acc_options<scalar_t>(input);
    const scalar_t* Xp = X.data_ptr<scalar_t>();
    moments<acc_t, acc_t>(SampleValue<scalar_t, acc_t>{Xp, C, HW}, HW, N * C, mean.data_ptr<acc_t>(),
                          var.data_ptr<acc_t>(), acc_opts);
  });
  return {mean, var};
}

}  // namespace dnf::DNF_CUDA_NS
