"""Per-kernel GPU time of lean's fw+bw at the 1M head (the bench's budget), 5 profiled steps after 20.

PYTHONPATH=. python benchmarks/prof_lean_step.py LABEL
(``prof_onepass_first.log`` was printed by session 11's form of this script, with its own loop.)
"""

import sys

from probe_chunk_plan import kernels

from fused_xent.bench import fwbw_step

if __name__ == "__main__":
    step, _ = fwbw_step("extreme_1m", "lean")
    kernels(step, sys.argv[1], warmup=20, steps=5, top=8)
