"""Triton kernels for squeeze-and-excitation gating (docs/design.md §5).

Importing this module imports triton and defines the kernels, so set ``TRITON_INTERPRET=1``
*before* the first import if the kernels should run on CPU tensors through the interpreter.
Use :mod:`densenet_fast.ops.triton` (which imports this lazily) rather than importing it directly.

Layout: ``x`` is any strided ``[N, C, H, W]`` tensor (NCHW, channels_last, slices); strides are
passed to the kernels and every offset is computed in 64-bit. Activations may be fp16/bf16/fp32;
all sums and the tiny excite FCs run in fp32, and the per-sample vectors ``s``/``h``/``g`` are
kept in fp32.

Kernels (no atomics anywhere, so results are bit-for-bit deterministic for a given device):

* ``_channel_sum``: ``part[split, n, c] = Σ_{hw ∈ chunk(split)} a[n,c,hw] (· b[n,c,hw])``
  (squeeze in the forward, ``Σ dy·x`` in the backward: one pass over x and dy).
* ``_split_finalize``: sums the split partials in a fixed order, then scales (``s = Σ/HW``) or
  applies the sigmoid backward (``dz2 = dg·g·(1-g)``).
* ``_rowwise_linear``: ``out[n, m] = act(scale · Σ_k in[n,k]·w[m,k] + b[m])`` for the excite FCs
  and, with transposed weight strides, for ``dh = dz2·W2`` and ``ds = dz1·W1``.
* ``_outer_sum``: ``dw[m,k] = Σ_n a[n,m]·b[n,k]`` and ``db[m] = Σ_n a[n,m]`` (weight grads).
* ``_scale``: ``out = x·g (+ add)`` (apply in the forward, ``dx = dy·g + ds/HW`` in the backward).

Only plain ``tl.load``/``tl.store``/``tl.sum``/elementwise ops are used (no ``tl.dot``, no block
pointers, no libdevice) so the same code runs on triton 3.6+ and under ``TRITON_INTERPRET=1``.
Inputs are upcast to fp32 right after loading (the interpreter's bf16 arithmetic is unreliable).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["se_forward_triton", "se_backward_triton"]

# Activation codes of `_rowwise_linear`.
_ACT_NONE, _ACT_RELU, _ACT_SIGMOID, _ACT_RELU_MASK = 0, 1, 2, 3
# Modes of `_split_finalize`.
_FIN_SCALE, _FIN_SIGMOID_BWD = 0, 1


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _spatial_offsets(hw, W, s_h, s_w, FLAT: tl.constexpr):
    # hw is int64; FLAT means the spatial dims collapse to one stride (s_w), skipping the div/mod.
    # (Single return: early returns inside constexpr ifs are not portable across triton versions.)
    if FLAT:
        off = hw * s_w
    else:
        off = (hw // W) * s_h + (hw % W) * s_w
    return off


@triton.jit
def _channel_sum(
    a_ptr, b_ptr, part_ptr,
    C, HW, W, hw_per_split, NC,
    a_sn, a_sc, a_sh, a_sw,
    b_sn, b_sc, b_sh, b_sw,
    HAS_B: tl.constexpr, FLAT_A: tl.constexpr, FLAT_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """grid (N, cdiv(C, BLOCK_C), SPLIT): one program sums a channel block over one HW chunk."""
    pid_n = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2).to(tl.int64)

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c64 = c.to(tl.int64)
    a_row = a_ptr + pid_n * a_sn + c64[:, None] * a_sc
    b_row = b_ptr + pid_n * b_sn + c64[:, None] * b_sc

    hw_start = pid_s * hw_per_split
    hw_end = tl.minimum(hw_start + hw_per_split, HW)
    # Accumulate a 2-D tile and reduce once at the end: fewer cross-lane reductions.
    acc = tl.zeros([BLOCK_C, BLOCK_HW], dtype=tl.float32)
    for hw0 in range(hw_start, hw_end, BLOCK_HW):
        hw = hw0 + tl.arange(0, BLOCK_HW).to(tl.int64)
        mask = c_mask[:, None] & (hw < hw_end)[None, :]
        a_off = _spatial_offsets(hw, W, a_sh, a_sw, FLAT_A)
        v = tl.load(a_row + a_off[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_B:
            b_off = _spatial_offsets(hw, W, b_sh, b_sw, FLAT_B)
            v = v * tl.load(b_row + b_off[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += v
    total = tl.sum(acc, axis=1)
    tl.store(part_ptr + pid_s * NC + pid_n * C + c64, total, mask=c_mask)


@triton.jit
def _split_finalize(part_ptr, aux_ptr, out_ptr, NC, SPLIT, scale,
                    MODE: tl.constexpr, BLOCK: tl.constexpr):
    """grid (cdiv(N*C, BLOCK),): fixed-order sum of the split partials (deterministic)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NC
    p = part_ptr + offs
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(0, SPLIT):
        acc += tl.load(p, mask=mask, other=0.0)
        p += NC
    if MODE == 1:  # _FIN_SIGMOID_BWD: dz2 = dg * g * (1 - g)
        g = tl.load(aux_ptr + offs, mask=mask, other=0.0)
        acc = acc * g * (1.0 - g)
    else:  # _FIN_SCALE
        acc = acc * scale
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _rowwise_linear(
    in_ptr, w_ptr, b_ptr, aux_ptr, out_ptr,
    M, K, w_sm, w_sk, scale,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid (N, cdiv(M, BLOCK_M)): out[n, m] = act(scale * Σ_k in[n, k] w[m, k] + b[m]).

    ``in``/``out``/``aux`` are contiguous fp32 ``[N, K]``/``[N, M]``/``[N, M]``; ``w`` is strided
    (pass swapped strides to multiply by its transpose). ACT: 0 none, 1 relu, 2 sigmoid,
    3 keep where ``aux > 0`` (ReLU backward with the saved ReLU output).
    """
    n = tl.program_id(0).to(tl.int64)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = m < M
    m64 = m.to(tl.int64)
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        k64 = k.to(tl.int64)
        v = tl.load(in_ptr + n * K + k64, mask=k_mask, other=0.0)
        w = tl.load(w_ptr + m64[:, None] * w_sm + k64[None, :] * w_sk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(w * v[None, :], axis=1)
    acc = acc * scale
    if HAS_BIAS:
        acc += tl.load(b_ptr + m64, mask=m_mask, other=0.0).to(tl.float32)
    if ACT == 1:
        acc = tl.maximum(acc, 0.0)
    elif ACT == 2:
        acc = tl.sigmoid(acc)
    elif ACT == 3:
        h = tl.load(aux_ptr + n * M + m64, mask=m_mask, other=0.0)
        acc = tl.where(h > 0.0, acc, 0.0)
    tl.store(out_ptr + n * M + m64, acc, mask=m_mask)


@triton.jit
def _outer_sum(
    a_ptr, b_ptr, dw_ptr, db_ptr,
    N, M, K, dw_sm, dw_sk,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K)): dw = aᵀb, db = Σ_n a (fp32 in, cast on store).

    The batch is reduced sequentially inside each program: deterministic, and N is small.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = m < M
    k_mask = k < K
    m64 = m.to(tl.int64)
    k64 = k.to(tl.int64)
    a_p = a_ptr + m64
    b_p = b_ptr + k64
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    db = tl.zeros([BLOCK_M], dtype=tl.float32)
    for _ in range(0, N):
        a = tl.load(a_p, mask=m_mask, other=0.0)
        b = tl.load(b_p, mask=k_mask, other=0.0)
        acc += a[:, None] * b[None, :]
        db += a
        a_p += M
        b_p += K
    dw_mask = m_mask[:, None] & k_mask[None, :]
    tl.store(dw_ptr + m64[:, None] * dw_sm + k64[None, :] * dw_sk,
             acc.to(dw_ptr.dtype.element_ty), mask=dw_mask)
    if HAS_BIAS:
        tl.store(db_ptr + m64, db.to(db_ptr.dtype.element_ty), mask=m_mask & (pid_k == 0))


@triton.jit
def _scale(
    x_ptr, g_ptr, add_ptr, out_ptr,
    C, HW, W, n_hw_blocks,
    x_sn, x_sc, x_sh, x_sw,
    o_sn, o_sc, o_sh, o_sw,
    HAS_ADD: tl.constexpr, FLAT_X: tl.constexpr, FLAT_O: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr,
):
    """grid (N * n_hw_blocks, cdiv(C, BLOCK_C)): out[n,c,hw] = x[n,c,hw] * g[n,c] (+ add[n,c]).

    Batch and HW blocks share grid axis 0 (2^31 limit) since axes 1/2 are capped at 65535.
    """
    pid0 = tl.program_id(0)
    n = (pid0 // n_hw_blocks).to(tl.int64)
    hb = (pid0 % n_hw_blocks).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    c64 = c.to(tl.int64)
    hw = hb * BLOCK_HW + tl.arange(0, BLOCK_HW).to(tl.int64)
    mask = c_mask[:, None] & (hw < HW)[None, :]

    x_off = _spatial_offsets(hw, W, x_sh, x_sw, FLAT_X)
    x = tl.load(x_ptr + n * x_sn + c64[:, None] * x_sc + x_off[None, :],
                mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + n * C + c64, mask=c_mask, other=0.0)
    out = x * g[:, None]
    if HAS_ADD:
        out += tl.load(add_ptr + n * C + c64, mask=c_mask, other=0.0)[:, None]
    o_off = _spatial_offsets(hw, W, o_sh, o_sw, FLAT_O)
    tl.store(out_ptr + n * o_sn + c64[:, None] * o_sc + o_off[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# host side
# --------------------------------------------------------------------------------------------
_NUM_WARPS = 4


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _spatial(t: torch.Tensor) -> tuple[bool, int, int]:
    """(flat, s_h, s_w): whether H and W collapse into one dimension of stride s_w."""
    _, _, h, w = t.shape
    s_h, s_w = t.stride(2), t.stride(3)
    if h == 1:
        return True, s_h, s_w
    if w == 1:
        return True, s_h, s_h
    return s_h == w * s_w, s_h, s_w


def _tiles(t: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) for a streaming pass, ~2K elements per tile, along the fast axis."""
    _, c, h, w = t.shape
    hw = h * w
    channels_fast = t.stride(1) == 1 and c > 1 and t.stride(3) != 1
    if channels_fast:  # channels_last: vectorise along C
        block_c = min(_next_pow2(c), 128)
        block_hw = min(_next_pow2(hw), max(1, 2048 // block_c))
    else:  # NCHW: vectorise along HW
        block_hw = min(_next_pow2(hw), 512)
        block_c = min(_next_pow2(c), max(1, 2048 // block_hw))
    return block_c, block_hw


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_splits(x: torch.Tensor, block_c: int, block_hw: int,
                num_splits: Optional[int]) -> tuple[int, int]:
    """(split, hw_per_split): split HW only when N x C-blocks can't fill the GPU."""
    n, c, h, w = x.shape
    hw = h * w
    max_split = triton.cdiv(hw, block_hw)
    if num_splits is None:
        if x.device.type == "cuda":
            programs = n * triton.cdiv(c, block_c)
            num_splits = triton.cdiv(4 * _sm_count(x.device.index or 0), programs)
        else:  # interpreter: every program instance costs ~0.3 ms, so use as few as possible
            num_splits = 1
    split = max(1, min(int(num_splits), max_split))
    hw_per_split = triton.cdiv(triton.cdiv(hw, split), block_hw) * block_hw
    return triton.cdiv(hw, hw_per_split), hw_per_split


def _channel_sums(a: torch.Tensor, b: Optional[torch.Tensor],
                  num_splits: Optional[int]) -> tuple[torch.Tensor, int]:
    """Launch `_channel_sum`; returns (part[split, N, C] fp32, split)."""
    n, c, h, w = a.shape
    # Tile along x's fast axis (b is x in the backward; dy may be e.g. an expanded tensor).
    block_c, block_hw = _tiles(a if b is None else b)
    split, hw_per_split = _num_splits(a, block_c, block_hw, num_splits)
    part = torch.empty((split, n, c), device=a.device, dtype=torch.float32)
    flat_a, a_sh, a_sw = _spatial(a)
    bb = a if b is None else b
    flat_b, b_sh, b_sw = _spatial(bb)
    grid = (n, triton.cdiv(c, block_c), split)
    _channel_sum[grid](
        a, bb, part,
        c, h * w, w, hw_per_split, n * c,
        a.stride(0), a.stride(1), a_sh, a_sw,
        bb.stride(0), bb.stride(1), b_sh, b_sw,
        HAS_B=b is not None, FLAT_A=flat_a, FLAT_B=flat_b,
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=_NUM_WARPS,
    )
    return part, split


def _finalize(part: torch.Tensor, split: int, mode: int, scale: float = 1.0,
              aux: Optional[torch.Tensor] = None) -> torch.Tensor:
    _, n, c = part.shape
    out = torch.empty((n, c), device=part.device, dtype=torch.float32)
    block = min(_next_pow2(n * c), 1024)
    _split_finalize[(triton.cdiv(n * c, block),)](
        part, out if aux is None else aux, out, n * c, split, scale,
        MODE=mode, BLOCK=block, num_warps=_NUM_WARPS,
    )
    return out


def _linear(inp: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], act: int,
            transpose: bool = False, scale: float = 1.0,
            aux: Optional[torch.Tensor] = None) -> torch.Tensor:
    """out = act(scale * inp @ op(w).T + b) with op(w) = w.T if transpose; inp fp32 [N, K]."""
    n, k = inp.shape
    w_sm, w_sk = (w.stride(1), w.stride(0)) if transpose else (w.stride(0), w.stride(1))
    m = w.shape[1] if transpose else w.shape[0]
    out = torch.empty((n, m), device=inp.device, dtype=torch.float32)
    block_m = min(_next_pow2(m), 64)
    block_k = min(_next_pow2(k), 64)
    _rowwise_linear[(n, triton.cdiv(m, block_m))](
        inp, w, out if b is None else b, out if aux is None else aux, out,
        m, k, w_sm, w_sk, scale,
        HAS_BIAS=b is not None, ACT=act, BLOCK_M=block_m, BLOCK_K=block_k,
        num_warps=_NUM_WARPS,
    )
    return out


def _weight_grads(a: torch.Tensor, b: torch.Tensor, like_w: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(aᵀb, Σ_n a) in like_w's dtype; a [N, M], b [N, K] fp32."""
    n, m = a.shape
    k = b.shape[1]
    dw = torch.empty((m, k), device=a.device, dtype=like_w.dtype)
    db = torch.empty((m,), device=a.device, dtype=like_w.dtype)
    block_m = min(_next_pow2(m), 32)
    block_k = min(_next_pow2(k), 64)
    _outer_sum[(triton.cdiv(m, block_m), triton.cdiv(k, block_k))](
        a, b, dw, db, n, m, k, dw.stride(0), dw.stride(1),
        HAS_BIAS=True, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=_NUM_WARPS,
    )
    return dw, db


def _scale_into(out: torch.Tensor, x: torch.Tensor, g: torch.Tensor,
                add: Optional[torch.Tensor]) -> None:
    n, c, h, w = x.shape
    hw = h * w
    block_c, block_hw = _tiles(out)  # out is laid out like the forward's x
    n_hw_blocks = triton.cdiv(hw, block_hw)
    flat_x, x_sh, x_sw = _spatial(x)
    flat_o, o_sh, o_sw = _spatial(out)
    _scale[(n * n_hw_blocks, triton.cdiv(c, block_c))](
        x, g, g if add is None else add, out,
        c, hw, w, n_hw_blocks,
        x.stride(0), x.stride(1), x_sh, x_sw,
        out.stride(0), out.stride(1), o_sh, o_sw,
        HAS_ADD=add is not None, FLAT_X=flat_x, FLAT_O=flat_o,
        BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=_NUM_WARPS,
    )


class _DeviceGuard:
    """Make x's CUDA device current for the launches (no-op on CPU / interpreter)."""

    def __init__(self, t: torch.Tensor) -> None:
        self._ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def se_forward_triton(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                      w2: torch.Tensor, b2: Optional[torch.Tensor],
                      num_splits: Optional[int] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SE forward. x [N, C, H, W] (any strides), w1 [R, C], b1 [R], w2 [C, R], b2 [C].

    Returns ``(y, s, g)``: y like ``torch.empty_like(x)``; s = mean_hw(x) and g the gate, both
    fp32 ``[N, C]``. Inputs are assumed validated (see ``densenet_fast.ops.squeeze_excite``).
    """
    n, c, h, w = x.shape
    hw = h * w
    with _DeviceGuard(x):
        w1c, w2c = w1.contiguous(), w2.contiguous()
        part, split = _channel_sums(x, None, num_splits)
        s = _finalize(part, split, _FIN_SCALE, scale=1.0 / hw)
        hid = _linear(s, w1c, b1, _ACT_RELU)
        g = _linear(hid, w2c, b2, _ACT_SIGMOID)
        y = torch.empty_like(x)
        _scale_into(y, x, g, None)
    return y, s, g


def se_backward_triton(dy: torch.Tensor, x: torch.Tensor, s: torch.Tensor, g: torch.Tensor,
                       w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                       num_splits: Optional[int] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor, torch.Tensor]:
    """SE backward. Returns ``(dx, dw1, db1, dw2, db2)`` (weight grads in the weights' dtype).

    ``s``/``g`` are the fp32 ``[N, C]`` vectors returned by the forward; the hidden activation
    is recomputed from ``s`` (one tiny launch) instead of being saved.
    """
    n, c, h, w = x.shape
    hw = h * w
    with _DeviceGuard(x):
        w1c, w2c = w1.contiguous(), w2.contiguous()
        s, g = s.float().contiguous(), g.float().contiguous()
        hid = _linear(s, w1c, b1, _ACT_RELU)
        part, split = _channel_sums(dy, x, num_splits)  # dg = Σ_hw dy·x, one pass over both
        dz2 = _finalize(part, split, _FIN_SIGMOID_BWD, aux=g)
        dz1 = _linear(dz2, w2c, None, _ACT_RELU_MASK, transpose=True, aux=hid)
        ds_hw = _linear(dz1, w1c, None, _ACT_NONE, transpose=True, scale=1.0 / hw)
        dw2, db2 = _weight_grads(dz2, hid, w2)
        dw1, db1 = _weight_grads(dz1, s, w1)
        dx = torch.empty_like(x)
        _scale_into(dx, dy, g, ds_hw)
    return dx, dw1, db1, dw2, db2
