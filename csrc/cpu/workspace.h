// Memory of the CPU kernels' large activations (docs/design.md §11, "Mapped pool").
//
// The block buffers, the backward's working tensors and the readers' input gradients are allocated from
// private anonymous mappings instead of glibc's heap. On the heap, many transient buffers of different sizes
// freed out of order (and glibc's 64-byte-aligned allocations, which an exactly fitting hole cannot serve)
// left resident holes: a densenet121 step's RSS peak varied by up to 70% between runs. The pool keeps freed
// mappings for reuse (no page faults in steady state) but never holds more than the high-water mark of its
// live bytes: a request it cannot serve first unmaps free mappings (least recently freed first) until
// live + free + request <= max(high-water mark, live + request). Its resident bytes are therefore at most
// the peak of its live tensors. Small tensors go to the default CPU allocator, and so does every tensor when
// DNF_CPU_POOL=0.
//
// Declarations only (no inline code), so the per-ISA builds may include it anywhere (csrc/cpu/isa.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace dnf::cpu {

// What becomes of a pool tensor's mapping when the tensor is freed.
enum class OnFree {
  kKeep,   // kept for reuse (within the high-water mark)
  kUnmap,  // returned to the OS: a call's private workspace, whose next user would be the next training step's
           // same call; kept, it would sit at the end of the step, where the parameter gradients (allocated
           // through the backward) make the step's other memory peak
};

// An uninitialised tensor of `shape` in `format` (dtype and device from `opts`, a CPU device), from the pool
// when it holds at least kMappedMinBytes (csrc/cpu/workspace.cpp), else from the default CPU allocator.
at::Tensor empty_mapped(at::IntArrayRef shape, const at::TensorOptions& opts, at::MemoryFormat format,
                        OnFree on_free = OnFree::kKeep);

// The same in channels_last (4-D) / channels_last_3d (5-D): the layout of every activation (common/layout.h).
at::Tensor empty_cl_mapped(at::IntArrayRef shape, const at::TensorOptions& opts, OnFree on_free = OnFree::kKeep);

// Unmaps every free mapping and resets the high-water mark to the live bytes (as glibc's malloc_trim, or
// torch.cuda.empty_cache for the CUDA caching allocator): torch.ops.densenet_fast.cpu_pool_release().
void release_free_mappings();

// The pool's counters as JSON (live, free and high-water bytes, mappings made, reuses):
// torch.ops.densenet_fast.cpu_pool_stats().
std::string mapped_pool_stats();

// Whether the pool serves large tensors (DNF_CPU_POOL unset or 1), else the default CPU allocator does.
bool pool_enabled();

}  // namespace dnf::cpu
