"""The host's timeline of one fused_xent fw+bw on a case of ``fused_xent.bench`` (default the
ViT-21k head): every top-level operator, Triton launch and autograd node in call order, with
its host time and the Python time before it, so that the host's cost per call can be split
into what torch's operators take, what the launches take and what our Python takes.

``PYTHONPATH=. python benchmarks/host_timeline.py auto lean@94378496 fast@44047872``
(``impl@BYTES`` sets ``memory_budget``; ``HOST_CASE=extreme_1m`` another case)."""

import cProfile
import os
import pstats
import sys

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import fused_xent
from fused_xent.bench import CASES, host_time, make_inputs

case = CASES[os.environ.get("HOST_CASE", "vit21k")]
x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)


def step(spec: str, backward: bool = True) -> None:
    impl, _, budget = spec.partition("@")
    for p in (x, w, b):
        if p is not None:
            p.grad = None
    loss = fused_xent.linear_cross_entropy(
        x, w, y, linear_bias=b, label_smoothing=case.get("ls", 0.0), impl=impl,
        memory_budget=int(budget) if budget else None,
    )  # fmt: skip
    if backward:
        loss.backward()


def host_ms(spec: str, n: int = 50, backward: bool = True) -> float:
    return host_time(lambda: step(spec, backward), n, warmup=10) * 1e3


_CONTAINERS = ("step", "autograd::engine::evaluate_function", "_Eager", "fused_xent::")


def timeline(spec: str) -> None:
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("step"):
            step(spec)
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]

    def shown(e) -> bool:  # a child of the step, of an autograd node or of our Function
        p = e.cpu_parent
        return p is not None and p.name.startswith(_CONTAINERS) and not e.name.startswith("autograd::engine")

    rows = sorted((e for e in events if shown(e)), key=lambda e: e.time_range.start)
    t0 = min(e.time_range.start for e in events if e.name == "step")
    last = t0
    own = py = 0.0
    kinds: dict[str, list[float]] = {}
    print(f"-- {spec}: start(us)  python-before(us)  host(us)  op")
    for e in rows:
        gap = max(0.0, e.time_range.start - last)
        dur = e.time_range.end - e.time_range.start
        print(f"   {e.time_range.start - t0:8.0f} {gap:7.0f} {dur:7.0f}  {e.name[:70]}")
        if e.name.startswith(_CONTAINERS):  # its children follow: the Python before them counts
            last = max(last, e.time_range.start)
            continue
        last = max(last, e.time_range.end)
        own += dur
        py += gap
        kinds.setdefault(e.name[:40], []).append(dur)
    span = last - t0
    print(f"   span {span:.0f} us: ops {own:.0f} us, python between them {py:.0f} us, {len(rows)} ops")
    for name, ds in sorted(kinds.items(), key=lambda kv: -sum(kv[1]))[:12]:
        print(f"     {name:40s} x{len(ds):3d}  {sum(ds):7.0f} us")


def python_profile(spec: str, n: int = 20) -> None:
    """cProfile's functions of fused_xent and triton's launcher by cumulative time."""
    py = cProfile.Profile()
    for _ in range(n):
        py.runcall(step, spec)
    torch.cuda.synchronize()
    stats = pstats.Stats(py)
    stats.sort_stats("cumulative").print_stats(r"fused_xent|jit.py|autograd", 30)


for arg in sys.argv[1:] or ["auto"]:
    spec, _, mode = arg.partition(":")
    fw, fwbw = host_ms(spec, backward=False), host_ms(spec)
    print(f"{spec}: host {fwbw:.2f} ms per fw+bw, {fw:.2f} per training forward (no sync, 50 steps)")
    if mode == "cprofile":
        python_profile(spec)
    elif mode == "timeline":
        timeline(spec)
