// Timing for the CPU kernels' measured choices (conv3x3.cpp, conv3x3_own.cpp).
#pragma once

#include <algorithm>
#include <chrono>

namespace dnf::cpu {

// Seconds of the fastest of `reps` runs of fn, the first (warm-up: oneDNN's primitive creation, page faults) dropped.
template <typename Fn>
double best_of(Fn fn, int reps = 4) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0) best = std::min(best, s);
  }
  return best;
}

}  // namespace dnf::cpu
