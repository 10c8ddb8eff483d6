"""Lean's ViT-21k fw+bw recorded as one CUDA graph: what it costs, and what it holds.

SPEC's ViT-21k row (4096 x 768 x 21841, smoothing 0.1, bias, bf16) asks for <= 1.6 ms at
<= 128 MiB; lean's GPU work is ~1.35 ms but its eager call is host-bound (2-3 ms). Here the
loss and ``torch.autograd.grad`` of it are recorded once into a graph on static copies of the
rows and labels (the weight and bias are the parameters themselves), and a step is: copy the
rows and labels in, replay, and hand out fresh gradients (the static ones times the upstream
gradient, as a module must: autograd may keep what it is given). For each lean chunk budget:
the graph's memory (reserved by its private pool after recording, less before), the step's
peak beyond what was allocated before it, the median step (``do_bench``), the host time per
step, and the gradients against eager lean's.

    PYTHONPATH=. python benchmarks/probe_lean_graph.py
"""

import torch
from triton.testing import do_bench

import fused_xent
from fused_xent import functional
from fused_xent.bench import CASES, host_time, lean_budget, make_inputs

MiB = 2**20
_spare_bytes = functional._spare_bytes


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def graph_row(x, w, y, b, ls, ref, budget_mib: int, spare: bool) -> tuple:
    """One row of the table: lean at a ``budget_mib`` chunk budget, recorded as one graph;
    ``spare``: whether lean's training forward widens its chunks by the gradients' bytes
    (off: forward and backward chunks of one size, which the graph's pool may share)."""
    functional._spare_bytes = _spare_bytes if spare else lambda *_: 0
    xs = x.detach().clone().requires_grad_()
    ys = y.clone()
    g_out = torch.ones((), device="cuda")

    def body(budget=budget_mib * MiB):
        loss = fused_xent.linear_cross_entropy(xs, w, ys, linear_bias=b, label_smoothing=ls, impl="lean",
                                               memory_budget=budget)  # fmt: skip
        return (loss, *torch.autograd.grad(loss, (xs, w, b)))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            body()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    reserved0 = torch.cuda.memory_reserved()
    alloc0 = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = body()
    torch.cuda.synchronize()
    capture_peak = (torch.cuda.max_memory_allocated() - alloc0) / MiB
    torch.cuda.empty_cache()
    held = (torch.cuda.memory_reserved() - reserved0 + xs.nbytes + ys.nbytes) / MiB  # with the static inputs

    def step():
        xs.detach().copy_(x.detach())
        ys.copy_(y)
        graph.replay()
        return [o * g_out for o in outs]

    got = step()
    errs = [rel(g, r) for g, r in zip(got[1:], ref, strict=True)]
    del got
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = step()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - before) / MiB
    del got
    t = do_bench(step, warmup=50, rep=300, return_mode="median")
    h = host_time(step)
    name = f"graph lean{'' if spare else ', no spare'} (capture peak {capture_peak:.0f})"
    functional._spare_bytes = _spare_bytes
    return name, budget_mib, held, extra, t, h * 1e3, max(errs[:2]), errs[2]


def main() -> None:
    case = CASES["vit21k"]
    x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
    ls = case["ls"]
    eager_budget = lean_budget(case)

    def eager_step():
        for p in (x, w, b):
            p.grad = None
        fused_xent.linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=ls, impl="lean",
                                        memory_budget=eager_budget).backward()  # fmt: skip

    eager_step()
    ref = [p.grad.clone() for p in (x, w, b)]
    torch.cuda.synchronize()
    t_eager = do_bench(eager_step, warmup=50, rep=300, return_mode="median")
    h_eager = host_time(eager_step)
    rows = [("eager lean", eager_budget / MiB, float("nan"), float("nan"), t_eager, h_eager * 1e3, 0.0, 0.0)]
    for p in (x, w, b):
        p.grad = None
    for _ in range(2):
        rows += [graph_row(x, w, y, b, ls, ref, mib, spare) for mib in (48, 40, 32) for spare in (True, False)]
    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__}")
    print(
        "| variant | chunk budget MiB | graph holds MiB | step extra MiB | held + extra | ms | host ms | dX, dW | db |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, bud, held, extra, t, h, e, eb in rows:
        cells = f"{bud:.0f} | {held:.0f} | {extra:.0f} | {held + extra:.0f} | {t:.3f} | {h:.3f} | {e:.1e} | {eb:.1e}"
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
