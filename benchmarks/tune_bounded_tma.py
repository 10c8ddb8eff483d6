"""Experiment (not used by the package): filtered's bounded forward from one TMA kernel per chunk.

The filtered backend's forward (``class_chunked_forward_bounded``) runs per chunk of classes a
cuBLAS GEMM into a bf16 buffer, then the stats kernel, which reads it back for the rows' running
log-sum-exp and each class's ``max_i (z_ij - lse_k,i)`` (``lse_k`` the rows' lse over the chunks
before). Its chunk is sized by the memory budget: at 1M classes and 1100 MiB, ~78 chunks of
~12800 classes, two launches and the host's slicing each; the case is partly host-bound.

Here one Triton kernel per chunk computes the products tile by tile through TMA descriptors and
keeps nothing: per (row block, class split) program the rows' running max / sum-exp / target
logit (partials merged on the host after the launch) and, per class tile, the column max of
``z - lse_k`` over the program's rows, folded into the (C,) column maxima with ``atomic_max``.
With no buffer the chunks can be few and large: the first small (its classes have no bound and
are all kept, as the production first chunk's), then doubling. The output is what the
production forward returns, ``(lse, lin, bound)``, with the bound formed the same way; logits
are fp32 products (production: bf16-rounded chunks), so values differ at that rounding.

It measures, at the 1M-class case (and Gemma 2): the production bounded forward against this
one (time, lse difference, the fraction of classes the backward's filter keeps from each
bound), then the whole filtered fw+bw with this forward swapped in (``fused_xent.bench``'s
``run_case``: time, peak memory, errors against fp32) beside the production one.

Session 8's run (``tune_bounded_tma.log``): slower than production everywhere (1M bounded forward
17.7-18.1 ms against 14.68, filtered fw+bw 22.15 against 18.26; Gemma 2 fw+bw 30.2 against 24.5).

    PYTHONPATH=. python benchmarks/tune_bounded_tma.py [--quick] [--cases extreme_1m gemma2]
"""

import argparse
import json

import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

import fused_xent.kernels.class_chunked as cc_mod
from fused_xent.bench import CASES, lean_budget, make_inputs, run_case
from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.kernels import config
from fused_xent.kernels.tiles import raw_tile_tma

PRODUCTION = cc_mod.class_chunked_forward_bounded
TILE = dict(BLOCK_N=128, BLOCK_C=256, BLOCK_D=64, num_warps=8, num_stages=3)


@triton.jit
def bounded_chunk_kernel(
    x_desc,
    w_desc,
    Y1,
    K1,
    LseBefore,
    ColMax,
    M_out,
    S_out,
    L_out,
    N,
    c0,
    c1,
    D,
    tiles_per_split,
    COL_MAX: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Classes ``[c0, c1)``, rows of block ``program_id(0)``, class tiles of split
    ``program_id(1)``: partial (max, sum exp, k1 * z at the label) per row, and with
    ``COL_MAX`` the column max of ``z - lse_before`` over these rows into ``ColMax``."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    y1 = tl.load(Y1 + rows, mask=row_mask, other=-1).to(tl.int32)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    z1 = tl.zeros([BLOCK_N], dtype=tl.float32)
    if COL_MAX:  # rows past N count for nothing in a column's max
        lse_before = tl.load(LseBefore + rows, mask=row_mask, other=float("inf"))
    first = c0 + pid_s * tiles_per_split * BLOCK_C
    n_tiles = tl.minimum(tiles_per_split, tl.cdiv(c1 - first, BLOCK_C))
    for t in range(0, n_tiles):
        col0 = first + t * BLOCK_C
        cols = col0 + tl.arange(0, BLOCK_C)
        col_mask = cols < c1
        z = raw_tile_tma(x_desc, w_desc, pid_n * BLOCK_N, col0, D, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_C, BLOCK_D)
        zm = tl.where(col_mask[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(zm, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(zm - m_ref[:, None]), axis=1)
        m = m_new
        z1 += tl.sum(tl.where(cols[None, :] == y1[:, None], z, 0.0), axis=1)
        if COL_MAX:
            v = tl.max(zm - lse_before[:, None], axis=0)
            v = tl.where(v != v, float("inf"), v)  # a NaN row keeps every class
            tl.atomic_max(ColMax + cols, v, mask=col_mask)
    k1 = tl.load(K1 + rows, mask=row_mask, other=0.0)
    out = pid_s * N + rows
    tl.store(M_out + out, m, mask=row_mask)
    tl.store(S_out + out, s, mask=row_mask)
    tl.store(L_out + out, tl.where(k1 != 0.0, k1 * z1, 0.0), mask=row_mask)


def chunk_schedule(C: int, first: int, growth: float) -> list[tuple[int, int]]:
    """Chunks of classes: ``first`` wide (multiple of the tile), then each ``growth`` times the
    one before, the last taking the rest."""
    out, c0, width = [], 0, first
    while c0 < C:
        c1 = min(C, c0 + width)
        out.append((c0, c1))
        c0, width = c1, int(width * growth) // TILE["BLOCK_C"] * TILE["BLOCK_C"]
    return out


def bounded_forward_tma(x, w, b, scale, rt, opts, first: int = 16384, growth: float = 2.0):
    """``class_chunked_forward_bounded``'s ``(lse, lin, bound)`` for hard labels without bias,
    smoothing, softcap, class weights, mixup or scale (the bench's LM / 1M cases); anything else
    goes to the production forward."""
    plain = (
        b is None and rt.dense is None and rt.y2 is None and rt.class_weight is None and opts.softcap is None
        and opts.label_smoothing == 0 and opts.unit_scale
        and (config.interpreting() or (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)))
    )  # fmt: skip
    if not plain or x.shape[0] == 0:
        return PRODUCTION(x, w, b, scale, rt, opts)
    N, D = x.shape
    C = w.shape[0]
    chunks = chunk_schedule(C, first, growth)
    m = torch.full((N,), float("-inf"), device=x.device)
    s = torch.zeros(N, device=x.device)
    lin = torch.zeros(N, device=x.device)
    col_max = torch.full((C,), float("-inf"), device=x.device)
    col_max[: chunks[0][1]] = float("inf")  # the first chunk has nothing before it: always kept
    lse_before = torch.empty((len(chunks), N), device=x.device)
    bn, bc, bd = TILE["BLOCK_N"], TILE["BLOCK_C"], TILE["BLOCK_D"]
    x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [bn, bd])
    w_desc = TensorDescriptor(w, list(w.shape), list(w.stride()), [bc, bd])
    n_row_blocks = triton.cdiv(N, bn)
    for k, (c0, c1) in enumerate(chunks):
        n_tiles = triton.cdiv(c1 - c0, bc)
        splits = min(n_tiles, max(1, triton.cdiv(config.target_programs(x.device), n_row_blocks)))
        per = triton.cdiv(n_tiles, splits)
        splits = triton.cdiv(n_tiles, per)
        part = torch.empty((3, splits, N), device=x.device)
        bounded_chunk_kernel[(n_row_blocks, splits)](
            x_desc, w_desc, rt.y1, rt.k1, lse_before[k] if k > 0 else m, col_max, part[0], part[1], part[2],
            N, c0, c1, D, per, COL_MAX=k > 0, **config.dot_options(x.dtype), **TILE,
        )  # fmt: skip
        pm = part[0].max(0).values
        m_new = torch.maximum(m, pm)
        s = s * torch.exp(m - m_new) + (part[1] * torch.exp(part[0] - m_new)).sum(0)
        m = m_new
        lin += part[2].sum(0)
        if k + 1 < len(chunks):
            lse_before[k + 1] = m + torch.log(s)
    lse = m + torch.log(s)
    lse_before[0] = lse  # chunk 0's bound stays +inf
    gain = (lse - lse_before).amin(1)
    chunk_of = torch.empty(C, dtype=torch.long, device=x.device)
    for k, (c0, c1) in enumerate(chunks):
        chunk_of[c0:c1] = k
    return lse, lin, col_max - gain[chunk_of]


def compare_forwards(name: str, case: dict) -> None:
    x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
    x, w = x.detach(), w.detach()
    C = case["C"]
    opts = XentOptions(num_classes=C, chunk_bytes=cc_mod.budget_chunk_bytes(
        lean_budget(case), case["N"], case["D"], x.dtype, True, False), unit_scale=True)  # fmt: skip
    rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
    one = torch.ones(1, device="cuda")
    ref = PRODUCTION(x, w, None, one, rt, opts)
    eps = torch.finfo(x.dtype).eps / 32
    cp = torch.ones(case["N"], device="cuda")

    def kept(bound):
        return cc_mod._kept_classes(bound, cp, rt, eps, False).float().mean().item()

    ms = do_bench(lambda: PRODUCTION(x, w, None, one, rt, opts), warmup=10, rep=100, return_mode="median")
    print(f"{name}: production bounded forward {ms:7.2f} ms, keeps {kept(ref[2]):.4f} of the classes", flush=True)
    for first, growth in [(16384, 2.0), (16384, 4.0), (32768, 2.0), (8192, 2.0)]:
        try:
            got = bounded_forward_tma(x, w, None, one, rt, opts, first, growth)
            ms = do_bench(
                lambda first=first, growth=growth: bounded_forward_tma(x, w, None, one, rt, opts, first, growth),
                warmup=10, rep=100, return_mode="median",
            )  # fmt: skip
            n = len(chunk_schedule(C, first, growth))
            print(
                f"{name}: TMA bounded forward, {n} chunks from {first} x{growth}: {ms:7.2f} ms, keeps"
                f" {kept(got[2]):.4f}; lse diff {(got[0] - ref[0]).abs().max().item():.1e},"
                f" lin diff {(got[1] - ref[1]).abs().max().item():.1e}",
                flush=True,
            )
        except Exception as e:  # a row, not a crash
            print(f"{name}: TMA first={first} growth={growth}: error {type(e).__name__}: {str(e)[:200]}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["extreme_1m", "gemma2"])
    parser.add_argument("--quick", action="store_true", help="a small case (checks the script, not the timing)")
    args = parser.parse_args()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    cases = (
        {"quick": dict(N=512, D=256, C=100000, lean_peak_mib=64)} if args.quick else {c: CASES[c] for c in args.cases}
    )
    for name, case in cases.items():
        compare_forwards(name, case)
        for label, forward in [("production", PRODUCTION), ("TMA forward", bounded_forward_tma)]:
            cc_mod.class_chunked_forward_bounded = forward  # the filtered backend imports it per call
            try:
                for row in run_case(name, case, "cuda", only=["filtered"]):
                    print(f"{name} [{label}] " + json.dumps(row), flush=True)
            finally:
                cc_mod.class_chunked_forward_bounded = PRODUCTION


if __name__ == "__main__":
    main()
