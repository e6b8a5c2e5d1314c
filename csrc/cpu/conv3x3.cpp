// The dense layer's 3x3 convolution and the compute dtype of a bfloat16 block's passes (conv3x3.h).
#include "cpu/conv3x3.h"

#include "cpu/best_of.h"
#include "cpu/bf16_rows.h"
#include "cpu/switches.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <vector>

namespace dnf::cpu {
namespace {

std::vector<int64_t> ones(int64_t dims) { return std::vector<int64_t>(dims, 1); }
std::vector<int64_t> zeros(int64_t dims) { return std::vector<int64_t>(dims, 0); }

at::Tensor conv_raw(const at::Tensor& x, const at::Tensor& w, int64_t dims) {
  return at::convolution(x, w, {}, ones(dims), ones(dims), ones(dims), false, zeros(dims), 1);
}
at::Tensor weight_grad_raw(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w, int64_t dims) {
  return std::get<1>(at::convolution_backward(dout, x, w, c10::nullopt, ones(dims), ones(dims), ones(dims), false,
                                              zeros(dims), 1, {false, true, false}));
}
at::Tensor input_grad_raw(const at::Tensor& dout, const at::Tensor& w, int64_t dims) {
  return at::convolution(dout, w, {}, ones(dims), ones(dims), ones(dims), /*transposed=*/true, zeros(dims), 1);
}

const char* pass_name(int p) { return p == 0 ? "forward" : p == 1 ? "input_grad" : "weight_grad"; }

struct RankChoice {
  std::once_flag once;
  bool chosen = false;
  at::ScalarType dtype[3] = {at::kBFloat16, at::kBFloat16, at::kBFloat16};
  std::string how;
};
RankChoice g_rank[2];  // 2-D, 3-D

// Relative max error of oneDNN's bfloat16 3-D weight gradient on a depth-2 volume against the float32 one of
// the same (bfloat16-valued) operands; inf when it is not finite.
double probe_3d_weight_grad() {
  const auto gen = at::make_generator<at::CPUGeneratorImpl>(/*seed=*/20261207);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor x = at::randn({2, 16, 2, 3, 3}, gen, opts).to(at::kBFloat16);
  const at::Tensor w = at::randn({8, 16, 3, 3, 3}, gen, opts).to(at::kBFloat16);
  const at::Tensor dout = at::randn({2, 8, 2, 3, 3}, gen, opts).to(at::kBFloat16);
  const at::Tensor got = weight_grad_raw(dout, x, w, 3).to(at::kFloat);
  const at::Tensor want = weight_grad_raw(dout.to(at::kFloat), x.to(at::kFloat), w.to(at::kFloat), 3);
  if (!at::isfinite(got).all().item<bool>()) return INFINITY;
  return (got - want).abs().max().item<double>() / std::max(want.abs().max().item<double>(), 1e-30);
}

// Whether oneDNN computes bfloat16 convolutions natively: the CPU has AVX512_BF16 or AMX and ONEDNN_MAX_CPU_ISA
// (or its old name DNNL_MAX_CPU_ISA) does not cap oneDNN below them. Elsewhere oneDNN emulates bfloat16 at a
// fraction of its float32 rate (every pass ~3.5x slower on an AVX-512 Xeon without them, docs/design.md §14).
bool onednn_native_bf16(std::string* why) {
  if (!__builtin_cpu_supports("avx512bf16")) {  // every CPU with AMX-BF16 has it too
    *why = "the CPU has neither AVX512_BF16 nor AMX";
    return false;
  }
  for (const char* name : {"ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"}) {
    const char* raw = std::getenv(name);
    if (raw == nullptr) continue;
    std::string v(raw);
    for (auto& ch : v) ch = char(std::toupper(static_cast<unsigned char>(ch)));
    for (const char* cap : {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})
      if (v == cap) {
        *why = std::string(name) + "=" + raw + " caps oneDNN below its bfloat16 instructions";
        return false;
      }
  }
  return true;
}

void choose(RankChoice& c, int64_t dims) {
  const std::string forced = cpu_switch("DNF_CPU_BF16_CONV", {"bf16", "fp32"});
  std::ostringstream how;
  if (!forced.empty()) {
    for (auto& d : c.dtype) d = forced == "fp32" ? at::kFloat : at::kBFloat16;
    how << "forced by DNF_CPU_BF16_CONV";
  } else if (std::string why; !onednn_native_bf16(&why)) {
    // No timing where the answer is known: a process started under load once timed emulated bfloat16 faster
    // (15.5 vs 24.9 ms, against 0.8 vs 0.2 ms unloaded) and ran its step 1.65x slower.
    for (auto& d : c.dtype) d = at::kFloat;
    how << "rule: float32, " << why;
  } else {
    // A densenet121 layer of block 3 (2-D: 14x14, batch 4; 3-D: a volume of as many rows), the float32 passes
    // timed with their widening casts. Five rounds alternating, the best of each; float32 must win by 10%. (With
    // three, a process started while the other agents' builds held the 2 cores picked bfloat16 for the forward,
    // 3.5x slower than float32 unloaded: each run is shorter than a time slice, so more runs find a clean one.)
    const std::vector<int64_t> sp = dims == 2 ? std::vector<int64_t>{14, 14} : std::vector<int64_t>{6, 6, 6};
    const int64_t n = 4;
    auto shape = [&](int64_t ch) {
      std::vector<int64_t> s{n, ch};
      s.insert(s.end(), sp.begin(), sp.end());
      return s;
    };
    const auto cl = dims == 2 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
    const auto bf = at::TensorOptions().dtype(at::kBFloat16);
    const at::Tensor x = at::ones(shape(128), bf).contiguous(cl), dout = at::ones(shape(32), bf).contiguous(cl);
    std::vector<int64_t> ws{32, 128};
    ws.insert(ws.end(), dims, 3);
    const at::Tensor w = at::full(ws, 0.01, bf).contiguous(cl);
    auto run = [&](int p, bool fp32) {
      const at::Tensor xx = fp32 ? x.to(at::kFloat) : x, ww = fp32 ? w.to(at::kFloat) : w;
      const at::Tensor dd = fp32 ? dout.to(at::kFloat) : dout;
      if (p == 0) return conv_raw(xx, ww, dims);
      if (p == 1) return input_grad_raw(dd, ww, dims).to(at::kBFloat16);
      return weight_grad_raw(dd, xx, ww, dims);
    };
    double secs[3][2];
    for (auto& s : secs) s[0] = s[1] = 1e30;
    for (int round = 0; round < 5; ++round)
      for (int p = 0; p < 3; ++p)
        for (int f = 0; f < 2; ++f) secs[p][f] = std::min(secs[p][f], best_of([&] { run(p, f == 1); }));
    how << "measured";
    for (int p = 0; p < 3; ++p) {
      c.dtype[p] = secs[p][1] < 0.9 * secs[p][0] ? at::kFloat : at::kBFloat16;
      how << " " << pass_name(p) << " bf16=" << int64_t(secs[p][0] * 1e6) << "us fp32=" << int64_t(secs[p][1] * 1e6)
          << "us";
    }
  }
  if (dims == 3 && c.dtype[2] == at::kBFloat16) {
    const double err = probe_3d_weight_grad();
    if (!(err < 0.05)) {
      c.dtype[2] = at::kFloat;
      how << "; weight_grad in float32: oneDNN's bfloat16 3-D weight gradient failed the depth-2 probe (rel err "
          << err << ")";
    } else {
      how << "; depth-2 weight-gradient probe passed (rel err " << err << ")";
    }
  }
  c.how = how.str();
  c.chosen = true;
}

RankChoice& rank(int64_t dims) {
  TORCH_CHECK(dims == 2 || dims == 3, "densenet_fast: the 3x3 convolution has 2 or 3 spatial dims, got ", dims);
  RankChoice& c = g_rank[dims - 2];
  std::call_once(c.once, [&] { choose(c, dims); });
  return c;
}

// x in the pass's compute dtype.
at::Tensor in_compute(const at::Tensor& x, int64_t dims, ConvPass pass) {
  if (x.scalar_type() != at::kBFloat16) return x;
  return bf16_conv_compute(dims, pass) == at::kFloat ? x.to(at::kFloat) : x;
}

// dst (channels_last) = src (contiguous [K, C, S]) rounded to bfloat16, as O: serial (the ~37K values of a
// densenet121 weight, where the casts and the layout copy were three parallel copies, each one ~5 ms whenever
// another process held one of the two cores); the layout first, then one narrowing pass (bf16_rows.h on CPUs
// with AVX512_BF16: the per-value rounding took ~1% of a bfloat16 step on the main thread).
template <typename O>
void round_to_cl(const float* src, int64_t K, int64_t C, int64_t S, O* dst) {
  std::vector<float> cl(K * C * S);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t s = 0; s < S; ++s) cl[(k * S + s) * C + c] = src[(k * C + c) * S + s];
  if constexpr (std::is_same_v<O, c10::BFloat16>) {
    if (native_bf16_rows()) return narrow_native(cl.data(), int64_t(cl.size()), dst);
  }
  for (size_t i = 0; i < cl.size(); ++i) dst[i] = O(c10::BFloat16(cl[i]));
}

}  // namespace

at::Tensor conv3x3_weight(const at::Tensor& master, at::ScalarType storage, int64_t dims, ConvPass pass) {
  const auto cl = dims == 2 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  if (storage != at::kBFloat16) return master.to(storage).contiguous(cl);
  const at::Tensor m = master.to(at::kFloat).contiguous();  // a float32 master: itself
  const at::ScalarType compute = bf16_conv_compute(dims, pass);
  at::Tensor out = at::empty(m.sizes(), m.options().dtype(compute).memory_format(cl));
  const int64_t K = m.size(0), C = m.size(1), S = K * C == 0 ? 0 : m.numel() / (K * C);
  if (compute == at::kFloat) {
    round_to_cl(m.data_ptr<float>(), K, C, S, out.data_ptr<float>());
  } else {
    round_to_cl(m.data_ptr<float>(), K, C, S, out.data_ptr<c10::BFloat16>());
  }
  return out;
}

at::ScalarType bf16_conv_compute(int64_t dims, ConvPass pass) { return rank(dims).dtype[int(pass)]; }

at::Tensor conv3x3(const at::Tensor& x, const at::Tensor& w, int64_t dims) {
  return conv_raw(in_compute(x, dims, ConvPass::kForward), in_compute(w, dims, ConvPass::kForward), dims);
}

at::Tensor conv3x3_weight_grad(const at::Tensor& dout, const at::Tensor& x, const at::Tensor& w, int64_t dims) {
  const auto p = ConvPass::kWeightGrad;
  return weight_grad_raw(in_compute(dout, dims, p), in_compute(x, dims, p), in_compute(w, dims, p), dims);
}

at::Tensor conv3x3_input_grad(const at::Tensor& dout, const at::Tensor& w, int64_t dims) {
  const auto p = ConvPass::kInputGrad;
  return input_grad_raw(in_compute(dout, dims, p), in_compute(w, dims, p), dims).to(dout.scalar_type());
}

std::string bf16_conv_report() {
  std::ostringstream out;
  out << "{";
  for (int64_t dims = 2; dims <= 3; ++dims) {
    const RankChoice& c = rank(dims);
    out << (dims == 2 ? "" : ", ") << "\"" << dims << "d\": {";
    for (int p = 0; p < 3; ++p)
      out << "\"" << pass_name(p) << "\": \"" << (c.dtype[p] == at::kFloat ? "float32" : "bfloat16") << "\", ";
    out << "\"how\": \"" << c.how << "\"}";
  }
  out << "}";
  return out.str();
}

}  // namespace dnf::cpu

// bf16_conv_compute(dims, pass) -> "float32" | "bfloat16": for the Python side (a 2-D model's conv0 under CPU
// bfloat16 autocast follows the 2-D choice: densenet_fast/nn/fused_features.py); runs the rank's one-time choice.
TORCH_LIBRARY_FRAGMENT(densenet_fast, m) {
  m.def("bf16_conv_compute(int dims, int pass_) -> str", [](int64_t dims, int64_t pass) -> std::string {
    TORCH_CHECK(pass >= 0 && pass <= 2, "bf16_conv_compute: pass_: expected 0 (forward), 1 (input_grad) or 2 "
                "(weight_grad), got ", pass);
    return dnf::cpu::bf16_conv_compute(dims, static_cast<dnf::cpu::ConvPass>(pass)) == at::kFloat ? "float32"
                                                                                                 : "bfloat16";
  });
}
