"""CLIP's symmetric contrastive loss: fused_xent against open_clip, liger-kernel and Inf-CL.

Forward + backward time (median, ``triton.testing.do_bench``) and peak extra memory of the loss
of ``scale * I @ T.T`` with the diagonal as targets, for

- ``fused_xent``: ``FusedClipLoss`` (one row + column lse pass, one recomputation), once per
  CLIP backend named in ``--impls`` ("auto", "lean", "triton": rows ``fused_xent[lean]``, ...);
- ``open_clip``: ``open_clip.loss.ClipLoss`` where it is installed, else the same eager formula
  (both B x B logit matrices materialised);
- ``liger (2 calls)``: liger-kernel's fused linear cross-entropy, once per direction;
- ``inf_cl``: Inf-CL's ``cal_inf_loss``, once per direction.

All methods run in one process on the same bf16 features (normalised, with ``scale`` a constant
tensor as in SPEC's anchors). Memory is ``max_memory_allocated() - memory_allocated()`` around
one call after ``reset_peak_memory_stats()``, the features' gradients included. The main case
(B = 32768, D = 768) also reports each method's gradient error against an fp32 reference. A
sweep over the batch size (4k to 256k) runs each method until it fails (out of memory) or one
step exceeds ``--max-ms``, and plots memory and time against B. A missing package or a
failure is an error row, never a crash. Without CUDA a tiny case runs on the CPU (time only).

    PYTHONPATH=. python benchmarks/bench_clip.py --out benchmarks/results/h100
    PYTHONPATH=. python benchmarks/bench_clip.py --out /tmp/clip --impls lean,triton --fused-only --sweep
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

from fused_xent.integrations.open_clip import FusedClipLoss

GPU_MAIN = dict(B=32768, D=768)
GPU_SWEEP = [4096, 8192, 16384, 32768, 65536, 131072, 262144]
CPU_MAIN = dict(B=256, D=32)
CPU_SWEEP = [64, 128, 256, 512]
#: H100 target from the issue for the fused method at the main case: (ms, MiB).
TARGET = (12.0, 256)
SCALE = 100.0 / 1.5


def _eager_formula(images, texts, scale):
    labels = torch.arange(images.shape[0], device=images.device)
    return (F.cross_entropy(scale * images @ texts.T, labels) + F.cross_entropy(scale * texts @ images.T, labels)) / 2


def methods(impls: tuple[str, ...] = ("auto",), fused_only: bool = False) -> dict:
    """name -> loss(images, texts, scale), or name -> the reason it is unavailable (a str).
    ``impls``: the fused CLIP backends to time ("auto" is the row ``fused_xent``)."""
    out: dict = {
        ("fused_xent" if impl == "auto" else f"fused_xent[{impl}]"): FusedClipLoss(impl=impl) for impl in impls
    }
    if fused_only:
        return out
    try:
        from open_clip.loss import ClipLoss

        out["open_clip"] = ClipLoss()
    except Exception:
        out["eager (open_clip's formula)"] = _eager_formula  # the same computation, line for line
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger

        def liger_two_calls(images, texts, scale):
            labels = torch.arange(images.shape[0], device=images.device)
            return (liger(scale * images, texts, labels) + liger(scale * texts, images, labels)) / 2

        out["liger (2 calls)"] = liger_two_calls
    except Exception as err:
        out["liger (2 calls)"] = f"{type(err).__name__}: {err}"
    try:
        from inf_cl import cal_inf_loss

        def inf_cl(images, texts, scale):
            per_image = cal_inf_loss(images, texts, scale=scale).mean()
            return (per_image + cal_inf_loss(texts, images, scale=scale).mean()) / 2

        out["inf_cl"] = inf_cl
    except Exception as err:
        out["inf_cl"] = f"{type(err).__name__}: {err}"
    return out


def make_inputs(B: int, D: int, device: str, dtype: torch.dtype, seed: int = 1):
    g = torch.Generator(device=device).manual_seed(seed)
    images = F.normalize(torch.randn(B, D, device=device, generator=g), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(B, D, device=device, generator=g), dim=-1)
    scale = torch.tensor(SCALE, device=device)
    return images.to(dtype).requires_grad_(), texts.to(dtype).requires_grad_(), scale


def reference_grads(images, texts, scale):
    """fp32 loss and feature gradients from the materialised logits (TF32 off)."""
    leaves = [t.detach().float().requires_grad_() for t in (images, texts)]
    allow = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        loss = _eager_formula(*leaves, scale)
        loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow
    return loss.detach(), [t.grad for t in leaves]


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def measure(loss_fn, images, texts, scale, device: str, reps: int, reference=None) -> dict:
    leaves = [images, texts]

    def step():
        for t in leaves:
            t.grad = None
        loss = loss_fn(images, texts, scale)
        loss.backward()
        return loss

    loss = step()  # warm-up (compilation, autotuning)
    row: dict = {}
    if reference is not None:
        ref_loss, ref_grads = reference
        row.update(loss_err=abs(loss.item() - ref_loss.item()) / abs(ref_loss.item()))
        row.update(grad_err=max(_rel(t.grad, g) for t, g in zip(leaves, ref_grads, strict=True)))
    if device == "cuda":
        import triton.testing

        for t in leaves:
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        row["mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
        row["ms"] = triton.testing.do_bench(step, grad_to_none=leaves, return_mode="median")
    else:
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        row.update(ms=statistics.median(times), mib=None)
    for t in leaves:
        t.grad = None
    return row


def run_case(B: int, D: int, device: str, dtype, reps: int, skip: dict, with_errors: bool, chosen: dict) -> list[dict]:
    """One row per method of ``chosen`` at batch ``B``; ``skip`` (method -> reason) carries
    failures to larger B."""
    images, texts, scale = make_inputs(B, D, device, dtype)
    reference = reference_grads(images, texts, scale) if with_errors else None
    rows = []
    for name, fn in chosen.items():
        row = dict(method=name, B=B, D=D, dtype=str(dtype).removeprefix("torch."))
        if isinstance(fn, str):
            row.update(ms=None, mib=None, error=f"unavailable: {fn}"[:200])
        elif name in skip:
            row.update(ms=None, mib=None, error=skip[name])
        else:
            try:
                row.update(measure(fn, images, texts, scale, device, reps, reference))
            except Exception as err:  # OOM, a kernel that does not build, ...: a row, not a crash
                row.update(ms=None, mib=None, error=f"{type(err).__name__}: {str(err).splitlines()[0][:160]}")
                skip[name] = f"skipped: failed at B={B}"
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        print(f"B={B:7d} {name:20s} {_fmt(row)}", file=sys.stderr, flush=True)
    del images, texts, reference
    return rows


def _fmt(row: dict) -> str:
    if row.get("error"):
        return row["error"]
    mem = "" if row["mib"] is None else f" / {row['mib']:.0f} MiB"
    err = f"  grad err {row['grad_err']:.1e}" if "grad_err" in row else ""
    return f"{row['ms']:.2f} ms{mem}{err}"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_ms) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["method"] for r in rows):
        ok = [r for r in rows if r["method"] == name and not r.get("error")]
        if not ok:
            continue
        Bs = [r["B"] for r in ok]
        if ok[0]["mib"] is not None:
            ax_mem.plot(Bs, [r["mib"] for r in ok], "o-", label=name)
        ax_ms.plot(Bs, [r["ms"] for r in ok], "o-", label=name)
    for ax, label in ((ax_mem, "peak extra memory (MiB)"), (ax_ms, "forward + backward (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_ms.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(meta: dict, main_rows: list[dict], sweep_rows: list[dict]) -> str:
    lines = [
        "# CLIP symmetric loss",
        "",
        f"{meta['date']} · {meta['device']} · torch {meta['torch']} · triton {meta['triton']}",
        "",
        f"`{meta['command']}`",
        "",
        "fw+bw, median ms / peak extra MiB (feature gradients included); gradient error = max over I, T of",
        "‖g − g_fp32‖ / ‖g_fp32‖ against materialised fp32 logits.",
        "",
        "| method | B × D | ms | MiB | grad error | target (H100) |",
        "|---|---|---|---|---|---|",
    ]
    for r in main_rows:
        target = f"≤ {TARGET[0]:g} ms at ≤ {TARGET[1]} MiB" if r["method"].startswith("fused_xent") else ""
        if r.get("error"):
            lines.append(f"| {r['method']} | {r['B']} × {r['D']} | error | {r['error'][:70]} | | {target} |")
            continue
        mib = "" if r["mib"] is None else f"{r['mib']:.0f}"
        err = f"{r['grad_err']:.1e}" if "grad_err" in r else ""
        lines.append(f"| {r['method']} | {r['B']} × {r['D']} | {r['ms']:.2f} | {mib} | {err} | {target} |")
    if not sweep_rows:
        return "\n".join(lines) + "\n"
    lines += ["", "## Batch-size sweep", "", "![memory and time vs batch size](clip.png)", ""]
    methods_seen = list(dict.fromkeys(r["method"] for r in sweep_rows))
    lines += ["| B | " + " | ".join(methods_seen) + " |", "|---|" + "---|" * len(methods_seen)]
    for B in dict.fromkeys(r["B"] for r in sweep_rows):
        cells = []
        for name in methods_seen:
            r = next(r for r in sweep_rows if r["B"] == B and r["method"] == name)
            if r.get("error"):
                cells.append("OOM" if "OutOfMemory" in r["error"] else r["error"].split(":")[0][:24])
            else:
                cells.append(f"{r['ms']:.1f} ms" + ("" if r["mib"] is None else f" / {r['mib']:.0f} MiB"))
        lines.append(f"| {B} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for clip.json, clip.md and clip.png")
    parser.add_argument("--sweep", type=int, nargs="*", default=None, help="batch sizes of the sweep (none: no sweep)")
    parser.add_argument("--impls", default="auto", help="comma-separated fused CLIP backends: auto, lean, triton")
    parser.add_argument("--fused-only", action="store_true", help="time only fused_xent (no open_clip, liger, Inf-CL)")
    parser.add_argument("--max-ms", type=float, default=3000.0, help="stop sweeping a method slower than this")
    parser.add_argument("--reps", type=int, default=5, help="CPU repetitions (CUDA uses do_bench)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    main_case = GPU_MAIN if device == "cuda" else CPU_MAIN
    sweep = args.sweep if args.sweep is not None else (GPU_SWEEP if device == "cuda" else CPU_SWEEP)
    chosen = methods(tuple(args.impls.split(",")), args.fused_only)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
        torch=torch.__version__,
        triton=triton_version,
        command="PYTHONPATH=. python " + " ".join(sys.argv),
        dtype=str(dtype),
    )

    main_rows = run_case(main_case["B"], main_case["D"], device, dtype, args.reps, {}, True, chosen)
    skip: dict = {}
    sweep_rows = []
    for B in sweep:
        rows = run_case(B, main_case["D"], device, dtype, args.reps, skip, False, chosen)
        for r in rows:
            if r.get("ms") is not None and r["ms"] > args.max_ms:
                skip[r["method"]] = f"skipped: {r['ms']:.0f} ms at B={B} > --max-ms"
        sweep_rows += rows

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "clip.json").write_text(json.dumps(dict(meta=meta, main=main_rows, sweep=sweep_rows), indent=1))
    (args.out / "clip.md").write_text(markdown(meta, main_rows, sweep_rows))
    if sweep_rows:
        plot(sweep_rows, args.out / "clip.png", f"CLIP loss, D={main_case['D']}, {meta['device']}")
    print(f"\n{meta['device']}  torch {meta['torch']}  triton {meta['triton']}  -> {args.out}")
    print(f"{'method':20s} {'B x D':>12s} {'ms':>9s} {'MiB':>8s} {'grad err':>9s}")
    for r in main_rows:
        if r.get("error"):
            print(f"{r['method']:20s} {r['B']:>6d} x {r['D']:<4d} {r['error'][:60]}")
            continue
        mib = "" if r["mib"] is None else f"{r['mib']:.0f}"
        print(f"{r['method']:20s} {r['B']:>6d} x {r['D']:<4d} {r['ms']:9.2f} {mib:>8s} {r['grad_err']:9.1e}")


if __name__ == "__main__":
    main()
