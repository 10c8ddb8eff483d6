"""The filtered mode's threshold against cut-cross-entropy's error (H100).

For each case and each ``FILTER_EPS_FACTOR`` (the fraction of the dtype's eps below which
a class's |p - t| counts as insignificant), ``impl="filtered"`` is timed and its gradient
errors taken against fp32 (``fused_xent.bench.run_case``, the same inputs as
``python -m fused_xent bench``), beside CCE's. Usage::

    PYTHONPATH=. python benchmarks/filter_threshold.py --out DIR [--factors 32 64 128]
"""

import argparse
import json
import os

import torch

from fused_xent import bench
from fused_xent.kernels import class_chunked

CASES = ["gemma2", "gemma2_peaked", "llama3", "extreme_1m"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--factors", nargs="*", type=int, default=[32, 64, 128])
    parser.add_argument("--cases", nargs="*", default=CASES)
    args = parser.parse_args()
    rows = []
    for name in args.cases:
        for factor in args.factors:
            class_chunked.FILTER_EPS_FACTOR = 1 / factor
            for r in bench.run_case(name, bench.CASES[name], "cuda", ["fused_xent[filtered]"]):
                rows.append(dict(r, method=f"{r['method']} eps/{factor}", eps_factor=f"1/{factor}"))
        rows += bench.run_case(name, bench.CASES[name], "cuda", ["cce"])
    env = bench.environment(["(benchmarks/filter_threshold.py)"])
    env["command"] = "PYTHONPATH=. python benchmarks/filter_threshold.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
    )
    md = bench.to_markdown(env, rows, title="filtered threshold vs CCE", err_digits=3)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "filter_threshold.json"), "w") as f:
        json.dump(dict(env=env, rows=rows), f, indent=1)
    with open(os.path.join(args.out, "filter_threshold.md"), "w") as f:
        f.write(md)
    print(md)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
