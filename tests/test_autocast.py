"""torch.autocast around fused_xent behaves like autocast around ``F.linear`` + cross-entropy:
the operands (input, weight, bias) are cast to the autocast dtype, the products are
accumulated and the loss returned in fp32, and the gradients reach the parameters in
their own dtypes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_reference import rel_err, torch_linear_xent

from fused_xent import linear_cross_entropy

CPU_IMPLS = ["chunked", "triton", "reference"]


def _params(N=24, D=20, C=53, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(C, D, generator=g) / D**0.5
    b = 0.5 * torch.randn(C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    y[::7] = -100
    return [t.to(device) for t in (x, w, b, y)]


def _loss_and_grads(fn, leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_cpu_autocast_is_the_explicit_cast(impl, low):
    """Under autocast the loss and gradients are exactly those of the same call on operands
    cast by hand; the loss is fp32 and each gradient has its parameter's dtype (fp32)."""
    x, w, b, y = _params()
    opts = dict(label_smoothing=0.1, impl=impl)

    def autocast(xx, ww, bb):
        with torch.autocast("cpu", dtype=low):
            return linear_cross_entropy(xx, ww, y, linear_bias=bb, **opts)

    def by_hand(xx, ww, bb):
        return linear_cross_entropy(xx.to(low), ww.to(low), y, linear_bias=bb.to(low), **opts)

    loss, grads = _loss_and_grads(autocast, (x, w, b))
    want_loss, want_grads = _loss_and_grads(by_hand, (x, w, b))
    assert loss.dtype == torch.float32
    assert [g.dtype for g in grads] == [torch.float32] * 3
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=0)
    for g, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, want, rtol=0, atol=0)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_cpu_bf16_autocast_accumulates_in_fp32(impl):
    """The loss is torch's float64 loss on the bf16-rounded operands up to fp32 rounding,
    far closer than torch's own autocast, whose logits are rounded to bf16."""
    x, w, b, y = _params(seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(x, w, y, linear_bias=b, impl=impl)
        torch_autocast = F.cross_entropy(F.linear(x, w, b), y).float()
    rounded = [t.to(torch.bfloat16).double() for t in (x, w, b)]
    exact = torch_linear_xent(rounded[0], rounded[1], y, b=rounded[2])
    assert rel_err(got, exact) < 1e-6  # fp32 sums over D = 20 products and C = 53 exponentials
    assert rel_err(got, exact) <= rel_err(torch_autocast, exact)


def test_autocast_accepts_low_precision_activations_with_fp32_weight():
    """The usual mixed case: hidden states already bf16 (from autocast ops), head weight fp32."""
    x, w, b, y = _params(seed=2)
    h = x.to(torch.bfloat16).requires_grad_()
    wp = w.clone().requires_grad_()
    with pytest.raises(TypeError, match="linear_weight dtype"):
        linear_cross_entropy(h, wp, y)  # without autocast the dtypes must agree
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, wp, y)
    loss.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and wp.grad.dtype == torch.float32
    exact = torch_linear_xent(h.detach().double(), w.to(torch.bfloat16).double(), y)
    assert rel_err(loss, exact) < 1e-6


def test_backward_inside_autocast_equals_backward_outside():
    x, w, b, y = _params(seed=3)

    def inside(xx, ww, bb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_cross_entropy(xx, ww, y, linear_bias=bb, z_loss=1e-3)
            loss.backward()
        return loss

    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    inside(*leaves)
    _, outside = _loss_and_grads(
        lambda xx, ww, bb: linear_cross_entropy(
            xx.bfloat16(), ww.bfloat16(), y, linear_bias=bb.bfloat16(), z_loss=1e-3
        ),
        (x, w, b),
    )
    for t, want in zip(leaves, outside, strict=True):
        torch.testing.assert_close(t.grad, want, rtol=0, atol=0)


def test_float64_operands_are_not_cast():
    """Autocast leaves float64 alone (as for F.linear): the loss stays float64 and exact."""
    x, w, b, y = (t.double() if t.is_floating_point() else t for t in _params(seed=4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(x, w, y, linear_bias=b)
    assert got.dtype == torch.float64
    assert rel_err(got, torch_linear_xent(x, w, y, b=b)) < 1e-12


def test_compiled_autocast_region_matches_eager():
    x, w, b, y = _params(seed=5)

    def fn(xx, ww, bb):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(xx, ww, y, linear_bias=bb, label_smoothing=0.1)

    torch._dynamo.reset()
    loss, grads = _loss_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), (x, w, b))
    want_loss, want_grads = _loss_and_grads(fn, (x, w, b))
    torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=0)
    for g, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["auto", "triton", "chunked"])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_cuda_autocast_within_twice_torch_autocast_error(impl, low):
    """On CUDA: fp32 loss and fp32 parameter gradients, equal to the explicit cast, and an
    error against the float64 loss of the rounded operands at most twice torch autocast's."""
    x, w, b, y = _params(N=4096, D=768, C=21841, seed=6, device="cuda")

    def autocast(xx, ww, bb):
        with torch.autocast("cuda", dtype=low):
            return linear_cross_entropy(xx, ww, y, linear_bias=bb, label_smoothing=0.1, impl=impl)

    def by_hand(xx, ww, bb):
        return linear_cross_entropy(xx.to(low), ww.to(low), y, linear_bias=bb.to(low), label_smoothing=0.1, impl=impl)

    def torch_autocast(xx, ww, bb):
        with torch.autocast("cuda", dtype=low):
            return F.cross_entropy(F.linear(xx, ww, bb), y, label_smoothing=0.1)

    def exact(xx, ww, bb):
        return F.cross_entropy(F.linear(xx.to(low).double(), ww.to(low).double(), bb.to(low).double()), y,
                               label_smoothing=0.1)  # fmt: skip

    loss, grads = _loss_and_grads(autocast, (x, w, b))
    hand_loss, hand_grads = _loss_and_grads(by_hand, (x, w, b))
    ref_loss, ref_grads = _loss_and_grads(exact, (x, w, b))
    own_loss, own_grads = _loss_and_grads(torch_autocast, (x, w, b))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    torch.testing.assert_close(loss, hand_loss, rtol=1e-6, atol=0)
    # lean and chunked are deterministic, so autocast and the explicit cast agree bitwise.
    # triton adds tiles with atomics: its gradients differ between any two runs by summation
    # order, so for it only the bound against float64 below applies.
    if impl != "triton":
        for g, hand in zip(grads, hand_grads, strict=True):
            assert torch.equal(g, hand)
    assert rel_err(loss, ref_loss) <= 2 * rel_err(own_loss, ref_loss) + 1e-6
    for g, ref, own in zip(grads, ref_grads, own_grads, strict=True):
        assert rel_err(g, ref) <= 2 * rel_err(own, ref) + 1e-6
