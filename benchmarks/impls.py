"""The implementations compared by the benchmark, each a builder of a ready-to-train ``nn.Module``.

Every builder constructs its model on the CPU, loads the *same* torchvision ``state_dict`` (strict)
and only then moves it to the device, so all rows compute the same function.
"""
from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional

import torch
from torch import Tensor, nn

from benchmarks.specs import ModelSpec, cifar_stem

__all__ = ["Impl", "IMPLS", "BASELINE", "baseline_for", "parse_impls", "build_model", "torchvision_model"]

BASELINE = "tv"  # ratios on every 2-D row are relative to this implementation
BASELINE_3D = "monai"  # ... and on every 3-D (MONAI volume) row to MONAI's own DenseNet


def baseline_for(model: str) -> str:
    """The implementation the ratios of ``model``'s rows are relative to."""
    from benchmarks.specs import get_spec

    try:
        return BASELINE_3D if get_spec(model).spatial_dims == 3 else BASELINE
    except ValueError:  # a model name no spec knows (e.g. rows read back from elsewhere): 2-D
        return BASELINE
StateDict = Mapping[str, Tensor]


def torchvision_model(spec: ModelSpec, memory_efficient: bool = False) -> nn.Module:
    import torchvision

    if spec.spatial_dims == 3:  # 3-D specs: MONAI's DenseNet is the reference (and the shared weights)
        return _monai_model(spec)
    if spec.cifar:
        model = torchvision.models.DenseNet(spec.growth_rate, spec.block_config, spec.num_init_features,
                                            num_classes=spec.num_classes, memory_efficient=memory_efficient)
        return cifar_stem(model, spec)
    return getattr(torchvision.models, spec.name)(num_classes=spec.num_classes, memory_efficient=memory_efficient)


def _timm_model(spec: ModelSpec, checkpointing: bool) -> nn.Module:
    import timm
    from timm.models.densenet import DenseNet as TimmDenseNet

    if spec.cifar:  # timm derives num_init_features = 2 * growth_rate, as DenseNet-BC does
        model = cifar_stem(TimmDenseNet(spec.growth_rate, spec.block_config, num_classes=spec.num_classes), spec)
    else:
        model = timm.create_model(spec.name, pretrained=False, num_classes=spec.num_classes)
    if checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _dnf_model(spec: ModelSpec, impl: str) -> nn.Module:
    import densenet_fast as dnf

    if spec.cifar:
        depth = 3 * spec.block_config[0] * 2 + 4
        return dnf.densenet_bc(depth=depth, growth_rate=spec.growth_rate, num_classes=spec.num_classes, impl=impl)
    return getattr(dnf, spec.name)(num_classes=spec.num_classes, impl=impl)


def _dnf_se_model(spec: ModelSpec, fold: bool) -> nn.Module:
    """densenet_fast SE-DenseNet (an SE on each dense block's output, ``se_placement="block"``), the SE gate
    folded into the next transition / final norm (``fold``) or run on its own (the gated block output stored).

    Its weights are the shared torchvision ``state_dict`` plus the SE modules' own, seeded identically in every
    process; every ``load_state_dict`` of the benchmark keeps the SE weights (torchvision has none). SE rows
    compute a different function, so their |dlogits| vs torchvision is not a check."""
    import densenet_fast as dnf

    torch.manual_seed(0)
    if spec.cifar:
        depth = 3 * spec.block_config[0] * 2 + 4
        model = dnf.densenet_bc(depth=depth, growth_rate=spec.growth_rate, num_classes=spec.num_classes,
                                se_ratio=1.0 / 16)
    else:
        model = dnf.SEDenseNet(spec.growth_rate, spec.block_config, spec.num_init_features,
                               num_classes=spec.num_classes)
    model.features.fold_se = fold
    se_state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("features.se")}
    load = model.load_state_dict

    def load_with_se(state, strict: bool = True, assign: bool = False):
        return load({**state, **se_state}, strict=strict, assign=assign)

    model.load_state_dict = load_with_se
    return model


def _monai_model(spec: ModelSpec) -> nn.Module:
    from monai.networks.nets import DenseNet

    return DenseNet(spec.spatial_dims, spec.in_channels, spec.num_classes, spec.num_init_features, spec.growth_rate,
                    spec.block_config)


def _monai_2d_model(spec: ModelSpec) -> nn.Module:
    """MONAI's 2-D DenseNet with the torchvision architecture (loads the shared torchvision weights through
    :func:`_tv_to_monai`)."""
    from monai.networks.nets import DenseNet

    return DenseNet(2, 3, spec.num_classes, spec.num_init_features, spec.growth_rate, spec.block_config)


def _tv_to_monai(state: StateDict) -> Dict[str, Tensor]:
    """torchvision DenseNet keys -> MONAI's: ``denselayerJ.norm1`` -> ``denselayerJ.layers.norm1``,
    ``classifier`` -> ``class_layers.out`` (stem, transitions and ``norm5`` have the same names)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"(denselayer\d+)\.", r"\1.layers.", key)
        out[key.replace("classifier.", "class_layers.out.")] = value
    return out


def _dnf_3d_model(spec: ModelSpec) -> nn.Module:
    import densenet_fast as dnf

    return dnf.DenseNet3d(spec.spatial_dims, spec.in_channels, spec.num_classes, spec.num_init_features,
                          spec.growth_rate, spec.block_config)


def _convert(model: nn.Module) -> nn.Module:
    import densenet_fast as dnf

    out = dnf.convert(model)  # in place; use the return value when it gives one
    return out if isinstance(out, nn.Module) else model


def _has_module(name: str) -> Optional[str]:
    return None if importlib.util.find_spec(name) is not None else f"{name} is not installed"


@dataclass(frozen=True)
class Impl:
    """One compared implementation.

    ``make`` builds the bare model, ``post`` transforms it after the weights are loaded (as a user
    converts a trained model), ``unavailable`` says why it cannot run here.
    """

    name: str
    label: str
    make: Callable[[ModelSpec], nn.Module]
    requires: str = "torch"
    compiled: bool = False  # wrapped in torch.compile after the weights are loaded
    check: Optional[Callable[[], Optional[str]]] = None
    post: Optional[Callable[[nn.Module], nn.Module]] = None
    spatial_dims: int = 2  # the specs it builds: 2 (torchvision layout) or 3 (MONAI volumes)
    remap: Optional[Callable[[StateDict], StateDict]] = None  # the shared state dict -> this model's keys
    imagenet_only: bool = False  # builds the ImageNet stem only (no DenseNet-BC CIFAR layout)

    def unavailable(self, spec: Optional[ModelSpec] = None) -> Optional[str]:
        if spec is not None and spec.spatial_dims != self.spatial_dims:
            return f"builds {self.spatial_dims}-D models only, {spec.name} is {spec.spatial_dims}-D"
        if spec is not None and self.imagenet_only and spec.cifar:
            return f"builds the ImageNet stem only, {spec.name} is a CIFAR DenseNet-BC"
        reason = _has_module(self.requires)
        if reason is None and self.check is not None:
            reason = self.check()
        return reason


IMPLS: Dict[str, Impl] = {i.name: i for i in (
    Impl("tv", "torchvision", torchvision_model, "torchvision"),
    Impl("tv-memeff", "torchvision memory_efficient=True", lambda s: torchvision_model(s, True), "torchvision"),
    Impl("timm", "timm", lambda s: _timm_model(s, False), "timm"),
    Impl("timm-ckpt", "timm set_grad_checkpointing()", lambda s: _timm_model(s, True), "timm"),
    Impl("tv-compile", "torchvision + torch.compile", torchvision_model, "torchvision", compiled=True),
    Impl("dnf", "densenet_fast fused", lambda s: _dnf_model(s, "fused"), "densenet_fast"),
    Impl("dnf-compile", "densenet_fast + torch.compile", lambda s: _dnf_model(s, "fused"), "densenet_fast",
         compiled=True),
    Impl("dnf-ref", "densenet_fast impl=reference", lambda s: _dnf_model(s, "reference"), "densenet_fast"),
    Impl("dnf-se", "densenet_fast SE-DenseNet (SE folded)", lambda s: _dnf_se_model(s, True), "densenet_fast"),
    Impl("dnf-se-unfolded", "densenet_fast SE-DenseNet (SE not folded)", lambda s: _dnf_se_model(s, False),
         "densenet_fast"),
    Impl("dnf-convert", "torchvision + dnf.convert()", torchvision_model, "torchvision", post=_convert),
    Impl("monai", "MONAI DenseNet", _monai_model, "monai", spatial_dims=3),
    Impl("monai-convert", "MONAI + dnf.convert()", _monai_model, "monai", post=_convert, spatial_dims=3),
    Impl("dnf-3d", "densenet_fast DenseNet3d", _dnf_3d_model, "densenet_fast", spatial_dims=3),
    Impl("monai-2d", "MONAI DenseNet (2D)", _monai_2d_model, "monai", remap=_tv_to_monai, imagenet_only=True),
    Impl("monai-2d-convert", "MONAI 2D + dnf.convert()", _monai_2d_model, "monai", post=_convert,
         remap=_tv_to_monai, imagenet_only=True),
)}


def parse_impls(text: str) -> List[str]:
    """``"all"`` or a comma-separated list of names from IMPLS, in the given order."""
    if text.strip().lower() == "all":
        return list(IMPLS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in IMPLS]
    if bad or not names:
        raise ValueError(f"--impls: expected 'all' or a comma-separated subset of {list(IMPLS)}, got {text!r}")
    return list(dict.fromkeys(names))


def build_model(impl: Impl, spec: ModelSpec, state_dict: StateDict, device: torch.device) -> nn.Module:
    """The model in training mode on ``device`` with ``state_dict`` loaded (compiled if ``impl.compiled``)."""
    model = impl.make(spec)
    model.load_state_dict(impl.remap(state_dict) if impl.remap else state_dict, strict=True)
    if impl.post is not None:
        model = impl.post(model)
    model = model.to(device).train()
    if impl.compiled:
        model = torch.compile(model)
    return model
