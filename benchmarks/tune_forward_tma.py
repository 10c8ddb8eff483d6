"""The streaming forward (no-grad) at the Gemma 2 head: TMA loads, tiles and class splits.

One process, the same inputs. The production kernel owns 128 rows x a split of class tiles
per program and runs one program per multiprocessor (128 x 256 tiles, 3 stages: ~150 KB of
shared memory); with ``4 x SMs`` programs wanted, Gemma 2 gets 64 row blocks x 9 splits.

- the production kernel with pointer loads (its path before TMA descriptors);
- the production kernel through TMA descriptors, at a few tiles, over the number of splits
  (``span``: tiles one multiprocessor runs in sequence, one program at a time);
- a standalone kernel of the same math (``tma_forward_kernel``): nested class / D loops or one
  flattened loop; with one production feature at a time (how session 7 found the epilogue's
  cost); and with a leaner epilogue (session 8, run 8 of the log: 15.43 -> 14.39 ms): the target logit from outside the
  kernel (``x_i . w_{y_i}``, one batched dot), no column mask where C is a multiple of the tile,
  ``exp2`` of one fused multiply-add.

Every variant's lse and target logit are checked against the production kernel's (``diff``).
Prints ms and TFLOP/s. ``--no-splits`` skips the production kernel's sweep over splits.

``--occupancy`` (session 9) times only production's kernel at the tiles of ``OCCUPANCY_TILES``.

    PYTHONPATH=. python benchmarks/tune_forward_tma.py [--quick] [--no-splits] [--occupancy]
"""

import argparse
import math

import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.kernels import config
from fused_xent.kernels import linear_xent_forward as fwd
from fused_xent.kernels.tiles import raw_tile_tma


@triton.jit
def _fold(m, s, lin, z, cols, col_mask, y):
    zm = tl.where(col_mask[None, :], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(zm, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(zm - m_ref[:, None]), axis=1)
    lin += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
    return m_new, s, lin


@triton.jit
def _fold_rows(m, s, z, col_mask, EVEN: tl.constexpr, EXP2: tl.constexpr):
    """The rows' online max / sum-exp only. ``EVEN``: no masked column (C a multiple of the
    tile); ``EXP2``: ``exp2(z log2e - m log2e)``, one fused multiply-add before the exp2."""
    zm = z if EVEN else tl.where(col_mask[None, :], z, float("-inf"))
    m_new = tl.maximum(m, tl.max(zm, axis=1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    if EXP2:
        m_l = m_ref * 1.4426950408889634
        s = s * tl.exp2(m * 1.4426950408889634 - m_l) + tl.sum(tl.exp2(zm * 1.4426950408889634 - m_l[:, None]), axis=1)
    else:
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(zm - m_ref[:, None]), axis=1)
    return m_new, s


@triton.jit
def tma_forward_kernel(
    x_desc,
    w_desc,
    Y,
    M_out,
    S_out,
    L_out,
    N,
    C,
    D,
    tiles_per_split,
    Scale,
    FLATTEN: tl.constexpr,
    HELPER: tl.constexpr,
    PROD_EPILOGUE: tl.constexpr,
    ROWS64: tl.constexpr,
    LEAN: tl.constexpr,
    EVEN: tl.constexpr,
    EXP2: tl.constexpr,
    STAGES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    r0 = pid_n * BLOCK_N
    if ROWS64:
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    else:
        rows = r0 + tl.arange(0, BLOCK_N)
    y = tl.load(Y + rows, mask=rows < N, other=-1)
    z_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    lin = tl.zeros([BLOCK_N], dtype=tl.float32)
    c_first = pid_s * tiles_per_split * BLOCK_C
    n_t = tl.minimum(tiles_per_split, tl.cdiv(C - c_first, BLOCK_C))
    k_tiles = tl.cdiv(D, BLOCK_D)
    if FLATTEN:
        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
        for it in tl.range(0, n_t * k_tiles, num_stages=STAGES):
            t = it // k_tiles
            k = it - t * k_tiles
            c0 = c_first + t * BLOCK_C
            a = x_desc.load([r0, k * BLOCK_D])
            b = w_desc.load([c0, k * BLOCK_D])
            acc = tl.dot(a, b.T, acc)
            if k == k_tiles - 1:
                cols = c0 + tl.arange(0, BLOCK_C)
                m, s, lin = _fold(m, s, lin, acc, cols, cols < C, y)
                acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    else:
        for t in range(0, n_t):
            c0 = c_first + t * BLOCK_C
            if HELPER:  # the production kernel's GEMM loop
                acc = raw_tile_tma(x_desc, w_desc, r0, c0, D, False, "tf32", BLOCK_N, BLOCK_C, BLOCK_D)
            else:
                acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
                for k in tl.range(0, k_tiles, num_stages=STAGES):
                    a = x_desc.load([r0, k * BLOCK_D])
                    b = w_desc.load([c0, k * BLOCK_D])
                    acc = tl.dot(a, b.T, acc)
            cols = c0 + tl.arange(0, BLOCK_C)
            if PROD_EPILOGUE:  # the production kernel's epilogue: scale, a separate row sum
                z = acc * tl.load(Scale)
                col_mask = cols < C
                m, s, lin = _fold(m, s, lin, z, cols, col_mask, y)
                z_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
            elif LEAN:  # the target logit comes from outside the kernel
                m, s = _fold_rows(m, s, acc, cols < C, EVEN, EXP2)
            else:
                m, s, lin = _fold(m, s, lin, acc, cols, cols < C, y)
    out = pid_s * N + rows
    tl.store(M_out + out, m, mask=rows < N)
    tl.store(S_out + out, s, mask=rows < N)
    # z_sum feeds the store so that the compiler keeps PROD_EPILOGUE's extra pass (its cost is the point)
    tl.store(L_out + out, lin + 0.0 * z_sum, mask=rows < N)


#: Session 9: tiles of 64 rows with one warp group (4 warps) and few stages, so that two or three
#: programs share a multiprocessor and one's epilogue can run beside another's MMAs, as two
#: consumer groups would (Triton's warp specialisation was slower: ``probe_warp_spec.py``).
#: (BLOCK_N, BLOCK_C, num_warps, num_stages); BLOCK_D 64.
OCCUPANCY_TILES = [(64, 256, 4, 2), (64, 256, 4, 3), (64, 128, 4, 3), (64, 128, 4, 4), (128, 128, 4, 2)]


def split_grid(n_row_blocks: int, n_tiles: int, splits: int) -> tuple[int, int]:
    tiles_per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, tiles_per_split), tiles_per_split


def makespan(n_row_blocks: int, n_tiles: int, splits: int, sms: int) -> int:
    """Tiles a multiprocessor runs in sequence, one program per multiprocessor at a time."""
    splits, per = split_grid(n_row_blocks, n_tiles, splits)
    return triton.cdiv(n_row_blocks * splits, sms) * per


def tma_forward(x, w, y, splits, cfg, flatten, helper=False, prod_epilogue=False, rows64=False, lean=False,
                even=False, exp2=False):  # fmt: skip
    """lse and target logit through the standalone kernel; with ``lean`` the kernel folds the
    rows' max / sum-exp only and the target logit is ``x_i . w_{y_i}`` from torch (fp32)."""
    N, D = x.shape
    C = w.shape[0]
    bn, bc, bd = cfg["BLOCK_N"], cfg["BLOCK_C"], cfg["BLOCK_D"]
    n_row_blocks, n_tiles = triton.cdiv(N, bn), triton.cdiv(C, bc)
    splits, per = split_grid(n_row_blocks, n_tiles, splits)
    part = torch.empty((3, splits, N), device=x.device, dtype=torch.float32)
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [bn, bd])
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [bc, bd])
    tma_forward_kernel[(n_row_blocks, splits)](
        x_desc, w_desc, y, part[0], part[1], part[2], N, C, D, per, torch.ones(1, device=x.device),
        FLATTEN=flatten, HELPER=helper, PROD_EPILOGUE=prod_epilogue, ROWS64=rows64, LEAN=lean, EVEN=even, EXP2=exp2,
        STAGES=cfg["num_stages"], BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd, num_warps=cfg["num_warps"],
    )  # fmt: skip
    m, s, lin = part
    m_max = m.max(0).values
    lse = m_max + torch.log((s * torch.exp(m - m_max)).sum(0))
    if lean:
        return lse, torch.einsum("nd,nd->n", x.float(), w.index_select(0, y).float())
    return lse, lin.sum(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small shape (checks the script, not the timing)")
    parser.add_argument("--no-splits", action="store_true", help="skip the production kernel's sweep over splits")
    parser.add_argument(
        "--occupancy", action="store_true", help="production tiles that fit two or three programs per SM, then exit"
    )
    args = parser.parse_args()
    N, D, C = (512, 256, 4000) if args.quick else (8192, 2304, 256000)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(N, D, device="cuda", generator=g).bfloat16()
    w = (torch.randn(C, D, device="cuda", generator=g) / math.sqrt(D)).bfloat16()
    y = torch.randint(0, C, (N,), device="cuda", generator=g)
    opts = XentOptions(num_classes=C)
    rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
    one = torch.ones(1, device="cuda")
    flop = 2 * N * D * C
    sms = config.sm_count(0)
    base = config.forward_blocks(x.device)
    n_row_blocks, n_tiles = triton.cdiv(N, base["BLOCK_N"]), triton.cdiv(C, base["BLOCK_C"])
    ref_lse, ref_lin = fwd.linear_xent_forward(x, w, None, one, rt, opts)
    default_splits = triton.cdiv(config.target_programs(x.device), n_row_blocks)

    def report(name, fn):
        try:
            lse, lin = fn()
            err = max(((lse - ref_lse).abs().max() / ref_lse.abs().max()).item(), (lin - ref_lin).abs().max().item())
            ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
            print(f"{name:58s} {ms:7.2f} ms {flop / ms / 1e9:5.0f} TFLOP/s  diff {err:.1e}", flush=True)
        except Exception as e:  # a configuration that does not compile is a row, not a crash
            print(f"{name:58s} error {type(e).__name__}: {str(e)[:120]}", flush=True)

    print(f"# N={N} D={D} C={C} bf16, {torch.cuda.get_device_name()}, {sms} SMs, triton {triton.__version__}")
    print(f"# production tile {base}, {n_row_blocks} row blocks x {n_tiles} class tiles")
    orig_programs, orig_blocks, orig_tma = config.target_programs, config.forward_blocks, fwd.tma_loads
    try:
        fwd.tma_loads = lambda x, w: False
        report(
            f"production, pointer loads, splits={default_splits} (default)",
            lambda: fwd.linear_xent_forward(x, w, None, one, rt, opts),
        )
        fwd.tma_loads = orig_tma
        tiles = [base]  # num_stages=4 measured slower at every split (tune_forward_tma.log run 3)
        if args.occupancy:
            tiles += [
                dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=64, num_warps=w, num_stages=st)
                for bn, bc, w, st in OCCUPANCY_TILES
            ]
        for rnd in () if args.no_splits else (1, 2):  # two rounds: run-to-run spread on these machines is ~1-2 ms
            for cfg in tiles:
                config.forward_blocks = lambda device, cfg=cfg: dict(cfg)
                rb, ct = triton.cdiv(N, cfg["BLOCK_N"]), triton.cdiv(C, cfg["BLOCK_C"])
                split_counts = (
                    {triton.cdiv(4 * sms, rb), 125} if args.occupancy else {triton.cdiv(4 * sms, rb), 8, 63, 125, 250}
                )
                for splits in sorted(split_counts):
                    real, per = split_grid(rb, ct, min(splits, ct))
                    config.target_programs = lambda device, p=real * rb: p
                    tile = (
                        f"{cfg['BLOCK_N']}x{cfg['BLOCK_C']}x{cfg['BLOCK_D']} w{cfg['num_warps']} s{cfg['num_stages']}"
                    )
                    span = makespan(rb, ct, real, sms)
                    report(
                        f"[{rnd}] production TMA {tile} splits={real} ({per} tiles, span {span})",
                        lambda: fwd.linear_xent_forward(x, w, None, one, rt, opts),
                    )
                    config.target_programs = orig_programs
    finally:
        config.target_programs, config.forward_blocks, fwd.tma_loads = orig_programs, orig_blocks, orig_tma
    if args.occupancy:
        return
    for flatten in (False, True):
        report(
            f"standalone tma {'flat' if flatten else 'nest'} splits=125",
            lambda flatten=flatten: tma_forward(x, w, y, 125, base, flatten),
        )
    for name, kw in [("helper GEMM", dict(helper=True)), ("prod epilogue", dict(prod_epilogue=True)),
                     ("int64 rows", dict(rows64=True)), ("target logit outside", dict(lean=True)),
                     ("target outside, no column mask", dict(lean=True, even=C % base["BLOCK_C"] == 0)),
                     ("target outside, no mask, exp2 fma", dict(lean=True, even=C % base["BLOCK_C"] == 0, exp2=True)),
                     ("target outside, exp2 fma", dict(lean=True, exp2=True))]:  # fmt: skip
        report(f"standalone tma nest splits=125 + {name}", lambda kw=kw: tma_forward(x, w, y, 125, base, False, **kw))


if __name__ == "__main__":
    main()
