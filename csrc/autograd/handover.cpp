#include "autograd/handover.h"

#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

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

// Python access (densenet_fast._C): the Python synchronised block tags and reads the same registry.
namespace {

PyObject* tensor_fn(PyObject* arg, void (*mark)(const at::Tensor&), bool (*test)(const at::Tensor&)) {
  if (!THPVariable_Check(arg)) {
    PyErr_Format(PyExc_TypeError, "expected a Tensor, got %s", Py_TYPE(arg)->tp_name);
    return nullptr;
  }
  const at::Tensor& t = THPVariable_Unpack(arg);
  if (mark != nullptr) {
    mark(t);
    Py_RETURN_NONE;
  }
  if (test(t)) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

PyObject* py_mark_sole_reader(PyObject*, PyObject* a) { return tensor_fn(a, dnf::handover::mark_sole_reader, nullptr); }
PyObject* py_is_sole_reader(PyObject*, PyObject* a) { return tensor_fn(a, nullptr, dnf::handover::is_sole_reader); }
PyObject* py_mark_fresh(PyObject*, PyObject* a) { return tensor_fn(a, dnf::handover::mark_fresh, nullptr); }
PyObject* py_is_fresh(PyObject*, PyObject* a) { return tensor_fn(a, nullptr, dnf::handover::is_fresh); }
PyObject* py_taken_count(PyObject*, PyObject*) { return PyLong_FromLongLong(dnf::handover::taken_count()); }

PyMethodDef methods[] = {
    {"mark_sole_reader", py_mark_sole_reader, METH_O, "Tags a block buffer read by exactly one fused reader."},
    {"is_sole_reader", py_is_sole_reader, METH_O, "Whether a tensor carries the sole-reader tag."},
    {"mark_fresh", py_mark_fresh, METH_O, "Tags a reader's fresh input gradient (the block may update it)."},
    {"is_fresh", py_is_fresh, METH_O, "Whether a gradient carries the fresh tag."},
    {"handover_taken_count", py_taken_count, METH_NOARGS, "Block backward passes that took a handed-over gradient."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

PyMethodDef* dnf_handover_methods() { return methods; }
