// Choice of the CPU GEMM engine (gemm_engine.h): forced by DNF_CPU_GEMM, or measured once per process
// and dtype on a tile of the shape the fused block multiplies, and reported through
// torch.ops.densenet_fast.cpu_engine_report() (densenet_fast.build_info()["cpu_engine"]).
#include "cpu/gemm_engine.h"
#include "cpu/isa.h"

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

// DNF_CPU_GEMM: unset or "auto" = measure; "blas" or "aten" = force that engine.
int forced_engine() {
  const char* env = std::getenv("DNF_CPU_GEMM");
  if (env == nullptr || *env == '\0' || std::string(env) == "auto") return -1;
  const std::string v(env);
  if (v == "blas") return int(GemmEngine::kBlas);
  if (v == "aten") return int(GemmEngine::kAten);
  TORCH_CHECK(false, "DNF_CPU_GEMM: expected one of auto, blas, aten, got '", v, "'");
}

// Tile of the forward product Y^T[inter, rows] = W1 * U^T of a densenet121 layer.
constexpr int64_t kOut = 128, kRows = 256, kIn = 256;

// Seconds of the fastest of a few runs, measured as the kernels call it: every thread multiplies its
// own tile inside at::parallel_for (the BLAS then runs single-threaded); the slowest thread counts.
// The first run pays for first touch and JIT, and is dropped.
template <typename T, typename F>
double time_tile(GemmEngine e) {
  const int64_t nt = at::get_num_threads();
  std::vector<double> best(nt, 1e30);
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t end) {
    std::vector<T> w(kOut * kIn, T(0.5f)), u(kRows * kIn, T(0.25f));
    std::vector<F> y(kOut * kRows);
    for (int64_t t = b; t < end; ++t) {
      for (int rep = 0; rep < 8; ++rep) {
        const auto t0 = std::chrono::steady_clock::now();
        gemm_on(e, 'T', 'N', kOut, kRows, kIn, w.data(), kIn, u.data(), kIn, F(0), y.data(), kOut);
        const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (rep > 0) best[t] = std::min(best[t], s);
      }
    }
  });
  return *std::max_element(best.begin(), best.end());
}

double time_tile_for(at::ScalarType dt, GemmEngine e) {
  switch (dt) {
    case at::kFloat: return time_tile<float, float>(e);
    case at::kDouble: return time_tile<double, double>(e);
    default: return time_tile<c10::BFloat16, float>(e);
  }
}

void choose(Choice& c) {
  const int forced = forced_engine();
  if (forced >= 0) {
    const auto e = static_cast<GemmEngine>(forced);
    TORCH_CHECK(engine_available(e, c.dtype), "DNF_CPU_GEMM: the '", engine_name(e), "' engine is not available for ",
                c.dtype, " in this torch build (its BLAS symbols are missing); use 'aten' or 'auto'");
    c.engine = e;
    c.how = "forced by DNF_CPU_GEMM";
    return;
  }
  const double flop = 2.0 * kOut * kRows * kIn;
  std::ostringstream how;
  how << "measured";
  double best = 1e30;
  for (GemmEngine e : {GemmEngine::kBlas, GemmEngine::kAten}) {
    if (!engine_available(e, c.dtype)) continue;
    const double s = time_tile_for(c.dtype, e);
    how << " " << engine_name(e) << "=" << int64_t(flop / s / 1e9) << "GFLOP/s";
    // The fallback (aten) must win by a margin: a tie under a noisy load keeps the BLAS.
    if (e == GemmEngine::kBlas ? s < best : s < 0.9 * best) {
      best = s;
      c.engine = e;
    }
  }
  c.how = how.str() + " (per thread, " + std::to_string(kRows) + "x" + std::to_string(kIn) + "x" +
          std::to_string(kOut) + " tile)";
}

}  // namespace

const char* engine_name(GemmEngine e) { return e == GemmEngine::kBlas ? "blas" : "aten"; }

bool engine_available(GemmEngine e, at::ScalarType dtype) {
  if (e == GemmEngine::kAten) return true;
  switch (dtype) {
    case at::kFloat: return sgemm_ != nullptr;
    case at::kDouble: return dgemm_ != nullptr;
    case at::kBFloat16: return cblas_gemm_bf16bf16f32 != nullptr;
    default: return false;
  }
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
  // AMX tiles are what brgemm packs for: the bf16 BLAS (MKL) uses them on such CPUs.
  out << ", \"amx_bf16\": " << (at::native::cpublas::could_pack(at::kBFloat16) ? "true" : "false");
  out << ", \"kernels_isa\": \"" << isa_name(cpu_isa()) << "\"}";  // the element loops' build (isa.h)
  return out.str();
}

TORCH_LIBRARY_FRAGMENT(densenet_fast, m) {
  // JSON: {dtype: [engine, how chosen], "amx_bf16": bool, "kernels_isa": str}; runs the one-time engine choice.
  m.def("cpu_engine_report() -> str", [] { return engine_report(); });
}

}  // namespace dnf::cpu
