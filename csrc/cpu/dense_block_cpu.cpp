// CPU kernels of the fused dense block (docs/design.md §3).
//
// The block lives in one channels_last(_3d) buffer X[rows = N*(D*)H*W, Ct]: layer l reads the column prefix
// [0, c_l) and writes its k new columns right after it, so concatenation is free. BN1 statistics of
// a column are computed once, when the column is written. BN1+ReLU is applied tile by tile as the
// prologue of the 1x1-conv GEMM, so no layer materialises its normalised input. The backward sweeps
// the layers in reverse with one gradient buffer G, recomputing each bottleneck.
//
// Types: T = storage of the buffer, the conv weights and the GEMM operands (float, double, or bfloat16);
// F = Opmath<T> = compute type of everything else (BN parameters and statistics, the bottleneck
// pre-activation Y, the working gradient G): a bfloat16 block multiplies in bf16 with fp32
// accumulation (gemm_engine.h) and keeps BN in fp32, the autocast rule for norms.
#include "cpu/isa_build.h"  // first: which ISA build this is

#include <ATen/ATen.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include "common/block_grads.h"
#include "common/checks.h"
#include "common/layout.h"
#include "common/nonfinite.h"
#include "cpu/conv3x3.h"
#include "cpu/conv3x3_own.h"
#include "cpu/kernels.h"
#include "cpu/switches.h"
#include "cpu/workspace.h"

#include <chrono>
#include <type_traits>

namespace dnf::cpu::DNF_ISA {

using at::Tensor;
using at::TensorList;

// A [rows, C] matrix of the block's geometry (common/layout.h), from the mapped pool (cpu/workspace.h).
Tensor empty_cl(const BlockGeometry& g, int64_t C, const at::TensorOptions& opts, OnFree on_free = OnFree::kKeep) {
  return empty_cl_mapped(g.shape(C), opts, on_free);
}

// Samples per call of the 3x3 input gradient in the backward (BlockBackward::conv3x3_backward): each call's
// output is a transient of ATen's allocator (glibc's heap), kept to about kInputGradChunkBytes (densenet121 at
// batch 8, 224x224: one sample of block 1, 1.5 MiB per call instead of 12.25 MiB). Equal chunks (a single size
// for glibc to reuse): block 2 at batch 8 takes 4 + 4 samples, not 5 + 3. `one_sample_ok`: ATen runs a
// one-sample transposed convolution through oneDNN only when k * (first two spatial sizes) > 20480; otherwise it
// takes its native path, whose column buffer holds 27 * C_out * D*H*W values (191 MiB for one sample of MONAI
// DenseNet121's first block at 96^3): then at least two samples.
constexpr int64_t kInputGradChunkBytes = int64_t(2) << 20;

int64_t input_grad_chunk(int64_t N, int64_t sample_bytes, bool one_sample_ok) {
  N = std::max<int64_t>(1, N);
  const int64_t least = one_sample_ok ? 1 : std::min<int64_t>(2, N);
  const int64_t most = std::clamp<int64_t>(kInputGradChunkBytes / std::max<int64_t>(1, sample_bytes), least, N);
  const int64_t chunks = (N + most - 1) / most;
  return (N + chunks - 1) / chunks;
}

// Per-layer BN statistics: the block's shared batch statistics in training, the layer's own
// running statistics in eval.
template <typename F>
const F* layer_stat(bool training, const Tensor& shared, TensorList running, int64_t l,
                    std::vector<Tensor>& keep) {
  if (training) return shared.data_ptr<F>();
  keep.push_back(running[l].contiguous());
  return keep.back().data_ptr<F>();
}

// A value stored as T (read from T, or from F holding an unrounded T result) as F: to_f, rounding an F to T first
// (the value a T store would have read back).
template <typename T, typename F, typename D>
inline F read_as_stored(D v) {
  if constexpr (std::is_same_v<D, T>) {
    return to_f<F>(v);
  } else {
    return to_f<F>(from_f<T>(static_cast<F>(v)));
  }
}

// The largest F that T rounds to zero: 0, or for bfloat16 2^-134 (half of bfloat16's smallest subnormal, 2^-133;
// the tie rounds to the even 0). x > kRoundsToZero <=> from_f<T>(x) > 0, for x >= 0.
template <typename T, typename F>
inline constexpr F kRoundsToZero = std::is_same_v<T, c10::BFloat16> ? F(0x1p-134) : F(0);

// A layer's 1x1 weight in the storage dtype st: a float32 master weight of a bfloat16 block rounded in one serial
// loop (an ATen cast is a parallel copy, and each parallel region of a 2-thread step costs a scheduling slice
// whenever another process holds a core: design §14, "Fewer conversions"); otherwise w.to(st).
Tensor weight_in(const Tensor& w, at::ScalarType st) {
  if (st != at::kBFloat16 || w.scalar_type() != at::kFloat) return w.to(st).contiguous();
  const Tensor m = w.contiguous();
  Tensor out = at::empty(m.sizes(), m.options().dtype(st));
  const float* src = m.data_ptr<float>();
  narrow_rows(src, m.numel(), out.data_ptr<c10::BFloat16>());  // per layer and pass: on the main thread
  return out;
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
                  bool training, double eps, Tensor& mean, Tensor& var, Tensor& mean2, Tensor& var2,
                  const Tensor& slopes) {
  using F = typename Opmath<T>::type;
  // LeakyReLU / PReLU slopes (dense_block_act_forward), packed per layer (slope_offset); none: ReLU.
  const F* S = slopes.defined() ? slopes.data_ptr<F>() : nullptr;
  const int64_t M = g.rows(), Ct = g.Ct, inter = g.inter;
  gemm_engine(buffer.scalar_type());  // chosen (and measured) once, outside the parallel regions
  if (std::is_same_v<T, c10::BFloat16>) bf16_conv_compute(g.dims, ConvPass::kForward);
  T* X = buffer.data_ptr<T>();
  if (training) column_moments<T>(X, M, Ct, 0, g.C0, mean.data_ptr<F>(), var.data_ptr<F>());
  // Y: the bottleneck pre-activation (T, as torchvision's conv1 output); V = relu(bn2(Y)), the 3x3 conv
  // input, written in place of Y once its statistics are taken, or, where a bfloat16 block's 3x3 forward
  // computes in float32 (conv3x3.h), as float: rounded to bfloat16 and widened again, the pass's widened copy
  // of V made in the same loop.
  Tensor y = empty_cl(g, inter, buffer.options());
  const bool v_float = std::is_same_v<T, c10::BFloat16> && bf16_conv_compute(g.dims, ConvPass::kForward) == at::kFloat;
  // A float32 block whose 3x3 forward runs on our kernel (conv3x3_own.h): V never exists whole. Per window of
  // lines, BN2 + ReLU writes V's lines (with the halo the taps read) into a small staging frame padded as the
  // kernel reads it (its padding pixels zero), and the kernel writes the window's k new channels into the buffer.
  const ConvFrame frame = conv_frame(g.N, g.D, g.H, g.W, g.dims);
  const bool own = std::is_same_v<T, float> && own_conv3x3(frame, inter, g.k, ConvPass::kForward);
  const int64_t halo = conv3x3_halo_lines(frame);
  // ~2 MiB of lines per window, and at least 4 halos (V's halo lines are computed twice: at most 1.5x)
  const int64_t window = std::max<int64_t>({1, 4 * halo, (int64_t(2) << 20) / ((g.W + 2) * inter * 4)});
  ConvFrame stage = frame;
  stage.N = 1, stage.D = 1, stage.H = std::min(frame.lines(), window + 2 * halo);
  // A bfloat16 block whose 3x3 forward runs on our AMX kernel (conv3x3_bf16.h): V is written a few samples at a time
  // (~2 MiB) into a frame padded on every side, and the kernel writes the k new channels into the buffer.
  const bool own_bf16 =
      std::is_same_v<T, c10::BFloat16> && !v_float && own_bf16_conv3x3(inter, g.k, ConvPass::kForward, g.dims);
  AmxConvFrame bframe = amx_conv_frame(g.N, g.D, g.H, g.W, g.dims);
  bframe.N = std::clamp<int64_t>((int64_t(2) << 20) / (bframe.sample_rows() * inter * 2), 1, g.N);
  Tensor v = own ? zero_padded_lines(stage, inter)
                 : own_bf16 ? zero_amx_frame(bframe, inter)
                 : v_float ? empty_cl(g, inter, buffer.options().dtype(at::kFloat)) : y;
  T* Y = y.data_ptr<T>();
  std::vector<F> a(Ct), b(Ct), is(Ct), a2(inter), bb2(inter), is2(inter);
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t c = g.in_channels(l);
    std::vector<Tensor> keep;
    const Tensor gamma1 = g1[l].contiguous(), beta1 = b1[l].contiguous();
    const Tensor gamma2 = g2[l].contiguous(), beta2 = b2[l].contiguous();
    const Tensor W1 = weight_in(w1[l], buffer.scalar_type());  // float32 master weights: cast here
    fold_channels<F>(c, gamma1.data_ptr<F>(), beta1.data_ptr<F>(), layer_stat<F>(training, mean, rm1, l, keep),
                     layer_stat<F>(training, var, rv1, l, keep), eps, a.data(), b.data(), is.data());
    {
      RECORD_FUNCTION("dnf_cpu::bn1_relu_gemm", {});
      bn_relu_gemm<T, F>(X, M, Ct, c, a.data(), b.data(), W1.data_ptr<T>(), inter, Y, nullptr, nullptr, nullptr,
                         S ? S + slope_offset(g, l) : nullptr);
    }
    const F* mu2;
    const F* v2;
    if (training) {
      RECORD_FUNCTION("dnf_cpu::moments", {});
      column_moments<T>(Y, M, inter, 0, inter, mean2.data_ptr<F>() + l * inter, var2.data_ptr<F>() + l * inter);
      mu2 = mean2.data_ptr<F>() + l * inter;
      v2 = var2.data_ptr<F>() + l * inter;
    } else {
      mu2 = layer_stat<F>(false, mean2, rm2, l, keep);
      v2 = layer_stat<F>(false, var2, rv2, l, keep);
    }
    fold_channels<F>(inter, gamma2.data_ptr<F>(), beta2.data_ptr<F>(), mu2, v2, eps, a2.data(), bb2.data(), is2.data());
    const F* s2 = S ? S + slope_offset(g, l) + c : nullptr;  // BN2's slopes (LeakyReLU / PReLU blocks)
    if (!own && !own_bf16) {  // (ours: per window of lines or samples, below)
      RECORD_FUNCTION("dnf_cpu::bn2_relu", {});
      if (v_float) {
        bn_relu_out<T, F>(Y, M, inter, a2.data(), bb2.data(), v.data_ptr<F>(), s2);
      } else {
        bn_relu_out<T, F>(Y, M, inter, a2.data(), bb2.data(), v.data_ptr<T>(), s2);
      }
    }
    if constexpr (std::is_same_v<T, float>) {
      if (own) {
        const Tensor w = w2[l].contiguous();
        const Conv3x3Weight P = conv3x3_pack_forward(w.data_ptr<float>(), g.k, inter, frame.taps());
        float* Vs = v.data_ptr<float>();
        for (int64_t l0 = 0; l0 < frame.lines(); l0 += window) {
          const int64_t l1 = std::min(frame.lines(), l0 + window);
          const int64_t s0 = std::max<int64_t>(0, l0 - halo), s1 = std::min(frame.lines(), l1 + halo);
          {
            RECORD_FUNCTION("dnf_cpu::bn2_relu", {});
            at::parallel_for(s0, s1, 8, [&](int64_t a, int64_t b) {
              for (int64_t line = a; line < b; ++line)
                bn_relu_rows<T, F>(Y + line * g.W * inter, 0, g.W, inter, a2.data(), bb2.data(),
                                   Vs + ((line - s0) * (g.W + 2) + 1) * inter, s2);
            });
          }
          RECORD_FUNCTION("dnf_cpu::conv3x3", {});
          own_conv3x3_lines(Vs, frame, P, X + l0 * g.W * Ct + c, Ct, l0, l1, s0);
        }
      }
    }
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (own_bf16) {
        const Tensor w = w2[l].to(at::kFloat).contiguous();  // the float32 master (a bfloat16 weight: exact)
        const AmxConvWeight P = amx_conv3x3_pack(w.data_ptr<float>(), g.k, inter, frame.taps());
        T* Vb = v.data_ptr<T>();
        const int64_t sample_lines = g.D * g.H;
        for (int64_t n0 = 0; n0 < g.N; n0 += bframe.N) {
          AmxConvFrame win = bframe;
          win.N = std::min(bframe.N, g.N - n0);
          const T* Yw = Y + n0 * sample_lines * g.W * inter;
          {
            RECORD_FUNCTION("dnf_cpu::bn2_relu", {});
            at::parallel_for(0, win.N * sample_lines, 8, [&](int64_t a, int64_t b) {
              for (int64_t line = a; line < b; ++line)
                bn_relu_rows<T, F>(Yw + line * g.W * inter, 0, g.W, inter, a2.data(), bb2.data(),
                                   Vb + amx_frame_line_row(win, line) * inter, s2);
            });
          }
          RECORD_FUNCTION("dnf_cpu::conv3x3", {});
          amx_conv3x3_frame(Vb, win, P, X + n0 * sample_lines * g.W * Ct + c, Ct);
        }
      }
    }
    if ((own || own_bf16) && mask.has_value() && mask->defined()) {  // our kernels wrote the columns: scaled in place
      Tensor cols = buffer.narrow(1, c, g.k);
      cols.copy_(apply_dropout(cols, mask, l, g.k, p));
    }
    if (!own && !own_bf16) {
      const Tensor W2 = conv3x3_weight(w2[l], buffer.scalar_type(), g.dims, ConvPass::kForward);
      Tensor out = apply_dropout(conv3x3(v, W2, g.dims), mask, l, g.k, p);
      buffer.narrow(1, c, g.k).copy_(out);
    }
    if (training) column_moments<T>(X, M, Ct, c, g.k, mean.data_ptr<F>() + c, var.data_ptr<F>() + c);
  }
}

using ForwardResult = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// slopes: undefined for ReLU (dense_block_forward), the packed LeakyReLU / PReLU slopes otherwise.
ForwardResult forward_entry(const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2,
                            TensorList b2, TensorList w2, TensorList rm1, TensorList rv1, TensorList rm2,
                            TensorList rv2, const c10::optional<Tensor>& mask, double p, bool training, double eps,
                            const Tensor& slopes_in) {
  const BlockGeometry g = check_dense_block_args(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask,
                                                 p, training, eps);
  check_cpu_dtype(input);
  if (slopes_in.defined()) check_block_slopes(slopes_in, g, input);
  const Tensor slopes = slopes_in.defined() ? slopes_in.contiguous() : slopes_in;
  Tensor buffer = empty_cl(g, g.Ct, input.options());
  buffer.narrow(1, 0, g.C0).copy_(input);
  const auto opts = input.options().dtype(stats_dtype(input.scalar_type()));
  Tensor mean = at::empty({training ? g.Ct : 0}, opts), var = at::empty({training ? g.Ct : 0}, opts);
  Tensor mean2 = at::empty({training ? g.L : 0, g.inter}, opts), var2 = at::empty({training ? g.L : 0, g.inter}, opts);
  DNF_DISPATCH_CPU_KERNEL(input.scalar_type(), "dense_block_forward_cpu", [&] {
    forward_impl<scalar_t>(g, buffer, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps,
                           mean, var, mean2, var2, slopes);
  });
  return {buffer, mean, var, mean2, var2};
}

ForwardResult dense_block_forward_cpu(const Tensor& input, TensorList g1, TensorList b1, TensorList w1, TensorList g2,
                                      TensorList b2, TensorList w2, TensorList rm1, TensorList rv1, TensorList rm2,
                                      TensorList rv2, const c10::optional<Tensor>& mask, double p, bool training,
                                      double eps) {
  return forward_entry(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps, Tensor());
}

ForwardResult dense_block_act_forward_cpu(const Tensor& input, TensorList g1, TensorList b1, TensorList w1,
                                          TensorList g2, TensorList b2, TensorList w2, TensorList rm1, TensorList rv1,
                                          TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
                                          bool training, double eps, const Tensor& slopes) {
  return forward_entry(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps, slopes);
}

// The fused 1x1 stage alone (bn_relu_conv1x1 in csrc/ops.cpp): bn_relu_gemm on a channels_last input.
Tensor bn_relu_conv1x1_cpu(const Tensor& input, const Tensor& scale, const Tensor& shift, const Tensor& weight) {
  check_input_4d(input, "input", /*training=*/false);
  check_cpu_dtype(input);
  const int64_t C = input.size(1), dims = input.dim() - 2;
  check_float_tensor(scale, "scale", input, /*bn_tensor=*/true);
  check_float_tensor(shift, "shift", input, /*bn_tensor=*/true);
  check_shape(scale, {C}, "scale");
  check_shape(shift, {C}, "shift");
  check_float_tensor(weight, "weight", input);
  TORCH_CHECK(weight.dim() == input.dim() && weight.size(1) == C, "weight: expected shape [C_out, ", C,
              dims == 3 ? ", 1, 1, 1]" : ", 1, 1]", ", got ", weight.sizes());
  check_shape(weight, conv_weight_shape(weight.size(0), C, 1, dims), "weight");
  TORCH_CHECK(weight.size(0) > 0, "weight: expected at least one output channel (as torch's convolution), got shape ",
              weight.sizes());
  const Tensor X = input.contiguous(cl_format(dims));
  const int64_t M = X.numel() / C, n_out = weight.size(0);
  std::vector<int64_t> shape = input.sizes().vec();
  shape[1] = n_out;
  Tensor out = at::empty(shape, input.options().memory_format(cl_format(dims)));
  DNF_DISPATCH_CPU_KERNEL(input.scalar_type(), "bn_relu_conv1x1_cpu", [&] {
    using F = typename Opmath<scalar_t>::type;
    gemm_engine(input.scalar_type());
    const Tensor a = as_f<F>(scale), b = as_f<F>(shift);
    const Tensor W = weight.contiguous();
    bn_relu_gemm<scalar_t, F>(X.data_ptr<scalar_t>(), M, C, C, a.data_ptr<F>(), b.data_ptr<F>(),
                              W.data_ptr<scalar_t>(), n_out, out.data_ptr<scalar_t>());
  });
  return out;
}

// What a block's backward reads, gathered once after the argument checks.
struct BlockOperands {
  TensorList g1, b1, w1, g2, b2, w2;   // per layer: BN1, conv1 (1x1), BN2, conv2 (3x3) parameters
  TensorList rm1, rv1, rm2, rv2;       // per layer: running statistics (the eval-mode statistics)
  Tensor mean, var, mean2, var2;       // the block's batch statistics (training)
  c10::optional<Tensor> mask;          // dropout mask of the new channels, [N, L*k, ...]
  double drop_rate, eps;
  bool training;
  Tensor slopes;                       // packed LeakyReLU / PReLU slopes (slope_offset); undefined: ReLU
};

// One layer's folded BN maps and 1x1 weight, built once per layer of the backward.
template <typename F>
struct LayerFold {
  int64_t c = 0;                                // the layer's input channels
  std::vector<F> a1, b1, invstd1, a2, b2, invstd2;
  const F* mean1 = nullptr;                     // BN1 / BN2 statistics the layer normalised with
  const F* mean2 = nullptr;
  const F* s1 = nullptr;                        // activation slopes after BN1 / BN2 (nullptr: ReLU)
  const F* s2 = nullptr;
  int64_t slope_off = 0;                        // where s1 starts in the packed slopes
  Tensor gamma1, W1;                            // BN1 scale (its sums feed S2), conv1 in the buffer's dtype
  std::vector<Tensor> keep;                     // owners of the eval statistics' float copies
};

// The backward of a block, layer by layer from the last, in four stages per layer (recompute the
// bottleneck; 3x3 conv backward; BN2 backward sums; 1x1 conv + BN1 backward per tile), then the block
// input's gradient. G: the working gradient of the whole buffer, in the buffer's dtype (a bfloat16 block
// adds each layer's float contribution into bfloat16 G, one rounding per layer, as autograd sums
// torchvision's bfloat16 feature gradients; docs/design.md §7).
template <typename T>
class BlockBackward {
  using F = typename Opmath<T>::type;
  using acc_t = typename Acc<T>::type;

 public:
  BlockBackward(const BlockGeometry& geom, const Tensor& buffer, const Tensor& G, const BlockOperands& op,
                BlockGrads& out, Tensor* grad_slopes = nullptr)
      : geom_(geom), buffer_(buffer), op_(op), out_(out), grad_slopes_(grad_slopes), M_(geom.rows()),
        X_(buffer.data_ptr<T>()),
        G_(G.data_ptr<T>()), f_opts_(buffer.options().dtype(c10::CppTypeToScalarType<F>::value)),
        S1_(geom.Ct, 0), S2_(geom.Ct, 0), shared_invstd_(op.training ? geom.Ct : 0),
        Y_(empty_cl(geom, geom.inter, buffer.options(), OnFree::kUnmap)),
        V_(empty_cl(geom, geom.inter, buffer.options().dtype(v_dtype(geom.dims)), OnFree::kUnmap)),
        dout_(empty_cl(geom, geom.k, buffer.options().dtype(dout_dtype(geom.dims)), OnFree::kUnmap)),
        frame_(conv_frame(geom.N, geom.D, geom.H, geom.W, geom.dims)) {
    if constexpr (std::is_same_v<T, float>) {
      own_input_grad_ = own_conv3x3(frame_, geom.inter, geom.k, ConvPass::kInputGrad);
      own_weight_grad_ = own_conv3x3(frame_, geom.inter, geom.k, ConvPass::kWeightGrad);
      if (own_input_grad_) dout_padded_ = zero_padded_lines(frame_, geom.k);
    }
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      // The input gradient on our AMX kernel (conv3x3_bf16.h): the transposed convolution as a forward one (k
      // inputs, the C_in outputs, taps mirrored) on the output gradient in a frame padded on every side (k
      // channels: the whole batch in one frame), its result rounded to bfloat16 once as oneDNN's is.
      own_bf16_input_grad_ = V_.scalar_type() == at::kBFloat16 && dout_.scalar_type() == at::kBFloat16 &&
                             bf16_conv_compute(geom.dims, ConvPass::kInputGrad) == at::kBFloat16 &&
                             own_bf16_conv3x3(geom.k, geom.inter, ConvPass::kInputGrad, geom.dims);
      if (own_bf16_input_grad_) {
        bframe_ = amx_conv_frame(geom.N, geom.D, geom.H, geom.W, geom.dims);
        dout_frame_ = zero_amx_frame(bframe_, geom.k);
      }
    }
    if (op.slopes.defined()) {
      TORCH_INTERNAL_ASSERT(grad_slopes_ != nullptr);
      *grad_slopes_ = at::zeros({slope_offset(geom, geom.L)}, f_opts_);
    }
    if (op.training) {
      const F* v = op.var.data_ptr<F>();
      for (int64_t j = 0; j < geom.Ct; ++j) shared_invstd_[j] = invstd_from_var<F>(v[j], op.eps);
    }
  }

  // The dtype of the layer's output gradient dout_: T, or float where both 3x3 backward passes of a bfloat16 block
  // compute in float32 (conv3x3.h): its values rounded to bfloat16 and widened again, written so by
  // finalized_columns, so neither pass converts it and the input gradient comes back as float, rounded to
  // bfloat16 where stage 3 reads it (the values the bfloat16 passes would see, no conversion pass of their own).
  static at::ScalarType dout_dtype(int64_t dims) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (bf16_conv_compute(dims, ConvPass::kInputGrad) == at::kFloat &&
          bf16_conv_compute(dims, ConvPass::kWeightGrad) == at::kFloat) {
        return at::kFloat;
      }
    }
    return c10::CppTypeToScalarType<T>::value;
  }

  // The dtype of V_: T, or float where a bfloat16 block's 3x3 weight gradient computes in float32 (conv3x3.h):
  // the recompute writes V's bfloat16 values widened, so the pass needs no widened copy of V (at densenet121's
  // block 1, batch 8, 6.4 MB read and 12.8 MB written per layer). dz, in T, then takes the first half of V_'s
  // bytes (V is dead once the weight gradient is computed: stage 3 recomputes it from Y).
  static at::ScalarType v_dtype(int64_t dims) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (bf16_conv_compute(dims, ConvPass::kWeightGrad) == at::kFloat) return at::kFloat;
    }
    return c10::CppTypeToScalarType<T>::value;
  }
  // dz (stage 3) and dY (stage 4) rows, in T, over V_'s storage.
  T* dz_rows() { return static_cast<T*>(V_.data_ptr()); }

  Tensor run() {
    gemm_engine(buffer_.scalar_type());
    if (std::is_same_v<T, c10::BFloat16>) bf16_conv_compute(geom_.dims, ConvPass::kForward);
    for (int64_t l = geom_.L - 1; l >= 0; --l) {
      const LayerFold<F> f = fold_layer(l);
      recompute_bottleneck(f);
      const std::vector<F> m = conv3x3_backward(l, f);
      gemm1x1_bn1_backward(l, f, dz_rows(), m.data(), m.data() + geom_.inter);
    }
    // The block's input channels: every layer reads them. The layers' working tensors go first (they would
    // coexist with the input gradient at the backward's peak).
    Y_.reset(), V_.reset(), dout_.reset();
    Tensor grad_input = empty_cl(geom_, geom_.C0, buffer_.options());
    finalized_columns(0, geom_.C0, op_.training, grad_input.data_ptr<T>());
    return grad_input;
  }

 private:
  LayerFold<F> fold_layer(int64_t l) {
    const int64_t inter = geom_.inter;
    const bool training = op_.training;
    LayerFold<F> f;
    f.c = geom_.in_channels(l);
    f.a1.resize(f.c), f.b1.resize(f.c), f.invstd1.resize(f.c);
    f.a2.resize(inter), f.b2.resize(inter), f.invstd2.resize(inter);
    f.gamma1 = op_.g1[l].contiguous();
    const Tensor beta1 = op_.b1[l].contiguous(), gamma2 = op_.g2[l].contiguous(), beta2 = op_.b2[l].contiguous();
    f.W1 = weight_in(op_.w1[l], buffer_.scalar_type());  // float32 master weights: cast here
    f.mean1 = layer_stat<F>(training, op_.mean, op_.rm1, l, f.keep);
    const Tensor& gamma1 = f.gamma1;
    fold_channels<F>(f.c, gamma1.data_ptr<F>(), beta1.data_ptr<F>(), f.mean1,
                     layer_stat<F>(training, op_.var, op_.rv1, l, f.keep), op_.eps, f.a1.data(), f.b1.data(),
                     f.invstd1.data());
    f.mean2 = training ? op_.mean2.data_ptr<F>() + l * inter : layer_stat<F>(false, op_.mean2, op_.rm2, l, f.keep);
    const F* var2 = training ? op_.var2.data_ptr<F>() + l * inter
                             : layer_stat<F>(false, op_.var2, op_.rv2, l, f.keep);
    fold_channels<F>(inter, gamma2.data_ptr<F>(), beta2.data_ptr<F>(), f.mean2, var2, op_.eps, f.a2.data(),
                     f.b2.data(), f.invstd2.data());
    if (op_.slopes.defined()) {
      f.slope_off = slope_offset(geom_, l);
      f.s1 = op_.slopes.data_ptr<F>() + f.slope_off;
      f.s2 = f.s1 + f.c;
    }
    return f;
  }

  // Stage 1. Recompute the bottleneck: Y = W1 * relu(bn1(X)) into Y_, and V = relu(bn2(Y)) into V_ on each tile.
  void recompute_bottleneck(const LayerFold<F>& f) {
    RECORD_FUNCTION("dnf_cpu::bn1_relu_gemm", {});
    const Tensor& W1 = f.W1;
    if (V_.scalar_type() == buffer_.scalar_type()) {
      bn_relu_gemm<T, F>(X_, M_, geom_.Ct, f.c, f.a1.data(), f.b1.data(), W1.data_ptr<T>(), geom_.inter,
                         Y_.data_ptr<T>(), f.a2.data(), f.b2.data(), V_.data_ptr<T>(), f.s1, f.s2);
    } else {  // V widened (v_dtype)
      bn_relu_gemm_into<T, F, F>(X_, M_, geom_.Ct, f.c, f.a1.data(), f.b1.data(), W1.data_ptr<T>(), geom_.inter,
                                 Y_.data_ptr<T>(), f.a2.data(), f.b2.data(), V_.data_ptr<F>(), f.s1, f.s2);
    }
  }

  // Stage 2. The layer's output gradient (its channels are final: every reader is done), dense, in T (or as
  // T widened: dout_dtype), then the 3x3 conv backward: the weight gradient from V, then the input gradient dV.
  // On oneDNN (through ATen) dV comes a few samples at a time (kInputGradChunkBytes), each chunk handed to stage 3,
  // which writes dz over V's rows: V's storage becomes dz's, and dV never exists whole (docs/design.md §11); on our
  // kernel (conv3x3_own.h) dV is written over V's rows and stage 3 turns it into dz in place.
  std::vector<F> conv3x3_backward(int64_t l, const LayerFold<F>& f) {
    const int64_t c = geom_.in_channels(l);
    const bool fin = op_.training && block_channels_have_reader(l, geom_.L);
    if (dout_.scalar_type() == buffer_.scalar_type()) {
      finalized_columns(c, geom_.k, fin, dout_.data_ptr<T>());
    } else {
      finalized_columns(c, geom_.k, fin, dout_.data_ptr<F>());
    }
    // (a float dout_ dropped out in T, as the bfloat16 path rounds the scaled gradient)
    const bool wide = dout_.scalar_type() != buffer_.scalar_type();
    const bool drop = op_.mask.has_value() && op_.mask->defined();
    const Tensor dout = wide && drop
        ? apply_dropout(dout_.to(buffer_.scalar_type()), op_.mask, l, geom_.k, op_.drop_rate).to(dout_.scalar_type())
        : apply_dropout(dout_, op_.mask, l, geom_.k, op_.drop_rate);
    // oneDNN's weights, in each pass's dtype (float32 master weights of a bfloat16 block are rounded here) and the
    // activations' layout, once per layer (conv3x3.h); our kernel packs its own.
    const at::ScalarType st = buffer_.scalar_type();
    const Tensor W2 = own_input_grad_ || own_bf16_input_grad_
        ? Tensor() : conv3x3_weight(op_.w2[l], st, geom_.dims, ConvPass::kInputGrad);
    const Tensor d = own_input_grad_ || own_weight_grad_ || own_bf16_input_grad_
        ? dout.contiguous(cl_format(geom_.dims)) : Tensor();
    // The weight gradient first: the input gradient's stage 3 writes dz over V_.
    if (own_weight_grad_) {  // our kernel (conv3x3_own.h) on V_ and dout's dense rows
      RECORD_FUNCTION("dnf_cpu::conv3x3_weight_grad", {});
      out_.w2[l] = at::empty(op_.w2[l].sizes(), f_opts_);
      conv3x3_f32_weight_grad(V_.data_ptr<float>(), geom_.inter, d.data_ptr<float>(), geom_.k, frame_,
                              out_.w2[l].data_ptr<float>());
    } else {
      const bool same = W2.defined() &&
                        (st != at::kBFloat16 || bf16_conv_compute(geom_.dims, ConvPass::kWeightGrad) ==
                                                    bf16_conv_compute(geom_.dims, ConvPass::kInputGrad));
      const Tensor W2w = same ? W2 : conv3x3_weight(op_.w2[l], st, geom_.dims, ConvPass::kWeightGrad);
      // in the weight's own dtype and layout, as the fake kernel declares (a bfloat16 block's pass may compute in
      // float32: conv3x3.h)
      out_.w2[l] = conv3x3_weight_grad(dout, V_, W2w, geom_.dims).to(op_.w2[l].scalar_type()).contiguous();
    }
    if constexpr (std::is_same_v<T, float>) {
      if (own_input_grad_) {
        // dV over V_ (stage 3 recomputes V from Y), from dout padded, then dz over dV row by row
        RECORD_FUNCTION("dnf_cpu::conv3x3_input_grad", {});
        const Tensor w = op_.w2[l].contiguous();
        pad_lines(d.data_ptr<float>(), frame_, geom_.k, dout_padded_.data_ptr<float>());
        own_conv3x3_forward(dout_padded_.data_ptr<float>(), frame_,
                            conv3x3_pack_input_grad(w.data_ptr<float>(), geom_.k, geom_.inter, frame_.taps()),
                            V_.data_ptr<float>(), geom_.inter);
        ThreadPartials<acc_t> partials((f.s2 ? 3 : 2) * geom_.inter);
        bn2_backward_rows(f, static_cast<const float*>(V_.data_ptr<float>()), 0, M_, partials);
        return bn2_backward_means(l, f, partials);
      }
    }
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (own_bf16_input_grad_) {
        // dV over V_ (stage 3 recomputes V from Y), then dz over dV row by row, as the float32 kernel's path
        RECORD_FUNCTION("dnf_cpu::conv3x3_input_grad", {});
        T* fp = dout_frame_.data_ptr<T>();
        const int64_t k = geom_.k;
        fill_amx_frame(d.data_ptr<T>(), bframe_, k, fp);
        const Tensor w = op_.w2[l].to(at::kFloat).contiguous();  // the float32 master (a bfloat16 weight: exact)
        amx_conv3x3_frame(fp, bframe_, amx_conv3x3_pack_input_grad(w.data_ptr<float>(), k, geom_.inter, frame_.taps()),
                          V_.data_ptr<T>(), geom_.inter);
        ThreadPartials<acc_t> partials((f.s2 ? 3 : 2) * geom_.inter);
        bn2_backward_rows(f, static_cast<const T*>(V_.data_ptr<T>()), 0, M_, partials);
        return bn2_backward_means(l, f, partials);
      }
    }
    const int64_t sample_rows = M_ / geom_.N;
    const int64_t lead_spatial = geom_.dims == 3 ? geom_.D * geom_.H : geom_.H * geom_.W;
    // (chunks sized by T: a float pass's chunk is float, as its result was before the cast to T)
    const int64_t per_chunk = input_grad_chunk(geom_.N, sample_rows * geom_.inter * int64_t(sizeof(T)),
                                               geom_.k * lead_spatial > 20480);
    // the sums of dz and dz*xhat2, and with slopes of the slope gradient terms (leaky_slope_grad)
    ThreadPartials<acc_t> partials((f.s2 ? 3 : 2) * geom_.inter);
    for (int64_t n0 = 0; n0 < geom_.N; n0 += per_chunk) {
      const int64_t nb = std::min(per_chunk, geom_.N - n0);
      const Tensor dv = conv3x3_input_grad(dout.narrow(0, n0, nb), W2, geom_.dims).contiguous(cl_format(geom_.dims));
      if (dv.scalar_type() == buffer_.scalar_type()) {
        bn2_backward_rows(f, dv.data_ptr<T>(), n0 * sample_rows, (n0 + nb) * sample_rows, partials);
      } else {
        bn2_backward_rows(f, dv.data_ptr<F>(), n0 * sample_rows, (n0 + nb) * sample_rows, partials);
      }
    }
    return bn2_backward_means(l, f, partials);
  }

  // Stage 3. BN2 + ReLU backward, first half, on rows [r0, r1) (dV: those rows of the input gradient):
  // V_'s rows become dz = relu'(V) dV (rounded to T), and the per-channel sums of dz and dz*xhat2 (the BN2
  // parameter gradients) are added to `partials`, V = relu(bn2(Y)) recomputed exactly as stage 1 rounded it.
  // dV: T, or the float input gradient of a float32 pass (dout_dtype), rounded to T as it is read.
  template <typename D>
  void bn2_backward_rows(const LayerFold<F>& f, const D* dV, int64_t r0, int64_t r1, ThreadPartials<acc_t>& partials) {
    RECORD_FUNCTION("dnf_cpu::bn2_backward", {});
    const int64_t inter = geom_.inter;
    const T* Y = Y_.data_ptr<T>();
    T* dZ = dz_rows();
    const F *a2 = f.a2.data(), *b2 = f.b2.data(), *mu2 = f.mean2, *is2 = f.invstd2.data(), *s2 = f.s2;
    at::parallel_for(r0, r1, 256, [&](int64_t t0, int64_t t1) {
      // Sums over at most 256 rows, then added to the thread's partials.
      std::vector<acc_t> ts(partials.width);
      acc_t* ts1 = ts.data();
      acc_t* ts2 = ts.data() + inter;
      acc_t* ts3 = ts.data() + (s2 ? 2 * inter : 0);
      acc_t* s = partials.mine();
      for (int64_t q0 = t0; q0 < t1; q0 += 256) {
        std::fill(ts.begin(), ts.end(), acc_t(0));
        for (int64_t r = q0; r < std::min(t1, q0 + 256); ++r) {
          const T* yr = Y + r * inter;
          const D* dvr = dV + (r - r0) * inter;
          T* dzr = dZ + r * inter;
          if (s2 == nullptr) {
            // relu' needs only the sign of V = relu(bn2(Y)) as stage 1 stored it: for T = bfloat16 a value
            // <= kRoundsToZero rounds to 0 (NaN passes the gradient, as relu_grad does), so V is not rounded
            // here; dz is dV rounded to T once, the value a T pass would have seen (read_as_stored), and summed
            // as stored.
            DNF_SIMD for (int64_t j = 0; j < inter; ++j) {
              const F yj = to_f<F>(yr[j]);
              const F vj = relu<F>(yj * a2[j] + b2[j]);
              const F dz = to_f<F>(from_f<T>(vj <= kRoundsToZero<T, F> ? F(0) : to_f<F>(dvr[j])));
              dzr[j] = from_f<T>(dz);  // exact
              ts1[j] += dz;
              ts2[j] += dz * (yj - mu2[j]) * is2[j];
            }
          } else {
            // LeakyReLU / PReLU: the gradient and the slope's follow the pre-activation z (torch's rule)
            DNF_SIMD for (int64_t j = 0; j < inter; ++j) {
              const F yj = to_f<F>(yr[j]);
              const F zj = yj * a2[j] + b2[j];
              const F dvj = read_as_stored<T, F>(dvr[j]);
              const F dz = leaky_grad<F>(zj, s2[j], dvj);
              dzr[j] = from_f<T>(dz);
              ts1[j] += dz;
              ts2[j] += dz * (yj - mu2[j]) * is2[j];
              ts3[j] += leaky_slope_grad<F>(zj, dvj);
            }
          }
        }
        for (int64_t j = 0; j < partials.width; ++j) s[j] += ts[j];
      }
    });
  }

  // Stage 3, the sums' end: the BN2 parameter gradients, and the sums' means [m1 (inter), m2 (inter)] (zeros in
  // eval) for the second half (dz -> dY), which runs on each tile of stage 4.
  std::vector<F> bn2_backward_means(int64_t l, const LayerFold<F>& f, const ThreadPartials<acc_t>& partials) {
    const int64_t inter = geom_.inter;
    std::vector<acc_t> sums(partials.width);
    partials.reduce_into(sums.data());
    if (f.s2 != nullptr) {
      F* ds2 = grad_slopes_->data_ptr<F>() + f.slope_off + f.c;
      for (int64_t j = 0; j < inter; ++j) ds2[j] = static_cast<F>(sums[2 * inter + j]);
    }
    out_.b2[l] = at::empty({inter}, f_opts_);
    out_.g2[l] = at::empty({inter}, f_opts_);
    std::vector<F> means(2 * inter);
    for (int64_t j = 0; j < inter; ++j) {
      out_.b2[l].data_ptr<F>()[j] = static_cast<F>(sums[j]);
      out_.g2[l].data_ptr<F>()[j] = static_cast<F>(sums[inter + j]);
      means[j] = op_.training ? static_cast<F>(sums[j] / M_) : F(0);
      means[inter + j] = op_.training ? static_cast<F>(sums[inter + j] / M_) : F(0);
    }
    return means;
  }

  // Stage 4. Per tile of rows: dY from dz (BN2 backward, second half, with the means m1, m2 of stage 3),
  // then the 1x1 conv + BN1/ReLU backward with the recomputed input tile U: dW1 += dY^T U, dU = dY W1
  // masked by U > 0, G[:, :c] += a1*dU, and the per-channel sums of dU and dU*xhat1 (the BN1 parameter
  // gradients, and the layer's share of the merged finalisation S1, S2). A bfloat16 stage computed in float32
  // (bf16_gemm_compute()) multiplies the same bfloat16 values of U, dY and W1 widened to float (the products of
  // bfloat16 values are exact in float: only the order of the float sums differs).
  void gemm1x1_bn1_backward(int64_t l, const LayerFold<F>& f, T* dV, const F* m1, const F* m2) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      if (bf16_gemm_compute() == at::kFloat) return gemm1x1_bn1_backward_as<F>(l, f, dV, m1, m2);
    }
    gemm1x1_bn1_backward_as<T>(l, f, dV, m1, m2);
  }

  // Stage 4 with the products' operands of type Op (T, or F for a bfloat16 stage computed in float32).
  template <typename Op>
  void gemm1x1_bn1_backward_as(int64_t l, const LayerFold<F>& f, T* dV, const F* m1, const F* m2) {
    RECORD_FUNCTION("dnf_cpu::gemm1x1_bn1_backward", {});
    constexpr bool kInPlace = std::is_same_v<Op, T>;  // dY written over dz (V_'s rows) as the products' operand
    const int64_t c = f.c, inter = geom_.inter, Ct = geom_.Ct;
    const bool training = op_.training;
    const T* Y = Y_.data_ptr<T>();
    const T* X = X_;
    T* G = G_;
    const F *a1 = f.a1.data(), *b1 = f.b1.data(), *mu1 = f.mean1, *is1 = f.invstd1.data(), *s1 = f.s1;
    const F *a2 = f.a2.data(), *mu2 = f.mean2, *is2 = f.invstd2.data();
    const int64_t nsums = s1 ? 3 : 2;  // sums of dU, dU*xhat1, and with slopes the slope gradient terms
    const Tensor& W1t = f.W1;
    std::vector<Op> W1wide;  // W1 widened once per layer (a bfloat16 stage computed in float32)
    const Op* W1 = nullptr;
    if constexpr (kInPlace) {
      W1 = W1t.data_ptr<T>();
    } else {
      W1wide = widened(W1t.data_ptr<T>(), inter * c);
      W1 = W1wide.data();
    }
    const int64_t tr = tile_rows(std::max(c, inter), sizeof(F));
    const int64_t ntiles = (M_ + tr - 1) / tr;
    // A float32 block's products on our AVX-512 kernel where the forward's run there (cpu/f32_gemm.h): W1 packed
    // once per layer.
    F32Weight W1p;
    const bool own = std::is_same_v<Op, float> && std::is_same_v<T, float> && use_f32_kernel() &&
                     cpu_switch("DNF_CPU_F32_BACKWARD", {"0", "1"}) != "0";
    if constexpr (std::is_same_v<Op, float>) {
      if (own) W1p = f32_pack_kn(W1, inter, c);
    }
    ThreadPartials<F> dw_partials(inter * c);
    ThreadPartials<acc_t> sum_partials(nsums * c);
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<Op> U(tr * c), dYt(kInPlace ? 0 : tr * inter);
      std::vector<F> dU(tr * c), ts(nsums * c);
      F* dw = dw_partials.mine();
      acc_t* s = sum_partials.mine();
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * tr, nr = std::min(tr, M_ - r0);
        Op* dY = dYt.data();
        if constexpr (kInPlace) dY = dV + r0 * inter;
        for (int64_t r = r0; r < r0 + nr; ++r) {
          const T* yr = Y + r * inter;
          const T* dvr = dV + r * inter;
          Op* dyr = dY + (r - r0) * inter;
          if (training) {
            DNF_SIMD for (int64_t j = 0; j < inter; ++j) {
              const F xhat = (to_f<F>(yr[j]) - mu2[j]) * is2[j];
              dyr[j] = stored_as<T, Op>(bn_backward_train<F>(to_f<F>(dvr[j]), xhat, a2[j], m1[j], m2[j]));
            }
          } else {
            // Eval: dY = a*dz exactly (no xhat term, so a non-finite Y does not poison dY).
            DNF_SIMD for (int64_t j = 0; j < inter; ++j) dyr[j] = stored_as<T, Op>(a2[j] * to_f<F>(dvr[j]));
          }
        }
        bn_relu_tile<T, F>(X, Ct, r0, nr, c, a1, b1, U.data(), -1, s1);
        if constexpr (std::is_same_v<Op, float> && std::is_same_v<F, float>) {
          if (own) {
            f32_gemm_tn_acc(dY, U.data(), nr, inter, c, dw);
            f32_gemm_rows(dY, nr, W1p, dU.data());
          }
        }
        if (!own) gemm1x1_backward_products<Op, F>(U.data(), dY, W1, nr, c, inter, dw, dU.data());
        std::fill(ts.begin(), ts.end(), F(0));
        F* ts1 = ts.data();
        F* ts2 = ts.data() + c;
        F* ts3 = ts.data() + (s1 ? 2 * c : 0);
        for (int64_t r = 0; r < nr; ++r) {
          const T* xr = X + (r0 + r) * Ct;
          T* gr = G + (r0 + r) * Ct;
          const Op* ur = U.data() + r * c;
          const F* dur = dU.data() + r * c;
          if (s1 == nullptr) {
            DNF_SIMD for (int64_t j = 0; j < c; ++j) {
              const F d = relu_grad<F>(to_f<F>(ur[j]), dur[j]);
              ts1[j] += d;
              ts2[j] += d * (to_f<F>(xr[j]) - mu1[j]) * is1[j];
              gr[j] = from_f<T>(to_f<F>(gr[j]) + a1[j] * d);
            }
          } else {
            // LeakyReLU / PReLU: by the pre-activation z, recomputed in F as the prologue computed it
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
        for (int64_t j = 0; j < nsums * c; ++j) s[j] += ts[j];
      }
    });
    out_.w1[l] = at::empty(conv_weight_shape(inter, c, 1, geom_.dims), op_.w1[l].options());
    if (out_.w1[l].scalar_type() == buffer_.scalar_type()) {
      dw_partials.reduce_into(out_.w1[l].data_ptr<T>());
    } else {
      dw_partials.reduce_into(out_.w1[l].data_ptr<F>());  // float32 master weight of a bfloat16 block
    }
    std::vector<acc_t> sums(nsums * c);
    sum_partials.reduce_into(sums.data());
    if (s1 != nullptr) {
      F* ds1 = grad_slopes_->data_ptr<F>() + f.slope_off;
      for (int64_t j = 0; j < c; ++j) ds1[j] = static_cast<F>(sums[2 * c + j]);
    }
    out_.b1[l] = at::empty({c}, f_opts_);
    out_.g1[l] = at::empty({c}, f_opts_);
    const Tensor& gamma1 = f.gamma1;
    const F* gamma = gamma1.data_ptr<F>();
    for (int64_t j = 0; j < c; ++j) {
      out_.b1[l].data_ptr<F>()[j] = static_cast<F>(sums[j]);
      out_.g1[l].data_ptr<F>()[j] = static_cast<F>(sums[c + j]);
      S1_[j] += gamma[j] * sums[j];
      S2_[j] += gamma[j] * sums[c + j];
    }
  }

  // Columns [c0, c0+width) of G, finalised when every BN reader of theirs is done (training, and the
  // channels have a reader), written as T into the dense [rows, width] matrix `dst`: a layer's output
  // gradient (the 3x3 backward's operand) or the block's input gradient. G itself is not updated:
  // nothing reads these columns afterwards. The last layer's channels have no reader in the block:
  // passed through as given (0 * a non-finite xhat must not turn their gradient into NaN).
  // dst: T, or F holding the T values widened (a float dout_, dout_dtype).
  template <typename O>
  void finalized_columns(int64_t c0, int64_t width, bool finalize, O* dst) {
    RECORD_FUNCTION("dnf_cpu::finalize", {});
    const int64_t Ct = geom_.Ct, M = M_;
    const F* mu = op_.training ? op_.mean.data_ptr<F>() + c0 : nullptr;
    const F* is = op_.training ? shared_invstd_.data() + c0 : nullptr;
    std::vector<F> s1(width), s2(width), isn(width);
    for (int64_t j = 0; j < width && finalize; ++j) {
      s1[j] = F(S1_[c0 + j]);
      s2[j] = F(S2_[c0 + j]);
      isn[j] = is[j] / F(M);
    }
    const T* X = X_;
    const T* G = G_;
    at::parallel_for(0, M, 256, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* xr = X + r * Ct + c0;
        const T* gr = G + r * Ct + c0;
        O* dr = dst + r * width;
        if (finalize) {
          DNF_SIMD for (int64_t j = 0; j < width; ++j) {
            const F xhat = (to_f<F>(xr[j]) - mu[j]) * is[j];
            dr[j] = stored_as<T, O>(finalize_grad<F>(to_f<F>(gr[j]), xhat, isn[j], s1[j], s2[j]));
          }
        } else if constexpr (std::is_same_v<O, T>) {
          std::copy(gr, gr + width, dr);
        } else {
          DNF_SIMD for (int64_t j = 0; j < width; ++j) dr[j] = to_f<O>(gr[j]);
        }
      }
    });
  }

  const BlockGeometry& geom_;
  const Tensor& buffer_;
  const BlockOperands& op_;
  BlockGrads& out_;
  Tensor* grad_slopes_;  // the slopes' gradient (with slopes), filled layer by layer
  const int64_t M_;
  const T* X_;
  T* G_;
  const at::TensorOptions f_opts_;
  // Merged BN1 backward of all readers of a channel: S1 = sum gamma*dbeta, S2 = sum gamma*dgamma.
  std::vector<acc_t> S1_, S2_;
  std::vector<F> shared_invstd_;  // of the block's batch statistics (training)
  // The layer's working tensors, allocated once per block and reused by every layer, unmapped when the block's
  // backward returns (OnFree::kUnmap):
  Tensor Y_;     // the recomputed bottleneck [rows, inter], as the forward rounded it
  Tensor V_;     // V = relu(bn2(Y)) [rows, inter] for the 3x3 weight gradient (v_dtype), then dz and dY in T over it
  Tensor dout_;  // the layer's output gradient [rows, k] (T, or float: dout_dtype)
  // A float32 block whose 3x3 backward passes run on our kernel (conv3x3_own.h): which do, and the output gradient
  // in the padded frame the input gradient's kernel reads.
  ConvFrame frame_;
  bool own_input_grad_ = false, own_weight_grad_ = false, own_bf16_input_grad_ = false;
  Tensor dout_padded_;
  AmxConvFrame bframe_;  // the bfloat16 input gradient's frame (own_bf16_input_grad_) and its k-channel buffer
  Tensor dout_frame_;
};

// Seconds of a bfloat16 block's 1x1 stage computed in float32 (fp32) or in bfloat16, for gemm_engine.cpp's
// choice (bf16_gemm_compute()): a densenet121 layer of block 3 at batch 8 (1568 rows, 512 -> 128 channels), the
// forward product with its BN-ReLU prologue and V (the backward's recompute), then, per tile on the threads, the
// backward's prologue and its two products. The best of three runs after a warm-up.
double time_bf16_1x1_stage(bool fp32) {
  using B = c10::BFloat16;
  const int64_t M = 1568, c = 512, n = 128;
  const std::vector<B> X(M * c, B(0.25f)), W(n * c, B(0.03f)), dY(M * n, B(0.01f));
  const std::vector<float> a(c, 0.5f), b(c, 0.1f), a2(n, 0.5f), b2(n, 0.1f);
  std::vector<B> Y(M * n), V(M * n);
  const int64_t tr = tile_rows(std::max(c, n), sizeof(float)), ntiles = (M + tr - 1) / tr;
  auto backward = [&](auto op) {  // op: a value of the products' operand type
    using Op = decltype(op);
    std::vector<Op> Wop(n * c), dYop(tr * n);
    for (int64_t i = 0; i < n * c; ++i) Wop[i] = from_f<Op>(to_f<float>(W[i]));
    for (int64_t i = 0; i < tr * n; ++i) dYop[i] = from_f<Op>(to_f<float>(dY[i]));
    ThreadPartials<float> dw(n * c);
    at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<Op> U(tr * c);
      std::vector<float> dU(tr * c);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t nr = std::min(tr, M - t * tr);
        bn_relu_tile<B, float>(X.data(), c, t * tr, nr, c, a.data(), b.data(), U.data());
        gemm1x1_backward_products<Op, float>(U.data(), dYop.data(), Wop.data(), nr, c, n, dw.mine(), dU.data());
      }
    });
  };
  double best = 1e30;
  for (int rep = 0; rep < 4; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    if (fp32) {
      bn_relu_gemm_widened(X.data(), M, c, c, a.data(), b.data(), W.data(), n, Y.data(), a2.data(), b2.data(),
                           V.data());
      backward(0.0f);
    } else {
      bn_relu_gemm_stored<B, float>(X.data(), M, c, c, a.data(), b.data(), W.data(), n, Y.data(), a2.data(), b2.data(),
                                    V.data());
      backward(B(0.0f));
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (rep > 0) best = std::min(best, secs);  // the first pays for first touch
  }
  return best;
}

using BackwardResult = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
                                  std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>>;

// reuse_grad: grad_buffer is the working gradient G itself, updated in place (dense_block_backward_inplace:
// the caller hands over a gradient nothing else reads, so no second block-sized tensor exists at the peak).
BackwardResult backward_entry(const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean, const Tensor& var,
                              const Tensor& mean2, const Tensor& var2, TensorList g1, TensorList b1, TensorList w1,
                              TensorList g2, TensorList b2, TensorList w2, TensorList rm1, TensorList rv1,
                              TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
                              bool training, double eps, int64_t num_input_features, bool reuse_grad,
                              const Tensor& slopes = Tensor(), Tensor* grad_slopes = nullptr) {
  const BlockGeometry g = check_dense_block_backward_args(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2,
                                                          b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps,
                                                          num_input_features);
  check_cpu_dtype(buffer);
  if (slopes.defined()) check_block_slopes(slopes, g, buffer);
  const Tensor X = buffer.contiguous(cl_format(g.dims));
  // The working gradient, in the buffer's dtype (BlockBackward).
  const at::ScalarType gt = buffer.scalar_type();
  Tensor G;
  if (reuse_grad) {
    TORCH_CHECK(grad_buffer.scalar_type() == gt && grad_buffer.is_contiguous(cl_format(g.dims)),
                "grad_buffer: expected a ", gt, " ", g.dims == 3 ? "channels_last_3d" : "channels_last",
                " tensor to update in place (dense_block_backward_inplace), got ", grad_buffer.scalar_type(),
                " with strides ", grad_buffer.strides());
    G = grad_buffer;
  } else {
    G = empty_cl(g, g.Ct, buffer.options().dtype(gt));
    G.copy_(grad_buffer);
  }
  const BlockOperands op{g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2,
                         mean.contiguous(), var.contiguous(), mean2.contiguous(), var2.contiguous(),
                         mask, p, eps, training, slopes.defined() ? slopes.contiguous() : slopes};
  BlockGrads out(g.L);
  Tensor grad_input;
  DNF_DISPATCH_CPU_KERNEL(buffer.scalar_type(), "dense_block_backward_cpu", [&] {
    grad_input = BlockBackward<scalar_t>(g, X, G, op, out, grad_slopes).run();
  });
  return {grad_input, out.g1, out.b1, out.w1, out.g2, out.b2, out.w2};
}

BackwardResult dense_block_backward_cpu(const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean,
                                        const Tensor& var, const Tensor& mean2, const Tensor& var2, TensorList g1,
                                        TensorList b1, TensorList w1, TensorList g2, TensorList b2, TensorList w2,
                                        TensorList rm1, TensorList rv1, TensorList rm2, TensorList rv2,
                                        const c10::optional<Tensor>& mask, double p, bool training, double eps,
                                        int64_t num_input_features) {
  return backward_entry(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask,
                        p, training, eps, num_input_features, /*reuse_grad=*/false);
}

BackwardResult dense_block_backward_inplace_cpu(const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean,
                                                const Tensor& var, const Tensor& mean2, const Tensor& var2,
                                                TensorList g1, TensorList b1, TensorList w1, TensorList g2,
                                                TensorList b2, TensorList w2, TensorList rm1, TensorList rv1,
                                                TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask,
                                                double p, bool training, double eps, int64_t num_input_features) {
  return backward_entry(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask,
                        p, training, eps, num_input_features, /*reuse_grad=*/true);
}

// The backward of dense_block_act_forward: dense_block_backward's results and the packed slopes' gradient.
std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>, std::vector<Tensor>,
           std::vector<Tensor>, std::vector<Tensor>, Tensor>
dense_block_act_backward_cpu(const Tensor& grad_buffer, const Tensor& buffer, const Tensor& mean, const Tensor& var,
                             const Tensor& mean2, const Tensor& var2, TensorList g1, TensorList b1, TensorList w1,
                             TensorList g2, TensorList b2, TensorList w2, TensorList rm1, TensorList rv1,
                             TensorList rm2, TensorList rv2, const c10::optional<Tensor>& mask, double p,
                             bool training, double eps, int64_t num_input_features, const Tensor& slopes) {
  TORCH_CHECK(slopes.defined(), "slopes: expected a tensor, got None");
  Tensor grad_slopes;
  auto [gi, dg1, db1, dw1, dg2, db2, dw2] =
      backward_entry(grad_buffer, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p,
                     training, eps, num_input_features, /*reuse_grad=*/false, slopes, &grad_slopes);
  return {gi, dg1, db1, dw1, dg2, db2, dw2, grad_slopes};
}

}  // namespace dnf::cpu::DNF_ISA

#ifdef DNF_ISA_REGISTERS
namespace dnf::cpu {

DNF_DECLARE_ISA_VARIANTS(dense_block_forward_cpu)
DNF_DECLARE_ISA_VARIANTS(dense_block_backward_cpu)
DNF_DECLARE_ISA_VARIANTS(dense_block_backward_inplace_cpu)
DNF_DECLARE_ISA_VARIANTS(bn_relu_conv1x1_cpu)
DNF_DECLARE_ISA_VARIANTS(dense_block_act_forward_cpu)
DNF_DECLARE_ISA_VARIANTS(dense_block_act_backward_cpu)
DNF_DECLARE_ISA_VARIANTS(time_bf16_1x1_stage)

// The bfloat16 1x1 stage's timing on the registered ISA build (gemm_engine.cpp: bf16_gemm_compute()).
double time_bf16_1x1_stage(bool fp32) { return DNF_PICK_ISA(time_bf16_1x1_stage)(fp32); }

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("dense_block_forward", DNF_PICK_ISA(dense_block_forward_cpu));
  m.impl("dense_block_backward", DNF_PICK_ISA(dense_block_backward_cpu));
  m.impl("dense_block_backward_inplace", DNF_PICK_ISA(dense_block_backward_inplace_cpu));
  m.impl("bn_relu_conv1x1", DNF_PICK_ISA(bn_relu_conv1x1_cpu));
  m.impl("dense_block_act_forward", DNF_PICK_ISA(dense_block_act_forward_cpu));
  m.impl("dense_block_act_backward", DNF_PICK_ISA(dense_block_act_backward_cpu));
}

}  // namespace dnf::cpu
#endif
