"""A/B of the streaming forward's epilogue (session 8) against the kernel it replaced, in one process.

The new epilogue (``fused_xent.kernels.linear_xent_forward``): columns past C masked in the last
class tile only, ``exp2`` of one fused multiply-add per element, and a row's target logit picked
out only in the class tile that holds some row's target (was: every tile). The old kernel is read
from a copy of its file (``--old``, default ``scratch/old_forward.py``: ``git show
590fa6f:fused_xent/kernels/linear_xent_forward.py``). Rounds alternate old / new on the same
inputs (bf16, no-grad forward, the bench cases' shapes); prints ms and the largest difference of
lse and of the target term.

    PYTHONPATH=. python benchmarks/ab_forward_epilogue.py [--old PATH] [--rounds 3]
"""

import argparse
import importlib.util
import statistics

import torch
import triton
from triton.testing import do_bench

from fused_xent.bench import CASES, make_inputs
from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.kernels import linear_xent_forward as new


def load_old(path: str):
    spec = importlib.util.spec_from_file_location("old_linear_xent_forward", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="scratch/old_forward.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variant", default=None, help="a third kernel file timed beside the two")
    parser.add_argument("--cases", nargs="*", default=["gemma2", "llama3", "extreme_1m", "vit21k"])
    args = parser.parse_args()
    old = load_old(args.old)
    variant = load_old(args.variant) if args.variant else None
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for name in args.cases:
        compare(name, CASES[name], old, args.rounds, variant)


def compare(name: str, case: dict, old, rounds: int, variant=None) -> None:
    x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
    x, w = x.detach(), w.detach()
    b = b.detach() if b is not None else None
    opts = XentOptions(num_classes=case["C"], label_smoothing=case.get("ls", 0.0), unit_scale=True)
    rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
    one = torch.ones(1, device="cuda")
    flops = 2 * case["N"] * case["D"] * case["C"]

    def call(module):
        return module.linear_xent_forward(x, w, b, one, rt, opts)

    ref, got = call(old), call(new)
    d_lse = (got[0] - ref[0]).abs().max().item()
    d_lin = (got[1] - ref[1]).abs().max().item()
    kernels = [("old", old), ("new", new)] + ([("variant", variant)] if variant else [])
    times = {label: [] for label, _ in kernels}
    for _ in range(rounds):
        for label, module in kernels:
            times[label].append(do_bench(lambda m=module: call(m), warmup=10, rep=100, return_mode="median"))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{name}: old {med['old']:6.2f} ms ({flops / med['old'] / 1e9:4.0f} TFLOP/s) rounds"
        f" {' '.join(f'{t:.2f}' for t in times['old'])} | new {med['new']:6.2f} ms"
        f" ({flops / med['new'] / 1e9:4.0f} TFLOP/s) rounds {' '.join(f'{t:.2f}' for t in times['new'])}"
        f" | max |diff| lse {d_lse:.1e} lin {d_lin:.1e}"
        + (
            f" | variant {med['variant']:6.2f} ms rounds {' '.join(f'{t:.2f}' for t in times['variant'])}"
            if variant
            else ""
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
