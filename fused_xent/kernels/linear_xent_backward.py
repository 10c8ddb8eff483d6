"""Backward kernel: recompute logit tiles and form dX, dW, db with fp32 accumulation.

For a (BLOCK_N rows) x (BLOCK_C classes) tile it recomputes ``z`` (see
``fused_xent.formulation``), forms

    dz_ij = cp_i * exp(z_ij - lse_i) - g_i * tt_ij        (times 1 - (z/cap)^2 with softcap)

and adds ``dz @ W[cols]`` into ``dX_raw`` and ``scale * dz.T @ X[rows]`` into ``dW``,
``sum_i dz`` into ``db``, all fp32 buffers. Tiles of different programs meet in those
buffers through atomic adds: correct in any order, but the order (and so the last bits)
is not deterministic. Programs are numbered row block fastest, so programs running at
the same time share one class tile of W in L2.
"""

import torch
import triton
import triton.language as tl

from fused_xent.kernels import config
from fused_xent.kernels.launch import fast_jit
from fused_xent.kernels.tiles import logit_tile, target_args, target_tile


@fast_jit
@triton.jit
def linear_xent_backward_kernel(
    X,
    W,
    Bias,
    Scale,
    Y1,
    K1,
    Y2,
    K2,
    E,
    Dn,
    A,
    T,
    LSE,
    CP,
    DX,
    DW,
    DB,
    N,
    C,
    D,
    n_row_blocks,
    stride_xn,
    stride_xd,
    stride_wc,
    stride_wd,
    stride_tn,
    stride_tc,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_HARD: tl.constexpr,
    HAS_Y2: tl.constexpr,
    HAS_DENSE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = pid % n_row_blocks
    pid_c = pid // n_row_blocks
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = pid_c.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    scale = tl.load(Scale).to(tl.float32)
    z = logit_tile(
        X, W, Bias, rows, row_mask, cols, col_mask, D, stride_xn, stride_xd, stride_wc, stride_wd,
        scale, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D,
    )  # fmt: skip
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    cp = tl.load(CP + rows, mask=row_mask, other=0.0)
    tt = target_tile(
        Y1, K1, Y2, K2, E, Dn, A, T, rows, row_mask, cols, col_mask, stride_tn, stride_tc,
        HAS_HARD, HAS_Y2, HAS_DENSE, HAS_WEIGHT,
    )  # fmt: skip
    dz = cp[:, None] * tl.exp(z - lse[:, None]) - tt
    if HAS_SOFTCAP:
        zc = z / softcap
        dz = dz * (1.0 - zc * zc)
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    if COMPUTE_DB:
        tl.atomic_add(DB + cols, tl.sum(dz, axis=0), mask=col_mask, sem="relaxed")
    if UPCAST:
        dz_op = dz
    else:
        dz_op = dz.to(X.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_mask = ds < D
        if COMPUTE_DX:
            w = tl.load(
                W + cols[:, None] * stride_wc + ds[None, :] * stride_wd,
                mask=col_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
            dx = tl.dot(dz_op, w, input_precision=DOT_PRECISION)
            tl.atomic_add(
                DX + rows[:, None] * D + ds[None, :], dx, mask=row_mask[:, None] & d_mask[None, :], sem="relaxed"
            )
        if COMPUTE_DW:
            x = tl.load(
                X + rows[:, None] * stride_xn + ds[None, :] * stride_xd,
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                x = x.to(tl.float32)
            dw = tl.dot(tl.trans(dz_op), x, input_precision=DOT_PRECISION) * scale
            tl.atomic_add(
                DW + cols[:, None] * D + ds[None, :], dw, mask=col_mask[:, None] & d_mask[None, :], sem="relaxed"
            )


def linear_xent_backward(x, w, b, scale, lse, cp, rt_g, opts, need_dx: bool, need_dw: bool, need_db: bool):
    """Launch the backward kernel. ``cp`` (N,) is the coefficient on p, ``rt_g`` the targets
    already multiplied by the upstream gradient. Returns fp32 ``(dx_raw, dw, db)`` (None
    where not needed); ``dx_raw`` lacks the factor ``scale``, ``dw`` includes it."""
    N, D = x.shape
    C = w.shape[0]
    dx = torch.zeros((N, D), device=x.device, dtype=torch.float32) if need_dx else None
    dw = torch.zeros((C, D), device=x.device, dtype=torch.float32) if need_dw else None
    db = torch.zeros((C,), device=x.device, dtype=torch.float32) if need_db else None
    if N == 0 or not (need_dx or need_dw or need_db):
        return dx, dw, db
    blocks = config.backward_blocks(x.device)
    n_row_blocks = triton.cdiv(N, blocks["BLOCK_N"])
    n_col_tiles = triton.cdiv(C, blocks["BLOCK_C"])
    pointers, t_strides, flags = target_args(rt_g)
    scratch = lse  # stands in for buffers that are not computed; never written
    linear_xent_backward_kernel[(n_row_blocks * n_col_tiles,)](
        x, w, b if b is not None else x, scale, *pointers, lse, cp,
        dx if need_dx else scratch, dw if need_dw else scratch, db if need_db else scratch,
        N, C, D, n_row_blocks, x.stride(0), x.stride(1), w.stride(0), w.stride(1), *t_strides,
        opts.softcap if opts.softcap is not None else 1.0,
        HAS_BIAS=b is not None, HAS_SOFTCAP=opts.softcap is not None,
        COMPUTE_DX=need_dx, COMPUTE_DW=need_dw, COMPUTE_DB=need_db,
        **flags, **config.dot_options(x.dtype), **blocks,
    )  # fmt: skip
    return dx, dw, db
