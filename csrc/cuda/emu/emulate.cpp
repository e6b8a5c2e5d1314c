// Host emulation of the CUDA kernels, for tests on machines without a GPU.
//
// Compiles csrc/cuda/dense_block_impl.h, tail_impl.h and autocast.cpp with DNF_CUDA_EMULATE: every
// index functor runs through the real launch arithmetic of launch.cuh with the grid's threads run
// serially in a permuted order, every ATen call runs on CPU, and the code lives in namespace
// dnf::cuda_emu. Exposed as plain Python functions (not through the dispatcher) by
// tests/test_cuda_emulation.py, which JIT-builds this file. The fused BN+GEMM kernel (bn_gemm.cu) is
// launched through its real host side (bn_gemm_tile.cuh: launch_bn_relu_gemm) and emulated block by
// block: its per-thread phases run as they are, the warp-level WMMA calls are replaced by loops with
// the same fragment layouts (row_major A: element (m, k) at p[m*ldm + k]; col_major B: element (k, n)
// at p[n*ldm + k]). The compute capabilities the fused path's dispatch rule sees are settable
// (set_compute_capabilities), so the rule's errors are testable too.
#define DNF_CUDA_EMULATE 1

#include <torch/extension.h>

#include "cuda/autocast.cpp"
#include "cuda/bn_gemm.h"
#include "cuda/bn_gemm_tile.cuh"
#include "cuda/dense_block_impl.h"
#include "cuda/dense_block_in_impl.h"
#include "cuda/tail_impl.h"

namespace dnf::cuda_emu {

namespace {
int g_device_cc = 90, g_code_cc = 90;  // an H100/H200 with sm_90 device code, unless a test says otherwise
int64_t g_gemm_blocks = 0;               // thread blocks of the fused GEMM run so far (tests check the path)

// One thread block of bn_relu_gemm_kernel, emulated.
template <typename T, bool VEC>
void gemm_block(const T* X, int64_t M, int64_t ld, int64_t c, const float* a, const float* b, const T* W,
                int64_t n_out, T* Y, int64_t bx, int64_t by) {
  using namespace dnf::bn_gemm_tile;
  ++g_gemm_blocks;
  alignas(128) unsigned char smem[kSmemBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + BM * LDS;
  float* Cs = reinterpret_cast<float*>(smem);
  const int64_t m0 = bx * BM, n0 = by * BN;
  std::vector<float> acc(8 * 2 * 2 * 256, 0.0f);  // [warp][i][j][16x16]
  for (int64_t k0 = 0; k0 < c; k0 += BK) {
    for (int tid = kThreads - 1; tid >= 0; --tid) load_tiles<T, VEC>(tid, X, M, ld, c, a, b, W, n_out, m0, n0, k0, As, Bs);
    for (int w = 0; w < 8; ++w)
      for (int kk = 0; kk < BK; kk += 16)
        for (int i = 0; i < 2; ++i)
          for (int j = 0; j < 2; ++j) {
            const T* pa = As + (warp_row(w) + i * 16) * LDS + kk;
            const T* pb = Bs + (warp_col(w) + j * 16) * LDS + kk;
            float* f = acc.data() + ((w * 2 + i) * 2 + j) * 256;
            for (int m = 0; m < 16; ++m)
              for (int n = 0; n < 16; ++n) {
                float s = 0.0f;  // one m16n16k16 step: products of the step summed, then accumulated
                for (int q = 0; q < 16; ++q) s += static_cast<float>(pa[m * LDS + q]) * static_cast<float>(pb[n * LDS + q]);
                f[m * 16 + n] += s;
              }
          }
  }
  for (int w = 0; w < 8; ++w)
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) {
        float* dst = Cs + (warp_row(w) + i * 16) * LDC + warp_col(w) + j * 16;
        const float* f = acc.data() + ((w * 2 + i) * 2 + j) * 256;
        for (int m = 0; m < 16; ++m)
          for (int n = 0; n < 16; ++n) dst[m * LDC + n] = f[m * 16 + n];
      }
  for (int tid = 0; tid < kThreads; ++tid) store_tile<T>(tid, Cs, M, n_out, m0, n0, Y);
}

// The launcher of launch_bn_relu_gemm: runs the grid's thread blocks one after another (y outer, as
// any order is valid: blocks write disjoint tiles of Y).
struct EmuLauncher {
  template <bool VEC, typename T>
  void run(const bn_gemm_tile::BnGemmOperands<T>& op, bn_gemm_tile::GemmGrid grid) const {
    for (int64_t by = grid.y - 1; by >= 0; --by)
      for (int64_t bx = 0; bx < grid.x; ++bx)
        gemm_block<T, VEC>(op.X, op.M, op.ld, op.c, op.a, op.b, op.W, op.n_out, op.Y, bx, by);
  }
};

}  // namespace

void bn_relu_gemm_device_ccs(at::ScalarType, int& device_cc, int& code_cc) {
  device_cc = g_device_cc;
  code_cc = g_code_cc;
}

template <>
void bn_relu_gemm<c10::Half>(const c10::Half* X, int64_t M, int64_t ld, int64_t c, const float* a, const float* b,
                             const c10::Half* W, int64_t n_out, c10::Half* Y) {
  bn_gemm_tile::launch_bn_relu_gemm(bn_gemm_tile::BnGemmOperands<c10::Half>{X, M, ld, c, a, b, W, n_out, Y},
                                    EmuLauncher{});
}

template <>
void bn_relu_gemm<c10::BFloat16>(const c10::BFloat16* X, int64_t M, int64_t ld, int64_t c, const float* a,
                                 const float* b, const c10::BFloat16* W, int64_t n_out, c10::BFloat16* Y) {
  bn_gemm_tile::launch_bn_relu_gemm(bn_gemm_tile::BnGemmOperands<c10::BFloat16>{X, M, ld, c, a, b, W, n_out, Y},
                                    EmuLauncher{});
}

}  // namespace dnf::cuda_emu

namespace {

using at::Tensor;
using Vec = std::vector<Tensor>;

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> block_forward(const Tensor& input, Vec g1, Vec b1, Vec w1, Vec g2,
                                                                 Vec b2, Vec w2, Vec rm1, Vec rv1, Vec rm2, Vec rv2,
                                                                 c10::optional<Tensor> mask, double p, bool training,
                                                                 double eps) {
  return dnf::cuda_emu::dense_block_forward(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training, eps);
}

std::tuple<Tensor, Vec, Vec, Vec, Vec, Vec, Vec> block_backward(const Tensor& grad, const Tensor& buffer,
                                                                const Tensor& mean, const Tensor& var,
                                                                const Tensor& mean2, const Tensor& var2, Vec g1, Vec b1,
                                                                Vec w1, Vec g2, Vec b2, Vec w2, Vec rm1, Vec rv1,
                                                                Vec rm2, Vec rv2, c10::optional<Tensor> mask, double p,
                                                                bool training, double eps, int64_t c0) {
  return dnf::cuda_emu::dense_block_backward(grad, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, rm1, rv1,
                                             rm2, rv2, mask, p, training, eps, c0);
}

// The LeakyReLU / PReLU block (dense_block_act_forward / dense_block_act_backward).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> block_act_forward(const Tensor& input, Vec g1, Vec b1, Vec w1,
                                                                     Vec g2, Vec b2, Vec w2, Vec rm1, Vec rv1, Vec rm2,
                                                                     Vec rv2, c10::optional<Tensor> mask, double p,
                                                                     bool training, double eps, const Tensor& slopes) {
  return dnf::cuda_emu::dense_block_act_forward(input, g1, b1, w1, g2, b2, w2, rm1, rv1, rm2, rv2, mask, p, training,
                                                eps, slopes);
}

std::tuple<Tensor, Vec, Vec, Vec, Vec, Vec, Vec, Tensor> block_act_backward(
    const Tensor& grad, const Tensor& buffer, const Tensor& mean, const Tensor& var, const Tensor& mean2,
    const Tensor& var2, Vec g1, Vec b1, Vec w1, Vec g2, Vec b2, Vec w2, Vec rm1, Vec rv1, Vec rm2, Vec rv2,
    c10::optional<Tensor> mask, double p, bool training, double eps, int64_t c0, const Tensor& slopes) {
  return dnf::cuda_emu::dense_block_act_backward(grad, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, rm1,
                                                 rv1, rm2, rv2, mask, p, training, eps, c0, slopes);
}

// The InstanceNorm block (dense_block_in_forward / dense_block_in_backward).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> block_in_forward(const Tensor& input, Vec g1, Vec b1, Vec w1,
                                                                    Vec g2, Vec b2, Vec w2, double eps,
                                                                    c10::optional<Tensor> slopes) {
  return dnf::cuda_emu::dense_block_in_forward(input, g1, b1, w1, g2, b2, w2, eps, slopes);
}

std::tuple<Tensor, Vec, Vec, Vec, Vec, Vec, Vec, Tensor> block_in_backward(
    const Tensor& grad, const Tensor& buffer, const Tensor& mean, const Tensor& var, const Tensor& mean2,
    const Tensor& var2, Vec g1, Vec b1, Vec w1, Vec g2, Vec b2, Vec w2, double eps, int64_t c0,
    c10::optional<Tensor> slopes) {
  return dnf::cuda_emu::dense_block_in_backward(grad, buffer, mean, var, mean2, var2, g1, b1, w1, g2, b2, w2, eps, c0,
                                                slopes);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> autocast_block_in_forward(const Tensor& input, Vec g1, Vec b1,
                                                                             Vec w1, Vec g2, Vec b2, Vec w2,
                                                                             double eps,
                                                                             c10::optional<Tensor> slopes) {
  return dnf::cuda_emu::autocast::dense_block_in_forward(
      [](const auto&... a) { return dnf::cuda_emu::dense_block_in_forward(a...); }, input, g1, b1, w1, g2, b2, w2, eps,
      slopes);
}

// autocast.cpp's AutocastCUDA logic for the CPU device (call under torch.autocast("cpu")).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> autocast_block_forward(const Tensor& input, Vec g1, Vec b1, Vec w1,
                                                                          Vec g2, Vec b2, Vec w2, Vec rm1, Vec rv1,
                                                                          Vec rm2, Vec rv2, c10::optional<Tensor> mask,
                                                                          double p, bool training, double eps) {
  return dnf::cuda_emu::autocast::dense_block_forward(
      [](const auto&... a) { return dnf::cuda_emu::dense_block_forward(a...); }, input, g1, b1, w1, g2, b2, w2, rm1,
      rv1, rm2, rv2, mask, p, training, eps);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> autocast_block_act_forward(
    const Tensor& input, Vec g1, Vec b1, Vec w1, Vec g2, Vec b2, Vec w2, Vec rm1, Vec rv1, Vec rm2, Vec rv2,
    c10::optional<Tensor> mask, double p, bool training, double eps, const Tensor& slopes) {
  return dnf::cuda_emu::autocast::dense_block_act_forward(
      [](const auto&... a) { return dnf::cuda_emu::dense_block_act_forward(a...); }, input, g1, b1, w1, g2, b2, w2,
      rm1, rv1, rm2, rv2, mask, p, training, eps, slopes);
}

Tensor autocast_transition_forward(const Tensor& input, const Tensor& mean, const Tensor& var, const Tensor& weight,
                                   const Tensor& bias, const Tensor& conv_weight, bool training, double eps,
                                   c10::optional<Tensor> gate) {
  return dnf::cuda_emu::autocast::transition_forward(
      [](const auto&... a) { return dnf::cuda_emu::transition_forward(a...); }, input, mean, var, weight, bias,
      conv_weight, training, eps, gate);
}

// Y [M, n_out] = relu(a*X[:, :c] + b) @ W^T with X [M, ld] (row-major), W [n_out, c], through the
// kernel's real host side (launch_bn_relu_gemm) and its emulated thread blocks.
Tensor bn_relu_gemm(const Tensor& X, int64_t c, const Tensor& a, const Tensor& b, const Tensor& W) {
  TORCH_CHECK(X.dim() == 2 && X.is_contiguous() && W.dim() == 2 && W.is_contiguous() && W.size(1) == c &&
              a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat);
  const int64_t M = X.size(0), ld = X.size(1), n_out = W.size(0);
  Tensor Y = at::empty({M, n_out}, X.options());
  AT_DISPATCH_REDUCED_FLOATING_TYPES(X.scalar_type(), "bn_relu_gemm_emu", [&] {
    dnf::cuda_emu::bn_relu_gemm<scalar_t>(X.data_ptr<scalar_t>(), M, ld, c, a.data_ptr<float>(), b.data_ptr<float>(),
                                          W.data_ptr<scalar_t>(), n_out, Y.data_ptr<scalar_t>());
  });
  return Y;
}

// The grid a bn_relu_gemm launch uses, and whether it takes the 16-byte path (what the kernel sees).
struct GridProbe {
  std::tuple<int64_t, int64_t, bool>* out;
  template <bool VEC, typename T>
  void run(const dnf::bn_gemm_tile::BnGemmOperands<T>&, dnf::bn_gemm_tile::GemmGrid g) const {
    *out = {g.x, g.y, VEC};
  }
};

std::tuple<int64_t, int64_t, bool> bn_relu_gemm_grid(const Tensor& X, int64_t c, const Tensor& W) {
  std::tuple<int64_t, int64_t, bool> out{0, 0, false};
  AT_DISPATCH_REDUCED_FLOATING_TYPES(X.scalar_type(), "bn_relu_gemm_grid", [&] {
    // Only the shapes and the operands' alignment matter to the grid: a, b and Y are not read.
    const dnf::bn_gemm_tile::BnGemmOperands<scalar_t> op{X.data_ptr<scalar_t>(), X.size(0), X.size(1), c, nullptr,
                                                         nullptr, W.data_ptr<scalar_t>(), W.size(0), nullptr};
    dnf::bn_gemm_tile::launch_bn_relu_gemm(op, GridProbe{&out});
  });
  return out;
}

// The fused-path decision of dense_block_forward/backward for data of this dtype (reads DNF_CUDA_BN_GEMM).
bool use_fused_bn_gemm(const Tensor& x) { return dnf::cuda_emu::use_fused_bn_gemm(x.scalar_type()); }

void set_compute_capabilities(int64_t device_cc, int64_t code_cc) {
  dnf::cuda_emu::g_device_cc = static_cast<int>(device_cc);
  dnf::cuda_emu::g_code_cc = static_cast<int>(code_cc);
}

int64_t gemm_blocks_run() { return dnf::cuda_emu::g_gemm_blocks; }

// for_each's launch arithmetic: (blocks, threads per block) for n items.
std::tuple<int64_t, int64_t> for_each_config(int64_t n) {
  return {dnf::cuda_emu::for_each_blocks(n), dnf::cuda_emu::kThreads};
}

// The item counts of the for_each launches since the last call (and clears the log).
std::vector<int64_t> take_launch_log() {
  std::vector<int64_t> out;
  out.swap(dnf::cuda_emu::launch_log());
  return out;
}

// launch.cuh's index decode (32-bit division where a and b fit, else 64-bit).
std::tuple<int64_t, int64_t> divmod(int64_t a, int64_t b) {
  int64_t q, r;
  dnf::cuda_emu::divmod(a, b, q, r);
  return {q, r};
}

// The pixel offsets (within a sample) that a floor-mode pool over [D, H, W] drops, in DroppedPixels' order.
std::vector<int64_t> dropped_pixels(int64_t D, int64_t H, int64_t W, int64_t kd) {
  const dnf::cuda_emu::DroppedPixels px{D, H, W, kd * (D / kd), 2 * (H / 2), 2 * (W / 2)};
  std::vector<int64_t> out;
  for (int64_t q = 0; q < px.per_sample(); ++q) out.push_back(px.pixel(q));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  // The tail operators' trailing `gate` is optional, as in their schemas.
  const auto gate = py::arg("gate") = py::none();
  m.def("dense_block_forward", &block_forward);
  m.def("dense_block_backward", &block_backward);
  m.def("autocast_dense_block_forward", &autocast_block_forward);
  m.def("dense_block_act_forward", &block_act_forward);
  m.def("dense_block_act_backward", &block_act_backward);
  m.def("autocast_dense_block_act_forward", &autocast_block_act_forward);
  const auto slopes = py::arg("slopes") = py::none();
  m.def("dense_block_in_forward", &block_in_forward, py::arg("input"), py::arg("g1"), py::arg("b1"), py::arg("w1"),
        py::arg("g2"), py::arg("b2"), py::arg("w2"), py::arg("eps"), slopes);
  m.def("dense_block_in_backward", &block_in_backward, py::arg("grad"), py::arg("buffer"), py::arg("mean"),
        py::arg("var"), py::arg("mean2"), py::arg("var2"), py::arg("g1"), py::arg("b1"), py::arg("w1"), py::arg("g2"),
        py::arg("b2"), py::arg("w2"), py::arg("eps"), py::arg("c0"), slopes);
  m.def("autocast_dense_block_in_forward", &autocast_block_in_forward, py::arg("input"), py::arg("g1"),
        py::arg("b1"), py::arg("w1"), py::arg("g2"), py::arg("b2"), py::arg("w2"), py::arg("eps"), slopes);
  m.def("autocast_transition_forward", &autocast_transition_forward, py::arg("input"), py::arg("mean"), py::arg("var"),
        py::arg("weight"), py::arg("bias"), py::arg("conv_weight"), py::arg("training"), py::arg("eps"), gate);
  m.def("transition_forward", &dnf::cuda_emu::transition_forward, py::arg("input"), py::arg("mean"), py::arg("var"),
        py::arg("weight"), py::arg("bias"), py::arg("conv_weight"), py::arg("training"), py::arg("eps"), gate);
  m.def("transition_backward", &dnf::cuda_emu::transition_backward, py::arg("grad_output"), py::arg("input"),
        py::arg("mean"), py::arg("var"), py::arg("weight"), py::arg("bias"), py::arg("conv_weight"),
        py::arg("training"), py::arg("eps"), gate);
  m.def("norm_relu_pool_forward", &dnf::cuda_emu::norm_relu_pool_forward, py::arg("input"), py::arg("mean"),
        py::arg("var"), py::arg("weight"), py::arg("bias"), py::arg("training"), py::arg("eps"), gate);
  m.def("norm_relu_pool_backward", &dnf::cuda_emu::norm_relu_pool_backward, py::arg("grad_output"), py::arg("input"),
        py::arg("mean"), py::arg("var"), py::arg("weight"), py::arg("bias"), py::arg("training"), py::arg("eps"),
        gate);
  m.def("channel_moments", &dnf::cuda_emu::channel_moments);
  m.def("sample_moments", &dnf::cuda_emu::sample_moments);
  m.def("bn_relu_gemm", &bn_relu_gemm);
  m.def("bn_relu_gemm_grid", &bn_relu_gemm_grid);
  m.def("use_fused_bn_gemm", &use_fused_bn_gemm);
  m.def("set_compute_capabilities", &set_compute_capabilities);
  m.def("for_each_config", &for_each_config);
  m.def("gemm_blocks_run", &gemm_blocks_run);
  m.def("take_launch_log", &take_launch_log);
  m.def("divmod", &divmod);
  m.def("dropped_pixels", &dropped_pixels);
}
