"""A/B of copies of the streaming forward's module (``linear_xent_forward.py``) in one process.

Each argument is a path to a copy of ``fused_xent/kernels/linear_xent_forward.py`` with a change
to its kernel, or ``production`` (the package's own). Rounds alternate the kernels on the same
inputs (bf16, no-grad forward, the bench cases' shapes); prints the median ms, TFLOP/s, every
round, and the largest difference of lse and of the target term from the first kernel's.

Session 8 measured three candidate epilogues this way (``ab_forward_epilogue.log``, with each
candidate's diff): none beat the kernel of session 7, which stays.

    PYTHONPATH=. python benchmarks/ab_forward_epilogue.py production PATH [PATH ...] [--rounds 3]
"""

import argparse
import importlib.util
import statistics

import torch
import triton
from triton.testing import do_bench

from fused_xent.bench import CASES, make_inputs
from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.kernels import linear_xent_forward as production


def load(path: str):
    if path == "production":
        return production
    spec = importlib.util.spec_from_file_location(f"candidate_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kernels", nargs="+", help="'production' or paths to copies of linear_xent_forward.py")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cases", nargs="*", default=["gemma2", "llama3", "extreme_1m", "vit21k"])
    args = parser.parse_args()
    kernels = [(path, load(path)) for path in args.kernels]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    for name in args.cases:
        compare(name, CASES[name], kernels, args.rounds)


def compare(name: str, case: dict, kernels: list, rounds: int) -> None:
    x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
    x, w = x.detach(), w.detach()
    b = b.detach() if b is not None else None
    opts = XentOptions(num_classes=case["C"], label_smoothing=case.get("ls", 0.0), unit_scale=True)
    rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
    one = torch.ones(1, device="cuda")
    flops = 2 * case["N"] * case["D"] * case["C"]

    def call(module):
        return module.linear_xent_forward(x, w, b, one, rt, opts)

    ref = call(kernels[0][1])
    times = {label: [] for label, _ in kernels}
    for _ in range(rounds):
        for label, module in kernels:
            times[label].append(do_bench(lambda m=module: call(m), warmup=10, rep=100, return_mode="median"))
    for label, module in kernels:
        got = call(module)
        ms = statistics.median(times[label])
        print(
            f"{name} {label}: {ms:6.2f} ms ({flops / ms / 1e9:4.0f} TFLOP/s), rounds"
            f" {' '.join(f'{t:.2f}' for t in times[label])}; max |diff| from the first: lse"
            f" {(got[0] - ref[0]).abs().max().item():.1e}, lin {(got[1] - ref[1]).abs().max().item():.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
