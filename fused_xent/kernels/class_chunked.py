"""Class-chunked strategy: cuBLAS GEMMs per chunk of classes, Triton kernels between them.

For a chunk of classes ``[c0, c0 + Cc)`` the raw products ``R = X @ W[c0:c0+Cc].T`` (N x Cc)
come from one cuBLAS GEMM with fp32 accumulation, stored in fp32 — or in bf16 for bf16
input, the rounding torch's own bf16 ``F.linear`` applies (fp16 keeps fp32: its range is
too small for logits). Then

- forward: ``chunk_stats_kernel`` turns R into ``z`` (scale, bias, softcap) and folds it
  into running per-row ``(m, s, lin)``; each program owns whole rows, so no atomics;
- backward: ``chunk_grad_kernel`` forms ``dU = (cp * exp(z - lse) - tt) * softcap'`` and
  writes it as bf16/fp16 *into R's own memory* (row pitch unchanged, each program owns
  whole rows and writes only columns it has read), then cuBLAS gives
  ``dW[c0:c0+Cc] = scale * dU.T @ X`` complete (no fp32 C x D buffer) and
  ``dX_raw += dU @ W[c0:c0+Cc]`` in fp32; ``db`` from per-program partial sums.

Four GEMMs in all (forward, recompute, dW, dX); memory beyond the gradients is one fp32
chunk of N x Cc plus fp32 dX_raw. At small K (bf16, ``FUSED_DU_MAX_D``) the recompute and the
grad kernel are one Triton pass, ``chunk_grad_tma_kernel``: the same dU, without writing the
products to memory and reading them back. No atomics in the exact passes: every sum has a fixed
order, so the results are bitwise reproducible.

The filtered mode (``impl="filtered"``) skips classes whose gradient stays below the dtype's
resolution on every row. Its forward (``class_chunked_forward_bounded``) also bounds each
class's probability over all rows (the column programs of ``chunk_stats_kernel``:
``max_i z_ij - lse_i`` against the lse of the chunks before, corrected by the rows' smallest
lse gain since), so its backward
(``_backward_bounded``) recomputes and differentiates only the classes the bound keeps,
gathered into dense cuBLAS GEMMs. With a bias gradient (db must see every class) the
backward recomputes every chunk and the grad kernel flags the classes with a significant
gradient on some row; the dW and dX GEMMs then run over the flagged columns. The atomics
(column maxima, flags) are order-free maxima: the results stay bitwise reproducible.
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fused_xent.kernels import config
from fused_xent.kernels.config import target_programs
from fused_xent.kernels.launch import fast_jit
from fused_xent.kernels.linear_xent_forward import tma_loads
from fused_xent.kernels.tiles import (
    fold_row_stats,
    grouped_tile,
    label_target_tile,
    logit_epilogue,
    logit_value,
    raw_tile_tma,
    target_args,
    target_tile,
)

#: Launch configurations of the forward's kernels on a GPU (benchmarks/tune_bound.py).
#: The column-max programs share the stats programs' launch, so their warps too.
STATS_TILE = dict(BLOCK_N=16, BLOCK_C=256, num_warps=8)
COL_MAX_TILE = dict(BLOCK_N=64, BLOCK_C=128, rows_per_program=None)

#: Bytes of the logit chunk; the user can set it (``set_chunk_bytes``).
CHUNK_BYTES = 64 * 2**20
#: Fewest classes per training chunk: dX += dU @ W[chunk] re-reads fp32 dX (8 N D bytes) per
#: 2 N Cc D flops, so below ~1000 classes the H100 waits on memory (N = 32768 measured).
MIN_CHUNK_COLS = 4096


#: The multiple of the widths of the wider chunks (lean's and filtered's training forwards, lean's
#: backward in dW's rows): a chunk's rows lie its width apart. On the H100 at 1M classes, wider chunks at
#: multiples of 8 (rows 16-byte aligned) took the stats kernel 4.6 -> 8.2-8.4 ms per step and the
#: one-pass recompute 12.5 -> 14.2-25.6 (the wider, the slower); at multiples of 128 (256-byte
#: aligned) 4.0 and 12.6 (``benchmarks/probe_chunk_plan.py``, session 13).
CHUNK_ALIGN = 128


def set_chunk_bytes(nbytes: int) -> None:
    """Set the memory the class-chunked strategy may hold for one chunk of logits."""
    global CHUNK_BYTES
    if nbytes < 2**20:
        raise ValueError(f"chunk memory must be at least 1 MiB, got {nbytes} bytes")
    CHUNK_BYTES = int(nbytes)


@triton.jit
def _col_scaled(r, ColScale, cols, col_mask, HAS_COL_SCALE: tl.constexpr):
    """``r * ColScale[cols]`` (per class, fp32) with ``HAS_COL_SCALE``, else ``r``."""
    if HAS_COL_SCALE:
        r = r * tl.load(ColScale + cols, mask=col_mask, other=0.0)[None, :]
    return r


@triton.jit
def _label_term(R, stride_rn, rows, row_mask, Y, K, c0, Cc, Bias, scale, ColScale, softcap, HAS_BIAS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_COL_SCALE: tl.constexpr):  # fmt: skip
    """``k_i z_{i, y_i}`` for the rows whose label ``y_i`` lies in the chunk ``[c0, c0 + Cc)``
    (0 elsewhere, and where ``k_i`` is 0), the logit read from the chunk's raw products ``R``
    with the tiles' epilogue."""
    y = tl.load(Y + rows, mask=row_mask, other=0)
    k = tl.load(K + rows, mask=row_mask, other=0.0)
    local = y - c0
    inside = row_mask & (local >= 0) & (local < Cc)
    r = tl.load(R + rows * stride_rn + local, mask=inside, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        r = r * tl.load(ColScale + y, mask=inside, other=0.0)
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(Bias + y, mask=inside, other=0.0).to(tl.float32)
    z = logit_value(r, bias, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
    return tl.where(inside & (k != 0.0), k * z, 0.0)


@triton.jit
def _sparse_lin(z_acc, R, stride_rn, rows, row_mask, E, Y1, K1, Y2, K2, c0, Cc, Bias, scale, ColScale, softcap,
                HAS_SMOOTHING: tl.constexpr, HAS_HARD: tl.constexpr, HAS_Y2: tl.constexpr, HAS_BIAS: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_COL_SCALE: tl.constexpr):  # fmt: skip
    """A chunk's ``lin = e * sum_j z_j + k1 z_y1 + k2 z_y2`` per row without dense targets or
    class weights: ``z_acc`` (rows, cols) holds the chunk's z summed element by element (used
    with ``HAS_SMOOTHING``), the labels' logits are read from ``R``. A zero weight contributes
    nothing, even against an infinite logit."""
    lin = tl.zeros([z_acc.shape[0]], tl.float32)
    if HAS_SMOOTHING:
        e = tl.load(E + rows, mask=row_mask, other=0.0)
        lin += tl.where(e != 0.0, e * tl.sum(z_acc, axis=1), 0.0)
    if HAS_HARD:
        lin += _label_term(R, stride_rn, rows, row_mask, Y1, K1, c0, Cc, Bias, scale, ColScale, softcap, HAS_BIAS,
                           HAS_SOFTCAP, HAS_COL_SCALE)  # fmt: skip
        if HAS_Y2:
            lin += _label_term(R, stride_rn, rows, row_mask, Y2, K2, c0, Cc, Bias, scale, ColScale, softcap, HAS_BIAS,
                               HAS_SOFTCAP, HAS_COL_SCALE)  # fmt: skip
    return lin


@fast_jit
@triton.jit
def chunk_stats_kernel(
    R, stride_rn, Bias, Scale, ColScale, Y1, K1, Y2, K2, E, Dn, A, T, M, S, L, LB_next, LB, ColMax,
    N, Cc, c0, stride_tn, stride_tc, softcap, n_row_blocks, n_col_blocks, rows_per_program,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_HARD: tl.constexpr,
    HAS_Y2: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_LIN: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, STORE_LSE: tl.constexpr, COL_MAX: tl.constexpr, FIRST: tl.constexpr,
    LAST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, COL_BLOCK_N: tl.constexpr,
    COL_BLOCK_C: tl.constexpr,
):  # fmt: skip
    """The forward's one launch per chunk. Its first ``n_row_blocks`` programs fold z of the
    chunk into the running row stats (m, s, lin), each owning BLOCK_N whole rows. A program
    reduces only the row max per tile and keeps its sums per element until its last tile
    (the sum and lin reductions per tile cost 7-10 %, ``tune_stats.log``). With
    ``STORE_LSE`` they also store each row's lse so far, ``LB_next = m + log(s)``, for the
    next chunk's bound. The first chunk's launch (``FIRST``) starts the stats instead of
    loading them, the last one's (``LAST``) leaves the lse in ``M``: no launches to fill them
    before, or to combine m and s after (host time on small heads).

    With ``COL_MAX`` the launch has ``n_col_blocks`` x (row groups) more programs: program
    (j, g) bounds column block j over rows ``[g * rows_per_program, ...)``,
    ``ColMax[c0 + j] = max(ColMax[c0 + j], max_i (z_ij - LB[i]))`` with ``LB`` the rows' lse
    over the chunks before this one (stored by the previous chunk's launch; NaN counts as
    +inf). It keeps an elementwise maximum over its row tiles and reduces across rows once at
    the end (the same reduction in every tile of the row programs made them ~5x slower); the
    programs of one column block meet in an order-free atomic maximum. Both kinds of program
    read the same chunk in one launch: one host launch per chunk instead of two.

    With ``HAS_COL_SCALE`` class j's raw products are multiplied by ``ColScale[j]`` before
    the scale (cosine logits: ``1 / |W_j|``, so W is never normalised in memory).

    Without dense targets or class weights the targets of a row are ``e`` on every class plus
    ``k1`` at y1 (and ``k2`` at y2), so ``lin = e * sum_j z_j + k1 z_y1 + k2 z_y2``: the tiles
    only sum z (with ``HAS_SMOOTHING``; nothing without), and each label's logit is read from
    the chunk once per row after the loop. A target tile per tile cost ~9 instructions per
    logit, and this loop is bound by instruction issue, not by memory (``benchmarks/NOTES.md``,
    session 10)."""
    SPARSE: tl.constexpr = NEED_LIN and not HAS_DENSE and not HAS_WEIGHT
    pid = tl.program_id(0)
    scale = tl.load(Scale).to(tl.float32)
    if pid < n_row_blocks:
        rows = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        if FIRST:
            m = tl.full([BLOCK_N], float("-inf"), tl.float32)
            s = tl.zeros([BLOCK_N], tl.float32)
            lin = tl.zeros([BLOCK_N], tl.float32)
        else:
            m = tl.load(M + rows, mask=row_mask, other=0.0)
            s = tl.load(S + rows, mask=row_mask, other=0.0)
            lin = tl.load(L + rows, mask=row_mask, other=0.0)
        s_acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        lin_acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for j0 in range(0, Cc, BLOCK_C):
            local = j0 + tl.arange(0, BLOCK_C)
            col_mask = local < Cc
            cols = c0 + local
            # masked columns read 0: their z is exactly 0 (bias, column scale and softcap keep 0)
            r = tl.load(R + rows[:, None] * stride_rn + local[None, :], mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0)  # fmt: skip
            r = _col_scaled(r, ColScale, cols, col_mask, HAS_COL_SCALE)
            z = logit_epilogue(r, cols, col_mask, Bias, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
            zm = tl.where(col_mask[None, :], z, float("-inf"))
            m_new = tl.maximum(m, tl.max(zm, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_ref)
            s = s * alpha
            s_acc = s_acc * alpha[:, None] + tl.exp(zm - m_ref[:, None])
            m = m_new
            if SPARSE:
                if HAS_SMOOTHING:
                    lin_acc += z
            elif NEED_LIN:
                tt = target_tile(Y1, K1, Y2, K2, E, Dn, A, T, rows, row_mask, cols, col_mask, stride_tn,
                                 stride_tc, HAS_HARD, HAS_Y2, HAS_DENSE, HAS_WEIGHT)  # fmt: skip
                lin_acc += tl.where(tt != 0.0, tt * z, 0.0)
        s += tl.sum(s_acc, axis=1)
        if SPARSE:
            lin += _sparse_lin(lin_acc, R, stride_rn, rows, row_mask, E, Y1, K1, Y2, K2, c0, Cc, Bias, scale,
                               ColScale, softcap, HAS_SMOOTHING, HAS_HARD, HAS_Y2, HAS_BIAS, HAS_SOFTCAP,
                               HAS_COL_SCALE)  # fmt: skip
        elif NEED_LIN:
            lin += tl.sum(lin_acc, axis=1)
        if LAST:
            tl.store(M + rows, m + tl.log(s), mask=row_mask)
        else:
            tl.store(M + rows, m, mask=row_mask)
            tl.store(S + rows, s, mask=row_mask)
        tl.store(L + rows, lin, mask=row_mask)
        if STORE_LSE:
            tl.store(LB_next + rows, m + tl.log(s), mask=row_mask)
    elif COL_MAX:
        q = pid - n_row_blocks
        local = (q % n_col_blocks) * COL_BLOCK_C + tl.arange(0, COL_BLOCK_C)
        col_mask = local < Cc
        cols = c0 + local
        acc = tl.full([COL_BLOCK_N, COL_BLOCK_C], float("-inf"), tl.float32)
        r_start = (q // n_col_blocks).to(tl.int64) * rows_per_program
        for r0 in range(r_start, tl.minimum(r_start + rows_per_program, N), COL_BLOCK_N):
            rows = r0 + tl.arange(0, COL_BLOCK_N)
            row_mask = rows < N
            mask = row_mask[:, None] & col_mask[None, :]
            r = tl.load(R + rows[:, None] * stride_rn + local[None, :], mask=mask, other=0.0)
            r = _col_scaled(r, ColScale, cols, col_mask, HAS_COL_SCALE)
            z = logit_epilogue(r, cols, col_mask, Bias, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
            v = z - tl.load(LB + rows, mask=row_mask, other=0.0)[:, None]
            acc = tl.maximum(acc, tl.where(mask, tl.where(v != v, float("inf"), v), float("-inf")))
        tl.atomic_max(ColMax + cols, tl.max(acc, axis=0), mask=col_mask, sem="relaxed")


@fast_jit
@triton.jit
def chunk_grad_kernel(
    R, stride_rn, DU, stride_un, Bias, Scale, ColScale, Y1, K1, Y2, K2, E, Dn, A, T, LSE, CP, DB, stride_db,
    Keep, Cols, ROWS, COEF, ZL, G, N, Cc, Cw, c0, cols_per_program, stride_tn, stride_tc, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_COL_SCALE: tl.constexpr, HAS_HARD: tl.constexpr,
    HAS_Y2: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_WEIGHT: tl.constexpr, COMPUTE_DB: tl.constexpr,
    FILTER: tl.constexpr, WITH_STATS: tl.constexpr, GATHERED: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr, ROW_BLOCKS: tl.constexpr = 1, HAS_SMOOTHING: tl.constexpr = True,
):  # fmt: skip
    """dU of one chunk, written over R. Program (i, j) covers the ``ROW_BLOCKS`` row blocks
    ``[i * ROW_BLOCKS, ...)`` of BLOCK_N rows and columns ``[j * cols_per_program, ...)``,
    column tile by column tile. With ``COMPUTE_DB`` it sums each column's dU over its rows
    element by element and reduces across rows once per column tile, storing the partial as
    ``DB[i, col]``. In place: a tile is read whole before it is written;
    when dU is narrower than R (fp16 over fp32) one program owns whole rows, so its writes
    land only on bytes it has already read.

    With ``FILTER``, ``Keep[j]`` (int32, chunk-local, zeroed by the caller) becomes 1 when
    some row has a significant ``|dU_ij| >= filter_eps * |cp_i|`` (NaN counts as significant).

    With ``WITH_STATS`` R holds every class of its rows (the fast strategy; one program per
    row block): a first pass gives each row's ``LSE`` and its loss ``ROWS`` (formulation's
    row_loss), then the upstream gradient ``G`` (one value: the mean's 1 / denominator or the
    sum's 1) on the rows row_loss keeps makes ``cp`` and weights the targets: the forward and
    the gradient of a reduced loss in one launch. The first pass takes ``lin`` as
    ``chunk_stats_kernel`` does (``_sparse_lin``), summing z only with ``HAS_SMOOTHING``
    (read by this pass alone).

    With ``GATHERED`` column ``j`` of R is class ``Cols[j]`` (int64) instead of ``c0 + j``.

    With ``HAS_COL_SCALE`` (see ``chunk_stats_kernel``; no WITH_STATS, GATHERED, FILTER or db)
    the stored dU is ``dU_ij * ColScale[j]``: the GEMMs after it then take W as it is in memory.

    Columns ``[Cc, Cw)`` are written as 0 (dU and the bias partials): classes of the chunk that
    the next chunk owns (``_owned_ranges``), so that the GEMMs over the whole chunk add nothing
    for them."""
    first_row = tl.program_id(0).to(tl.int64) * (ROW_BLOCKS * BLOCK_N)
    rows = first_row + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    scale = tl.load(Scale).to(tl.float32)
    if WITH_STATS:
        tl.static_assert(ROW_BLOCKS == 1)
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_N], tl.float32)
        lin = tl.zeros([BLOCK_N], tl.float32)
        # the first pass's lin as chunk_stats_kernel's: e * sum_j z_j plus the labels' logits
        SPARSE: tl.constexpr = not HAS_DENSE and not HAS_WEIGHT
        z_acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)  # the z sum's per-element terms (smoothing only)
        for j0 in range(0, Cc, BLOCK_C):
            cols = j0 + tl.arange(0, BLOCK_C)
            col_mask = cols < Cc
            r = tl.load(R + rows[:, None] * stride_rn + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                        other=0.0)  # fmt: skip
            z = logit_epilogue(r, cols, col_mask, Bias, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
            if SPARSE:
                m, s, lin = fold_row_stats(m, s, lin, z, z, col_mask, False)
                if HAS_SMOOTHING:
                    z_acc += z  # masked columns read 0: their z is 0
            else:
                tt = target_tile(Y1, K1, Y2, K2, E, Dn, A, T, rows, row_mask, cols, col_mask, stride_tn, stride_tc,
                                 HAS_HARD, HAS_Y2, HAS_DENSE, HAS_WEIGHT)  # fmt: skip
                m, s, lin = fold_row_stats(m, s, lin, z, tt, col_mask, True)
        if SPARSE:
            lin += _sparse_lin(z_acc, R, stride_rn, rows, row_mask, E, Y1, K1, Y2, K2, c0, Cc, Bias, scale, ColScale,
                               softcap, HAS_SMOOTHING, HAS_HARD, HAS_Y2, HAS_BIAS, HAS_SOFTCAP, False)  # fmt: skip
        lse = m + tl.log(s)
        coef = tl.load(COEF + rows, mask=row_mask, other=0.0)
        zl = tl.load(ZL + rows, mask=row_mask, other=0.0)
        kept = (coef != 0.0) | (zl != 0.0)  # NaN coefficients (bad labels) stay, as in row_loss
        tl.store(LSE + rows, lse, mask=row_mask)
        tl.store(ROWS + rows, tl.where(kept, coef * lse - lin + zl * lse * lse, 0.0), mask=row_mask)
        g = tl.where(kept, tl.load(G), 0.0)
        cp = g * (coef + 2.0 * zl * lse)
    col_start = tl.program_id(1) * cols_per_program
    for j0 in range(col_start, tl.minimum(col_start + cols_per_program, Cw), BLOCK_C):
        local = j0 + tl.arange(0, BLOCK_C)
        col_mask = local < Cc
        written = local < Cw
        if GATHERED:
            cols = tl.load(Cols + local, mask=col_mask, other=0)
        else:
            cols = c0 + local
        db_acc = tl.zeros([BLOCK_N, BLOCK_C], tl.float32)
        for block in tl.static_range(ROW_BLOCKS):
            rows = first_row + block * BLOCK_N + tl.arange(0, BLOCK_N)
            row_mask = rows < N
            if not WITH_STATS:
                lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
                cp = tl.load(CP + rows, mask=row_mask, other=0.0)
            mask = row_mask[:, None] & col_mask[None, :]
            r = tl.load(R + rows[:, None] * stride_rn + local[None, :], mask=mask, other=0.0)
            r = _col_scaled(r, ColScale, cols, col_mask, HAS_COL_SCALE)
            z = logit_epilogue(r, cols, col_mask, Bias, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
            tt = target_tile(Y1, K1, Y2, K2, E, Dn, A, T, rows, row_mask, cols, col_mask, stride_tn, stride_tc,
                             HAS_HARD, HAS_Y2, HAS_DENSE, HAS_WEIGHT)  # fmt: skip
            if WITH_STATS:
                tt = tt * g[:, None]
            du = cp[:, None] * tl.exp(z - lse[:, None]) - tt
            if HAS_SOFTCAP:
                zc = z / softcap
                du = du * (1.0 - zc * zc)
            du = tl.where(mask, du, 0.0)
            if COMPUTE_DB:
                db_acc += du
            if FILTER:  # flags only rise 0 -> 1: max is order-free, so they are deterministic
                big = (tl.abs(du) >= filter_eps * tl.abs(cp)[:, None]) | (du != du)
                # one atomic per significant entry of a column not yet flagged (a stale read of
                # the flags only costs redundant atomics); no reduction across rows
                seen = tl.load(Keep + local, mask=col_mask, other=1)
                flags = tl.broadcast_to(Keep + local[None, :], (BLOCK_N, BLOCK_C))
                ones = tl.full((BLOCK_N, BLOCK_C), 1, tl.int32)
                tl.atomic_max(flags, ones, mask=big & (du != 0.0) & (seen == 0)[None, :], sem="relaxed")
            du = _col_scaled(du, ColScale, cols, col_mask, HAS_COL_SCALE)
            tl.debug_barrier()  # every thread has read the tile before any thread overwrites it
            tl.store(DU + rows[:, None] * stride_un + local[None, :], du.to(DU.dtype.element_ty),
                     mask=row_mask[:, None] & written[None, :])  # fmt: skip
        if COMPUTE_DB:  # one partial row per program, summed in a fixed order afterwards
            tl.store(DB + tl.program_id(0) * stride_db + local, tl.sum(db_acc, axis=0), mask=written)


#: Up to this many features lean's backward recomputes a bf16 chunk's products and writes its dU
#: in one Triton pass (``chunk_grad_tma_kernel``) instead of a cuBLAS GEMM and then
#: ``chunk_grad_kernel``: at small K the GEMM is held back by writing the products, which the
#: grad kernel then reads and overwrites. H100 (``benchmarks/NVIDIA-H100-80GB-HBM3/probe_fused_du.log``):
#: 1M classes, K = 512, 12.05 against 13.32 ms per pass; ViT-21k, K = 768, a tie. In lean's step
#: at 1M (``ab_onepass2.log``): 12.6 ms of kernel against 13.1, fw+bw 38.0-38.2 -> 37.5 ms.
FUSED_DU_MAX_D = 512
#: Its launch configuration on a GPU (the probe's best of 16); the interpreter takes smaller tiles.
FUSED_DU_TILE = dict(BLOCK_N=128, BLOCK_C=256, BLOCK_D=64, GROUP_M=16, num_warps=8, num_stages=3)


@triton.jit
def _bf16_rounded(raw, INTERPRETED: tl.constexpr):
    """fp32 ``raw`` rounded to the nearest bf16 (ties to even), back in fp32: the rounding of the
    cuBLAS chunk. The interpreter's own conversion is off by an ulp in about half of the values
    (measured against torch), so there the bits are rounded by hand (finite values and infinities
    exactly; a NaN stays a NaN unless its bits are all ones)."""
    if INTERPRETED:
        bits = raw.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return raw.to(tl.bfloat16).to(tl.float32)


@triton.jit
def chunk_grad_tma_kernel(
    x_desc, w_desc, DU, stride_un, Bias, Scale, ColScale, Y1, K1, Y2, K2, E, Dn, A, T, LSE, CP, N, width, c0, D,
    stride_tn, stride_tc, softcap, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_COL_SCALE: tl.constexpr,
    HAS_HARD: tl.constexpr, HAS_Y2: tl.constexpr, HAS_DENSE: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, UNIT_SCALE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``chunk_grad_kernel``'s dU (no db, no filter, classes ``c0 + [0, width)`` contiguous) for one
    (BLOCK_N x BLOCK_C) tile, from products it computes itself: ``x_desc`` and ``w_desc`` read X
    and the chunk's rows of W (TMA; rows past the chunk read as zeros), and the products are
    rounded to DU's dtype first, as the cuBLAS GEMM's output in the chunk buffer is, so dU is
    that of the two-pass path up to the GEMMs' order of summation (on the H100 bitwise the same,
    ``probe_fused_du.log``). ``UPCAST``: under the interpreter (``_bf16_rounded``). GROUP_M row tiles are walked
    together, their W tile staying in L2. Each program writes its own tile: no atomics.

    Its epilogue runs between the tiles' MMAs, so every instruction per product shows: with
    ``UNIT_SCALE`` no scale multiply, and without dense targets or class weights the targets
    come from ``label_target_tile`` (the same bits as ``target_tile``). With ``target_tile`` itself this pass
    took 14.6 ms per step at 1M classes against the two passes' 13.2 (``ab_onepass.log``)."""
    r0, local_c0 = grouped_tile(tl.program_id(0), N, width, GROUP_M, BLOCK_N, BLOCK_C)
    rows = r0 + tl.arange(0, BLOCK_N)
    local = local_c0 + tl.arange(0, BLOCK_C)
    row_mask = rows < N
    col_mask = local < width
    cols = c0 + local
    raw = raw_tile_tma(x_desc, w_desc, r0, local_c0, D, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
    tl.static_assert(not HAS_COL_SCALE)  # the margins' column scale takes the two passes (_one_pass)
    r = _bf16_rounded(raw, UPCAST)
    scale = 1.0 if UNIT_SCALE else tl.load(Scale).to(tl.float32)
    z = logit_epilogue(r, cols, col_mask, Bias, scale, softcap, HAS_BIAS, HAS_SOFTCAP)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    cp = tl.load(CP + rows, mask=row_mask, other=0.0)
    if HAS_HARD and not HAS_DENSE and not HAS_WEIGHT:
        tt = label_target_tile(Y1, K1, Y2, K2, E, rows, row_mask, cols, HAS_Y2, HAS_SMOOTHING)
    else:
        tt = target_tile(Y1, K1, Y2, K2, E, Dn, A, T, rows, row_mask, cols, col_mask, stride_tn, stride_tc,
                         HAS_HARD, HAS_Y2, HAS_DENSE, HAS_WEIGHT)  # fmt: skip
    du = cp[:, None] * tl.exp(z - lse[:, None]) - tt
    if HAS_SOFTCAP:
        zc = z / softcap
        du = du * (1.0 - zc * zc)
    mask = row_mask[:, None] & col_mask[None, :]
    du = tl.where(mask, du, 0.0)
    out = DU + rows[:, None].to(tl.int64) * stride_un + local[None, :]
    tl.store(out, du.to(DU.dtype.element_ty), mask=mask)


def _fused_du(x, w_k, du, b, scale, lse, cp, kargs, c0, opts) -> None:
    """dU of classes ``[c0, c0 + len(w_k))`` into ``du`` (N, len(w_k)) by ``chunk_grad_tma_kernel``."""
    N, D = x.shape
    width = w_k.shape[0]
    tile = dict(FUSED_DU_TILE) if x.is_cuda else dict(BLOCK_N=16, BLOCK_C=32, BLOCK_D=16, GROUP_M=2)
    bn, bc, bd = tile["BLOCK_N"], tile["BLOCK_C"], tile["BLOCK_D"]
    x_desc = TensorDescriptor(x, [N, D], [x.stride(0), 1], [bn, bd])
    w_desc = TensorDescriptor(w_k, [width, D], [w_k.stride(0), 1], [bc, bd])
    pointers, t_strides, flags = kargs
    chunk_grad_tma_kernel[(triton.cdiv(N, bn) * triton.cdiv(width, bc),)](
        x_desc, w_desc, du, du.stride(0), b if b is not None else x, scale, *pointers, lse, cp, N, width, c0, D,
        *t_strides, opts.softcap or 1.0, **flags, HAS_SMOOTHING=opts.label_smoothing != 0,
        UNIT_SCALE=opts.unit_scale, **config.dot_options(x.dtype), **tile,
    )  # fmt: skip


def _mm_fp32(a, b, out=None):
    """``a @ b`` accumulated and returned in fp32 (cuBLAS with an fp32 output for bf16/fp16)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if not a.is_cuda:  # CPU (tests under the Triton interpreter): upcast instead
        return torch.mm(a.float(), b.float(), out=out)
    return torch.mm(a, b, out_dtype=torch.float32, out=out)


def _addmm_fp32(acc, a, b):
    """``acc += a @ b`` with ``acc`` fp32: inside the GEMM (beta = 1) where cuBLAS can."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first_chunk: bool) -> None:
    """``acc = a @ b`` on the first chunk, ``acc += a @ b`` after, accumulated in fp32."""
    if acc.numel() == 0:
        return
    if first_chunk:
        _mm_fp32(a, b, out=acc)
    else:
        _addmm_fp32(acc, a, b)


def _chunk_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _chunk(x: torch.Tensor, C: int, nbytes: int | None = None, balanced: bool = False):
    """The logit-chunk buffer (N, Cc) within ``nbytes`` (default ``CHUNK_BYTES``), Cc a
    multiple of 128 (or C); ``balanced``: Cc from ``_balanced_cols``."""
    cols = _balanced_cols(x, C, nbytes) if balanced else _chunk_cols(x, C, nbytes)
    return torch.empty((x.shape[0], cols), device=x.device, dtype=_chunk_dtype(x.dtype))


def _balanced_cols(x: torch.Tensor, C: int, nbytes: int | None) -> int:
    """``_chunk_cols``'s width made as equal over the fewest chunks of C classes as multiples
    of ``CHUNK_ALIGN`` allow, so that the last chunk is not a sliver."""
    cols = _chunk_cols(x, C, nbytes)
    return _equal_width(C - C % 8, cols, CHUNK_ALIGN) if cols < C else cols


def _equal_width(total: int, most: int, align: int) -> int:
    """The width of the fewest chunks of at most ``most`` over ``total`` (classes, a multiple of
    8, or the fast strategy's rows), as equal as multiples of ``align`` allow (``most`` itself a
    multiple of it)."""
    return min(most, triton.cdiv(triton.cdiv(total, triton.cdiv(total, most)), align) * align)


def forward_chunk_bytes(chunk_bytes: int | None, spare_bytes: int) -> int | None:
    """A training forward's chunk: the buffer's bytes (``chunk_bytes``, default
    ``CHUNK_BYTES``) plus ``spare_bytes``, those of the gradients its backward allocates later
    (``functional._spare_bytes``); None (the buffer's) without any."""
    return (chunk_bytes or CHUNK_BYTES) + spare_bytes if spare_bytes else None


def _chunk_cols(x: torch.Tensor, C: int, nbytes: int | None = None) -> int:
    """The width of ``_chunk``'s buffer."""
    cols = max(128, ((nbytes or CHUNK_BYTES) // (_chunk_dtype(x.dtype).itemsize * max(x.shape[0], 1))) // 128 * 128)
    if nbytes is None:  # narrower chunks make the fp32 dX read-modify-write cost as much as the GEMM
        cols = max(cols, MIN_CHUNK_COLS)
    return min(C, cols)


#: What a memory budget leaves unused beside the chunk and the fp32 dX: the O(N + C)
#: statistics, bounds and partial sums, and the allocator's rounding.
BUDGET_SLACK_BYTES = 8 * 2**20
#: The smallest chunk a memory budget gives.
MIN_BUDGET_CHUNK_BYTES = 2**20


def budget_chunk_bytes(budget: int, N: int, D: int, dtype: torch.dtype, unit_scale: bool, bias_grad: bool) -> int:
    """The chunk that keeps the lean and filtered backwards within ``budget`` bytes beyond the
    gradients, at least ``MIN_BUDGET_CHUNK_BYTES``.

    While the chunks run, their workspace beside dW is the fp32 dX accumulator (dX itself comes
    after the last chunk, so its bytes count towards the budget), ``BUDGET_SLACK_BYTES`` and, per
    class of the chunk: its N logits, its fp32 row of dW before the scale unless the scale is 1
    (``_dense_chunk_grads``), and its fp32 bias partials (``_db_part_rows``) when the
    bias needs a gradient."""
    logit_bytes = N * _chunk_dtype(dtype).itemsize
    per_class = logit_bytes + (0 if unit_scale else 4 * D) + (4 * _db_part_rows(N) if bias_grad else 0)
    classes = (budget + N * D * dtype.itemsize - 4 * N * D - BUDGET_SLACK_BYTES) // per_class
    return max(MIN_BUDGET_CHUNK_BYTES, classes * logit_bytes)


def _chunk_ranges(C: int, cc: int) -> list[tuple[int, int]]:
    """Class ranges of at most ``cc``; widths stay multiples of 8 except a last tail of
    fewer than 8 classes (cuBLAS falls back to slow kernels for odd bf16 widths)."""
    aligned = C - C % 8
    ranges = [(c0, min(c0 + cc, aligned)) for c0 in range(0, aligned, cc)]
    return ranges + ([(aligned, C)] if aligned < C else [])


def _owned_ranges(ranges: list[tuple[int, int]], cc: int) -> list[tuple[int, int, int]]:
    """``ranges`` (``_chunk_ranges``' or ``_dw_ranges``') as ``(c0, c1, own)``, the chunk's
    classes ``[c0, c1)`` of which the first ``own`` are its own, without a tail chunk where
    one can go: the last aligned chunk and the tail of fewer than 8 classes become one chunk
    that ends at C, 8 classes wider than the aligned one (if that fits in ``cc``, the buffer),
    so it starts up to 7 classes inside the chunk before, which leaves those to it.

    The tail chunk cost five small launches in the backward and two in the forward (a gemv,
    the kernel, the bias sum, two GEMMs of one column); an odd-width chunk instead would take
    cuBLAS's slow kernels (``benchmarks/NOTES.md``, session 15). A class is counted once: the
    chunk before skips it in its stats and writes it a zero dU (``chunk_grad_kernel``'s
    ``Cw``), so its dW row and bias entry are zero until the owning chunk, which runs after
    it, writes them."""
    owned = [(c0, c1, c1 - c0) for c0, c1 in ranges]
    if len(ranges) < 3 or ranges[-1][1] - ranges[-1][0] >= 8:
        return owned
    (p0, _, _), (a0, _, _), (_, C, _) = owned[-3:]
    width = C - a0 + 8 - (C - a0) % 8
    if width > cc or C - width < p0:
        return owned
    start = C - width
    return owned[:-3] + [(p0, a0, start - p0), (start, C, width)]


def _raw_products(x, w_chunk, out):
    """``out = x @ w_chunk.T``, accumulated in fp32 and stored in ``out``'s dtype."""
    if out.dtype == x.dtype:
        torch.mm(x, w_chunk.T, out=out)
    else:
        _mm_fp32(x, w_chunk.T, out=out)


def _kernel_args(b, rt, opts, col_scale=None):
    """The kernels' arguments after ``Scale``: ``ColScale`` and the target pointers, the
    targets' strides, and the constexpr flags."""
    pointers, t_strides, flags = target_args(rt)
    flags.update(HAS_BIAS=b is not None, HAS_SOFTCAP=opts.softcap is not None, HAS_COL_SCALE=col_scale is not None)
    return (col_scale if col_scale is not None else rt.e, *pointers), t_strides, flags


def class_chunked_forward(x, w, b, scale, rt, opts, need_lin: bool = True, chunk_bytes: int | None = None,
                          w_norm: torch.Tensor | None = None):  # fmt: skip
    """``(lse, lin)`` per row, fp32; the Backend forward of the class-chunked strategy.

    With ``w_norm`` (C,) fp32 the logits are those of W's rows divided by ``w_norm`` (cosine
    logits when it holds their norms), without a divided copy of W."""
    col_scale = None if w_norm is None else w_norm.reciprocal()
    lse, lin, _ = _forward(x, w, b, scale, rt, opts, need_lin, chunk_bytes, bound=False, col_scale=col_scale)
    return lse, lin


def class_chunked_forward_bounded(x, w, b, scale, rt, opts, chunk_bytes: int | None = None):
    """The filtered backend's forward: ``(lse, lin, log_p_max)``, the last an upper bound
    per class on ``log p_ij`` over every row, from which the filtered backward skips
    classes without recomputing their logits (empty for dense targets: no bound is needed
    to skip them, the backward flags classes as it recomputes them).

    Chunk ``k``'s classes get ``max_i (z_ij - lse_k,i) - min_i (lse_i - lse_k,i)`` with
    ``lse_k,i`` row i's lse over the chunks before k: since ``lse_i >= lse_k,i`` the bound
    holds for every row. The first chunk has nothing before it: ``+inf``, always kept. The
    first chunk is ``opts.chunk_bytes``' (the backward's buffer); ``chunk_bytes`` (the training
    forward's, with the gradients' bytes: ``functional._spare_bytes``) sizes the later ones."""
    lse, lin, bound = _forward(x, w, b, scale, rt, opts, True, chunk_bytes, bound=rt.dense is None)
    return lse, lin, bound if bound is not None else torch.empty(0, device=x.device)


def _forward(x, w, b, scale, rt, opts, need_lin, chunk_bytes, bound, col_scale=None):
    N, C = x.shape[0], w.shape[0]
    if N == 0 or C == 0:  # no chunk: the lse of no class is -inf
        return torch.full((N,), float("-inf"), device=x.device), torch.zeros(N, device=x.device), None
    lse, s, lin = (torch.empty(N, device=x.device) for _ in range(3))  # the first chunk starts them
    if bound:  # the first chunk, kept whole (nothing before it bounds it), is the buffer's; the rest may be wider
        first = _chunk_cols(x, C, opts.chunk_bytes)
        f = _chunk_ranges(C, first)[0][1]
        wide = max(first, _balanced_cols(x, C - f, chunk_bytes)) if chunk_bytes and C - f > first else first
        ranges = [(0, f)] + [(f + c0, f + c1) for c0, c1 in _chunk_ranges(C - f, wide)]
        buf = torch.empty((N, wide), device=x.device, dtype=_chunk_dtype(x.dtype))
    else:
        buf = _chunk(x, C, chunk_bytes or opts.chunk_bytes, balanced=True)
        ranges = _chunk_ranges(C, buf.shape[1])
    pointers, t_strides, flags = _kernel_args(b, rt, opts, col_scale)
    stats_tile = dict(STATS_TILE)
    n_row_blocks = triton.cdiv(N, stats_tile["BLOCK_N"])
    col_tile = dict(COL_MAX_TILE)
    rows_per_program = col_tile.pop("rows_per_program")
    tile_n, tile_c = col_tile["BLOCK_N"], col_tile["BLOCK_C"]
    owned = _owned_ranges(ranges, buf.shape[1])
    if bound:
        col_max = torch.full((C,), float("-inf"), device=x.device)
        col_max[: ranges[0][1]] = float("inf")
        lse_before = torch.empty((len(owned), N), device=x.device)
    for k, (c0, c1, own) in enumerate(owned):
        raw = buf[:, : c1 - c0]
        _raw_products(x, w[c0:c1], raw)
        col_max_now = bound and k > 0  # the first chunk's bound is +inf
        n_col_blocks = triton.cdiv(c1 - c0, tile_c)
        row_span = rows_per_program
        if col_max_now and row_span is None:  # a few waves of programs over the column blocks
            splits = max(1, min(triton.cdiv(N, tile_n), target_programs(x.device) // n_col_blocks))
            row_span = triton.cdiv(triton.cdiv(N, splits), tile_n) * tile_n
        grid = n_row_blocks + (n_col_blocks * triton.cdiv(N, row_span) if col_max_now else 0)
        chunk_stats_kernel[(grid,)](
            raw, raw.stride(0), b if b is not None else x, scale, *pointers, lse, s, lin,
            lse_before[k + 1] if bound and k + 1 < len(owned) else lse, lse_before[k] if col_max_now else lse,
            col_max if bound else lse, N, own, c0, *t_strides, opts.softcap or 1.0, n_row_blocks, n_col_blocks,
            row_span or 0, NEED_LIN=need_lin, HAS_SMOOTHING=opts.label_smoothing != 0,
            STORE_LSE=bound and k + 1 < len(owned), COL_MAX=col_max_now, FIRST=k == 0, LAST=k + 1 == len(owned),
            **flags, **stats_tile, COL_BLOCK_N=tile_n, COL_BLOCK_C=tile_c,
        )  # fmt: skip
    if not bound:
        return lse, lin, None
    lse_before[0] = lse  # the first chunk's bound stays +inf; a NaN row makes every bound NaN: kept
    gain = (lse - lse_before).amin(1)
    first, wide = ranges[0][1], buf.shape[1]  # chunk k > 0 starts at first + (k - 1) wide
    classes = torch.arange(C, device=x.device)
    chunk_of = torch.where(classes < first, 0, 1 + (classes - first) // wide)
    # the last chunk: a tail of fewer than 8 classes, or the chunk that took it (_owned_ranges)
    chunk_of[owned[-1][0] :] = len(owned) - 1
    return lse, lin, col_max - gain[chunk_of]


#: Chunk memory of a forward that needs no gradient (evaluation): small, the GEMMs stay large.
FORWARD_ONLY_CHUNK_BYTES = 15 * 2**20


def class_chunked_forward_only(x, w, b, scale, rt, opts, need_lin: bool = True):
    """The forward for calls without a backward: the same passes with a chunk of at most
    ``FORWARD_ONLY_CHUNK_BYTES``."""
    return class_chunked_forward(x, w, b, scale, rt, opts, need_lin, chunk_bytes=FORWARD_ONLY_CHUNK_BYTES)


def class_chunked_backward(x, w, b, scale, lse, cp, rt_g, opts, need_dx, need_dw, need_db,
                           w_norm: torch.Tensor | None = None):  # fmt: skip
    """The Backend backward of the class-chunked strategy: ``dx_raw`` fp32 without the
    scale, ``dw`` with the scale (in w's dtype: no fp32 C x D buffer), ``db`` fp32.

    With ``w_norm`` (as in ``class_chunked_forward``) ``dw`` is the gradient of W itself,
    through the division by ``w_norm`` taken as W's row norms: the chunks write
    ``sum_i dU_ij / n_j x_i`` into dW (rounded once, as without a scale), then one pass
    (``tangent_rows_kernel``, in place) scales each row and removes its radial part."""
    return _backward(x, w, b, scale, lse, cp, rt_g, opts, need_dx, need_dw, need_db, filter_eps=None, w_norm=w_norm)


#: The filtered backward's threshold, a fraction of the input dtype's eps (cut-cross-entropy's
#: "auto": bf16 2**-12, fp16 2**-15, fp32 2**-28). It bounds the *unscaled* gradient: with
#: ``cp_i = g_i * A_i`` and the kernel's ``tt`` scaled by ``g_i`` (``formulation.prob_coef``,
#: ``RowTargets.scaled``), ``dU_ij / cp_i = p_ij - t_ij`` with ``t = tt / A`` the row's target
#: distribution, so ``|dU_ij| >= eps * |cp_i|`` is exactly ``|p - t| >= eps`` for cross-entropy
#: with "mean" or "sum", class weights and smoothing included (z-loss or a gradient on the
#: returned lse add to ``cp``, softcap multiplies dU by its derivative: the rule stays
#: relative to ``cp``). Ignored rows (dU = cp = 0) keep nothing.
FILTER_EPS_FACTOR = 1 / 32
#: Above this fraction of kept classes a chunk takes the dense GEMMs: gathering dU and W
#: costs more than the GEMM work the skipped classes would save.
FILTER_DENSE_FRACTION = 0.5


def class_chunked_backward_filtered(x, w, b, scale, lse, cp, rt_g, opts, need_dx, need_dw, need_db, log_p_max=None):
    """The class-chunked backward, skipping classes whose logit gradient stays below the
    dtype's resolution on every row (``impl="filtered"``; opt-in, not exact).

    With the forward's bound ``log_p_max`` (see ``class_chunked_forward_bounded``) and no
    ``db`` to compute, the classes to keep are known before any logit is recomputed:
    ``_backward_bounded`` recomputes and differentiates those classes only. Otherwise:

    The grad kernel flags class j of a chunk when some row has
    ``|dU_ij| >= eps * |cp_i|``, ``eps = finfo(x.dtype).eps * FILTER_EPS_FACTOR``. Flagged
    classes get ``dW_j`` and their ``dU[:, j] @ W_j`` term from GEMMs over the gathered
    columns; the others get ``dW_j = 0`` and no dX term. A chunk with more than
    ``FILTER_DENSE_FRACTION`` of its classes flagged takes the dense GEMMs of
    ``class_chunked_backward``. ``db`` stays exact (every column).

    The GEMMs' widths need the number of flagged classes on the host: one sync per chunk,
    deferred by one chunk (two chunk buffers, so the GPU computes chunk i + 1 while the host
    waits for chunk i's count). Deterministic: the flags are an order-free maximum, the
    GEMMs and gathers have fixed orders.

    While a CUDA graph is being captured (``torch.compile(mode="reduce-overhead")``,
    ``torch.cuda.graph``) no count can reach the host: the backward is then the exact one,
    every class kept, and the graph replays that.
    """
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return _backward(x, w, b, scale, lse, cp, rt_g, opts, need_dx, need_dw, need_db, filter_eps=None)
    eps = torch.finfo(x.dtype).eps * FILTER_EPS_FACTOR
    if log_p_max is not None and log_p_max.numel() and not need_db and (need_dx or need_dw) and x.shape[0]:
        return _backward_bounded(x, w, b, scale, lse, cp, rt_g, opts, need_dx, need_dw, log_p_max, eps)
    return _backward(x, w, b, scale, lse, cp, rt_g, opts, need_dx, need_dw, need_db, filter_eps=eps)


#: ``kept_counts_kernel`` takes ``exp`` as Triton's (a few ulp off the exact value, the product
#: of the argument and log2(e) rounded first): a class is dropped only when its bound times
#: this factor stays below the threshold, so no approximation of ``exp`` drops one that the
#: exact comparison keeps.
_EXP_MARGIN = tl.constexpr(1.0 + 2.0**-16)


@fast_jit
@triton.jit
def kept_counts_kernel(LogPMax, Keep, TMax, Counts, cc, aligned, C, eps, HAS_T_MAX: tl.constexpr,
                       BLOCK: tl.constexpr):  # fmt: skip
    """Program k takes the classes of chunk k of the bounded backward's partition
    (``_chunk_ranges``: ``[k cc, min((k + 1) cc, aligned))``, the one past them the tail
    ``[aligned, C)``; the forward's chunks may be wider). ``Keep`` (bool) arrives
    with the labels set and leaves with every class kept whose bound does not rule it out
    (``_kept_classes``); ``Counts[k]`` receives the chunk's kept count. A program owns its chunk
    and sums in a fixed order: no atomics, deterministic."""
    k = tl.program_id(0)
    if k < tl.cdiv(aligned, cc):
        c0 = k * cc
        c1 = tl.minimum(c0 + cc, aligned)
    else:
        c0 = aligned
        c1 = C
    t_max = tl.load(TMax) if HAS_T_MAX else 0.0
    total = tl.zeros([BLOCK], tl.int32)
    for start in range(c0, c1, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < c1
        bound = tl.load(LogPMax + cols, mask=mask, other=float("-inf"))
        label = tl.load(Keep + cols, mask=mask, other=0) != 0
        small = tl.exp(bound) * _EXP_MARGIN + t_max < eps  # NaN: not small, kept
        kept = label | ~small
        tl.store(Keep + cols, kept, mask=mask)
        total += (kept & mask).to(tl.int32)
    tl.store(Counts + k, tl.sum(total))


def _kept_classes(log_p_max, cp, rt_g, eps, smoothing: bool, cc: int) -> tuple[torch.Tensor, list[int]]:
    """``(keep, counts)``: (C,) bool, the classes the bounded filter keeps, and their count in
    each chunk of the backward's partition (``_chunk_ranges(C, cc)``) on the host (one sync).

    ``|dU_ij| = |cp_i| |p_ij - t_ij|`` (the kernels' ``tt / cp`` is the target ``t``; see
    FILTER_EPS_FACTOR) stays below ``eps |cp_i|`` when ``p_ij + t_ij < eps``. Outside the
    labels ``t_ij = a_j e_i / cp_i`` (smoothing, class weight ``a``), at most ``t_max``; a
    row with ``cp_i = 0`` but a target keeps every class. The labels are always kept (also
    those of ignored rows: harmless). One launch (``kept_counts_kernel``) after the labels'
    flags: ~15 small torch launches and a pageable copy to the device (a sync of its own)
    before, each 30-200 us of this host while the GPU waited (``gpu_gaps_1m_filtered.log``)."""
    keep = torch.zeros(log_p_max.shape, dtype=torch.bool, device=log_p_max.device)
    for y in (rt_g.y1, rt_g.y2):
        if y is not None:
            keep.index_fill_(0, y, True)
    t_max = None
    if smoothing:
        a_max = rt_g.class_weight.abs().max() if rt_g.class_weight is not None else 1.0
        ratio = torch.where(rt_g.e == 0, 0.0, rt_g.e.abs() / cp.abs())  # e != 0 = cp: inf, all kept
        t_max = (ratio.max() * a_max).float().reshape(1)
    C = keep.shape[0]
    aligned = C - C % 8
    n_chunks = len(_chunk_ranges(C, cc))
    counts = torch.empty(n_chunks, dtype=torch.int32, device=keep.device)
    # the bound comes from the forward's rounded logits, as the recomputing filter's p from
    # the backward's: no margin beyond that rounding (and exp's, _EXP_MARGIN)
    kept_counts_kernel[(n_chunks,)](
        log_p_max, keep, t_max if t_max is not None else log_p_max, counts, cc, aligned, C, eps,
        HAS_T_MAX=t_max is not None, BLOCK=1024,
    )  # fmt: skip
    return keep, counts.tolist()


def _backward_bounded(x, w, b, scale, lse, cp, rt_g, opts, need_dx, need_dw, log_p_max, eps):
    """The filtered backward over the kept classes only: the recompute, dW and dX GEMMs all
    shrink to the kept fraction (no db: the caller falls back to ``_backward`` when the bias
    needs a gradient). It partitions the classes in chunks of the buffer's width (the
    forward's first chunk, kept whole, is the first of them; its later ones may be wider): a
    chunk with more than ``FILTER_DENSE_FRACTION`` of its classes kept runs whole; the kept
    classes of the others are gathered into dense chunks.
    One host sync: the kept count per chunk (the gathered classes' indices then come from
    ``nonzero_static`` at the known count; ``nonzero`` was a second sync). Every kept class gets
    the exact gradient."""
    N, D = x.shape
    C = w.shape[0]
    dw_scale = None if opts.unit_scale else scale
    cc = _chunk_cols(x, C, opts.chunk_bytes)
    ranges = _chunk_ranges(C, cc)
    keep, counts = _kept_classes(log_p_max, cp, rt_g, eps, opts.label_smoothing != 0, cc)
    whole, gathered = [], 0
    for (c0, c1), k in zip(ranges, counts, strict=True):
        if k > FILTER_DENSE_FRACTION * (c1 - c0):
            whole.append((c0, c1))
            keep[c0:c1] = False  # left: the kept classes to gather
        else:
            gathered += k
    if len(whole) == len(ranges):
        return _backward(x, w, b, scale, lse, cp, rt_g, opts, need_dx, need_dw, False, filter_eps=None)
    cols = torch.nonzero_static(keep, size=gathered).squeeze(1) if gathered else None  # no second sync
    dx = torch.zeros((N, D), device=x.device, dtype=torch.float32) if need_dx else None
    dw = torch.zeros_like(w) if need_dw else None
    # half: the gathered W rows and their dW come on top
    buf = _chunk(x, C, (opts.chunk_bytes or CHUNK_BYTES) // 2)
    kargs = _kernel_args(b, rt_g, opts)
    for k0, k1, idx in _bounded_pieces(whole, cols, buf.shape[1]):
        if idx is None:
            w_k = w[k0:k1]
            du = _recompute_du(x, w_k, buf, b, scale, lse, cp, kargs, opts, k0)
            _dense_chunk_grads(x, w_k, du, dw_scale, dx, dw[k0:k1] if need_dw else None)
        else:
            w_k = _gathered_rows(w, idx, buf.shape[1])
            du = _recompute_du(x, w_k, buf, b, scale, lse, cp, kargs, opts, k0, cols=idx)
            _gathered_chunk_grads(x, w_k, du, dw_scale, dx, dw, idx)
    return dx, dw, None


def _gathered_rows(w: torch.Tensor, idx: torch.Tensor, max_rows: int) -> torch.Tensor:
    """W's rows ``idx``, then zero rows up to a multiple of 8 (at most ``max_rows``): every GEMM
    of a gathered piece then has widths cuBLAS runs on its fast kernels. With k = len(idx)
    odd, the recompute and dX GEMMs fell to sm75 ``align1`` kernels: 1.23 and 0.97 ms for one
    piece at the Gemma 2 head, ~5x an aligned GEMM of that size (``gpu_gaps_lm.log``); padded,
    filtered's fw+bw took 1.5 ms less there, 1.3 at Llama 3 (``ab_filtered_padding.log``)."""
    k = idx.numel()
    rows = -(-k // 8) * 8
    if rows == k or rows > max_rows:
        return w.index_select(0, idx)
    out = w.new_empty((rows, w.shape[1]))
    torch.index_select(w, 0, idx, out=out[:k])
    out[k:].zero_()
    return out


def _backward(x, w, b, scale, lse, cp, rt_g, opts, need_dx, need_dw, need_db, filter_eps: float | None,
              w_norm=None):  # fmt: skip
    """Both backwards: exact when ``filter_eps`` is None, filtered at that threshold otherwise
    (not with ``w_norm``)."""
    N, D = x.shape
    C = w.shape[0]
    filtering = filter_eps is not None and (need_dx or need_dw)
    dw_scale = None if opts.unit_scale or w_norm is not None else scale  # w_norm: the tangent pass scales
    if N == 0 or C == 0:  # no chunk to write them
        dx = torch.zeros((N, D), device=x.device) if need_dx else None
        return dx, torch.zeros_like(w) if need_dw else None, torch.zeros(C, device=x.device) if need_db else None
    # every chunk writes its dW rows and db entries; dX: the first unfiltered chunk's GEMM writes it
    dx = (torch.zeros if filtering else torch.empty)((N, D), device=x.device, dtype=torch.float32) if need_dx else None
    dw = torch.empty_like(w) if need_dw else None
    db = torch.empty((C,), device=x.device, dtype=torch.float32) if need_db else None
    bufs = [_chunk(x, C, opts.chunk_bytes) for _ in range(2 if filtering else 1)]
    cc = bufs[0].shape[1]
    kargs = _kernel_args(b, rt_g, opts, None if w_norm is None else w_norm.reciprocal())
    db_part = torch.empty((_db_part_rows(N), cc), device=x.device) if need_db else None
    if filtering:  # per buffer: the count of flagged classes on the host, and its event
        keep = torch.empty(cc, device=x.device, dtype=torch.int32)
        counts = torch.empty(2, dtype=torch.int32, pin_memory=x.is_cuda)
        events = [torch.cuda.Event() if x.is_cuda else None for _ in range(2)]
    pending = None  # the filtered chunk whose GEMMs wait for its count of flagged classes
    in_dw = not filtering and dw is not None and dw_scale is None and db_part is None and dw.is_contiguous()
    if in_dw:
        ranges = _dw_ranges(C, cc, N * bufs[0].element_size(), D * w.element_size())
    else:
        ranges = _chunk_ranges(C, cc)
    # filtering flags nonzero dU only: the classes a chunk leaves to the next are never flagged there
    for i, (c0, c1, own) in enumerate(_owned_ranges(ranges, cc)):
        width = c1 - c0
        if filtering:
            keep.zero_()
        buf = bufs[i % len(bufs)] if width <= cc else _dw_tail(dw, c1, N, width, bufs[0].dtype)
        du = _recompute_du(x, w[c0:c1], buf, b, scale, lse, cp, kargs, opts, c0, db_part=db_part,
                           keep=keep if filtering else None, filter_eps=filter_eps, own=own)  # fmt: skip
        if need_db:
            torch.sum(db_part[:, : c1 - c0], 0, out=db[c0:c1])
        if not filtering:
            _dense_chunk_grads(x, w[c0:c1], du, dw_scale, dx, dw[c0:c1] if need_dw else None, first=i == 0)
            continue
        # flagged classes first, each part in ascending order; the count goes to the host
        order = torch.sort(keep[:width], descending=True, stable=True).indices
        counts[i % 2].copy_(keep[:width].sum(), non_blocking=True)
        if x.is_cuda:
            events[i % 2].record()
        if pending is not None:
            _finish_filtered(x, w, dw_scale, dx, dw, counts, *pending)
        pending = (c0, c1, du, order, i % 2, events[i % 2])
    if pending is not None:
        _finish_filtered(x, w, dw_scale, dx, dw, counts, *pending)
    if w_norm is not None and need_dw:  # one pass over dW: its rows so far hold sum_i dU_ij / n_j x_i
        _tangent_rows(dw, w, w_norm, None if opts.unit_scale else scale, dw)
    return dx, dw, db


def _dw_ranges(C: int, cc: int, logit_bytes: int, dw_bytes: int) -> list[tuple[int, int]]:
    """The exact backward's class ranges when it writes dW straight from its GEMMs: a chunk
    whose logits fit in dW's rows past it (not yet written: ``_dw_tail``) is as wide as they
    allow, ``w * logit_bytes <= (C - c0 - w) * dw_bytes``, a multiple of ``CHUNK_ALIGN``; the
    classes left then go in equal chunks of at most ``cc`` (the chunk buffer, a multiple of 8),
    then ``_chunk_ranges``'s tail."""
    aligned = C - C % 8
    ranges, c0 = [], 0
    while c0 < aligned:
        wide = (C - c0) * dw_bytes // (logit_bytes + dw_bytes) // CHUNK_ALIGN * CHUNK_ALIGN
        if wide <= cc:
            step = _equal_width(aligned - c0, cc, 8)
            ranges += [(a, min(a + step, aligned)) for a in range(c0, aligned, step)]
            break
        ranges.append((c0, min(aligned, c0 + wide)))
        c0 = ranges[-1][1]
    return ranges + ([(aligned, C)] if aligned < C else [])


def _dw_tail(dw: torch.Tensor, c1: int, N: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """An (N, width) logit chunk over the bytes of dW's rows from ``c1`` on, which no GEMM has
    written yet: the chunks after run in stream order, each writing its rows after the chunk
    before has read its logits (``_dw_ranges`` keeps the bytes within those rows)."""
    nbytes = N * width * dtype.itemsize
    return dw.view(-1)[c1 * dw.shape[1] :].view(torch.uint8)[:nbytes].view(dtype).view(N, width)


def _bounded_pieces(whole, cols, cc: int) -> list[tuple[int, int, torch.Tensor | None]]:
    """The bounded backward's chunks of at most ``cc`` classes: ``(k0, k1, None)`` for
    classes ``[k0, k1)`` of the ranges kept ``whole``, then ``(k0, k1, cols[k0:k1])`` for
    the gathered classes ``cols``."""
    pieces = [(c0, min(c0 + cc, c1), None) for r0, c1 in whole for c0 in range(r0, c1, cc)]
    if cols is not None:
        pieces += [(k0, min(k0 + cc, cols.numel()), cols[k0 : k0 + cc]) for k0 in range(0, cols.numel(), cc)]
    return pieces


#: Rows per tile of the backward's grad kernel.
_GRAD_BLOCK_N = 16
#: The grad kernel's launch when it also sums db: row blocks per program (each program then
#: reduces across rows once per column tile instead of once per tile) and the columns per
#: program. Without db: one row block, 1024 columns. H100, ViT-21k head (lean at 128 MiB):
#: the kernel took 0.498 ms per step with one row block, 0.343 with two, 0.36-0.43 with 4-16
#: (``benchmarks/tune_grad_db.py``; 0.153 without db).
GRAD_DB_TILE = dict(ROW_BLOCKS=2, COLS=1024)


def _db_part_rows(N: int) -> int:
    """Rows of the grad kernel's partial bias sums: one per program along the rows."""
    return triton.cdiv(N, _GRAD_BLOCK_N * GRAD_DB_TILE["ROW_BLOCKS"])


def _recompute_du(x, w_k, buf, b, scale, lse, cp, kargs, opts, c0, cols=None, db_part=None, keep=None,
                  filter_eps=None, own=None):  # fmt: skip
    """dU of one chunk of classes, recomputed into ``buf`` and written over it: ``w_k`` holds
    W's rows of classes ``[c0, c0 + k)``, or of the gathered classes ``cols`` followed by
    zero rows (``_gathered_rows``), whose dU columns come out zero. ``db_part`` receives the
    per-program partial bias sums, ``keep`` the filter's flags (see ``chunk_grad_kernel``).
    ``own``: the chunk's first ``own`` classes are its own, the rest's dU columns come out zero
    (``_owned_ranges``)."""
    N, rows, cc = x.shape[0], w_k.shape[0], buf.shape[1]
    width = rows if cols is None else cols.numel()
    raw = buf[:, :rows]
    if (own is None or own == rows) and _one_pass(x, w_k, buf, cols, db_part, keep, kargs):
        _fused_du(x, w_k, raw, b, scale, lse, cp, kargs, c0, opts)
        return raw
    _raw_products(x, w_k, raw)
    if buf.dtype == x.dtype:
        du = raw
    else:  # fp16 dU over fp32 R: the same byte pitch holds twice the elements
        du = buf.view(x.dtype).as_strided((N, rows), (2 * cc, 1))
    row_blocks, program_cols = (GRAD_DB_TILE["ROW_BLOCKS"], GRAD_DB_TILE["COLS"]) if db_part is not None else (1, 1024)
    col_split = triton.cdiv(width, program_cols) if du.dtype == raw.dtype else 1
    cols_per_program = triton.cdiv(triton.cdiv(width, col_split), 256) * 256
    pointers, t_strides, flags = kargs
    chunk_grad_kernel[(triton.cdiv(N, _GRAD_BLOCK_N * row_blocks), col_split)](
        raw, raw.stride(0), du, du.stride(0), b if b is not None else x, scale, *pointers, lse, cp,
        db_part if db_part is not None else lse, db_part.stride(0) if db_part is not None else 0,
        keep if keep is not None else lse, cols if cols is not None else lse, lse, lse, lse, lse, N,
        width if own is None else own, width, c0, cols_per_program, *t_strides, opts.softcap or 1.0, filter_eps or 0.0,
        COMPUTE_DB=db_part is not None, FILTER=keep is not None, WITH_STATS=False, GATHERED=cols is not None,
        **flags, BLOCK_N=_GRAD_BLOCK_N, BLOCK_C=256, ROW_BLOCKS=row_blocks, num_warps=8,
    )  # fmt: skip
    if width < rows:  # the padding columns: zero products (bf16, fp32), fp32 bytes under fp16 dU
        du[:, width:].zero_()
    return du


def _one_pass(x, w_k, buf, cols, db_part, keep, kargs) -> bool:
    """Whether ``_recompute_du`` takes ``chunk_grad_tma_kernel``: bf16 operands TMA can read, at
    most ``FUSED_DU_MAX_D`` features, contiguous classes, no bias partials, no filter flags, no
    column scale (ArcFace at 1M classes ran 0.3-0.4 ms slower through it, ``ab_onepass2.log``)."""
    plain = cols is None and db_part is None and keep is None and w_k.shape[0] > 0 and not kargs[2]["HAS_COL_SCALE"]
    small = x.shape[1] <= FUSED_DU_MAX_D and x.dtype == buf.dtype == w_k.dtype == torch.bfloat16
    return plain and small and tma_loads(x, w_k)


def _dense_chunk_grads(x, w_chunk, du, scale, dx, dw_chunk, first: bool = False):
    """``dW`` rows and the ``dX_raw`` term of one chunk from all its columns; ``scale`` None
    when it is known to be 1; ``first``: the term is written over ``dx`` (not yet set)."""
    if dw_chunk is not None and scale is None:  # straight from the GEMM, rounded once to w's dtype
        torch.mm(du.T, x, out=dw_chunk)
    elif dw_chunk is not None:  # the scale multiplies the fp32 product, before the one rounding
        torch.mul(_mm_fp32(du.T, x), scale, out=dw_chunk)
    if dx is not None:
        _accumulate(dx, du, w_chunk, first)


def _gathered_chunk_grads(x, w_k, du, scale, dx, dw, cols):
    """``dW`` rows ``cols`` and the ``dX_raw`` term of gathered classes: ``du`` (N, k') their
    dU columns, ``w_k`` their rows of W, both followed by the same k' - k zero padding
    (``_gathered_rows``)."""
    if dw is not None:
        # index_put_ (unique rows) has a deterministic CUDA path; index_copy_ alerts under
        # torch.use_deterministic_algorithms
        rows = torch.mm(du.T, x) if scale is None else (_mm_fp32(du.T, x) * scale).to(dw.dtype)
        dw.index_put_((cols,), rows[: cols.numel()])
    if dx is not None:
        _addmm_fp32(dx, du, w_k)


def _finish_filtered(x, w, scale, dx, dw, counts, c0, c1, du, order, slot, ready):
    """The GEMMs of a filtered chunk once its count k of flagged classes is on the host: dense
    above ``FILTER_DENSE_FRACTION``, else over the flagged columns ``order[:k]`` (dW's other
    rows zero). They are gathered as rows of ``dU.T``: both GEMMs then read them with
    the leading dimension N, which keeps cuBLAS on its fast 16-bit kernels for any k."""
    if ready is not None:
        ready.synchronize()
    width, k = c1 - c0, int(counts[slot])
    if k > FILTER_DENSE_FRACTION * width:
        _dense_chunk_grads(x, w[c0:c1], du, scale, dx, dw[c0:c1] if dw is not None else None)
        return
    if dw is not None:  # the dropped classes' rows are zero; dense chunks write every row
        dw[c0:c1].zero_()
    if k == 0:
        return
    cols = order[:k]
    du_t = du.T.index_select(0, cols)
    w_k = w[c0:c1].index_select(0, cols) if dx is not None else None
    _gathered_chunk_grads(x, w_k, du_t.T, scale, dx, dw[c0:c1] if dw is not None else None, cols)


@fast_jit
@triton.jit
def tangent_rows_kernel(G, W, Norm, Scale, Out, C, D, stride_g, stride_w, stride_o, HAS_SCALE: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):  # fmt: skip
    """``Out_j = scale * (G_j - (G_j . W_j) W_j / n_j^2)`` for the C rows j, n_j = ``Norm[j]``.

    With logits ``s * x . W_j / |W_j|``, ``G_j = sum_i dU_ij / n_j x_i`` is the gradient of
    ``W_j / n_j`` as if n_j were constant; the division's own derivative removes G_j's
    component along W_j. One program owns BLOCK_R whole rows: a dot over D, then the write,
    each block of a row read before it is written (Out may be G)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < C
    dot = tl.zeros([BLOCK_R], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (ds < D)[None, :]
        g = tl.load(G + rows[:, None] * stride_g + ds[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + rows[:, None] * stride_w + ds[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(g * w, axis=1)
    n = tl.load(Norm + rows, mask=row_mask, other=1.0)
    radial = dot / (n * n)
    scale = tl.load(Scale).to(tl.float32) if HAS_SCALE else 1.0
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (ds < D)[None, :]
        g = tl.load(G + rows[:, None] * stride_g + ds[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + rows[:, None] * stride_w + ds[None, :], mask=mask, other=0.0).to(tl.float32)
        out = scale * (g - radial[:, None] * w)
        tl.store(Out + rows[:, None] * stride_o + ds[None, :], out.to(Out.dtype.element_ty), mask=mask)


def _tangent_rows(g, w, w_norm, scale, out) -> None:
    """``out = tangent_rows_kernel(g, w)``: g and out (C, D), out in w's dtype (may be g)."""
    C, D = g.shape
    block_d = min(256, triton.next_power_of_2(D))
    tangent_rows_kernel[(triton.cdiv(C, 8),)](
        g, w, w_norm, scale if scale is not None else w_norm, out, C, D, g.stride(0), w.stride(0), out.stride(0),
        HAS_SCALE=scale is not None, BLOCK_R=8, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
