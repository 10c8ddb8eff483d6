"""Is the host ahead of the GPU? For back-to-back fused_xent fw+bw calls of a bench case.

``gpu_gaps.py`` showed lean's calls at Llama 3 taking ~2.9 ms more wall time each than the GPU's
span of one call, with no gap inside a call. This profiles three calls and, from the trace's
correlation ids, gives for each kernel the time between its launch on the host and its start
on the GPU (the queue ahead of it). A kernel that starts within a few microseconds of its
launch found the GPU idle: the host was behind. It prints the gaps between calls, the
host-side calls that blocked longest (synchronisations, allocations) and the kernels that
found an empty queue.

    PYTHONPATH=. python benchmarks/host_lag.py CASE IMPL [BUDGET_MIB]
"""

import json
import os
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from fused_xent.bench import fwbw_step


def main() -> None:
    name, impl = sys.argv[1], sys.argv[2]
    call, budget = fwbw_step(name, impl, int(sys.argv[3]) if len(sys.argv) > 3 else None)

    def step():
        with torch.profiler.record_function("## call"):
            call()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    launches = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    kernels = sorted(
        (e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"]
    )
    calls = sorted(
        (e for e in events if e.get("name") == "## call" and e.get("cat") == "user_annotation"), key=lambda e: e["ts"]
    )
    blocking = sorted((e for e in events if e.get("cat") == "cuda_runtime"), key=lambda e: -e["dur"])[:8]
    print(f"# {name} {impl} budget {budget}")
    for i, c in enumerate(calls):
        inside = [
            k
            for k in kernels
            if c["ts"] <= launches.get(k["args"].get("correlation"), {"ts": -1})["ts"] <= c["ts"] + c["dur"]
        ]
        if not inside:
            continue
        first, last = inside[0], inside[-1]
        starved = [k for k in inside if k["ts"] - launches[k["args"]["correlation"]]["ts"] < 20]
        print(f"call {i}: host {c['dur'] / 1e3:.2f} ms; GPU first kernel {(first['ts'] - c['ts']) / 1e3:.2f} ms after "
              f"the call began, last ends {(last['ts'] + last['dur'] - c['ts']) / 1e3:.2f} ms after; {len(inside)} "
              f"kernels, {len(starved)} started < 20 us after their launch")  # fmt: skip
        for k in starved[:6]:
            lag = k["ts"] - launches[k["args"]["correlation"]]["ts"]
            print(f"   starved: {k['name'][:70]}  at {(k['ts'] - c['ts']) / 1e3:.2f} ms, launch->start {lag:.1f} us")
    for a, b2 in zip(calls, calls[1:], strict=False):
        print(f"host: call ends {(a['ts'] + a['dur']) / 1e3:.2f}, next begins {b2['ts'] / 1e3:.2f} ms")
    for e in blocking:
        print(f"longest runtime call: {e['name'][:40]:40s} {e['dur'] / 1e3:.3f} ms")


if __name__ == "__main__":
    main()
