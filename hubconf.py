"""torch.hub entry points: ``torch.hub.load("<repo dir or owner/repo>", "densenet121", ...)``.

The package's C++ extension must be built (``pip install -e .`` or
``python setup.py build_ext --inplace`` in the repository); every entry point takes the arguments of
the function of the same name in ``densenet_fast``.
"""
dependencies = ["torch"]

from densenet_fast import (  # noqa: E402,F401
                           convert,
                           densenet121,
                           densenet161,
                           densenet169,
                           densenet201,
                           densenet_bc,
                           se_densenet121,
                           se_densenet169,
                           se_densenet201,
)
