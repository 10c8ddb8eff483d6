"""Lean's training forward two ways, on bench cases: production (cuBLAS class chunks, then the
stats kernel over each) against the streaming Triton forward that no-grad calls use
(``linear_xent_forward``: no logits written). The question: where K is small (1M classes, K = 512)
the streaming forward took 10.7 ms against ~11.5 for a GEMM plus a stats pass; does lean gain
that, with its errors unchanged (the backward then recomputes bf16-rounded logits against an lse
taken from unrounded ones)?

    PYTHONPATH=. python benchmarks/lean_forward_choice.py CASE [CASE ...]

Each row is ``bench.run_case`` for ``fused_xent[lean]`` (and ``[filtered]`` unchanged, as a
control), once with the package as is and once with lean's training forward swapped.
"""

import sys

import torch

from fused_xent import bench, functional
from fused_xent.kernels.class_chunked import class_chunked_backward
from fused_xent.kernels.linear_xent_forward import linear_xent_forward


def _streaming(x, w, b, scale, rt, opts, need_lin=True, **_):
    return linear_xent_forward(x, w, b, scale, rt, opts, need_lin)


def main() -> None:
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| case | lean forward | fw+bw ms | peak MiB | dX err | dW err |")
    print("|---|---|---|---|---|---|")
    production = functional._BACKENDS["class_chunked"]
    swapped = functional.Backend("class_chunked", _streaming, class_chunked_backward, linear_xent_forward)
    for name in sys.argv[1:]:
        for label, backend in (("production", production), ("streaming", lambda: swapped)) * 2:
            functional._BACKENDS["class_chunked"] = backend
            for r in bench.run_case(name, bench.CASES[name], "cuda", only=["fused_xent[lean]"]):
                cells = f"{r['fwbw_ms']:.2f} | {r['peak_fwbw_mib']:.0f} | {r['gx_err']:.2e} | {r['gw_err']:.2e}"
                print(f"| {name} | {label} | {cells} |", flush=True)
            torch.cuda.empty_cache()
    functional._BACKENDS["class_chunked"] = production


if __name__ == "__main__":
    main()
