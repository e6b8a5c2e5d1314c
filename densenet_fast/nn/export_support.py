"""How the fused modules meet the tools that capture a model instead of running it.

* ``torch.onnx.export(..., dynamo=True)``: while it runs (``torch.onnx.is_in_onnx_export()``), every
  fused module takes its plain PyTorch path (the computation torchvision/timm do), so the captured
  graph holds standard ATen ops only, which the exporter translates to standard ONNX ops. Nothing to
  change in user code; ``torch.export.export`` is not affected and keeps the fused operators.
* ``torch.fx`` symbolic tracing (torchvision's ``create_feature_extractor``): ``DenseBlock``,
  ``Transition`` and ``SqueezeExcite`` record themselves as one ``call_module`` node (a leaf), so the
  traced module calls the fused modules and its tensors are the eager model's.
* TorchScript: ``torch.jit.script`` compiles a scriptable copy of each fused module and model
  (:mod:`densenet_fast.nn.torchscript`), which runs the fused operators (docs/deployment.md).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import fx, nn

__all__ = ["exporting_to_onnx", "fx_leaf_call", "prepare_scriptable"]


def exporting_to_onnx() -> bool:
    """Whether ``torch.onnx.export`` is capturing the model (standard ATen ops only, then)."""
    if not torch.compiler.is_compiling() and "torch.onnx" not in sys.modules:
        return False  # torch.onnx is imported lazily: never imported, nothing is exporting
    return torch.onnx.is_in_onnx_export()


def fx_leaf_call(module: nn.Module, *args) -> Optional[fx.Proxy]:
    """Under ``torch.fx`` symbolic tracing (an argument is a ``Proxy``), records ``module(*args)`` as a
    single ``call_module`` node and returns its proxy; ``None`` when not tracing.

    The tracer's own ``is_leaf_module`` only knows ``torch.nn`` modules; this makes our modules leaves
    for every tracer (torchvision's feature extraction included) without ``tracer_kwargs``."""
    proxy = next((a for a in args if isinstance(a, fx.Proxy)), None)
    if proxy is None:
        return None
    tracer = proxy.tracer
    path = tracer.path_of_module(module)
    if not path:  # the traced root itself: a call_module node needs a submodule to call
        raise TypeError(f"torch.fx: a densenet_fast {type(module).__name__} is traced as a single node of the "
                        "model that contains it; trace that model (or wrap the module in an nn.Sequential), not "
                        "the module itself")
    return tracer.create_proxy("call_module", path, args, {})


def prepare_scriptable(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of the fused modules and models: torch.jit.script calls it before compiling and
    compiles the scriptable copy it returns (same children, parameters, buffers and state_dict)."""
    from densenet_fast.nn.torchscript import scriptable  # imported on use: it imports the modules that use this

    return scriptable(module)
