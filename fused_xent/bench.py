"""Side-by-side benchmark: every linear cross-entropy available here, same inputs, one process.

``python -m fused_xent bench [case ...] [--out DIR]``. Per (case, method) it reports the
median forward+backward time (CUDA events via ``triton.testing.do_bench``, after warm-up; on
the CPU the median of ``CPU_REPS`` calls after one),
the forward-only time, the peak memory beyond what was allocated before the call, and the
errors of the loss and of the input / weight gradients against an fp32 reference on the
same bf16-rounded values. Methods whose package is missing are skipped; a failure becomes
an error row. On a machine without CUDA it runs the small ``cpu_small`` case.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import fused_xent

CASES = {
    # name: rows N, features D, classes C, bias, label smoothing, peaked logits, torch.compile,
    # and the peak memory SPEC section 5 allows the fast and the lean / filtered modes (their
    # memory budgets are set from it)
    "gemma2": dict(N=8192, D=2304, C=256000, fast_peak_mib=3072, lean_peak_mib=1300),
    "gemma2_peaked": dict(N=8192, D=2304, C=256000, peaked=True, fast_peak_mib=3072, lean_peak_mib=1300),
    "llama3": dict(N=8192, D=4096, C=128256, fast_peak_mib=2600, lean_peak_mib=1300),
    "extreme_1m": dict(N=4096, D=512, C=1_000_000, compile=False, fast_peak_mib=2600, lean_peak_mib=1100),
    "vit21k": dict(N=4096, D=768, C=21841, bias=True, ls=0.1, fast_peak_mib=128, lean_peak_mib=128),
    "cpu_small": dict(N=256, D=64, C=1000, bias=True, ls=0.1),
}

#: Sweeps for the plots: classes at the Gemma 2 width, rows at the Llama 3 head.
SWEEPS = {
    "classes": [dict(N=8192, D=2304, C=c, compile=False) for c in (32768, 65536, 131072, 262144)],
    "rows": [dict(N=n, D=4096, C=128256, compile=False) for n in (2048, 4096, 8192, 16384, 32768)],
    "cpu": [dict(N=n, D=64, C=1000, compile=False) for n in (64, 256)],
}
SWEEP_METHODS = ["torch_eager", "fused_xent[auto]", "fused_xent[lean]", "fused_xent[fast]", "cce", "liger"]
#: The axis each sweep varies.
SWEEP_AXIS = {"classes": "C", "rows": "N", "cpu": "N"}


def methods(case: dict, device: str) -> dict:
    """name -> fn(x, w, y, b, ls) returning the mean loss."""

    def eager(x, w, y, b, ls):
        return F.cross_entropy(F.linear(x, w, b).float(), y, label_smoothing=ls)

    out = {"torch_eager": eager}
    if device == "cuda" and case.get("compile", True):
        out["torch_compile"] = torch.compile(eager, dynamic=False)
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        opts = torch.nn.LinearCrossEntropyOptions()

        def native(x, w, y, b, ls):
            return F.linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=ls, options=opts)

        out["torch_native_chunked"] = native
    for impl in ("auto", "lean", "fast", "filtered", "triton") if device == "cuda" else ("auto",):
        budget = fast_budget(case) if impl == "fast" else lean_budget(case) if impl in ("lean", "filtered") else None

        def ours(x, w, y, b, ls, impl=impl, budget=budget):
            return fused_xent.linear_cross_entropy(
                x, w, y, linear_bias=b, label_smoothing=ls, impl=impl, memory_budget=budget
            )

        out[f"fused_xent[{impl}]"] = ours
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        def cce_fn(x, w, y, b, ls, **kw):
            if ls or b is not None:
                raise NotImplementedError("cut-cross-entropy 25.1.1 has no label smoothing or bias")
            return cce(x, w, y, **kw)

        out["cce"] = cce_fn
        out["cce_nofilter"] = lambda x, w, y, b, ls: cce_fn(x, w, y, b, ls, filter_eps=None)
    except ImportError:
        pass
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy as liger

        out["liger"] = lambda x, w, y, b, ls: liger(x, w, y, b, label_smoothing=ls)
    except ImportError:
        pass
    return out


def fast_budget(case: dict, itemsize: int = 2) -> int | None:
    """The fast mode's memory budget (bytes beyond the gradients) that keeps its peak within
    the case's ``fast_peak_mib`` with 48 MiB to spare; None (the default budget) without one."""
    return _budget(case, "fast_peak_mib", itemsize, 48 * 2**20)


def lean_budget(case: dict, itemsize: int = 2) -> int | None:
    """The memory budget of the lean and filtered modes: the case's ``lean_peak_mib`` less the
    gradients (they size their chunk from it, with their own slack); None without one."""
    return _budget(case, "lean_peak_mib", itemsize, 0)


def _budget(case: dict, key: str, itemsize: int, spare: int) -> int | None:
    if key not in case:
        return None
    grads = (case["C"] + case["N"]) * case["D"] * itemsize
    return max(0, case[key] * 2**20 - grads - spare)


def fwbw_step(name: str, impl: str, lean_peak_mib: int | None = None):
    """``(step, budget)``: ``step()`` runs one fused_xent fw+bw of case ``name`` on CUDA in bf16,
    gradients cleared first, as the bench runs ``fused_xent[impl]``; lean and filtered take the
    budget of the case's lean column (or of ``lean_peak_mib``). For the profiling scripts."""
    case = dict(CASES[name])
    if lean_peak_mib is not None:
        case["lean_peak_mib"] = lean_peak_mib
    budget = lean_budget(case) if impl in ("lean", "filtered") else None
    x, w, y, b = make_inputs(case, "cuda", torch.bfloat16)

    def step() -> None:
        for p in (x, w, b):
            if p is not None:
                p.grad = None
        fused_xent.linear_cross_entropy(
            x, w, y, linear_bias=b, label_smoothing=case.get("ls", 0.0), impl=impl, memory_budget=budget
        ).backward()

    return step, budget


def make_inputs(case: dict, device: str, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    N, D, C = case["N"], case["D"], case["C"]
    w = torch.randn(C, D, device=device, generator=g) / math.sqrt(D)
    y = torch.randint(0, C, (N,), device=device, generator=g)
    x = torch.randn(N, D, device=device, generator=g)
    if case.get("peaked"):  # hidden states aligned with their target row: a trained-model-like softmax
        x = 0.5 * x + 6.0 * w[y]
    b = 0.1 * torch.randn(C, device=device, generator=g) if case.get("bias") else None
    leaf = [t.to(dtype).requires_grad_() if t is not None else None for t in (x, w, b)]
    return leaf[0], leaf[1], y, leaf[2]


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


#: Timed calls per CPU measurement, after one warm-up call; their median is reported.
CPU_REPS = 5


def _bench(fn, device):
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=50, rep=300, return_mode="median")
    fn()  # warm-up: first-call work (allocator, imports, caches) stays out of the median
    times = []
    for _ in range(CPU_REPS):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def host_time(fn, calls: int = 50, warmup: int = 5) -> float:
    """Seconds of host time per call of ``fn`` on CUDA, ``calls`` calls without a sync after
    ``warmup`` (what a training step pays where the GPU keeps up; for the profiling scripts)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return host


def _peak(fn, device) -> float:
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_case(name: str, case: dict, device: str, only: list[str] | None = None) -> list[dict]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w, y, b = make_inputs(case, device, dtype)
    ls = case.get("ls", 0.0)
    params = [p for p in (x, w, b) if p is not None]
    ref_leaves = [p.detach().float().requires_grad_() for p in params]
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    ref = F.cross_entropy(F.linear(ref_leaves[0], ref_leaves[1], ref_leaves[2] if b is not None else None), y,
                          label_smoothing=ls)  # fmt: skip
    ref.backward()
    torch.backends.cuda.matmul.allow_tf32 = prev
    ref_loss, ref_gx, ref_gw = ref.detach(), ref_leaves[0].grad, ref_leaves[1].grad
    del ref_leaves
    if device == "cuda":
        torch.cuda.empty_cache()
    rows = []
    for mname, fn in methods(case, device).items():
        if only and not any(o in mname for o in only):
            continue
        row = dict(case=name, method=mname, N=case["N"], D=case["D"], C=case["C"])
        try:

            def fwbw(fn=fn):
                for p in params:
                    p.grad = None
                loss = fn(x, w, y, b, ls)
                loss.backward()
                return loss

            def fw(fn=fn):
                with torch.no_grad():
                    return fn(x, w, y, b, ls)

            loss = fwbw()
            row.update(loss_err=_rel(loss.detach(), ref_loss), gx_err=_rel(x.grad, ref_gx), gw_err=_rel(w.grad, ref_gw))
            for p in params:
                p.grad = None
            row["peak_fwbw_mib"] = round(_peak(fwbw, device), 1)
            for p in params:
                p.grad = None
            row["peak_fw_mib"] = round(_peak(fw, device), 1)
            row["fwbw_ms"] = round(_bench(fwbw, device), 3)
            row["fw_ms"] = round(_bench(fw, device), 3)
        except Exception as e:  # a missing feature or an out-of-memory is a row, not a crash
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        for p in params:
            p.grad = None
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


#: How the results record the command that produced them (``benchmarks/native_anchor.py`` sets its own).
COMMAND = "python -m fused_xent bench"


def environment(argv: list[str]) -> dict:
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        gpu=gpu,
        torch=torch.__version__,
        triton=triton.__version__,
        fused_xent=fused_xent.__version__,
        command=" ".join([COMMAND, *argv]),
    )


def to_markdown(env: dict, rows: list[dict], title: str = "fused_xent benchmark", err_digits: int = 1) -> str:
    head = "| case | method | fw+bw ms | peak MiB | fw ms | fw peak MiB | loss err | dX err | dW err |"
    e = f".{err_digits}e"
    lines = [f"# {title} — {env['gpu']}", ""]
    lines += [f"- {k}: `{v}`" for k, v in env.items()]
    lines += ["", head, "|" + "---|" * 9]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['method']} | error: {r['error']} |||||||")
            continue
        lines.append(
            f"| {r['case']} | {r['method']} | {r['fwbw_ms']:.2f} | {r['peak_fwbw_mib']:.0f} | {r['fw_ms']:.2f} | "
            f"{r['peak_fw_mib']:.0f} | {r['loss_err']:{e}} | {r['gx_err']:{e}} | {r['gw_err']:{e}} |"
        )
    return "\n".join(lines) + "\n"


def _json_row(row: dict) -> dict:
    """``row`` with NaN (a figure not measured: peak memory on the CPU) as null: strict JSON."""
    return {k: None if isinstance(v, float) and v != v else v for k, v in row.items()}


def plot_sweeps(rows: list[dict], env: dict, path: str) -> None:
    """Time against classes and peak memory against rows, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    swept = [s for s in SWEEPS if any(r.get("sweep") == s for r in rows)]
    panels = [(s, SWEEP_AXIS[s], y, label) for s in swept for y, label in (("fwbw_ms", "fw+bw ms"),
              ("peak_fwbw_mib", "peak extra MiB"))]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    axes = axes[0]
    for ax, (sweep, xkey, ykey, label) in zip(axes, panels, strict=True):
        done = [r for r in rows if r.get("sweep") == sweep and "error" not in r and r[ykey] == r[ykey]]  # not NaN
        for method in sorted({r["method"] for r in done}):
            pts = sorted((r[xkey], r[ykey]) for r in done if r["method"] == method)
            ax.plot(*zip(*pts, strict=True), marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel=xkey, ylabel=label, title=f"{label} vs {xkey} ({sweep} sweep)")
        ax.grid(True, which="both", alpha=0.3)
        if done:
            ax.legend(fontsize=7)
    dtype = "bf16" if torch.cuda.is_available() else "fp32"
    fig.suptitle(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {dtype}, {env['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m fused_xent bench", description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help=f"cases among {sorted(CASES)}")
    parser.add_argument("--only", nargs="*", help="methods whose name contains one of these")
    parser.add_argument("--out", default=None, help="folder for bench.json, bench.md and the plots")
    parser.add_argument("--sweep", nargs="*", default=[], help=f"sweeps among {sorted(SWEEPS)} (plotted)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = args.cases or (["gemma2"] if device == "cuda" else ["cpu_small"])
    for name, known, what in [(n, CASES, "case") for n in names] + [(s, SWEEPS, "sweep") for s in args.sweep]:
        if name not in known:  # before any run: a bad name must not cost a whole case first
            parser.error(f"unknown {what} {name!r}; choose from {sorted(known)}")
    rows = []
    for name in names:
        rows += run_case(name, CASES[name], device, args.only)
    for sweep in args.sweep:
        for i, case in enumerate(SWEEPS[sweep]):
            rows += [dict(r, sweep=sweep) for r in run_case(f"{sweep}{i}", case, device, args.only or SWEEP_METHODS)]
    env = environment(argv)
    md = to_markdown(env, rows)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench.json"), "w") as f:
            json.dump(dict(env=env, rows=[_json_row(r) for r in rows]), f, indent=1, allow_nan=False)
        with open(os.path.join(args.out, "bench.md"), "w") as f:
            f.write(md)
        if args.sweep:
            plot_sweeps(rows, env, os.path.join(args.out, "sweeps.png"))
    print(md)
