"""Host-side cost of one fused_xent fw+bw on a small head (ViT-21k): cProfile's top entries
and the wall time with and without the target-range check's host sync.
``PYTHONPATH=. python benchmarks/profile_host.py``"""

import cProfile
import pstats
import time

import torch

import fused_xent
from fused_xent import functional
from fused_xent.bench import CASES, make_inputs

case = CASES["vit21k"]
x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)


def step():
    x.grad = w.grad = b.grad = None
    fused_xent.linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=0.1).backward()


def wall(n=50):
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


print(f"wall per step: {wall():.2f} ms")
check = functional._check_target_range
functional._check_target_range = lambda *a: None
print(f"wall per step without the range check: {wall():.2f} ms")
functional._check_target_range = check
prof = cProfile.Profile()
prof.enable()
for _ in range(20):
    step()
torch.cuda.synchronize()
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(18)
