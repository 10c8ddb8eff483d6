"""The production kernels' GPU compile, without a GPU.

The CPU tests run the kernels through Triton's interpreter, which never compiles them. Some
mistakes only the compiler sees: one is a global annotated as a constexpr
(``X: tl.constexpr = 1.0``), which the interpreter runs and Triton 3.6 refuses. Session 8 lost
a device run to it.

Here every kernel launch of a small workload is recorded under the interpreter: the kernel, its
argument types (tensor dtypes, TMA descriptors' block shapes), its constexpr values and
``num_warps`` / ``num_stages``. The workload covers the streaming, lean, fast and filtered
backends, the CLIP and SigLIP losses and the margin head, in bf16 and fp32. A subprocess without
``TRITON_INTERPRET`` then compiles each distinct launch for Hopper (sm_90) with the installed
Triton: AST, TTIR, TTGIR, PTX, ptxas. The interpreter's bf16 work-around (``UPCAST``) is
switched off there, as on a GPU. The tiles are the interpreter's (small), not the GPU's.
"""

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

COMPILE = """
import importlib, json, sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

failures = []
launches = json.load(sys.stdin)
for launch in launches:
    kernel = getattr(importlib.import_module(launch["module"]), launch["name"])
    src = ASTSource(fn=kernel, signature=launch["signature"], constexprs=launch["constexprs"])
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch["options"])
    except Exception as e:  # every failing launch is reported, not only the first
        failures.append(f"{launch['module']}.{launch['name']} {launch['constexprs']}: {type(e).__name__}: {e}")
print(f"compiled {len(launches) - len(failures)} of {len(launches)}")
for f in failures:
    print(f[:3000], file=sys.stderr)
sys.exit(1 if failures else 0)
"""

_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "i1",
}


def _type_of(value) -> str:
    from triton.tools.tensor_descriptor import TensorDescriptor

    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, TensorDescriptor):
        return f"tensordesc<{_DTYPES[value.base.dtype]}[{','.join(str(b) for b in value.block_shape)}]>"
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _record_launches(workload) -> list[dict]:
    """Every distinct kernel launch that ``workload()`` makes under the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = {}
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
        sig = inspect.signature(self.fn)
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        signature, constexprs = {}, {}
        for name, value in bound.arguments.items():
            if "constexpr" in str(sig.parameters[name].annotation):
                signature[name] = "constexpr"
                constexprs[name] = False if name == "UPCAST" else value  # the GPU's value
            else:
                signature[name] = _type_of(value)
        launch = dict(module=self.fn.__module__, name=self.fn.__name__, signature=signature, constexprs=constexprs,
                      options=options)  # fmt: skip
        launches.setdefault(json.dumps(launch, sort_keys=True), launch)
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        workload()
    finally:
        InterpretedFunction.run = run
    return list(launches.values())


def _workload() -> None:
    import torch.nn.functional as F

    from fused_xent import linear_cross_entropy
    from fused_xent.integrations import margins, open_clip

    g = torch.Generator().manual_seed(0)
    N, D, C = 40, 32, 300
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(C, D, generator=g) / 4).to(dtype).requires_grad_()
        b = torch.randn(C, generator=g).to(dtype).requires_grad_()
        y = torch.randint(0, C, (N,), generator=g)
        y2 = torch.randint(0, C, (N,), generator=g)
        probs = torch.softmax(torch.randn(N, C, generator=g), -1)
        cw = torch.rand(C, generator=g)
        scale = torch.tensor(1.3, requires_grad=True)
        for impl in ("triton", "lean", "fast", "filtered"):
            calls = [
                dict(target=y),
                dict(target=y, linear_bias=b, label_smoothing=0.1, softcap=3.0, z_loss=1e-3, scale=scale),
                dict(target=y, target2=y2, lam=0.3, weight=cw),
                dict(target=probs.to(dtype), linear_bias=b),
            ]
            for kw in calls:
                target = kw.pop("target")
                linear_cross_entropy(x, w, target, impl=impl, **kw).backward()
                with torch.no_grad():
                    linear_cross_entropy(x, w, target, impl=impl, **kw)
        images = F.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype).requires_grad_()
        texts = F.normalize(torch.randn(N, D, generator=g), dim=-1).to(dtype).requires_grad_()
        logit_scale = torch.tensor(2.0, requires_grad=True)
        for impl in ("lean", "triton"):
            open_clip.FusedClipLoss(impl=impl)(images, texts, logit_scale).backward()
        open_clip.FusedSigLipLoss()(images, texts, logit_scale, torch.tensor(-1.0, requires_grad=True)).backward()
        margins.margin_cross_entropy(x, w, y, s=30.0, m2=0.5, impl="lean").backward()


def test_every_kernel_launch_compiles_for_hopper():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("records launches through the interpreter (a GPU run compiles the kernels anyway)")
    launches = _record_launches(_workload)
    names = {launch["name"] for launch in launches}
    expected_kernels = ("linear_xent_forward_kernel", "chunk_stats_kernel", "chunk_grad_kernel", "row_targets_kernel",
                        "scale_in_place_kernel", "kept_counts_kernel", "chunk_grad_tma_kernel")  # fmt: skip
    for expected in expected_kernels:
        assert expected in names, names
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    try:
        done = subprocess.run(
            [sys.executable, "-c", COMPILE], input=json.dumps(launches), env=env, cwd=ROOT, capture_output=True,
            text=True, timeout=1200,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("compiling the recorded launches took over 20 minutes")
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    assert done.stdout.startswith(f"compiled {len(launches)} of {len(launches)}"), done.stdout
