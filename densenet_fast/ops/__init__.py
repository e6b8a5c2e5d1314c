"""Registered operators (``torch.ops.densenet_fast.*``): fake kernels, autograd and Python entry points."""
from densenet_fast.ops import (
    _no_double_backward,  # noqa: F401,E402  (clear error on double backward)
    instance_block,  # noqa: F401  (fake kernels of the InstanceNorm block)
    squeeze_excite,  # noqa: F401  (registers the SE operators)
)
from densenet_fast.ops.dense_block import BlockOutput, BlockParams, fused_dense_block
from densenet_fast.ops.squeeze_excite import se_gate
from densenet_fast.ops.stem import bn_relu_maxpool
from densenet_fast.ops.tail import channel_moments, norm_relu_pool, transition

__all__ = ["BlockOutput", "BlockParams", "fused_dense_block", "channel_moments", "norm_relu_pool", "transition",
           "se_gate", "bn_relu_maxpool"]
