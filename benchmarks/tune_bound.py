"""The class-chunked training forward (H100): lean's and filtered's (with the per-class
bound), stats from programs owning rows or from tiles, per tile configuration, on the bench
cases. ``PYTHONPATH=. python benchmarks/tune_bound.py [case ...]``"""

import itertools
import sys

import torch
from triton.testing import do_bench

from fused_xent.bench import CASES, make_inputs
from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.kernels import class_chunked

TILES = [
    dict(BLOCK_N=n, BLOCK_C=c, num_warps=w, rows_per_program=r)
    for (n, c, w), r in itertools.product([(32, 128, 4), (64, 128, 8), (32, 256, 8)], [None, 512])
]


def tune(name: str) -> None:
    case = CASES[name]
    x, w, y, _ = make_inputs(case, "cuda", torch.bfloat16)
    x, w = x.detach(), w.detach()
    opts = XentOptions(num_classes=case["C"])
    rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
    scale = torch.ones((), device="cuda")
    args = (x, w, None, scale, rt, opts)
    for tiled in (False, True):
        class_chunked.TILED_STATS = tiled
        for tile in TILES if tiled else [None]:
            if tile is not None:
                class_chunked.TILE_STATS_TILE = tile
            plain = do_bench(lambda: class_chunked.class_chunked_forward(*args), return_mode="median")
            bounded = do_bench(lambda: class_chunked.class_chunked_forward_bounded(*args), return_mode="median")
            kind = f"tiles {tile}" if tiled else "rows (chunk_stats_kernel + chunk_col_max_kernel)"
            print(f"{name} {kind}: lean forward {plain:.2f} ms, bounded forward {bounded:.2f} ms", flush=True)


for case_name in sys.argv[1:] or ["extreme_1m", "gemma2"]:
    tune(case_name)
