"""A call of torch's own ``F.linear_cross_entropy`` (torch >= 2.13) made to fused_xent instead,
arguments unchanged (``options`` included): the same loss and gradients as torch's reference
path (``options=None``, the materialised logits)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import fused_xent

NATIVE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
needs_native = pytest.mark.skipif(not NATIVE, reason="torch < 2.13 has no F.linear_cross_entropy")
C, D = 13, 6

# every argument the two functions share: reduction, ignore_index (torch's default None, the
# usual -100, and a class some row carries), label_smoothing, class weights, a bias
GRID = list(itertools.product(["mean", "sum", "none"], [None, -100, 4], [0.0, 0.2], [False, True], [False, True]))


def _problem(shape, dtype, weight: bool, bias: bool, ignore_index, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, D, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(C, D, generator=g, dtype=torch.float64) / D**0.5).to(dtype)
    y = torch.randint(0, C, shape, generator=g)
    if y.dim():
        y[0] = -100 if ignore_index is None else ignore_index  # one row ignored (torch's None is -100)
    kw = {}
    if weight:
        kw["weight"] = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    if bias:
        kw["linear_bias"] = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    return x, w, y, kw


def _loss_and_grads(fn, x, w, y, kw, **call):
    x, w = (t.detach().clone().requires_grad_() for t in (x, w))
    kw = {k: (v.detach().clone().requires_grad_() if k == "linear_bias" else v) for k, v in kw.items()}
    loss = fn(x, w, y, **kw, **call)
    up = torch.linspace(-1.0, 2.0, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    leaves = [x, w] + ([kw["linear_bias"]] if "linear_bias" in kw else [])
    return loss.detach(), torch.autograd.grad((loss * up).sum(), leaves)


@needs_native
@pytest.mark.parametrize("shape", [(5,), ()], ids=["rows", "one-row"])
@pytest.mark.parametrize("reduction,ignore_index,smoothing,weight,bias", GRID)
def test_same_call_as_torch(shape, reduction, ignore_index, smoothing, weight, bias):
    x, w, y, kw = _problem(shape, torch.float64, weight, bias, ignore_index)
    call = dict(reduction=reduction, ignore_index=ignore_index, label_smoothing=smoothing)
    ref = _loss_and_grads(F.linear_cross_entropy, x, w, y, kw, **call, options=None)
    for options in (None, torch.nn.LinearCrossEntropyOptions()):
        got = _loss_and_grads(fused_xent.linear_cross_entropy, x, w, y, kw, **call, options=options)
        torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12, equal_nan=True)
        for g, r in zip(got[1], ref[1], strict=True):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


@needs_native
@pytest.mark.parametrize("impl", ["lean", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_same_call_as_torch_through_the_kernels(impl, reduction):
    """float32 through the Triton kernels (the interpreter on CPU), every shared argument set."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w, y, kw = _problem((9,), torch.float32, True, True, -100, seed=1)
    x, w, y = x.to(device), w.to(device), y.to(device)
    kw = {k: v.to(device) for k, v in kw.items()}
    call = dict(reduction=reduction, ignore_index=-100, label_smoothing=0.1)
    ref = _loss_and_grads(F.linear_cross_entropy, x, w, y, kw, **call)
    got = _loss_and_grads(
        fused_xent.linear_cross_entropy, x, w, y, kw, **call, options=torch.nn.LinearCrossEntropyOptions(), impl=impl
    )
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    for g, r in zip(got[1], ref[1], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


@needs_native
def test_probability_targets_as_torch():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(4, C, generator=g, dtype=torch.float64), -1)
    for reduction in ("mean", "sum", "none"):
        ref = _loss_and_grads(F.linear_cross_entropy, x, w, p, {}, reduction=reduction, label_smoothing=0.1)
        got = _loss_and_grads(
            fused_xent.linear_cross_entropy, x, w, p, {}, reduction=reduction, label_smoothing=0.1,
            options=torch.nn.LinearCrossEntropyOptions(),
        )  # fmt: skip
        torch.testing.assert_close(got[0], ref[0], rtol=1e-10, atol=1e-12)
        for a, b in zip(got[1], ref[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@needs_native
def test_module_takes_options():
    x, w, y, kw = _problem((5,), torch.float64, False, False, None)
    mod = fused_xent.LinearCrossEntropyLoss(options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2))
    torch.testing.assert_close(mod(x, w, y), F.linear_cross_entropy(x, w, y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", ["chunked", {"batch_chunk_size": 2}, 0])
def test_options_of_another_type_are_refused(options):
    x, w, y, _ = _problem((5,), torch.float32, False, False, None)
    with pytest.raises(TypeError, match="options must be None or a torch.nn.LinearCrossEntropyOptions"):
        fused_xent.linear_cross_entropy(x, w, y, options=options)
    with pytest.raises(TypeError, match="options must be None"):
        fused_xent.LinearCrossEntropyLoss(options=options)
