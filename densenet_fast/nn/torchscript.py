"""TorchScript: ``torch.jit.script(model)`` of every densenet_fast model and ``convert()``ed model, running the fused
operators.

The eager modules decide per call, in Python, what they fuse (``FusedFeatures._run``); TorchScript cannot compile
that. ``torch.jit.script`` first calls each module's ``__prepare_scriptable__``; ours (:func:`scriptable`) return a
*scriptable copy*: an instance of a subclass of the module's own class, holding the same children, parameters and
buffers under the same names (so ``state_dict`` is unchanged and the scripted module trains the same tensors),
whose ``forward`` TorchScript can compile:

* ``FusedFeatures``: the fusion plan of ``_run`` is decided once, from the module tree (which block hands its
  buffer and statistics to which transition, which SE folds into which reader, the stem, the final norm), and
  written out as the source of ``forward`` / ``forward_pooled`` (see :func:`_features_source`). Each fused step
  checks at run time that its input is one the kernels take (float32/float64, CPU, or CUDA where compiled in)
  and otherwise runs the modules one by one, as ``nn.Sequential`` does (the documented rule of the scripted
  modules: other dtypes, autocast included, take the reference path).
* ``DenseBlock``, ``Transition``, ``SqueezeExcite``, ``DenseLayer`` and the BatchNorms of a fused stem / final
  norm get the methods the plan calls (``dnf_fused``, ``dnf_stem``, ``dnf_pool``, ...). A block whose layers use
  LeakyReLU / PReLU calls ``dense_block_act_forward`` with the slopes ``dnf_slopes`` packs (each activation's type
  is resolved when the layer is compiled: ``hasattr(act, "weight")`` is static in TorchScript). A block whose norms
  are InstanceNorm (instance_block.py's rules, decided when scripted) calls ``dense_block_in_forward`` (with the
  slopes too for LeakyReLU / PReLU); its per-sample statistics go to no fused reader, as in eager.
* The model classes get a ``forward`` that calls ``features.forward_pooled`` (the fused final norm + ReLU + pool)
  and their head.

What the scripted modules do not do: the gradient hand-over (docs/design.md §11: the block's backward then copies
the reader's gradient, one block-sized tensor more at the step's peak), SyncBatchNorm synchronisation, hooks
registered after scripting, ``DenseNet._check_sizes``' early errors. The plan follows the train/eval mode of the
scripted module's norms at run time (a block reads its first norm's mode).
"""

import inspect
import itertools
import keyword
import linecache
import re
import types
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["scriptable"]


# -- TorchScript functions shared by the methods below --------------------------------------------------------

def fusable(x: Tensor, cuda_kernels: bool) -> bool:
    """Whether the fused kernels take ``x``: a non-empty 4-D/5-D float32/float64 tensor on the CPU or (compiled in)
    CUDA."""
    if x.dim() != 4 and x.dim() != 5:
        return False
    if x.shape[0] == 0 or (x.dtype != torch.float32 and x.dtype != torch.float64):
        return False
    if x.device.type == "cpu":
        return True
    return cuda_kernels and x.device.type == "cuda"


def req(t: Optional[Tensor]) -> Tensor:
    """A BatchNorm tensor TorchScript types as Optional (the fused norms always have it)."""
    assert t is not None
    return t


def poolable(x: Tensor) -> bool:
    """A transition's 2x2 pool needs every spatial size >= 2 (eager: the reference path reports it)."""
    return min(x.shape[2:]) >= 2


def update_running(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Tensor, mean: Tensor, var: Tensor,
                   count: int, momentum: Optional[float], alpha_form: bool) -> None:
    """nn.BatchNorm's running-statistics update from a batch mean / biased variance over ``count`` values, with the
    operations of densenet_fast.nn.batchnorm_stats.update_running_stats (``alpha_form``: its foreach branch, taken
    when every norm updated together has one float momentum), so the buffers are the eager module's bit for bit."""
    bessel = count / (count - 1) if count > 1 else 1.0
    num_batches_tracked.add_(1)
    m = mean.detach()
    if momentum is not None and alpha_form:
        running_mean.add_(running_mean, alpha=-momentum)
        running_mean.add_(m, alpha=momentum)
        running_var.add_(running_var, alpha=-momentum)
        running_var.add_(var.detach(), alpha=momentum * bessel)
        return
    v = var.detach() * bessel
    if momentum is not None:
        running_mean.mul_(1.0 - momentum).add_(m * momentum)
        running_var.mul_(1.0 - momentum).add_(v * momentum)
    else:
        factor = 1.0 / num_batches_tracked.to(running_mean.dtype)
        running_mean.mul_(1.0 - factor).add_(m * factor)
        running_var.mul_(1.0 - factor).add_(v * factor)


def reader_stats(x: Tensor, training: bool, running_mean: Tensor, running_var: Tensor,
                 batch_mean: Optional[Tensor], batch_var: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The statistics a BN reader normalises with (densenet_fast.nn.dense_block.bn_stats): the running ones in eval;
    in training the batch statistics handed over (a block's, or an SE gate's) or computed here."""
    if not training:
        return running_mean, running_var
    if batch_mean is not None and batch_var is not None and batch_mean.numel() > 0:
        return batch_mean, batch_var
    if x.shape[1] > 0 and x.numel() // x.shape[1] == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size {}".format(x.size()))
    moments = torch.ops.densenet_fast.channel_moments(x.detach())
    return moments[0], moments[1]


def gated_moments(sample_mean: Tensor, sample_var: Tensor, gate: Tensor) -> Tuple[Tensor, Tensor]:
    """densenet_fast.ops.tail.gated_channel_moments: batch moments of gate * x from per-sample moments."""
    m, v, g = sample_mean.detach().double(), sample_var.detach().double(), gate.detach().double()
    gm = g * m
    mean = gm.mean(0)
    var = (g * g * v).mean(0) + (gm - mean).square().mean(0)
    return mean.to(sample_mean.dtype), var.to(sample_mean.dtype)


def conv_channels_last(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: List[int], padding: List[int],
                       dilation: List[int], groups: int) -> Tensor:
    """conv0 before a fused 2-D stem with its weight in channels_last (FusedFeatures._conv0_channels_last)."""
    return F.conv2d(x, weight.contiguous(memory_format=torch.channels_last), bias, stride, padding, dilation, groups)


# -- methods of the scriptable copies ---------------------------------------------------------------------------

def _block_fused(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """DenseBlock.fused_forward: (buffer, mean, var) of the fused block; the running statistics updated."""
    g1: List[Tensor] = []
    b1: List[Tensor] = []
    w1: List[Tensor] = []
    g2: List[Tensor] = []
    b2: List[Tensor] = []
    w2: List[Tensor] = []
    rm1: List[Tensor] = []
    rv1: List[Tensor] = []
    rm2: List[Tensor] = []
    rv2: List[Tensor] = []
    training = False
    eps = 1e-5
    first = True
    for layer in self.values():
        if first:
            training = layer.norm1.training
            eps = layer.norm1.eps
            first = False
        g1.append(req(layer.norm1.weight))
        b1.append(req(layer.norm1.bias))
        w1.append(layer.conv1.weight)
        g2.append(req(layer.norm2.weight))
        b2.append(req(layer.norm2.bias))
        w2.append(layer.conv2.weight)
        rm1.append(req(layer.norm1.running_mean))
        rv1.append(req(layer.norm1.running_var))
        rm2.append(req(layer.norm2.running_mean))
        rv2.append(req(layer.norm2.running_var))
    if training and x.shape[1] > 0 and x.numel() // x.shape[1] == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size {}".format(x.size()))
    drop_rate = self.dnf_drop_rate
    mask: Optional[Tensor] = None
    if training and drop_rate > 0.0 and drop_rate < 1.0:
        shape = [x.shape[0], len(w2) * w2[0].shape[0]] + x.shape[2:]
        mask = torch.empty(shape, device=x.device).bernoulli_(1.0 - drop_rate).to(torch.bool)
    none: List[Tensor] = []
    out = torch.ops.densenet_fast.dense_block_forward(
        x, g1, b1, w1, g2, b2, w2, none if training else rm1, none if training else rv1,
        none if training else rm2, none if training else rv2, mask, drop_rate, training, eps)
    if training:
        count = x.numel() // x.shape[1]
        i = 0
        for lay in self.values():
            c = lay.norm1.num_features
            update_running(req(lay.norm1.running_mean), req(lay.norm1.running_var),
                           req(lay.norm1.num_batches_tracked), out[1][:c], out[2][:c], count, lay.norm1.momentum,
                           self.dnf_alpha)
            update_running(req(lay.norm2.running_mean), req(lay.norm2.running_var),
                           req(lay.norm2.num_batches_tracked), out[3][i], out[4][i], count, lay.norm2.momentum,
                           self.dnf_alpha)
            i += 1
    return out[0], out[1], out[2]


def _block_slopes(self, dtype: torch.dtype, device: torch.device) -> Tensor:
    """densenet_fast.nn.dense_block.block_slopes: the packed per-channel slopes of the layers' LeakyReLU / PReLU
    activations (a PReLU's weight, differentiable; a LeakyReLU's constant), per layer relu1's then relu2's."""
    s: List[Tensor] = []
    for layer in self.values():
        c = layer.norm1.num_features
        if hasattr(layer.relu1, "weight"):  # PReLU (resolved when compiled: each layer is its own type)
            w = layer.relu1.weight.to(dtype)
            s.append(w.expand([c]) if w.numel() == 1 else w)
        else:
            s.append(torch.full([c], float(layer.relu1.negative_slope), dtype=dtype, device=device))
        c = layer.norm2.num_features
        if hasattr(layer.relu2, "weight"):
            w = layer.relu2.weight.to(dtype)
            s.append(w.expand([c]) if w.numel() == 1 else w)
        else:
            s.append(torch.full([c], float(layer.relu2.negative_slope), dtype=dtype, device=device))
    return torch.cat(s)


def _in_affine(weight: Optional[Tensor], bias: Optional[Tensor], channels: int, x: Tensor) -> Tuple[Tensor, Tensor]:
    """densenet_fast.nn.instance_block._affine: an InstanceNorm's weight and bias, ones and zeros for affine=False
    (its None parameters: the branch is resolved when each layer is compiled)."""
    if weight is not None and bias is not None:
        return weight, bias
    return (torch.ones([channels], dtype=x.dtype, device=x.device),
            torch.zeros([channels], dtype=x.dtype, device=x.device))


def _in_block_fused(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """densenet_fast.nn.instance_block.instance_fused_forward: (buffer, per-sample mean, var [N, C]) of an
    InstanceNorm block's dense_block_in_forward. No running statistics: train and eval run the same."""
    g1: List[Tensor] = []
    b1: List[Tensor] = []
    w1: List[Tensor] = []
    g2: List[Tensor] = []
    b2: List[Tensor] = []
    w2: List[Tensor] = []
    eps = 1e-5
    first = True
    for layer in self.values():
        if first:
            eps = layer.norm1.eps
            first = False
        a = _in_affine(layer.norm1.weight, layer.norm1.bias, layer.norm1.num_features, x)
        g1.append(a[0])
        b1.append(a[1])
        w1.append(layer.conv1.weight)
        a = _in_affine(layer.norm2.weight, layer.norm2.bias, layer.norm2.num_features, x)
        g2.append(a[0])
        b2.append(a[1])
        w2.append(layer.conv2.weight)
    out = torch.ops.densenet_fast.dense_block_in_forward(x, g1, b1, w1, g2, b2, w2, eps, None)
    return out[0], out[1], out[2]


def _block_variant(nested: bool, act: bool, instance: bool) -> Dict[str, Callable]:
    """The methods a block copy gets: ``_block_fused`` (BatchNorm) or ``_in_block_fused`` (InstanceNorm, ``instance``)
    -- with ``_block_slopes`` for LeakyReLU / PReLU blocks (``act``), whose fused method then passes them to
    ``dense_block_act_forward`` / ``dense_block_in_forward`` -- rewritten for MONAI's / torchxrayvision's layers,
    whose norms, activations and convs are children of ``layer.layers`` (``nested``)."""
    key = (nested, act, instance)
    if key not in _VARIANTS:
        def rewrite(fn: Callable) -> str:
            source = inspect.getsource(fn)
            if nested:
                source = re.sub(r"\b(layer|lay)\.(norm|conv|relu)", r"\1.layers.\2", source)
            if act:
                slopes = "self.dnf_slopes(x.dtype, x.device)"
                source = source.replace("densenet_fast.dense_block_forward(", "densenet_fast.dense_block_act_forward(")
                source = source.replace("drop_rate, training, eps)", f"drop_rate, training, eps, {slopes})")
                source = source.replace("w2, eps, None)", f"w2, eps, {slopes})")  # dense_block_in_forward
                assert fn is _block_slopes or slopes in source, "the fused method's call no longer matches the rewrite"
            return source
        fused = _in_block_fused if instance else _block_fused
        methods = dict(dnf_fused=torch.jit.export(_compile_method(rewrite(fused), fused.__name__)))
        if act:
            methods["dnf_slopes"] = _compile_method(rewrite(_block_slopes), "_block_slopes")
        _VARIANTS[key] = methods
    return _VARIANTS[key]


_VARIANTS: Dict[Tuple[bool, bool, bool], Dict[str, Callable]] = {}


def _block_forward(self, init_features: Tensor) -> Tensor:
    if self.dnf_fusable and fusable(init_features, self.dnf_cuda) and init_features.dim() == self.dnf_rank:
        return self.dnf_fused(init_features)[0]
    return self.dnf_reference(init_features)


def _block_reference(self, init_features: Tensor) -> Tensor:
    """torchvision's _DenseBlock.forward."""
    features = [init_features]
    for layer in self.values():
        features.append(layer(features))
    return torch.cat(features, 1)


def _concat_block_reference(self, init_features: Tensor) -> Tensor:
    """MONAI's / torchxrayvision's block: each layer concatenates its input and its new features."""
    x = init_features
    for layer in self.values():
        x = layer(x)
    return x


def _sequential_layer_forward(self, x: Tensor) -> Tensor:
    """torchxrayvision's _DenseLayer.forward (an nn.Sequential whose forward calls super(), which TorchScript cannot
    compile): its children, dropout, and the concatenation with its input."""
    new_features = x
    for module in self:
        new_features = module(new_features)
    if self.drop_rate > 0:
        new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
    return torch.cat([x, new_features], 1)


def _layer_forward(self, input: List[Tensor]) -> Tensor:
    """DenseLayer.forward on a list of features (torchvision's _DenseLayer; memory_efficient checkpointing, which
    TorchScript cannot run, is not applied: same values)."""
    bottleneck_output = self.conv1(self.relu1(self.norm1(torch.cat(input, 1))))
    new_features = self.gate(self.conv2(self.relu2(self.norm2(bottleneck_output))))
    if self.drop_rate > 0:
        new_features = F.dropout(new_features, p=self.drop_rate, training=self.training)
    return new_features


def _transition_fused(self, x: Tensor, batch_mean: Optional[Tensor], batch_var: Optional[Tensor],
                      gate: Optional[Tensor]) -> Tensor:
    """Transition.fused_forward (statistics handed over by the block, or an SE gate folded in)."""
    training = self.norm.training
    norm = self.norm
    mean, var = reader_stats(x, training, req(norm.running_mean), req(norm.running_var), batch_mean, batch_var)
    out = torch.ops.densenet_fast.transition_forward(x, mean, var, req(norm.weight), req(norm.bias), self.conv.weight,
                                                     training, norm.eps, gate)
    if training:
        update_running(req(norm.running_mean), req(norm.running_var), req(norm.num_batches_tracked), mean, var,
                       x.numel() // x.shape[1], norm.momentum, True)
    return out


def _transition_forward(self, x: Tensor) -> Tensor:
    if (self.dnf_fusable and fusable(x, self.dnf_cuda) and x.dim() == self.conv.weight.dim()
            and poolable(x)):
        return self.dnf_fused(x, None, None, None)
    for module in self:  # nn.Sequential's forward (timm's transition has no relu child)
        x = module(x)
    return x


def _bn_pool(self, x: Tensor, batch_mean: Optional[Tensor], batch_var: Optional[Tensor],
             gate: Optional[Tensor]) -> Tensor:
    """densenet_fast.nn.dense_block.fused_norm_relu_pool: flatten(avg_pool(relu(bn(gate * x)), 1)) -> [N, C]."""
    training = self.training
    mean, var = reader_stats(x, training, req(self.running_mean), req(self.running_var), batch_mean, batch_var)
    out = torch.ops.densenet_fast.norm_relu_pool_forward(x, mean, var, req(self.weight), req(self.bias), training,
                                                         self.eps, gate)
    if training:
        update_running(req(self.running_mean), req(self.running_var), req(self.num_batches_tracked), mean, var,
                       x.numel() // x.shape[1], self.momentum, True)
    return out


def _bn_stem(self, x: Tensor) -> Tensor:
    """FusedFeatures.fused_stem: max_pool(relu(bn(x)), 3, 2, 1), saving only x."""
    training = self.training
    mean, var = reader_stats(x, training, req(self.running_mean), req(self.running_var), None, None)
    out = torch.ops.densenet_fast.bn_relu_maxpool(x, mean, var, req(self.weight), req(self.bias), training, self.eps)
    if training:
        update_running(req(self.running_mean), req(self.running_var), req(self.num_batches_tracked), mean, var,
                       x.numel() // x.shape[1], self.momentum, True)
    return out


def _bn_conv_stem(self, x: Tensor, conv_weight: Tensor, stride: List[int], padding: List[int],
                  kernel: List[int]) -> Tensor:
    """FusedFeatures.fused_conv_stem: max_pool3d(relu(bn(conv(x))), 3, 2, 1) saving only the image."""
    training = self.training
    rm, rv = req(self.running_mean), req(self.running_var)
    if training:
        rm, rv = rm.new_empty(0), rv.new_empty(0)
    out = torch.ops.densenet_fast.conv_bn_relu_maxpool(x, conv_weight, stride, padding, rm, rv, req(self.weight),
                                                       req(self.bias), training, self.eps)
    if training:
        count = x.shape[0]
        for d in range(3):
            count *= (x.shape[2 + d] + 2 * padding[d] - kernel[d]) // stride[d] + 1
        update_running(req(self.running_mean), req(self.running_var), req(self.num_batches_tracked), out[1], out[2],
                       count, self.momentum, True)
    return out[0]


def _se_weights(self) -> Tuple[Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    return self.fc1.weight.flatten(1), self.fc1.bias, self.fc2.weight.flatten(1), self.fc2.bias


def _se_forward(self, x: Tensor) -> Tensor:
    """SqueezeExcite.forward: the fused se_forward operator, or timm's SEModule computation."""
    if self.dnf_fusable:
        C = self.fc1.in_channels
        if x.dim() != 4 or x.shape[1] != C:
            raise ValueError("input: expected a 4-D tensor with {} channels [N, {}, H, W], got shape {}".format(
                C, C, x.shape))
        w1, b1, w2, b2 = self.dnf_weights()
        return torch.ops.densenet_fast.se_forward(x, w1, b1, w2, b2)[0]
    x_se = x.mean((2, 3), keepdim=True)
    if self.add_maxpool:
        x_se = 0.5 * x_se + 0.5 * x.amax((2, 3), keepdim=True)
    x_se = self.fc2(self.act(self.bn(self.fc1(x_se))))
    return x * self.gate(x_se)


def _se_gate_of(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """SqueezeExcite.gate_of: (gate, squeeze, per-sample variance), each [N, C]."""
    w1, b1, w2, b2 = self.dnf_weights()
    out = torch.ops.densenet_fast.se_gate_of(x, w1, b1, w2, b2)
    return out[0], out[1], out[2]


def _se_foldable(self, x: Tensor) -> bool:
    """se_fold.can_fold at run time."""
    return (self.dnf_fusable and fusable(x, self.dnf_cuda) and x.dim() == 4
            and x.shape[1] == self.fc1.in_channels)


# model heads: forward with the fused final norm + ReLU + global pool (the eager models' forward)

def _classifier_head(self, x: Tensor) -> Tensor:
    return self.classifier(self.features.forward_pooled(x, True))


def _timm_head(self, x: Tensor) -> Tensor:
    return self.classifier(self.head_drop(self.features.forward_pooled(x, False)))


def _monai_head(self, x: Tensor) -> Tensor:
    return self.class_layers.out(self.features.forward_pooled(x, True))


def _monai_plain_head(self, x: Tensor) -> Tensor:
    return self.class_layers(self.features(x))


def _xrv_head(self, x: Tensor) -> Tensor:
    """torchxrayvision DenseNet.forward (its input-resolution fix without its printed warnings)."""
    if self.dnf_resolution > 0:
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.shape[2] != x.shape[3]:
            raise RuntimeError("Height and width of the image must be the same. Input: {} != {}. Perform a center "
                               "crop first.".format(x.shape[2], x.shape[3]))
        r = self.dnf_resolution
        if x.shape[2] != r or x.shape[3] != r:
            x = F.interpolate(x, size=[r, r], mode="bilinear", antialias=True)
    out = self.classifier(self.features.forward_pooled(x, True))
    op_threshs = self.op_threshs
    if op_threshs is not None:
        out = torch.sigmoid(out)
        t = op_threshs.expand(out.shape[0], -1)
        new = torch.zeros(out.shape, device=out.device) + 0.5
        leq = (out < t) & ~torch.isnan(t)
        gt = ~(out < t) & ~torch.isnan(t)
        new[leq] = out[leq] / (t[leq] * 2)
        new[gt] = 1.0 - ((1.0 - out[gt]) / ((1 - t[gt]) * 2))
        out = new
    elif self.dnf_apply_sigmoid:
        out = torch.sigmoid(out)
    return out


# -- scriptable copies -------------------------------------------------------------------------------------------

_SUBCLASSES: Dict[Tuple[type, str], type] = {}


def _named(fn: Callable, name: str) -> Callable:
    """``fn`` under the method name it gets (TorchScript names a compiled method after its function)."""
    new = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    new.__dict__.update(fn.__dict__)  # torch.jit.export's mark
    return new


def _subclass(cls: type, role: str, methods: Dict[str, Callable]) -> type:
    """A subclass of ``cls`` with ``methods`` (cached per class and role). Properties are left out of TorchScript."""
    key = (cls, role)
    if key not in _SUBCLASSES:
        props = [n for n, v in inspect.getmembers(cls) if isinstance(v, property)]
        attrs = dict({name: _named(fn, name) for name, fn in methods.items()}, __jit_unused_properties__=props,
                     __module__=__name__)
        _SUBCLASSES[key] = type(f"Scriptable{cls.__name__}{role}", (cls,), attrs)
    return _SUBCLASSES[key]


def _copy(module: nn.Module, role: str, methods: Dict[str, Callable], **attrs) -> nn.Module:
    """A copy of ``module`` as an instance of ``_subclass``: same children (a new dict, which torch.jit.script may
    fill with their own scriptable copies without touching ``module``), parameters and buffers."""
    new = object.__new__(_subclass(type(module), role, methods))
    new.__dict__.update(module.__dict__)
    new._modules = OrderedDict(module._modules)
    for name, value in attrs.items():
        setattr(new, name, value)
    return new


def _cuda_kernels(op: str = "dense_block_forward") -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"densenet_fast::{op}", "CUDA")


def _alpha_form(norms: List[nn.Module]) -> bool:
    momenta = {bn.momentum for bn in norms}
    return len(momenta) == 1 and None not in momenta


def _plain_bn(m: nn.Module) -> bool:
    return type(m) is not nn.SyncBatchNorm


def _block_copy(block: nn.Module) -> nn.Module:
    from densenet_fast.models.se_densenet import SEDenseBlock
    from densenet_fast.nn.batchnorm_stats import fusable_norms
    from densenet_fast.nn.concat_block import ConcatDenseBlock, layer_unit
    from densenet_fast.nn.dense_block import block_activations, layer_drop_rate
    from densenet_fast.nn.instance_block import instance_layers_problem, is_instance_block

    concat = isinstance(block, ConcatDenseBlock)
    layers = list(block.values())
    units = [layer_unit(layer) for layer in layers] if concat else layers
    nested = concat and any(u is not layer for u, layer in zip(units, layers))  # MONAI's layer.layers.norm1
    norms = [m for u in units for m in (u.norm1, u.norm2)]
    acts = block_activations(units)  # None: ReLU; a list: LeakyReLU / PReLU (dense_block_act_forward); str: neither
    instance = is_instance_block(units)  # InstanceNorm: dense_block_in_forward (instance_block.py's rules)
    norms_ok = instance_layers_problem(units) is None if instance else (
        fusable_norms(norms) and all(_plain_bn(m) for m in norms))
    ok = (getattr(block, "impl", "fused") == "fused" and not isinstance(block, SEDenseBlock) and len(units) > 0
          and norms_ok and len({layer_drop_rate(layer) for layer in layers}) == 1
          and not (concat and any("dropout" in u._modules for u in units))
          and not isinstance(acts, str))
    act = ok and acts is not None
    instance = ok and instance
    methods = dict(_block_variant(nested, act, instance), forward=_block_forward,
                   dnf_reference=_concat_block_reference if concat else _block_reference)
    role = ("Nested" if nested else "Concat" if concat else "") + ("Instance" if instance else "") + (
        "Act" if act else "")
    op = "dense_block_in_forward" if instance else "dense_block_act_forward" if act else "dense_block_forward"
    new = _copy(block, role, methods, dnf_fusable=ok, dnf_cuda=_cuda_kernels(op), dnf_instance=instance,
                dnf_alpha=_alpha_form(norms),
                dnf_drop_rate=layer_drop_rate(layers[0]) if layers else 0.0,
                dnf_rank=units[0].conv1.weight.dim() if units else 4)
    for name, layer in layers_by_name(new):
        if type(layer).__module__.startswith("torchxrayvision") and isinstance(layer, nn.Sequential):
            new._modules[name] = _copy(layer, "", dict(forward=_sequential_layer_forward),
                                       drop_rate=float(layer.drop_rate))
    return new


def layers_by_name(block: nn.Module) -> List[Tuple[str, nn.Module]]:
    return list(block._modules.items())


def _transition_copy(tr: nn.Module) -> nn.Module:
    from densenet_fast.nn.batchnorm_stats import fusable_norms

    ok = getattr(tr, "impl", "fused") == "fused" and fusable_norms([tr.norm]) and _plain_bn(tr.norm)
    return _copy(tr, "", dict(forward=_transition_forward, dnf_fused=torch.jit.export(_transition_fused)),
                 dnf_fusable=ok, dnf_cuda=_cuda_kernels())


def _se_copy(se: nn.Module) -> nn.Module:
    return _copy(se, "", dict(forward=_se_forward, dnf_weights=_se_weights, dnf_gate_of=torch.jit.export(_se_gate_of),
                              dnf_foldable=torch.jit.export(_se_foldable)),
                 dnf_fusable=se.fused, dnf_cuda=_cuda_kernels())


def _bn_copy(bn: nn.Module) -> nn.Module:
    return _copy(bn, "Reader", dict(dnf_pool=torch.jit.export(_bn_pool), dnf_stem=torch.jit.export(_bn_stem),
                                    dnf_conv_stem=torch.jit.export(_bn_conv_stem)))


# -- FusedFeatures: the plan, written out as TorchScript source --------------------------------------------------

class _Source:
    """Lines of a generated method, indented by block."""

    def __init__(self, header: str) -> None:
        self.lines = [header]
        self.depth = 1

    def add(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _tuple(v, n: int) -> List[int]:
    return [v] * n if isinstance(v, int) else list(v)


def _features_source(ff: nn.Module, pooled: bool) -> Tuple[str, Dict[str, nn.Module]]:
    """The source of ``forward`` (``pooled=False``) or ``forward_pooled`` of a FusedFeatures, following
    ``FusedFeatures._run``'s decisions for a fusable input, and the children that must become reader copies (BNs
    of a fused stem or final norm)."""
    from densenet_fast.nn.dense_block import DenseBlock, Transition
    from densenet_fast.nn.fused_features import _is_stem_pool, has_hooks, norm_relu_kind, stem_span
    from densenet_fast.nn.squeeze_excite import SqueezeExcite

    names = list(ff._modules)
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise RuntimeError(f"torch.jit.script: densenet_fast FusedFeatures child {name!r} is not a Python "
                               "identifier; TorchScript support needs identifier names (as DenseNets' features have)")
    mods = list(ff._modules.values())
    cuda = _cuda_kernels()
    readers: Dict[str, nn.Module] = {}
    src = _Source(f"def {'forward_pooled' if pooled else 'forward'}(self, x: Tensor"
                  f"{', relu: bool = True' if pooled else ''}) -> Tensor:")
    ok = f"fusable(x, {cuda})"

    def plain(i: int) -> None:
        src.add(f"x = self.{names[i]}(x)")

    if ff.impl != "fused":
        for i in range(len(mods)):
            plain(i)
        return _pooled_tail(src, ff, pooled), readers

    def fused_block(m) -> bool:
        return isinstance(m, DenseBlock) and not has_hooks(m) and _block_copy(m).dnf_fusable

    def fused_transition(m) -> bool:
        return isinstance(m, Transition) and not has_hooks(m) and _transition_copy(m).dnf_fusable

    def foldable_se(m) -> bool:
        return type(m) is SqueezeExcite and m.fused and not has_hooks(m)

    def final_norm(m, last: bool) -> Optional[str]:
        """The condition under which the last module runs as the fused final norm (+ ReLU) + pool, or None."""
        kind = norm_relu_kind(m)
        if not pooled or not last or has_hooks(m) or kind is None or not _plain_bn(m):
            return None
        rank = 5 if isinstance(m, nn.BatchNorm3d) else 4
        return f"{'' if kind == 'bn_relu' else 'relu and '}{ok} and x.dim() == {rank}"

    i = 0
    while i < len(mods):
        m, name, last = mods[i], names[i], i == len(mods) - 1
        # an SE gate folded into the transition or final norm after it
        if ff.fold_se and not last and foldable_se(m):
            nxt, nname = mods[i + 1], names[i + 1]
            if fused_transition(nxt):
                src.add(f"if self.{name}.dnf_foldable(x) and poolable(x):")
                src.depth += 1
                src.add(f"g = self.{name}.dnf_gate_of(x)")
                src.add(f"if self.{nname}.norm.training:")
                src.add("    s = gated_moments(g[1], g[2], g[0])")
                src.add(f"    x = self.{nname}.dnf_fused(x, s[0], s[1], g[0])")
                src.add("else:")
                src.add(f"    x = self.{nname}.dnf_fused(x, None, None, g[0])")
                src.depth -= 1
                src.add("else:")
                src.add(f"    x = self.{nname}(self.{name}(x))")
                i += 2
                continue
            cond = final_norm(nxt, i + 1 == len(mods) - 1)
            if cond is not None:
                readers[nname] = nxt
                src.add(f"if self.{name}.dnf_foldable(x) and {cond}:")
                src.depth += 1
                src.add(f"g = self.{name}.dnf_gate_of(x)")
                src.add(f"if self.{nname}.training:")
                src.add("    s = gated_moments(g[1], g[2], g[0])")
                src.add(f"    return self.{nname}.dnf_pool(x, s[0], s[1], g[0])")
                src.add(f"return self.{nname}.dnf_pool(x, None, None, g[0])")
                src.depth -= 1
                src.add(f"x = self.{nname}(self.{name}(x))")
                return _pooled_tail(src, ff, pooled), readers
        # a fused block, and the reader its buffer and statistics go to
        if fused_block(m):
            copy_ = _block_copy(m)
            # an InstanceNorm block's per-sample statistics have no fused reader (as FusedFeatures._run)
            nxt = mods[i + 1] if not last and not copy_.dnf_instance else None
            nname = names[i + 1] if nxt is not None else None
            src.add(f"if fusable(x, {copy_.dnf_cuda}) and x.dim() == {copy_.dnf_rank}:")
            src.depth += 1
            src.add(f"s = self.{name}.dnf_fused(x)")
            if nxt is not None and fused_transition(nxt):
                src.add(f"if poolable(s[0]) and s[0].dim() == {nxt.conv.weight.dim()}:")
                src.add(f"    x = self.{nname}.dnf_fused(s[0], s[1], s[2], None)")
                src.add("else:")
                src.add(f"    x = self.{nname}(s[0])")
                src.depth -= 1
                src.add("else:")
                src.add(f"    x = self.{nname}(self.{name}(x))")
                i += 2
                continue
            cond = final_norm(nxt, i + 1 == len(mods) - 1) if nxt is not None else None
            if cond is not None:
                readers[nname] = nxt
                src.add("x = s[0]")
                src.add(f"if {cond}:")
                src.add(f"    return self.{nname}.dnf_pool(x, s[1], s[2], None)")
                src.depth -= 1
                src.add("else:")
                src.add(f"    x = self.{name}(x)")
                src.add(f"x = self.{nname}(x)")
                return _pooled_tail(src, ff, pooled), readers
            src.add("x = s[0]")
            src.depth -= 1
            src.add("else:")
            src.add(f"    x = self.{name}(x)")
            i += 1
            continue
        # the final norm on its own
        cond = final_norm(m, last)
        if cond is not None:
            readers[name] = m
            src.add(f"if {cond}:")
            src.add(f"    return self.{name}.dnf_pool(x, None, None, None)")
            plain(i)
            i += 1
            continue
        # the 3-D stem: conv0 + BN + ReLU + max-pool, saving only the image
        if isinstance(m, nn.Conv3d) and i + 1 < len(mods):
            span = stem_span(mods, i + 1)
            bn = mods[i + 1]
            if span and _conv_stem_static(m, bn):
                readers[names[i + 1]] = bn
                k, st, p = (_tuple(v, 3) for v in (m.kernel_size, m.stride, m.padding))
                src.add(f"if {ok} and x.dim() == 5 and x.dtype == self.{name}.weight.dtype:")
                src.add(f"    x = self.{names[i + 1]}.dnf_conv_stem(x, self.{name}.weight, {st}, {p}, {k})")
                src.add("else:")
                for j in range(i, i + 1 + span):
                    src.add(f"    x = self.{names[j]}(x)")
                i += 1 + span
                continue
        # conv0 in channels_last before a fused 2-D stem (CPU)
        if (type(m) is nn.Conv2d and not has_hooks(m) and i + 1 < len(mods) and stem_span(mods, i + 1)
                and m.padding_mode == "zeros" and not isinstance(m.padding, str)):
            st, p, d = (_tuple(v, 2) for v in (m.stride, m.padding, m.dilation))
            src.add("if x.dim() == 4 and x.device.type == 'cpu':")
            src.add(f"    x = conv_channels_last(x, self.{name}.weight, self.{name}.bias, {st}, {p}, {d}, {m.groups})")
            src.add("else:")
            src.add(f"    x = self.{name}(x)")
            i += 1
            continue
        # the 2-D / 3-D stem: BN + ReLU + max-pool
        span = stem_span(mods, i)
        if span and _plain_bn(m) and _is_stem_pool(mods[i + span - 1], m):
            readers[name] = m
            rank = 5 if isinstance(m, nn.BatchNorm3d) else 4
            src.add(f"if {ok} and x.dim() == {rank}:")
            src.add(f"    x = self.{name}.dnf_stem(x)")
            src.add("else:")
            for j in range(i, i + span):
                src.add(f"    x = self.{names[j]}(x)")
            i += span
            continue
        plain(i)
        i += 1
    return _pooled_tail(src, ff, pooled), readers


def _conv_stem_static(conv: nn.Conv3d, bn: nn.Module) -> bool:
    """The parts of FusedFeatures.conv_stem_fusable that do not depend on the input."""
    from densenet_fast.nn.fused_features import has_hooks

    return (type(conv) is nn.Conv3d and isinstance(bn, nn.BatchNorm3d) and _plain_bn(bn) and conv.bias is None
            and conv.groups == 1 and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and _tuple(conv.dilation, 3) == [1, 1, 1] and not has_hooks(conv))


def _pooled_tail(src: _Source, ff: nn.Module, pooled: bool) -> str:
    """FusedFeatures.forward_pooled after an unfused final norm: ReLU (when asked) and the global average pool."""
    if pooled:
        src.add("if relu:")
        src.add("    x = F.relu(x)")
        if any(isinstance(m, (nn.Conv3d, nn.BatchNorm3d)) for m in ff.children()):
            src.add("return torch.flatten(F.adaptive_avg_pool3d(x, 1), 1)")
        else:
            src.add("return torch.flatten(F.adaptive_avg_pool2d(x, [1, 1]), 1)")
    else:
        src.add("return x")
    return src.text()


_SOURCE_IDS = itertools.count()


def _compile_method(source: str, name: str) -> Callable:
    """Executes generated source; it is registered with linecache so that TorchScript (inspect.getsource) reads it."""
    filename = f"<densenet_fast.nn.torchscript generated {next(_SOURCE_IDS)}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    scope = dict(globals())
    exec(compile(source, filename, "exec"), scope)
    return scope[name]


def _features_copy(ff: nn.Module) -> nn.Module:
    forward_src, readers = _features_source(ff, pooled=False)
    pooled_src, pooled_readers = _features_source(ff, pooled=True)
    readers.update(pooled_readers)
    forward = _compile_method(forward_src, "forward")
    forward_pooled = torch.jit.export(_compile_method(pooled_src, "forward_pooled"))
    # One subclass per instance: the methods are this instance's plan.
    cls = type(f"ScriptableFusedFeatures{next(_SOURCE_IDS)}", (type(ff),),
               dict(forward=forward, forward_pooled=forward_pooled, __module__=__name__,
                    dnf_source=forward_src + "\n" + pooled_src))
    new = object.__new__(cls)
    new.__dict__.update(ff.__dict__)
    new._modules = OrderedDict(ff._modules)
    for name, bn in readers.items():
        new._modules[name] = _bn_copy(bn)
    return new


# -- models ------------------------------------------------------------------------------------------------------

def _model_copy(model: nn.Module) -> nn.Module:
    from densenet_fast.models.densenet import DenseNet
    from densenet_fast.models.densenet3d import DenseNet3d
    from densenet_fast.nn.converted import _timm_avg_pool_head, monai_pool_head
    from densenet_fast.nn.fused_features import FusedFeatures

    cls = type(model)
    name = cls.__name__
    features = getattr(model, "features", None)
    if not isinstance(features, FusedFeatures):
        head, attrs = None, {}  # unconverted features (e.g. impl="reference"): the base forward
    elif isinstance(model, DenseNet) or name == "FusedTorchvisionDenseNet":
        head, attrs = _classifier_head, {}
    elif name == "FusedTimmDenseNet":
        head, attrs = (_timm_head if _timm_avg_pool_head(model.global_pool) else None), {}
    elif isinstance(model, DenseNet3d) or name.startswith("FusedMonai"):
        head, attrs = (_monai_head if monai_pool_head(model.class_layers) else _monai_plain_head), {}
    elif name == "FusedXRVDenseNet":
        head = _xrv_head
        attrs = dict(dnf_resolution=int(getattr(model, "input_resolution", 0) or 0),
                     dnf_apply_sigmoid=bool(getattr(model, "apply_sigmoid", False)))
        if not hasattr(model, "op_threshs"):
            attrs["op_threshs"] = None
    else:
        raise TypeError(f"torch.jit.script: no TorchScript forward for {cls.__qualname__}")
    if head is None:  # the parent class's forward (timm's with another head; scriptable)
        base = next(c for c in cls.__mro__[1:] if "forward" in c.__dict__)
        return _copy(model, "Base", dict(forward=base.__dict__["forward"]), **attrs)
    return _copy(model, head.__name__, dict(forward=head), **attrs)


def scriptable(module: nn.Module) -> nn.Module:
    """``__prepare_scriptable__`` of the densenet_fast modules and converted models: the scriptable copy that
    ``torch.jit.script`` compiles instead of ``module`` (which it leaves unchanged)."""
    from densenet_fast.nn.dense_block import DenseBlock, DenseLayer, Transition
    from densenet_fast.nn.fused_features import FusedFeatures
    from densenet_fast.nn.squeeze_excite import SqueezeExcite

    if isinstance(module, FusedFeatures):
        return _features_copy(module)
    if isinstance(module, DenseBlock):
        return _block_copy(module)
    if isinstance(module, Transition):
        return _transition_copy(module)
    if isinstance(module, SqueezeExcite):
        return _se_copy(module)
    if isinstance(module, DenseLayer):
        return _copy(module, "", dict(forward=_layer_forward))
    return _model_copy(module)
