"""Sizes at the edges and reproducibility: C = 1, N = 0, fp16 logits beyond fp16's range,
out-of-range targets, the ``deterministic`` option, and on the GPU sizes past 32-bit
indexing (N*C, N*D, C*D > 2**31) against the chunked torch path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_reference import rel_err, torch_linear_xent

import fused_xent.functional
from fused_xent import LinearCrossEntropyLoss, linear_cross_entropy
from fused_xent.formulation import XentOptions, build_row_targets

CPU_IMPLS = ["chunked", "triton", "reference"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]


def _grads(loss, leaves):
    present = [t for t in leaves if t is not None]
    return torch.autograd.grad(loss.sum(), present)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("dense", [False, True])
def test_one_class(impl, dense):
    """With C = 1 the cross-entropy is 0, but the z-loss and its gradients are not."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(7, 5, generator=g), torch.randn(1, 5, generator=g), torch.randn(1, generator=g)
    y = torch.ones(7, 1) if dense else torch.zeros(7, dtype=torch.long)
    opts = dict(label_smoothing=0.1, z_loss=0.01, reduction="none")
    xs, ws, bs = _leaves(x, w, b)
    got = linear_cross_entropy(xs, ws, y, linear_bias=bs, impl=impl, **opts)
    xr, wr, br = _leaves(x.double(), w.double(), b.double())
    want = torch_linear_xent(xr, wr, y.double() if dense else y, b=br, **opts)
    assert rel_err(got, want) < 1e-6
    # dz = p (1 + 2 z_loss lse) - t with p = t = 1: the fp32 gradient is a difference of ones
    for a, e in zip(_grads(got, (xs, ws, bs)), _grads(want, (xr, wr, br)), strict=True):
        assert rel_err(a, e) < 1e-5


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_empty_batch_returns_what_torch_returns(impl, reduction, lead):
    """N = 0: mean is nan, sum is 0, none is empty, as F.cross_entropy; gradients are zeros
    of the parameters' shapes (and an empty input gradient)."""
    D, C = 6, 11
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(*lead, D, generator=g), torch.randn(C, D, generator=g), torch.randn(C, generator=g)
    y = torch.zeros(lead, dtype=torch.long)
    weight = torch.rand(C, generator=g) + 0.5
    xs, ws, bs = _leaves(x, w, b)
    got, lse = linear_cross_entropy(
        xs, ws, y, linear_bias=bs, weight=weight, reduction=reduction, impl=impl, return_lse=True
    )
    xr, wr, br = _leaves(x, w, b)
    want = F.cross_entropy(F.linear(xr, wr, br).reshape(-1, C), y.reshape(-1), weight=weight, reduction=reduction)
    assert got.dtype == torch.float32 and lse.shape == lead
    assert got.shape == (want.reshape(lead).shape if reduction == "none" else ())
    torch.testing.assert_close(got.reshape(-1), want.reshape(-1), equal_nan=True, rtol=0, atol=0)
    got_grads = _grads(got, (xs, ws, bs))
    for a, e in zip(got_grads, _grads(want, (xr, wr, br)), strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        torch.testing.assert_close(a, e, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("impl", [*CPU_IMPLS, "lean", "fast", "auto"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_empty_batch_reduced_loss_gives_the_input_its_empty_gradient(impl, reduction):
    """N = 0 through the reduced loss without the lse ("fast" takes it): the input's gradient is
    an empty tensor, not None ("fast" read an empty stored gradient as one not asked for)."""
    D, C = 6, 11
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # where "auto" takes "fast"
    x, w = torch.randn(0, D, device=dev), torch.randn(C, D, device=dev)
    xs, ws, _ = _leaves(x, w, torch.zeros(C))
    got = linear_cross_entropy(xs, ws, torch.zeros(0, dtype=torch.long, device=dev), reduction=reduction, impl=impl)
    gx, gw = torch.autograd.grad(got, (xs, ws))
    assert gx.shape == (0, D) and torch.equal(gw, torch.zeros(C, D, device=dev))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_fp16_logits_beyond_fp16_range(impl):
    """|logits| up to ~2e5, beyond 65504, from fp16 operands: torch's fp16 F.linear overflows to
    inf, fused_xent accumulates in fp32 and matches float64 on the same operands."""
    g = torch.Generator().manual_seed(2)
    N, D, C = 20, 16, 37
    x = (torch.randn(N, D, generator=g) * 100).half()
    w = (torch.randn(C, D, generator=g) * 100).half()
    y = torch.randint(0, C, (N,), generator=g)
    assert torch.isinf(F.linear(x, w)).any()  # the fp16 logits really overflow
    xs, ws = _leaves(x, w)
    got = linear_cross_entropy(xs, ws, y, label_smoothing=0.1, reduction="none", impl=impl)
    xr, wr = _leaves(x.double(), w.double())
    want = torch_linear_xent(xr, wr, y, label_smoothing=0.1, reduction="none")
    assert float((x.double() @ w.double().T).abs().max()) > 65504 and torch.isfinite(got).all()
    assert rel_err(got, want) < 1e-6  # fp32 sums of exact fp16 products
    for a, e in zip(_grads(got, (xs, ws)), _grads(want, (xr, wr)), strict=True):
        assert a.dtype == torch.float16 and torch.isfinite(a).all()
        assert rel_err(a, e) < 2**-11  # one fp16 rounding of each entry


def test_out_of_range_labels_are_marked_nan_in_row_targets():
    """The no-sync guard behind compiled calls: bad labels (not ignore_index) and lam outside
    [0, 1] give NaN coefficients on their rows only, with labels replaced by a valid index."""
    y = torch.tensor([0, 5, -100, -1, 2, 3])
    y2 = torch.tensor([1, 1, 1, 1, 9, 0])
    lam = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5, 1.5])
    rt = build_row_targets(
        y, target2=y2, lam=lam, class_weight=None, ignore_index=-100, opts=XentOptions(num_classes=5)
    )
    bad = torch.tensor([False, True, False, True, True, True])
    assert torch.equal(torch.isnan(rt.k1), bad) and torch.equal(torch.isnan(rt.lse_coef), bad)
    assert ((rt.y1 >= 0) & (rt.y1 < 5)).all() and ((rt.y2 >= 0) & (rt.y2 < 5)).all()
    assert rt.k1[2] == 0 and rt.lse_coef[2] == 0  # the ignored row stays ignored


def test_out_of_range_label_raises_eagerly():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="target contains 5"):
        linear_cross_entropy(x, w, torch.tensor([0, 5, 1]))


# deterministic


@pytest.fixture
def chosen_impls(monkeypatch):
    """The ``impl`` each call hands to the backend choice."""
    seen = []
    choose = fused_xent.functional._choose

    def spy(impl, *args, **kwargs):
        seen.append(impl)
        return choose(impl, *args, **kwargs)

    monkeypatch.setattr(fused_xent.functional, "_choose", spy)
    return seen


def test_deterministic_keeps_the_atomic_free_impls(chosen_impls):
    x, w, y = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 5])
    linear_cross_entropy(x, w, y)
    linear_cross_entropy(x, w, y, deterministic=True)
    LinearCrossEntropyLoss(deterministic=True)(x, w, y)
    linear_cross_entropy(x, w, y, deterministic=True, impl="reference")
    assert chosen_impls == ["auto", "auto", "auto", "reference"]  # auto is lean / chunked: no atomics


def test_global_deterministic_algorithms_are_honoured(chosen_impls):
    x, w, y = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 5])
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        linear_cross_entropy(x, w, y)
        with pytest.raises(ValueError, match="deterministic"):
            linear_cross_entropy(x, w, y, impl="triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert chosen_impls == ["auto"]


def test_deterministic_argument_errors():
    x, w, y = torch.randn(4, 3), torch.randn(6, 3), torch.tensor([0, 1, 2, 5])
    with pytest.raises(ValueError, match="deterministic"):
        linear_cross_entropy(x, w, y, deterministic=True, impl="triton")
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        linear_cross_entropy(x, w, y, deterministic="yes")


def _run_three_times(x, w, b, y, **opts):
    runs = []
    for _ in range(3):
        xs, ws, bs = _leaves(x, w, b)
        loss, lse = linear_cross_entropy(xs, ws, y, linear_bias=bs, return_lse=True, **opts)
        (loss + lse.mean()).backward()
        runs.append([loss.detach(), lse.detach(), xs.grad, ws.grad, bs.grad])
    return runs


def test_deterministic_runs_are_bitwise_equal_cpu():
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(64, 24, generator=g), torch.randn(300, 24, generator=g), torch.randn(300, generator=g)
    y = torch.randint(0, 300, (64,), generator=g)
    first, *others = _run_three_times(x, w, b, y, label_smoothing=0.1, deterministic=True)
    for other in others:
        assert all(torch.equal(a, o) for a, o in zip(first, other, strict=True))


# GPU: 64-bit offsets and determinism at real sizes


def _gpu_problem(N, D, C, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, D, device="cuda", generator=g).to(dtype)
    w = (torch.randn(C, D, device="cuda", generator=g) / D**0.5).to(dtype)
    b = (0.1 * torch.randn(C, device="cuda", generator=g)).to(dtype)
    y = torch.randint(0, C, (N,), device="cuda", generator=g)
    y[::97] = -100
    return x, w, b, y


def _gpu_loss_and_grads(x, w, b, y, impl):
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))  # new leaves, no copies
    loss, lse = linear_cross_entropy(xs, ws, y, linear_bias=bs, label_smoothing=0.1, return_lse=True, impl=impl)
    (loss + lse.float().mean()).backward()
    out = [loss.detach().float(), lse.detach(), xs.grad.float(), ws.grad.float(), bs.grad.float()]
    del xs, ws, bs, loss, lse
    torch.cuda.empty_cache()
    return out


def _rel32(a, b):
    """||a - b|| / ||b|| in fp32: float64 copies of 2**31-element gradients would not fit."""
    return float((a - b).norm() / b.norm())


# (N, D, C): rows x classes, rows x features and classes x features each past 2**31 elements
HUGE = {"NxC": (65536, 64, 65536), "NxD": (36864, 65536, 512), "CxD": (128, 65536, 36864)}


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["auto", "triton"])
@pytest.mark.parametrize("case", sorted(HUGE))
def test_gpu_past_32_bit_indexing_matches_chunked(case, impl):
    N, D, C = HUGE[case]
    x, w, b, y = _gpu_problem(N, D, C, seed=4)
    ref = _gpu_loss_and_grads(x, w, b, y, "chunked")
    got = _gpu_loss_and_grads(x, w, b, y, impl)
    # same bf16 operands and fp32 sums: the loss to fp32 rounding, gradients to the bf16
    # rounding of the logit gradient that the kernels feed to their GEMMs. "auto" (lean) also
    # rounds the logits to bf16, as torch's own F.linear does: there the bound for loss and lse
    # is twice the error of torch's own bf16 logits.
    bound = [1e-5, 1e-5]
    if impl == "auto":
        with torch.no_grad():
            z = F.linear(x, w, b).float()
            own = [F.cross_entropy(z, y, label_smoothing=0.1), torch.logsumexp(z, -1)]
            del z
        bound = [max(1e-5, 2 * _rel32(o, r)) for o, r in zip(own, ref[:2], strict=True)]
    assert _rel32(got[0], ref[0]) < bound[0] and _rel32(got[1], ref[1]) < bound[1], bound
    for name, a, e in zip(("dx", "dw", "db"), got[2:], ref[2:], strict=True):
        assert _rel32(a, e) < 8e-3, name
    # the last rows and classes (offsets past 2**31) are as right as the first
    assert _rel32(got[2][-64:], ref[2][-64:]) < 8e-3 and _rel32(got[3][-64:], ref[3][-64:]) < 8e-3


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_deterministic_is_bitwise_over_three_runs(dtype):
    x, w, b, y = _gpu_problem(8192, 2304, 32000, seed=5, dtype=dtype)
    first, *others = _run_three_times(x, w, b, y, label_smoothing=0.1, z_loss=1e-4, deterministic=True)
    for other in others:
        for name, a, o in zip(("loss", "lse", "dx", "dw", "db"), first, other, strict=True):
            assert torch.equal(a, o), name


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["auto", "triton", "chunked"])
def test_gpu_fp16_logits_beyond_fp16_range(impl):
    g = torch.Generator(device="cuda").manual_seed(6)
    x = (torch.randn(4096, 256, device="cuda", generator=g) * 32).half()  # logits ~ N(0, 16384**2)
    w = (torch.randn(8192, 256, device="cuda", generator=g) * 32).half()
    y = torch.randint(0, 8192, (4096,), device="cuda", generator=g)
    assert torch.isinf(F.linear(x, w)).any()
    xs, ws = _leaves(x, w)
    got = linear_cross_entropy(xs, ws, y, reduction="none", impl=impl)
    xr, wr = _leaves(x.double(), w.double())
    want = F.cross_entropy(F.linear(xr, wr), y, reduction="none")
    assert torch.isfinite(got).all() and rel_err(got, want) < 1e-5
    for a, e in zip(_grads(got, (xs, ws)), _grads(want, (xr, wr)), strict=True):
        assert a.dtype == torch.float16 and torch.isfinite(a).all() and rel_err(a, e) < 2**-10
