"""``kernels.row_loss`` (Triton, under the interpreter here) against its definition: the torch
operations of ``formulation.row_loss`` and the reduction, and autograd's gradients through them;
then ``linear_cross_entropy``'s reduced eager path against the per-row one."""

from unittest import mock

import pytest
import torch

import fused_xent
from fused_xent import functional
from fused_xent.formulation import XentOptions, build_row_targets, row_loss
from fused_xent.kernels.row_loss import loss_grad_coefs, reduced_loss

#: CUDA where there is one (no interpreter there), else the CPU under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _targets(n: int, C: int, gen: torch.Generator, kind: str, z_loss: float):
    """RowTargets on DEVICE of one target kind, with ignored rows, smoothing and ``z_loss``."""
    opts = XentOptions(num_classes=C, label_smoothing=0.1, z_loss=z_loss)
    if kind == "dense":
        t = torch.softmax(torch.randn(n, C, generator=gen), -1)
        return build_row_targets(t.to(DEVICE), target2=None, lam=None, class_weight=None, ignore_index=None, opts=opts)
    t = torch.randint(0, C, (n,), generator=gen)
    t[1::4] = -100
    kw = dict(target2=None, lam=None, class_weight=None)
    if kind == "mixup":
        t2, lam = torch.randint(0, C, (n,), generator=gen), torch.rand(n, generator=gen)
        kw.update(target2=t2.to(DEVICE), lam=lam.to(DEVICE))
    if kind == "weighted":
        kw.update(class_weight=(torch.rand(C, generator=gen) + 0.5).to(DEVICE))
    return build_row_targets(t.to(DEVICE), ignore_index=-100, opts=opts, **kw)


def _torch_loss(lse, lin, rt, reduction):
    rows = row_loss(lse, lin, rt)
    return rows.sum() if reduction == "sum" else rows.sum() / rt.row_weight.sum()


CASES = [(n, kind) for n in (1, 5, 2049, 5000) for kind in ("hard", "mixup", "weighted", "dense")]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize(("n", "kind"), CASES)
def test_reduced_loss_and_its_coefficients_match_their_definition(n, kind, z_loss, reduction):
    gen = torch.Generator().manual_seed(n + len(kind))
    rt = _targets(n, 13, gen, kind, z_loss)
    lse = (torch.randn(n, generator=gen) * 3 + 8).to(DEVICE).requires_grad_()
    lin = (torch.randn(n, generator=gen) * 5).to(DEVICE).requires_grad_()

    loss, divisor = reduced_loss(lse.detach(), lin.detach(), rt, reduction)
    rows64 = row_loss(lse.detach().double(), lin.detach().double(), rt)
    want = rows64.sum() / (rt.row_weight.double().sum() if reduction == "mean" else 1.0)
    # fp32 sums of n rows in another order than torch's: within a few ulp of the row losses' scale
    assert abs(loss.item() - want.item()) <= 1e-6 * rows64.abs().sum().item() / (divisor.item() or 1.0)
    assert divisor.item() == pytest.approx(rt.row_weight.sum().item() if reduction == "mean" else 1.0, rel=1e-6)

    g = torch.tensor(2.5, device=DEVICE)
    g_lse, g_lin = torch.autograd.grad(_torch_loss(lse, lin, rt, reduction), (lse, lin), g)
    cp, rt_g = loss_grad_coefs(g.reshape(1), divisor, lse.detach(), rt, reduction)
    want_g = rt.scaled(-g_lin)
    # the divisor of "mean" comes from the kernel's own sum: equal to torch's within an ulp or two
    tol = dict(rtol=1e-6, atol=0) if reduction == "mean" or z_loss else dict(rtol=0, atol=0)
    torch.testing.assert_close(cp, g_lse, **tol)
    for name in ("k1", "k2", "e", "d"):
        got, ref = getattr(rt_g, name), getattr(want_g, name)
        assert (got is None) == (ref is None), name
        if ref is not None:
            torch.testing.assert_close(got, ref, **tol, msg=name)
    for name in ("y1", "y2", "dense", "lse_coef", "zl", "row_weight", "class_weight"):
        assert getattr(rt_g, name) is getattr(rt, name), name


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rows_without_target_mass_add_nothing_even_when_their_lse_is_not_finite(reduction):
    gen = torch.Generator().manual_seed(3)
    rt = _targets(8, 5, gen, "hard", 0.0)  # rows 1 and 5 ignored
    lse = torch.full((8,), 2.0, device=DEVICE)
    lse[1], lse[5] = float("inf"), float("nan")
    lin = torch.ones(8, device=DEVICE)
    loss, divisor = reduced_loss(lse, lin, rt, reduction)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, _torch_loss(lse, lin, rt, reduction))
    cp, rt_g = loss_grad_coefs(torch.ones(1, device=DEVICE), divisor, lse, rt, reduction)
    assert cp[1].item() == cp[5].item() == 0.0 and rt_g.k1[1].item() == rt_g.e[5].item() == 0.0
    assert (cp[[0, 2, 3, 4, 6, 7]] != 0).all()


def test_no_rows():
    rt = _targets(0, 5, torch.Generator().manual_seed(0), "hard", 0.0)
    empty = torch.empty(0, device=DEVICE)
    assert reduced_loss(empty, empty, rt, "sum")[0].item() == 0.0
    loss, divisor = reduced_loss(empty, empty, rt, "mean")
    assert loss.isnan() and divisor.item() == 0.0  # 0 / 0, as F.cross_entropy's mean of nothing
    cp, _ = loss_grad_coefs(torch.ones(1, device=DEVICE), divisor, empty, rt, "mean")
    assert cp.shape == (0,)


OPTIONS = [
    dict(),
    dict(label_smoothing=0.1, ignore_index=2, z_loss=1e-3),
    dict(weight=True, softcap=9.0, scale=0.7),
    dict(mixup=True, label_smoothing=0.05),
]


@pytest.mark.parametrize("impl", ["lean", "filtered", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "smooth-ignore-zloss", "weight-softcap-scale", "mixup"])
def test_reduced_path_equals_the_row_path(impl, reduction, options):
    """The reduced eager path (taken: ``reduced_loss`` is called) gives the loss of the row
    path reduced in torch, and its gradients for an upstream gradient other than 1."""
    options = dict(options)
    gen = torch.Generator().manual_seed(11)
    N, D, C = 37, 24, 150
    x = torch.randn(N, D, generator=gen).to(DEVICE, torch.bfloat16)
    w = (torch.randn(C, D, generator=gen) / 4).to(DEVICE, torch.bfloat16)
    b = torch.randn(C, generator=gen).to(DEVICE, torch.bfloat16)
    y = torch.randint(0, C, (N,), generator=gen).to(DEVICE)
    scale = options.pop("scale", None)
    if scale is not None:
        scale = torch.tensor(scale, device=DEVICE, requires_grad=True)
    if options.pop("weight", False):
        options["weight"] = (torch.rand(C, generator=gen) + 0.5).to(DEVICE)
    if options.pop("mixup", False):
        options.update(target2=torch.randint(0, C, (N,), generator=gen).to(DEVICE), lam=0.3)

    def run(reduced: bool):
        leaves = [t.clone().requires_grad_() for t in (x, w, b)] + ([scale] if scale is not None else [])
        kw = dict(linear_bias=leaves[2], scale=scale, impl=impl, **options)
        if reduced:
            loss = fused_xent.linear_cross_entropy(leaves[0], leaves[1], y, reduction=reduction, **kw)
        else:
            rows = fused_xent.linear_cross_entropy(leaves[0], leaves[1], y, reduction="none", **kw)
            # the mean's divisor: the kept rows' class weights (mixup's lam + (1 - lam) is 1; no
            # case here mixes with class weights)
            kept = (y != options.get("ignore_index", -100)).float()
            divisor = (kept * options["weight"][y] if "weight" in options else kept).sum()
            loss = rows.sum() if reduction == "sum" else rows.sum() / divisor
        grads = torch.autograd.grad(loss * 3.5, leaves)
        return loss.detach(), grads

    with mock.patch.object(functional, "reduced_loss", wraps=functional.reduced_loss) as spy:
        loss, grads = run(reduced=True)
    assert spy.call_count == 1
    want_loss, want_grads = run(reduced=False)
    torch.testing.assert_close(loss, want_loss, rtol=2e-6, atol=0)
    for name, got, want in zip(("x", "w", "b", "scale")[: len(grads)], grads, want_grads, strict=True):
        # the rows' coefficients agree to an ulp: the bf16 gradients to one rounding
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-5, msg=name)
        if impl != "triton" and name != "scale":  # no atomics: most bf16 elements keep their bits
            assert (got == want).float().mean() > 0.9, name
