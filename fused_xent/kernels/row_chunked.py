"""Row-chunked "fast" strategy: three GEMMs, the gradients formed during the forward.

For a chunk of rows ``[r0, r1)`` one cuBLAS GEMM gives the raw products of *every* class,
``R = X[r0:r1] @ W.T`` (rows x C, bf16 for bf16 input as in lean, fp32 otherwise); then

- one launch of ``chunk_grad_kernel`` (``WITH_STATS``) reads R twice: first the rows'
  lse and loss (the rows are complete: every class is in R, so nothing is recomputed),
  then, with the upstream gradient of a reduced loss known in advance (``g``: the mean's
  ``1 / sum(row_weight)`` or the sum's 1, on every kept row), ``dU = cp * p - g * tt``
  written over R in place;
- ``dX[r0:r1] = dU @ W`` (complete: in x's dtype straight from the GEMM, or in fp32 when
  the scale or its gradient needs it) and ``dW += scale * dU.T @ X[r0:r1]``.

dW sums over row chunks, so 16-bit weights need an fp32 accumulator. It lives half in the
storage of dW itself (its first ~C/2 rows in fp32 fit in dW's bytes) and half in one
extra fp32 buffer for the other rows; at the end the first half is narrowed in place
(front to back, never overwriting bytes not yet read) and the second half copied behind
it. Memory beyond the gradients: one chunk of logits, that half accumulator and, at most,
an fp32 dX.
With a single chunk of rows there is no accumulator at all. No atomics: deterministic.
"""

import torch
import triton

from fused_xent.formulation import RowTargets, XentOptions
from fused_xent.kernels.class_chunked import (
    _accumulate,
    _chunk_dtype,
    _chunk_ranges,
    _equal_width,
    _kernel_args,
    _raw_products,
    chunk_grad_kernel,
)

#: Fewest rows per chunk worth the fast strategy: each chunk reads and writes dW's fp32
#: accumulator (8 C D bytes) to save lean's recompute GEMM (2 rows C D flops); at ~3 TB/s and
#: ~700 TFLOP/s that pays from ~930 rows. H100: fast beat lean at 1408 rows per chunk (Gemma 2,
#: 61.6 vs 67.4 ms) and lost at 512 (1M classes, 52.5 vs 44.2 ms).
MIN_FAST_ROWS = 1024
#: Tile (rows, classes) of the one kernel between the GEMMs on CUDA; a program owns whole
#: rows (two passes over them). The interpreter takes smaller tiles.
_GPU_TILE = (4, 1024)


def fast_workspace_bytes(N: int, C: int, D: int, dtype: torch.dtype, rows: int, raw_dx: bool = True) -> int:
    """Device memory the fast strategy holds beyond the gradients, at ``rows`` per chunk:
    the chunk of logits, the split accumulator's extra half with several chunks, and with
    ``raw_dx`` (a scale other than the unit one: dX_raw in fp32) that fp32 dX for 16-bit input."""
    rows = min(rows, N)
    nbytes = rows * triton.cdiv(C, 8) * 8 * _chunk_dtype(dtype).itemsize
    if raw_dx and dtype != torch.float32:
        nbytes += 4 * N * D
    if rows < N and dtype != torch.float32:
        nbytes += 4 * (C - C // 2 // 8 * 8) * D
    return nbytes


def fast_chunk_rows(N: int, C: int, D: int, dtype: torch.dtype, budget: int, raw_dx: bool = True) -> int | None:
    """Rows per chunk: all of them when their workspace fits in ``budget`` bytes, else the
    fewest chunks whose rows (a multiple of 128, at least ``MIN_FAST_ROWS``) fit, as equal as
    multiples of 128 allow; None when no such chunk fits."""
    if fast_workspace_bytes(N, C, D, dtype, N, raw_dx) <= budget:
        return N
    fixed = fast_workspace_bytes(N, C, D, dtype, 0, raw_dx)
    per_row = fast_workspace_bytes(N, C, D, dtype, 128, raw_dx) - fixed
    rows = (budget - fixed) // per_row * 128 if budget > fixed else 0
    if rows < MIN_FAST_ROWS:
        return None
    # as many chunks as these rows need, made as equal as multiples of 128 allow: the same
    # number of passes over the accumulator at a lower peak than a full chunk and a sliver
    return max(MIN_FAST_ROWS, _equal_width(N, rows, 128))  # rows >= MIN_FAST_ROWS: the same min / max


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
    g: torch.Tensor,
    rows: int,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    need_ds: bool,
):
    """``(lse, loss_rows, dx, dw, db, dscale)`` for the upstream gradient ``g`` (1-element:
    the mean's 1 / denominator or the sum's 1) on every kept row's loss: ``lse`` and
    ``loss_rows`` (formulation's row_loss) fp32, ``dx`` and ``dw`` in their inputs' dtypes,
    ``db`` in b's with one chunk of rows (fp32 with several), ``dscale`` fp32; None for a
    gradient not needed. ``opts.unit_scale``: the scale is known to be 1 (dX and dW straight
    from their GEMMs where nothing else needs them raw)."""
    N, D = x.shape
    scale_is_one = opts.unit_scale
    C = w.shape[0]
    dev = x.device
    lse = torch.empty(N, device=dev)
    loss_rows = torch.empty(N, device=dev)
    # dX straight from its GEMMs in x's dtype (``_final_dx``) unless the scale or its gradient
    # needs dX_raw in fp32
    dx_final = scale_is_one and not need_ds
    need_raw = need_dx or need_ds
    dx = torch.empty((N, D), device=dev, dtype=x.dtype if dx_final else torch.float32) if need_raw else None
    # row-major whatever w's layout (a transposed head): the split fp32 accumulator views its bytes flat
    dw = torch.empty(w.shape, device=dev, dtype=w.dtype) if need_dw else None
    rows = min(rows, N)
    whole = rows == N  # one chunk: no slicing (each view is host time on small heads)
    # db in b's dtype (= x's, = dU's) straight from one column sum (fp32 inside, rounded once)
    # with one chunk; summed in fp32 over several
    db_direct = need_db and whole
    db = None if db_direct or not need_db else torch.zeros(C, device=dev)
    if N == 0:
        dscale = torch.zeros(1, device=dev) if need_ds else None
        db = torch.zeros(C, device=dev) if need_db else None
        return lse, loss_rows, dx.to(x.dtype) if need_dx else None, None if dw is None else dw.zero_(), db, dscale
    pitch = triton.cdiv(C, 8) * 8  # rows of R 16-byte aligned: cuBLAS is slow on odd bf16 strides
    buf = torch.empty((rows, pitch), device=dev, dtype=_chunk_dtype(x.dtype))[:, :C]
    direct = whole and scale_is_one and w.dtype != torch.float32  # one rounding, straight into dW
    # every GEMM over classes [0, C8) and a tail of fewer than 8: cuBLAS runs its fast 16-bit
    # kernels only when that dimension is a multiple of 8 (4x slower at C = 21841 measured)
    spans = _chunk_ranges(C, C)
    C8 = spans[0][1] if len(spans) > 1 else C
    if need_dw and not direct and w.dtype != torch.float32:
        first, rest = _split_accumulator(dw)
        half = first.shape[0]
        dw_parts = [(first, 0, half)] + [(rest[c0 - half : c1 - half], c0, c1) for c0, c1 in _cut(half, C, C8)]
    elif need_dw:
        dw_parts = [(dw[c0:c1], c0, c1) for c0, c1 in spans]
    softcap = opts.softcap or 1.0
    tile_n, tile_c = _GPU_TILE if dev.type == "cuda" else (16, 256)
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        n, xs = r1 - r0, x if whole else x[r0:r1]
        raw = buf if whole else buf[:n]
        for c0, c1 in spans:
            _raw_products(xs, w[c0:c1], raw[:, c0:c1])
        rt_c = rt if whole else rt.rows(r0, r1)
        if buf.dtype == x.dtype:
            du = raw
        else:  # fp16 dU over fp32 R: the same byte pitch holds twice the elements
            du = raw.view(x.dtype).as_strided((n, C), (2 * pitch, 1))
        pointers, t_strides, flags = _kernel_args(b, rt_c, opts)
        lse_c, loss_c = (lse, loss_rows) if whole else (lse[r0:r1], loss_rows[r0:r1])
        chunk_grad_kernel[(triton.cdiv(n, tile_n),)](
            raw, raw.stride(0), du, du.stride(0), b if b is not None else x, scale, *pointers, lse_c, lse_c,
            lse_c, 0, lse_c, lse_c, loss_c, rt_c.lse_coef, rt_c.zl, g, n, C, C, 0, C, *t_strides, softcap, 0.0,
            COMPUTE_DB=False, FILTER=False, WITH_STATS=True, GATHERED=False, HAS_SMOOTHING=opts.label_smoothing != 0,
            **flags, BLOCK_N=tile_n, BLOCK_C=tile_c, num_warps=8,
        )  # fmt: skip
        if db_direct:
            db = du.sum(0)
        elif need_db:
            db += du.sum(0, dtype=torch.float32)
        if need_raw:
            dx_c = dx if whole else dx[r0:r1]
            if dx_final:
                _final_dx(dx_c, du, w, spans)
            else:
                for c0, c1 in spans:
                    _accumulate(dx_c, du[:, c0:c1], w[c0:c1], first_chunk=c0 == 0)
        if need_dw and direct:
            for c0, c1 in spans:
                torch.mm(du[:, c0:c1].T, xs, out=dw[c0:c1])
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
    dscale = (dx * x).sum().reshape(1) if need_ds else None  # <dX_raw, X>: formulation's scale gradient
    if need_dx and not dx_final:
        dx = dx.mul_(scale).to(x.dtype)  # in place: no second fp32 N x D buffer
    return lse, loss_rows, dx if need_dx else None, dw, db, dscale


def _final_dx(dx: torch.Tensor, du: torch.Tensor, w: torch.Tensor, spans: list[tuple[int, int]]) -> None:
    """``dx = du @ w`` in dx's dtype over the class ``spans`` (all classes, or a multiple of 8
    and a tail of fewer than 8, see ``_chunk_ranges``): the tail's few classes first, then the
    rest added to them inside one GEMM (fp32 accumulation, beta = 1) and rounded once. Only the
    tail's own product is rounded before the sum: it matters on the rows labelled with a tail
    class, where it is of dx's size (an extra rounding of up to 2**-9 there, in bf16)."""
    if len(spans) == 1:
        torch.mm(du, w, out=dx)
        return
    (c0, c1), (t0, t1) = spans
    torch.mm(du[:, t0:t1], w[t0:t1], out=dx)
    dx.addmm_(du[:, c0:c1], w[c0:c1])


def _cut(lo: int, hi: int, at: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` split at ``at`` when it falls inside."""
    return [(lo, at), (at, hi)] if lo < at < hi else [(lo, hi)]
