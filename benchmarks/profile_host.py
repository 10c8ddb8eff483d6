"""Host-side cost of one fused_xent fw+bw on a small head (ViT-21k), per impl: wall time per
step, host time per step (no sync, while the GPU keeps up), GPU kernel time per step
(torch.profiler), and the profiler's top CPU operators.
``PYTHONPATH=. python benchmarks/profile_host.py [impl ...]``; ``impl@BYTES`` sets the call's
``memory_budget`` (``fast@91000000``: fast in 1024-row chunks, within 128 MiB at ViT-21k).
Another case of ``fused_xent.bench``: ``PROFILE_CASE=extreme_1m``. ``PROFILE_PYTHON=1`` adds
cProfile's top Python functions by own time (where the host's time goes outside aten)."""

import cProfile
import os
import pstats
import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import fused_xent
from fused_xent.bench import CASES, make_inputs

case = CASES[os.environ.get("PROFILE_CASE", "vit21k")]
x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)


def step(spec):
    impl, _, budget = spec.partition("@")
    x.grad = w.grad = None
    if b is not None:
        b.grad = None
    fused_xent.linear_cross_entropy(
        x, w, y, linear_bias=b, label_smoothing=case.get("ls", 0.0), impl=impl,
        memory_budget=int(budget) if budget else None,
    ).backward()  # fmt: skip


def timed(impl, n=50, sync_each=False):
    for _ in range(5):
        step(impl)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step(impl)
        if sync_each:
            torch.cuda.synchronize()
    host = (time.perf_counter() - t0) / n * 1e3
    torch.cuda.synchronize()
    return host, (time.perf_counter() - t0) / n * 1e3


for impl in sys.argv[1:] or ["lean", "fast"]:
    host, wall = timed(impl)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step(impl)
        torch.cuda.synchronize()
    events = prof.key_averages()
    # kernels only: operator rows carry their kernels' time too, so summing every row counts it twice
    gpu = sum(e.self_device_time_total for e in prof.events() if e.device_type == DeviceType.CUDA) / 10 / 1e3
    print(f"{impl}: wall {wall:.2f} ms/step, host {host:.2f} ms/step (no sync), GPU kernels {gpu:.2f} ms/step")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    if os.environ.get("PROFILE_PYTHON") == "1":
        py = cProfile.Profile()
        for _ in range(20):
            py.runcall(step, impl)
        torch.cuda.synchronize()
        pstats.Stats(py).sort_stats("tottime").print_stats(20)
