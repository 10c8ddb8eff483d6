"""CLIP's row / column log-sum-exp the lean way: cuBLAS GEMMs per block of logits, Triton between.

The same quantities as ``clip_xent`` (``z = s * X @ Y.T``, ``X``, ``Y`` (B, D)):

    lse_row_i = log sum_j exp(z_ij),   lse_col_j = log sum_i exp(z_ij),   diag_i = z_ii,
    dz_ij = g_row_i exp(z_ij - lse_row_i) + g_col_j exp(z_ij - lse_col_j) + [i == j] g_diag_i,
    dX = s dz @ Y,   dY = s dz.T @ X,   ds = sum_ij dz_ij (x_i . y_j).

The raw products ``R = X[rows] @ Y[c0:c1].T`` of a block come from one cuBLAS GEMM, stored as
``class_chunked._raw_products`` does (bf16 for bf16 input, the rounding of torch's own bf16
matmul; fp32 otherwise). Then

- forward, column chunks of every row: ``clip_chunk_stats_kernel`` folds ``z = s * R`` into
  running row statistics, finishes the chunk's column statistics and stores its diagonal;
- backward, tiles of ``TILE_ROWS`` rows x a column chunk: ``clip_chunk_grad_kernel`` writes
  ``s * dz`` (fp16: ``dz / unit``, ``unit`` the largest upstream magnitude, so that nothing
  underflows) in the input dtype over R in place and sums ``dz R`` for ``ds``; cuBLAS adds
  ``dz.T @ X[rows]`` to the chunk's fp32 dY accumulator (rounded once to ``dY[c0:c1]`` when
  the chunk's last tile is done) and ``dz @ Y[c0:c1]`` to the fp32 ``dX[rows]``, both inside
  the GEMM.

Four GEMMs of ``2 B^2 D`` flops in all. Memory beyond the gradients: one block of logits
(``FORWARD_CHUNK_BYTES``, then ``CHUNK_BYTES``), the fp32 dX accumulator and O(B) statistics.
No atomics: every sum has a fixed order, so results are bitwise reproducible.
"""

import torch
import triton
import triton.language as tl

from fused_xent.kernels import config
from fused_xent.kernels.class_chunked import _accumulate, _chunk_dtype, _chunk_ranges, _raw_products
from fused_xent.kernels.launch import fast_jit

#: Bytes of the backward's tile of logits (TILE_ROWS x cc). Beside it the backward holds dY,
#: the fp32 dX accumulator (6 B D bytes for bf16) and the chunk's fp32 dY accumulator; dX is
#: allocated once the tile is freed. 96 MiB keeps B = 32768, D = 768 bf16 under 256 MiB for
#: the whole forward + backward (250 MiB measured on the H100; 80 MiB: 232 MiB, 1% slower).
CHUNK_BYTES = 96 * 2**20
#: Bytes of the forward's chunk (B x cc): the forward holds nothing else of that size, so its
#: chunks are wider and its launches fewer. On the H100 machine a launch costs the host 30-45 us
#: and 1536-column chunks left the GPU waiting: forward 4.5 ms, 3.9 ms with 3072 columns.
FORWARD_CHUNK_BYTES = 192 * 2**20
#: Fewest columns per chunk where that costs no more memory than the fp32 dX accumulator
#: (4 B D bytes, so memory stays O(B D)): each chunk re-reads and re-writes that accumulator
#: (8 B D bytes) for ``2 B cc D`` flops of its GEMM, so narrow chunks wait on memory.
MIN_CHUNK_COLS = 1024


def chunk_cols(B: int, D: int, dtype: torch.dtype, nbytes: int) -> int:
    """Columns per chunk: as many as ``nbytes`` holds, raised to ``MIN_CHUNK_COLS`` where that
    stays within ``4 B D`` bytes; a multiple of 128 (of 8 below 128), at most ``B``."""
    itemsize = _chunk_dtype(dtype).itemsize
    cols = max(nbytes // (itemsize * B), min(MIN_CHUNK_COLS, 4 * D // itemsize))
    cols = cols // 128 * 128 if cols >= 128 else max(8, cols // 8 * 8)
    return min(B, cols)


# ---------------------------------------------------------------- forward


@fast_jit
@triton.jit
def clip_chunk_stats_kernel(
    R, stride_r, Scale, RowM, RowS, ColM, ColS, Diag,
    B, width, c0, rows_per_group, n_stripes,
    EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Fold the chunk ``z = scale * R`` (B x width, global columns from ``c0``) into the stats.

    Program (g, t) walks rows ``[g * rows_per_group, ...)`` of column stripe t (BLOCK_C wide)
    down in BLOCK_N-row blocks. It merges each block into ``(RowM, RowS)[t, rows]`` (one
    running row per stripe, merged over stripes by the host at the end), keeps the stripe's
    column max / sum-exp in registers and stores them as ``(ColM, ColS)[g, cols]`` (merged
    over groups by the host). Each statistic has one writer and a fixed order; no atomics.
    Maxima are in base 2 (``z * log2(e)``, so that ``exp2`` needs no multiply). ``Diag[i] =
    z_ii`` is stored by the one program whose tile holds it. ``EVEN``: no tile is partial.
    """
    pid = tl.program_id(0)
    group = pid // n_stripes
    stripe = pid % n_stripes
    scale = tl.load(Scale).to(tl.float32)
    scale2 = scale * 1.4426950408889634
    local = stripe * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = local < width
    first_col = c0 + stripe * BLOCK_C
    cols = first_col + tl.arange(0, BLOCK_C)
    first_row = group * rows_per_group
    stats = stripe.to(tl.int64) * B  # this stripe's running row statistics
    cm = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
    cs = tl.zeros([BLOCK_C], dtype=tl.float32)
    for r0 in tl.range(first_row, tl.minimum(first_row + rows_per_group, B), BLOCK_N, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_mask = rows < B
        ptrs = R + rows[:, None].to(tl.int64) * stride_r + local[None, :]
        if EVEN:  # no masks: the loads pipeline as plain copies
            z = tl.load(ptrs).to(tl.float32) * scale2
        else:
            valid = row_mask[:, None] & col_mask[None, :]
            z = tl.where(valid, tl.load(ptrs, mask=valid, other=0.0).to(tl.float32) * scale2, float("-inf"))
        # rows: online max and sum-exp; a reference of 0 where everything so far is masked
        m = tl.load(RowM + stats + rows, mask=row_mask, other=float("-inf"))
        s = tl.load(RowS + stats + rows, mask=row_mask, other=0.0)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_ref) + tl.sum(tl.exp2(z - m_ref[:, None]), axis=1)
        tl.store(RowM + stats + rows, m_new, mask=row_mask)
        tl.store(RowS + stats + rows, s, mask=row_mask)
        # columns: the same online update, carried down the stripe in registers
        cm_new = tl.maximum(cm, tl.max(z, axis=0))
        cm_ref = tl.where(cm_new == float("-inf"), 0.0, cm_new)
        cs = cs * tl.exp2(cm - cm_ref) + tl.sum(tl.exp2(z - cm_ref[None, :]), axis=0)
        cm = cm_new
        if (r0 < first_col + BLOCK_C) & (first_col < r0 + BLOCK_N):  # the tile meets i == j
            d = tl.sum(tl.where(rows[:, None] == cols[None, :], z, 0.0), axis=1) / 1.4426950408889634
            mine = row_mask & (rows >= first_col) & (rows < first_col + BLOCK_C) & (rows < c0 + width)
            tl.store(Diag + rows, d, mask=mine)
    tl.store(ColM + group.to(tl.int64) * B + cols, cm, mask=col_mask)
    tl.store(ColS + group.to(tl.int64) * B + cols, cs, mask=col_mask)


#: Tiles of ``clip_chunk_stats_kernel`` on CUDA. One warp: both reductions (over rows and over
#: columns) stay inside the warp.
STATS_BLOCKS = dict(BLOCK_N=32, BLOCK_C=64, STAGES=3, num_warps=1)


def _stats_blocks(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_N=8, BLOCK_C=16, STAGES=1)
    return dict(STATS_BLOCKS)


def _stats_groups(device: torch.device, n_row_blocks: int, n_stripes: int) -> int:
    """Row groups per chunk: enough one-warp programs (groups x stripes, 16 per multiprocessor)
    to keep the memory busy; each group costs one (B,) row of column partials."""
    target = 3 if device.type != "cuda" else 4 * config.target_programs(device)
    return max(1, min(n_row_blocks, triton.cdiv(target, n_stripes)))


def clip_chunked_forward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor):
    """``(lse_row, lse_col, diag)`` of ``z = scale * x @ y.T``, each (B,) fp32. ``x``, ``y``
    (B, D) of one dtype, ``scale`` a 1-element fp32 tensor."""
    B, D = x.shape
    cc = chunk_cols(B, D, x.dtype, FORWARD_CHUNK_BYTES)
    buf = torch.empty((B, cc), device=x.device, dtype=_chunk_dtype(x.dtype))
    blocks = _stats_blocks(x.device)
    block_n, block_c = blocks["BLOCK_N"], blocks["BLOCK_C"]
    n_stripes = triton.cdiv(cc, block_c)
    n_row_blocks = triton.cdiv(B, block_n)
    groups = _stats_groups(x.device, n_row_blocks, n_stripes)
    rows_per_group = triton.cdiv(n_row_blocks, groups) * block_n
    groups = triton.cdiv(B, rows_per_group)  # none empty: every column partial gets written
    row_m = torch.full((n_stripes, B), float("-inf"), device=x.device)
    row_s = torch.zeros((n_stripes, B), device=x.device)
    col_m = torch.empty((groups, B), device=x.device)
    col_s = torch.empty((groups, B), device=x.device)
    diag = torch.empty(B, device=x.device)
    for c0, c1 in _chunk_ranges(B, cc):
        raw = buf[:, : c1 - c0]
        _raw_products(x, y[c0:c1], raw)
        clip_chunk_stats_kernel[(groups * triton.cdiv(c1 - c0, block_c),)](
            raw, raw.stride(0), scale, row_m, row_s, col_m, col_s, diag,
            B, c1 - c0, c0, rows_per_group, triton.cdiv(c1 - c0, block_c),
            EVEN=B % block_n == 0 and (c1 - c0) % block_c == 0, **blocks,
        )  # fmt: skip
    del buf, raw
    return _merge_base2(row_m, row_s), _merge_base2(col_m, col_s), diag


@fast_jit
@triton.jit
def merge_lse_kernel(M, S, Out, n_parts, B, BLOCK: tl.constexpr):
    """``Out[j] = ln 2 * log2 sum_p S[p, j] 2^M[p, j]``: partial base-2 maxima and sums merged
    in the fixed order p = 0, 1, ..."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < B
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for p in range(n_parts):
        m_p = tl.load(M + p * B + cols, mask=mask, other=float("-inf"))
        s_p = tl.load(S + p * B + cols, mask=mask, other=0.0)
        m_new = tl.maximum(m, m_p)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp2(m - m_ref) + s_p * tl.exp2(m_p - m_ref)
        m = m_new
    s = tl.where(mask, s, 1.0)  # no log of 0 past the end
    tl.store(Out + cols, (m + tl.log2(s)) * 0.6931471805599453, mask=mask)


def _merge_base2(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The (natural) log-sum-exp over dim 0 of partials ``(m, s)`` (P, B), ``m`` in base 2."""
    out = torch.empty(m.shape[1], device=m.device)
    block = 256 if m.is_cuda else 16
    merge_lse_kernel[(triton.cdiv(m.shape[1], block),)](m, s, out, m.shape[0], m.shape[1], BLOCK=block)
    return out


# ---------------------------------------------------------------- backward


@fast_jit
@triton.jit
def clip_chunk_grad_kernel(
    R, stride_r, G, stride_g, Scale, LseRow, LseCol, GRow, GCol, GDiag, OutScale, DS, stride_ds,
    stride_grow, stride_gcol, stride_gdiag, n_rows, r0, width, c0, cols_per_program,
    EVEN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """``dz * out_scale`` of one tile (global rows ``r0 + [0, n_rows)``, columns ``c0 + [0,
    width)``), written over R in G's dtype. Program (i, j) covers row block i and the tile's
    columns ``[j * cols_per_program, ...)``; it adds its ``sum dz R`` to its own slot
    ``DS[i, j]`` (a fixed order over tiles, summed in a fixed order afterwards). That sum is of
    dz itself, not of the stored ``dz * out_scale``: dividing it by ``out_scale`` afterwards
    gave NaN at a zero scale and lost the sum at subnormal ones.
    In place: a block is read whole before it is written; when dz is narrower than R (fp16 over
    fp32) one program owns whole rows, so its writes land only on bytes it has already read.
    The upstream gradients may be strided (stride 0: autograd's expanded ones). ``EVEN``: no
    block is partial."""
    local_row0 = tl.program_id(0) * BLOCK_N
    local_rows = local_row0 + tl.arange(0, BLOCK_N)
    row_mask = local_rows < n_rows
    rows = r0 + local_rows
    scale2 = tl.load(Scale).to(tl.float32) * 1.4426950408889634
    out_scale = tl.load(OutScale)
    lse_r = tl.load(LseRow + rows, mask=row_mask, other=0.0) * 1.4426950408889634
    g_r = tl.load(GRow + rows * stride_grow, mask=row_mask, other=0.0)
    g_d = tl.load(GDiag + rows * stride_gdiag, mask=row_mask, other=0.0)
    ds = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    col_start = tl.program_id(1) * cols_per_program
    col_end = tl.minimum(col_start + cols_per_program, width)
    for j0 in tl.range(col_start, col_end, BLOCK_C, num_stages=STAGES):
        local = j0 + tl.arange(0, BLOCK_C)
        col_mask = local < width
        cols = c0 + local
        valid = row_mask[:, None] & col_mask[None, :]
        offsets = local_rows[:, None].to(tl.int64) * stride_r + local[None, :]
        if EVEN:
            r = tl.load(R + offsets).to(tl.float32)
        else:
            r = tl.load(R + offsets, mask=valid, other=0.0).to(tl.float32)
        z2 = r * scale2
        lse_c = tl.load(LseCol + cols, mask=col_mask, other=0.0) * 1.4426950408889634
        g_c = tl.load(GCol + cols * stride_gcol, mask=col_mask, other=0.0)
        dz = g_r[:, None] * tl.exp2(z2 - lse_r[:, None]) + g_c[None, :] * tl.exp2(z2 - lse_c[None, :])
        if (r0 + local_row0 < c0 + j0 + BLOCK_C) & (c0 + j0 < r0 + local_row0 + BLOCK_N):  # meets i == j
            dz += tl.where(rows[:, None] == cols[None, :], g_d[:, None], 0.0)
        ds += dz * r  # masked entries have r = 0
        dz = dz * out_scale
        tl.debug_barrier()  # every thread has read the block before any thread overwrites it
        out = G + local_rows[:, None].to(tl.int64) * stride_g + local[None, :]
        if EVEN:
            tl.store(out, dz.to(G.dtype.element_ty))
        else:
            tl.store(out, dz.to(G.dtype.element_ty), mask=valid)
    slot = DS + tl.program_id(0) * stride_ds + tl.program_id(1)
    tl.store(slot, tl.load(slot) + tl.sum(tl.sum(ds, axis=1), axis=0))


#: Tiles of ``clip_chunk_grad_kernel`` on CUDA.
GRAD_BLOCKS = dict(BLOCK_N=8, BLOCK_C=128, STAGES=2, num_warps=2)


def _grad_blocks(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_N=8, BLOCK_C=16, STAGES=1)
    return dict(GRAD_BLOCKS)


#: Columns per program of the grad kernel when dz has R's dtype (programs may split rows).
GRAD_COLS_PER_PROGRAM = 1024
#: Rows per tile of the backward. A tile narrower than B trades the fp32 dX accumulator's
#: traffic (re-read and re-written once per column chunk: 8 B D bytes x B / width) for a small
#: fp32 dY accumulator per chunk; at equal tile memory, 16384 rows halve that traffic at
#: B = 32768 and keep the GEMMs' row dimension large enough to fill the H100.
TILE_ROWS = 16384


def clip_chunked_backward(x, y, scale, lse_row, lse_col, g_row, g_col, g_diag):
    """Gradients of ``g_row . lse_row + g_col . lse_col + g_diag . diag``. ``x``, ``y`` (B, D),
    ``scale`` 1-element fp32, the rest (B,) fp32. Returns ``(dx, dy, dscale)``: ``dx``, ``dy`` in
    the input dtype (fp32 accumulation), ``dscale`` a 1-element fp32 tensor.

    Tiles of ``TILE_ROWS`` x ``width`` logits: for each column chunk, every tile adds its
    ``dz.T @ X[rows]`` to the chunk's fp32 dY accumulator and its ``dz @ Y[chunk]`` to the fp32
    dX accumulator's rows, both inside the GEMM."""
    B, D = x.shape
    if x.dtype == torch.float16:
        # fp16 tiles hold dz / unit, every |dz| / unit at most 3 (``unit`` the largest upstream
        # magnitude): neither underflow nor overflow; the GEMM results are multiplied back
        unit = torch.stack([g_row.abs().max(), g_col.abs().max(), g_diag.abs().max()]).max().clamp_min(1e-30)
        out_scale, post = 1 / unit, unit * scale.reshape(())
    else:  # bf16 / fp32 tiles hold dz * scale itself: the GEMMs give dY and dX directly
        out_scale, post = scale.reshape(()), None
    tile_rows = min(B, TILE_ROWS)
    cc = chunk_cols(tile_rows, D, x.dtype, CHUNK_BYTES)
    buf = torch.empty((tile_rows, cc), device=x.device, dtype=_chunk_dtype(x.dtype))
    in_place = buf.dtype == x.dtype
    blocks = _grad_blocks(x.device)
    block_n, block_c = blocks["BLOCK_N"], blocks["BLOCK_C"]
    max_split = triton.cdiv(cc, GRAD_COLS_PER_PROGRAM) if in_place else 1
    ds_part = torch.zeros((triton.cdiv(tile_rows, block_n), max_split), device=x.device)
    dy = torch.empty_like(y)
    dy_acc = torch.empty((cc, D), device=x.device)
    dx_acc = torch.empty((B, D), device=x.device)
    for c0, c1 in _chunk_ranges(B, cc):
        width = c1 - c0
        for r0 in range(0, B, tile_rows):
            n_rows = min(tile_rows, B - r0)
            raw = buf[:n_rows, :width]
            _raw_products(x[r0 : r0 + n_rows], y[c0:c1], raw)
            # fp16 dz over fp32 R: the same byte pitch holds twice the elements
            dz = raw if in_place else buf.view(x.dtype).as_strided((n_rows, width), (2 * cc, 1))
            split = triton.cdiv(width, GRAD_COLS_PER_PROGRAM) if in_place else 1
            cols_per_program = triton.cdiv(triton.cdiv(width, split), block_c) * block_c
            clip_chunk_grad_kernel[(triton.cdiv(n_rows, block_n), split)](
                raw, raw.stride(0), dz, dz.stride(0), scale, lse_row, lse_col, g_row, g_col, g_diag, out_scale,
                ds_part, ds_part.stride(0), g_row.stride(0), g_col.stride(0), g_diag.stride(0),
                n_rows, r0, width, c0, cols_per_program,
                EVEN=n_rows % block_n == 0 and width % block_c == 0, **blocks,
            )  # fmt: skip
            _accumulate(dy_acc[:width], dz.T, x[r0 : r0 + n_rows], first_chunk=r0 == 0)
            # the first chunk sets the accumulator: no zero-fill pass over it
            _accumulate(dx_acc[r0 : r0 + n_rows], dz, y[c0:c1], first_chunk=c0 == 0)
        # one rounding to y's dtype, after the fp16 factor
        _finish(dy_acc[:width], post, dy[c0:c1])
    del buf, raw, dz, dy_acc  # before dX exists: the peak stays at dY + fp32 dX + one tile
    if x.dtype == torch.float32:
        dx = dx_acc
    else:
        dx = torch.empty_like(x)
        _finish(dx_acc, post, dx)
    return dx, dy, ds_part.sum().reshape(1)


def _finish(acc: torch.Tensor, post, out: torch.Tensor) -> None:
    """``out = acc * post`` (``acc`` itself where ``post`` is None), rounded once to out's dtype."""
    if post is None:
        out.copy_(acc)
    else:
        torch.mul(acc, post, out=out)
