"""Tile helpers shared by the forward and backward kernels (see ``formulation``)."""

import triton
import triton.language as tl


@triton.jit
def logit_tile(
    X,
    W,
    Bias,
    rows,
    row_mask,
    cols,
    col_mask,
    D,
    stride_xn,
    stride_xd,
    stride_wc,
    stride_wd,
    scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``z = softcap(scale * X[rows] @ W[cols].T + b[cols])`` as a (BLOCK_N, BLOCK_C) fp32 tile.

    ``rows`` and ``cols`` are int64 so that ``row * stride`` never wraps.
    """
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        x = tl.load(
            X + rows[:, None] * stride_xn + ds[None, :] * stride_xd, mask=row_mask[:, None] & d_mask[None, :], other=0.0
        )
        w = tl.load(
            W + cols[:, None] * stride_wc + ds[None, :] * stride_wd, mask=col_mask[:, None] & d_mask[None, :], other=0.0
        )
        if UPCAST:  # the CPU interpreter mis-multiplies bf16 operands
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return logit_epilogue(acc, cols, col_mask, Bias, scale, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def raw_tile_tma(
    x_desc,
    w_desc,
    r0,
    c0,
    D,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """``X[r0 : r0 + BLOCK_N] @ W[c0 : c0 + BLOCK_C].T`` in fp32, the operands read through TMA
    tensor descriptors (rows and columns past the ends read as zeros)."""
    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(D, BLOCK_D)):
        x = x_desc.load([r0, k * BLOCK_D])
        w = w_desc.load([c0, k * BLOCK_D])
        if UPCAST:  # the CPU interpreter mis-multiplies bf16 operands
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def logit_epilogue(raw, cols, col_mask, Bias, scale, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``softcap(scale * raw + b[cols])`` in fp32 for a tile of raw products ``x . w``."""
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return logit_value(raw, bias, scale, softcap, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def logit_value(raw, bias, scale, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """``softcap(scale * raw + bias)`` in fp32, ``bias`` already loaded (broadcast to ``raw``)."""
    z = raw * scale
    if HAS_BIAS:
        z += bias
    if HAS_SOFTCAP:
        # tanh through exp: saturates to +-1 without overflow for large |z|
        z = softcap * (1.0 - 2.0 / (tl.exp(2.0 * z / softcap) + 1.0))
    return z


@triton.jit
def fold_row_stats(m, s, lin, z, tt, col_mask, NEED_LIN: tl.constexpr):
    """Fold a (rows, cols) tile of logits ``z`` into each row's running max ``m``, sum
    ``s = sum exp(z - m)`` and (with ``NEED_LIN``) ``lin = sum tt * z``; masked columns count
    for nothing."""
    zm = tl.where(col_mask[None, :], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(zm, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(zm - m_ref[:, None]), axis=1)
    if NEED_LIN:
        lin += tl.sum(tl.where(tt != 0.0, tt * z, 0.0), axis=1)
    return m_new, s, lin


@triton.jit
def target_tile(
    Y1,
    K1,
    Y2,
    K2,
    E,
    Dn,
    A,
    T,
    rows,
    row_mask,
    cols,
    col_mask,
    stride_tn,
    stride_tc,
    HAS_HARD: tl.constexpr,
    HAS_Y2: tl.constexpr,
    HAS_DENSE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """``tt[rows, cols] = k1 [c == y1] + k2 [c == y2] + a_c (e + d * T)``, 0 outside C."""
    e = tl.load(E + rows, mask=row_mask, other=0.0)
    base = e[:, None] + tl.zeros([1, 1], dtype=tl.float32)
    if HAS_DENSE:
        dn = tl.load(Dn + rows, mask=row_mask, other=0.0)
        t = tl.load(
            T + rows[:, None] * stride_tn + cols[None, :] * stride_tc,
            mask=row_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        base = base + dn[:, None] * t.to(tl.float32)
    if HAS_WEIGHT:  # no mass, no weight: an inf / NaN weight of a class without it adds nothing
        base = tl.where(base != 0.0, base * tl.load(A + cols, mask=col_mask, other=0.0)[None, :], 0.0)
    tt = tl.where(col_mask[None, :], base, 0.0)
    if HAS_HARD:
        y1 = tl.load(Y1 + rows, mask=row_mask, other=-1)
        k1 = tl.load(K1 + rows, mask=row_mask, other=0.0)
        tt += tl.where(cols[None, :] == y1[:, None], k1[:, None], 0.0)
        if HAS_Y2:
            y2 = tl.load(Y2 + rows, mask=row_mask, other=-1)
            k2 = tl.load(K2 + rows, mask=row_mask, other=0.0)
            tt += tl.where(cols[None, :] == y2[:, None], k2[:, None], 0.0)
    return tt


@triton.jit
def label_target_tile(Y1, K1, Y2, K2, E, rows, row_mask, cols, HAS_Y2: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    """``target_tile`` without dense targets or class weights: ``e + k1 [c == y1] + k2 [c == y2]``
    (``e`` only with ``HAS_SMOOTHING``: it is 0 without), the labels compared as int32 (``cols``
    int32) and added in ``target_tile``'s order, so the same bits on every column inside C
    (outside it the caller masks). Fewer instructions per entry than ``target_tile``, for
    epilogues that run between MMAs."""
    y1 = tl.load(Y1 + rows, mask=row_mask, other=-1).to(tl.int32)
    tt = tl.where(cols[None, :] == y1[:, None], tl.load(K1 + rows, mask=row_mask, other=0.0)[:, None], 0.0)
    if HAS_SMOOTHING:
        tt = tl.load(E + rows, mask=row_mask, other=0.0)[:, None] + tt
    if HAS_Y2:
        y2 = tl.load(Y2 + rows, mask=row_mask, other=-1).to(tl.int32)
        tt += tl.where(cols[None, :] == y2[:, None], tl.load(K2 + rows, mask=row_mask, other=0.0)[:, None], 0.0)
    return tt


@triton.jit
def grouped_tile(pid, n_rows, width, GROUP_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """``(r0, c0)``, the first row and column of tile ``pid`` of an ``n_rows x width`` grid of
    (BLOCK_N x BLOCK_C) tiles, numbered GROUP_M row tiles at a time down each column tile, so
    that programs running together share their column operand in L2."""
    n_m = tl.cdiv(n_rows, BLOCK_N)
    per_group = GROUP_M * tl.cdiv(width, BLOCK_C)
    first_m = pid // per_group * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)
    return (first_m + pid % per_group % group_rows) * BLOCK_N, (pid % per_group // group_rows) * BLOCK_C


def target_args(rt) -> tuple:
    """The ``target_tile`` pointers of a ``RowTargets`` (absent ones replaced by ``rt.e``,
    never read because their flag is off) and its constexpr flags."""
    e = rt.e
    pointers = (
        rt.y1 if rt.y1 is not None else e,
        rt.k1 if rt.k1 is not None else e,
        rt.y2 if rt.y2 is not None else e,
        rt.k2 if rt.k2 is not None else e,
        e,
        rt.d if rt.d is not None else e,
        rt.class_weight if rt.class_weight is not None else e,
        rt.dense if rt.dense is not None else e,
    )
    strides = (rt.dense.stride(0), rt.dense.stride(1)) if rt.dense is not None else (0, 0)
    flags = dict(
        HAS_HARD=rt.y1 is not None,
        HAS_Y2=rt.y2 is not None,
        HAS_DENSE=rt.dense is not None,
        HAS_WEIGHT=rt.class_weight is not None,
    )
    return pointers, strides, flags
