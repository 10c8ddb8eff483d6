"""Triton launches at the compiled launcher's own host cost.

``kernel[grid](*args, **constexprs)`` goes through ``JITFunction.run`` on every launch: it
specialises each argument (dtype, 16-byte alignment, divisibility by 16, integer width),
hashes the result with the options, looks the compiled kernel up, then calls its launcher.
On the H100 machine the kernels here (30-50 arguments) paid 45-110 us of host time per launch
that way, more than their GPU time on a small head (``benchmarks/host_breakdown.py``).

``fast_jit`` wraps a ``triton.jit`` kernel so that the first launch for a given key goes
through Triton (compiling if needed) and later ones call the compiled launcher directly.
The key refines Triton's own specialisation, so it never picks a kernel Triton would not:

- a tensor: its dtype and whether its address is a multiple of 16 (Triton: the same two), and
  whether it is on the GPU (the cached launch passes its address, unchecked);
- an int, float, bool or None: its type and value (Triton: the type, an int's width, whether
  it is 1 or a multiple of 16: all functions of the value);
- the keyword arguments (constexprs and launch options) by value, the current device and
  Triton's instrumentation mode (a compile option it reads per launch).

The cached path passes no launch metadata and no hooks (Triton 3.6 builds the metadata and
calls its empty hook chains on every launch). Anything else takes Triton's own path: an
argument of another kind (a tensor descriptor), a callable grid, a launch hook that is set
(a profiler such as proton), Triton's debug mode, the interpreter, or a Triton whose launch
path was not read for this (outside 3.6-3.9).
"""

from __future__ import annotations

import torch
import triton
from triton import knobs
from triton.runtime.driver import driver

#: The Triton releases whose ``JITFunction.run`` calls ``CompiledKernel.run`` as
#: ``FastKernel.run`` does (3.6's and 3.9's read).
_KNOWN = (3, 6) <= tuple(int(p) for p in triton.__version__.split(".")[:2]) < (3, 10)
#: Compiled kernels kept per wrapped kernel; past it the cache starts over (a key that
#: keeps changing, such as a NaN float, never hits and must not grow the cache).
_MAX_KEYS = 256


def _enabled() -> bool:
    """The fast path is possible at all: a Triton release read for it, not the interpreter
    (``TRITON_INTERPRET`` is read once: Triton itself reads it when it is imported)."""
    global _ENABLED
    if _ENABLED is None:
        from fused_xent.kernels.config import interpreting

        _ENABLED = _KNOWN and not interpreting()
    return _ENABLED


_ENABLED: bool | None = None


def _hooked() -> bool:
    """Whether a launch hook is set (a profiler such as proton). Triton 3.6 keeps its hooks in
    ``HookChain`` objects, empty when none is set, and calls them on every launch anyway."""
    runtime = knobs.runtime
    return any(
        h is not None and getattr(h, "calls", True) for h in (runtime.launch_enter_hook, runtime.launch_exit_hook)
    )


def arg_key(args: tuple) -> tuple[tuple | None, list]:
    """The part of the key from the positional arguments (see the module docstring), and the
    values the compiled launcher gets for them: a tensor's address instead of the tensor
    (Triton's C launcher then skips its ``data_ptr`` call and its ``cuPointerGetAttribute``
    check per pointer). A tensor's key holds ``is_cuda``, so a CPU tensor never reaches the
    launcher as an address: it takes Triton's path, which refuses it. ``(None, [])`` for an
    argument of another kind."""
    key: list = []
    values: list = []
    for a in args:
        if isinstance(a, torch.Tensor):
            ptr = a.data_ptr()
            key.append((a.dtype, a.is_cuda, ptr % 16 == 0))
            values.append(ptr)
        elif a is None or isinstance(a, (int, float)):  # bool is an int: its type keeps it apart
            key.append((type(a), a))
            values.append(a)
        else:
            return None, []
    return tuple(key), values


class FastKernel:
    """A ``triton.jit`` kernel launched as ``kernel[grid](*args, **kwargs)``, caching the
    compiled launcher per key (module docstring). Every other attribute is the kernel's."""

    def __init__(self, fn) -> None:
        self.fn = fn
        #: key -> (compiled kernel, the values of the parameters after the positional ones)
        self._cache: dict = {}

    def __getattr__(self, name: str):
        return getattr(self.fn, name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(grid, args, kwargs)

    def run(self, grid, args: tuple, kwargs: dict):
        """Launch on ``grid`` (a tuple of 1-3 ints); returns the compiled kernel."""
        if not (_enabled() and type(grid) is tuple) or _hooked():
            return self.fn[grid](*args, **kwargs)
        key, values = arg_key(args)
        if key is None or knobs.runtime.debug:
            return self.fn[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        try:
            key = (device, knobs.compilation.instrumentation_mode, key, *kwargs.items())
            entry = self._cache.get(key)
        except TypeError:  # an unhashable keyword value
            return self.fn[grid](*args, **kwargs)
        if entry is None:
            compiled = self.fn[grid](*args, **kwargs)
            tail = self._tail(len(args), kwargs)
            if tail is not None and hasattr(compiled, "packed_metadata"):  # a compiled kernel, launched
                if len(self._cache) >= _MAX_KEYS:
                    self._cache.clear()
                self._cache[key] = (compiled, tail)
            return compiled
        compiled, tail = entry
        compiled.run(
            grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
            driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata, None, None, None,
            *values, *tail,
        )  # fmt: skip
        return compiled

    def _tail(self, n_args: int, kwargs: dict) -> tuple | None:
        """The values of the parameters after the ``n_args`` positional ones, in the kernel's
        order (Triton's ``bound_args.values()`` continues with them): from ``kwargs``, else
        their defaults. None when a keyword names a parameter given by position or one is
        missing (Triton has raised then), or the kernel has no ``params`` to read."""
        params = getattr(self.fn, "params", None)
        if params is None or n_args > len(params) or any(p.name in kwargs for p in params[:n_args]):
            return None
        tail = []
        for p in params[n_args:]:
            if p.name in kwargs:
                tail.append(kwargs[p.name])
            elif p.has_default:
                tail.append(p.default)
            else:
                return None
        return tuple(tail)


def fast_jit(fn) -> FastKernel:
    """Decorate a ``triton.jit`` kernel (applied after it) so that its launches take
    ``FastKernel``'s path."""
    return FastKernel(fn)
