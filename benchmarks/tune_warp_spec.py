"""The streaming forward (no-grad) warp-specialised, against production's, on the bench's cases.

Triton 3.6 runs a warp-specialisation pass on Hopper (``tl.range(..., warp_specialize=True)``);
its docstring still says Blackwell only, and session 7 read the persistent-matmul tutorial the
same way. Compiled for sm_90 (no GPU needed, ``scratch``-style check), the production forward
kernel's class-tile loop splits with ``num_warps=4`` into a producer warp group (the TMA loads)
and two consumer groups, each owning half of the tile's rows: its MMAs and its epilogue (max,
sum-exp, target logit) on its half, so one group's epilogue can run beside the other's MMAs.
With 8 warps the pass leaves the loop whole. Through pointer loads it does not compile.

One process, the same inputs per case: the public call under ``torch.no_grad()`` (what the
bench's "fw ms" times), production's launch against warp-specialised ones
(``config.forward_blocks`` with ``WARP_SPECIALIZE``, ``config.target_programs`` as a multiple of
the multiprocessors), two alternating rounds. Each row's loss and lse are compared with
production's (``diff``: largest relative difference). Prints ms and TFLOP/s; last a table.

    PYTHONPATH=. python benchmarks/tune_warp_spec.py [--quick] [--cases gemma2 llama3 extreme_1m vit21k]
"""

import argparse

import torch
import triton
from triton.testing import do_bench

import fused_xent
from fused_xent.bench import CASES, make_inputs
from fused_xent.kernels import config

#: (BLOCK_N, BLOCK_C, BLOCK_D, num_warps, num_stages, warp-specialised, programs per multiprocessor)
PRODUCTION = (128, 256, 64, 8, 3, False, 4)
CANDIDATES = [
    (128, 256, 64, 4, 3, True, 1),
    (128, 256, 64, 4, 3, True, 2),
    (128, 256, 64, 4, 3, True, 4),
    (128, 256, 64, 4, 2, True, 2),
    (256, 128, 64, 4, 3, True, 1),
    (256, 128, 64, 4, 4, True, 2),
    (128, 128, 64, 4, 4, True, 2),
]


def _label(cfg) -> str:
    bn, bc, bd, warps, stages, ws, per_sm = cfg
    return f"{bn}x{bc}x{bd} w{warps} s{stages} {'WS' if ws else '--'} {per_sm}/SM"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (checks the script, not the timing)")
    parser.add_argument("--cases", nargs="+", default=["gemma2", "llama3", "extreme_1m", "vit21k"])
    args = parser.parse_args()
    sms = config.sm_count(0)
    print(f"# {torch.cuda.get_device_name()}, {sms} SMs, torch {torch.__version__}, triton {triton.__version__}")
    orig_blocks, orig_programs = config.forward_blocks, config.target_programs
    table = []
    for name in args.cases:
        case = dict(CASES[name])
        if args.quick:
            case.update(N=512, C=min(case["C"], 20000))
        x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)
        N, D, C = case["N"], case["D"], case["C"]
        flop = 2 * N * D * C

        def call(x=x, w=w, y=y, b=b, case=case):
            with torch.no_grad():
                return fused_xent.linear_cross_entropy(
                    x, w, y, linear_bias=b, label_smoothing=case.get("ls", 0.0), reduction="none", return_lse=True
                )

        ref = None
        results: dict[tuple, list[float]] = {}
        for rnd in (1, 2):
            for cfg in [PRODUCTION, *CANDIDATES]:
                bn, bc, bd, warps, stages, ws, per_sm = cfg
                blocks = dict(BLOCK_N=bn, BLOCK_C=bc, BLOCK_D=bd, num_warps=warps, num_stages=stages)
                if ws:
                    blocks["WARP_SPECIALIZE"] = True
                config.forward_blocks = lambda device, blocks=blocks: dict(blocks)
                config.target_programs = lambda device, p=per_sm * sms: p
                try:
                    loss, lse = call()
                    if ref is None:
                        ref = (loss, lse)
                    diff = max(
                        ((loss - ref[0]).abs().max() / ref[0].abs().max()).item(),
                        ((lse - ref[1]).abs().max() / ref[1].abs().max()).item(),
                    )
                    ms = do_bench(call, warmup=25, rep=200, return_mode="median")
                    results.setdefault(cfg, []).append(ms)
                    print(
                        f"[{rnd}] {name:10s} {_label(cfg):32s} {ms:7.3f} ms {flop / ms / 1e9:5.0f} TFLOP/s"
                        f"  diff {diff:.1e}",
                        flush=True,
                    )
                except Exception as e:  # a configuration that does not compile is a row, not a crash
                    print(f"[{rnd}] {name:10s} {_label(cfg):32s} error {type(e).__name__}: {str(e)[:160]}", flush=True)
                finally:
                    config.forward_blocks, config.target_programs = orig_blocks, orig_programs
        best = min(results.items(), key=lambda kv: min(kv[1]), default=None)
        if best is not None:
            cfg, times = best
            blocks = dict(BLOCK_N=cfg[0], BLOCK_C=cfg[1], BLOCK_D=cfg[2], num_warps=cfg[3], num_stages=cfg[4])
            blocks["WARP_SPECIALIZE"] = cfg[5]
            config.forward_blocks = lambda device, blocks=blocks: dict(blocks)
            config.target_programs = lambda device, p=cfg[6] * sms: p
            try:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                call()
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            finally:
                config.forward_blocks, config.target_programs = orig_blocks, orig_programs
            prod = results.get(PRODUCTION, [float("nan")])
            table.append((name, _label(cfg), min(times), max(times), min(prod), max(prod), peak))
    print("\n| case | best configuration | best ms (2 rounds) | production ms (2 rounds) | peak MiB (best) |")
    print("|---|---|---|---|---|")
    for name, label, lo, hi, plo, phi, peak in table:
        print(f"| {name} | {label} | {lo:.2f}–{hi:.2f} | {plo:.2f}–{phi:.2f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
