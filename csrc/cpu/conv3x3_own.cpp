// The engine of a float32 dense layer's 3x3 passes and the tensor-level calls of our kernel (conv3x3_own.h).
#include "cpu/conv3x3_own.h"

#include "cpu/amx_gemm.h"
#include "cpu/f32_gemm.h"
#include "cpu/best_of.h"
#include "cpu/switches.h"
#include "cpu/workspace.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <sstream>
#include <tuple>
#include <vector>

namespace dnf::cpu {
namespace {

const char* pass_label(int p) { return p == 0 ? "forward" : p == 1 ? "input_grad" : "weight_grad"; }

std::vector<int64_t> ones(int64_t dims) { return std::vector<int64_t>(dims, 1); }
std::vector<int64_t> zeros(int64_t dims) { return std::vector<int64_t>(dims, 0); }

std::vector<int64_t> act_shape(const ConvFrame& f, int64_t c) {
  return f.dims == 3 ? std::vector<int64_t>{f.N, c, f.D, f.H, f.W} : std::vector<int64_t>{f.N, c, f.H, f.W};
}
at::MemoryFormat cl(int64_t dims) {
  return dims == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

using ShapeKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t>;  // dims, D, H, W, cin, cout
struct ShapeChoice {
  bool own[3] = {false, false, false};
  double secs[3][2] = {};  // [pass][oneDNN, own]; 0 where not measured
};

std::mutex g_mutex;
std::map<ShapeKey, ShapeChoice> g_shapes;
std::string g_how;

// Seconds of the three passes [pass][oneDNN, own] on x [N, cin, ...], dout [N, cout, ...] (channels_last) and w
// [cout, cin, 3..] (contiguous): the best of each, `rounds` rounds alternating the engines. Our forward reads
// an input padded beforehand (the block's BN2 + ReLU writes it so); our input gradient pads dout first, as the
// block's backward does.
std::array<std::array<double, 2>, 3> time_passes(const ConvFrame& f, const at::Tensor& x, const at::Tensor& dout,
                                                 const at::Tensor& w, int rounds) {
  const int64_t dims = f.dims, cin = x.size(1), cout = dout.size(1);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor w_cl = w.contiguous(cl(dims));
  const at::Tensor xp = zero_padded_lines(f, cin), dp = zero_padded_lines(f, cout);
  pad_lines(x.data_ptr<float>(), f, cin, xp.data_ptr<float>());
  at::Tensor out = at::empty({f.rows(), cout}, opts), dx = at::empty({f.rows(), cin}, opts);
  at::Tensor dw = at::empty(w.sizes(), opts);
  auto run = [&](int pass, bool own) {
    if (!own) {
      if (pass == 0) at::convolution(x, w_cl, {}, ones(dims), ones(dims), ones(dims), false, zeros(dims), 1);
      if (pass == 1) at::convolution(dout, w_cl, {}, ones(dims), ones(dims), ones(dims), true, zeros(dims), 1);
      if (pass == 2)
        at::convolution_backward(dout, x, w_cl, c10::nullopt, ones(dims), ones(dims), ones(dims), false, zeros(dims),
                                 1, {false, true, false});
      return;
    }
    const float* wp = w.data_ptr<float>();
    if (pass == 0) {
      own_conv3x3_forward(xp.data_ptr<float>(), f, conv3x3_pack_forward(wp, cout, cin, f.taps()),
                          out.data_ptr<float>(), cout);
    } else if (pass == 1) {
      pad_lines(dout.data_ptr<float>(), f, cout, dp.data_ptr<float>());
      own_conv3x3_forward(dp.data_ptr<float>(), f, conv3x3_pack_input_grad(wp, cout, cin, f.taps()),
                          dx.data_ptr<float>(), cin);
    } else {
      conv3x3_f32_weight_grad(x.data_ptr<float>(), cin, dout.data_ptr<float>(), cout, f, dw.data_ptr<float>());
    }
  };
  std::array<std::array<double, 2>, 3> secs;
  for (auto& s : secs) s[0] = s[1] = 1e30;
  for (int round = 0; round < rounds; ++round)
    for (int p = 0; p < 3; ++p)
      for (int e = 0; e < 2; ++e) secs[p][e] = std::min(secs[p][e], best_of([&] { run(p, e == 1); }));
  return secs;
}

// The choice for a shape: its passes timed on random data, five rounds alternating.
ShapeChoice measure(const ConvFrame& shape, int64_t cin, int64_t cout) {
  ConvFrame f = shape;
  // The block's own batch (up to 32 MiB of input): on one sample of densenet121's 56x56 layer the input stays in L2
  // and our weight gradient timed equal to oneDNN's, on the batch of 8 it took 1.28x oneDNN's time.
  const int64_t sample_bytes = f.D * f.H * f.W * cin * int64_t(sizeof(float));
  f.N = std::clamp<int64_t>((int64_t(32) << 20) / std::max<int64_t>(sample_bytes, 1), 1, shape.N);
  const auto gen = at::make_generator<at::CPUGeneratorImpl>(/*seed=*/20261207);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor x = at::randn(act_shape(f, cin), gen, opts).relu_().contiguous(cl(f.dims));
  const at::Tensor dout = at::randn(act_shape(f, cout), gen, opts).contiguous(cl(f.dims));
  std::vector<int64_t> ws{cout, cin};
  ws.insert(ws.end(), f.dims, 3);
  const auto secs = time_passes(f, x, dout, at::randn(ws, gen, opts).mul_(0.05), 5);
  ShapeChoice c;
  for (int p = 0; p < 3; ++p) {
    c.secs[p][0] = secs[p][0], c.secs[p][1] = secs[p][1];
    c.own[p] = secs[p][1] <= 1.1 * secs[p][0];
  }
  return c;
}

std::string shape_name(const ShapeKey& k) {
  std::ostringstream s;
  const auto [dims, D, H, W, cin, cout] = k;
  s << dims << "d ";
  if (dims == 3) s << D << "x";
  s << H << "x" << W << " " << cin << "->" << cout;
  return s.str();
}

}  // namespace

std::vector<double> time_passes_for_op(const ConvFrame& f, const at::Tensor& x, const at::Tensor& dout,
                                       const at::Tensor& w, int64_t rounds) {
  const auto secs = time_passes(f, x, dout, w, int(rounds));
  std::vector<double> out;
  for (const auto& s : secs) out.push_back(s[0]), out.push_back(s[1]);
  return out;
}

ConvFrame conv_frame(int64_t N, int64_t D, int64_t H, int64_t W, int64_t dims) {
  ConvFrame f;
  f.N = N, f.D = dims == 3 ? D : 1, f.H = H, f.W = W, f.dims = dims;
  return f;
}

bool own_conv3x3(const ConvFrame& f, int64_t cin, int64_t cout, ConvPass pass) {
  const std::string forced = cpu_switch("DNF_CPU_CONV3X3", {"own", "onednn"});
  if (!f32_kernel_available() || forced == "onednn" || f.rows() == 0) return false;
  // A timed choice may differ between processes (and with it the float32 result's last bits): under
  // torch.use_deterministic_algorithms(True) our kernel runs on every shape, untimed.
  if (forced == "own") return true;
  // Rule: a 3-D input gradient stays on oneDNN unless forced. On ours, MONAI DenseNet121's 3-D step (batch 2, 96^3)
  // peaked at 142 MiB against 116 (fixed mmap threshold), for a few percent of speed; the cause is not found yet.
  if (pass == ConvPass::kInputGrad && f.dims == 3) return false;
  if (at::globalContext().deterministicAlgorithms()) return true;
  const ShapeKey key{f.dims, f.D, f.H, f.W, cin, cout};
  std::lock_guard<std::mutex> lock(g_mutex);
  auto it = g_shapes.find(key);
  if (it == g_shapes.end()) it = g_shapes.emplace(key, measure(f, cin, cout)).first;
  return it->second.own[int(pass)];
}

std::string own_conv3x3_report() {
  const std::string forced = cpu_switch("DNF_CPU_CONV3X3", {"own", "onednn"});
  std::ostringstream out;
  out << "{\"how\": \"";
  if (!f32_kernel_available()) {
    out << "onednn: our kernel needs the AVX-512 build";
  } else if (!forced.empty()) {
    out << forced << ": forced by DNF_CPU_CONV3X3";
  } else if (at::globalContext().deterministicAlgorithms()) {
    out << "own: rule under torch.use_deterministic_algorithms(True) (no timed choice; 3-D input gradients on "
           "oneDNN)";
  } else {
    out << "measured per shape on its first use (own where <= 1.1x oneDNN); rule: 3-D input gradients on oneDNN";
  }
  out << "\", \"bfloat16\": \"";
  if (!amx_kernel_available()) {
    out << "onednn: our bfloat16 kernel needs AMX";
  } else if (!use_amx_kernel()) {
    out << "onednn: the AMX kernels are off (DNF_CPU_AMX_KERNEL=0)";
  } else if (forced == "onednn") {
    out << "onednn: forced by DNF_CPU_CONV3X3";
  } else {
    out << "own: where input and output channels are multiples of 32, else onednn; rule: 3-D input gradients on "
           "oneDNN";
  }
  out << "\", \"shapes\": {";
  std::lock_guard<std::mutex> lock(g_mutex);
  bool first = true;
  for (const auto& [key, c] : g_shapes) {
    out << (first ? "" : ", ") << "\"" << shape_name(key) << "\": {";
    for (int p = 0; p < 3; ++p)
      out << "\"" << pass_label(p) << "\": [\"" << (c.own[p] ? "own" : "onednn") << "\", "
          << int64_t(c.secs[p][0] * 1e6) << ", " << int64_t(c.secs[p][1] * 1e6) << "]" << (p < 2 ? ", " : "");
    out << "}";
    first = false;
  }
  out << "}}";
  return out.str();
}

at::Tensor zero_padded_lines(const ConvFrame& f, int64_t c) {
  at::Tensor t = empty_mapped({f.padded_rows(), c}, at::TensorOptions().dtype(at::kFloat),
                              at::MemoryFormat::Contiguous, OnFree::kUnmap);
  float* p = t.data_ptr<float>();
  const int64_t Wp = f.W + 2;
  // only the padding pixels: every other row is written before it is read
  at::parallel_for(0, f.lines(), 64, [&](int64_t l0, int64_t l1) {
    for (int64_t line = l0; line < l1; ++line) {
      std::memset(p + line * Wp * c, 0, sizeof(float) * c);
      std::memset(p + (line * Wp + Wp - 1) * c, 0, sizeof(float) * c);
    }
  });
  return t;
}

void pad_lines(const float* src, const ConvFrame& f, int64_t c, float* dst) {
  const int64_t Wp = f.W + 2;
  at::parallel_for(0, f.lines(), 16, [&](int64_t l0, int64_t l1) {
    for (int64_t line = l0; line < l1; ++line)
      std::memcpy(dst + (line * Wp + 1) * c, src + line * f.W * c, sizeof(float) * f.W * c);
  });
}

void own_conv3x3_lines(const float* Xp, const ConvFrame& f, const Conv3x3Weight& w, float* out, int64_t ld_out,
                       int64_t l0, int64_t l1, int64_t xp_line0) {
  at::parallel_for(l0, l1, 1, [&](int64_t t0, int64_t t1) {
    conv3x3_f32_lines(Xp, f, w, out + (t0 - l0) * f.W * ld_out, ld_out, t0, t1, xp_line0);
  });
}

void own_conv3x3_forward(const float* Xp, const ConvFrame& f, const Conv3x3Weight& w, float* out, int64_t ld_out) {
  own_conv3x3_lines(Xp, f, w, out, ld_out, 0, f.lines());
}

bool own_bf16_conv3x3(int64_t cin, int64_t cout, ConvPass pass, int64_t dims) {
  const std::string forced = cpu_switch("DNF_CPU_CONV3X3", {"own", "onednn"});
  if (!amx_conv3x3_fits(cin, cout) || !use_amx_kernel() || forced == "onednn") return false;
  // Rule, as the float32 kernel's: a 3-D input gradient stays on oneDNN unless forced (MONAI DenseNet121's 3-D step
  // under autocast, batch 2, 96^3: 151 MiB against 138 with it on ours, and no faster).
  return pass == ConvPass::kForward || dims == 2 || forced == "own";
}

AmxConvFrame amx_conv_frame(int64_t N, int64_t D, int64_t H, int64_t W, int64_t dims) {
  AmxConvFrame g;
  g.N = N, g.D = dims == 3 ? D : 1, g.H = H, g.W = W, g.dims = dims;
  return g;
}

int64_t amx_frame_line_row(const AmxConvFrame& g, int64_t line) {
  const int64_t h = line % g.H, d = (line / g.H) % g.D, n = line / (g.H * g.D);
  return g.row(n, d, h, 0);
}

void fill_amx_frame(const c10::BFloat16* src, const AmxConvFrame& g, int64_t c, c10::BFloat16* frame) {
  at::parallel_for(0, g.N * g.D * g.H, 16, [&](int64_t l0, int64_t l1) {
    for (int64_t line = l0; line < l1; ++line)
      std::memcpy(frame + amx_frame_line_row(g, line) * c, src + line * g.W * c, sizeof(c10::BFloat16) * g.W * c);
  });
}

at::Tensor zero_amx_frame(const AmxConvFrame& g, int64_t cin) {
  at::Tensor t = empty_mapped({g.rows(), cin}, at::TensorOptions().dtype(at::kBFloat16), at::MemoryFormat::Contiguous,
                              OnFree::kUnmap);
  std::memset(t.data_ptr(), 0, t.nbytes());  // fresh pages: the kernel's page faults, on the calling thread
  return t;
}

}  // namespace dnf::cpu

namespace {

// own_conv3x3(a, b, pass_) on float32 tensors of the 3x3 convolution (stride 1, padding 1), for tests and
// benchmarks: pass_ 0: the forward of input a [N, C, (D,) H, W] with weight b [K, C, 3, 3(, 3)]; 1: the input
// gradient of output gradient a [N, K, ...] through weight b; 2: the weight gradient of output gradient a with
// input b ([N, C, ...]); the result channels_last for 0 and 1, [K, C, 3..] for 2. A bfloat16 a: the forward or the
// input gradient on the AMX kernel, b the float32 master weight, the result bfloat16.
// The bfloat16 forward (pass_ 0 on a bfloat16 input a, weight b its float32 master) or input gradient (pass_ 1, a the
// output gradient) on our AMX kernel (cpu/conv3x3_bf16.h).
at::Tensor own_conv3x3_bf16(const at::Tensor& a, const at::Tensor& b, bool input_grad) {
  using namespace dnf::cpu;
  TORCH_CHECK(b.scalar_type() == at::kFloat, "own_conv3x3: b: expected the float32 master weight of a bfloat16 "
              "input, got ", b.scalar_type());
  TORCH_CHECK(amx_kernel_available(), "own_conv3x3: the bfloat16 kernel needs AMX (DNF_CPU_ISA=avx512 on an AMX CPU)");
  const int64_t dims = a.dim() - 2;
  TORCH_CHECK(dims == 2 || dims == 3, "own_conv3x3: a: expected 4 or 5 dims, got ", a.dim());
  const int64_t c_dim = input_grad ? 0 : 1;  // b's dimension of a's channels
  TORCH_CHECK(b.dim() == a.dim() && b.size(c_dim) == a.size(1), "own_conv3x3: b: expected ",
              input_grad ? "[" + std::to_string(a.size(1)) + ", C, 3..]"
                         : "[K, " + std::to_string(a.size(1)) + ", 3..]",
              " with ", a.dim(), " dims, got ", b.sizes());
  for (int64_t d = 2; d < b.dim(); ++d)
    TORCH_CHECK(b.size(d) == 3, "own_conv3x3: b: expected a 3x3 kernel, got ", b.sizes());
  const int64_t cin = a.size(1), cout = b.size(1 - c_dim);
  TORCH_CHECK(amx_conv3x3_fits(cin, cout), "own_conv3x3: the bfloat16 kernel needs input and output channels "
              "multiples of 32, got ", cin, " and ", cout);
  const AmxConvFrame g = amx_conv_frame(a.size(0), dims == 3 ? a.size(2) : 1, a.size(-2), a.size(-1), dims);
  const auto fmt = dims == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  const at::Tensor A = a.contiguous(fmt);
  const at::Tensor frame = zero_amx_frame(g, cin);
  c10::BFloat16* dst = frame.data_ptr<c10::BFloat16>();
  fill_amx_frame(A.data_ptr<c10::BFloat16>(), g, cin, dst);
  std::vector<int64_t> os = a.sizes().vec();
  os[1] = cout;
  at::Tensor out = at::empty(os, a.options().memory_format(fmt));
  const at::Tensor w = b.contiguous();
  const float* wp = w.data_ptr<float>();
  amx_conv3x3_frame(dst, g, input_grad ? amx_conv3x3_pack_input_grad(wp, cin, cout, g.taps())
                                       : amx_conv3x3_pack(wp, cout, cin, g.taps()),
                    out.data_ptr<c10::BFloat16>(), cout);
  return out;
}

at::Tensor own_conv3x3_op(const at::Tensor& a, const at::Tensor& b, int64_t pass) {
  using namespace dnf::cpu;
  TORCH_CHECK(pass >= 0 && pass <= 2, "own_conv3x3: pass_: expected 0, 1 or 2, got ", pass);
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "own_conv3x3: expected CPU tensors");
  if (a.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(pass <= 1, "own_conv3x3: a bfloat16 input has the forward and the input gradient (pass_ 0 or 1), "
                "got pass_ ", pass);
    return own_conv3x3_bf16(a, b, pass == 1);
  }
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat,
              "own_conv3x3: expected float32 tensors, got ", a.scalar_type(), " and ", b.scalar_type());
  const int64_t dims = a.dim() - 2;
  TORCH_CHECK(dims == 2 || dims == 3, "own_conv3x3: a: expected 4 or 5 dims, got ", a.dim());
  TORCH_CHECK(b.dim() == a.dim(), "own_conv3x3: b: expected ", a.dim(), " dims, got ", b.dim());
  TORCH_CHECK(f32_kernel_available(), "own_conv3x3: needs the AVX-512 kernels (DNF_CPU_ISA=avx512 on an AVX-512 CPU)");
  const auto fmt = dims == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  const ConvFrame f = conv_frame(a.size(0), dims == 3 ? a.size(2) : 1, a.size(-2), a.size(-1), dims);
  const at::Tensor A = a.contiguous(fmt);
  if (pass == 2) {
    TORCH_CHECK(b.sizes().slice(2) == a.sizes().slice(2) && b.size(0) == a.size(0),
                "own_conv3x3: b: expected the input of a's shape but for channels, got ", b.sizes());
    const int64_t cout = a.size(1), cin = b.size(1);
    std::vector<int64_t> ws{cout, cin};
    ws.insert(ws.end(), dims, 3);
    at::Tensor dw = at::empty(ws, a.options());
    conv3x3_f32_weight_grad(b.contiguous(fmt).data_ptr<float>(), cin, A.data_ptr<float>(), cout, f,
                            dw.data_ptr<float>());
    return dw;
  }
  for (int64_t d = 2; d < b.dim(); ++d)
    TORCH_CHECK(b.size(d) == 3, "own_conv3x3: b: expected a 3x3 kernel, got ", b.sizes());
  const at::Tensor w = b.contiguous();
  const int64_t cin_w = w.size(1), cout_w = w.size(0);
  const int64_t c_in = pass == 0 ? cin_w : cout_w, c_out = pass == 0 ? cout_w : cin_w;
  TORCH_CHECK(a.size(1) == c_in, "own_conv3x3: a: expected ", c_in, " channels, got ", a.size(1));
  const Conv3x3Weight P = pass == 0 ? conv3x3_pack_forward(w.data_ptr<float>(), cout_w, cin_w, f.taps())
                                    : conv3x3_pack_input_grad(w.data_ptr<float>(), cout_w, cin_w, f.taps());
  const at::Tensor xp = zero_padded_lines(f, c_in);
  pad_lines(A.data_ptr<float>(), f, c_in, xp.data_ptr<float>());
  std::vector<int64_t> os = a.sizes().vec();
  os[1] = c_out;
  at::Tensor out = at::empty(os, a.options().memory_format(fmt));
  own_conv3x3_forward(xp.data_ptr<float>(), f, P, out.data_ptr<float>(), c_out);
  return out;
}

// Seconds [forward oneDNN, forward own, input_grad oneDNN, input_grad own] of the bfloat16 passes on x [N, C, ...],
// dout [N, K, ...] (bfloat16) and w [K, C, 3..] (float32 master), the best of `rounds` alternating rounds. Ours runs
// on frames laid out once beforehand (the block's BN2 + ReLU writes the forward's; the input gradient's frame fill is
// timed, as in the block) and packs its weight in each run; oneDNN gets the weight rounded and laid out once.
std::vector<double> own_conv3x3_bf16_times_op(const at::Tensor& x, const at::Tensor& dout, const at::Tensor& w,
                                              int64_t rounds) {
  using namespace dnf::cpu;
  TORCH_CHECK(amx_kernel_available(), "own_conv3x3_bf16_times: needs AMX");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && dout.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kFloat,
              "own_conv3x3_bf16_times: expected bfloat16 x and dout and a float32 w");
  const int64_t dims = x.dim() - 2;
  TORCH_CHECK((dims == 2 || dims == 3) && dout.dim() == x.dim() && w.dim() == x.dim(),
              "own_conv3x3_bf16_times: expected 4-D or 5-D x, dout, w of one rank");
  const int64_t C = x.size(1), K = dout.size(1);
  TORCH_CHECK(amx_conv3x3_fits(C, K), "own_conv3x3_bf16_times: channels must be multiples of 32, got ", C, ", ", K);
  const auto fmt = dims == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  const AmxConvFrame g = amx_conv_frame(x.size(0), dims == 3 ? x.size(2) : 1, x.size(-2), x.size(-1), dims);
  const at::Tensor X = x.contiguous(fmt), D = dout.contiguous(fmt), wc = w.contiguous();
  const at::Tensor wb = w.to(at::kBFloat16).contiguous(fmt);
  const at::Tensor fx = zero_amx_frame(g, C), fd = zero_amx_frame(g, K);
  auto fill = [&](const at::Tensor& src, const at::Tensor& frame, int64_t c) {
    fill_amx_frame(src.data_ptr<c10::BFloat16>(), g, c, frame.data_ptr<c10::BFloat16>());
  };
  fill(X, fx, C);
  at::Tensor out = at::empty(D.sizes(), D.options().memory_format(fmt));
  at::Tensor dx = at::empty(X.sizes(), X.options().memory_format(fmt));
  const float* wp = wc.data_ptr<float>();
  auto run = [&](int pass, bool own) {
    if (!own) {
      at::convolution(pass == 0 ? X : D, wb, {}, ones(dims), ones(dims), ones(dims), pass == 1, zeros(dims), 1);
    } else if (pass == 0) {
      amx_conv3x3_frame(fx.data_ptr<c10::BFloat16>(), g, amx_conv3x3_pack(wp, K, C, g.taps()),
                        out.data_ptr<c10::BFloat16>(), K);
    } else {
      fill(D, fd, K);
      amx_conv3x3_frame(fd.data_ptr<c10::BFloat16>(), g, amx_conv3x3_pack_input_grad(wp, K, C, g.taps()),
                        dx.data_ptr<c10::BFloat16>(), C);
    }
  };
  std::vector<double> secs(4, 1e30);
  for (int64_t round = 0; round < rounds; ++round)
    for (int p = 0; p < 2; ++p)
      for (int e = 0; e < 2; ++e) secs[2 * p + e] = std::min(secs[2 * p + e], best_of([&] { run(p, e == 1); }));
  return secs;
}

std::vector<double> own_conv3x3_times_op(const at::Tensor& x, const at::Tensor& dout, const at::Tensor& w,
                                         int64_t rounds) {
  using namespace dnf::cpu;
  TORCH_CHECK(f32_kernel_available(), "own_conv3x3_times: needs the AVX-512 kernels");
  TORCH_CHECK(x.scalar_type() == at::kFloat && dout.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat,
              "own_conv3x3_times: expected float32 tensors");
  const int64_t dims = x.dim() - 2;
  TORCH_CHECK((dims == 2 || dims == 3) && dout.dim() == x.dim() && w.dim() == x.dim(),
              "own_conv3x3_times: expected 4-D or 5-D x, dout, w of one rank");
  const auto fmt = dims == 3 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
  const ConvFrame f = conv_frame(x.size(0), dims == 3 ? x.size(2) : 1, x.size(-2), x.size(-1), dims);
  const auto secs = time_passes_for_op(f, x.contiguous(fmt), dout.contiguous(fmt), w.contiguous(), rounds);
  return secs;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(densenet_fast, m) {
  m.def("own_conv3x3(Tensor a, Tensor b, int pass_) -> Tensor", &own_conv3x3_op);
  m.def("own_conv3x3_report() -> str", [] { return dnf::cpu::own_conv3x3_report(); });
  // GFLOP/s of a bare AVX-512 FMA loop on the intra-op threads (the benchmarks' peak; AVX-512 builds only).
  m.def("fma_peak_gflops(int iters) -> float", [](int64_t iters) {
    TORCH_CHECK(dnf::cpu::f32_kernel_available(), "fma_peak_gflops: needs the AVX-512 kernels");
    TORCH_CHECK(iters > 0, "fma_peak_gflops: iters: expected > 0, got ", iters);
    return dnf::cpu::fma_peak_gflops(iters);
  });
  // Seconds [forward, input_grad, weight_grad] x [oneDNN, own] of x [N, C, ...], dout [N, K, ...], w [K, C, 3..]
  // (float32), the best of `rounds` alternating rounds (benchmarks/bench_conv3x3.py).
  m.def("own_conv3x3_times(Tensor x, Tensor dout, Tensor w, int rounds) -> float[]", &own_conv3x3_times_op);
  // The same for the bfloat16 forward and input gradient on our AMX kernel: [forward oneDNN, forward own,
  // input_grad oneDNN, input_grad own] (benchmarks/bench_conv3x3.py).
  m.def("own_conv3x3_bf16_times(Tensor x, Tensor dout, Tensor w, int rounds) -> float[]",
        &own_conv3x3_bf16_times_op);
}
