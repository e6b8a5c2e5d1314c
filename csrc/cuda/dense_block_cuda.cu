// CUDA kernels of densenet_fast::dense_block_forward / dense_block_backward and their LeakyReLU / PReLU variants
// dense_block_act_forward / dense_block_act_backward (see dense_block_impl.h).
#include <torch/library.h>

#include "cuda/dense_block_impl.h"

namespace dnf::cuda {

TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("dense_block_forward", &dense_block_forward);
  m.impl("dense_block_backward", &dense_block_backward);
  m.impl("dense_block_act_forward", &dense_block_act_forward);
  m.impl("dense_block_act_backward", &dense_block_act_backward);
}

}  // namespace dnf::cuda
