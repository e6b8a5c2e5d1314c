// CUDA kernels of the transition, final-norm and channel-moments operators (see tail_impl.h).
#include <torch/library.h>

#include "cuda/tail_impl.h"

namespace dnf::cuda {

TORCH_LIBRARY_IMPL(densenet_fast, CUDA, m) {
  m.impl("transition_forward", &transition_forward);
  m.impl("transition_backward", &transition_backward);
  m.impl("norm_relu_pool_forward", &norm_relu_pool_forward);
  m.impl("norm_relu_pool_backward", &norm_relu_pool_backward);
  m.impl("channel_moments", &channel_moments);
  m.impl("sample_moments", &sample_moments);
}

}  // namespace dnf::cuda
