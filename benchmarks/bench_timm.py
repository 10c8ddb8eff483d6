"""timm heads and extreme classification: fused loss vs timm's head + loss, eager and compiled.

Forward + backward time (median) and peak extra memory for

- ViT-21k head, 4096 x 768 x 21841, bias, label smoothing 0.1 (LabelSmoothingCrossEntropy),
  and the same with Mixup (SoftTargetCrossEntropy on timm's dense mixup target);
- 1,000,000 classes, 4096 x 512, plain cross-entropy and ArcFace (s 64, m 0.5).

All methods run in one process on the same bf16 tensors. Memory is
``max_memory_allocated() - memory_allocated()`` around one call after
``reset_peak_memory_stats()``, gradients included. A method that fails (out of memory, a
missing compiler) gets an error row. Without CUDA a tiny case runs on the CPU (timing with
``time.perf_counter``, no memory), so the script can be checked anywhere.

    PYTHONPATH=. python benchmarks/bench_timm.py --out benchmarks/results/h100
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fused_xent import linear_cross_entropy
from fused_xent.integrations.margins import margin_cross_entropy, margin_logits

GPU_CASES = {
    "vit21k": dict(N=4096, D=768, C=21841, bias=True, loss="smooth"),
    "vit21k-mixup": dict(N=4096, D=768, C=21841, bias=True, loss="mixup"),
    "1m": dict(N=4096, D=512, C=1_000_000, bias=False, loss="plain"),
    "1m-arcface": dict(N=4096, D=512, C=1_000_000, bias=False, loss="arcface"),
}
CPU_CASES = {
    "vit21k": dict(N=64, D=48, C=2001, bias=True, loss="smooth"),
    "vit21k-mixup": dict(N=64, D=48, C=2001, bias=True, loss="mixup"),
    "1m": dict(N=64, D=32, C=20_000, bias=False, loss="plain"),
    "1m-arcface": dict(N=64, D=32, C=20_000, bias=False, loss="arcface"),
}
#: H100 targets from the issue: (ms, MiB) for the fused method. "fused lean" runs impl="lean"
#: with the memory budget that leaves the target's MiB (the mixup case: the ViT-21k one).
TARGETS = {"vit21k": (1.6, 128), "1m": (26.0, 1100), "1m-arcface": (26.0, 1100)}
LEAN_MIB = {"vit21k": 128, "vit21k-mixup": 128, "1m": 1100, "1m-arcface": 1100}
SMOOTHING, S, M2 = 0.1, 64.0, 0.5


def make_inputs(case: dict, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    N, D, C = case["N"], case["D"], case["C"]
    x = (torch.randn(N, D, device=device, generator=g) / D**0.5).to(dtype).requires_grad_()
    w = (torch.randn(C, D, device=device, generator=g) * 0.02).to(dtype).requires_grad_()
    b = (torch.randn(C, device=device, generator=g) * 0.02).to(dtype).requires_grad_() if case["bias"] else None
    y = torch.randint(0, C, (N,), device=device, generator=g)
    lam = torch.rand(N, device=device, generator=g)
    return dict(x=x, w=w, b=b, y=y, y2=y.flip(0), lam=lam)


def timm_loss(case: dict):
    """timm's head (``F.linear``, or the materialised margin logits) and timm's own loss."""
    from timm.data.mixup import mixup_target
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    kind = case["loss"]
    smooth, soft = LabelSmoothingCrossEntropy(SMOOTHING), SoftTargetCrossEntropy()

    def fn(x, w, b, y, y2, lam):
        logits = margin_logits(x, w, y, s=S, m2=M2) if kind == "arcface" else F.linear(x, w, b)
        if kind == "smooth":
            return smooth(logits.float(), y)
        if kind == "mixup":  # y2 = y.flip(0), as timm's Mixup
            return soft(logits.float(), mixup_target(y, w.shape[0], lam[:, None], SMOOTHING))
        return F.cross_entropy(logits.float(), y)

    return fn


def fused_loss(case: dict, lean_mib: int | None = None):
    """fused_xent's loss: "auto", or with ``lean_mib`` impl="lean" within that peak (the
    memory budget is what it leaves beside the gradients of x, W and b)."""
    kind = case["loss"]
    opts = dict(impl="auto")
    if lean_mib is not None:
        grads = (case["N"] + case["C"]) * case["D"] * 2 + (case["C"] * 2 if case["bias"] else 0)
        opts = dict(impl="lean", memory_budget=max(0, lean_mib * 2**20 - grads))

    def fn(x, w, b, y, y2, lam):
        if kind == "arcface":
            return margin_cross_entropy(x, w, y, s=S, m2=M2, **opts)
        smoothing = SMOOTHING if kind in ("smooth", "mixup") else 0.0
        mixup = dict(target2=y2, lam=lam) if kind == "mixup" else {}
        return linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=smoothing, **mixup, **opts)

    return fn


def measure(loss_fn, inputs: dict, device: str, reps: int) -> dict:
    leaves = [t for t in (inputs["x"], inputs["w"], inputs["b"]) if t is not None]
    args = [inputs[k] for k in ("x", "w", "b", "y", "y2", "lam")]

    def step():
        for t in leaves:
            t.grad = None
        loss_fn(*args).backward()

    step()  # warm-up (and compilation)
    if device == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(step, grad_to_none=leaves, return_mode="median")
        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        mib = (torch.cuda.max_memory_allocated() - before) / 2**20
        for t in leaves:
            t.grad = None
        return dict(ms=ms, mib=mib)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return dict(ms=statistics.median(times), mib=None)


def run(cases: dict, methods: list[str], device: str, reps: int) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for name, case in cases.items():
        inputs = make_inputs(case, device, dtype)
        for method in methods:
            if method == "fused":
                fn = fused_loss(case)
            elif method == "fused lean":
                fn = fused_loss(case, LEAN_MIB.get(name, 128))
            elif method == "timm eager":
                fn = timm_loss(case)
            else:
                fn = torch.compile(timm_loss(case))
            row = dict(case=name, method=method, N=case["N"], D=case["D"], C=case["C"], dtype=str(dtype))
            try:
                row.update(measure(fn, inputs, device, reps))
            except Exception as err:  # OOM, no compiler, ...: a row, not a crash
                row.update(ms=None, mib=None, error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(f"{name:14s} {method:14s} {_fmt(row)}", file=sys.stderr, flush=True)
        del inputs
    return rows


def _fmt(row: dict) -> str:
    if row.get("error"):
        return f"error: {row['error']}"
    mem = "" if row["mib"] is None else f" / {row['mib']:.0f} MiB"
    return f"{row['ms']:.3f} ms{mem}"


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# timm heads and extreme classification",
        "",
        f"{meta['date']} · {meta['device']} · torch {meta['torch']} · triton {meta['triton']} · timm {meta['timm']}",
        "",
        f"`{meta['command']}`",
        "",
        "fw+bw, median ms / peak extra MiB (gradients included); "
        + ("bf16" if meta["device"] != "cpu" else "fp32, CPU: time only"),
        "",
        "| case | N × D × C | method | ms | MiB | target (H100) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = TARGETS.get(r["case"]) if r["method"].startswith("fused") else None
        ms = "error" if r.get("error") else f"{r['ms']:.3f}"
        mib = r.get("error", "")[:60] if r.get("error") else ("" if r["mib"] is None else f"{r['mib']:.0f}")
        tgt = f"≤ {target[0]} ms at ≤ {target[1]} MiB" if target else ""
        lines.append(f"| {r['case']} | {r['N']} × {r['D']} × {r['C']} | {r['method']} | {ms} | {mib} | {tgt} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for timm.json and timm.md")
    parser.add_argument("--cases", nargs="*", default=None, help=f"subset of {list(GPU_CASES)}")
    parser.add_argument("--methods", nargs="*", default=["fused", "fused lean", "timm eager", "timm compiled"])
    parser.add_argument("--reps", type=int, default=5, help="CPU repetitions (CUDA uses do_bench)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = GPU_CASES if device == "cuda" else CPU_CASES
    if args.cases:
        unknown = set(args.cases) - set(cases)
        if unknown:
            parser.error(f"unknown cases {sorted(unknown)}; choose from {list(cases)}")
        cases = {k: cases[k] for k in args.cases}
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import timm

        timm_version = timm.__version__
    except ImportError:
        timm_version = None
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
        torch=torch.__version__,
        triton=triton_version,
        timm=timm_version,
        python=platform.python_version(),
        command="PYTHONPATH=. python " + " ".join(sys.argv),
    )
    rows = run(cases, args.methods, device, args.reps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "timm.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    table = markdown(meta, rows)
    (args.out / "timm.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
