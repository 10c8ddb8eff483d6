"""Clocks and power while the GPU runs GEMM-bound work back to back (read only, nothing set).

Samples ``nvidia-smi`` every 100 ms while it runs, for ~2 s each: a plain 8192^3 bf16 GEMM
in a loop (TFLOP/s per 0.25 s window), then ``fused_xent`` lean at the Llama 3 head as the
bench times it (``do_bench`` medians, three in a row). Prints the samples' SM clock, power
and throttle reasons per phase.

With ``--heads``: one plain GEMM of each LM head, ``X @ W.T`` on the bench's own inputs
(``make_inputs``), timed as the bench times a method (``do_bench``, median); once alone after
2 s idle (the first of a few calls) and once as the bench's median. N GEMMs of that time are
the floor of a mode that needs N (lean 4, fast 3, forward only 1; CLIP's lean loss 4) on this
machine.

    PYTHONPATH=. python benchmarks/sustained_clocks.py [--heads]
"""

import subprocess
import sys
import tempfile
import time

import torch
from triton.testing import do_bench

from fused_xent.bench import CASES, fwbw_step, make_inputs

QUERY = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"


def heads() -> None:
    for name in ("gemma2", "llama3", "extreme_1m"):
        _head_gemm(name, *make_inputs(CASES[name], "cuda", torch.bfloat16)[:2])
        torch.cuda.empty_cache()
    # CLIP at B = 32768, D = 768: unit features as bench_clip.py draws them; one GEMM is s * I @ T.T
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(32768, 768, device="cuda", generator=g), dim=-1)
    texts = torch.nn.functional.normalize(images + 0.8 * torch.randn(32768, 768, device="cuda", generator=g), dim=-1)
    _head_gemm("clip32k", images.to(torch.bfloat16), texts.to(torch.bfloat16))


def _head_gemm(name: str, x: torch.Tensor, w: torch.Tensor) -> None:
    x, w = x.detach(), w.detach()
    out = torch.empty(x.shape[0], w.shape[0], device="cuda", dtype=torch.bfloat16)
    flops = 2 * x.shape[0] * x.shape[1] * w.shape[0]

    def gemm():
        torch.mm(x, w.T, out=out)

    gemm()
    torch.cuda.synchronize()
    time.sleep(2.0)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    gemm()
    stop.record()
    torch.cuda.synchronize()
    cold = start.elapsed_time(stop)
    ms = do_bench(gemm, warmup=50, rep=300, return_mode="median")
    print(f"{name:10s} X@W.T {x.shape[0]}x{x.shape[1]}x{w.shape[0]}: after 2 s idle {cold:6.2f} ms "
          f"({flops / cold / 1e9:.0f} TFLOP/s); bench median {ms:6.2f} ms ({flops / ms / 1e9:.0f} TFLOP/s); "
          f"x4 {4 * ms:.1f}, x3 {3 * ms:.1f} ms")  # fmt: skip


def main() -> None:
    if "--heads" in sys.argv:
        heads()
        return
    log = tempfile.NamedTemporaryFile("w+", suffix=".csv", delete=False)
    smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={QUERY}", "--format=csv,noheader", "-lms", "100"], stdout=log)
    marks = []
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    time.sleep(0.5)
    marks.append(("idle", time.time()))
    t_end = time.time() + 2.0
    while time.time() < t_end:
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 0.25:
            torch.mm(a, b)
            n += 1
        torch.cuda.synchronize()
        print(f"gemm 8192^3 window: {2 * 8192**3 * n / (time.perf_counter() - t0) / 1e12:.0f} TFLOP/s")
    marks.append(("gemm loop", time.time()))
    del a, b
    step, _ = fwbw_step("llama3", "lean")
    for _ in range(3):
        print(f"lean llama3 do_bench median: {do_bench(step, warmup=50, rep=300, return_mode='median'):.2f} ms")
    marks.append(("lean llama3", time.time()))
    time.sleep(0.3)
    smi.terminate()
    smi.wait()
    log.seek(0)
    text = log.read().strip()
    print(text)
    rows = [r.split(", ") for r in text.splitlines()]
    start = marks[0][1] - 0.5
    for (name, t1), (_, t0) in zip(marks, [("", start)] + marks[:-1], strict=True):
        picked = [r for r in rows if t0 <= _stamp(r[0]) < t1]
        clocks = [int(r[1].split()[0]) for r in picked]
        power = [float(r[2].split()[0]) for r in picked]
        reasons = sorted({r[4] for r in picked})
        if clocks:
            med = sorted(clocks)[len(clocks) // 2]
            print(f"{name:12s} samples {len(picked):3d}  SM MHz {min(clocks)}-{max(clocks)} (median {med})  "
                  f"power W {min(power):.0f}-{max(power):.0f}  reasons {reasons}")  # fmt: skip


def _stamp(text: str) -> float:
    return time.mktime(time.strptime(text.split(".")[0], "%Y/%m/%d %H:%M:%S")) + float("0." + text.split(".")[1])


if __name__ == "__main__":
    main()
