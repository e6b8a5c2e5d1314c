"""densenet_fast: memory-efficient DenseNet and squeeze-and-excitation for PyTorch.

Importing never needs a GPU and never compiles: it loads the prebuilt extension ``densenet_fast._C``
(which registers ``torch.ops.densenet_fast.*``) and raises an ImportError with rebuild instructions if
it is missing or was built against another torch.
"""
from densenet_fast._extension import build_info, load_extension
from densenet_fast._version import __version__

load_extension()

from densenet_fast import ops  # noqa: E402  (registers fake kernels and autograd)
from densenet_fast.convert import ConversionReport, conversion_report, convert, set_impl  # noqa: E402
from densenet_fast.cpu_pool import cpu_pool_release, cpu_pool_stats  # noqa: E402
from densenet_fast.inference import fold_for_inference  # noqa: E402
from densenet_fast.models import (  # noqa: E402
    DenseNet,
    DenseNet3d,
    SEDenseNet,
    densenet121,
    densenet121_3d,
    densenet161,
    densenet169,
    densenet169_3d,
    densenet201,
    densenet201_3d,
    densenet264_3d,
    densenet_bc,
    se_densenet121,
    se_densenet169,
    se_densenet201,
)
from densenet_fast.nn import DenseBlock, DenseLayer, SqueezeExcite, Transition  # noqa: E402
from densenet_fast.nn.sync_batchnorm import DistributedDataParallel  # noqa: E402

__all__ = ["__version__", "build_info", "ops", "DenseNet", "densenet121", "densenet161", "densenet169",
           "densenet201", "densenet_bc", "SEDenseNet", "se_densenet121", "se_densenet169", "se_densenet201",
           "DenseBlock", "DenseLayer", "Transition", "SqueezeExcite", "convert", "conversion_report", "set_impl",
           "ConversionReport", "fold_for_inference", "DenseNet3d", "densenet121_3d", "densenet169_3d",
           "densenet201_3d", "densenet264_3d", "DistributedDataParallel", "cpu_pool_stats", "cpu_pool_release"]
