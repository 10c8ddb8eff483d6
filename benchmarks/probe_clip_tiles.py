"""CLIP's lean backward: the tile shape (rows x columns of logits per backward tile) and where
the GPU idles during one forward + backward.

The backward accumulates dX in an fp32 (B, D) buffer, re-read and re-written by each column
chunk's GEMMs (8 B D bytes per chunk), and dY per column chunk in a small fp32 buffer re-read
and re-written by each row tile (8 cc D bytes per tile). At tile memory M = 2 R cc bytes that
traffic is ``8 D B^2 (1 / cc + 1 / R)``: least for a square tile. The production tile (16384
rows x 3072 columns, 96 MiB) moves ~2.6 GB of accumulator bytes at B = 32768, D = 768; 6144 x
6144 (72 MiB) ~1.1 GB, at more launches and smaller GEMMs. This script times the step at a
few tile shapes (module constants patched for the run; each shape in turn, two rounds) and
lists the GPU's idle time between kernels at the production shape. ``--gaps-only``: that list
after a few steps (cold) and after 3 s of steps back to back (hot), then ``do_bench``'s median.

    PYTHONPATH=. python benchmarks/probe_clip_tiles.py [--B 32768] [--D 768] [--rounds 2] [--gaps-only]
"""

import argparse
import time

import torch
from bench_clip import make_inputs
from bench_clip import measure as measure_clip
from gpu_gaps import second_call_kernels

from fused_xent.integrations.open_clip import FusedClipLoss
from fused_xent.kernels import clip_chunked

MIB = 2**20
#: (tile rows, tile bytes) of the backward; the first is production's.
SHAPES = [(16384, 96 * MIB), (8192, 80 * MIB), (6144, 72 * MIB), (8192, 64 * MIB), (4096, 64 * MIB)]


def gaps(step, hot_ms: float = 0.0) -> None:
    """One profiled step (after warm-up): kernel time, busy time, idle time and the largest gaps.
    ``hot_ms``: steps run back to back for that long first, as ``do_bench`` runs them (the GPU at
    its sustained clock under the power cap); the SM clock (MHz, NVML) is printed before and after."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    clock = torch.cuda.clock_rate()
    if hot_ms:
        t0 = time.perf_counter()
        while (time.perf_counter() - t0) * 1e3 < hot_ms:
            step()
        clock = f"{clock} -> {torch.cuda.clock_rate()} (after {hot_ms:.0f} ms of steps)"
    print(f"SM clock before the profiled steps: {clock} MHz")
    kernels = second_call_kernels(step)
    idle, busy, end, rows = 0.0, 0.0, kernels[0][0], []
    for start, stop, name in kernels:
        gap = max(0.0, start - end)
        idle += gap
        busy += stop - max(start, end) if stop > end else 0.0
        rows.append((gap, name))
        end = max(end, stop)
    span = (kernels[-1][1] - kernels[0][0]) / 1e3
    print(f"profiled step: {len(kernels)} kernels, span {span:.2f} ms, busy {busy / 1e3:.2f}, idle {idle / 1e3:.2f}")
    by_name: dict[str, list[float]] = {}
    for start, stop, name in kernels:
        by_name.setdefault(name[:70], []).append((stop - start) / 1e3)
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:10]:
        print(f"  {sum(times):7.3f} ms  {len(times):4d} x  {name}")
    small = sum(g for g, _ in rows if g < 20) / 1e3
    print(f"idle in gaps < 20 us: {small:.3f} ms over {sum(1 for g, _ in rows if g < 20)} gaps; largest:")
    for gap, name in sorted(rows, reverse=True)[:8]:
        print(f"  {gap:8.1f} us before {name[:80]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=32768)
    parser.add_argument("--D", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gaps-only", action="store_true", help="skip the tile shapes: the idle time, cold then hot")
    args = parser.parse_args()
    images, texts, scale = make_inputs(args.B, args.D, "cuda", torch.bfloat16)
    loss_fn = FusedClipLoss()
    leaves = [images, texts]

    def step():
        for t in leaves:
            t.grad = None
        loss_fn(images, texts, scale).backward()

    def measure() -> tuple[float, float]:
        """(median ms by do_bench, peak extra MiB of one step, the features' gradients included)."""
        row = measure_clip(loss_fn, images, texts, scale, "cuda", reps=0)
        return row["ms"], row["mib"]

    if args.gaps_only:
        gaps(step)
        gaps(step, hot_ms=3000.0)
        print(f"do_bench median: {measure()[0]:.2f} ms")
        return
    grads = {}
    for rows, nbytes in SHAPES:  # warm-up and the gradients of each shape
        clip_chunked.TILE_ROWS, clip_chunked.CHUNK_BYTES = rows, nbytes
        step()
        grads[rows, nbytes] = [t.grad.clone() for t in leaves]
    results: dict = {shape: [] for shape in SHAPES}
    t0 = time.time()
    for _ in range(args.rounds):
        for shape in SHAPES:
            clip_chunked.TILE_ROWS, clip_chunked.CHUNK_BYTES = shape
            results[shape].append(measure())
    print(f"# B={args.B} D={args.D} bf16, {args.rounds} rounds in {time.time() - t0:.0f} s")
    base = grads[SHAPES[0]]
    print("| tile rows | tile MiB | columns | ms per round | peak MiB | dX / dY vs production (rel) |")
    print("|---|---|---|---|---|---|")
    for shape in SHAPES:
        rows, nbytes = shape
        cc = clip_chunked.chunk_cols(min(args.B, rows), args.D, torch.bfloat16, nbytes)
        diff = [
            ((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(grads[shape], base, strict=True)
        ]
        ms = " / ".join(f"{m:.2f}" for m, _ in results[shape])
        print(
            f"| {rows} | {nbytes // MIB} | {cc} | {ms} | {results[shape][0][1]:.0f} | {diff[0]:.1e} / {diff[1]:.1e} |"
        )
    clip_chunked.TILE_ROWS, clip_chunked.CHUNK_BYTES = SHAPES[0]
    gaps(step)


if __name__ == "__main__":
    main()
