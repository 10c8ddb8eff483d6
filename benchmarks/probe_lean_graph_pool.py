"""Where the memory of ``LinearCrossEntropyLoss(cuda_graph=True)``'s recorded ViT-21k call goes
(session 21's experiment, commit 6f534dd; reverted after it).

Prints the bytes cuBLAS's workspaces take on a new stream (a graph is recorded on a side stream),
then records the ViT-21k lean call at the bench's lean budget and lists the segments of the
graph's private pool and their blocks.

    PYTHONPATH=. python benchmarks/probe_lean_graph_pool.py   (at 6f534dd)
"""

import torch

import fused_xent
from fused_xent.bench import CASES, lean_budget, make_inputs

MiB = 2**20
# cuBLAS workspace per new stream
a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
for _ in range(2):
    s = torch.cuda.Stream()
    before = torch.cuda.memory_allocated()
    with torch.cuda.stream(s):
        (a @ a).sum()
    torch.cuda.synchronize()
    print("workspace alloc on a new stream", (torch.cuda.memory_allocated() - before) / MiB)
case = CASES["vit21k"]
x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
m = fused_xent.LinearCrossEntropyLoss(
    impl="lean", label_smoothing=0.1, memory_budget=lean_budget(case), cuda_graph=True
)
m(x, w, y, b).backward()
torch.cuda.synchronize()
rec = m._graphs._recorded[x.device]
pool = rec.graph.pool()
print("pool id", pool, "held MiB", m.graph_bytes() / MiB)
segs = [s for s in torch.cuda.memory_snapshot() if tuple(s.get("segment_pool_id", ())) == tuple(pool)]
print("pool segments", len(segs), "total", sum(s["total_size"] for s in segs) / MiB)
for s in segs:
    blocks = [(round(bk["size"] / MiB, 2), bk["state"]) for bk in s["blocks"]]
    print(round(s["total_size"] / MiB, 2), blocks[:12])
