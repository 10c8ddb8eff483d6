"""Host cost of one launch on this machine: a Triton kernel with few and with many arguments
(as fused_xent's per-chunk kernels take), a small torch.mm into a preallocated output, and a
small elementwise torch op. Trivial GPU work, no sync inside the timed loop: the host's time per
launch. ``PYTHONPATH=. python benchmarks/launch_cost.py``"""

import torch
import triton
import triton.language as tl

from fused_xent.bench import host_time


@triton.jit
def few_args(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


@triton.jit
def many_args(X, Y, P0, P1, P2, P3, P4, P5, P6, P7, P8, P9, P10, P11, n, i0, i1, i2, i3, i4, i5, i6, f0, f1,
              A: tl.constexpr, B: tl.constexpr, C: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
              F: tl.constexpr, G: tl.constexpr, H: tl.constexpr, K: tl.constexpr, J: tl.constexpr,
              BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)


def per_call(fn, n=2000) -> float:
    return host_time(fn, n, warmup=50) * 1e6


x = torch.randn(4096, device="cuda")
y = torch.empty_like(x)
ps = [torch.empty(16, device="cuda") for _ in range(12)]
flags = dict(A=True, B=False, C=True, D=False, E=True, F=False, G=True, H=False, K=True, J=False)
a = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
out = torch.empty(64, 64, device="cuda", dtype=torch.bfloat16)
rows = {
    "Triton, 3 arguments + 1 constexpr": lambda: few_args[(4,)](x, y, 4096, BLOCK=1024),
    "Triton, 24 arguments + 11 constexpr": lambda: many_args[(4,)](
        x, y, *ps, 4096, 3, 5, 7, 9, 11, 13, 15, 0.5, 1.5, **flags, BLOCK=1024
    ),
    "torch.mm(out=), 64 x 64 bf16": lambda: torch.mm(a, a, out=out),
    "torch.add, 4096 fp32": lambda: torch.add(x, 1.0),
}


def _pieces() -> dict:
    """The parts of one ``many_args[grid](...)`` launch (Triton 3.6's ``JITFunction.run``)
    timed alone: the argument binder (specialisation), the cache key, the launch metadata and
    the compiled kernel's own launcher called directly."""
    from triton import knobs
    from triton.runtime.driver import driver
    from triton.runtime.jit import compute_cache_key

    args = (x, y, *ps, 4096, 3, 5, 7, 9, 11, 13, 15, 0.5, 1.5)
    kw = dict(**flags, BLOCK=1024)
    kernel = many_args[(4,)](*args, **kw)
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    kernel_cache, key_cache, _, _, binder = many_args.device_caches[device]
    full = dict(kw, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, spec, opts = binder(*args, **full)
    values = tuple(bound.values())
    meta = kernel.launch_metadata((4,), stream, *values)
    hooks = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    fn, packed = kernel.function, kernel.packed_metadata
    get_stream, get_device = driver.active.get_current_stream, driver.active.get_current_device
    return {
        "  of which: stream and device lookup": lambda: get_stream(get_device()),
        "  of which: binder (specialisation)": lambda: binder(*args, **full),
        "  of which: cache key": lambda: compute_cache_key(key_cache, spec, opts),
        "  of which: launch metadata": lambda: kernel.launch_metadata((4,), stream, *values),
        "  of which: compiled launcher, called directly": lambda: kernel.run(
            4, 1, 1, stream, fn, packed, meta, *hooks, *values
        ),
    }  # fmt: skip


def _cached() -> dict:
    """``kernels.launch``'s cached path for the same launch, and its parts: the key, the
    launcher given the tensors, the launcher given their addresses (no ``data_ptr`` call and no
    ``cuPointerGetAttribute`` per pointer in Triton's C launcher)."""
    from triton import knobs
    from triton.runtime.driver import driver

    from fused_xent.kernels import launch

    fast = launch.FastKernel(many_args)
    args = (x, y, *ps, 4096, 3, 5, 7, 9, 11, 13, 15, 0.5, 1.5)
    kw = dict(**flags, BLOCK=1024)
    kernel = fast[(4,)](*args, **kw)
    fast[(4,)](*args, **kw)
    assert fast._cache, "the cached path did not fill"
    device = torch.cuda.current_device()
    stream = driver.active.get_current_stream(device)
    fn, packed = kernel.function, kernel.packed_metadata
    tail = fast._tail(len(args), kw)
    ints = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)
    return {
        "kernels.launch cached path, 24 arguments + 11 constexpr": lambda: fast[(4,)](*args, **kw),
        "  of which: arg_key": lambda: launch.arg_key(args),
        "  of which: _hooked + debug + instrumentation knobs": lambda: (
            launch._hooked(), knobs.runtime.debug, knobs.compilation.instrumentation_mode
        ),
        "  of which: current device + stream": lambda: driver.active.get_current_stream(torch.cuda.current_device()),
        "  launcher, tensors": lambda: kernel.run(4, 1, 1, stream, fn, packed, None, None, None, *args, *tail),
        "  launcher, int addresses": lambda: kernel.run(4, 1, 1, stream, fn, packed, None, None, None, *ints, *tail),
    }  # fmt: skip


try:
    rows.update(_cached())
except Exception as e:
    print(f"# the cached path not timed: {type(e).__name__}: {e}")
try:
    rows.update(_pieces())
except Exception as e:  # another Triton's internals: the whole-launch rows still stand
    print(f"# the launch's parts not timed: {type(e).__name__}: {e}")
print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}")
print("| launch | host us per call (median of 3 runs of 2000) |")
print("|---|---|")
for name, fn in rows.items():
    print(f"| {name} | {sorted(per_call(fn) for _ in range(3))[1]:.1f} |")
