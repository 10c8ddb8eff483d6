"""Forward kernel: per-row log-sum-exp and linear target term, streamed over class tiles.

For each row i it computes, without writing any logit to memory,

    lse_i = log sum_j exp(z_ij),     lin_i = sum_j tt_ij * z_ij

with ``z`` and ``tt`` as in ``fused_xent.formulation``. Each program owns BLOCK_N rows
and a contiguous range of class tiles (a "split"); it keeps an online max ``m`` and a
sum ``s = sum exp(z - m)`` in registers. The splits' partials are combined on the host
side by a log-sum-exp over at most a few dozen values per row: deterministic, no atomics.

Where the operands allow it (16-bit, rows 16-byte aligned, Hopper or later, and always under the
interpreter) X and W tiles come through TMA tensor descriptors: H100, Gemma 2 head forward only,
19.9 ms with pointer loads against 15.5-17.2 ms through descriptors
(``benchmarks/NVIDIA-H100-80GB-HBM3/tune_forward_tma.log``, run 7).
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fused_xent.kernels import config
from fused_xent.kernels.launch import fast_jit
from fused_xent.kernels.tiles import logit_epilogue, logit_tile, raw_tile_tma, target_args, target_tile


@fast_jit
@triton.jit
def linear_xent_forward_kernel(
    X,
    W,
    x_desc,
    w_desc,
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
    HAS_SMOOTHING: tl.constexpr,
    UNIT_SCALE: tl.constexpr,
    USE_TMA: tl.constexpr,
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
    # without dense targets or class weights the target row is e (every class) plus k1 at y1
    # and k2 at y2: lin = e * sum_j z_j + k1 z_y1 + k2 z_y2, no target tile per class tile
    # (e is 0 without label smoothing: then no row sum either)
    SPARSE: tl.constexpr = NEED_LIN and not HAS_DENSE and not HAS_WEIGHT
    if SPARSE:
        if HAS_SMOOTHING:
            e = tl.load(E + rows, mask=row_mask, other=0.0)
            z_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        if HAS_HARD:
            y1 = tl.load(Y1 + rows, mask=row_mask, other=-1).to(tl.int32)
            k1 = tl.load(K1 + rows, mask=row_mask, other=0.0)
            z1 = tl.zeros([BLOCK_N], dtype=tl.float32)
            if HAS_Y2:
                y2 = tl.load(Y2 + rows, mask=row_mask, other=-1).to(tl.int32)
                k2 = tl.load(K2 + rows, mask=row_mask, other=0.0)
                z2 = tl.zeros([BLOCK_N], dtype=tl.float32)
    # class offsets in int32 (C < 2**31): int64 column indices cost a tile's worth of registers
    c_first = pid_s * tiles_per_split * BLOCK_C
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(C - c_first, BLOCK_C))  # the last split may be short
    for t in range(0, n_tiles):
        c0 = c_first + t * BLOCK_C
        if USE_TMA:
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < C
            raw = raw_tile_tma(
                x_desc, w_desc, pid_n * BLOCK_N, c0, D, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D
            )  # fmt: skip
            # every extra pass over the fp32 tile shows: this multiply and a separate row sum
            # took the Gemma 2 forward from 15.1 to 18.7 ms (tune_forward_tma.log, run 6)
            if not UNIT_SCALE:
                raw = raw * scale
            z = logit_epilogue(raw, cols, col_mask, Bias, 1.0, softcap, HAS_BIAS, HAS_SOFTCAP)
        else:  # int64 columns: they multiply W's row stride
            cols = c0.to(tl.int64) + tl.arange(0, BLOCK_C)
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
        if SPARSE:
            if HAS_SMOOTHING:
                z_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
            if HAS_HARD:
                z1 += tl.sum(tl.where(cols[None, :] == y1[:, None], z, 0.0), axis=1)
                if HAS_Y2:
                    z2 += tl.sum(tl.where(cols[None, :] == y2[:, None], z, 0.0), axis=1)
        elif NEED_LIN:
            tt = target_tile(
                Y1, K1, Y2, K2, E, Dn, A, T, rows, row_mask, cols, col_mask, stride_tn, stride_tc,
                HAS_HARD, HAS_Y2, HAS_DENSE, HAS_WEIGHT,
            )  # fmt: skip
            lin += tl.sum(tl.where(tt != 0.0, tt * z, 0.0), axis=1)
    if SPARSE:  # a zero weight contributes nothing, even against an infinite logit
        if HAS_SMOOTHING:
            lin = tl.where(e != 0.0, e * z_sum, 0.0)
        if HAS_HARD:
            lin += tl.where(k1 != 0.0, k1 * z1, 0.0)
            if HAS_Y2:
                lin += tl.where(k2 != 0.0, k2 * z2, 0.0)
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
    use_tma = tma_loads(x, w)
    if use_tma:
        x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [blocks["BLOCK_N"], blocks["BLOCK_D"]])
        w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [blocks["BLOCK_C"], blocks["BLOCK_D"]])
    else:
        x_desc, w_desc = x, w  # not read
    linear_xent_forward_kernel[(n_row_blocks, splits)](
        x, w, x_desc, w_desc, b if b is not None else x, scale, *pointers, partial[0], partial[1], partial[2],
        N, C, D, tiles_per_split, x.stride(0), x.stride(1), w.stride(0), w.stride(1), *t_strides,
        opts.softcap if opts.softcap is not None else 1.0,
        HAS_BIAS=b is not None, HAS_SOFTCAP=opts.softcap is not None, NEED_LIN=need_lin, USE_TMA=use_tma,
        HAS_SMOOTHING=opts.label_smoothing != 0, UNIT_SCALE=opts.unit_scale,
        **flags, **config.dot_options(x.dtype), **blocks,
    )  # fmt: skip
    m, s, lin = partial
    m_max = m.max(dim=0).values
    # a reference of 0 for a row with no class at all (every split -inf: a shard of the sharded
    # loss whose classes all have a -inf bias), whose lse is -inf, not exp(-inf - -inf) = NaN
    m_ref = torch.where(m_max == float("-inf"), 0.0, m_max)
    lse = m_ref + torch.log((s * torch.exp(m - m_ref)).sum(dim=0))
    return lse, lin.sum(dim=0)


def tma_loads(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the forward kernel reads X and W through TMA descriptors: unit column stride,
    16-byte aligned base and rows, rows that do not overlap (a broadcast operand, row stride 0,
    goes through pointers), 16-bit operands on a GPU of compute capability 9 or later (any dtype
    under the interpreter, where it is how CI tests this path)."""
    for t in (x, w):
        if t.stride(1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
        if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
            return False
    if config.interpreting():
        return True
    return x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16) and config.capability(x.device) >= 9
