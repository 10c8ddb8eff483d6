"""Launch configurations of the class-chunked forward's kernels (H100): the lean training
forward and the bounded one of ``impl="filtered"`` (stats + column-max kernels, the GEMMs
unchanged) timed per stats tile and column split (``STATS_WAVES``) on the bench cases.
``PYTHONPATH=. python benchmarks/tune_bound.py [case ...]``"""

import itertools
import sys

import torch
from triton.testing import do_bench

from fused_xent.bench import CASES, make_inputs
from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.kernels import class_chunked

STATS = [dict(BLOCK_N=n, BLOCK_C=c, num_warps=w) for n, c, w in [(16, 256, 8), (8, 256, 4), (16, 128, 4), (32, 256, 8)]]
WAVES = [0, 1, 2, 4]  # 0: one program per row block (no column split)
COL_MAX = [dict(BLOCK_N=n, BLOCK_C=c, num_warps=w, rows_per_program=None) for n, c, w in [(32, 128, 4), (64, 256, 8)]]


def tune(name: str) -> None:
    case = CASES[name]
    x, w, y, _ = make_inputs(case, "cuda", torch.bfloat16)
    x, w = x.detach(), w.detach()
    opts = XentOptions(num_classes=case["C"])
    rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
    scale = torch.ones((), device="cuda")
    args = (x, w, None, scale, rt, opts)
    ref = class_chunked.class_chunked_forward_bounded(*args)
    for stats, waves in itertools.product(STATS, WAVES):
        class_chunked.STATS_TILE, class_chunked.STATS_WAVES = stats, waves
        plain = do_bench(lambda: class_chunked.class_chunked_forward(*args), return_mode="median")
        bounded = do_bench(lambda: class_chunked.class_chunked_forward_bounded(*args), return_mode="median")
        only = do_bench(lambda: class_chunked.class_chunked_forward_only(*args), return_mode="median")
        out = class_chunked.class_chunked_forward_bounded(*args)
        diff = max(((a - b).abs().max().item() for a, b in zip(out[:2], ref[:2], strict=True)), default=0.0)
        print(
            f"{name} stats={tuple(stats.values())} waves={waves}: lean forward {plain:.2f} ms,"
            f" bounded forward {bounded:.2f} ms, forward only {only:.2f} ms (max |diff| of lse, lin: {diff:.1e})",
            flush=True,
        )
    class_chunked.STATS_TILE, class_chunked.STATS_WAVES = STATS[0], 2
    for col in COL_MAX:
        class_chunked.COL_MAX_TILE = col
        t = do_bench(lambda: class_chunked.class_chunked_forward_bounded(*args), return_mode="median")
        print(f"{name} bounded forward col_max={tuple(col.values())}: {t:.2f} ms", flush=True)
    class_chunked.COL_MAX_TILE = COL_MAX[0]


for case_name in sys.argv[1:] or ["extreme_1m", "gemma2", "llama3"]:
    tune(case_name)
