"""Where the GPU waits during one fused_xent fw+bw: the gaps between consecutive kernels.

One call of a case of ``fused_xent.bench`` (after warm-up calls, back to back as ``do_bench``
runs them) under torch.profiler. Prints the call's wall time, the GPU's busy time (the union of
kernel intervals), the idle time by phase, and the largest gaps with the kernels on either
side; ``--list`` lists every kernel outside the forward's chunk loop.

Session 9 (``benchmarks/NVIDIA-H100-80GB-HBM3/gpu_gaps*.log``): at Gemma 2 and Llama 3 the filtered
backward's gathered pieces ran their recompute and dX GEMMs on cutlass ``align1`` / ``align2``
kernels (odd widths; now padded, ``class_chunked._gathered_rows``); at 1M classes filtered leaves
the GPU idle ~3 ms per call in small launches before the first GEMM and after the count sync.

    PYTHONPATH=. python benchmarks/gpu_gaps.py CASE IMPL [BUDGET_MIB] [--list [--all]]
    (e.g. extreme_1m filtered 1100; BUDGET_MIB as the bench's lean column: the peak it allows)
"""

import sys
import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from fused_xent.bench import fwbw_step


def second_call_kernels(step) -> list[tuple[float, float, str]]:
    """``(start_us, end_us, name)`` of every kernel of the second of two profiled calls of
    ``step``, in start order (two back to back, as ``do_bench`` runs them)."""
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        step()
        torch.cuda.synchronize()
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == DeviceType.CUDA
    )
    return kernels[len(kernels) // 2 :]  # from the first kernel after the first call's last one


def main() -> None:
    name, impl = sys.argv[1], sys.argv[2]
    peak = int(sys.argv[3]) if len(sys.argv) > 3 and sys.argv[3].isdigit() else None
    step, budget = fwbw_step(name, impl, peak)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    per_call = (time.perf_counter() - t0) / 10 * 1e3
    kernels = second_call_kernels(step)
    # one pass: each kernel with the GPU's idle time before it and its phase (before the forward's
    # first stats kernel, the forward's chunk loop, after its last stats kernel)
    stats = [k[0] for k in kernels if "stats_kernel" in k[2]]

    def phase(start: float) -> str:
        if not stats or start > stats[-1]:
            return "backward"
        return "prologue" if start < stats[0] else "forward chunks"

    timeline, busy, end, prev = [], 0.0, kernels[0][0], "(start)"
    for start, stop, kname in kernels:
        timeline.append((max(0.0, start - end), stop - start, kname, prev, phase(start)))
        busy += max(0.0, stop - max(start, end))
        end, prev = max(end, stop), kname
    span = (kernels[-1][1] - kernels[0][0]) / 1e3
    phases = {"prologue": [0.0, 0], "forward chunks": [0.0, 0], "backward": [0.0, 0]}
    for gap, _, _, _, key in timeline:
        phases[key][0] += gap
        phases[key][1] += 1
    if "--list" in sys.argv:  # every kernel (``--all``) or those outside the forward's chunk loop
        for gap, run, kname, _, key in timeline:
            if key != "forward chunks" or "--all" in sys.argv:
                print(f"  gap {gap:7.1f} us  run {run:7.1f} us  {key[:8]:8s}  {kname[:90]}")
    idle = ", ".join(f"{k} {v[0] / 1e3:.2f} over {v[1]} kernels" for k, v in phases.items())
    print(f"# idle by phase (ms): {idle}")
    print(f"# {name} {impl} budget {budget}: {per_call:.2f} ms per call (10 back to back); profiled call: "
          f"{span:.2f} ms from first to last kernel, GPU busy {busy / 1e3:.2f} ms, idle {span - busy / 1e3:.2f} ms, "
          f"{len(kernels)} kernels")  # fmt: skip
    print(f"# the next call starts after the last kernel; per-call wall minus GPU span: {per_call - span:.2f} ms")
    for gap, _, after, before, _ in sorted(timeline, reverse=True)[:15]:
        print(f"gap {gap / 1e3:7.3f} ms  after {before[:60]:60s}  before {after[:60]}")


if __name__ == "__main__":
    main()
