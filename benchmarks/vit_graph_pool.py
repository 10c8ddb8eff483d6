"""Device memory a CUDA-graphed ViT-21k head keeps (``torch.compile(mode="reduce-overhead")``):
in a fresh process, the reserved memory after recording and ``empty_cache`` (which returns
every cached block no live graph pool holds), less what was reserved before the first call,
less the gradients themselves; and the median fw+bw.

``PYTHONPATH=. python benchmarks/vit_graph_pool.py IMPL [BUDGET]`` (one method per process: the
graphs of one compiled function share their pool with any other's in the same process). BUDGET:
"lean" (the bench's lean budget), "none" (the default), or a number of MiB."""

import sys

import torch
from triton.testing import do_bench

import fused_xent
from fused_xent.bench import CASES, lean_budget, make_inputs

case = CASES["vit21k"]
impl = sys.argv[1]
arg = sys.argv[2] if len(sys.argv) > 2 else "none"
budget = {"lean": lean_budget(case), "none": None}[arg] if arg in ("lean", "none") else int(float(arg) * 2**20)
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
# where the reserved memory is: per pool (0, 0) is the default allocator's, others are graph pools
pools: dict = {}
for seg in torch.cuda.memory_snapshot():
    entry = pools.setdefault(tuple(seg["segment_pool_id"]), [0, 0, []])
    entry[0] += seg["total_size"]
    entry[1] += seg["allocated_size"]
    entry[2] += [blk["size"] for blk in seg["blocks"] if blk["state"] == "active_allocated"]
for pool, (total, active, sizes) in pools.items():
    top = ", ".join(f"{s / 2**20:.1f}" for s in sorted(sizes, reverse=True)[:8])
    print(f"  pool {pool}: reserved {total / 2**20:.1f} MiB, live {active / 2**20:.1f} MiB; largest live (MiB): {top}")
print(f"  gradients {grads / 2**20:.1f} MiB")
