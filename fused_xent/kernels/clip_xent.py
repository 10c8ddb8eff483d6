"""CLIP's symmetric contrastive loss: row and column log-sum-exp of one ``s * X @ Y.T``.

With ``z_ij = s * x_i . y_j`` (``X``, ``Y`` both (B, D)) the forward kernel computes, in one
pass over (row block, column block) tiles and without writing any logit to memory,

    lse_row_i = log sum_j exp(z_ij),   lse_col_j = log sum_i exp(z_ij),   diag_i = z_ii.

Each program walks work items (a row block and a contiguous range of column tiles); it keeps
the online max / sum-exp of its rows in registers and merges each tile's column max /
sum-exp into a scratch row of its own ((programs, B), independent of the number of row
blocks), so memory is O(B * programs), never O(B * B). The host combines the partials by a
log-sum-exp over a fixed number of values: deterministic, no atomics.

For upstream gradients ``g_row`` (on lse_row), ``g_col`` (on lse_col) and ``g_diag`` the logit
gradient is

    dz_ij = g_row_i * exp(z_ij - lse_row_i) + g_col_j * exp(z_ij - lse_col_j) + [i == j] g_diag_i

and ``dX = s * dz @ Y``, ``dY = s * dz.T @ X``, ``ds = <dz @ Y, X>``. The backward kernel
recomputes ``z`` once, for a strip of rows at a time, and writes ``dz / unit`` (``unit`` the
largest upstream magnitude, so that fp16 never underflows) in the input dtype; two GEMMs with
fp32 accumulation turn the strip into its rows of ``dX`` and its contribution to ``dY``.
"""

import torch
import triton
import triton.language as tl

from fused_xent.kernels import config
from fused_xent.kernels.class_chunked import _addmm_fp32, _mm_fp32
from fused_xent.kernels.launch import fast_jit
from fused_xent.kernels.tiles import logit_tile

#: Bytes of the ``dz`` strip the backward holds at once. Each strip reads and writes the fp32
#: ``dY`` accumulator once, so taller strips keep that GEMM compute-bound (1024 rows at B = 32k).
STRIP_BYTES = 64 * 2**20


@fast_jit
@triton.jit
def clip_xent_forward_kernel(
    X,
    Y,
    Scale,
    RowM,
    RowS,
    Diag,
    ColM,
    ColS,
    B,
    D,
    n_splits,
    tiles_per_split,
    n_items,
    stride_xb,
    stride_xd,
    stride_yb,
    stride_yd,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    scale = tl.load(Scale).to(tl.float32)
    scratch = pid.to(tl.int64) * B  # this program's row of column partials
    for item in range(pid, n_items, tl.num_programs(0)):
        # the previous item's column partials, stored by any thread of this program, are
        # visible to every thread after the barrier (a read-modify-write, never a race)
        tl.debug_barrier()
        split = item % n_splits
        rows = (item // n_splits).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_mask = rows < B
        m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_M], dtype=tl.float32)
        diag = tl.zeros([BLOCK_M], dtype=tl.float32)
        first_col = split.to(tl.int64) * tiles_per_split * BLOCK_N
        for t in range(0, tiles_per_split):
            cols = first_col + t * BLOCK_N + tl.arange(0, BLOCK_N)
            col_mask = cols < B
            z = logit_tile(
                X, Y, X, rows, row_mask, cols, col_mask, D, stride_xb, stride_xd, stride_yb, stride_yd,
                scale, 1.0, False, False, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
            )  # fmt: skip
            valid = row_mask[:, None] & col_mask[None, :]
            zm = tl.where(valid, z, float("-inf"))
            diag += tl.sum(tl.where(valid & (rows[:, None] == cols[None, :]), z, 0.0), axis=1)
            # rows: online max and sum-exp; a reference of 0 where everything so far is masked
            m_new = tl.maximum(m, tl.max(zm, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(zm - m_ref[:, None]), axis=1)
            m = m_new
            # columns: this tile's max and sum-exp, merged into the scratch row
            cm = tl.max(zm, axis=0)
            cm_ref = tl.where(cm == float("-inf"), 0.0, cm)
            cs = tl.sum(tl.exp(zm - cm_ref[None, :]), axis=0)
            old_m = tl.load(ColM + scratch + cols, mask=col_mask, other=float("-inf"))
            old_s = tl.load(ColS + scratch + cols, mask=col_mask, other=0.0)
            new_m = tl.maximum(old_m, cm)
            new_ref = tl.where(new_m == float("-inf"), 0.0, new_m)
            tl.store(ColM + scratch + cols, new_m, mask=col_mask)
            tl.store(ColS + scratch + cols, old_s * tl.exp(old_m - new_ref) + cs * tl.exp(cm - new_ref), mask=col_mask)
        out = split.to(tl.int64) * B + rows
        tl.store(RowM + out, m, mask=row_mask)
        tl.store(RowS + out, s, mask=row_mask)
        tl.store(Diag + out, diag, mask=row_mask)


def _forward_blocks(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)


def _forward_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 2  # more than one, and fewer than the items, so the interpreter merges scratch rows
    return 2 * config.sm_count(device.index if device.index is not None else torch.cuda.current_device())


def _merge_lse(m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``log sum_k s_k exp(m_k)`` over dim 0, for partial maxima ``m`` and sums ``s``."""
    top = m.max(dim=0).values
    return top + torch.log((s * torch.exp(m - top)).sum(dim=0))


def clip_xent_forward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor):
    """Launch the forward kernel. ``x``, ``y`` (B, D) of one dtype, ``scale`` a 1-element fp32
    tensor. Returns ``(lse_row, lse_col, diag)``, each (B,) fp32."""
    B, D = x.shape
    blocks = _forward_blocks(x.device)
    n_row_blocks = triton.cdiv(B, blocks["BLOCK_M"])
    n_tiles = triton.cdiv(B, blocks["BLOCK_N"])
    target = _forward_programs(x.device)
    splits = min(n_tiles, max(1, triton.cdiv(target, n_row_blocks)))
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    n_items = n_row_blocks * splits
    programs = min(n_items, target)
    rows = torch.empty((3, splits, B), device=x.device, dtype=torch.float32)
    col_m = torch.full((programs, B), float("-inf"), device=x.device, dtype=torch.float32)
    col_s = torch.zeros((programs, B), device=x.device, dtype=torch.float32)
    clip_xent_forward_kernel[(programs,)](
        x, y, scale, rows[0], rows[1], rows[2], col_m, col_s,
        B, D, splits, tiles_per_split, n_items, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        **config.dot_options(x.dtype), **blocks,
    )  # fmt: skip
    return _merge_lse(rows[0], rows[1]), _merge_lse(col_m, col_s), rows[2].sum(dim=0)


@fast_jit
@triton.jit
def clip_xent_backward_kernel(
    X,
    Y,
    Scale,
    LseRow,
    LseCol,
    GRow,
    GCol,
    GDiag,
    Unit,
    G,
    row0,
    n_rows,
    B,
    D,
    n_row_blocks,
    stride_xb,
    stride_xd,
    stride_yb,
    stride_yd,
    stride_g,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # row blocks fastest: programs running together share one column tile of Y in L2
    pid = tl.program_id(0)
    local = (pid % n_row_blocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = row0 + local
    row_mask = local < n_rows
    cols = (pid // n_row_blocks).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < B
    scale = tl.load(Scale).to(tl.float32)
    z = logit_tile(
        X, Y, X, rows, row_mask, cols, col_mask, D, stride_xb, stride_xd, stride_yb, stride_yd,
        scale, 1.0, False, False, UPCAST, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D,
    )  # fmt: skip
    inv_unit = 1.0 / tl.load(Unit)
    lse_r = tl.load(LseRow + rows, mask=row_mask, other=0.0)
    g_r = tl.load(GRow + rows, mask=row_mask, other=0.0) * inv_unit
    g_d = tl.load(GDiag + rows, mask=row_mask, other=0.0) * inv_unit
    lse_c = tl.load(LseCol + cols, mask=col_mask, other=0.0)
    g_c = tl.load(GCol + cols, mask=col_mask, other=0.0) * inv_unit
    dz = g_r[:, None] * tl.exp(z - lse_r[:, None]) + g_c[None, :] * tl.exp(z - lse_c[None, :])
    dz += tl.where(rows[:, None] == cols[None, :], g_d[:, None], 0.0)
    valid = row_mask[:, None] & col_mask[None, :]
    tl.store(G + local[:, None] * stride_g + cols[None, :], dz.to(G.dtype.element_ty), mask=valid)


def _backward_blocks(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=16)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_D=64, num_warps=8, num_stages=3)


#: Fewest rows per strip on a GPU: every strip re-reads and re-writes the fp32 ``dY`` (8 B D bytes)
#: for 2 rows B D flops of its GEMM; at 128-row strips (B = 256k under STRIP_BYTES) that traffic
#: dominated the backward (H100 sweep in benchmarks/NVIDIA-H100-80GB-HBM3/clip.md).
MIN_STRIP_ROWS = 1024


def strip_rows(B: int, element_size: int, block: int, strip_bytes: int = STRIP_BYTES, min_rows: int = 0) -> int:
    """Rows of ``dz`` per strip: a multiple of ``block`` within ``strip_bytes`` (at least one block,
    and at least ``min_rows``)."""
    rows = max(strip_bytes // max(1, B * element_size), min_rows)
    return max(block, rows // block * block)


def clip_xent_backward(x, y, scale, lse_row, lse_col, g_row, g_col, g_diag, strip_bytes: int = STRIP_BYTES):
    """Gradients of ``g_row . lse_row + g_col . lse_col + g_diag . diag``. ``x``, ``y`` (B, D),
    ``scale`` 1-element fp32, the rest (B,) fp32. Returns ``(dx, dy, dscale)``: ``dx``, ``dy`` in
    the input dtype (fp32 accumulation), ``dscale`` a 1-element fp32 tensor."""
    B, D = x.shape
    blocks = _backward_blocks(x.device)
    # autograd may hand in expanded (stride 0) gradients; the kernel indexes them densely
    g_row, g_col, g_diag = (t.contiguous() for t in (g_row, g_col, g_diag))
    # every dz / unit lies in [-2, 2]: fp16 / bf16 strips neither underflow nor overflow
    unit = torch.stack([g_row.abs().max(), g_col.abs().max(), g_diag.abs().max()]).max().clamp_min(1e-30)
    min_rows = MIN_STRIP_ROWS if x.is_cuda else 0
    rows_per_strip = strip_rows(B, x.element_size(), blocks["BLOCK_M"], strip_bytes, min_rows)
    strip = torch.empty((min(rows_per_strip, B), B), device=x.device, dtype=x.dtype)
    dx = torch.empty_like(x)
    dy_acc = torch.zeros((B, D), device=x.device, dtype=torch.float32)
    dscale = torch.zeros((), device=x.device, dtype=torch.float32)
    factor = unit * scale.reshape(())
    for row0 in range(0, B, rows_per_strip):
        n_rows = min(rows_per_strip, B - row0)
        g = strip[:n_rows]
        n_row_blocks = triton.cdiv(n_rows, blocks["BLOCK_M"])
        grid = (n_row_blocks * triton.cdiv(B, blocks["BLOCK_N"]),)
        clip_xent_backward_kernel[grid](
            x, y, scale, lse_row, lse_col, g_row, g_col, g_diag, unit, g,
            row0, n_rows, B, D, n_row_blocks, x.stride(0), x.stride(1), y.stride(0), y.stride(1), g.stride(0),
            **config.dot_options(x.dtype), **blocks,
        )  # fmt: skip
        x_rows = x[row0 : row0 + n_rows]
        dx_raw = _mm_fp32(g, y)  # (n_rows, D), still divided by unit
        dscale += (dx_raw * x_rows).sum()
        dx[row0 : row0 + n_rows] = dx_raw * factor
        _addmm_fp32(dy_acc, g.T, x_rows)
    del strip, g  # before dY is cast: the peak stays at dX + fp32 dY + one strip
    return dx, dy_acc.mul_(factor).to(y.dtype), (dscale * unit).reshape(1)
