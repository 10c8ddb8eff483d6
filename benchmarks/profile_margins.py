"""ArcFace over 1,000,000 classes (4096 x 512, bf16, s 64, m 0.5), fw + bw: median time
(do_bench, two alternating rounds), peak extra memory, and the profiler's top kernels, for
``margin_cross_entropy`` with "auto" (the default chunk) and "lean" within SPEC's 1100 MiB.

    PYTHONPATH=. python benchmarks/profile_margins.py
"""

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from fused_xent.bench import lean_budget
from fused_xent.integrations.margins import margin_cross_entropy

N, D, C = 4096, 512, 1_000_000
g = torch.Generator(device="cuda").manual_seed(0)
w = (torch.randn(C, D, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
x = (torch.randn(N, D, device="cuda", generator=g) / D**0.5).bfloat16().requires_grad_()
y = torch.randint(0, C, (N,), device="cuda", generator=g)
budget = lean_budget(dict(N=N, D=D, C=C, lean_peak_mib=1100))
CONFIGS = {"auto": {}, "lean@1100MiB": dict(impl="lean", memory_budget=budget)}


def step(opts):
    x.grad = w.grad = None
    margin_cross_entropy(x, w, y, s=64.0, m2=0.5, **opts).backward()


rows, peaks = {name: [] for name in CONFIGS}, {}
for opts in CONFIGS.values():
    step(opts)
for _ in range(2):
    for name, opts in CONFIGS.items():
        rows[name].append(triton.testing.do_bench(lambda o=opts: step(o), grad_to_none=[x, w], return_mode="median"))
for name, opts in CONFIGS.items():
    x.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(opts)
    torch.cuda.synchronize()
    peak = peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**20
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step(opts)
        torch.cuda.synchronize()
    print(f"\n{name}: {' / '.join(f'{t:.2f}' for t in rows[name])} ms, peak {peak:.0f} MiB")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=70))
print("\n| config | ms (two rounds) | peak MiB |\n|---|---|---|")
for name in CONFIGS:
    print(f"| {name} | {' / '.join(f'{t:.2f}' for t in rows[name])} | {peaks[name]:.0f} |")
