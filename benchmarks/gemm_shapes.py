"""The cuBLAS GEMMs of the lean and CLIP backwards at the SPEC's shapes, one at a time.

For each GEMM the class-chunked (lean) and CLIP strategies issue per chunk, at the chunk widths
the bench's memory budgets give, this times the call as the package makes it and a few other
ways to get the same numbers: the dX accumulation transposed (``dX.T += W_k.T @ dU.T``), with
an fp32 output but no accumulation, with a bf16 output (the rate a plain GEMM of that shape
reaches), and split along its long reduction into a batch (``baddbmm`` into s fp32 slots,
summed once at the end). It prints ms and TFLOP/s per variant and, under torch.profiler, the
name of the kernel cuBLAS ran.

    PYTHONPATH=. python benchmarks/gemm_shapes.py          # on the GPU machine, ~1 min
"""

import argparse

import torch
from triton.testing import do_bench

#: (name, rows N, width D, classes per chunk): the lean chunks of ``budget_chunk_bytes`` at
#: the bench's budgets (Gemma 2 and Llama 3 at 1300 MiB, 1M classes at 1100 MiB).
LEAN = [("gemma2", 8192, 2304, 6080), ("llama3", 8192, 4096, 10368), ("1m", 4096, 512, 13752)]
#: CLIP at B = 32768, D = 768: the backward's tile (16384 rows x 3072 columns) and the forward's
#: block (every row x 3072 columns).
CLIP = (32768, 768, 16384, 3072)


def _variants_lean(N, D, c, dev):
    x = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
    w = torch.randn(c, D, device=dev, dtype=torch.bfloat16)
    du = torch.randn(N, c, device=dev, dtype=torch.bfloat16) * 0.01
    raw = torch.empty(N, c, device=dev, dtype=torch.bfloat16)
    dw = torch.empty(c, D, device=dev, dtype=torch.bfloat16)
    dx = torch.zeros(N, D, device=dev)
    dxt = torch.zeros(D, N, device=dev)
    out = {
        "fwd x@Wk.T -> bf16": lambda: torch.mm(x, w.T, out=raw),
        "dW dU.T@x -> bf16": lambda: torch.mm(du.T, x, out=dw),
        "dX += dU@Wk (fp32, now)": lambda: torch.addmm(dx, du, w, out_dtype=torch.float32, out=dx),
        "dX.T += Wk.T@dU.T (fp32)": lambda: torch.addmm(dxt, w.T, du.T, out_dtype=torch.float32, out=dxt),
        "dX = dU@Wk (fp32, beta 0)": lambda: torch.mm(du, w, out_dtype=torch.float32, out=dx),
        "dX = dU@Wk (bf16 out)": lambda: torch.mm(du, w),
    }
    out.update(_split_k("dX", du, w, N, D, c, dev))
    return out, 2 * N * D * c


def _split_k(name, a, b, M, Nn, K, dev):
    """``a @ b`` (M x K, K x Nn) as s batched GEMMs over K slices into s fp32 accumulators."""
    out = {}
    for s in (2, 4):
        if K % s:
            continue
        k = K // s
        a_b = a.as_strided((s, M, k), (k * a.stride(1), a.stride(0), a.stride(1)))
        b_b = b.as_strided((s, k, Nn), (k * b.stride(0), b.stride(0), b.stride(1)))
        acc = torch.zeros(s, M, Nn, device=dev)

        def call(acc=acc, a_b=a_b, b_b=b_b):
            return torch.baddbmm(acc, a_b, b_b, out_dtype=torch.float32, out=acc)

        try:
            call()
        except Exception as e:  # noqa: BLE001 - a variant torch cannot run is reported, not fatal
            print(f"{name} split {s}: {type(e).__name__}: {e}")
            continue
        ref = torch.mm(a, b, out_dtype=torch.float32)
        err = ((acc.sum(0) - ref).norm() / ref.norm()).item()
        print(f"{name} split {s} ({M}x{Nn}, K={K}): relative difference from one GEMM {err:.1e}")
        out[f"{name} += split-K {s} (baddbmm fp32)"] = call
    return out


def _variants_clip(B, D, tile, cc, dev):
    x = torch.randn(B, D, device=dev, dtype=torch.bfloat16)
    y = torch.randn(B, D, device=dev, dtype=torch.bfloat16)
    dz = torch.randn(tile, cc, device=dev, dtype=torch.bfloat16) * 0.01
    raw = torch.empty(tile, cc, device=dev, dtype=torch.bfloat16)
    fwd = torch.empty(B, cc, device=dev, dtype=torch.bfloat16)
    dy_acc = torch.zeros(cc, D, device=dev)
    dy_acc_t = torch.zeros(D, cc, device=dev)
    dx_acc = torch.zeros(tile, D, device=dev)
    xt, yc = x[:tile], y[:cc]
    flops_tile = 2 * tile * cc * D
    f32 = torch.float32
    out = {
        "fwd block X@Yc.T -> bf16 (B rows)": (lambda: torch.mm(x, yc.T, out=fwd), 2 * B * cc * D),
        "recompute tile -> bf16": (lambda: torch.mm(xt, yc.T, out=raw), flops_tile),
        "dY += dz.T@X (fp32, now)": (lambda: torch.addmm(dy_acc, dz.T, xt, out_dtype=f32, out=dy_acc), flops_tile),
        "dY.T += X.T@dz (fp32)": (lambda: torch.addmm(dy_acc_t, xt.T, dz, out_dtype=f32, out=dy_acc_t), flops_tile),
        "dY = dz.T@X (bf16 out)": (lambda: torch.mm(dz.T, xt), flops_tile),
        "dX += dz@Yc (fp32, now)": (lambda: torch.addmm(dx_acc, dz, yc, out_dtype=f32, out=dx_acc), flops_tile),
        "dX = dz@Yc (bf16 out)": (lambda: torch.mm(dz, yc), flops_tile),
    }  # fmt: skip
    for key, call in _split_k("dY", dz.T, xt, cc, D, tile, dev).items():
        out[key] = (call, flops_tile)
    return out


def _kernel_name(call) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return " + ".join(n[:90] for n in names) or "?"


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    dev = "cuda"
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows = []
    for name, N, D, c in LEAN:
        calls, flops = _variants_lean(N, D, c, dev)
        for label, call in calls.items():
            ms = do_bench(call, warmup=25, rep=200)
            rows.append((f"lean {name} N={N} D={D} c={c}", label, ms, flops / ms / 1e9, _kernel_name(call)))
        del calls
        torch.cuda.empty_cache()
    B, D, tile, cc = CLIP
    for label, (call, flops) in _variants_clip(B, D, tile, cc, dev).items():
        ms = do_bench(call, warmup=25, rep=200)
        rows.append((f"clip B={B} tile={tile} cc={cc}", label, ms, flops / ms / 1e9, _kernel_name(call)))
    for case, label, ms, tflops, kernel in rows:
        print(f"{case:36s} {label:36s} {ms:8.3f} ms {tflops:6.0f} TFLOP/s  {kernel}")


if __name__ == "__main__":
    main()
