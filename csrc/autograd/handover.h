// Gradient hand-over tags (docs/design.md §11), shared by the C++ autograd of the fused readers and the
// dense block and by the Python synchronised block (densenet_fast/ops/common.py, through the operator
// densenet_fast::_handover).
//
// * sole reader: a block buffer that FusedFeatures hands to exactly one fused reader; that reader's input
//   gradient is then something nothing else can read.
// * fresh: such a reader's freshly allocated input gradient; the block's backward may update it in place.
//
// A tag belongs to a TensorImpl, as the Python attributes it replaces belonged to a tensor object. The
// registry holds weak references, so a tagged tensor's memory is never kept alive (and its address not
// reused by another tensor while tagged); expired entries are dropped on the next tag.
#pragma once

#include <ATen/ATen.h>

namespace dnf::handover {

void mark_sole_reader(const at::Tensor& buffer);
bool is_sole_reader(const at::Tensor& input);
void mark_fresh(const at::Tensor& grad);
bool is_fresh(const at::Tensor& grad);

// Whether a block's backward may use `grad` as its working gradient: fresh, and already what the block
// would copy it into (buffer's device, dtype, shape and channels_last layout).
bool can_take_over(const at::Tensor& grad, const at::Tensor& buffer);

// How many backward passes of a block took a handed-over gradient (tests observe the hand-over with it).
int64_t taken_count();
void count_taken();

}  // namespace dnf::handover
