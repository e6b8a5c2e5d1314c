// Choice of the CPU GEMM engine (gemm_engine.h): forced by DNF_CPU_GEMM, or measured once per process
// and dtype on a tile of the shape the fused block multiplies, and reported through
// torch.ops.densenet_fast.cpu_engine_report() (densenet_fast.build_info()["cpu_engine"]).
#include "cpu/gemm_engine.h"
#include "cpu/amx_gemm.h"
#include "cpu/conv3x3.h"
#include "cpu/bf16_rows.h"
#include "cpu/f32_gemm.h"
#include "cpu/isa.h"
#include "cpu/switches.h"

#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

namespace dnf::cpu {

// dense_block_cpu.cpp: a bfloat16 block's 1x1 stage timed on the registered ISA build, computed in float32 or not.
double time_bf16_1x1_stage(bool fp32);

namespace {

struct Choice {
  at::ScalarType dtype;
  std::once_flag once;
  GemmEngine engine = GemmEngine::kBlas;
  std::string how;  // "forced by DNF_CPU_GEMM" or the measured rates
};
Choice g_choice[] = {{at::kFloat}, {at::kDouble}, {at::kBFloat16}};

Choice& choice_for(at::ScalarType dt) {
  for (Choice& c : g_choice)
    if (c.dtype == dt) return c;
  TORCH_CHECK(false, "densenet_fast: no CPU GEMM engine for dtype ", dt);
}

// DNF_CPU_GEMM: unset or "auto" = measure; "blas", "aten" or "brgemm" = force that engine.
int forced_engine() {
  const std::string v = cpu_switch("DNF_CPU_GEMM", {"blas", "aten", "brgemm"});
  if (v == "blas") return int(GemmEngine::kBlas);
  if (v == "aten") return int(GemmEngine::kAten);
  if (v == "brgemm") return int(GemmEngine::kBrgemm);
  return -1;
}

// Tile of the forward product Y^T[inter, rows] = W1 * U^T of a densenet121 layer.
constexpr int64_t kOut = 128, kRows = 256, kIn = 256;

// Seconds of the fastest of a few runs, measured as the kernels call it: every thread multiplies its
// own tile inside at::parallel_for (the BLAS then runs single-threaded); the slowest thread counts.
// The first run pays for first touch and JIT, and is dropped. make_product() builds a thread's product (its
// buffers); done() runs on each thread after its runs.
template <typename MakeProduct, typename Done>
double time_on_threads(MakeProduct make_product, Done done) {
  const int64_t nt = at::get_num_threads();
  std::vector<double> best(nt, 1e30);
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t end) {
    auto product = make_product();
    for (int64_t t = b; t < end; ++t) {
      for (int rep = 0; rep < 8; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        product();
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (rep > 0) best[t] = std::min(best[t], s);
      }
    }
    done();
  });
  return *std::max_element(best.begin(), best.end());
}

template <typename T, typename F>
double time_tile(GemmEngine e) {
  return time_on_threads(
      [e] {
        return [e, w = std::vector<T>(kOut * kIn, T(0.5f)), u = std::vector<T>(kRows * kIn, T(0.25f)),
                y = std::vector<F>(kOut * kRows)]() mutable {
          gemm_on(e, 'T', 'N', kOut, kRows, kIn, w.data(), kIn, u.data(), kIn, F(0), y.data(), kOut);
        };
      },
      [] {});
}

// The same tile through the packed brgemm path (the weight packed once, outside the timing, as
// bn_relu_gemm packs it once per call).
double time_tile_brgemm() {
  const std::vector<c10::BFloat16> w(kOut * kIn, c10::BFloat16(0.5f));
  const PackedWeightT B = pack_weight_t(w.data(), kOut, kIn);
  return time_on_threads(
      [&B] {
        return [&B, u = std::vector<c10::BFloat16>(kRows * B.kp, c10::BFloat16(0.25f)),
                y = std::vector<float>(kOut * kRows)]() mutable {
          brgemm_rows(kRows, u.data(), B.kp, B, y.data(), kOut);
        };
      },
      [] { brgemm_release_thread(); });
}

double time_tile_for(at::ScalarType dt, GemmEngine e) {
  if (e == GemmEngine::kBrgemm) return time_tile_brgemm();
  switch (dt) {
    case at::kFloat: return time_tile<float, float>(e);
    case at::kDouble: return time_tile<double, double>(e);
    default: return time_tile<c10::BFloat16, float>(e);
  }
}

void choose(Choice& c) {
  const int forced = forced_engine();
  if (forced >= 0) {
    auto e = static_cast<GemmEngine>(forced);
    c.how = "forced by DNF_CPU_GEMM";
    if (e == GemmEngine::kBrgemm && c.dtype != at::kBFloat16) {  // a bfloat16-only engine: the rest on the BLAS
      e = GemmEngine::kBlas;
      c.how += " (brgemm is bfloat16-only)";
    }
    TORCH_CHECK(engine_available(e, c.dtype), "DNF_CPU_GEMM: the '", engine_name(e), "' engine is not available for ",
                c.dtype, e == GemmEngine::kBrgemm ? " on this CPU or torch build (it needs cpublas::brgemm with "
                "packing, i.e. AMX bf16 tiles)" : " in this torch build (its BLAS symbols are missing)",
                "; use 'aten' or 'auto'");
    c.engine = e;
    return;
  }
  const double flop = 2.0 * kOut * kRows * kIn;
  std::ostringstream how;
  how << "measured";
  // Three rounds, the engines alternating, the best of each: one round under a passing load (another process
  // taking a core for a moment) picked the BLAS over a 2x faster brgemm.
  const GemmEngine engines[] = {GemmEngine::kBlas, GemmEngine::kAten, GemmEngine::kBrgemm};
  double secs[3] = {1e30, 1e30, 1e30};
  for (int round = 0; round < 3; ++round)
    for (int i = 0; i < 3; ++i)
      if (engine_available(engines[i], c.dtype)) secs[i] = std::min(secs[i], time_tile_for(c.dtype, engines[i]));
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const GemmEngine e = engines[i];
    if (!engine_available(e, c.dtype)) continue;
    const double s = secs[i];
    how << " " << engine_name(e) << "=" << int64_t(flop / s / 1e9) << "GFLOP/s";
    // The others must win by a margin: a tie under a noisy load keeps the BLAS.
    if (e == GemmEngine::kBlas ? s < best : s < 0.9 * best) {
      best = s;
      c.engine = e;
    }
  }
  c.how = how.str() + " (per thread, " + std::to_string(kRows) + "x" + std::to_string(kIn) + "x" +
          std::to_string(kOut) + " tile)";
}

// The float32 1x1 stage on a tile of kRows rows: our AVX-512 kernel (f32_gemm.h), or the same prologue and the
// engine's product as bn_relu_gemm's tile loop runs them. Our weight is packed outside the timing: a call packs
// it once for all its rows (thousands per thread), MKL packs its operands inside every tile's product.
double time_f32_stage(bool own, GemmEngine e) {
  const std::vector<float> w(kOut * kIn, 0.03f);
  const F32Weight P = f32_pack_weight(w.data(), kOut, kIn);
  return time_on_threads(
      [own, e, &w, &P] {
        return [own, e, &w, &P, x = std::vector<float>(kRows * kIn, 0.25f), ab = std::vector<float>(kIn, 0.5f),
                u = std::vector<float>(kRows * kIn), y = std::vector<float>(kOut * kRows)]() mutable {
          if (own) {
            f32_bn_relu_gemm_rows(x.data(), kIn, 0, kRows, kIn, ab.data(), ab.data(), P, y.data(), nullptr, nullptr,
                                  nullptr);
          } else {
            f32_bn_relu_rows(x.data(), kIn, kRows, kIn, ab.data(), ab.data(), u.data(), kIn);
            gemm_on(e, 'T', 'N', kOut, kRows, kIn, w.data(), kIn, u.data(), kIn, 0.0f, y.data(), kOut);
          }
        };
      },
      [] {});
}

struct F32KernelChoice {
  std::once_flag once;
  bool on = false;
  std::string how;
} g_f32_kernel;

// DNF_CPU_F32_KERNEL: unset or "auto" = measure; "1" = use it where available; "0" = never.
void choose_f32_kernel(F32KernelChoice& c) {
  const std::string v = cpu_switch("DNF_CPU_F32_KERNEL", {"0", "1"});
  if (!f32_kernel_available()) {
    c.how = "unavailable (needs the AVX-512 kernels: an AVX-512 CPU, DNF_CPU_ISA not below avx512)";
    return;
  }
  if (v == "0" || v == "1") {
    c.on = v == "1";
    c.how = "forced by DNF_CPU_F32_KERNEL";
    return;
  }
  const GemmEngine e = gemm_engine(at::kFloat);
  double own = 1e30, engine = 1e30;
  for (int round = 0; round < 3; ++round) {  // alternating, the best of each (as the engine choice)
    own = std::min(own, time_f32_stage(true, e));
    engine = std::min(engine, time_f32_stage(false, e));
  }
  c.on = own < engine;
  const double flop = 2.0 * kOut * kRows * kIn;
  std::ostringstream how;
  how << "measured own=" << int64_t(flop / own / 1e9) << "GFLOP/s " << engine_name(e) << "="
      << int64_t(flop / engine / 1e9) << "GFLOP/s (per thread, BN-ReLU prologue + " << kRows << "x" << kIn << "x"
      << kOut << " product)";
  c.how = how.str();
}

struct Bf16GemmChoice {
  std::once_flag once;
  at::ScalarType dtype = at::kBFloat16;
  std::string how;
} g_bf16_gemm;

// DNF_CPU_BF16_GEMM: unset or "auto" = measure; "bf16" or "fp32" = force that compute dtype.
void choose_bf16_gemm(Bf16GemmChoice& c) {
  const std::string v = cpu_switch("DNF_CPU_BF16_GEMM", {"bf16", "fp32"});
  if (!v.empty()) {
    c.dtype = v == "fp32" ? at::kFloat : at::kBFloat16;
    c.how = "forced by DNF_CPU_BF16_GEMM";
    return;
  }
  double secs[2] = {1e30, 1e30};  // bf16, fp32
  for (int round = 0; round < 5; ++round)  // alternating, the best of each (as the 3x3 passes' choice, conv3x3.cpp)
    for (int f = 0; f < 2; ++f) secs[f] = std::min(secs[f], time_bf16_1x1_stage(f == 1));
  // float32 must win by 3%: a tie keeps the products in bfloat16 (no widened copies).
  c.dtype = secs[1] < 0.97 * secs[0] ? at::kFloat : at::kBFloat16;
  std::ostringstream how;
  how << "measured bf16=" << int64_t(secs[0] * 1e6) << "us fp32=" << int64_t(secs[1] * 1e6)
      << "us (densenet121 block-3 layer, 1568 rows 512->128: forward 1x1 with its prologue, backward products)";
  c.how = how.str();
}

}  // namespace

at::ScalarType bf16_gemm_compute() {
  std::call_once(g_bf16_gemm.once, [] { choose_bf16_gemm(g_bf16_gemm); });
  return g_bf16_gemm.dtype;
}

const char* engine_name(GemmEngine e) {
  return e == GemmEngine::kBlas ? "blas" : e == GemmEngine::kAten ? "aten" : "brgemm";
}

bool engine_available(GemmEngine e, at::ScalarType dtype) {
  if (e == GemmEngine::kAten) return true;
  if (e == GemmEngine::kBrgemm) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
    // Packing B is what makes it fast (AMX); without it ATen's brgemm is slower than the BLAS.
    return dtype == at::kBFloat16 && cblas_gemm_bf16bf16f32 != nullptr &&
           at::native::cpublas::could_pack(at::kBFloat16);
#else
    return false;
#endif
  }
  switch (dtype) {
    case at::kFloat: return sgemm_ != nullptr;
    case at::kDouble: return dgemm_ != nullptr;
    case at::kBFloat16: return cblas_gemm_bf16bf16f32 != nullptr;
    default: return false;
  }
}

PackedWeightT pack_weight_t(const c10::BFloat16* W, int64_t n, int64_t k) {
  TORCH_CHECK(brgemm_packs(n), "densenet_fast: pack_weight_t needs n a multiple of 16, got ", n);
  PackedWeightT B;
  B.k = k, B.kp = k + (k & 1), B.n = n, B.nb = n % 64 == 0 ? 64 : n % 32 == 0 ? 32 : 16;
  B.data.assign(static_cast<size_t>(B.kp * n), c10::BFloat16(0.0f));
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  // W^T [kp, n] with a zero pad row (ATen's blocked transpose copy), then each block of nb columns packed.
  const auto opts = at::TensorOptions().dtype(at::kBFloat16);
  at::Tensor wt = at::zeros({B.kp, n}, opts);
  wt.narrow(0, 0, k).copy_(at::from_blob(const_cast<c10::BFloat16*>(W), {n, k}, opts).t());
  const c10::BFloat16* wtp = wt.data_ptr<c10::BFloat16>();
  for (int64_t j0 = 0; j0 < n; j0 += B.nb)
    at::native::cpublas::pack(B.kp, B.nb, n, B.nb, at::kBFloat16, at::kBFloat16, wtp + j0, B.data.data() + j0 * B.kp);
#endif
  return B;
}

void brgemm_rows(int64_t m, const c10::BFloat16* A, int64_t lda, const PackedWeightT& B, float* C, int64_t ldc) {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  for (int64_t j0 = 0; j0 < B.n; j0 += B.nb)
    at::native::cpublas::brgemm(m, B.nb, B.kp, lda, B.nb, ldc, /*add_C=*/false, A, B.data.data() + j0 * B.kp,
                                C + j0, /*is_vnni=*/true);
#else
  TORCH_CHECK(false, "densenet_fast: this torch build has no cpublas::brgemm");
#endif
}

void brgemm_release_thread() {
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  at::native::cpublas::brgemm_release(/*is_vnni=*/true);
#endif
}

bool use_f32_kernel() {
  std::call_once(g_f32_kernel.once, [] { choose_f32_kernel(g_f32_kernel); });
  return g_f32_kernel.on;
}

std::string f32_kernel_report() {
  use_f32_kernel();
  return g_f32_kernel.how;
}

GemmEngine gemm_engine(at::ScalarType dtype) {
  Choice& c = choice_for(dtype);
  std::call_once(c.once, [&] { choose(c); });
  return c.engine;
}

std::string engine_report() {
  std::ostringstream out;
  out << "{";
  bool first = true;
  for (Choice& c : g_choice) {
    gemm_engine(c.dtype);
    out << (first ? "" : ", ") << "\"" << c10::toString(c.dtype) << "\": [\"" << engine_name(c.engine) << "\", \""
        << c.how << "\"]";
    first = false;
  }
  // AMX tiles are what brgemm packs for (and the bf16 BLAS, MKL, uses them on such CPUs).
  out << ", \"amx_bf16\": " << (at::native::cpublas::could_pack(at::kBFloat16) ? "true" : "false");
  out << ", \"kernels_isa\": \"" << isa_name(cpu_isa()) << "\"";  // the element loops' build (isa.h)
  out << ", \"bf16_rows\": \"" << bf16_rows_name() << "\"";     // bfloat16 narrowing (bf16_rows.h)
  out << ", \"amx_kernel\": " << (use_amx_kernel() ? "true" : "false");  // amx_gemm.h: any engine
  out << ", \"f32_kernel\": [" << (use_f32_kernel() ? "true" : "false") << ", \"" << f32_kernel_report() << "\"]";
  bf16_gemm_compute();  // a bfloat16 block's 1x1 stage (gemm_engine.h)
  out << ", \"bf16_gemm\": [\"" << (g_bf16_gemm.dtype == at::kFloat ? "float32" : "bfloat16") << "\", \""
      << g_bf16_gemm.how << "\"]";
  out << ", \"bf16_conv\": " << bf16_conv_report() << "}";  // conv3x3.h: a bfloat16 block's 3x3 passes
  return out.str();
}

TORCH_LIBRARY_FRAGMENT(densenet_fast, m) {
  // JSON: {dtype: [engine, how chosen], "amx_bf16": bool, "kernels_isa": str, "bf16_rows": str, "amx_kernel": bool,
  // "f32_kernel": [bool, how chosen], "bf16_gemm": [dtype, how chosen],
  // "bf16_conv": {rank: {pass: dtype, "how": ...}}}; runs the one-time choices.
  m.def("cpu_engine_report() -> str", [] { return engine_report(); });
}

}  // namespace dnf::cpu
