// Operator schemas of the densenet_fast library. Kernels live per dispatch key in cpu/ and cuda/, the
// autograd kernels (Autograd key) in autograd/; fake (meta) implementations are registered from Python
// (densenet_fast/ops/). The one kernel here, check_dense_block_args, reads only metadata and runs on every device.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common/checks.h"

TORCH_LIBRARY(densenet_fast, m) {
  // A whole dense block. Returns the block buffer [N, C0 + L*k, H, W] (channels_last), and in
  // training the batch statistics: per-channel mean/biased var of the buffer (shared by every BN1
  // reader) and per-layer BN2 mean/biased var [L, bn_size*k]. In eval the statistics are empty.
  // dropout_mask: bool [N, L*k, H, W] (keep = true) or None; new features are scaled by 1/(1-p).
  m.def(
      "dense_block_forward(Tensor input, Tensor[] norm1_weight, Tensor[] norm1_bias, "
      "Tensor[] conv1_weight, Tensor[] norm2_weight, Tensor[] norm2_bias, Tensor[] conv2_weight, "
      "Tensor[] norm1_running_mean, Tensor[] norm1_running_var, Tensor[] norm2_running_mean, "
      "Tensor[] norm2_running_var, Tensor? dropout_mask, float drop_rate, bool training, float eps) "
      "-> (Tensor buffer, Tensor mean, Tensor var, Tensor mean2, Tensor var2)");
  // Recompute-based backward: one reverse sweep over the layers with a block-level gradient buffer. The
  // _inplace variant uses grad_buffer (float32/float64, channels_last; CPU) as that buffer and overwrites it:
  // for a caller that hands over a gradient nothing else reads (docs/design.md §11).
  const std::string backward_rest =
      " buffer, Tensor mean, Tensor var, Tensor mean2, "
      "Tensor var2, Tensor[] norm1_weight, Tensor[] norm1_bias, Tensor[] conv1_weight, "
      "Tensor[] norm2_weight, Tensor[] norm2_bias, Tensor[] conv2_weight, "
      "Tensor[] norm1_running_mean, Tensor[] norm1_running_var, Tensor[] norm2_running_mean, "
      "Tensor[] norm2_running_var, Tensor? dropout_mask, float drop_rate, bool training, float eps, "
      "int num_input_features) -> (Tensor grad_input, Tensor[] grad_norm1_weight, "
      "Tensor[] grad_norm1_bias, Tensor[] grad_conv1_weight, Tensor[] grad_norm2_weight, "
      "Tensor[] grad_norm2_bias, Tensor[] grad_conv2_weight)";
  m.def(torch::schema(("dense_block_backward(Tensor grad_buffer, Tensor" + backward_rest).c_str()));
  m.def(torch::schema(("dense_block_backward_inplace(Tensor(a!) grad_buffer, Tensor" + backward_rest).c_str()));
  // The block with LeakyReLU / PReLU in place of both ReLUs of every layer (CPU kernels; docs/design.md §3, "Other
  // activations"): act(z) = z > 0 ? z : slope*z per channel. `slopes`: 1-D, in the BatchNorm dtype, per layer l the
  // C0 + l*k slopes of norm1's activation then the bn_size*k of norm2's (a LeakyReLU's slope or a single-parameter
  // PReLU's weight repeated). The backward also returns the slopes' gradient (PReLU's weight gradient, packed alike).
  m.def(
      "dense_block_act_forward(Tensor input, Tensor[] norm1_weight, Tensor[] norm1_bias, "
      "Tensor[] conv1_weight, Tensor[] norm2_weight, Tensor[] norm2_bias, Tensor[] conv2_weight, "
      "Tensor[] norm1_running_mean, Tensor[] norm1_running_var, Tensor[] norm2_running_mean, "
      "Tensor[] norm2_running_var, Tensor? dropout_mask, float drop_rate, bool training, float eps, Tensor slopes) "
      "-> (Tensor buffer, Tensor mean, Tensor var, Tensor mean2, Tensor var2)");
  {
    std::string act_rest = backward_rest;
    const std::string ret = "int num_input_features) -> (";
    act_rest.replace(act_rest.find(ret), ret.size(), "int num_input_features, Tensor slopes) -> (");
    m.def(torch::schema(("dense_block_act_backward(Tensor grad_buffer, Tensor" + act_rest.substr(0, act_rest.size() - 1) +
                         ", Tensor grad_slopes)").c_str()));
  }
  // `training` = mean/var are the batch statistics of the BN input: the backward then includes their
  // own gradient terms (mean/var get no gradient). In eval they are running statistics.
  // `gate`: an optional SE gate [N, C] (docs/design.md §5); the BN input is then y = gate[n, c] * input,
  // folded into the prologue (y is never stored), and the backward's grad_gate [N, C] is
  // sum_hw input * dL/dy. Ungated, grad_gate is an empty [0] tensor.
  // Transition: avg_pool2x2(conv1x1(relu(bn(input)))) with BN statistics given (the block's shared
  // batch statistics in training, running statistics in eval). Pools before the 1x1 conv (both are
  // linear), so it does a quarter of the GEMM work and never stores the BN/ReLU output.
  m.def(
      "transition_forward(Tensor input, Tensor mean, Tensor var, Tensor weight, Tensor bias, "
      "Tensor conv_weight, bool training, float eps, Tensor? gate=None) -> Tensor");
  m.def(
      "transition_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor var, Tensor weight, "
      "Tensor bias, Tensor conv_weight, bool training, float eps, Tensor? gate=None) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_conv_weight, Tensor grad_gate)");
  // Final norm: mean_hw(relu(bn(input))) -> [N, C], the input of a DenseNet's classifier.
  m.def(
      "norm_relu_pool_forward(Tensor input, Tensor mean, Tensor var, Tensor weight, Tensor bias, "
      "bool training, float eps, Tensor? gate=None) -> Tensor");
  m.def(
      "norm_relu_pool_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor var, "
      "Tensor weight, Tensor bias, bool training, float eps, Tensor? gate=None) "
      "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_gate)");
  // Stem: max_pool(relu(bn(input)), 3, 2, 1) over 2 or 3 spatial dimensions, in the input's layout.
  // Saves nothing but its input; the backward recomputes BN-ReLU and the argmax. CPU kernels in
  // cpu/stem_cpu.cpp; other devices run a composite of ATen ops (densenet_fast/ops/stem.py).
  m.def(
      "bn_relu_maxpool(Tensor input, Tensor mean, Tensor var, Tensor weight, Tensor bias, bool training, "
      "float eps) -> Tensor");
  m.def(
      "bn_relu_maxpool_backward(Tensor grad_output, Tensor input, Tensor mean, Tensor var, Tensor weight, "
      "Tensor bias, bool training, float eps) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // Per-sample, per-channel mean and biased variance [N, C] over the spatial positions: the SE
  // squeeze and the moments a gated reader's batch statistics are combined from.
  m.def("sample_moments(Tensor input) -> (Tensor mean, Tensor var)");
  // The fused 1x1 stage of a dense layer on its own (CPU; benchmarks and tests): conv1x1(relu(input*scale + shift),
  // weight) with the BN folded into scale/shift [C], the normalised input never materialised. Output in the
  // compute dtype (float32 for bfloat16 input), channels_last.
  m.def("bn_relu_conv1x1(Tensor input, Tensor scale, Tensor shift, Tensor weight) -> Tensor");
  // Per-channel mean and biased variance [C] of a 4-D tensor (fp32 accumulation or better).
  m.def("channel_moments(Tensor input) -> (Tensor mean, Tensor var)");
  // Per-layer entry points of the synchronised block (SyncBatchNorm, docs/design.md §13), which runs
  // the layers in a Python loop with all-reduces of the statistics between them. The 1x1 stage of
  // layer l: Y = conv1x1(relu(bn(buffer[:, :channels]))) [N, inter, ...] (channels_last) with the given
  // (global) statistics, the BN+ReLU applied tile by tile as the GEMM prologue.
  m.def(
      "block_layer_bottleneck(Tensor buffer, int channels, Tensor mean, Tensor var, Tensor weight, "
      "Tensor bias, Tensor conv_weight, float eps) -> Tensor");
  // Its backward with the statistics held constant: grad_buffer[:, :channels] += a*dU (in place);
  // returns dW1 and the per-channel sums of dU and dU*xhat (local dbeta and dgamma).
  m.def(
      "block_layer_bottleneck_backward(Tensor grad_y, Tensor buffer, int channels, Tensor mean, Tensor var, "
      "Tensor weight, Tensor bias, Tensor conv_weight, float eps, Tensor(a!) grad_buffer) "
      "-> (Tensor grad_conv_weight, Tensor sum_du, Tensor sum_du_xhat)");
  // [2, C] float64 per-channel sum and sum of squares of [N, C, ...] (float64 accumulation): a rank's
  // share of the all-reduced statistics; with ``other`` (same shape and dtype) the sums of input and of
  // input*other (the BN backward's sum dz, sum dz*xhat). Reads channel slices of channels_last buffers in place.
  m.def("channel_sums(Tensor input, Tensor? other=None) -> Tensor");
  // The gradient hand-over tags (autograd/handover.h, docs/design.md §11), for densenet_fast/ops/common.py: action
  // 0 tags `tensor` as a buffer with one fused reader, 1 asks for that tag, 2 tags a fresh reader gradient, 3 asks
  // for that tag (1/0 for yes/no), 4 returns how many block backward passes took a handed-over gradient.
  m.def("_handover(Tensor? tensor, int action) -> int");
  // dense_block_forward's argument checks on their own (common/checks.h), for Python entry points that
  // validate a block without calling the operator (the synchronised block, densenet_fast/ops/sync_block.py).
  m.def(
      "check_dense_block_args(Tensor input, Tensor[] norm1_weight, Tensor[] norm1_bias, "
      "Tensor[] conv1_weight, Tensor[] norm2_weight, Tensor[] norm2_bias, Tensor[] conv2_weight, "
      "Tensor[] norm1_running_mean, Tensor[] norm1_running_var, Tensor[] norm2_running_mean, "
      "Tensor[] norm2_running_var, Tensor? dropout_mask, float drop_rate, bool training, float eps) -> ()");
}

TORCH_LIBRARY_IMPL(densenet_fast, CompositeExplicitAutograd, m) {
  m.impl("check_dense_block_args",
         [](const at::Tensor& input, at::TensorList g1, at::TensorList b1, at::TensorList w1, at::TensorList g2,
            at::TensorList b2, at::TensorList w2, at::TensorList rm1, at::TensorList rv1, at::TensorList rm2,
            at::TensorList rv2, const c10::optional<at::Tensor>& mask, double p, bool training, double eps) {
           dnf::check_dense_block_args(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps);
         });
}

#ifndef DNF_TORCH_VERSION
#define DNF_TORCH_VERSION "unknown"
#endif
#ifndef DNF_CUDA_ARCHS
#define DNF_CUDA_ARCHS ""
#endif
#ifndef DNF_WITH_CUDA
#define DNF_WITH_CUDA 0
#endif

// `import densenet_fast._C` loads this library, which registers the operators above. The module
// also records what was compiled in, for densenet_fast.build_info().
static struct PyModuleDef dnf_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* mod = PyModule_Create(&dnf_module);
  if (mod == nullptr) return nullptr;
  PyModule_AddStringConstant(mod, "TORCH_VERSION", DNF_TORCH_VERSION);
  PyModule_AddStringConstant(mod, "CUDA_ARCHS", DNF_CUDA_ARCHS);
  PyModule_AddIntConstant(mod, "WITH_CUDA", DNF_WITH_CUDA);
#ifdef _OPENMP
  PyModule_AddIntConstant(mod, "WITH_OPENMP", 1);
#else
  PyModule_AddIntConstant(mod, "WITH_OPENMP", 0);
#endif
  return mod;
}
