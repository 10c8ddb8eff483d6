"""``kernels.class_chunked``'s one-pass recompute (``chunk_grad_tma_kernel``, under the interpreter
here): where lean's backward takes it (bf16, TMA-readable rows, at most ``FUSED_DU_MAX_D``
features, no bias gradient), every gradient against float64 within twice torch's own bf16
error (``test_functional.check``), over several chunks and a tail of fewer than 8 classes, and
one chunk's dU bitwise that of the two passes (cuBLAS products, ``chunk_grad_kernel``); where it
does not (the margins' column scale among them), that it was not taken."""

from __future__ import annotations

import pytest
import torch
from test_functional import check, make_problem
from test_margins import loss_and_grads, problem, rel_err
from torch_reference import torch_linear_xent

from fused_xent import linear_cross_entropy
from fused_xent.integrations.margins import margin_cross_entropy
from fused_xent.kernels import class_chunked


@pytest.fixture
def one_pass_calls(monkeypatch):
    """A buffer of 128 classes (C = 301: three chunks or fewer, the last of them taking the tail
    of 5 and 3 classes of the one before: ``_owned_ranges``), and the list of the one-pass
    kernel's chunk widths (the chunk that leaves classes to the next takes the two passes)."""
    monkeypatch.setattr(class_chunked, "CHUNK_BYTES", 1)
    monkeypatch.setattr(class_chunked, "MIN_CHUNK_COLS", 128)
    calls = []
    fused = class_chunked._fused_du

    def spy(x, w_k, *args):
        calls.append(w_k.shape[0])
        return fused(x, w_k, *args)

    monkeypatch.setattr(class_chunked, "_fused_du", spy)
    return calls


@pytest.mark.parametrize(
    "N,opts,widths",
    [
        (37, dict(), [104, 96]),  # equal chunks of the buffer's width at most (tests/test_chunk_plan.py)
        (64, dict(label_smoothing=0.1, ignore=3), [104, 96]),
        (64, dict(dense=True), [104, 96]),
    ],
)
def test_lean_backward_in_one_pass(N, opts, widths, one_pass_calls):
    check("lean", torch.bfloat16, N, 32, 301, **opts)
    assert one_pass_calls == widths


@pytest.mark.parametrize(
    "opts",
    [
        dict(softcap=5.0, scale=1.3, z_loss=1e-3),
        dict(weight=True, reduction="sum", label_smoothing=0.05),
        dict(mixup=True, weight=True, ignore_index=None),
    ],
)
def test_one_pass_gradients_against_float64(opts, one_pass_calls, monkeypatch):
    """The features ``check`` cannot take in bf16 (its loss bound is fp32's; its bf16 reference
    does not take class weights): dX and dW against float64 within twice the error of lean's
    two-pass backward on the same call (itself within twice torch's own bf16 error on the GPU,
    ``test_gpu.py``)."""
    opts = dict(opts)
    # a scale keeps the buffer's chunks; without one the backward plans its chunks around dW
    # (tests/test_chunk_plan.py), here the same number, equal
    widths = [128, 48] if "scale" in opts else [104, 96]
    mixup = opts.pop("mixup", False)
    x, w, _, y, cw = make_problem(64, 32, 301, torch.bfloat16, weight=opts.pop("weight", False), ignore=3)
    if mixup:
        y = y.clamp(min=0)
        opts.update(target2=y.flip(0), lam=torch.linspace(0.1, 0.9, 64))

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w)]
        extra = {
            k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in opts.items()
        }
        return torch.autograd.grad(fn(*leaves, dict(extra, weight=None if cw is None else cw.to(dtype))), leaves)

    def lean(a, b, kw):
        return linear_cross_entropy(a, b, y, impl="lean", **kw)

    exact = grads(lambda a, b, kw: torch_linear_xent(a, b, y, **kw), torch.float64)
    got = grads(lean, torch.bfloat16)
    assert one_pass_calls == widths
    monkeypatch.setattr(class_chunked, "FUSED_DU_MAX_D", 0)
    two_pass = grads(lean, torch.bfloat16)
    assert one_pass_calls == widths  # not taken again
    for g, e, t in zip(got, exact, two_pass, strict=True):
        assert rel_err(g, e) <= 2 * rel_err(t, e)


@pytest.mark.parametrize(
    "dtype,D,opts",
    [
        (torch.bfloat16, 32, dict(bias=True)),  # db's partial sums come from the grad kernel
        (torch.bfloat16, 33, dict()),  # 66-byte rows: no TMA
        (torch.float16, 32, dict()),  # fp32 products under fp16 dU
        (torch.float32, 32, dict()),
    ],
)
def test_lean_backward_in_two_passes(dtype, D, opts, one_pass_calls):
    x, w, b, y, _ = make_problem(37, D, 301, dtype, **opts)
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    linear_cross_entropy(x, w, y, linear_bias=b, impl="lean").backward()
    assert all(t.grad is not None for t in leaves)
    assert not one_pass_calls


def test_one_pass_over_a_features_limit(one_pass_calls, monkeypatch):
    monkeypatch.setattr(class_chunked, "FUSED_DU_MAX_D", 16)
    test_lean_backward_in_two_passes(torch.bfloat16, 32, {}, one_pass_calls)


def test_margins_take_two_passes(one_pass_calls):
    """The margins' column scale (W's norms divided inside the kernels) keeps the two passes."""
    x, w, y = problem(40, 32, 301, dtype=torch.bfloat16, seed=7, spread=0.8)
    loss_and_grads(lambda a, b: margin_cross_entropy(a, b, y, s=48.0, m2=0.5, impl="lean"), x, w)
    assert not one_pass_calls


@pytest.mark.parametrize(
    "features",
    [
        dict(),
        dict(label_smoothing=0.1, softcap=5.0, scale=1.3, bias=True),
        dict(weight=True, mixup=True, z_loss=1e-3),
        dict(mixup=True, label_smoothing=0.2, scale=0.7),
        dict(dense=True),
    ],
)
def test_one_pass_du_is_the_two_pass_du(features):
    """One chunk's dU from ``chunk_grad_tma_kernel`` and from the cuBLAS GEMM + ``chunk_grad_kernel``
    on the same inputs: the same bits (the products rounded to bf16 alike, then the same epilogue;
    on the H100 as well, ``probe_fused_du.log``)."""
    from fused_xent.formulation import XentOptions, build_row_targets

    f = dict(features)
    N, D, C, c0, c1 = 64, 32, 301, 128, 256
    x, w, b, y, cw = make_problem(N, D, C, torch.bfloat16, bias=f.pop("bias", False), weight=f.pop("weight", False),
                                  dense=f.pop("dense", False), ignore=3)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    opts = XentOptions(num_classes=C, label_smoothing=f.get("label_smoothing", 0.0), z_loss=f.get("z_loss", 0.0),
                       softcap=f.get("softcap"), unit_scale="scale" not in f)  # fmt: skip
    mixup = dict(target2=None, lam=None)
    if f.get("mixup"):
        mixup = dict(target2=torch.randint(0, C, (N,), generator=g), lam=torch.rand(N, generator=g))
    dense = y.dim() == 2
    rt = build_row_targets(y.float() if dense else y, **mixup, class_weight=None if cw is None else cw.float(),
                           ignore_index=None if dense else -100, opts=opts)  # fmt: skip
    upstream = torch.rand(N, generator=g) + 0.5
    rt_g, cp = rt.scaled(upstream), rt.lse_coef * upstream
    lse = torch.randn(N, generator=g) + 6.0
    scale = torch.tensor([f.get("scale", 1.0)])
    kargs = class_chunked._kernel_args(b, rt_g, opts)
    dus = []
    for limit in (class_chunked.FUSED_DU_MAX_D, 0):
        class_chunked.FUSED_DU_MAX_D, saved = limit, class_chunked.FUSED_DU_MAX_D
        try:
            buf = torch.full((N, 128), float("nan"), dtype=torch.bfloat16)
            du = class_chunked._recompute_du(x, w[c0:c1], buf, b, scale, lse, cp, kargs, opts, c0)
            dus.append(du.clone())
        finally:
            class_chunked.FUSED_DU_MAX_D = saved
    assert torch.equal(dus[0], dus[1])
    assert dus[0].abs().max() > 0
