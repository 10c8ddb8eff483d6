"""Forward kernel: per-row log-sum-exp and linear target term, streamed over class tiles.

For each row i it computes, without writing any logit to memory,

    lse_i = log sum_j exp(z_ij),     lin_i = sum_j tt_ij * z_ij

with ``z`` and ``tt`` as in ``fused_xent.formulation``. Each program owns BLOCK_N rows
and a contiguous range of class tiles (a "split"); it keeps an online max ``m`` and a
sum ``s = sum exp(z - m)`` in registers. The splits' partials are combined on the host
side by a log-sum-exp over at most a few dozen values per row: deterministic, no atomics.
"""

import torch
import triton
import triton.language as tl

from fused_xent.kernels import config
from fused_xent.kernels.tiles import logit_tile, target_args, target_tile


@triton.jit
def linear_xent_forward_kernel(
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
    M_out,
    S_out,
    L_out,
    N,
    C,
    D,
    tiles_per_split,
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
    NEED_LIN: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    scale = tl.load(Scale).to(tl.float32)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    lin = tl.zeros([BLOCK_N], dtype=tl.float32)
    first_col = pid_s.to(tl.int64) * tiles_per_split * BLOCK_C
    for t in range(0, tiles_per_split):
        cols = first_col + t * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        z = logit_tile(
            X, W, Bias, rows, row_mask, cols, col_mask, D, stride_xn, stride_xd, stride_wc, stride_wd,
            scale, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D,
        )  # fmt: skip
        zm = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row's first tiles may be all masked
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(zm - m_ref[:, None]), axis=1)
        m = m_new
        if NEED_LIN:
            tt = target_tile(
                Y1, K1, Y2, K2, E, Dn, A, T, rows, row_mask, cols, col_mask, stride_tn, stride_tc,
                HAS_HARD, HAS_Y2, HAS_DENSE, HAS_WEIGHT,
            )  # fmt: skip
            lin += tl.sum(tl.where(tt != 0.0, tt * z, 0.0), axis=1)
    out = pid_s.to(tl.int64) * N + rows
    tl.store(M_out + out, m, mask=row_mask)
    tl.store(S_out + out, s, mask=row_mask)
    tl.store(L_out + out, lin, mask=row_mask)


def linear_xent_forward(x, w, b, scale, rt, opts, need_lin: bool = True):
    """Launch the forward kernel. ``x`` (N, D), ``w`` (C, D), ``b`` (C,) or None, ``scale``
    a 1-element fp32 tensor. Returns ``(lse, lin)``, each (N,) fp32."""
    N, D = x.shape
    C = w.shape[0]
    if N == 0:
        empty = x.new_empty((0,), dtype=torch.float32)
        return empty, empty
    blocks = config.forward_blocks(x.device)
    n_row_blocks = triton.cdiv(N, blocks["BLOCK_N"])
    n_tiles = triton.cdiv(C, blocks["BLOCK_C"])
    splits = min(n_tiles, max(1, triton.cdiv(config.target_programs(x.device), n_row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    partial = torch.empty((3, splits, N), device=x.device, dtype=torch.float32)
    pointers, t_strides, flags = target_args(rt)
    linear_xent_forward_kernel[(n_row_blocks, splits)](
        x, w, b if b is not None else x, scale, *pointers, partial[0], partial[1], partial[2],
        N, C, D, tiles_per_split, x.stride(0), x.stride(1), w.stride(0), w.stride(1), *t_strides,
        opts.softcap if opts.softcap is not None else 1.0,
        HAS_BIAS=b is not None, HAS_SOFTCAP=opts.softcap is not None, NEED_LIN=need_lin,
        **flags, **config.dot_options(x.dtype), **blocks,
    )  # fmt: skip
    m, s, lin = partial
    m_max = m.max(dim=0).values
    lse = m_max + torch.log((s * torch.exp(m - m_max)).sum(dim=0))
    return lse, lin.sum(dim=0)
