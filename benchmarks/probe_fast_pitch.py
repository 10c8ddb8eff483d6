"""The fast strategy's logit buffer at a row pitch of a multiple of 8 classes (rows 16-byte
aligned in bf16) against 128 (256-byte aligned), ``row_chunked.PITCH_ALIGN``, in one process on
the bench's inputs: "auto" (fast, one chunk) fw+bw (``do_bench`` median, two alternating rounds)
and, per variant, the per-kernel GPU time of a step.

    PYTHONPATH=. python benchmarks/probe_fast_pitch.py [CASE ...]
"""

import collections
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

from fused_xent.bench import fwbw_step
from fused_xent.kernels import row_chunked


def kernels(step, label: str) -> None:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    tot, cnt = collections.defaultdict(float), collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            tot[e.name[:70]] += e.device_time_total / 1e3 / 3
            cnt[e.name[:70]] += 1
    for k, v in sorted(tot.items(), key=lambda kv: -kv[1])[:5]:
        print(f"  {v:8.2f} ms/step {cnt[k] // 3:5d}/step  {k}")
    print(f"  {sum(tot.values()):8.2f} ms/step of kernels ({label})")


def main() -> None:
    for case in sys.argv[1:] or ["extreme_1m", "vit21k", "gemma2"]:
        step, _ = fwbw_step(case, "auto")
        times = {8: [], 128: []}
        for _ in range(2):
            for align in times:
                row_chunked.PITCH_ALIGN = align
                times[align].append(do_bench(step, warmup=25, rep=200, return_mode="median"))
        print(f"{case} auto (fast, one chunk): " + ", ".join(
            f"pitch {a}: {' / '.join(f'{t:.2f}' for t in ts)} ms" for a, ts in times.items()))  # fmt: skip
        for align in times:
            row_chunked.PITCH_ALIGN = align
            kernels(step, f"pitch {align}")
        row_chunked.PITCH_ALIGN = 128


if __name__ == "__main__":
    main()
