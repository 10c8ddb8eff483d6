"""Launch configurations of the class-chunked forward's kernel (H100): the lean training forward
per stats tile (and the stats kernel's own time and bandwidth, torch.profiler), and the bounded
one of ``impl="filtered"`` (the stats kernel with its column-max programs, the GEMMs unchanged)
per column tile, at the chunk of the bench's lean rows.
``PYTHONPATH=. python benchmarks/tune_bound.py [case ...]``"""

import itertools
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from fused_xent.bench import CASES, lean_budget, make_inputs
from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.functional import _lean_chunk_bytes
from fused_xent.kernels import class_chunked

#: Stats tiles (rows, classes, warps); the first is production's. Session 10 added the wider ones: more bytes
#: in flight per program (the kernel ran at ~1.5 TB/s with 16 x 256 tiles, 2 programs per SM at N = 4096).
STATS = [
    dict(BLOCK_N=n, BLOCK_C=c, num_warps=w)
    for n, c, w in [(16, 256, 8), (8, 256, 4), (16, 128, 4), (32, 128, 8), (16, 512, 8), (16, 1024, 16),
                    (8, 512, 4), (8, 1024, 8), (32, 256, 8), (4, 1024, 4)]
]  # fmt: skip
COL_MAX = [dict(BLOCK_N=n, BLOCK_C=c, rows_per_program=None) for n, c in [(32, 128), (64, 128), (32, 256), (16, 256)]]


def stats_ms(fn) -> float:
    """The stats kernel's time per call of ``fn`` (torch.profiler, 3 calls)."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages() if e.key == "chunk_stats_kernel") / 3 / 1e3


def tune(name: str) -> None:
    case = CASES[name]
    x, w, y, _ = make_inputs(case, "cuda", torch.bfloat16)
    x, w = x.detach(), w.detach()
    # the chunk of the bench's lean / filtered rows (SPEC's lean memory)
    opts = XentOptions(num_classes=case["C"], chunk_bytes=_lean_chunk_bytes(lean_budget(case), x, True, False))
    rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
    scale = torch.ones((), device="cuda")
    args = (x, w, None, scale, rt, opts)
    ref = class_chunked.class_chunked_forward_bounded(*args)
    lse_ref = ref[0]
    for stats in STATS:
        class_chunked.STATS_TILE = stats
        lse = class_chunked.class_chunked_forward(*args)[0]
        diff = ((lse - lse_ref).abs().max() / lse_ref.abs().max()).item()
        plain = do_bench(lambda: class_chunked.class_chunked_forward(*args), return_mode="median")
        k = stats_ms(lambda: class_chunked.class_chunked_forward(*args))
        tb_s = x.shape[0] * w.shape[0] * 2 / k / 1e9
        print(f"{name} lean forward stats={stats}: {plain:.2f} ms, stats kernel {k:.2f} ms ({tb_s:.2f} TB/s), "
              f"lse max rel diff {diff:.1e}", flush=True)  # fmt: skip
    for stats, col in itertools.product(STATS, COL_MAX[1:2]):
        class_chunked.STATS_TILE, class_chunked.COL_MAX_TILE = stats, col
        out = class_chunked.class_chunked_forward_bounded(*args)
        same = all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
        t = do_bench(lambda: class_chunked.class_chunked_forward_bounded(*args), return_mode="median")
        print(
            f"{name} bounded forward stats={stats} col_max={col}: {t:.2f} ms (bitwise as default: {same})", flush=True
        )


for case_name in sys.argv[1:] or ["extreme_1m", "gemma2", "llama3"]:
    tune(case_name)
