"""Where the lean (class-chunked) path spends its time: torch.profiler over one fw+bw at
the Gemma 2 head shape. ``PYTHONPATH=. python benchmarks/profile_lean.py``"""

import math

import torch
from torch.profiler import ProfilerActivity, profile

import fused_xent

N, D, C = 8192, 2304, 256000
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(N, D, device="cuda", generator=g).bfloat16().requires_grad_()
w = (torch.randn(C, D, device="cuda", generator=g) / math.sqrt(D)).bfloat16().requires_grad_()
y = torch.randint(0, C, (N,), device="cuda", generator=g)


def step():
    x.grad = w.grad = None
    fused_xent.linear_cross_entropy(x, w, y, impl="lean").backward()


for _ in range(3):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    step()
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
