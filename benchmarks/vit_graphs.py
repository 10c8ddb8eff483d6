"""The ViT-21k head (4096 x 768 x 21841, smoothing 0.1, bias) eager and under CUDA graphs
(``torch.compile(mode="reduce-overhead")``, the way a training loop removes launch overhead).

``PYTHONPATH=. python benchmarks/vit_graphs.py [method ...] [--kernels]``. Per method: the median fw+bw (do_bench), the
peak memory of the first calls from a clean allocator (a graph's private pool is allocated
there and stays), the steady-state peak of one later call, and the gradient errors against an
fp32 reference on fresh inputs after the graphs were recorded (so a replay that read stale
inputs would show). Then the kernel table of lean at 128 MiB (where its GPU time goes).
"""

import math
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import fused_xent
from fused_xent.bench import CASES, lean_budget, make_inputs

case = CASES["vit21k"]
N, D, C, LS = case["N"], case["D"], case["C"], case["ls"]
LEAN = lean_budget(case)
FAST = 91_000_000


def eager(x, w, y, b):
    return F.cross_entropy(F.linear(x, w, b).float(), y, label_smoothing=LS)


def fused(impl, budget):
    def fn(x, w, y, b):
        return fused_xent.linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=LS, impl=impl,
                                               memory_budget=budget)  # fmt: skip

    return fn


def methods():
    ro = dict(mode="reduce-overhead", dynamic=False)
    return {
        "torch_compile": torch.compile(eager, dynamic=False),
        "torch_compile ro": torch.compile(eager, **ro),
        "fused auto": fused("auto", None),
        "fused lean@128": fused("lean", LEAN),
        "fused fast@91MB": fused("fast", FAST),
        "fused auto ro": torch.compile(fused("auto", None), **ro),
        "fused lean@128 ro": torch.compile(fused("lean", LEAN), **ro),
        "fused fast@91MB ro": torch.compile(fused("fast", FAST), **ro),
    }


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def main():
    x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
    params = (x, w, b)

    def step(fn):
        for p in params:
            p.grad = None
        loss = fn(x, w, y, b)
        loss.backward()
        return loss

    rows = []
    only = [a for a in sys.argv[1:] if not a.startswith("--")]
    for name, fn in methods().items():
        if only and name not in only:
            continue
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        base_reserved = torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(4):  # warm-up and recording
            step(fn)
        torch.cuda.synchronize()
        first_peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        held = (torch.cuda.memory_allocated() - base) / 2**20  # gradients + whatever stays (pools)
        reserved = (torch.cuda.memory_reserved() - base_reserved) / 2**20
        for p in params:
            p.grad = None
        torch.cuda.synchronize()
        base2 = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fn)
        torch.cuda.synchronize()
        steady_peak = (torch.cuda.max_memory_allocated() - base2) / 2**20
        ms = do_bench(lambda fn=fn: step(fn), warmup=50, rep=300, return_mode="median")
        # fresh inputs in place (same storage, as parameters are updated by an optimizer)
        with torch.no_grad():
            g = torch.Generator(device="cuda").manual_seed(len(rows) + 1)
            x.copy_(torch.randn(N, D, device="cuda", generator=g))
            w.copy_(torch.randn(C, D, device="cuda", generator=g) / math.sqrt(D))
            b.copy_(0.1 * torch.randn(C, device="cuda", generator=g))
            y.copy_(torch.randint(0, C, (N,), device="cuda", generator=g))
        loss = step(fn)
        got = [loss.detach()] + [p.grad.clone() for p in params]
        ref_leaves = [p.detach().float().requires_grad_() for p in params]
        ref = F.cross_entropy(F.linear(*ref_leaves), y, label_smoothing=LS)
        ref.backward()
        errs = [rel(got[0], ref)] + [rel(gg, r.grad) for gg, r in zip(got[1:], ref_leaves, strict=True)]
        rows.append((name, ms, first_peak, steady_peak, held, reserved, *errs))
        print(f"{name:22s} {ms:6.3f} ms  first-calls peak {first_peak:7.1f}  steady peak {steady_peak:7.1f}  "
              f"held {held:6.1f}  reserved {reserved:7.1f} MiB  errs {' '.join(f'{e:.1e}' for e in errs)}",
              flush=True)  # fmt: skip
    if "--kernels" in sys.argv:
        from torch.profiler import ProfilerActivity, profile

        for impl, budget in (("lean", LEAN), ("fast", FAST)):
            fn = fused(impl, budget)
            for _ in range(5):
                step(fn)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    step(fn)
                torch.cuda.synchronize()
            print(f"{impl} at {budget} bytes, 10 steps:")
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=22, max_name_column_width=60))
    print("\n| method | fw+bw ms | peak MiB (first calls) | steady peak | held after | reserved | loss err | dX err "
          "| dW err | db err |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ms, fp, sp, held, res, *errs in rows:
        cells = [f"{ms:.3f}", f"{fp:.1f}", f"{sp:.1f}", f"{held:.1f}", f"{res:.1f}"] + [f"{e:.1e}" for e in errs]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
