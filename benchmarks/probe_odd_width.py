"""Experiment (not used by the package): cuBLAS on a class chunk whose width is odd.

Lean and filtered put the last ``C % 8`` classes in a chunk of their own (``_chunk_ranges``):
at ViT-21k (C = 21841) one class costs a whole chunk of launches (raw products, grad kernel,
db, dW, dX). The buffer's row pitch stays a multiple of 128 whatever the chunk's width, so the
question is whether an odd width alone (an odd M of the dW GEMM, an odd K of the dX GEMM)
sends cuBLAS to a slow kernel. Times the two GEMMs of the last ViT-21k chunk with the tail
class in it against the aligned width, and the raw products' GEMM likewise.

    PYTHONPATH=. python benchmarks/probe_odd_width.py
"""

import torch
from triton.testing import do_bench

from fused_xent.kernels.class_chunked import _mm_fp32


def _ms(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def _row(x, w, buf, dw, dx, c0: int, width: int) -> str:
    """The four GEMMs of the chunk ``[c0, c0 + width)`` timed, as a table row."""
    du, wk = buf[:, :width], w[c0 : c0 + width]
    out = torch.empty_like(x)
    t_raw = _ms(lambda: torch.mm(x, wk.T, out=du))
    t_dw = _ms(lambda: torch.mm(du.T, x, out=dw[c0 : c0 + width]))
    t_dx = _ms(lambda: torch.addmm(dx, du, wk, out_dtype=torch.float32, out=dx))
    t_dxb = _ms(lambda: torch.mm(du, wk, out=out))
    return f"| {width} | {t_raw:.4f} | {t_dw:.4f} | {t_dx:.4f} | {t_dxb:.4f} |"


def main() -> None:
    torch.manual_seed(0)
    N, D, C = 4096, 768, 21841
    c0 = 10920
    pitch = 11008  # a multiple of 128 above the widest chunk
    x = torch.randn(N, D, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(C, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    buf = torch.randn(N, pitch, device="cuda", dtype=torch.bfloat16)
    dw = torch.empty_like(w)
    dx = torch.empty(N, D, device="cuda", dtype=torch.float32)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; last ViT-21k chunk from class {c0}")
    print("| width | raw products ms | dW = dU.T @ X ms | dX += dU @ W ms | dX (bf16 out) ms |")
    print("|---|---|---|---|---|")
    for width in (C - C % 8 - c0, C - c0):
        print(_row(x, w, buf, dw, dx, c0, width))
    # the results agree with the aligned GEMMs plus the tail's own
    width = C - c0
    du = buf[:, :width]
    whole = _mm_fp32(du.T, x)
    split = torch.cat([_mm_fp32(du[:, : width - 1].T, x), _mm_fp32(du[:, width - 1 :].T, x)])
    diff = float((whole - split).abs().max() / whole.abs().max())
    print(f"# dW rows: max |odd-width GEMM - split| / max = {diff:.1e}")


if __name__ == "__main__":
    main()
