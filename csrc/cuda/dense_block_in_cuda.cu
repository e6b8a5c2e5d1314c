// CUDA kernels of densenet_fast::dense_block_in_forward / dense_block_in_backward, the InstanceNorm dense block (see
// dense_block_in_impl.h).
#include <torch/library.h>

#include "cuda/dense_block_in_impl.h"

namespace dnf::cuda {

TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("dense_block_in_forward", &dense_block_in_forward);
  m.impl("dense_block_in_backward", &dense_block_in_backward);
}

}  // namespace dnf::cuda
