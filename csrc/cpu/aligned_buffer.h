// A heap array on a 64-byte boundary for the CPU kernels' operands (cpu/amx_gemm.h, cpu/f32_gemm.h).
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace dnf::cpu {

// n values on a 64-byte boundary (tile rows are 64 bytes: an unaligned row spans two cache lines and loads at
// about half speed), zero-initialised unless the owner writes every value before reading it.
template <typename T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(int64_t n, bool zeroed = true)
      : p_(static_cast<T*>(std::aligned_alloc(64, (static_cast<size_t>(n) * sizeof(T) + 63) / 64 * 64))) {
    TORCH_CHECK(p_ != nullptr, "densenet_fast: out of memory allocating ", n * sizeof(T), " bytes");
    if (zeroed) std::memset(static_cast<void*>(p_.get()), 0, static_cast<size_t>(n) * sizeof(T));
  }
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> p_;
};

}  // namespace dnf::cpu
