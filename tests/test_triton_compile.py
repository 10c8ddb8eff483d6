"""The production kernels' GPU compile, without a GPU.

The CPU tests run the kernels through Triton's interpreter, which never compiles them. Some
mistakes only the compiler sees: one is a global annotated as a constexpr
(``X: tl.constexpr = 1.0``), which the interpreter runs and Triton 3.6 refuses. Session 8 lost
a device run to it. Here a subprocess without ``TRITON_INTERPRET`` compiles the streaming
forward kernel for Hopper (sm_90) with the installed Triton, in its TMA-descriptor and pointer
variants: AST, TTIR, TTGIR, PTX and ptxas.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

COMPILE_FORWARD = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_xent.kernels import config
from fused_xent.kernels.linear_xent_forward import linear_xent_forward_kernel as kernel

blocks = dict(config.forward_blocks(__import__("torch").device("cuda")))
options = dict(num_warps=blocks.pop("num_warps"), num_stages=blocks.pop("num_stages"))
ints = ["N", "C", "D", "tiles_per_split", "stride_xn", "stride_xd", "stride_wc", "stride_wd", "stride_tn", "stride_tc"]
sparse = dict(HAS_HARD=True, HAS_Y2=True, HAS_DENSE=False, HAS_WEIGHT=False, HAS_SMOOTHING=True)
dense = dict(HAS_HARD=False, HAS_Y2=False, HAS_DENSE=True, HAS_WEIGHT=True, HAS_SMOOTHING=False)
for use_tma in (True, False):
    for targets in (sparse, dense):
        constexprs = dict(targets, HAS_BIAS=True, HAS_SOFTCAP=True, NEED_LIN=True, UNIT_SCALE=False,
                          USE_TMA=use_tma, UPCAST=False, DOT_PRECISION="tf32", **blocks)
        signature = {}
        for name in kernel.arg_names:
            if name in constexprs:
                signature[name] = "constexpr"
            elif name in ints:
                signature[name] = "i32"
            elif name == "softcap":
                signature[name] = "fp32"
            elif name in ("X", "W"):
                signature[name] = "*bf16"
            elif name in ("Y1", "Y2"):
                signature[name] = "*i64"
            elif name == "x_desc":
                signature[name] = f"tensordesc<bf16[{blocks['BLOCK_N']},{blocks['BLOCK_D']}]>"
            elif name == "w_desc":
                signature[name] = f"tensordesc<bf16[{blocks['BLOCK_C']},{blocks['BLOCK_D']}]>"
            else:
                signature[name] = "*fp32"
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        assert compiled.asm["cubin"], (use_tma, targets)
        print("compiled", "tma" if use_tma else "pointers", "sparse" if targets is sparse else "dense")
"""


def test_forward_kernel_compiles_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    try:
        done = subprocess.run(
            [sys.executable, "-c", COMPILE_FORWARD], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the forward kernel took over 10 minutes")
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("compiled") == 4, done.stdout
