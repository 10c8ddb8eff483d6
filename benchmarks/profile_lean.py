"""Where the lean (class-chunked) path spends its time: torch.profiler over one fw+bw.
``PYTHONPATH=. python benchmarks/profile_lean.py [gemma2|vit21k|...] [impl]`` (cases of
fused_xent.bench; impl "lean" by default, or "filtered", "fast", ...)."""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

import fused_xent
from fused_xent.bench import CASES, make_inputs

case = CASES[sys.argv[1] if len(sys.argv) > 1 else "gemma2"]
x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
ls = case.get("ls", 0.0)
impl = sys.argv[2] if len(sys.argv) > 2 else "lean"


def step():
    x.grad = w.grad = None
    if b is not None:
        b.grad = None
    fused_xent.linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=ls, impl=impl).backward()


for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
print(sys.argv[1:])
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=50))
