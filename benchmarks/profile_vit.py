"""Where a ViT-21k head's fw+bw goes (4096 x 768 x 21841, smoothing 0.1, bias), and what its
GEMMs cost on their own.

``PYTHONPATH=. python benchmarks/profile_vit.py``. Part 1: the GEMMs of one head's chunks at an
odd class count, one call over every class (the row pitch of the logits padded to a multiple
of 8) against a multiple of 8 plus a tail, per row count. Part 2: wall / host / GPU time per
fw+bw of the fused calls, and cProfile's top Python functions by own time.
"""

import cProfile
import io
import os
import pstats
import sys
import time

import torch
from triton.testing import do_bench

import fused_xent
from fused_xent.bench import CASES, lean_budget, make_inputs

case = CASES["vit21k"]
N, D, C = case["N"], case["D"], case["C"]
x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
C8, pitch = C - C % 8, (C + 7) // 8 * 8


def gemm_table():
    print("part 1: GEMMs at C = 21841 (ms, median of do_bench)")
    xd, wd = x.detach(), w.detach()
    for n in (1024, 2048, 4096):
        xs = xd[:n]
        buf = torch.randn(n, pitch, device="cuda").to(torch.bfloat16)
        rows = _gemms(xs, wd, buf[:, :C], torch.empty(n, D, device="cuda", dtype=torch.bfloat16), torch.empty_like(wd))
        flop = 2 * n * D * C
        for name, fn in rows.items():
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            print(f"  n={n:5d} {name:24s} {ms:7.3f} ms  {flop / ms / 1e9:6.0f} TFLOP/s")


def _gemms(xs, wd, du, dx, dw):
    """name -> the GEMM: ``du`` the (rows, C) logits with a padded row pitch."""
    return {
        "logits whole": lambda: torch.mm(xs, wd.T, out=du),
        "logits C8+tail": lambda: (torch.mm(xs, wd[:C8].T, out=du[:, :C8]), torch.mm(xs, wd[C8:].T, out=du[:, C8:])),
        "dX whole (K odd)": lambda: torch.mm(du, wd, out=dx),
        "dX C8 only": lambda: torch.mm(du[:, :C8], wd[:C8], out=dx),
        "dW whole (M odd)": lambda: torch.mm(du.T, xs, out=dw),
        "dW C8 only": lambda: torch.mm(du[:, :C8].T, xs, out=dw[:C8]),
        "dW addmm_ bf16 whole": lambda: dw.addmm_(du.T, xs),
        "dW addmm_ bf16 C8": lambda: dw[:C8].addmm_(du[:, :C8].T, xs),
    }  # fmt: skip


def step(impl, budget):
    x.grad = w.grad = b.grad = None
    fused_xent.linear_cross_entropy(
        x, w, y, linear_bias=b, label_smoothing=case["ls"], impl=impl, memory_budget=budget
    ).backward()


def host_table(specs):
    print("part 2: per fw+bw (ms): wall, host (no sync), GPU kernels (profiler)")
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    for label, impl, budget in specs:
        for _ in range(10):
            step(impl, budget)
        torch.cuda.synchronize()
        n = 50
        t0 = time.perf_counter()
        for _ in range(n):
            step(impl, budget)
        host = (time.perf_counter() - t0) / n * 1e3
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / n * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step(impl, budget)
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        gpu = sum(e.self_device_time_total for e in kernels) / 10 / 1e3
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(impl, budget)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        ms = do_bench(lambda impl=impl, budget=budget: step(impl, budget), warmup=50, rep=300, return_mode="median")
        print(
            f"  {label:22s} do_bench {ms:6.2f}  wall {wall:6.2f}  host {host:6.2f}  GPU {gpu:6.2f}  "
            f"launches {len(kernels) / 10:5.1f}  peak {peak:6.1f} MiB"
        )
        if os.environ.get("PROFILE_PYTHON", "1") == "1":
            py = cProfile.Profile()
            for _ in range(20):
                py.runcall(step, impl, budget)
            torch.cuda.synchronize()
            out = io.StringIO()
            pstats.Stats(py, stream=out).sort_stats("tottime").print_stats(18)
            print("\n".join(out.getvalue().splitlines()[:40]), file=sys.stderr)


if __name__ == "__main__":
    what = sys.argv[1:] or ["gemm", "host"]
    if "gemm" in what:
        gemm_table()
    if "host" in what:
        host_table([
            ("auto (one chunk)", "auto", None),
            ("lean @128 MiB", "lean", lean_budget(case)),
            ("fast @91 MB", "fast", 91_000_000),
        ])  # fmt: skip
