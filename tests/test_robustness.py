"""Inputs the kernels must not read wrongly, and autograd uses they do not support, on every
backend (the Triton ones through the interpreter on CPU): strided / expanded targets, class
weights and biases; a second backward; a backward with create_graph=True; inputs without features."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_xent import linear_cross_entropy
from fused_xent.integrations.open_clip import FusedClipLoss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["chunked", "reference", "triton", "lean", "fast", "filtered"]
N, D, C = 7, 8, 11


def _leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(DEVICE).requires_grad_()
    w = (torch.randn(C, D, generator=g) / D**0.5).to(DEVICE).requires_grad_()
    return x, w


def _grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_and_expanded_targets_weights_and_bias(impl):
    """Views whose elements are not adjacent (a column of a matrix, every other element, one
    value expanded) give what their contiguous copies give."""
    g = torch.Generator().manual_seed(1)
    x, w = _leaves()
    y = torch.randint(0, C, (N, 2), generator=g).to(DEVICE)[:, 1]  # stride 2
    y2 = torch.randint(0, C, (2 * N,), generator=g).to(DEVICE)[::2]
    cw = (torch.rand(2 * C, generator=g) + 0.5).to(DEVICE)[::2]
    b0 = torch.randn(1, generator=g).to(DEVICE).requires_grad_()
    b = b0.expand(C)  # stride 0
    assert y.stride() == (2,) and cw.stride() == (2,) and b.stride() == (0,)
    kw = dict(weight=cw, label_smoothing=0.1, impl=impl)
    got = linear_cross_entropy(x, w, y, linear_bias=b, target2=y2, lam=0.3, **kw)
    want = linear_cross_entropy(
        x, w, y.contiguous(), linear_bias=b.contiguous(), target2=y2.contiguous(), lam=0.3, **dict(kw, impl="reference")
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for a, r in zip(_grads(got, [x, w, b0]), _grads(want, [x, w, b0]), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
    # and against torch itself, one label per row
    got = linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, impl=impl)
    want = F.cross_entropy(F.linear(x, w, b), y, weight=cw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_second_backward(impl, reduction):
    """retain_graph=True: a second backward adds the same gradients again ("fast" hands its
    stored gradients over in the first and recomputes them the lean way in the second)."""
    x, w = _leaves()
    b = torch.randn(C, device=DEVICE, requires_grad=True)
    y = torch.randint(0, C, (N,), device=DEVICE)
    cw = torch.rand(C, device=DEVICE) + 0.5
    loss = linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, label_smoothing=0.1, reduction=reduction, impl=impl)
    (1.7 * loss).backward(retain_graph=True)
    first = [t.grad.clone() for t in (x, w, b)]
    (-0.4 * loss).backward()
    for t, g in zip((x, w, b), first, strict=True):
        torch.testing.assert_close(t.grad, g * (1 - 0.4 / 1.7), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("changed", ["weight", "input"])
def test_an_input_changed_in_place_before_the_backward_is_refused(impl, changed):
    """An optimizer or EMA step between the forward and the backward: autograd's version error
    on every impl ("fast" forms its gradients in the forward and reads no saved tensor in its
    first backward: it returned the old weights' gradients silently)."""
    leaf, w = _leaves()
    x = 1.0 * leaf  # a non-leaf input may change in place
    y = torch.randint(0, C, (N,), device=DEVICE)
    loss = linear_cross_entropy(x, w, y, impl=impl)
    with torch.no_grad():
        (w if changed == "weight" else x).mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("impl", IMPLS)
def test_under_saved_tensor_hooks_an_in_place_change_is_not_checked(impl):
    """Under saved-tensor hooks (activation offloading) autograd uses what the hook packed and
    checks no version; "fast" does as the others (its own check raised there)."""
    leaf, w = _leaves()
    y = torch.randint(0, C, (N,), device=DEVICE)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        loss = linear_cross_entropy(leaf, w, y, impl=impl)
    with torch.no_grad():
        w.mul_(2.0)
    loss.backward()
    assert leaf.grad is not None and w.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_create_graph(impl, reduction):
    """A gradient penalty: exact through the plain-torch backends, a clear error through the
    kernels (whose gradients would come back without a graph, the penalty silently lost)."""
    if impl == "fast" and reduction == "none":
        pytest.skip("fast takes reduced losses only")
    y = torch.randint(0, C, (N,), device=DEVICE)

    def penalised(impl_):
        x, w = _leaves()
        loss = linear_cross_entropy(x, w, y, reduction=reduction, impl=impl_).sum()
        (gx,) = torch.autograd.grad(loss, x, create_graph=True)
        return _grads(loss + gx.pow(2).sum(), [x, w])

    if impl in ("chunked", "reference"):
        for a, r in zip(penalised(impl), penalised("reference"), strict=True):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(RuntimeError, match="create_graph=True"):
            penalised(impl)


@pytest.mark.parametrize("impl", ["chunked", "reference"])
def test_create_graph_with_a_learnable_scale(impl):
    """A penalty on (dx, dscale): the backward scaled dx in place after dscale's product had
    saved it (chunked: "modified by an inplace operation")."""
    y = torch.randint(0, C, (N,), device=DEVICE)

    def penalised(impl_):
        x, w = _leaves()
        s = torch.tensor(1.3, device=DEVICE, requires_grad=True)
        loss = linear_cross_entropy(x, w, y, scale=s, impl=impl_)
        gx, gs = torch.autograd.grad(loss, (x, s), create_graph=True)
        return _grads(loss + gx.pow(2).sum() + 3 * gs.pow(2), [x, w, s])

    for a, r in zip(penalised(impl), penalised("reference"), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_saved_tensors_are_unpacked_once(impl, reduction):
    """Non-reentrant checkpointing (torch's recommended mode) refuses a second unpack of a saved
    tensor, and saved-tensor hooks (``save_on_cpu``) pay for each: the backward reads
    ``ctx.saved_tensors`` once."""
    if impl == "fast" and reduction == "none":
        pytest.skip("fast takes reduced losses only")
    y = torch.randint(0, C, (N,), device=DEVICE)
    s = torch.tensor(1.3, device=DEVICE, requires_grad=True)

    def loss_fn(x, w, s):
        return linear_cross_entropy(x, w, y, scale=s, reduction=reduction, impl=impl).sum()

    x, w = _leaves()
    want = _grads(loss_fn(x, w, s), [x, w, s])
    got = _grads(torch.utils.checkpoint.checkpoint(loss_fn, x, w, s, use_reentrant=False), [x, w, s])
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-7)
    packed, unpacked = [], []

    def pack(t):
        packed.append(1)
        return t

    def unpack(t):
        unpacked.append(1)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        loss = loss_fn(x, w, s)
    _grads(loss, [x, w, s])
    assert packed and len(unpacked) <= len(packed)  # "fast" unpacks none: its gradients are formed


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_a_non_finite_weight_of_an_unused_class_changes_nothing(impl, bad):
    """``weight = 1 / count`` gives inf to a class absent from the batch: without smoothing only
    the kept labels' weights enter torch's loss. It was NaN on every row here (0 * inf in the
    smoothing sum, and an ignored row's stand-in label, class 0, weighed)."""
    x, w = _leaves()
    b = torch.randn(C, device=DEVICE, requires_grad=True)
    y = torch.randint(1, C - 1, (N,), device=DEVICE)
    y[2] = -100
    y2 = torch.randint(1, C - 1, (N,), device=DEVICE)
    cw = torch.rand(C, device=DEVICE) + 0.5
    cw[0] = cw[C - 1] = bad  # class 0: the stand-in label of ignored rows; C - 1: nobody's
    for kw in (dict(), dict(target2=y2, lam=0.3)):
        for reduction in ("mean", "sum", "none"):
            if impl == "fast" and reduction == "none":
                continue
            got = linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction=reduction, impl=impl, **kw)
            want = linear_cross_entropy(x, w, y, linear_bias=b, weight=cw.nan_to_num(posinf=9.0), reduction=reduction,
                                        impl="reference", **kw)  # fmt: skip
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            for a, r in zip(_grads(got.sum(), [x, w, b]), _grads(want.sum(), [x, w, b]), strict=True):
                torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-6)
    got = linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, impl=impl)
    torch.testing.assert_close(got, F.cross_entropy(F.linear(x, w, b), y, weight=cw), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["lean", "triton"])
def test_clip_loss_create_graph_is_refused(impl):
    g = torch.Generator().manual_seed(3)
    img, txt = (F.normalize(torch.randn(6, 5, generator=g), dim=-1).to(DEVICE).requires_grad_() for _ in range(2))
    loss = FusedClipLoss(impl=impl)(img, txt, torch.tensor(10.0, device=DEVICE))
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad(loss, img, create_graph=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_features(impl):
    """D = 0: the logits are the bias (torch's answer: log C without one)."""
    x = torch.randn(N, 0, device=DEVICE, requires_grad=True)
    w = torch.randn(C, 0, device=DEVICE, requires_grad=True)
    b = torch.randn(C, device=DEVICE, requires_grad=True)
    y = torch.randint(0, C, (N,), device=DEVICE)
    got = linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=0.1, impl=impl)
    want = F.cross_entropy(F.linear(x, w, b), y, label_smoothing=0.1)
    torch.testing.assert_close(got, want)
    for a, r in zip(_grads(got, [x, w, b]), _grads(want, [x, w, b]), strict=True):
        assert a.shape == r.shape
        torch.testing.assert_close(a, r)
    torch.testing.assert_close(linear_cross_entropy(x, w, y, impl=impl), torch.tensor(C, device=DEVICE).log())


@pytest.mark.parametrize("impl", IMPLS)
def test_a_call_under_inference_mode_leaves_later_training_calls_alone(impl, monkeypatch):
    """An evaluation pass under ``torch.inference_mode()`` (Lightning's sanity check) before the
    first training call: the caches it fills (the unit scale) must hold normal tensors, which
    a later training call saves for its backward."""
    from fused_xent import functional

    monkeypatch.setattr(functional, "_UNIT_SCALES", {})  # the inference-mode call is the first to fill it
    x, w = _leaves(3)
    y = torch.randint(0, C, (N,), device=DEVICE)
    with torch.inference_mode():
        evaluated = linear_cross_entropy(x, w, y, impl=impl)
    loss = linear_cross_entropy(x, w, y, impl=impl)
    loss.backward()
    assert torch.allclose(loss.detach(), evaluated) and x.grad is not None and w.grad is not None


@pytest.mark.parametrize("impl", IMPLS)
def test_a_transposed_16_bit_weight(impl):
    """A (D, C) bf16 parameter used as ``w.T`` (column-major (C, D)) with a scale: "fast" kept
    w's strides for dW and then viewed its bytes flat for the split fp32 accumulator (a
    RuntimeError); every impl must give the float64 result to bf16 rounding."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, 16, generator=g).bfloat16().to(DEVICE).requires_grad_()
    w_dc = (torch.randn(16, 21, generator=g) * 0.5).bfloat16().to(DEVICE).requires_grad_()
    y = torch.randint(0, 21, (N,), generator=g).to(DEVICE)
    scale = torch.tensor([1.5], device=DEVICE, requires_grad=True)
    loss = linear_cross_entropy(x, w_dc.T, y, scale=scale, impl=impl)
    got = (loss, *torch.autograd.grad(loss, (x, w_dc, scale)))
    x64, w64, s64 = (t.detach().double().requires_grad_() for t in (x, w_dc, scale))
    ref = F.cross_entropy(s64 * (x64 @ w64), y)
    want = (ref, *torch.autograd.grad(ref, (x64, w64, s64)))
    for a, b in zip(got, want, strict=True):
        assert ((a.double() - b).norm() / b.norm()).item() < 2e-2


def test_torch_func_transforms_and_meta_tensors():
    """torch.func's grad / vmap and meta tensors have no storage for the kernels or the host
    range check: "auto" takes the plain-torch reference there (it failed on every impl but
    "reference": setup_context, storage access, ``.tolist()``; meta failed in autocast's
    query), an explicit kernel impl is refused by name."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 4, dtype=torch.float64, generator=g), torch.randn(7, 4, dtype=torch.float64, generator=g)
    y = torch.randint(0, 7, (5,), generator=g)

    def torch_loss(w_):
        return torch.nn.functional.cross_entropy(x @ w_.T, y, label_smoothing=0.1)

    def ours(w_, impl="auto"):
        return linear_cross_entropy(x, w_, y, label_smoothing=0.1, impl=impl)

    torch.testing.assert_close(torch.func.grad(ours)(w), torch.func.grad(torch_loss)(w), rtol=1e-10, atol=1e-12)
    xs, ys = torch.randn(3, 5, 4, dtype=torch.float64, generator=g), torch.randint(0, 7, (3, 5), generator=g)
    batched = torch.vmap(lambda a, t: linear_cross_entropy(a, w, t))(xs, ys)
    want = torch.stack([torch.nn.functional.cross_entropy(a @ w.T, t) for a, t in zip(xs, ys, strict=True)])
    torch.testing.assert_close(batched, want, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="impl='chunked' cannot run under a torch.func transform"):
        torch.func.grad(lambda w_: ours(w_, impl="chunked"))(w)
    meta = linear_cross_entropy(x.to("meta"), w.to("meta"), y.to("meta"), reduction="none")
    assert meta.is_meta and meta.shape == (5,)


def test_module_checks_its_options_when_built():
    from fused_xent import LinearCrossEntropyLoss

    for kwargs, match in [
        (dict(reduction="bogus"), "reduction"),
        (dict(label_smoothing=2.0), "label_smoothing"),
        (dict(impl="nope"), "impl"),
        (dict(softcap=0), "softcap"),
        (dict(ignore_index=1.5), "ignore_index"),
        (dict(memory_budget=-5), "memory_budget"),
        (dict(return_lse="yes"), "return_lse"),
        (dict(impl="triton", deterministic=True), "not deterministic"),
        (dict(weight=torch.ones(2, 3)), "weight"),
    ]:
        with pytest.raises((ValueError, TypeError), match=match):
            LinearCrossEntropyLoss(**kwargs)
    # the global determinism flag is the call's to read: it may change between building and calling
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        LinearCrossEntropyLoss(impl="triton")
    finally:
        torch.use_deterministic_algorithms(False)
