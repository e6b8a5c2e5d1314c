from densenet_fast.models.densenet import (
    DenseNet,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    load_weights,
    remap_legacy_keys,
)
from densenet_fast.models.densenet3d import DenseNet3d, densenet121_3d, densenet169_3d, densenet201_3d, densenet264_3d
from densenet_fast.models.densenet_bc import densenet_bc
from densenet_fast.models.se_densenet import SEDenseNet, se_densenet121, se_densenet169, se_densenet201

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet_bc", "load_weights",
           "remap_legacy_keys", "SEDenseNet", "se_densenet121", "se_densenet169", "se_densenet201",
           "DenseNet3d", "densenet121_3d", "densenet169_3d", "densenet201_3d", "densenet264_3d"]
