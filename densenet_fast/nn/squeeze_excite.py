"""Squeeze-and-excitation module, a drop-in for ``timm.layers.squeeze_excite.SEModule``.

Same constructor arguments, children (``fc1``, ``bn``, ``act``, ``fc2``, ``gate``) and
``state_dict`` keys as timm's SEModule, and the same numbers. With the default configuration
(ReLU, sigmoid gate, no norm layer, no max-pool) the forward and backward run as the fused
``torch.ops.densenet_fast.se_forward``/``se_backward`` operators. Any other configuration uses
the plain PyTorch path (timm's exact forward: mean → fc1 → bn → act → fc2 → gate → multiply),
and a ``UserWarning`` is issued once per configuration when such a module is built.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from densenet_fast._warn import warn_once
from densenet_fast.nn.dense_block import check_int
from densenet_fast.nn.export_support import exporting_to_onnx, fx_leaf_call, prepare_scriptable
from densenet_fast.ops.squeeze_excite import se_gate, se_gate_of

__all__ = ["SqueezeExcite", "make_divisible"]

LayerSpec = Union[str, type, nn.Module, Callable[..., Tensor], None]

# Names timm's `get_act_layer` resolves to modules that are numerically equal to these.
_ACT_LAYERS: dict[str, type] = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky_relu": nn.LeakyReLU, "elu": nn.ELU,
    "celu": nn.CELU, "selu": nn.SELU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU,
    "mish": nn.Mish, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "hard_sigmoid": nn.Hardsigmoid,
    "hardsigmoid": nn.Hardsigmoid, "hard_swish": nn.Hardswish, "hardswish": nn.Hardswish,
    "identity": nn.Identity,
}



def make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None,
                   round_limit: float = 0.9) -> int:
    """Round ``v`` to a multiple of ``divisor`` (same rule as ``timm.layers.make_divisible``)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:  # don't round down by more than (1 - round_limit)
        new_v += divisor
    return new_v


class _Lambda(nn.Module):
    """Wraps a plain function (e.g. ``torch.sigmoid``) as a module."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def _create_layer(spec: LayerSpec, arg: str, inplace: Optional[bool] = None) -> nn.Module:
    """Like timm's ``create_act_layer``: a name, a module class, a module or a function."""
    if spec is None:
        return nn.Identity()
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        key = spec.strip().lower()
        if key not in _ACT_LAYERS:
            raise ValueError(f"{arg}: expected one of {sorted(_ACT_LAYERS)}, an nn.Module class or instance, "
                             f"or a function, got {spec!r}")
        spec = _ACT_LAYERS[key]
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        if inplace is not None:
            try:
                return spec(inplace=inplace)
            except TypeError:  # layer without an `inplace` argument
                pass
        return spec()
    if callable(spec):
        return _Lambda(spec)
    raise TypeError(f"{arg}: expected a name, an nn.Module class or instance, or a function, got "
                    f"{type(spec).__name__}")


def _is_relu(m: nn.Module) -> bool:
    if isinstance(m, _Lambda):
        return m.fn in (torch.relu, torch.nn.functional.relu)
    return type(m) is nn.ReLU


def _is_sigmoid(m: nn.Module) -> bool:
    if isinstance(m, nn.Sigmoid):
        return True
    if isinstance(m, _Lambda):
        return m.fn in (torch.sigmoid, torch.nn.functional.sigmoid)
    # timm's own `timm.layers.activations.Sigmoid` (x.sigmoid(), optionally in place)
    cls = type(m)
    return cls.__name__ == "Sigmoid" and cls.__module__.startswith("timm.")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: ``y = x * gate(fc2(act(bn(fc1(mean_hw(x))))))``.

    Args:
        channels: C, channels of the input (>= 1).
        rd_ratio: reduction ratio in (0, 1]; the hidden width is
            ``make_divisible(channels * rd_ratio, rd_divisor, round_limit=0)`` as in timm.
        rd_channels: hidden width R (>= 1); overrides ``rd_ratio``.
        rd_divisor: hidden width is rounded to a multiple of this (>= 1).
        act_layer: activation after fc1 (name, class, module or function), default ReLU.
        norm_layer: optional ``norm_layer(R)`` module after fc1 (e.g. ``nn.BatchNorm2d``).
        gate_layer: gate (name, class, module or function), default ``"sigmoid"``.
        bias: whether fc1/fc2 have biases.
        add_maxpool: timm's experimental ``0.5·mean + 0.5·max`` squeeze (plain path only).

    Shape:
        input ``[N, C, H, W]`` (NCHW or channels_last), output the same shape and layout.
    """

    def __init__(self, channels: int, rd_ratio: float = 1.0 / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 8, act_layer: LayerSpec = nn.ReLU,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None,
                 gate_layer: LayerSpec = "sigmoid", bias: bool = True,
                 add_maxpool: bool = False) -> None:
        super().__init__()
        check_int("channels", channels)
        check_int("rd_divisor", rd_divisor)
        if isinstance(rd_ratio, bool) or not isinstance(rd_ratio, (int, float)):
            raise TypeError(f"rd_ratio: expected a float in (0, 1], got {type(rd_ratio).__name__} {rd_ratio!r}")
        if not 0.0 < rd_ratio <= 1.0:
            raise ValueError(f"rd_ratio: expected a value in (0, 1], got {rd_ratio!r}")
        if rd_channels is None:
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        else:
            check_int("rd_channels", rd_channels)
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {type(bias).__name__} {bias!r}")
        if norm_layer is not None and not callable(norm_layer):
            raise TypeError(f"norm_layer: expected None or a callable taking the hidden width, got "
                            f"{type(norm_layer).__name__}")
        self._build(
            fc1=nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias),
            bn=norm_layer(rd_channels) if norm_layer is not None else nn.Identity(),
            act=_create_layer(act_layer, "act_layer", inplace=True),
            fc2=nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias),
            gate=_create_layer(gate_layer, "gate_layer"),
            add_maxpool=bool(add_maxpool),
        )

    def _build(self, fc1: nn.Conv2d, bn: nn.Module, act: nn.Module, fc2: nn.Conv2d,
               gate: nn.Module, add_maxpool: bool) -> None:
        # Registration order = timm's, so state_dict key order matches too.
        self.add_maxpool = add_maxpool
        self.fc1 = fc1
        self.bn = bn
        self.act = act
        self.fc2 = fc2
        self.gate = gate
        reason = self._unfused_reason()
        if reason is not None:
            warn_once(f"squeeze-excite:{reason}", f"SqueezeExcite: {reason}; using the plain PyTorch path instead "
                      "of the fused densenet_fast::se_forward operator", UserWarning, stacklevel=3)

    @classmethod
    def from_timm(cls, se_module: nn.Module) -> "SqueezeExcite":
        """Build a SqueezeExcite that *shares* the modules (and parameters) of a timm SEModule.

        Raises:
            TypeError: if ``se_module`` doesn't look like ``timm.layers.SEModule`` (1x1 conv
                ``fc1``/``fc2``, ``act``, ``gate``).
        """
        for name in ("fc1", "fc2", "act", "gate"):
            if not isinstance(getattr(se_module, name, None), nn.Module):
                raise TypeError(f"se_module: expected a timm SEModule (an nn.Module attribute {name!r}), got "
                                f"{type(se_module).__name__}")
        fc1, fc2 = se_module.fc1, se_module.fc2
        for name, fc in (("fc1", fc1), ("fc2", fc2)):
            if not isinstance(fc, nn.Conv2d) or fc.kernel_size != (1, 1) or fc.groups != 1:
                raise TypeError(f"se_module.{name}: expected a 1x1 nn.Conv2d with groups=1, got {fc!r}")
        if fc2.in_channels != fc1.out_channels or fc2.out_channels != fc1.in_channels:
            raise ValueError(f"se_module: expected fc1 C->R and fc2 R->C, got fc1 {fc1.in_channels}->"
                             f"{fc1.out_channels} and fc2 {fc2.in_channels}->{fc2.out_channels}")
        obj = cls.__new__(cls)
        nn.Module.__init__(obj)
        bn = getattr(se_module, "bn", None)
        obj._build(fc1=fc1, bn=nn.Identity() if bn is None else bn,
                   act=se_module.act, fc2=fc2, gate=se_module.gate,
                   add_maxpool=bool(getattr(se_module, "add_maxpool", False)))
        obj.train(se_module.training)
        return obj

    def _unfused_reason(self) -> Optional[str]:
        """Why the fused operator can't be used, or None if it can."""
        if self.add_maxpool:
            return "add_maxpool=True"
        if not isinstance(self.bn, nn.Identity):
            return f"norm layer {type(self.bn).__name__}"
        if not _is_relu(self.act):
            return f"activation {type(self.act).__name__} (fused path needs nn.ReLU)"
        if not _is_sigmoid(self.gate):
            return f"gate {type(self.gate).__name__} (fused path needs sigmoid)"
        for name, fc in (("fc1", self.fc1), ("fc2", self.fc2)):
            if fc.kernel_size != (1, 1) or fc.stride != (1, 1) or fc.groups != 1 or \
                    fc.padding not in ((0, 0), "valid") or fc.dilation != (1, 1):
                return f"{name} is not a plain 1x1 convolution"
        return None

    @property
    def fused(self) -> bool:
        """Whether forward uses the fused ``densenet_fast::se_forward`` operator."""
        return self._unfused_reason() is None

    __prepare_scriptable__ = prepare_scriptable

    def forward(self, x: Tensor) -> Tensor:
        leaf = fx_leaf_call(self, x)
        if leaf is not None:  # torch.fx tracing: one call_module node
            return leaf
        if not self.fused or exporting_to_onnx():  # ONNX export: standard ATen ops
            return self._forward_plain(x)
        C = self.fc1.in_channels
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != C:  # as DenseBlock (the module policy)
            got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"input: expected a 4-D tensor with {C} channels [N, {C}, H, W], got {got}")
        return se_gate(x, *self._weights(x))

    def _weights(self, x: Tensor):
        w1, b1 = self.fc1.weight.flatten(1), self.fc1.bias
        w2, b2 = self.fc2.weight.flatten(1), self.fc2.bias
        if w1.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
            # Custom ops bypass autocast: cast the (fp32) parameters like autocast would cast
            # the conv weights, differentiably, so their grads stay fp32.
            w1, w2 = w1.to(x.dtype), w2.to(x.dtype)
            b1 = None if b1 is None else b1.to(x.dtype)
            b2 = None if b2 is None else b2.to(x.dtype)
        return w1, b1, w2, b2

    def gate_of(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The gate without the multiply, for a gate folded into the next BN reader
        (:mod:`densenet_fast.nn.se_fold`): x [N, C, H, W] -> (g, s, v), each [N, C] (float32; float64 for
        float64 x): the gate (differentiable), the squeeze ``s = mean_hw(x)`` and the per-sample variance.
        Only for a :attr:`fused` module."""
        return se_gate_of(x, *self._weights(x))

    def _forward_plain(self, x: Tensor) -> Tensor:
        # timm's SEModule.forward, verbatim in effect.
        x_se = x.mean((2, 3), keepdim=True)
        if self.add_maxpool:
            x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
        x_se = self.fc1(x_se)
        x_se = self.act(self.bn(x_se))
        x_se = self.fc2(x_se)
        return x * self.gate(x_se)

    def extra_repr(self) -> str:
        return "fused=True" if self.fused else f"fused=False ({self._unfused_reason()})"
