"""Experiment (not used by the package): CLIP's lean passes with the products from TMA Triton tiles.

The lean CLIP loss (``fused_xent.kernels.clip_chunked``) stores each block of products from a
cuBLAS GEMM and reads it back in Triton: the forward's stats kernel (row and column
log-sum-exp, diagonal), the backward's grad kernel (dz over the block in place). At B = 32768,
D = 768 bf16 on the H100 its step is 13.3-13.6 ms against SPEC's 12; the kernels take 12.37 ms
(session 4's profile: four GEMMs 9.45 ms, grad kernel 1.71, stats 0.98). Session 4 fused the
grad kernel into a Triton GEMM with pointer loads: 335 TFLOP/s, slower in all (14.2 ms).

Here the products come through TMA descriptors (session 7: the streaming forward went from 480
to 560-625 TFLOP/s that way):

- forward, ``clip_stats_tma_kernel``: program (row group g, column split s) walks its column
  tiles, and down each its row group's 128-row blocks; per tile it folds ``z`` into the rows'
  running (max, sum-exp) of split s (read and written back, one writer per (s, row)), into the
  tile's column (max, sum-exp) carried in registers down the group and stored once per
  (g, column), and stores the diagonal. Partials ``(S, B)`` and ``(G, B)`` merged by the
  production ``_merge_base2``. No block of logits at all.
- backward, ``clip_dz_tma_kernel``: each program recomputes one tile of products and writes
  ``scale * dz`` (bf16) into the block buffer the production backward's cuBLAS dX / dY GEMMs
  read, and its ``sum dz R`` into its own slot (for the scale's gradient). The recompute GEMM
  and the grad kernel's read / write of the block become one pass.

The script times the production forward and backward against these (same inputs, bf16), checks
their results against each other, then times ``FusedClipLoss`` fw+bw with each pair swapped in
and reports the gradient error against fp32, as ``benchmarks/bench_clip.py`` does.

Session 8 sweeps both kernels' tiles (``FORWARD_SWEEP``, ``BACKWARD_SWEEP``), then times the step
twice, alternating, with the best backward (and the best forward where it beats production's).
Result (``tune_clip_tma.log``): the TMA forward is slower at every tile (3.95 ms at best against
3.42-3.46); the TMA backward ties production's (9.70 against 9.72 ms on the second machine); the
step 13.25 against 13.33 ms. Not adopted.

Session 9 (``--ws``, ``tune_clip_ws.log``): the backward kernel as a persistent loop, warp-specialised
by Triton 3.6's Hopper pass (descriptors made in the kernel, ds partials per row): 9.66 ms at best
(128 x 128, 4 stages) against production's 9.76; step 13.48 against 13.47-13.55. Not adopted.

    PYTHONPATH=. python benchmarks/tune_clip_tma.py [--B 32768] [--D 768] [--quick] [--ws]
"""

import argparse

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

import fused_xent.kernels.clip_chunked as clip_mod
from fused_xent.kernels import config
from fused_xent.kernels.class_chunked import _accumulate, _chunk_ranges
from fused_xent.kernels.tiles import raw_tile_tma

PROD_FORWARD = clip_mod.clip_chunked_forward
PROD_BACKWARD = clip_mod.clip_chunked_backward
LOG2E = 1.4426950408889634

#: (BLOCK_N, BLOCK_C, BLOCK_D, num_warps, num_stages) of the forward and of the backward kernel.
FORWARD_TILE = dict(BLOCK_N=128, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3)
BACKWARD_TILE = dict(
    BLOCK_N=128, BLOCK_C=256, BLOCK_D=64, GROUP_M=8, STORE_TMA=False, WS=False, num_warps=8, num_stages=3
)
#: Configurations swept (session 8): (BLOCK_N, BLOCK_C, BLOCK_D, num_warps, num_stages) forward;
#: the same plus (GROUP_M, STORE_TMA) backward. Session 7's first run: forward best at 128 x 128
#: with 4 warps (3.95 ms against production's 3.46), backward at 128 x 256 with 8 (9.09 / 9.76).
FORWARD_SWEEP = [(128, 128, 64, 4, 3), (128, 128, 64, 4, 4), (128, 128, 128, 4, 2), (128, 128, 128, 4, 3),
                 (64, 128, 64, 4, 3), (64, 256, 64, 4, 3), (64, 128, 128, 4, 3), (128, 64, 64, 4, 3),
                 (128, 128, 64, 8, 4), (64, 256, 64, 8, 3)]  # fmt: skip
BACKWARD_SWEEP = [(128, 256, 64, 8, 3, 8, False), (128, 256, 64, 8, 3, 8, True), (128, 256, 64, 8, 4, 8, True),
                  (128, 256, 128, 8, 2, 8, True), (256, 128, 64, 8, 3, 8, True), (128, 256, 64, 8, 3, 16, True),
                  (128, 256, 64, 8, 3, 4, True), (128, 128, 64, 4, 4, 8, True), (128, 128, 64, 8, 4, 8, True),
                  (256, 128, 64, 8, 4, 8, True)]  # fmt: skip
#: Session 9: the backward kernel warp-specialised (Triton 3.6's Hopper pass; 4 warps per group,
#: so 12 in all), one persistent program per multiprocessor: the same fields.
#: A TMA store of dz does not compile warp-specialised (Triton 3.6): pointer stores only.
WS_SWEEP = [(128, 256, 64, 4, 3, 8, False), (128, 256, 64, 4, 2, 8, False), (256, 128, 64, 4, 3, 8, False),
            (128, 128, 64, 4, 4, 8, False), (256, 128, 64, 4, 4, 8, False),
            (128, 256, 64, 4, 3, 16, False)]  # fmt: skip


@triton.jit
def clip_stats_tma_kernel(
    x_desc, y_desc, Scale, RowM, RowS, ColM, ColS, Diag, B, D, rows_per_group, tiles_per_split,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Row partials ``(RowM, RowS)[s, rows]`` and column partials ``(ColM, ColS)[g, cols]`` of
    ``z = scale * X @ Y.T`` (maxima in base 2), and ``Diag[i] = z_ii``; see the module text."""
    g = tl.program_id(0)
    sp = tl.program_id(1)
    scale2 = tl.load(Scale).to(tl.float32) * 1.4426950408889634
    first_row = g * rows_per_group
    last_row = tl.minimum(first_row + rows_per_group, B)
    first_col = sp * tiles_per_split * BLOCK_C
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(B - first_col, BLOCK_C))
    stats = sp.to(tl.int64) * B
    for t in range(0, n_tiles):
        c0 = first_col + t * BLOCK_C
        cols = c0 + tl.arange(0, BLOCK_C)
        col_mask = cols < B
        cm = tl.full([BLOCK_C], float("-inf"), dtype=tl.float32)
        cs = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(first_row, last_row, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            row_mask = rows < last_row
            raw = raw_tile_tma(x_desc, y_desc, r0, c0, D, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
            z = tl.where(row_mask[:, None] & col_mask[None, :], raw * scale2, float("-inf"))
            m = tl.load(RowM + stats + rows, mask=row_mask, other=float("-inf"))
            s = tl.load(RowS + stats + rows, mask=row_mask, other=0.0)
            m_new = tl.maximum(m, tl.max(z, axis=1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp2(m - m_ref) + tl.sum(tl.exp2(z - m_ref[:, None]), axis=1)
            tl.store(RowM + stats + rows, m_new, mask=row_mask)
            tl.store(RowS + stats + rows, s, mask=row_mask)
            cm_new = tl.maximum(cm, tl.max(z, axis=0))
            cm_ref = tl.where(cm_new == float("-inf"), 0.0, cm_new)
            cs = cs * tl.exp2(cm - cm_ref) + tl.sum(tl.exp2(z - cm_ref[None, :]), axis=0)
            cm = cm_new
            if (r0 < c0 + BLOCK_C) & (c0 < r0 + BLOCK_N):  # the tile meets i == j
                d = tl.sum(tl.where(rows[:, None] == cols[None, :], z, 0.0), axis=1) / 1.4426950408889634
                tl.store(Diag + rows, d, mask=row_mask & (rows >= c0) & (rows < c0 + BLOCK_C))
        tl.store(ColM + g.to(tl.int64) * B + cols, cm, mask=col_mask)
        tl.store(ColS + g.to(tl.int64) * B + cols, cs, mask=col_mask)


def clip_forward_tma(x, y, scale):
    """``clip_chunked_forward``'s ``(lse_row, lse_col, diag)`` with no block of logits."""
    if x.dtype not in (torch.bfloat16, torch.float16) and not config.interpreting():
        return PROD_FORWARD(x, y, scale)
    x, y = x.contiguous(), y.contiguous()
    B, D = x.shape
    tile = FORWARD_TILE if x.is_cuda else dict(BLOCK_N=16, BLOCK_C=16, BLOCK_D=16, num_warps=4, num_stages=2)
    bn, bc, bd = tile["BLOCK_N"], tile["BLOCK_C"], tile["BLOCK_D"]
    n_row_blocks, n_tiles = triton.cdiv(B, bn), triton.cdiv(B, bc)
    target = config.target_programs(x.device) if x.is_cuda else 4
    groups = max(1, min(n_row_blocks, int(target**0.5 * 1.4)))  # more row groups than column splits
    splits = max(1, min(n_tiles, triton.cdiv(target, groups)))
    rows_per_group = triton.cdiv(n_row_blocks, groups) * bn
    groups = triton.cdiv(B, rows_per_group)
    per = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, per)
    row_m = torch.full((splits, B), float("-inf"), device=x.device)
    row_s = torch.zeros((splits, B), device=x.device)
    col_m = torch.empty((groups, B), device=x.device)
    col_s = torch.empty((groups, B), device=x.device)
    diag = torch.empty(B, device=x.device)
    x_desc = TensorDescriptor(x, [B, D], [D, 1], [bn, bd])
    y_desc = TensorDescriptor(y, [B, D], [D, 1], [bc, bd])
    clip_stats_tma_kernel[(groups, splits)](
        x_desc, y_desc, scale, row_m, row_s, col_m, col_s, diag, B, D, rows_per_group, per,
        **config.dot_options(x.dtype), **tile,
    )  # fmt: skip
    return clip_mod._merge_base2(row_m, row_s), clip_mod._merge_base2(col_m, col_s), diag


@triton.jit
def clip_dz_tma_kernel(
    x_desc, y_desc, G, g_desc, stride_g, Scale, LseRow, LseCol, GRow, GCol, GDiag, OutScale, DS,
    stride_grow, stride_gcol, stride_gdiag, n_rows, r0, width, c0, B, D,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr, STORE_TMA: tl.constexpr,
    WS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """``dz * out_scale`` of one tile of the block (rows ``r0 + [0, n_rows)``, columns
    ``c0 + [0, width)``) from its own products, written to G in G's dtype; ``DS[pid]`` gets the
    tile's ``sum dz R * out_scale`` (with ``WS`` per row, in ``DS[pid * BLOCK_N + i]``). GROUP_M
    row tiles are walked together (their column operand stays in L2). ``STORE_TMA``: the tile
    leaves through ``g_desc`` (a TMA store, clipped at the view's edges) instead of masked
    pointer stores. Programs walk the
    tiles ``pid, pid + programs, ...`` (one each without ``WS``; with ``WS`` one program per
    multiprocessor, the loop warp-specialised by Triton's Hopper pass: a producer warp group
    issues the TMA loads, two consumer groups each take half of the tile's rows). With ``WS``
    ``x_desc`` and ``y_desc`` are X and Y themselves: the descriptors are made here, so that the
    pass can halve X's block for its consumers (a host descriptor keeps the whole block in
    Triton 3.6 and each copy overflows its buffer)."""
    n_m = tl.cdiv(n_rows, BLOCK_N)
    per_group = GROUP_M * tl.cdiv(width, BLOCK_C)
    if WS:
        x_desc = tl.make_tensor_descriptor(x_desc, shape=[B, D], strides=[D, 1], block_shape=[BLOCK_N, BLOCK_D])
        y_desc = tl.make_tensor_descriptor(y_desc, shape=[B, D], strides=[D, 1], block_shape=[BLOCK_C, BLOCK_D])
        for pid in tl.range(tl.program_id(0), n_m * tl.cdiv(width, BLOCK_C), tl.num_programs(0), warp_specialize=True):
            _dz_tile(
                x_desc, y_desc, G, g_desc, stride_g, Scale, LseRow, LseCol, GRow, GCol, GDiag, OutScale, DS,
                stride_grow, stride_gcol, stride_gdiag, n_rows, r0, width, c0, D, pid, n_m, per_group,
                UPCAST, DOT_PRECISION, GROUP_M, STORE_TMA, WS, BLOCK_N, BLOCK_C, BLOCK_D,
            )  # fmt: skip
    else:  # one tile per program (a loop here measured 11.5 ms against 9.6)
        _dz_tile(
            x_desc, y_desc, G, g_desc, stride_g, Scale, LseRow, LseCol, GRow, GCol, GDiag, OutScale, DS,
            stride_grow, stride_gcol, stride_gdiag, n_rows, r0, width, c0, D, tl.program_id(0), n_m, per_group,
            UPCAST, DOT_PRECISION, GROUP_M, STORE_TMA, WS, BLOCK_N, BLOCK_C, BLOCK_D,
        )  # fmt: skip


@triton.jit
def _dz_tile(
    x_desc, y_desc, G, g_desc, stride_g, Scale, LseRow, LseCol, GRow, GCol, GDiag, OutScale, DS,
    stride_grow, stride_gcol, stride_gdiag, n_rows, r0, width, c0, D, pid, n_m, per_group,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr, STORE_TMA: tl.constexpr,
    WS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Tile ``pid`` of ``clip_dz_tma_kernel``."""
    first_m = pid // per_group * GROUP_M
    group_rows = tl.minimum(n_m - first_m, GROUP_M)
    local_r0 = (first_m + pid % per_group % group_rows) * BLOCK_N
    local_c0 = (pid % per_group // group_rows) * BLOCK_C
    local_rows = local_r0 + tl.arange(0, BLOCK_N)
    local_cols = local_c0 + tl.arange(0, BLOCK_C)
    row_mask = local_rows < n_rows
    col_mask = local_cols < width
    rows = r0 + local_rows
    cols = c0 + local_cols
    r = raw_tile_tma(x_desc, y_desc, r0 + local_r0, c0 + local_c0, D, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
    scale2 = tl.load(Scale).to(tl.float32) * 1.4426950408889634
    out_scale = tl.load(OutScale)
    lse_r = tl.load(LseRow + rows, mask=row_mask, other=0.0) * 1.4426950408889634
    g_r = tl.load(GRow + rows * stride_grow, mask=row_mask, other=0.0) * out_scale
    g_d = tl.load(GDiag + rows * stride_gdiag, mask=row_mask, other=0.0) * out_scale
    lse_c = tl.load(LseCol + cols, mask=col_mask, other=0.0) * 1.4426950408889634
    g_c = tl.load(GCol + cols * stride_gcol, mask=col_mask, other=0.0) * out_scale
    z2 = r * scale2
    dz = g_r[:, None] * tl.exp2(z2 - lse_r[:, None]) + g_c[None, :] * tl.exp2(z2 - lse_c[None, :])
    dz += tl.where(rows[:, None] == cols[None, :], g_d[:, None], 0.0)
    valid = row_mask[:, None] & col_mask[None, :]
    dz = tl.where(valid, dz, 0.0)
    if STORE_TMA:
        g_desc.store([local_r0, local_c0], dz.to(G.dtype.element_ty))
    else:
        out = G + local_rows[:, None].to(tl.int64) * stride_g + local_cols[None, :]
        tl.store(out, dz.to(G.dtype.element_ty), mask=valid)
    if WS:  # per row: a sum across the rows would cross the halves the consumer groups own
        tl.store(DS + pid * BLOCK_N + tl.arange(0, BLOCK_N), tl.sum(dz * r, axis=1))
    else:
        tl.store(DS + pid, tl.sum(tl.sum(dz * r, axis=1), axis=0))


def clip_backward_tma(x, y, scale, lse_row, lse_col, g_row, g_col, g_diag):
    """``clip_chunked_backward`` (bf16) with each block's products and dz from one kernel."""
    if x.dtype != torch.bfloat16 and not (config.interpreting() and x.dtype == torch.float32):
        return PROD_BACKWARD(x, y, scale, lse_row, lse_col, g_row, g_col, g_diag)
    x, y = x.contiguous(), y.contiguous()
    B, D = x.shape
    out_scale = scale.reshape(())
    tile = BACKWARD_TILE if x.is_cuda else dict(BLOCK_N=16, BLOCK_C=16, BLOCK_D=16, GROUP_M=2, STORE_TMA=True,
                                                WS=False, num_warps=4, num_stages=2)  # fmt: skip
    bn, bc, bd = tile["BLOCK_N"], tile["BLOCK_C"], tile["BLOCK_D"]
    tile_rows = min(B, clip_mod.TILE_ROWS)
    cc = clip_mod.chunk_cols(tile_rows, D, x.dtype, clip_mod.CHUNK_BYTES)
    buf = torch.empty((tile_rows, cc), device=x.device, dtype=x.dtype)
    n_prog = triton.cdiv(tile_rows, bn) * triton.cdiv(cc, bc)
    slots = triton.cdiv(B, tile_rows) * len(_chunk_ranges(B, cc))
    ds_part = torch.zeros((slots, n_prog * (bn if tile["WS"] else 1)), device=x.device)
    dy = torch.empty_like(y)
    dy_acc = torch.empty((cc, D), device=x.device)
    dx_acc = torch.empty((B, D), device=x.device)
    x_desc = TensorDescriptor(x, [B, D], [D, 1], [bn, bd])
    y_desc = TensorDescriptor(y, [B, D], [D, 1], [bc, bd])
    if tile["WS"]:  # the kernel's own descriptors live in scratch memory from this allocator
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=x.device))
    slot = 0
    for c0, c1 in _chunk_ranges(B, cc):
        width = c1 - c0
        for r0 in range(0, B, tile_rows):
            n_rows = min(tile_rows, B - r0)
            dz = buf[:n_rows, :width]
            grid = (triton.cdiv(n_rows, bn) * triton.cdiv(width, bc),)
            if tile.get("WS"):
                grid = (min(grid[0], config.sm_count(x.device.index or 0)),)
            g_desc = TensorDescriptor(dz, [n_rows, width], [dz.stride(0), 1], [bn, bc]) if tile["STORE_TMA"] else x_desc
            clip_dz_tma_kernel[grid](
                x if tile["WS"] else x_desc, y if tile["WS"] else y_desc, dz, g_desc, dz.stride(0), scale, lse_row,
                lse_col, g_row, g_col, g_diag, out_scale, ds_part[slot], g_row.stride(0), g_col.stride(0),
                g_diag.stride(0), n_rows, r0, width, c0, B, D,
                **config.dot_options(x.dtype), **tile,
            )  # fmt: skip
            slot += 1
            _accumulate(dy_acc[:width], dz.T, x[r0 : r0 + n_rows], first_chunk=r0 == 0)
            _accumulate(dx_acc[r0 : r0 + n_rows], dz, y[c0:c1], first_chunk=c0 == 0)
        clip_mod._finish(dy_acc[:width], None, dy[c0:c1])
    del buf, dz, dy_acc
    if x.dtype == torch.float32:
        dx = dx_acc
    else:
        dx = torch.empty_like(x)
        clip_mod._finish(dx_acc, None, dx)
    return dx, dy, (ds_part.sum() / out_scale).reshape(1)


def _sweep(label: str, tile: dict, configs: list[dict], run, ref, diff_name: str, diff) -> tuple:
    """Time ``run`` with ``tile`` set to each configuration in turn; prints a row each (an
    error is a row, not a crash) and returns the fastest as ``(ms, config)``."""
    best = (float("inf"), None)
    for cfg in configs:
        tile.update(cfg)
        try:
            got = run()
            ms = do_bench(run, warmup=10, rep=100, return_mode="median")
            diffs = " ".join(f"{diff(a, b):.1e}" for a, b in zip(got, ref, strict=True))
            print(f"{label} TMA {cfg} {ms:6.2f} ms, {diff_name}: {diffs}", flush=True)
            best = min(best, (ms, cfg), key=lambda t: t[0])
        except Exception as e:  # a row, not a crash
            print(f"{label} TMA {cfg} error {type(e).__name__}: {str(e)[:200]}", flush=True)
    return best


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=32768)
    parser.add_argument("--D", type=int, default=768)
    parser.add_argument("--quick", action="store_true", help="B = 2048 (checks the script, not the timing)")
    parser.add_argument("--ws", action="store_true", help="sweep the warp-specialised backward only (no forward sweep)")
    args = parser.parse_args()
    from fused_xent.integrations.open_clip import FusedClipLoss

    B = 2048 if args.quick else args.B
    D = args.D
    g = torch.Generator(device="cuda").manual_seed(0)
    images = F.normalize(torch.randn(B, D, device="cuda", generator=g), dim=-1).bfloat16().requires_grad_()
    texts = F.normalize(torch.randn(B, D, device="cuda", generator=g), dim=-1).bfloat16().requires_grad_()
    scale = torch.tensor(100.0 / 1.5, device="cuda")
    print(f"# B={B} D={D} bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    x, y = images.detach(), texts.detach()
    ref = PROD_FORWARD(x, y, scale)
    prod_fw = do_bench(lambda: PROD_FORWARD(x, y, scale), warmup=10, rep=100, return_mode="median")
    print(f"forward  production {prod_fw:6.2f} ms", flush=True)
    forward_cfgs = [dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd, num_warps=warps, num_stages=stages)
                    for bn, bc, bd, warps, stages in FORWARD_SWEEP]  # fmt: skip
    best_fw = _sweep("forward ", FORWARD_TILE, [] if args.ws else forward_cfgs[:2] if args.quick else forward_cfgs,
                     lambda: clip_forward_tma(x, y, scale), ref, "max |diff| lse_row lse_col diag",
                     lambda a, b: (a - b).abs().max().item())  # fmt: skip
    lse_r, lse_c, _ = ref
    gr = torch.full((B,), 0.5 / B, device="cuda")
    gd = torch.full((B,), -1.0 / B, device="cuda")
    bref = PROD_BACKWARD(x, y, scale, lse_r, lse_c, gr, gr, gd)
    prod_bw = do_bench(lambda: PROD_BACKWARD(x, y, scale, lse_r, lse_c, gr, gr, gd), warmup=10, rep=100,
                       return_mode="median")  # fmt: skip
    print(f"backward production {prod_bw:6.2f} ms", flush=True)
    sweep = (
        [(*c, False) for c in BACKWARD_SWEEP[:1]] + [(*c, True) for c in WS_SWEEP]
        if args.ws
        else [(*c, False) for c in BACKWARD_SWEEP]
    )
    backward_cfgs = [dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd, num_warps=warps, num_stages=stages, GROUP_M=group_m,
                          STORE_TMA=store_tma, WS=ws)
                     for bn, bc, bd, warps, stages, group_m, store_tma, ws in sweep]  # fmt: skip
    best_bw = _sweep("backward", BACKWARD_TILE, backward_cfgs[:2] if args.quick else backward_cfgs,
                     lambda: clip_backward_tma(x, y, scale, lse_r, lse_c, gr, gr, gd), bref,
                     "rel diff dX dY dscale", _rel)  # fmt: skip
    print(f"best forward {best_fw}, best backward {best_bw}", flush=True)
    if best_fw[1] is not None:
        FORWARD_TILE.update(best_fw[1])
    if best_bw[1] is not None:
        BACKWARD_TILE.update(best_bw[1])
    forward = clip_forward_tma if best_fw[0] < prod_fw else PROD_FORWARD
    # the whole step, each pair swapped into the lean CLIP backend (it imports them per call)
    i32, t32 = images.detach().float().requires_grad_(), texts.detach().float().requires_grad_()
    labels = torch.arange(B, device="cuda")
    logits = scale * i32 @ t32.T
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    del logits
    prod, tma = (PROD_FORWARD, PROD_BACKWARD), (forward, clip_backward_tma)
    mib = 2**20
    # (label, pair, backward's TILE_ROWS, CHUNK_BYTES): production's tiling, then taller / wider tiles
    runs = [("production", prod, 16384, 96 * mib), ("TMA backward", tma, 16384, 96 * mib),
            ("TMA backward", tma, 8192, 96 * mib), ("TMA backward", tma, 16384, 128 * mib),
            ("production", prod, 16384, 96 * mib), ("TMA backward", tma, 16384, 96 * mib)]  # fmt: skip
    if args.ws:  # within the 256 MiB: production's tiling only, alternating
        runs = [runs[0], runs[1], runs[0], runs[1]]
    for label, pair, tile_rows, chunk_bytes in runs:
        clip_mod.clip_chunked_forward, clip_mod.clip_chunked_backward = pair
        clip_mod.TILE_ROWS, clip_mod.CHUNK_BYTES = tile_rows, chunk_bytes
        label = f"{label}, tiles of {tile_rows} rows x {chunk_bytes // mib} MiB"
        try:
            loss_fn = FusedClipLoss(impl="lean")

            def step(loss_fn=loss_fn):
                images.grad = texts.grad = None
                loss_fn(images, texts, scale).backward()

            step()
            err = (_rel(images.grad, i32.grad), _rel(texts.grad, t32.grad))
            images.grad = texts.grad = None  # before the baseline: the peak counts the new gradients
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            ms = do_bench(step, warmup=10, rep=100, return_mode="median")
            print(f"FusedClipLoss step [{label}] {ms:6.2f} ms, peak {peak:.0f} MiB, grad err vs fp32 {err[0]:.1e} / "
                  f"{err[1]:.1e}", flush=True)  # fmt: skip
        finally:
            clip_mod.clip_chunked_forward, clip_mod.clip_chunked_backward = prod
            clip_mod.TILE_ROWS, clip_mod.CHUNK_BYTES = 16384, 96 * mib


if __name__ == "__main__":
    main()
