"""Lean's chunk plan, variant by variant, in one process on the bench's inputs and budgets.

Variants (``variant``): "old", the buffer's chunks in both passes; "new", the training forward
holds the gradients' bytes as logits (``functional._spare_bytes``) and the backward its logits in
dW's rows past each chunk (``class_chunked._dw_ranges``); "new8", the same at widths of
multiples of 8 instead of ``CHUNK_ALIGN``. fw+bw time (``do_bench`` median, two alternating
rounds) and per-kernel GPU time per step; at the 1M head, the backward's two GEMMs of one chunk
alone at several chunk widths K.

    PYTHONPATH=. python benchmarks/probe_chunk_plan.py [CASE ...]
"""

import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from fused_xent import functional
from fused_xent.bench import fwbw_step
from fused_xent.kernels import class_chunked

SPARE, DW_RANGES, ALIGN = functional._spare_bytes, class_chunked._dw_ranges, class_chunked.CHUNK_ALIGN


def variant(name: str) -> None:
    """ "old": the buffer's chunks in both passes; "new": the chunk plan; "new8": the chunk plan
    with widths of multiples of 8 (rows 16-byte aligned) instead of ``CHUNK_ALIGN``."""
    functional._spare_bytes = (lambda *a: 0) if name == "old" else SPARE
    old_ranges = lambda C, cc, *a: class_chunked._chunk_ranges(C, cc)  # noqa: E731
    class_chunked._dw_ranges = old_ranges if name == "old" else DW_RANGES
    class_chunked.CHUNK_ALIGN = 8 if name == "new8" else ALIGN


def kernels(step, label: str, warmup: int = 5, steps: int = 3, top: int = 7) -> None:
    """GPU time per step of each kernel over ``steps`` profiled steps (the ``top`` largest), then
    their sum; also ``prof_lean_step.py``'s."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    tot, cnt = collections.defaultdict(float), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name[:70]] += e.device_time_total / 1e3 / steps
            cnt[e.name[:70]] += 1
    for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {v:8.2f} ms/step {cnt[k] // steps:5d}/step  {k}")
    print(f"  {sum(tot.values()):8.2f} ms/step of kernels ({label})")


def gemms(N: int = 4096, D: int = 512) -> None:
    """The backward's two GEMMs of one chunk at the 1M head, per chunk width K."""
    g = torch.Generator(device="cuda").manual_seed(0)
    acc = torch.randn(N, D, device="cuda", generator=g)
    xb = acc.to(torch.bfloat16)
    for K in (13344, 13696, 27392, 54784, 111104):
        du = torch.randn(N, K, device="cuda", generator=g).to(torch.bfloat16)
        wk = torch.randn(K, D, device="cuda", generator=g).to(torch.bfloat16)
        dwk = torch.empty_like(wk)
        t_add = do_bench(lambda du=du, wk=wk: torch.addmm(acc, du, wk, out_dtype=torch.float32, out=acc), rep=100)
        t_mm = do_bench(lambda du=du, wk=wk: torch.mm(du, wk, out_dtype=torch.float32, out=acc), rep=100)
        t_dw = do_bench(lambda du=du, dwk=dwk: torch.mm(du.T, xb, out=dwk), rep=100)
        print(f"  K = {K:6d}: dX addmm {t_add:.3f} ms ({2 * N * D * K / t_add / 1e9:.0f} TFLOP/s), mm {t_mm:.3f}; "
              f"dW mm {t_dw:.3f}; per 1M classes: addmm {t_add * 1e6 / K:.2f} ms, dW {t_dw * 1e6 / K:.2f}")  # fmt: skip


def main() -> None:
    cases = sys.argv[1:] or ["extreme_1m", "llama3", "gemma2"]
    for case in cases:
        step, budget = fwbw_step(case, "lean")
        names = ["old", "new", "new8"]
        times = {n: [] for n in names}
        for _ in range(2):
            for n in names:
                variant(n)
                times[n].append(do_bench(step, warmup=25, rep=200, return_mode="median"))
        print(f"{case} lean at the bench's budget ({budget} B): " + ", ".join(
            f"{n} {' / '.join(f'{t:.2f}' for t in ts)}" for n, ts in times.items()))  # fmt: skip
        for n in names:
            variant(n)
            kernels(step, n)
        if case == "extreme_1m":
            gemms()
        variant("new")


if __name__ == "__main__":
    main()
