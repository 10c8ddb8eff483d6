"""The class-chunked backward's grad kernel (H100) per launch configuration (``GRAD_TILE``), at
the chunk of the bench's lean rows: the kernel's time per backward and bandwidth (torch.profiler,
R read and dU written in bf16), and whether the gradients are bitwise those of the default
(the barrier-free variants write dU over R in place without a barrier between reads and writes:
any race shows as a difference).
``PYTHONPATH=. python benchmarks/tune_grad.py [case ...]``"""

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from fused_xent.bench import CASES, lean_budget, make_inputs
from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.functional import _lean_chunk_bytes
from fused_xent.kernels import class_chunked

VARIANTS = [
    dict(BLOCK_C=256, num_warps=8, cols_per_program=1024, barrier=True),
    dict(BLOCK_C=256, num_warps=8, cols_per_program=1024, barrier=False),
    dict(BLOCK_C=256, num_warps=4, cols_per_program=1024, barrier=True),
    dict(BLOCK_C=512, num_warps=8, cols_per_program=2048, barrier=True),
    dict(BLOCK_C=256, num_warps=8, cols_per_program=256, barrier=True),
    dict(BLOCK_C=128, num_warps=4, cols_per_program=512, barrier=False),
]


def kernel_ms(fn) -> float:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    return sum(e.device_time_total for e in prof.key_averages() if e.key == "chunk_grad_kernel") / 3 / 1e3


def tune(name: str) -> None:
    case = CASES[name]
    x, w, y, _ = make_inputs(case, "cuda", torch.bfloat16)
    x, w = x.detach(), w.detach()
    opts = XentOptions(num_classes=case["C"], chunk_bytes=_lean_chunk_bytes(lean_budget(case), x, True, False),
                       unit_scale=True)  # fmt: skip
    rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
    scale = torch.ones(1, device="cuda")
    lse, _ = class_chunked.class_chunked_forward(x, w, None, scale, rt, opts)
    cp = torch.full_like(lse, 1.0 / x.shape[0])
    rt_g = rt.scaled(-cp)
    args = (x, w, None, scale, lse, cp, rt_g, opts, True, True, False)
    default = dict(class_chunked.GRAD_TILE)
    ref = class_chunked.class_chunked_backward(*args)
    logit_bytes = 2 * x.shape[0] * w.shape[0] * 2
    for tile in VARIANTS:
        class_chunked.GRAD_TILE = tile
        runs = [class_chunked.class_chunked_backward(*args)[:2] for _ in range(3)]
        same = all(torch.equal(a, b) for out in runs for a, b in zip(out, ref[:2], strict=True))
        k = kernel_ms(lambda: class_chunked.class_chunked_backward(*args))
        print(f"{name} {tile}: grad kernel {k:.2f} ms ({logit_bytes / k / 1e9:.2f} TB/s), bitwise as default: {same}",
              flush=True)  # fmt: skip
    class_chunked.GRAD_TILE = default


for case_name in sys.argv[1:] or ["extreme_1m", "gemma2", "llama3", "vit21k"]:
    tune(case_name)
