"""``kernels.launch``: the cached launch path against Triton's own.

On the CPU (the interpreter) ``FastKernel`` takes Triton's path; the key and the parameter
order it would use are checked here on a compiled-kernel object built without a GPU. The
launches themselves are checked on a GPU (marked ``gpu``): the cached path must give what
Triton's path gives for every specialisation the key separates."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from fused_xent.kernels import launch
from fused_xent.kernels.launch import FastKernel, arg_key, fast_jit


def _copy_shifted(X, Y, n, shift, step, SCALE: tl.constexpr, FLAG: tl.constexpr = False, BLOCK: tl.constexpr = 128):
    """``Y[i] = SCALE * X[i * step] + shift (+ 1 with FLAG)`` for i < n."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    v = tl.load(X + offs * step, mask=mask, other=0.0) * SCALE + shift
    if FLAG:
        v += 1.0
    tl.store(Y + offs, v, mask=mask)


def _key(args: tuple):
    return arg_key(args)[0]


def test_key_separates_what_triton_specialises():
    t = torch.zeros(64)
    keys = [
        _key((t,)),
        _key((t[1:],)),  # 4-byte offset: not 16-byte aligned
        _key((t.to(torch.float16),)),
        _key((1,)),
        _key((True,)),
        _key((1.0,)),
        _key((16,)),
        _key((17,)),
        _key((2**31,)),
        _key((None,)),
    ]
    assert len(set(keys)) == len(keys)
    assert _key((t[4:],)) == _key((t,))  # 16-byte offset: the same specialisation
    assert _key((object(),)) is None  # another kind of argument: Triton's own path


def test_launch_values_pass_addresses_for_tensors():
    t = torch.zeros(64)
    assert arg_key((t[4:], 3, None, 0.5))[1] == [t[4:].data_ptr(), 3, None, 0.5]


def test_tail_orders_keywords_and_defaults_as_the_signature():
    kernel = FastKernel(JITFunction(_copy_shifted))
    assert kernel._tail(5, dict(SCALE=2.0, BLOCK=64, num_warps=4)) == (2.0, False, 64)
    assert kernel._tail(5, dict(FLAG=True, SCALE=3.0)) == (3.0, True, 128)
    assert kernel._tail(5, dict(BLOCK=64)) is None  # SCALE has no default
    assert kernel._tail(5, dict(SCALE=1.0, n=3)) is None  # a keyword for a positional parameter


def test_a_launch_hook_sends_launches_through_triton():
    from triton import knobs

    assert not launch._hooked()  # Triton 3.6+ keeps empty hook chains: not a hook
    chain = knobs.runtime.launch_enter_hook

    def hook(metadata):
        return None

    if hasattr(chain, "add"):
        chain.add(hook)
        try:
            assert launch._hooked()
        finally:
            chain.remove(hook)
    else:  # a Triton whose hook is a plain attribute
        knobs.runtime.launch_enter_hook = hook
        try:
            assert launch._hooked()
        finally:
            knobs.runtime.launch_enter_hook = chain
    assert not launch._hooked()


def test_attributes_are_the_kernels():
    fn = JITFunction(_copy_shifted)
    assert FastKernel(fn).arg_names == fn.arg_names


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cached_launches_equal_tritons():
    kernel = fast_jit(triton.jit(_copy_shifted))
    x = torch.randn(1000, device="cuda")
    cases = [
        (x, 1000, 0.5, 1, dict(SCALE=2.0)),
        (x[1:], 999, 0.5, 1, dict(SCALE=2.0)),  # misaligned pointer
        (x, 500, -1.0, 2, dict(SCALE=2.0)),  # step 2: another int specialisation
        (x, 16, 3, 1, dict(SCALE=-1.0, FLAG=True, BLOCK=64)),  # an int shift
        (x[3:], 17, 0.25, 3, dict(SCALE=1.0, BLOCK=256, num_warps=2)),
    ]
    for round_ in range(3):  # the first launch per key compiles through Triton, the later ones are cached
        for src, n, shift, step, kw in cases:
            y = torch.full((n + 5,), float("nan"), device="cuda")
            kernel[(triton.cdiv(n, kw.get("BLOCK", 128)),)](src, y, n, shift, step, **kw)
            expected = src[: n * step : step] * kw["SCALE"] + shift + (1.0 if kw.get("FLAG") else 0.0)
            torch.testing.assert_close(y[:n], expected, rtol=0, atol=0, msg=f"round {round_}, n={n}")
            assert torch.isnan(y[n:]).all()
    assert len(kernel._cache) == len(cases)
    # a CPU tensor where a cached key had a GPU one: Triton's path, which refuses it (the cached
    # launch would hand the kernel a host address)
    with pytest.raises(ValueError, match="cpu tensor"):
        kernel[(1,)](x.cpu(), torch.empty(1000, device="cuda"), 1000, 0.5, 1, SCALE=2.0)
