"""Per-kernel GPU time of lean's fw+bw at the 1M head (the bench's budget), 5 profiled steps after 20.

PYTHONPATH=. python benchmarks/prof_lean_step.py LABEL
"""

import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fused_xent.bench import fwbw_step

step, _ = fwbw_step("extreme_1m", "lean")
for _ in range(20):
    step()
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(5):
        step()
    torch.cuda.synchronize()
tot = collections.defaultdict(float)
cnt = collections.Counter()
for e in prof.events():
    if e.device_type == torch.autograd.DeviceType.CUDA:
        tot[e.name[:60]] += e.device_time_total / 1e3 / 5
        cnt[e.name[:60]] += 1
for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:8]:
    print(f"{v:8.2f} ms/step  {cnt[k] // 5:5d} per step  {k}")
print(f"{sum(tot.values()):8.2f} ms/step of kernels ({sys.argv[1]})")
