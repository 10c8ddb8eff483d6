"""fw+bw of ``linear_cross_entropy`` with class weights and label smoothing (the kernels' dense
target tile, ``tiles.target_tile``), at a bench case, for each impl named; bf16, medians of
``triton.testing.do_bench`` (warm-up 50, 300 ms) on the bench's inputs, weights in [0.5, 1.5).

    PYTHONPATH=. python benchmarks/weighted_step.py CASE[,CASE...] IMPL[,IMPL...]
"""

import functools
import sys

import torch
from triton.testing import do_bench

from fused_xent import bench, linear_cross_entropy


def _step(leaves, y, cw, impl):
    for t in leaves:
        t.grad = None
    bias = leaves[2] if len(leaves) > 2 else None
    loss = linear_cross_entropy(leaves[0], leaves[1], y, linear_bias=bias, weight=cw, label_smoothing=0.1, impl=impl)
    loss.backward()
    return loss


def main() -> None:
    cases, impls = sys.argv[1].split(","), sys.argv[2].split(",")
    for name in cases:
        x, w, y, b = bench.make_inputs(bench.CASES[name], "cuda", torch.bfloat16)
        g = torch.Generator(device="cuda").manual_seed(7)
        cw = torch.rand(w.shape[0], device="cuda", generator=g) + 0.5
        leaves = [t for t in (x, w, b) if t is not None]
        for impl in impls:
            loss = _step(leaves, y, cw, impl).item()
            ms = do_bench(functools.partial(_step, leaves, y, cw, impl), warmup=50, rep=300, return_mode="median")
            print(f"| {name} | {impl} | weighted + smoothing | {ms:.2f} ms | loss {loss:.6f} |", flush=True)


if __name__ == "__main__":
    main()
