"""Device memory a CUDA-graphed ViT-21k head keeps (``torch.compile(mode="reduce-overhead")``):
in a fresh process, the reserved memory after recording and ``empty_cache`` (which returns
every cached block no live graph pool holds), less what was reserved before the first call,
less the gradients themselves; and the median fw+bw.

``PYTHONPATH=. python benchmarks/vit_graph_pool.py IMPL [BUDGET]`` (one method per process: the
graphs of one compiled function share their pool with any other's in the same process)."""

import sys

import torch
from triton.testing import do_bench

import fused_xent
from fused_xent.bench import CASES, lean_budget, make_inputs

case = CASES["vit21k"]
impl = sys.argv[1]
budget = {"lean": lean_budget(case), "none": None}.get(sys.argv[2] if len(sys.argv) > 2 else "none")
x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)


def loss_fn(xx, ww, yy, bb):
    return fused_xent.linear_cross_entropy(xx, ww, yy, linear_bias=bb, label_smoothing=case["ls"], impl=impl,
                                           memory_budget=budget)  # fmt: skip


fn = torch.compile(loss_fn, mode="reduce-overhead", dynamic=False)


def step():
    x.grad = w.grad = b.grad = None
    fn(x, w, y, b).backward()


torch.cuda.synchronize()
torch.cuda.empty_cache()
before = torch.cuda.memory_reserved()
for _ in range(4):
    step()
torch.cuda.synchronize()
grads = sum(t.grad.numel() * t.grad.element_size() for t in (x, w, b))
torch.cuda.empty_cache()
held = (torch.cuda.memory_reserved() - before - grads) / 2**20
ms = do_bench(step, warmup=50, rep=300, return_mode="median")
print(f"{impl} budget {budget}: {ms:.3f} ms, graph pool held beyond the gradients {held:.1f} MiB")
