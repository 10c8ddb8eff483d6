"""Row-chunked "fast" strategy: three GEMMs, the gradients formed during the forward.

For a chunk of rows ``[r0, r1)`` one cuBLAS GEMM gives the raw products of *every* class,
``R = X[r0:r1] @ W.T`` (rows x C, bf16 for bf16 input as in lean, fp32 otherwise); then

- ``chunk_stats_kernel`` turns R into the rows' ``(lse, lin)`` (the rows are complete:
  every class is in R, so no recomputation is ever needed);
- with the upstream gradient of a reduced loss known in advance (``g_rows``: the mean's
  ``1 / sum(row_weight)`` or the sum's 1 on every kept row), ``chunk_grad_kernel`` writes
  ``dU = cp * p - g * tt`` over R in place;
- ``dX_raw[r0:r1] = dU @ W`` (complete, fp32) and ``dW += scale * dU.T @ X[r0:r1]``.

dW sums over row chunks, so 16-bit weights need an fp32 accumulator. It lives half in the
storage of dW itself (its first ~C/2 rows in fp32 fit in dW's bytes) and half in one
extra fp32 buffer for the other rows; at the end the first half is narrowed in place
(front to back, never overwriting bytes not yet read) and the second half copied behind
it. Memory beyond the gradients: one chunk of logits, that half accumulator and fp32 dX.
With a single chunk of rows there is no accumulator at all. No atomics: deterministic.
"""

import torch
import triton

from fused_xent.formulation import RowTargets, XentOptions, prob_coef
from fused_xent.kernels.class_chunked import (
    _addmm_fp32,
    _chunk_dtype,
    _kernel_args,
    _mm_fp32,
    _raw_products,
    chunk_grad_kernel,
    chunk_stats_kernel,
)

#: Fewest rows per chunk worth the fast strategy: dW's fp32 accumulator is read and written
#: once per chunk (8 C D bytes against 2 rows C D flops), at fewer rows memory dominates.
MIN_FAST_ROWS = 512
#: Rows per program of the grad kernel (its db partials have one row per program).
_GRAD_BLOCK_N = 16


def fast_workspace_bytes(N: int, C: int, D: int, dtype: torch.dtype, rows: int, need_db: bool = False) -> int:
    """Device memory the fast strategy holds beyond the gradients, at ``rows`` per chunk."""
    rows = min(rows, N)
    nbytes = rows * triton.cdiv(C, 8) * 8 * _chunk_dtype(dtype).itemsize + 4 * N * D
    if rows < N and dtype != torch.float32:
        nbytes += 4 * (C - C // 2 // 8 * 8) * D
    if need_db:
        nbytes += 4 * triton.cdiv(rows, _GRAD_BLOCK_N) * C
    return nbytes


def fast_chunk_rows(N: int, C: int, D: int, dtype: torch.dtype, budget: int, need_db: bool = False) -> int | None:
    """The most rows per chunk (all of them, or a multiple of 128 of at least
    ``MIN_FAST_ROWS``) whose workspace fits in ``budget`` bytes; None when none does."""
    if fast_workspace_bytes(N, C, D, dtype, N, need_db) <= budget:
        return N
    fixed = fast_workspace_bytes(N, C, D, dtype, 0, need_db)
    per_row = fast_workspace_bytes(N, C, D, dtype, 128, need_db) - fixed
    rows = (budget - fixed) // per_row * 128 if budget > fixed else 0
    return rows if rows >= MIN_FAST_ROWS else None


def _split_accumulator(dw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 accumulators for dW's first rows (at most half, inside dW's own bytes) and the rest."""
    C, D = dw.shape
    half = C // 2 // 8 * 8  # the second half's columns of dU start 16-byte aligned
    first = dw.view(-1)[: 2 * half * D].view(torch.float32).view(half, D)
    return first, torch.empty((C - half, D), device=dw.device, dtype=torch.float32)


def _narrow_in_place(first: torch.Tensor, rest: torch.Tensor, dw: torch.Tensor, scale) -> None:
    """``dw = scale * [first; rest]`` rounded once to dw's dtype, ``first`` living in dw's
    bytes: element k of ``first`` (bytes 4k..4k+4) becomes element k of dw (bytes 2k..2k+2),
    so copying ``[a, 2a)`` after ``[0, a)`` only overwrites fp32 elements already read."""
    src, dst = first.view(-1), dw.view(-1)
    n = src.numel()
    a = min(n, 2**20)
    if a:
        head = src[:a].clone()
        _scaled_copy(dst[:a], head, scale)
    while a < n:
        b = min(2 * a, n)
        _scaled_copy(dst[a:b], src[a:b], scale)
        a = b
    _scaled_copy(dw[first.shape[0] :], rest, scale)


def _scaled_copy(dst: torch.Tensor, src: torch.Tensor, scale) -> None:
    if scale is None:
        dst.copy_(src)
    else:
        torch.mul(src, scale, out=dst)


def row_chunked_loss_grads(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    scale: torch.Tensor,
    rt: RowTargets,
    opts: XentOptions,
    g_rows: torch.Tensor,
    rows: int,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    scale_is_one: bool = False,
):
    """``(lse, lin, dx_raw, dw, db)`` for an upstream gradient ``g_rows`` (N,) on each row's
    loss: ``lse``, ``lin`` and ``dx_raw`` (without the scale) fp32, ``dw`` in w's dtype with
    the scale, ``db`` fp32; None for a gradient not needed."""
    N, D = x.shape
    C = w.shape[0]
    dev = x.device
    lse = torch.empty(N, device=dev)
    lin = torch.empty(N, device=dev)
    dx = torch.empty((N, D), device=dev) if need_dx else None
    dw = torch.empty_like(w) if need_dw else None
    db = torch.zeros(C, device=dev) if need_db else None
    if N == 0:
        return lse, lin, dx, None if dw is None else dw.zero_(), db
    rows = min(rows, N)
    pitch = triton.cdiv(C, 8) * 8  # rows of R 16-byte aligned: cuBLAS is slow on odd bf16 strides
    buf = torch.empty((rows, pitch), device=dev, dtype=_chunk_dtype(x.dtype))[:, :C]
    db_part = torch.empty((triton.cdiv(rows, _GRAD_BLOCK_N), C), device=dev) if need_db else None
    direct = rows == N and scale_is_one and w.dtype != torch.float32  # one rounding, straight into dW
    if need_dw and not direct and w.dtype != torch.float32:
        first, rest = _split_accumulator(dw)
        dw_parts = ((first, 0, first.shape[0]), (rest, first.shape[0], C))
    elif need_dw:
        dw_parts = ((dw, 0, C),)
    softcap = opts.softcap or 1.0
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        n, xs = r1 - r0, x[r0:r1]
        raw = buf[:n]
        _raw_products(xs, w, raw)
        rt_c = rt.rows(r0, r1)
        m = torch.full((n,), float("-inf"), device=dev)
        s = torch.zeros(n, device=dev)
        lin_c = lin[r0:r1].zero_()
        pointers, t_strides, flags = _kernel_args(b, rt_c, opts)
        stats_block = 4 if dev.type == "cuda" else 16
        chunk_stats_kernel[(triton.cdiv(n, stats_block),)](
            raw, raw.stride(0), b if b is not None else x, scale, *pointers, m, s, lin_c,
            n, C, 0, *t_strides, softcap, NEED_LIN=True,
            **flags, BLOCK_N=stats_block, BLOCK_C=1024 if dev.type == "cuda" else 256, num_warps=8,
        )  # fmt: skip
        lse_c = lse[r0:r1]
        torch.add(m, torch.log(s), out=lse_c)
        g = g_rows[r0:r1]
        cp = prob_coef(g, torch.zeros_like(g), lse_c, rt_c)
        pointers, t_strides, flags = _kernel_args(b, rt_c.scaled(g), opts)
        if buf.dtype == x.dtype:
            du = raw
        else:  # fp16 dU over fp32 R: the same byte pitch holds twice the elements
            du = raw.view(x.dtype).as_strided((n, C), (2 * pitch, 1))
        col_split = triton.cdiv(C, 4096) if du.dtype == raw.dtype else 1
        cols_per_program = triton.cdiv(triton.cdiv(C, col_split), 256) * 256
        chunk_grad_kernel[(triton.cdiv(n, _GRAD_BLOCK_N), col_split)](
            raw, raw.stride(0), du, du.stride(0), b if b is not None else x, scale, *pointers, lse_c, cp,
            db_part if need_db else lse, C, lse, n, C, 0, cols_per_program, *t_strides, softcap, 0.0,
            COMPUTE_DB=need_db, FILTER=False,
            **flags, BLOCK_N=_GRAD_BLOCK_N, BLOCK_C=256, num_warps=8,
        )  # fmt: skip
        if need_db:
            db += db_part[: triton.cdiv(n, _GRAD_BLOCK_N)].sum(0)
        if need_dx:
            _mm_fp32(du, w, out=dx[r0:r1])
        if need_dw and direct:
            torch.mm(du.T, xs, out=dw)
        elif need_dw:
            for acc, c0, c1 in dw_parts:
                _accumulate(acc, du[:, c0:c1].T, xs, first_chunk=r0 == 0)
    if need_dw and not direct:
        factor = None if scale_is_one else scale
        if w.dtype == torch.float32:
            if factor is not None:
                dw.mul_(factor)
        else:
            _narrow_in_place(first, rest, dw, factor)
    return lse, lin, dx, dw, db


def _accumulate(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first_chunk: bool) -> None:
    """``acc = a @ b`` on the first chunk, ``acc += a @ b`` after, accumulated in fp32."""
    if acc.numel() == 0:
        return
    if first_chunk:
        _mm_fp32(a, b, out=acc)
    else:
        _addmm_fp32(acc, a, b)
