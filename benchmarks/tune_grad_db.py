"""The grad kernel when it also sums the bias gradient (ViT-21k head: 4096 x 768 x 21841,
smoothing 0.1, bias; lean at 128 MiB): ``class_chunked.GRAD_DB_TILE`` variants.

``PYTHONPATH=. python benchmarks/tune_grad_db.py``. Per variant: the grad kernel's device time
per fw+bw and all kernels' (torch.profiler, 10 steps), and the largest relative difference of
dX / dW / db from the first variant's (the db partials are summed in another order).
A last row takes the bias without a gradient (no db in the kernel) for comparison.
"""

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import fused_xent
from fused_xent.bench import CASES, lean_budget, make_inputs
from fused_xent.kernels import class_chunked

case = CASES["vit21k"]
x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
VARIANTS = [(1, 1024), (2, 1024), (4, 1024), (8, 1024), (4, 256), (8, 256), (16, 256), (8, 512)]


def step(bias_grad=True):
    x.grad = w.grad = b.grad = None
    b.requires_grad_(bias_grad)
    fused_xent.linear_cross_entropy(
        x, w, y, linear_bias=b, label_smoothing=case["ls"], impl="lean", memory_budget=lean_budget(case)
    ).backward()
    return [t.grad.float().clone() for t in (x, w, b) if t.grad is not None]


def kernel_ms(bias_grad=True):
    for _ in range(5):
        step(bias_grad)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step(bias_grad)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    grad = sum(e.self_device_time_total for e in kernels if "chunk_grad_kernel" in e.name) / 10 / 1e3
    return grad, sum(e.self_device_time_total for e in kernels) / 10 / 1e3


rows, base = [], None
for row_blocks, cols in VARIANTS:
    class_chunked.GRAD_DB_TILE = dict(ROW_BLOCKS=row_blocks, COLS=cols)
    grads = step()
    base = base or grads
    diff = max(float((g - r).norm() / r.norm()) for g, r in zip(grads, base, strict=True))
    grad, total = kernel_ms()
    rows.append((f"ROW_BLOCKS={row_blocks} COLS={cols}", grad, total, diff))
    print(rows[-1], flush=True)
class_chunked.GRAD_DB_TILE = dict(ROW_BLOCKS=1, COLS=1024)
grad, total = kernel_ms(bias_grad=False)
rows.append(("bias without a gradient (no db)", grad, total, float("nan")))
print("\n| grad kernel launch | grad kernel ms / step | all kernels ms / step | max rel. diff of dX, dW, db |")
print("|---|---|---|---|")
for name, grad, total, diff in rows:
    print(f"| {name} | {grad:.3f} | {total:.3f} | {diff:.1e} |")
