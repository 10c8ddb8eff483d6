"""The class-chunked forward's stats kernel (H100) per tile, at the chunk of the bench's lean
rows: the lean training forward (median ms, do_bench), the stats kernel's own time per forward
and bandwidth (torch.profiler), and the largest relative difference of lse and lin from the
default tile. (The runs in ``tune_stats.log`` also compared per-tile sum reductions and column
splits, in commit 2f7f505.)
``PYTHONPATH=. python benchmarks/tune_stats.py [case ...]``"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from fused_xent.bench import CASES, lean_budget, make_inputs
from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.functional import _lean_chunk_bytes
from fused_xent.kernels import class_chunked

TILES = [(16, 256, 8), (8, 256, 4), (16, 128, 4), (32, 128, 8)]


def stats_ms(fn) -> float:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages() if e.key == "chunk_stats_kernel") / 3 / 1e3


def tune(name: str) -> None:
    case = CASES[name]
    x, w, y, _ = make_inputs(case, "cuda", torch.bfloat16)
    x, w = x.detach(), w.detach()
    opts = XentOptions(num_classes=case["C"], chunk_bytes=_lean_chunk_bytes(lean_budget(case), x, True, False))
    rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
    scale = torch.ones((), device="cuda")
    args = (x, w, None, scale, rt, opts)
    logit_bytes = x.shape[0] * w.shape[0] * 2
    default = dict(class_chunked.STATS_TILE)
    ref = class_chunked.class_chunked_forward(*args)
    for n, c, warps in TILES:
        class_chunked.STATS_TILE = dict(BLOCK_N=n, BLOCK_C=c, num_warps=warps)
        out = class_chunked.class_chunked_forward(*args)
        diff = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(out, ref, strict=True))
        t = do_bench(lambda: class_chunked.class_chunked_forward(*args), return_mode="median")
        k = stats_ms(lambda: class_chunked.class_chunked_forward(*args))
        print(
            f"{name} tile=({n},{c},w{warps}): forward {t:.2f} ms,"
            f" stats kernel {k:.2f} ms ({logit_bytes / k / 1e9:.2f} TB/s), max rel diff {diff:.1e}",
            flush=True,
        )
    class_chunked.STATS_TILE = default


for case_name in sys.argv[1:] or ["extreme_1m", "gemma2", "llama3", "vit21k"]:
    tune(case_name)
