// Argument validation shared by every backend of the dense-block operators. Messages name the
// argument, the expected and the actual value, like PyTorch's own operators.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <limits>
#include <vector>

namespace dnf {

// Geometry of a dense block: the buffer holds Ct = C0 + L*k channels, layer l reads the prefix
// [0, C0 + l*k), its bottleneck has `inter` = bn_size*k channels. `dims` spatial dimensions: 2
// ([N, C, H, W], D = 1) or 3 ([N, C, D, H, W]); the block math only sees rows = N*D*H*W.
struct BlockGeometry {
  int64_t N, C0, H, W, L, k, inter, Ct;
  int64_t D = 1, dims = 2;
  int64_t rows() const { return N * D * H * W; }
  int64_t in_channels(int64_t l) const { return C0 + l * k; }
  // Shape of a [N, C, (D,) H, W] activation of the block.
  std::vector<int64_t> shape(int64_t C) const {
    return dims == 3 ? std::vector<int64_t>{N, C, D, H, W} : std::vector<int64_t>{N, C, H, W};
  }
};

// Shape of a conv weight [out, in, kernel x dims].
inline std::vector<int64_t> conv_weight_shape(int64_t out, int64_t in, int64_t kernel, int64_t dims) {
  std::vector<int64_t> s{out, in};
  s.insert(s.end(), dims, kernel);
  return s;
}

// dtype of BN parameters, running and batch statistics for an input dtype: float32 for the
// half-precision dtypes (BN runs in fp32 under autocast), the input's own dtype otherwise.
inline at::ScalarType stats_dtype(at::ScalarType input) {
  return (input == at::kHalf || input == at::kBFloat16) ? at::kFloat : input;
}

// conv_weight: a dense block's conv weight, which for a CPU bfloat16 input may also be the float32 master
// weight that the CPU kernels cast per layer (autograd then saves no bfloat16 copy of every weight;
// docs/design.md §7).
inline void check_float_tensor(const at::Tensor& t, const char* name, const at::Tensor& ref,
                               bool bn_tensor = false, bool conv_weight = false) {
  TORCH_CHECK(t.defined(), name, ": expected a tensor, got None");
  const at::ScalarType want = bn_tensor ? stats_dtype(ref.scalar_type()) : ref.scalar_type();
  // A BN tensor may also have the input's own dtype (a model converted with .half()/.bfloat16()): the
  // kernels then still compute BN in stats_dtype, as torch's batch_norm does for such a model.
  const bool model_dtype_bn = bn_tensor && t.scalar_type() == ref.scalar_type();
  const bool master_allowed = conv_weight && ref.device().is_cpu() && ref.scalar_type() == at::kBFloat16;
  const bool master = master_allowed && t.scalar_type() == at::kFloat;
  TORCH_CHECK(t.scalar_type() == want || model_dtype_bn || master, name, ": expected dtype ", want,
              bn_tensor ? " (the BatchNorm dtype for input's dtype) or input's dtype" : " (the dtype of input)",
              master_allowed ? " or Float" : "", ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(),
              " (the device of input), got ", t.device());
}

inline void check_conv_weight(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  check_float_tensor(t, name, ref, /*bn_tensor=*/false, /*conv_weight=*/true);
}

inline void check_shape(const at::Tensor& t, at::IntArrayRef expected, const std::string& name) {
  TORCH_CHECK(t.sizes().equals(expected), name, ": expected shape ", expected, ", got ", t.sizes());
}

// The CPU kernels hand channel counts (GEMM sizes and leading dimensions) to a BLAS with 32-bit int
// arguments; rows are tiled and every offset is int64. Checked before anything is allocated.
constexpr int64_t kMaxChannels = std::numeric_limits<int32_t>::max();

inline void check_channels_fit(int64_t channels, const char* what) {
  TORCH_CHECK(channels <= kMaxChannels, what, ": expected at most ", kMaxChannels,
              " channels (GEMM dimensions are 32-bit), got ", channels);
}

// A 4-D [N, C, H, W] or 5-D [N, C, D, H, W] activation (2 or 3 spatial dimensions).
inline void check_input_4d(const at::Tensor& input, const char* name, bool training) {
  TORCH_CHECK(input.dim() == 4 || input.dim() == 5, name,
              ": expected a 4-D tensor [N, C, H, W] or a 5-D tensor [N, C, D, H, W], got ", input.dim(),
              "-D with shape ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), name,
              ": expected a floating-point dtype (float32, float64; float16/bfloat16 on CUDA), got ",
              input.scalar_type());
  TORCH_CHECK(input.size(0) > 0, name, ": expected a non-empty batch, got batch size 0 (shape ",
              input.sizes(), ")");
  const auto spatial = input.sizes().slice(2);
  TORCH_CHECK(c10::multiply_integers(spatial) > 0, name, ": expected a non-zero spatial size, got ",
              input.dim() == 5 ? "D=" + std::to_string(input.size(2)) + ", " : std::string(), "H=",
              input.size(-2), ", W=", input.size(-1));
  TORCH_CHECK(input.size(1) > 0, name, ": expected at least one channel, got 0");
  check_channels_fit(input.size(1), name);
  if (training) {
    // ValueError with nn.BatchNorm2d's own message.
    TORCH_CHECK_VALUE(input.size(0) * c10::multiply_integers(spatial) > 1,
                "Expected more than 1 value per channel when training, got input size torch.Size(",
                input.sizes(), ")");
  }
}

inline void check_list_len(at::TensorList list, int64_t L, const char* name) {
  TORCH_CHECK(static_cast<int64_t>(list.size()) == L, name, ": expected ", L,
              " tensors (one per layer, from norm1_weight), got ", list.size());
}

// Validates every argument of dense_block_forward / dense_block_backward and returns the geometry.
inline BlockGeometry check_dense_block_args(
    const at::Tensor& input, at::TensorList norm1_weight, at::TensorList norm1_bias,
    at::TensorList conv1_weight, at::TensorList norm2_weight, at::TensorList norm2_bias,
    at::TensorList conv2_weight, at::TensorList norm1_running_mean,
    at::TensorList norm1_running_var, at::TensorList norm2_running_mean,
    at::TensorList norm2_running_var, const c10::optional<at::Tensor>& dropout_mask,
    double drop_rate, bool training, double eps) {
  check_input_4d(input, "input", training);  // includes C0 <= kMaxChannels
  BlockGeometry g{};
  g.dims = input.dim() - 2;
  g.N = input.size(0);
  g.C0 = input.size(1);
  g.D = g.dims == 3 ? input.size(2) : 1;
  g.H = input.size(-2);
  g.W = input.size(-1);
  g.L = static_cast<int64_t>(norm1_weight.size());
  TORCH_CHECK(g.L >= 1, "norm1_weight: expected at least one layer, got an empty list");
  check_list_len(norm1_bias, g.L, "norm1_bias");
  check_list_len(conv1_weight, g.L, "conv1_weight");
  check_list_len(norm2_weight, g.L, "norm2_weight");
  check_list_len(norm2_bias, g.L, "norm2_bias");
  check_list_len(conv2_weight, g.L, "conv2_weight");
  const char* k3 = g.dims == 3 ? "3, 3, 3" : "3, 3";
  const char* k1 = g.dims == 3 ? "1, 1, 1" : "1, 1";
  TORCH_CHECK(conv2_weight[0].dim() == input.dim(), "conv2_weight[0]: expected a ", input.dim(),
              "-D weight [k, inter, ", k3, "] for a ", input.dim(), "-D input, got shape ", conv2_weight[0].sizes());
  TORCH_CHECK(conv1_weight[0].dim() == input.dim(), "conv1_weight[0]: expected a ", input.dim(),
              "-D weight [inter, C0, ", k1, "] for a ", input.dim(), "-D input, got shape ", conv1_weight[0].sizes());
  g.k = conv2_weight[0].size(0);
  g.inter = conv1_weight[0].size(0);
  TORCH_CHECK(g.k >= 1 && g.inter >= 1, "conv weights: expected growth_rate >= 1 and bn_size*growth_rate >= 1, got k=",
              g.k, ", inter=", g.inter);
  check_channels_fit(g.inter, "conv1_weight[0] (bn_size*growth_rate)");
  TORCH_CHECK(g.L <= (kMaxChannels - g.C0) / g.k, "input, conv2_weight: the block buffer would hold C0 + L*k = ",
              g.C0, " + ", g.L, "*", g.k, " channels, more than ", kMaxChannels, " (GEMM dimensions are 32-bit)");
  g.Ct = g.C0 + g.L * g.k;
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t c = g.in_channels(l);
    const std::string i = "[" + std::to_string(l) + "]";
    for (auto* p : {&norm1_weight, &norm1_bias}) {
      const std::string name = (p == &norm1_weight ? "norm1_weight" : "norm1_bias") + i;
      check_float_tensor((*p)[l], name.c_str(), input, true);
      check_shape((*p)[l], {c}, name + " (layer input channels C0 + l*growth_rate)");
    }
    check_conv_weight(conv1_weight[l], ("conv1_weight" + i).c_str(), input);
    check_shape(conv1_weight[l], conv_weight_shape(g.inter, c, 1, g.dims), "conv1_weight" + i);
    for (auto* p : {&norm2_weight, &norm2_bias}) {
      const std::string name = (p == &norm2_weight ? "norm2_weight" : "norm2_bias") + i;
      check_float_tensor((*p)[l], name.c_str(), input, true);
      check_shape((*p)[l], {g.inter}, name);
    }
    check_conv_weight(conv2_weight[l], ("conv2_weight" + i).c_str(), input);
    check_shape(conv2_weight[l], conv_weight_shape(g.k, g.inter, 3, g.dims), "conv2_weight" + i);
  }
  if (!training) {
    check_list_len(norm1_running_mean, g.L, "norm1_running_mean");
    check_list_len(norm1_running_var, g.L, "norm1_running_var");
    check_list_len(norm2_running_mean, g.L, "norm2_running_mean");
    check_list_len(norm2_running_var, g.L, "norm2_running_var");
    for (int64_t l = 0; l < g.L; ++l) {
      const std::string i = "[" + std::to_string(l) + "]";
      check_float_tensor(norm1_running_mean[l], ("norm1_running_mean" + i).c_str(), input, true);
      check_shape(norm1_running_mean[l], {g.in_channels(l)}, "norm1_running_mean" + i);
      check_float_tensor(norm1_running_var[l], ("norm1_running_var" + i).c_str(), input, true);
      check_shape(norm1_running_var[l], {g.in_channels(l)}, "norm1_running_var" + i);
      check_float_tensor(norm2_running_mean[l], ("norm2_running_mean" + i).c_str(), input, true);
      check_shape(norm2_running_mean[l], {g.inter}, "norm2_running_mean" + i);
      check_float_tensor(norm2_running_var[l], ("norm2_running_var" + i).c_str(), input, true);
      check_shape(norm2_running_var[l], {g.inter}, "norm2_running_var" + i);
    }
  }
  TORCH_CHECK(drop_rate >= 0.0 && drop_rate < 1.0, "drop_rate: expected a value in [0, 1), got ", drop_rate);
  TORCH_CHECK(eps > 0.0, "eps: expected a positive value, got ", eps);
  if (dropout_mask.has_value() && dropout_mask->defined()) {
    const auto& m = *dropout_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, "dropout_mask: expected dtype torch.bool, got ", m.scalar_type());
    TORCH_CHECK(m.device() == input.device(), "dropout_mask: expected a tensor on ", input.device(), ", got ", m.device());
    check_shape(m, g.shape(g.L * g.k), "dropout_mask");
  }
  return g;
}

// Validates every argument of dense_block_backward on any backend and returns the geometry: the buffer
// [N, C0 + L*k, ...] whose first num_input_features channels are the block input, grad_buffer like the
// buffer, the forward's arguments, and in training the forward's batch statistics.
inline BlockGeometry check_dense_block_backward_args(
    const at::Tensor& grad_buffer, const at::Tensor& buffer, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& mean2, const at::Tensor& var2, at::TensorList norm1_weight, at::TensorList norm1_bias,
    at::TensorList conv1_weight, at::TensorList norm2_weight, at::TensorList norm2_bias,
    at::TensorList conv2_weight, at::TensorList norm1_running_mean, at::TensorList norm1_running_var,
    at::TensorList norm2_running_mean, at::TensorList norm2_running_var,
    const c10::optional<at::Tensor>& dropout_mask, double drop_rate, bool training, double eps,
    int64_t num_input_features) {
  TORCH_CHECK(buffer.dim() == 4 || buffer.dim() == 5,
              "buffer: expected a 4-D tensor [N, C, H, W] or a 5-D tensor [N, C, D, H, W], got ", buffer.dim(),
              "-D with shape ", buffer.sizes());
  TORCH_CHECK(num_input_features >= 1 && num_input_features < buffer.size(1),
              "num_input_features: expected a value in [1, ", buffer.size(1), "), got ", num_input_features);
  const BlockGeometry g = check_dense_block_args(
      buffer.narrow(1, 0, num_input_features), norm1_weight, norm1_bias, conv1_weight, norm2_weight, norm2_bias,
      conv2_weight, norm1_running_mean, norm1_running_var, norm2_running_mean, norm2_running_var, dropout_mask,
      drop_rate, training, eps);
  TORCH_CHECK(g.Ct == buffer.size(1), "buffer: expected ", g.Ct, " channels (C0 + L*k), got ", buffer.size(1));
  check_shape(grad_buffer, buffer.sizes(), "grad_buffer");
  check_float_tensor(grad_buffer, "grad_buffer", buffer);  // the buffer's dtype
  if (training) {
    for (auto item : {std::make_pair("mean", &mean), std::make_pair("var", &var)}) {
      check_float_tensor(*item.second, item.first, buffer, /*bn_tensor=*/true);
      check_shape(*item.second, {g.Ct}, item.first);
    }
    for (auto item : {std::make_pair("mean2", &mean2), std::make_pair("var2", &var2)}) {
      check_float_tensor(*item.second, item.first, buffer, /*bn_tensor=*/true);
      check_shape(*item.second, {g.L, g.inter}, item.first);
    }
  }
  return g;
}

// Where layer l's activation slopes start in the packed `slopes` of dense_block_act_forward: per layer, the
// c_l slopes of the activation after norm1, then the inter slopes of the one after norm2.
inline int64_t slope_offset(const BlockGeometry& g, int64_t l) {
  return l * (g.C0 + g.inter) + g.k * l * (l - 1) / 2;
}

// The packed per-channel slopes of a block's LeakyReLU / PReLU activations (dense_block_act_*): a 1-D tensor of
// sum_l (c_l + inter) values in the BatchNorm dtype of `ref`, on its device.
inline void check_block_slopes(const at::Tensor& slopes, const BlockGeometry& g, const at::Tensor& ref) {
  TORCH_CHECK(slopes.defined(), "slopes: expected a tensor, got None");
  const at::ScalarType want = stats_dtype(ref.scalar_type());
  TORCH_CHECK(slopes.scalar_type() == want, "slopes: expected dtype ", want,
              " (the BatchNorm dtype for input's dtype), got ", slopes.scalar_type());
  TORCH_CHECK(slopes.device() == ref.device(), "slopes: expected a tensor on ", ref.device(),
              " (the device of input), got ", slopes.device());
  check_shape(slopes, {slope_offset(g, g.L)},
              "slopes (per layer: C0 + l*growth_rate slopes of norm1's activation, then bn_size*growth_rate of "
              "norm2's)");
}

// Validates the arguments of the BN-ReLU "tail" readers (transition and final norm).
inline void check_tail_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                            const at::Tensor& weight, const at::Tensor& bias, double eps) {
  check_input_4d(input, "input", /*training=*/false);
  const int64_t C = input.size(1);
  for (auto item : {std::make_pair("mean", &mean), std::make_pair("var", &var),
                    std::make_pair("weight", &weight), std::make_pair("bias", &bias)}) {
    check_float_tensor(*item.second, item.first, input, /*bn_tensor=*/true);
    check_shape(*item.second, {C}, item.first);
  }
  TORCH_CHECK(eps > 0.0, "eps: expected a positive value, got ", eps);
}

// The optional SE gate of a tail reader (docs/design.md §5): [N, C] of input, in the BatchNorm dtype
// for input's dtype (float32 for float16/bfloat16 data) or input's own dtype, on input's device.
inline void check_gate(const c10::optional<at::Tensor>& gate, const at::Tensor& input) {
  if (!gate.has_value() || !gate->defined()) return;
  check_float_tensor(*gate, "gate", input, /*bn_tensor=*/true);
  check_shape(*gate, {input.size(0), input.size(1)}, "gate ([N, C] of input)");
}

// Validates the arguments of a transition (BN-ReLU-conv1x1-avgpool2x2) on any backend.
inline void check_transition_args(const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
                                  const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& conv_weight,
                                  double eps) {
  check_tail_args(input, mean, var, weight, bias, eps);
  check_conv_weight(conv_weight, "conv_weight", input);
  const int64_t dims = input.dim() - 2;
  TORCH_CHECK(conv_weight.dim() == input.dim() && conv_weight.size(1) == input.size(1) &&
                  c10::multiply_integers(conv_weight.sizes().slice(2)) == 1,
              "conv_weight: expected shape [C_out, ", input.size(1), dims == 3 ? ", 1, 1, 1]" : ", 1, 1]",
              ", got ", conv_weight.sizes());
  TORCH_CHECK(conv_weight.size(0) >= 1, "conv_weight: expected at least one output channel, got shape ",
              conv_weight.sizes());
  check_channels_fit(conv_weight.size(0), "conv_weight");
  if (dims == 3) {
    TORCH_CHECK(input.size(2) >= 2 && input.size(3) >= 2 && input.size(4) >= 2,
                "input: the transition's 2x2x2 average pool needs D >= 2, H >= 2 and W >= 2, got D=", input.size(2),
                ", H=", input.size(3), ", W=", input.size(4));
  }
  TORCH_CHECK(input.size(-2) >= 2 && input.size(-1) >= 2,
              "input: the transition's 2x2 average pool needs H >= 2 and W >= 2, got H=", input.size(-2),
              ", W=", input.size(-1));
}

// Geometry of one layer's bottleneck stage of a block buffer (the per-layer entry points of the
// synchronised block, docs/design.md §13): rows = N*(D*)H*W, Ct buffer channels, `channels` read.
struct LayerGeometry {
  int64_t rows, Ct, channels, inter, dims;
};

// Validates block_layer_bottleneck(_backward)'s arguments: the layer reads the column prefix
// [0, channels) of buffer, normalised with mean/var/weight/bias [channels], and multiplies it by
// conv_weight [inter, channels, 1, 1(, 1)].
inline LayerGeometry check_block_layer_args(const at::Tensor& buffer, int64_t channels, const at::Tensor& mean,
                                            const at::Tensor& var, const at::Tensor& weight,
                                            const at::Tensor& bias, const at::Tensor& conv_weight, double eps) {
  check_input_4d(buffer, "buffer", /*training=*/false);
  const int64_t Ct = buffer.size(1), dims = buffer.dim() - 2;
  TORCH_CHECK(channels >= 1 && channels <= Ct, "channels: expected a value in [1, ", Ct,
              "] (the buffer's channel count), got ", channels);
  const char* names[] = {"mean", "var", "weight", "bias"};
  const at::Tensor* bn[] = {&mean, &var, &weight, &bias};
  for (int i = 0; i < 4; ++i) {
    check_float_tensor(*bn[i], names[i], buffer, /*bn_tensor=*/true);
    check_shape(*bn[i], {channels}, names[i]);
  }
  check_float_tensor(conv_weight, "conv_weight", buffer);
  TORCH_CHECK(conv_weight.dim() == buffer.dim() && conv_weight.size(0) >= 1,
              "conv_weight: expected shape [inter, ", channels, ", 1", dims == 3 ? ", 1, 1]" : ", 1]", ", got ",
              conv_weight.sizes());
  check_shape(conv_weight, conv_weight_shape(conv_weight.size(0), channels, 1, dims), "conv_weight");
  check_channels_fit(conv_weight.size(0), "conv_weight");
  TORCH_CHECK(eps > 0.0, "eps: expected a positive value, got ", eps);
  return {buffer.numel() / Ct, Ct, channels, conv_weight.size(0), dims};
}

}  // namespace dnf
