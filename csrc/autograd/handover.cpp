#include "autograd/handover.h"

#include <torch/library.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

#include "common/layout.h"

namespace dnf::handover {
namespace {

class TagSet {
 public:
  void add(const at::Tensor& t) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = tags_.begin(); it != tags_.end();) it = it->second.expired() ? tags_.erase(it) : std::next(it);
    tags_.emplace(t.unsafeGetTensorImpl(), c10::weak_intrusive_ptr<c10::TensorImpl>(t.getIntrusivePtr()));
  }
  bool has(const at::Tensor& t) {
    if (!t.defined()) return false;
    std::lock_guard<std::mutex> lock(mutex_);
    auto it = tags_.find(t.unsafeGetTensorImpl());
    return it != tags_.end() && !it->second.expired();
  }

 private:
  std::mutex mutex_;
  std::unordered_map<const c10::TensorImpl*, c10::weak_intrusive_ptr<c10::TensorImpl>> tags_;
};

TagSet& sole_readers() {
  static TagSet set;
  return set;
}
TagSet& fresh_grads() {
  static TagSet set;
  return set;
}
std::atomic<int64_t> taken{0};

}  // namespace

void mark_sole_reader(const at::Tensor& buffer) { sole_readers().add(buffer); }
bool is_sole_reader(const at::Tensor& input) { return sole_readers().has(input); }
void mark_fresh(const at::Tensor& grad) { fresh_grads().add(grad); }
bool is_fresh(const at::Tensor& grad) { return fresh_grads().has(grad); }

bool can_take_over(const at::Tensor& grad, const at::Tensor& buffer) {
  // The tag first: a traced (fake) gradient is never tagged, so its symbolic sizes are not compared.
  return is_fresh(grad) && grad.device() == buffer.device() && grad.scalar_type() == buffer.scalar_type() &&
         grad.sizes() == buffer.sizes() && grad.is_contiguous(dnf::cl_format(buffer));
}

int64_t taken_count() { return taken.load(); }
void count_taken() { ++taken; }

}  // namespace dnf::handover

// Python access: the operator densenet_fast::_handover (csrc/ops.cpp), so that the library needs no libtorch_python
// (a C++ program loads it without Python). The Python synchronised block tags and reads the same registry.
namespace {

int64_t handover_op(const std::optional<at::Tensor>& tensor, int64_t action) {
  using namespace dnf::handover;
  if (action == 4) return taken_count();
  TORCH_CHECK(tensor.has_value() && tensor->defined(), "_handover: tensor: expected a tensor for action ", action);
  switch (action) {
    case 0: mark_sole_reader(*tensor); return 1;
    case 1: return is_sole_reader(*tensor);
    case 2: mark_fresh(*tensor); return 1;
    case 3: return is_fresh(*tensor);
    default: TORCH_CHECK(false, "_handover: action: expected 0..4, got ", action);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CompositeExplicitAutograd, m) { m.impl("_handover", &handover_op); }
