"""The fast backward's in-place scaling of the stored gradients on the H100: ``Tensor.mul_`` by a
device scalar against ``row_chunked.scale_in_place``'s Triton pass, alone on a Gemma-2-sized dW
and inside fw + bw of ``impl="fast"`` on the bench cases (one chunk, and SPEC's budget for
Gemma 2); do_bench medians, gradients compared bitwise.

    PYTHONPATH=. python benchmarks/tune_scale.py [case ...]
"""

import sys

import torch
from triton.testing import do_bench

import fused_xent
from fused_xent.bench import CASES, fast_budget, make_inputs
from fused_xent.kernels import row_chunked

DEFAULT = row_chunked.MIN_TRITON_SCALE
MODES = (("mul_", 2**62), ("triton", DEFAULT), ("mul_ again", 2**62), ("triton again", DEFAULT))


def alone() -> None:
    dw = torch.randn(256000, 2304, device="cuda").bfloat16()
    factor = torch.tensor(1.0, device="cuda")
    for label, fn in (("mul_", lambda: dw.mul_(factor)), ("triton", lambda: row_chunked.scale_in_place(dw, factor))):
        ms = do_bench(fn, return_mode="median")
        print(f"dW 256000 x 2304 bf16 scaled by {label}: {ms:.3f} ms ({2 * dw.numel() * 2 / ms / 1e9:.2f} TB/s)")


def in_fast(name: str) -> None:
    case = CASES[name]
    x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
    params = [p for p in (x, w, b) if p is not None]
    budgets = [("one chunk", 2**40)] + ([("SPEC budget", fast_budget(case))] if name == "gemma2" else [])
    for label, budget in budgets:

        def step(budget=budget):
            for p in params:
                p.grad = None
            fused_xent.linear_cross_entropy(
                x, w, y, linear_bias=b, label_smoothing=case.get("ls", 0.0), impl="fast", memory_budget=budget
            ).backward()

        reference = None
        for mode, threshold in MODES:
            row_chunked.MIN_TRITON_SCALE = threshold
            step()
            grads = [p.grad.clone() for p in params]
            reference = reference or grads
            same = all(torch.equal(a, r) for a, r in zip(grads, reference, strict=True))
            ms = do_bench(step, return_mode="median")
            print(f"{name} {label} fast, scaling by {mode}: {ms:.2f} ms (bitwise as mul_'s: {same})", flush=True)
        row_chunked.MIN_TRITON_SCALE = DEFAULT


print(torch.cuda.get_device_name(), torch.__version__)
alone()
for case_name in sys.argv[1:] or ["gemma2", "llama3", "extreme_1m", "vit21k"]:
    in_fast(case_name)
