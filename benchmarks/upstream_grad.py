"""fw+bw of fused_xent on a bench case with the loss's upstream gradient 1 (``loss.backward()``,
what the bench runs) and 0.5 (``(loss * 0.5).backward()``, as under gradient accumulation), and
the pass that scales a dW of the case's size in place by a device scalar: ``mul_`` against
``kernels.scaling.scale_`` where the package has it.

    PYTHONPATH=. python benchmarks/upstream_grad.py CASE[,CASE...] IMPL[,IMPL...]

Each method takes the bench's memory budget for its column (``bench.methods``). Medians of
``triton.testing.do_bench`` (warm-up 50, 300 ms), as the bench.
"""

import sys

import torch
from triton.testing import do_bench

from fused_xent import bench


def _time(fn) -> float:
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def _scale_pass(w: torch.Tensor) -> tuple[float, float, float]:
    """``(mul_, scale_ at g = 1, scale_ at g = 0.5)`` ms on a tensor shaped as ``w``."""
    dw = torch.randn_like(w)
    g_half = torch.tensor(0.5, device="cuda")
    mul = _time(lambda: dw.mul_(g_half))
    try:
        from fused_xent.kernels.scaling import scale_
    except ImportError:
        return mul, float("nan"), float("nan")
    one, half = torch.ones(1, device="cuda"), torch.full((1,), 0.5, device="cuda")
    return mul, _time(lambda: scale_(dw, one)), _time(lambda: scale_(dw, half))


def _case(name: str, impls: list[str]) -> None:
    case = bench.CASES[name]
    x, w, y, b = bench.make_inputs(case, "cuda", torch.bfloat16)
    params = [p for p in (x, w, b) if p is not None]
    methods = bench.methods(case, "cuda")
    passes = _scale_pass(w)
    for impl in impls:
        fn = methods[f"fused_xent[{impl}]"]
        times = []
        for g in (None, torch.tensor(0.5, device="cuda")):

            def step(fn=fn, g=g):
                for p in params:
                    p.grad = None
                loss = fn(x, w, y, b, case.get("ls", 0.0))
                (loss if g is None else loss * g).backward()

            times.append(_time(step))
        cells = " | ".join(f"{t:.3f}" for t in passes)
        print(f"| {name} | {impl} | {times[0]:.2f} | {times[1]:.2f} | {cells} |", flush=True)
        torch.cuda.empty_cache()


def main() -> None:
    import fused_xent

    cases, impls = sys.argv[1].split(","), sys.argv[2].split(",")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, package {fused_xent.__file__}")
    print("| case | method | g = 1 ms | g = 0.5 ms | dW mul_ ms | dW scale_ g=1 ms | dW scale_ g=0.5 ms |")
    print("|---|---|---|---|---|---|---|")
    for name in cases:
        _case(name, impls)


if __name__ == "__main__":
    main()
