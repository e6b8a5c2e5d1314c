// The mapped pool of the CPU kernels' large activations (workspace.h; docs/design.md §11).
#include "cpu/workspace.h"
#include "cpu/switches.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>

namespace dnf::cpu {
namespace {

// Below this a tensor comes from the default CPU allocator: glibc serves it from its heap, where holes of at
// most this size cost little, and a mapping per small tensor would cost a system call and page faults.
constexpr size_t kMappedMinBytes = size_t(1) << 20;

size_t page_size() {
  static const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return page;
}

size_t round_up(size_t n, size_t to) { return (n + to - 1) / to * to; }

struct Mapping {
  void* ptr;
  size_t bytes;
  uint64_t freed_at;  // order of release: the least recently freed mapping is unmapped first
};

class MappedPool final : public c10::Allocator {
 public:
  MappedPool() {
    // A child forked while another thread holds the lock must not inherit it locked.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
  }

  static MappedPool& instance() {
    static MappedPool* pool = new MappedPool();  // never destroyed: tensors may outlive static destructors
    return *pool;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMappedMinBytes) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = round_up(n, page_size());
    void* p = take(bytes);
    return {p, p, &MappedPool::give_back, c10::Device(c10::DeviceType::CPU)};
  }

  // The same, unmapped when freed (OnFree::kUnmap).
  c10::DataPtr allocate_unmapped_on_free(size_t n) {
    if (n < kMappedMinBytes) return c10::GetCPUAllocator()->allocate(n);
    void* p = take(round_up(n, page_size()));
    return {p, p, &MappedPool::give_back_unmap, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }

  void release() {
    std::vector<Mapping> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      evicted.swap(free_);
      free_bytes_ = 0;
      high_water_ = live_bytes_;
    }
    unmap(evicted);
  }

  std::string stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    std::ostringstream s;
    s << "{\"live_bytes\": " << live_bytes_ << ", \"free_bytes\": " << free_bytes_
      << ", \"high_water_bytes\": " << high_water_ << ", \"maps\": " << maps_ << ", \"unmaps\": " << unmaps_
      << ", \"reuses\": " << reuses_ << ", \"mapped_min_bytes\": " << kMappedMinBytes
      << ", \"enabled\": " << (pool_enabled() ? "true" : "false") << "}";
    return s.str();
  }

 private:
  // A mapping of `bytes` (a page multiple): the best-fitting free one, else a new one.
  void* take(size_t bytes) {
    std::vector<Mapping> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // Reuse a free mapping at most 1/8 larger (the excess stays resident while the tensor lives).
      const size_t most = bytes + std::max(bytes / 8, page_size());
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes >= bytes && it->bytes <= most && (best == free_.end() || it->bytes < best->bytes)) best = it;
      }
      if (best != free_.end()) {
        void* p = best->ptr;
        const size_t got = best->bytes;
        free_.erase(best);
        free_bytes_ -= got;
        add_live(p, got);
        ++reuses_;
        return p;
      }
      // A new mapping: first unmap free ones (least recently freed first) so that the pool's resident bytes,
      // live + free, stay within the high-water mark of its live bytes.
      const size_t limit = std::max(high_water_, live_bytes_ + bytes);
      std::sort(free_.begin(), free_.end(), [](const Mapping& a, const Mapping& b) { return a.freed_at < b.freed_at; });
      size_t drop = 0;
      while (drop < free_.size() && live_bytes_ + free_bytes_ + bytes > limit) free_bytes_ -= free_[drop++].bytes;
      evicted.assign(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(drop));
      free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(drop));
      live_bytes_ += bytes;  // reserved now: another thread's request sees it
      high_water_ = std::max(high_water_, live_bytes_);
    }
    unmap(evicted);
    void* p = map(bytes);
    if (p == nullptr) {  // the free mappings count towards a memory limit too (RLIMIT_DATA): drop them, retry
      release();
      p = map(bytes);
    }
    std::lock_guard<std::mutex> lock(mutex_);
    live_bytes_ -= bytes;
    if (p == nullptr) {
      const int err = errno;
      TORCH_CHECK_WITH(OutOfMemoryError, false, "densenet_fast: out of memory: cannot map ", bytes,
                       " bytes for a CPU activation (", std::strerror(err), "); the pool holds ", live_bytes_,
                       " live bytes");
    }
    add_live(p, bytes);
    ++maps_;
    return p;
  }

  // Called with the lock held.
  void add_live(void* p, size_t bytes) {
    live_.emplace(p, bytes);
    live_bytes_ += bytes;
    high_water_ = std::max(high_water_, live_bytes_);
    report(p, static_cast<int64_t>(bytes));
  }

  static void give_back(void* p) {
    MappedPool& pool = instance();
    std::lock_guard<std::mutex> lock(pool.mutex_);
    const auto it = pool.live_.find(p);
    TORCH_INTERNAL_ASSERT(it != pool.live_.end(), "densenet_fast: freeing a pointer the CPU pool did not map");
    const size_t bytes = it->second;
    pool.live_.erase(it);
    pool.live_bytes_ -= bytes;
    pool.free_.push_back({p, bytes, ++pool.clock_});
    pool.free_bytes_ += bytes;
    pool.report(p, -static_cast<int64_t>(bytes));
  }

  static void give_back_unmap(void* p) {
    MappedPool& pool = instance();
    size_t bytes;
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      const auto it = pool.live_.find(p);
      TORCH_INTERNAL_ASSERT(it != pool.live_.end(), "densenet_fast: freeing a pointer the CPU pool did not map");
      bytes = it->second;
      pool.live_.erase(it);
      pool.live_bytes_ -= bytes;
      pool.report(p, -static_cast<int64_t>(bytes));
    }
    pool.unmap({{p, bytes, 0}});
  }

  static void* map(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }

  void unmap(const std::vector<Mapping>& mappings) {
    for (const Mapping& m : mappings) munmap(m.ptr, m.bytes);
    if (!mappings.empty()) {
      std::lock_guard<std::mutex> lock(mutex_);
      unmaps_ += mappings.size();
    }
  }

  // torch.profiler(profile_memory=True) sees the pool's tensors as it sees the default allocator's.
  void report(void* p, int64_t delta) const {
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, delta, live_bytes_, live_bytes_ + free_bytes_,
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  std::mutex mutex_;
  std::unordered_map<void*, size_t> live_;
  std::vector<Mapping> free_;
  size_t live_bytes_ = 0, free_bytes_ = 0, high_water_ = 0;
  uint64_t clock_ = 0, maps_ = 0, unmaps_ = 0, reuses_ = 0;
};

}  // namespace

// The pool's allocator interface with OnFree::kUnmap (a storage allocates through its allocator again when resized).
class UnmappingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override { return MappedPool::instance().allocate_unmapped_on_free(n); }
  void copy_data(void* dest, const void* src, size_t count) const override { default_copy_data(dest, src, count); }
};

// DNF_CPU_POOL=0: every tensor from the default CPU allocator (for an allocator of the user's own, such as
// jemalloc or tcmalloc, and to measure the pool against glibc's heap). Read once per process.
bool pool_enabled() {
  static const bool on = cpu_switch("DNF_CPU_POOL", {"0", "1"}) != "0";
  return on;
}

at::Tensor empty_mapped(at::IntArrayRef shape, const at::TensorOptions& opts, at::MemoryFormat format, OnFree on_free) {
  TORCH_INTERNAL_ASSERT(opts.device().is_cpu(), "empty_mapped: a CPU tensor, got device ", opts.device());
  if (!pool_enabled()) return at::empty(shape, opts.memory_format(format));
  static UnmappingAllocator* unmapping = new UnmappingAllocator();
  c10::Allocator* alloc = on_free == OnFree::kUnmap ? static_cast<c10::Allocator*>(unmapping)
                                                    : static_cast<c10::Allocator*>(&MappedPool::instance());
  return at::detail::empty_generic(shape, alloc, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()), format);
}

at::Tensor empty_cl_mapped(at::IntArrayRef shape, const at::TensorOptions& opts, OnFree on_free) {
  return empty_mapped(shape, opts,
                      shape.size() == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast, on_free);
}

void release_free_mappings() { MappedPool::instance().release(); }

std::string mapped_pool_stats() { return MappedPool::instance().stats(); }

TORCH_LIBRARY_FRAGMENT(densenet_fast, m) {
  m.def("cpu_pool_release() -> ()", [] { release_free_mappings(); });
  m.def("cpu_pool_stats() -> str", [] { return mapped_pool_stats(); });
}

}  // namespace dnf::cpu
