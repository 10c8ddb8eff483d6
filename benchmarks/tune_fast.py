"""The fast strategy's launch choices on the H100: the tile of its one Triton kernel
(``row_chunked.GPU_TILE``: rows, classes, warps) and the backward's in-place scaling of the
stored gradients (``functional.SCALE_BY_FOREACH``), timed (fw + bw, do_bench median) on the bench
cases with every row in one chunk and at SPEC's fast budget; gradients compared bitwise with
the defaults.

    PYTHONPATH=. python benchmarks/tune_fast.py [case ...]
"""

import sys

import torch
from triton.testing import do_bench

import fused_xent
from fused_xent import functional
from fused_xent.bench import CASES, fast_budget, make_inputs
from fused_xent.kernels import row_chunked

TILES = [(4, 1024, 8), (2, 1024, 8), (1, 2048, 8), (2, 2048, 8), (1, 1024, 4), (4, 2048, 8)]


def tune(name: str) -> None:
    case = CASES[name]
    x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
    ls = case.get("ls", 0.0)
    params = [p for p in (x, w, b) if p is not None]

    def step(budget):
        for p in params:
            p.grad = None
        fused_xent.linear_cross_entropy(
            x, w, y, linear_bias=b, label_smoothing=ls, impl="fast", memory_budget=budget
        ).backward()  # fmt: skip

    def grads(budget):
        step(budget)
        return [p.grad.clone() for p in params]

    for label, budget in (("one chunk", 2**40), ("SPEC budget", fast_budget(case))):
        row_chunked.GPU_TILE, functional.SCALE_BY_FOREACH = TILES[0], False
        ref = grads(budget)
        for foreach in (False, True):
            functional.SCALE_BY_FOREACH = foreach
            for tile in TILES if foreach else TILES[:1]:
                row_chunked.GPU_TILE = tile
                same = all(torch.equal(a, r) for a, r in zip(grads(budget), ref, strict=True))
                ms = do_bench(lambda budget=budget: step(budget), return_mode="median")
                print(f"{name} {label}: tile {tile} foreach {foreach}: {ms:.2f} ms (bitwise as default: {same})",
                      flush=True)  # fmt: skip
    row_chunked.GPU_TILE, functional.SCALE_BY_FOREACH = TILES[0], True


print(torch.cuda.get_device_name(), torch.__version__)
for case_name in sys.argv[1:] or ["gemma2", "llama3", "vit21k"]:
    tune(case_name)
