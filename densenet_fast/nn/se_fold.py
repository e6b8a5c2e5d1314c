"""An SE gate folded into the BN-ReLU reader that follows it (docs/design.md §5).

SE-DenseNet (``se_placement="block"``) gates each block's output, ``y = g[n, c] * x``, and the next module (a
transition, or the final norm) normalises ``y``. A per-sample, per-channel scale commutes into the reader's
prologue, ``relu(a*(g*x) + b) = relu((a*g)*x + b)``, so the reader takes the block buffer ``x`` and the gate ``g``
and ``y`` is never materialised (nor saved):

* squeeze and excitation: ``SqueezeExcite.gate_of(x)`` (operator ``densenet_fast::se_gate_of``) -> the gate
  ``g`` [N, C] and the per-(n, c) mean ``s`` (the squeeze) and variance of ``x`` (``sample_moments``); it
  saves only its inputs (the buffer is saved by the block anyway), so a gate costs N*C saved values (``g``,
  saved by the reader) plus the reader's 2*C batch statistics;
* the reader's batch statistics are those of ``y``, combined from the per-sample moments and ``g``
  (:func:`~densenet_fast.ops.tail.gated_channel_moments`); running statistics are updated with them;
* the reader's backward returns ``dx = g*dy`` and ``dg = sum_hw x*dy``; ``dg`` flows through the MLP to ``s``
  and from there, as ``ds/HW``, into the buffer's gradient;
* gradient hand-over (docs/design.md §11): when the buffer is a block's output that never leaves
  FusedFeatures (``hand_over``), the reader's fresh ``dx`` is the block's working gradient, as for an ungated
  reader. The buffer's only other reader is the gate, whose gradient is a broadcast view that autograd adds
  into ``dx`` in place (or, out of place, into a new untagged sum that the block copies as before). Without it
  the block copied ``dx``: a second block-sized tensor at the backward's peak (se_densenet121, batch 8, 224x224:
  the 24.5 MiB of block 1's gradient).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from densenet_fast.nn.dense_block import Transition, fused_device_ok
from densenet_fast.nn.squeeze_excite import SqueezeExcite
from densenet_fast.ops import tail as _tail_ops
from densenet_fast.ops.common import mark_sole_reader
from densenet_fast.ops.dense_block import cpu_autocast_dtype

__all__ = ["can_fold", "gate_and_stats", "folded_transition"]


def can_fold(se: nn.Module, x: Tensor) -> bool:
    """Whether ``se`` (the module before a fused BN reader) can be folded into that reader for input ``x``
    [N, C, H, W]: a fused SqueezeExcite (sigmoid gate, ReLU, no norm; the caller checks it has no hooks), and
    an input the tail kernels take as it is (float32/float64 CPU; CUDA). A CPU bfloat16 buffer under autocast
    is not folded: the CPU tail kernels compute bfloat16 in float32 on a transient copy and take no gate."""
    return (type(se) is SqueezeExcite and se.fused and isinstance(x, Tensor) and x.dim() == 4
            and x.shape[0] > 0 and x.shape[1] == se.fc1.in_channels and cpu_autocast_dtype(x, "tail") == x.dtype
            and cpu_autocast_dtype(x, "float32") == x.dtype and fused_device_ok(x))


def gate_and_stats(se: SqueezeExcite, bn: nn.BatchNorm2d, x: Tensor) -> tuple[Tensor, Optional[Tensor],
                                                                              Optional[Tensor]]:
    """(gate [N, C], batch mean [C], batch var [C]) of ``y = gate * x`` for a reader whose BN is ``bn``; the
    statistics are None in eval (the reader uses its running statistics)."""
    gate, squeezed, sample_var = se.gate_of(x)
    if not bn.training:
        return gate, None, None
    mean, var = _tail_ops.gated_channel_moments(squeezed, sample_var, gate)
    return gate, mean, var


def folded_transition(se: SqueezeExcite, tr: Transition, x: Tensor, hand_over: bool = False) -> Tensor:
    """``tr(se(x))`` with the gate folded into the transition's prologue. ``hand_over``: ``x`` is a fused block's
    buffer that nothing outside FusedFeatures reads (the block may take the transition's input gradient over)."""
    gate, mean, var = gate_and_stats(se, tr.norm, x)
    return tr.fused_forward(mark_sole_reader(x) if hand_over else x, mean, var, gate=gate)
