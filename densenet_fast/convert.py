"""``convert(model)``: make torchvision / timm DenseNets (and timm SE modules) use the fused kernels.

Walks any ``nn.Module`` and replaces, in place,

* torchvision ``_DenseBlock`` and timm ``DenseBlock``  -> :class:`densenet_fast.nn.DenseBlock`
* torchvision ``_Transition`` and timm ``DenseTransition`` (average-pool ones) -> :class:`densenet_fast.nn.Transition`
* an ``nn.Sequential`` holding dense blocks (a DenseNet's ``features``) ->
  :class:`~densenet_fast.nn.fused_features.FusedFeatures` (block -> transition fusion: the transition reuses the
  block's batch statistics)
* an exact torchvision / timm ``DenseNet`` (root or nested) gets a subclass whose ``forward`` also fuses the
  final norm + ReLU + global average pool (``__class__`` swap; ``isinstance`` still holds; a pickled converted
  model needs densenet_fast to load, its ``state_dict`` does not)
* timm ``SEModule`` -> :class:`densenet_fast.nn.squeeze_excite.SqueezeExcite` (``from_timm``)

The new container modules hold the **same** child modules as the ones they replace: every Parameter and
buffer is the same object as before, so ``state_dict`` keys and values are unchanged and an optimizer
built before the conversion keeps working. Dense layers themselves (``_DenseLayer`` / timm
``DenseLayer``) are kept as they are: the fused block reads their ``norm1/conv1/norm2/conv2``, and its
reference path (used when the fused kernels cannot run) calls them exactly as torchvision/timm do.

Blocks that cannot be fused exactly (activations other than ReLU, LeakyReLU and PReLU, blur-pool transitions,
unusual convolutions, ``track_running_stats=False``, ...) are left alone, listed in the report and warned about.
Dense blocks with LeakyReLU / PReLU activations (MONAI's ``act="leakyrelu"`` / ``"prelu"``) are fused (CPU
kernels, docs/design.md §3); their transitions and final norm, which the fused readers compute with ReLU only,
are left alone.

SyncBatchNorm: a block whose norms are ``nn.SyncBatchNorm`` (``nn.SyncBatchNorm.convert_sync_batchnorm`` before
or after ``convert``, or timm's ``convert_sync_batchnorm``) converts like any other. In distributed training its
fused modules synchronise the statistics across the process group (all-reduced per-channel sums, O(L·k)
values per block, docs/design.md §13), on CUDA and on CPU; in eval or without a process group they compute
plain batch norm, as ``SyncBatchNorm`` does. The model stays convertible both ways.
"""
from __future__ import annotations

import copy
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from torch import nn

from densenet_fast.models.densenet import DenseNet as _DnfDenseNet
from densenet_fast.nn import converted as _conv
from densenet_fast.nn.concat_block import ConcatDenseBlock, layer_unit
from densenet_fast.nn.dense_block import DenseBlock, Transition, activation_problem, block_activations, check_impl
from densenet_fast.nn.fused_features import FusedFeatures, norm_relu_kind
from densenet_fast.nn.squeeze_excite import SqueezeExcite

__all__ = ["convert", "ConversionReport", "conversion_report", "set_impl"]

REPORT_ATTR = "densenet_fast_conversion"


@dataclass
class ConversionReport:
    """What :func:`convert` did. Entries are ``(qualified module name, description)``."""

    converted: List[Tuple[str, str]] = field(default_factory=list)
    left_alone: List[Tuple[str, str]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for _, what in self.converted if what.startswith(kind))

    def __str__(self) -> str:
        lines = [f"densenet_fast.convert: {len(self.converted)} module(s) converted, "
                 f"{len(self.left_alone)} left alone"]
        lines += [f"  converted   {name or '<root>'}: {what}" for name, what in self.converted]
        lines += [f"  left alone  {name or '<root>'}: {why}" for name, why in self.left_alone]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def conversion_report(model: nn.Module) -> Optional[ConversionReport]:
    """The report :func:`convert` attached to ``model`` (``None`` if it was never converted)."""
    return getattr(model, REPORT_ATTR, None)


# -- recognising torchvision / timm classes (without importing either) --------------------------------


def _cls(module_name: str, name: str):
    mod = sys.modules.get(module_name)
    return getattr(mod, name, None) if mod is not None else None


def _is(m: nn.Module, module_name: str, name: str) -> bool:
    cls = _cls(module_name, name)
    return cls is not None and isinstance(m, cls)


def _tv(m, name):
    return _is(m, "torchvision.models.densenet", name)


def _timm(m, name):
    return _is(m, "timm.models.densenet", name)


def _same_forward(m: nn.Module, module_name: str, name: str) -> bool:
    """``m``'s class uses the original forward (a subclass that overrides forward is not ours to fuse)."""
    return type(m).forward is _cls(module_name, name).forward


def _is_sync_bn(bn: nn.Module) -> bool:
    return isinstance(bn, nn.SyncBatchNorm)


def _norm_problem(bn: nn.Module, what: str, separate_relu: Optional[nn.Module], dims: int = 2,
                  leaky_ok: bool = False) -> Optional[str]:
    """Why ``bn`` (+ the ReLU that follows it, if separate) is not BN->ReLU the fused kernels compute
    (``dims``: 2 for BatchNorm2d, 3 for BatchNorm3d). ``leaky_ok``: a separate LeakyReLU / PReLU is fine too
    (a dense layer's activations: the block kernels take their slopes; the transition and final norm do not)."""
    if _is_sync_bn(bn):
        if not (bn.affine and bn.track_running_stats):
            return f"{what} is a SyncBatchNorm without affine parameters or running statistics"
        if type(bn) is not nn.SyncBatchNorm:  # timm SyncBatchNormAct: check its activation
            act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
            if type(act) is not nn.ReLU or type(drop) is not nn.Identity:
                return f"{what} ({type(bn).__name__}) activation is {type(act).__name__}, not ReLU"
        elif separate_relu is not None and type(separate_relu) is not nn.ReLU:
            return f"{what} is followed by {type(separate_relu).__name__}, not nn.ReLU"
        return None
    want = nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d
    if not isinstance(bn, want):
        return f"{what} is {type(bn).__name__}, not {want.__name__}"
    if not (bn.affine and bn.track_running_stats):
        return f"{what} needs affine=True and track_running_stats=True"
    kind = norm_relu_kind(bn)
    if kind == "bn" and leaky_ok and isinstance(separate_relu, (nn.LeakyReLU, nn.PReLU)):
        return activation_problem(separate_relu, bn.num_features, f"the activation after {what}")
    if kind == "bn":
        if isinstance(separate_relu, (nn.LeakyReLU, nn.PReLU)):
            return (f"{what} is followed by {type(separate_relu).__name__}: the fused transition and final norm "
                    "compute ReLU only")
        if separate_relu is None or type(separate_relu) is not nn.ReLU:
            return f"{what} is followed by {type(separate_relu).__name__}, not nn.ReLU"
        return None
    if kind == "bn_relu":
        return None
    act = getattr(bn, "act", None)
    return (f"{what} ({type(bn).__name__}) activation is {type(act).__name__}"
            f"{'' if type(getattr(bn, 'drop', nn.Identity())) is nn.Identity else ' with a drop layer'}, "
            "not a plain ReLU")


def _conv_problem(conv: nn.Module, what: str, k: int, pad: int, dims: int = 2) -> Optional[str]:
    want = nn.Conv3d if dims == 3 else nn.Conv2d
    if type(conv) is not want:
        return f"{what} is {type(conv).__name__}, not nn.{want.__name__}"
    if (conv.kernel_size != (k,) * dims or conv.stride != (1,) * dims or conv.padding != (pad,) * dims
            or conv.dilation != (1,) * dims or conv.groups != 1 or conv.bias is not None
            or conv.padding_mode != "zeros"):
        return f"{what} is not a bias-free {'x'.join([str(k)] * dims)} convolution with stride 1 and padding {pad}"
    return None


# -- per-module conversion -----------------------------------------------------------------------------


def _adopt(new: nn.Module, old: nn.Module) -> nn.Module:
    """Gives ``new`` ``old``'s training flag, hook dictionaries (same objects: handles keep working)
    and any extra instance attributes."""
    new.training = old.training
    for key, value in vars(old).items():
        if "hook" in key or key not in vars(new):
            object.__setattr__(new, key, value)
    return new


def _layer_geometry_problem(where: str, i: int, layer: nn.Module, first_layer: nn.Module,
                            modules: Tuple[nn.Module, nn.Module, nn.Module, nn.Module],
                            first: Tuple[int, int, int]) -> Optional[str]:
    """Why layer i (norm1, conv1, norm2, conv2 = ``modules``) does not continue a dense block whose first
    layer reads C0 channels and has growth k and bottleneck width ``first = (C0, k, inter)``; None if it does."""
    n1, c1, n2, c2 = modules
    c0, growth, inter = first
    if (n1.num_features != c0 + i * growth or c1.in_channels != n1.num_features or c1.out_channels != inter
            or n2.num_features != inter or c2.in_channels != inter or c2.out_channels != growth):
        return f"{where} channel counts do not follow C0 + i*k (a dense block with one growth rate and bn_size)"
    if float(getattr(layer, "drop_rate", 0.0)) != float(getattr(first_layer, "drop_rate", 0.0)):
        return "its layers have different drop rates"
    return None


def _layer_problem(where: str, i: int, layer: nn.Module, first_layer: nn.Module, parts: tuple, relus: tuple,
                   dims: int, first: tuple, eps: set, sync: set) -> Optional[str]:
    """Why one dense layer (``parts`` = norm1, conv1, norm2, conv2; ``relus`` = its separate ReLUs or Nones)
    cannot be fused: its norms, its convolutions, then its geometry against the block's first layer. Adds
    the norms' eps and synchronisation to ``eps`` / ``sync`` (checked across the block afterwards)."""
    n1, c1, n2, c2 = parts
    for bn, name, relu in ((n1, "norm1", relus[0]), (n2, "norm2", relus[1])):
        p = _norm_problem(bn, f"{where} {name}", relu, dims, leaky_ok=not _is_sync_bn(bn))
        if p:
            return p
        eps.add(bn.eps)
        sync.add(_is_sync_bn(bn))
    for conv, name, k, pad in ((c1, "conv1", 1, 0), (c2, "conv2", 3, 1)):
        p = _conv_problem(conv, f"{where} {name}", k, pad, dims)
        if p:
            return p
    return _layer_geometry_problem(where, i, layer, first_layer, parts, first)


def _shared_norms_problem(eps: set, sync: set) -> Optional[str]:
    """Why a block's BatchNorms cannot run as one fused operator (one eps, all or none synchronised)."""
    if len(eps) != 1:
        return "its BatchNorms do not share one eps"
    if len(sync) != 1:
        return "it mixes SyncBatchNorm and BatchNorm"
    return None


def _block_problem(block: nn.Module) -> Optional[str]:
    layers = list(block.children())
    if not layers:
        return "empty block"
    tv = _tv(block, "_DenseBlock")
    mod, layer_cls = ("torchvision.models.densenet", "_DenseLayer") if tv else ("timm.models.densenet", "DenseLayer")
    if not _same_forward(block, mod, "_DenseBlock" if tv else "DenseBlock"):
        return f"{type(block).__name__} overrides forward"
    first = None
    eps, sync = set(), set()
    for i, layer in enumerate(layers):
        where = f"layer {i + 1}"
        if not _is(layer, mod, layer_cls) or not _same_forward(layer, mod, layer_cls):
            return f"{where} is {type(layer).__name__}, not an unmodified {layer_cls}"
        for attr in ("norm1", "conv1", "norm2", "conv2"):
            if not isinstance(getattr(layer, attr, None), nn.Module):
                return f"{where} has no {attr}"
        n1, c1, n2, c2 = layer.norm1, layer.conv1, layer.norm2, layer.conv2
        relus = (getattr(layer, "relu1", None), getattr(layer, "relu2", None)) if tv else (None, None)
        if i == 0:
            first = (n1.num_features, c2.out_channels, c1.out_channels)
        p = _layer_problem(where, i, layer, layers[0], (n1, c1, n2, c2), relus, 2, first, eps, sync)
        if p:
            return p
    return _shared_norms_problem(eps, sync) or _activations_problem(layers)


def _activations_problem(units: List[nn.Module]) -> Optional[str]:
    """Why a block's activations cannot run as one fused operator (all ReLU, or all LeakyReLU / PReLU)."""
    acts = block_activations(units)
    return acts if isinstance(acts, str) else None


def _activation_note(units: List[nn.Module]) -> str:
    """The conversion report's note on a block with LeakyReLU / PReLU activations."""
    acts = block_activations(units)
    if not isinstance(acts, list):
        return ""
    kinds = sorted({type(a).__name__ for pair in acts for a in pair})
    return f", {' / '.join(kinds)} activations fused (CPU kernels; other devices run the reference path)"


def _convert_block(block: nn.Module) -> DenseBlock:
    new = DenseBlock.__new__(DenseBlock)
    nn.ModuleDict.__init__(new, OrderedDict(block._modules))
    new.impl = "fused"
    return _adopt(new, block)


def _transition_problem(t: nn.Module) -> Optional[str]:
    tv = _tv(t, "_Transition")
    if tv and not _same_forward(t, "torchvision.models.densenet", "_Transition"):
        return f"{type(t).__name__} overrides forward"
    if not tv and not _same_forward(t, "timm.models.densenet", "DenseTransition"):
        return f"{type(t).__name__} overrides forward"
    names = list(t._modules)
    expected = ["norm", "relu", "conv", "pool"] if tv else ["norm", "conv", "pool"]
    if names != expected:
        return f"children {names} are not {expected}"
    p = _norm_problem(t.norm, "norm", t.relu if tv else None) or _conv_problem(t.conv, "conv", 1, 0)
    if p:
        return p
    return _pool_problem(t.pool, 2)


def _ntuple(v, n: int) -> tuple:
    return (v,) * n if isinstance(v, int) else tuple(v)


def _pool_problem(pool: nn.Module, dims: int) -> Optional[str]:
    """Why ``pool`` is not the 2x2 (2x2x2) average pool of the fused transition."""
    want = nn.AvgPool3d if dims == 3 else nn.AvgPool2d
    if type(pool) is not want:
        return f"pool is {type(pool).__name__} (e.g. a blur pool), which the fused transition does not compute"
    if (_ntuple(pool.kernel_size, dims) != (2,) * dims or _ntuple(pool.stride, dims) != (2,) * dims
            or _ntuple(pool.padding, dims) != (0,) * dims or pool.ceil_mode or pool.divisor_override is not None):
        return f"pool is not {want.__name__}(kernel_size=2, stride=2)"
    return None


# -- MONAI and torchxrayvision: layers that return torch.cat([x, new]) ------------------------------------

_MONAI = "monai.networks.nets.densenet"
_XRV = "torchxrayvision.models"
_SOURCES = {_MONAI: "MONAI", _XRV: "torchxrayvision"}
_UNIT_CHILDREN = ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]


def _concat_source(m: nn.Module, name: str) -> Optional[str]:
    """The module path of MONAI / torchxrayvision when ``m`` is that library's class ``name``."""
    return next((mod for mod in (_MONAI, _XRV) if _is(m, mod, name)), None)


def _spatial_dims(conv: nn.Module) -> int:
    return 3 if isinstance(conv, nn.Conv3d) else 2


def _concat_block_problem(block: nn.Module, mod: str) -> Optional[str]:
    """Why a MONAI / torchxrayvision ``_DenseBlock`` (a Sequential of concatenating layers) cannot be fused."""
    if type(block).forward is not nn.Sequential.forward:
        return f"{type(block).__name__} overrides forward"
    layers = list(block.children())
    if not layers:
        return "empty block"
    dims = first = None
    eps, sync = set(), set()
    for i, layer in enumerate(layers):
        where = f"layer {i + 1}"
        if not _is(layer, mod, "_DenseLayer") or not _same_forward(layer, mod, "_DenseLayer"):
            return f"{where} is {type(layer).__name__}, not an unmodified _DenseLayer"
        unit = layer_unit(layer)
        names = list(unit._modules)
        if names == _UNIT_CHILDREN + ["dropout"]:
            return (f"{where} has dropout_prob > 0: channel dropout ({type(unit.dropout).__name__}) is not "
                    "computed by the fused block")
        if names != _UNIT_CHILDREN:
            return f"{where} children {names} are not {_UNIT_CHILDREN}"
        if dims is None:
            dims = _spatial_dims(unit.conv1)
        n1, c1, n2, c2 = unit.norm1, unit.conv1, unit.norm2, unit.conv2
        if i == 0:
            first = (n1.num_features, c2.out_channels, c1.out_channels)
        p = _layer_problem(where, i, layer, layers[0], (n1, c1, n2, c2), (unit.relu1, unit.relu2), dims, first,
                           eps, sync)
        if p:
            return p
    return _shared_norms_problem(eps, sync) or _activations_problem([layer_unit(layer) for layer in layers])


def _concat_transition_problem(t: nn.Module) -> Optional[str]:
    if type(t).forward is not nn.Sequential.forward:
        return f"{type(t).__name__} overrides forward"
    names = list(t._modules)
    if names != ["norm", "relu", "conv", "pool"]:
        return f"children {names} are not ['norm', 'relu', 'conv', 'pool']"
    dims = _spatial_dims(t.conv)
    return (_norm_problem(t.norm, "norm", t.relu, dims) or _conv_problem(t.conv, "conv", 1, 0, dims)
            or _pool_problem(t.pool, dims))


def _convert_transition(t: nn.Module) -> Transition:
    new = Transition.__new__(Transition)
    nn.Sequential.__init__(new, OrderedDict(t._modules))
    new.impl = "fused"
    return _adopt(new, t)


def _sync_note(new: nn.Module, name: str, report: ConversionReport) -> None:
    if _is_sync_bn(new._layers()[0].norm1):
        report.notes.append(f"{name}: SyncBatchNorm -> synchronised fused path in distributed training")


def _leaf_block(m: nn.Module, name: str, report: ConversionReport) -> Optional[nn.Module]:
    """A torchvision/timm dense block -> DenseBlock; a MONAI/torchxrayvision one -> ConcatDenseBlock."""
    if _tv(m, "_DenseBlock") or _timm(m, "DenseBlock"):
        src, problem = ("torchvision _DenseBlock" if _tv(m, "_DenseBlock") else "timm DenseBlock"), _block_problem(m)
        if problem:
            report.left_alone.append((name, f"{type(m).__name__}: {problem}"))
            return m
        new = _convert_block(m)
        report.converted.append((name, f"DenseBlock <- {src} ({len(new)} layers{_activation_note(new._layers())})"))
    else:
        src = _concat_source(m, "_DenseBlock")
        if src is None:
            return None
        problem = _concat_block_problem(m, src)
        if problem:
            report.left_alone.append((name, f"{_SOURCES[src]} {type(m).__name__}: {problem}"))
            return m
        new = _adopt(ConcatDenseBlock.from_layers(OrderedDict(m._modules)), m)
        dims = _spatial_dims(new._layers()[0].conv1)
        report.converted.append((name, f"ConcatDenseBlock <- {_SOURCES[src]} _DenseBlock ({len(new)} layers, "
                                       f"{dims}-D{_activation_note(new._layers())})"))
    _sync_note(new, name, report)
    return new


def _leaf_transition(m: nn.Module, name: str, report: ConversionReport) -> Optional[nn.Module]:
    """A torchvision/timm/MONAI/torchxrayvision transition -> Transition."""
    if _tv(m, "_Transition") or _timm(m, "DenseTransition"):
        what, problem = type(m).__name__, _transition_problem(m)
        done = f"Transition <- {'torchvision _Transition' if _tv(m, '_Transition') else 'timm DenseTransition'}"
    else:
        src = _concat_source(m, "_Transition")
        if src is None:
            return None
        what, problem = f"{_SOURCES[src]} {type(m).__name__}", _concat_transition_problem(m)
        done = f"Transition <- {_SOURCES[src]} _Transition ({_spatial_dims(m.conv)}-D)" if not problem else ""
    if problem:
        report.left_alone.append((name, f"{what}: {problem}"))
        return m
    report.converted.append((name, done))
    return _convert_transition(m)


def _leaf_se(m: nn.Module, name: str, report: ConversionReport, se_cls) -> Optional[nn.Module]:
    """A timm SEModule -> SqueezeExcite (sharing its modules), when ``squeeze_excite`` is on."""
    if se_cls is None or type(m) is not _cls("timm.layers.squeeze_excite", "SEModule"):
        return None
    new = _adopt(se_cls.from_timm(m), m)
    plain = "" if new.fused else f" (plain path: {new._unfused_reason()})"
    report.converted.append((name, f"SqueezeExcite <- timm SEModule{plain}"))
    return new


def _convert_leaf(m: nn.Module, name: str, report: ConversionReport, se_cls) -> Optional[nn.Module]:
    """What ``m`` becomes if it is a module convert() swaps (itself when it is ours already or cannot be
    converted, with the reason in ``report``), or None for a container to recurse into."""
    if isinstance(m, _DnfDenseNet):
        report.notes.append(f"{name or '<root>'} is already a densenet_fast.DenseNet")
        return m
    if isinstance(m, (DenseBlock, Transition)):
        return m  # already ours
    for leaf in (_leaf_block, _leaf_transition):
        new = leaf(m, name, report)
        if new is not None:
            return new
    return _leaf_se(m, name, report, se_cls)


def _convert_container(m: nn.Module, name: str, report: ConversionReport, fuse_head: bool, visit) -> nn.Module:
    """Converts ``m``'s children (``visit``), then its ``features`` Sequential and DenseNet head."""
    for child_name, child in list(m._modules.items()):
        if child is None:
            continue
        new_child = visit(child, f"{name}.{child_name}" if name else child_name)
        if new_child is not child:
            m._modules[child_name] = new_child
    new = m
    if fuse_head and type(m) is nn.Sequential and any(isinstance(c, DenseBlock) for c in m.children()):
        new = _adopt(FusedFeatures.from_sequential(m), m)
        report.converted.append((name, "FusedFeatures <- nn.Sequential (block -> transition / final norm fusion)"))
    if fuse_head:
        _fuse_densenet_head(m, name, report)
    return new


def convert(model: nn.Module, inplace: bool = True, *, fuse_head: bool = True, squeeze_excite: bool = True,
            warn: bool = True) -> nn.Module:
    """Converts torchvision/timm dense blocks, transitions, DenseNet heads and timm SE modules in ``model``.

    Args:
        model: any ``nn.Module`` (a whole DenseNet, a backbone inside a larger model, a single block, ...).
        inplace: convert ``model`` itself (default) or a ``copy.deepcopy`` of it.
        fuse_head: swap ``features`` Sequentials for :class:`FusedFeatures` and the class of every exact
            torchvision/timm ``DenseNet`` (root or nested) for one whose forward fuses the final norm + ReLU + pool.
        squeeze_excite: replace timm ``SEModule`` instances with ``SqueezeExcite.from_timm``.
        warn: issue a ``UserWarning`` listing the dense blocks/transitions that could not be converted.

    Returns:
        The converted model: ``model`` itself unless the root module had to be replaced (e.g. ``model`` is
        a ``_DenseBlock``) or ``inplace=False``. A :class:`ConversionReport` is attached to it as
        ``densenet_fast_conversion`` (see :func:`conversion_report`); ``print`` it for a summary.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected a bool, got {type(inplace).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    memo: Dict[int, nn.Module] = {}  # a module shared by several parents is converted once
    se_cls = SqueezeExcite if squeeze_excite else None

    def visit(m: nn.Module, name: str) -> nn.Module:
        if id(m) not in memo:
            new = _convert_leaf(m, name, report, se_cls)
            memo[id(m)] = new if new is not None else _convert_container(m, name, report, fuse_head, visit)
        return memo[id(m)]

    root = visit(model, "")
    if not report.converted:
        _explain_nothing_converted(root, report)
        if warn and not report.left_alone and not report.notes and not _holds_fused_modules(root):
            warnings.warn(f"densenet_fast.convert: no dense block found in {type(root).__name__}; nothing was "
                          "converted (convert() fuses the dense blocks, transitions and heads of torchvision, timm, "
                          "MONAI and torchxrayvision DenseNets, and timm SEModules)", UserWarning, stacklevel=2)
    if warn and report.left_alone:
        warnings.warn("densenet_fast.convert: left unconverted (they run unchanged, unfused):\n" + "\n".join(
            f"  {n or '<root>'}: {why}" for n, why in report.left_alone), UserWarning, stacklevel=2)
    object.__setattr__(root, REPORT_ATTR, report)
    return root


_DENSE_LIKE = ("denseblock", "denselayer", "transition")


def _holds_fused_modules(root: nn.Module) -> bool:
    """Whether ``root`` already runs densenet_fast modules (a model of ours, or one converted before)."""
    return any(type(m).__module__.startswith("densenet_fast") for m in root.modules())


def _explain_nothing_converted(root: nn.Module, report: ConversionReport) -> None:
    """Nothing was converted: lists modules that look like dense blocks (by class name) but are of classes
    convert() does not know, so the user learns why instead of getting a silently unchanged model."""
    reported = {n for n, _ in report.left_alone}
    ours = [n + "." for n, m in root.named_modules() if type(m).__module__.startswith("densenet_fast")]
    unknown = [(n, type(m)) for n, m in root.named_modules()
               if n not in reported and any(k in type(m).__name__.lower().replace("_", "") for k in _DENSE_LIKE)
               and not type(m).__module__.startswith("densenet_fast")  # ours (and what they hold): already fused
               and not any(n.startswith(p) for p in ours)]
    if not unknown:
        return
    classes = sorted({f"{c.__module__}.{c.__qualname__}" for _, c in unknown})
    report.left_alone.append((unknown[0][0], f"{len(unknown)} dense-block-like module(s) of class(es) {classes} "
                              "are not ones convert() recognises (torchvision, timm, MONAI, torchxrayvision "
                              "DenseNets); nothing was converted"))


def _fuse_densenet_head(root: nn.Module, name: str, report: ConversionReport) -> None:
    """Swaps the class of an exact torchvision / timm DenseNet for the fused-head subclass."""
    tv_cls = _cls("torchvision.models.densenet", "DenseNet")
    timm_cls = _cls("timm.models.densenet", "DenseNet")
    monai_cls, xrv_cls = _cls(_MONAI, "DenseNet"), _cls(_XRV, "DenseNet")
    if monai_cls is not None and isinstance(root, monai_cls):
        _fuse_concat_head(root, name, report, "MONAI")
        return
    if xrv_cls is not None and isinstance(root, xrv_cls):
        _fuse_concat_head(root, name, report, "torchxrayvision")
        return
    if tv_cls is not None and isinstance(root, tv_cls):
        target, kind = _conv.FusedTorchvisionDenseNet, "torchvision"
        exact = type(root) is tv_cls
        norm_ok = lambda bn: norm_relu_kind(bn) == "bn"  # noqa: E731
    elif timm_cls is not None and isinstance(root, timm_cls):
        target, kind = _conv.FusedTimmDenseNet, "timm"
        exact = type(root) is timm_cls
        norm_ok = lambda bn: norm_relu_kind(bn) == "bn_relu"  # noqa: E731
    else:
        return
    if type(root) is target:
        return
    features = getattr(root, "features", None)
    if not isinstance(features, FusedFeatures):
        report.left_alone.append((name, f"{kind} DenseNet head: features has no convertible dense block"))
        return
    if not exact:
        report.left_alone.append((name, f"{kind} DenseNet head: {type(root).__name__} is a subclass, its forward "
                                      "is kept (final norm + ReLU + pool unfused)"))
        return
    last = list(features.children())[-1] if len(features) else None
    if last is None or not (norm_ok(last) or _is_sync_bn(last)):
        report.left_alone.append((name, f"{kind} DenseNet head: final norm {type(last).__name__} is not a fusable "
                                      "BatchNorm(+ReLU)"))
        return
    root.__class__ = target
    report.converted.append((name, f"{target.__name__} <- {kind} DenseNet (final norm + ReLU + global pool fused)"))


def set_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switches every densenet_fast module in ``model`` (converted or not) between ``"fused"`` and
    ``"reference"`` (the plain per-layer PyTorch computation, e.g. for double backward); returns ``model``."""
    check_impl(impl)
    for m in model.modules():
        if isinstance(m, _DnfDenseNet):
            m.impl = impl
        if isinstance(m, (DenseBlock, Transition, FusedFeatures)):
            m.impl = impl
    return model


def _fuse_concat_head(root: nn.Module, name: str, report: ConversionReport, kind: str) -> None:
    """Swaps the class of an exact MONAI / torchxrayvision DenseNet for its fused-head subclass."""
    if type(root).__name__.startswith("Fused") and type(root).__module__ == _conv.__name__:
        return
    target = _conv.fused_head_class(type(root))
    if not isinstance(getattr(root, "features", None), FusedFeatures):
        report.left_alone.append((name, f"{kind} DenseNet head: features has no convertible dense block"))
        return
    if target is None:
        report.left_alone.append((name, f"{kind} DenseNet head: {type(root).__name__} is a subclass, its forward "
                                      "is kept (final norm + ReLU + pool unfused)"))
        return
    last = list(root.features.children())[-1]
    if norm_relu_kind(last) != "bn" and not _is_sync_bn(last):
        report.left_alone.append((name, f"{kind} DenseNet head: final norm {type(last).__name__} is not a fusable "
                                      "BatchNorm"))
        return
    if kind == "MONAI" and not _conv.monai_pool_head(root.class_layers):
        report.left_alone.append((name, "MONAI DenseNet head: class_layers is not relu -> global average pool -> "
                                      "flatten -> out (activation other than ReLU?)"))
        return
    root.__class__ = target
    report.converted.append((name, f"{target.__name__} <- {kind} {type(root).__mro__[1].__name__} "
                                   "(final norm + ReLU + global pool fused)"))
