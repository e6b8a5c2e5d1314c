"""CIFAR DenseNet-BC (plain and SE), built on the ImageNet-style ``DenseNet`` and ``SEDenseNet``."""
from __future__ import annotations

from typing import Optional

from densenet_fast.models.densenet import DenseNet, WeightsLike, load_weights, positive_int
from densenet_fast.models.se_densenet import SEDenseNet, check_se_placement, check_se_ratio


def densenet_bc(depth: int = 100, growth_rate: int = 12, num_classes: int = 10, compression: float = 0.5,
                bn_size: int = 4, drop_rate: float = 0.0, memory_efficient: bool = False, *, impl: str = "fused",
                weights: WeightsLike = None, in_channels: int = 3, se_ratio: Optional[float] = None,
                se_placement: str = "block", sync_bn: bool = False) -> DenseNet:
    """CIFAR DenseNet-BC (Huang et al.): 3x3 stem with 2k channels, three blocks of (depth-4)/6 layers,
    transitions compressing by ``compression``, no max-pool. Input [N, 3, 32, 32] -> [N, num_classes].

    ``se_ratio``: None (plain DenseNet-BC) or a ratio in (0, 1], which builds an SE-DenseNet-BC
    (``SEDenseNet``) with SE modules at ``se_placement`` ("block": on
    each dense block's output, blocks stay fused; "layer": on each dense layer's new channels, blocks run
    the per-layer reference path). ``sync_bn``: every norm an ``nn.SyncBatchNorm`` (see ``DenseNet``).
    """
    check_se_placement(se_placement)
    se_kwargs = {} if se_ratio is None else {"se_ratio": check_se_ratio(se_ratio),
                                             "se_placement": se_placement}
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
        raise ValueError(f"depth: DenseNet-BC needs depth = 6*n + 4 with n >= 1 layers per block "
                         f"(e.g. 40, 100, 190, 250), got {depth!r}")
    positive_int("growth_rate", growth_rate)
    n = (depth - 4) // 6
    net = DenseNet if se_ratio is None else SEDenseNet
    model = net(growth_rate, (n, n, n), 2 * growth_rate, bn_size, drop_rate, num_classes, memory_efficient,
                impl=impl, compression=compression, stem="cifar", in_channels=in_channels, sync_bn=sync_bn,
                **se_kwargs)
    return load_weights(model, weights)
