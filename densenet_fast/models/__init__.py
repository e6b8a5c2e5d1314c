from densenet_fast.models.densenet import (DenseNet, densenet121, densenet161, densenet169, densenet201,
                                           densenet_bc, load_weights, remap_legacy_keys)

__all__ = ["DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet_bc", "load_weights",
           "remap_legacy_keys"]
