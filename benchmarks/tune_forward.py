"""Tile sweep of the streaming forward kernel (no-grad path) at the Gemma 2 head shape.
``PYTHONPATH=. python benchmarks/tune_forward.py`` prints ms and TFLOP/s per configuration."""

import math

import torch
from triton.testing import do_bench

import fused_xent
from fused_xent.kernels import config

N, D, C = 8192, 2304, 256000
g = torch.Generator(device="cuda").manual_seed(0)
x = torch.randn(N, D, device="cuda", generator=g).bfloat16()
w = (torch.randn(C, D, device="cuda", generator=g) / math.sqrt(D)).bfloat16()
y = torch.randint(0, C, (N,), device="cuda", generator=g)
CONFIGS = [
    dict(BLOCK_N=128, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_C=256, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=256, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3),
    dict(BLOCK_N=128, BLOCK_C=256, BLOCK_D=64, num_warps=8, num_stages=4),
    dict(BLOCK_N=128, BLOCK_C=128, BLOCK_D=128, num_warps=8, num_stages=3),
    dict(BLOCK_N=256, BLOCK_C=128, BLOCK_D=64, num_warps=16, num_stages=3),
    dict(BLOCK_N=128, BLOCK_C=256, BLOCK_D=32, num_warps=8, num_stages=5),
]
ref = None
for cfg in CONFIGS:
    config.forward_blocks = lambda device, cfg=cfg: dict(cfg)
    try:
        with torch.no_grad():
            loss = fused_xent.linear_cross_entropy(x, w, y)
            ref = loss if ref is None else ref
            ms = do_bench(lambda: fused_xent.linear_cross_entropy(x, w, y), warmup=50, rep=300, return_mode="median")
        print(f"{cfg}  {ms:.2f} ms  {2 * N * D * C / ms / 1e9:.0f} TFLOP/s  loss diff {abs(loss - ref).item():.1e}")
    except Exception as e:
        print(cfg, "error", type(e).__name__, str(e)[:100])

# The alternative for calls without a backward: cuBLAS chunks of <= 15 MiB plus the stats kernel.
from fused_xent.formulation import XentOptions, build_row_targets  # noqa: E402
from fused_xent.kernels.class_chunked import class_chunked_forward_only  # noqa: E402

opts = XentOptions(num_classes=C)
rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
one = torch.ones(1, device="cuda")
torch.cuda.synchronize()
base = torch.cuda.memory_allocated()
torch.cuda.reset_peak_memory_stats()
lse, _ = class_chunked_forward_only(x, w, None, one, rt, opts)
torch.cuda.synchronize()
peak = (torch.cuda.max_memory_allocated() - base) / 2**20
ms = do_bench(lambda: class_chunked_forward_only(x, w, None, one, rt, opts), warmup=50, rep=300, return_mode="median")
ref_lse = torch.logsumexp(x.float() @ w.float().T, -1)
err = ((lse - ref_lse).norm() / ref_lse.norm()).item()
tflops = 2 * N * D * C / ms / 1e9
print(f"class-chunked forward-only  {ms:.2f} ms  {tflops:.0f} TFLOP/s  peak {peak:.1f} MiB  lse err {err:.1e}")
