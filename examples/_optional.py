"""The optional packages an example needs, imported with a message that says how to install them."""
from __future__ import annotations

import importlib
import sys
from types import ModuleType


def require(module: str, pip_name: str) -> ModuleType:
    """``import module``, or exit with a message naming the ``pip install`` that provides it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != module.split(".")[0]:
            raise  # the package is there but one of its own imports failed: show that error
        script = sys.argv[0] or "this example"
        raise SystemExit(f"{script} needs {pip_name}, which is not installed: pip install {pip_name} "
                         f"(or, in a densenet_fast checkout: pip install --no-build-isolation -e \".[medical]\")"
                         ) from err
