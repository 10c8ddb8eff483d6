"""Property-based tests (hypothesis): random shapes, dtypes and option combinations of
``linear_cross_entropy`` against torch's own ``F.cross_entropy`` on materialised float64
logits (``torch_reference``), and random malformed calls that must raise a TypeError or
ValueError naming the argument. Derandomized (the same examples on every run), no
deadline, few examples: the Triton kernels run in the CPU interpreter.

The accuracy bound is torch's own: fused_xent's error against float64 is at most twice
that of torch computing the same loss in float32 on the same (rounded) operands, plus the
rounding of a returned gradient to the input dtype (its unit roundoff u)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch_reference import torch_linear_xent

from fused_xent import linear_cross_entropy

SETTINGS = dict(
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@st.composite
def problems(draw, max_rows, max_d, max_c, dtypes):
    """A random call: operands (already rounded to their dtype) and keyword options."""
    dtype = draw(st.sampled_from(dtypes))
    lead = draw(st.sampled_from(["flat", "2d"]))
    if lead == "flat":
        batch = (draw(st.integers(0, max_rows)),)
    else:
        batch = (draw(st.integers(1, 3)), draw(st.integers(0, max_rows // 3)))
    D, C = draw(st.integers(1, max_d)), draw(st.integers(1, max_c))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn(*batch, D, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(C, D, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.3, 1.0, 3.0]))).to(dtype)
    opts = dict(reduction=draw(st.sampled_from(["mean", "sum", "none"])))
    if draw(st.booleans()):
        opts["linear_bias"] = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    if draw(st.booleans()):
        opts["weight"] = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    opts["label_smoothing"] = draw(st.sampled_from([0.0, 0.0, 0.1, 0.37, 1.0]))
    scale_kind = draw(st.sampled_from(["none", "float", "tensor"]))
    if scale_kind != "none":
        value = draw(st.floats(0.25, 4.0))
        opts["scale"] = value if scale_kind == "float" else torch.tensor(value, dtype=torch.float64).to(dtype)
    if draw(st.booleans()):
        opts["softcap"] = draw(st.floats(0.5, 30.0))
    if draw(st.booleans()):
        opts["z_loss"] = draw(st.sampled_from([1e-4, 0.01, 0.3]))
    opts["return_lse"] = draw(st.booleans())
    if draw(st.booleans()):  # class probabilities
        temperature = draw(st.sampled_from([0.3, 1.0, 5.0]))
        target = torch.softmax(torch.randn(*batch, C, generator=g, dtype=torch.float64) * temperature, -1).to(dtype)
        return x, w, target, opts
    ignore_index = draw(st.sampled_from([-100, None, 0]))
    if ignore_index is not None:
        opts["ignore_index"] = ignore_index
    target = torch.randint(0, C, batch, generator=g)
    if ignore_index == -100 and target.numel():
        target[torch.rand(batch, generator=g) < draw(st.sampled_from([0.0, 0.3, 1.0]))] = -100
    if draw(st.booleans()):  # mixup: a second label that is never the ignored class
        low = 1 if ignore_index == 0 and C > 1 else 0
        opts["target2"] = torch.randint(low, C, batch, generator=g)
        per_row = draw(st.booleans())
        opts["lam"] = torch.rand(batch, generator=g) if per_row else draw(st.floats(0.0, 1.0))
    return x, w, target, opts


def _evaluate(fn, x, w, target, opts, dtype):
    """Loss, lse and the gradients of a fixed random combination of them, with the operands,
    class weights and a learnable scale cast to ``dtype`` (``lam`` stays float32, as a user's)."""
    opts = dict(opts)
    leaves = {"input": x.to(dtype).clone().requires_grad_(), "linear_weight": w.to(dtype).clone().requires_grad_()}
    for name in ("linear_bias", "scale"):
        if isinstance(opts.get(name), torch.Tensor):
            leaves[name] = opts[name].to(dtype).clone().requires_grad_()
            opts[name] = leaves[name]
    if isinstance(opts.get("weight"), torch.Tensor):
        opts["weight"] = opts["weight"].to(dtype)
    if target.is_floating_point():
        target = target.to(dtype)
    out = fn(leaves["input"], leaves["linear_weight"], target, **opts)
    loss, lse = out if opts.get("return_lse") else (out, None)
    g = torch.Generator().manual_seed(1)
    total = (loss * torch.randn(loss.shape, generator=g, dtype=torch.float64).to(loss.dtype)).sum()
    if lse is not None:
        total = total + (lse * torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)).sum()
    grads = torch.autograd.grad(total, list(leaves.values()), allow_unused=True)
    named = {
        name: torch.zeros_like(t) if gr is None else gr for (name, t), gr in zip(leaves.items(), grads, strict=True)
    }
    return {"loss": loss.detach(), "lse": None if lse is None else lse.detach(), **named}


def _torch(x, w, target, *, linear_bias=None, lam=None, **opts):
    lam = lam.reshape(-1) if isinstance(lam, torch.Tensor) else lam  # the reference takes lam per flat row
    return torch_linear_xent(x, w, target, b=linear_bias, lam=lam, **opts)


def _check_against_torch(impl, problem):
    x, w, target, opts = problem
    dtype = x.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    got = _evaluate(lambda *a, **k: linear_cross_entropy(*a, impl=impl, **k), x, w, target, opts, dtype)
    exact = _evaluate(_torch, x, w, target, opts, torch.float64)
    own = _evaluate(_torch, x, w, target, opts, torch.float32)
    assert got["loss"].dtype == compute
    if torch.isnan(exact["loss"]).any():  # a mean over no kept row: 0 / 0, as torch
        assert torch.equal(torch.isnan(got["loss"]), torch.isnan(exact["loss"]))
        return
    # Bound: twice torch's own float32 error (scaled to fused_xent's compute dtype), plus the
    # rounding of the output to its dtype, plus what storing lse as one number costs: the
    # loss is lse - sum_j t_j z_j and p = exp(z - lse), so their error is u |lse| relative,
    # not u (torch's log_softmax subtracts the row max first). The "+ 1" keeps the bound
    # meaningful for exact zeros (C = 1, where p = t = 1); every quantity here is O(1).
    ratio = 2 * UNIT_ROUNDOFF[compute] / UNIT_ROUNDOFF[torch.float32]
    lse = _evaluate(_torch, x, w, target, {**opts, "return_lse": True}, torch.float64)["lse"]
    logit_scale = 1.0 + float(lse.abs().max()) if lse.numel() else 1.0
    for name, ref in exact.items():
        if ref is None:
            continue
        out = got[name]
        assert out.shape == ref.shape and torch.isfinite(out).all(), name
        err = float((out.double() - ref).norm())
        own_err = float((own[name].double() - ref).norm())
        slack = (UNIT_ROUNDOFF[out.dtype] + 8 * UNIT_ROUNDOFF[compute] * logit_scale) * (float(ref.norm()) + 1.0)
        assert err <= ratio * own_err + slack, f"{name}: error {err:.3g}, torch fp32 {own_err:.3g}, slack {slack:.3g}"


@settings(max_examples=150, **SETTINGS)
@given(problems(max_rows=24, max_d=24, max_c=40, dtypes=[torch.float32, torch.float64, torch.bfloat16, torch.float16]))
def test_chunked_matches_torch(problem):
    _check_against_torch("chunked", problem)


@settings(max_examples=40, **SETTINGS)
@given(problems(max_rows=12, max_d=16, max_c=24, dtypes=[torch.float32, torch.float64, torch.bfloat16]))
def test_reference_matches_torch(problem):
    _check_against_torch("reference", problem)


@settings(max_examples=40, **SETTINGS)
@given(problems(max_rows=20, max_d=20, max_c=70, dtypes=[torch.float32, torch.bfloat16, torch.float16]))
def test_triton_matches_torch(problem):
    _check_against_torch("triton", problem)


# malformed calls: (argument named in the message, exception, how to break a valid call)
def _valid(N, D, C):
    g = torch.Generator().manual_seed(N * 1000 + D * 10 + C)
    x, w = torch.randn(N, D, generator=g), torch.randn(C, D, generator=g)
    return [x, w, torch.randint(0, C, (N,), generator=g)], {}


def _set(**kw):
    return lambda args, opts, N, D, C: (args, {**opts, **kw})


def _arg(i, make):
    return lambda args, opts, N, D, C: ([make(a, N, D, C) if j == i else a for j, a in enumerate(args)], opts)


MALFORMED = {
    "input not a tensor": ("input", TypeError, _arg(0, lambda a, N, D, C: a.tolist())),
    "input integer": ("input", TypeError, _arg(0, lambda a, N, D, C: a.long())),
    "input 0-d": ("input", ValueError, _arg(0, lambda a, N, D, C: a.sum())),
    "weight 1-d": ("linear_weight", ValueError, _arg(1, lambda a, N, D, C: a[0])),
    "weight 3-d": ("linear_weight", ValueError, _arg(1, lambda a, N, D, C: a[None])),
    "no classes": ("linear_weight", ValueError, _arg(1, lambda a, N, D, C: a[:0])),
    "features differ": ("linear_weight", ValueError, _arg(1, lambda a, N, D, C: torch.randn(C, D + 1))),
    "weight dtype": ("linear_weight", TypeError, _arg(1, lambda a, N, D, C: a.double())),
    "target shape": ("target", ValueError, _arg(2, lambda a, N, D, C: a[:-1])),
    "target bool": ("target", TypeError, _arg(2, lambda a, N, D, C: a > 0)),
    "target list": ("target", TypeError, _arg(2, lambda a, N, D, C: a.tolist())),
    "target too large": ("target", ValueError, _arg(2, lambda a, N, D, C: a.clone().fill_(C))),
    "target negative": ("target", ValueError, _arg(2, lambda a, N, D, C: a.clone().fill_(-1))),
    "probabilities classes": ("target", ValueError, _arg(2, lambda a, N, D, C: torch.rand(N, C + 1))),
    "bias shape": ("linear_bias", ValueError, lambda args, opts, N, D, C: (args, {"linear_bias": torch.randn(C + 1)})),
    "bias dtype": (
        "linear_bias",
        TypeError,
        lambda args, opts, N, D, C: (args, {"linear_bias": torch.randn(C).half()}),
    ),
    "class weight shape": ("weight", ValueError, lambda args, opts, N, D, C: (args, {"weight": torch.rand(C + 2)})),
    "target2 without lam": ("lam", ValueError, lambda args, opts, N, D, C: (args, {"target2": args[2]})),
    "lam without target2": ("target2", ValueError, _set(lam=0.5)),
    "lam above 1": ("lam", ValueError, lambda args, opts, N, D, C: (args, {"target2": args[2], "lam": 1.5})),
    "lam shape": (
        "lam",
        ValueError,
        lambda args, opts, N, D, C: (args, {"target2": args[2], "lam": torch.rand(N + 1)}),
    ),
    "target2 range": (
        "target2",
        ValueError,
        lambda args, opts, N, D, C: (args, {"target2": args[2].clone().fill_(C), "lam": 0.5}),
    ),
    "reduction": ("reduction", ValueError, _set(reduction="avg")),
    "label_smoothing": ("label_smoothing", ValueError, _set(label_smoothing=1.5)),
    "label_smoothing nan": ("label_smoothing", ValueError, _set(label_smoothing=math.nan)),
    "z_loss": ("z_loss", ValueError, _set(z_loss=-0.1)),
    "z_loss inf": ("z_loss", ValueError, _set(z_loss=math.inf)),
    "softcap": ("softcap", ValueError, _set(softcap=0.0)),
    "softcap inf": ("softcap", ValueError, _set(softcap=math.inf)),
    "scale shape": ("scale", ValueError, _set(scale=torch.ones(2))),
    "impl": ("impl", ValueError, _set(impl="cuda")),
    "ignore_index": ("ignore_index", TypeError, _set(ignore_index="none")),
    "deterministic": ("deterministic", TypeError, _set(deterministic=1)),
}


@settings(max_examples=150, **SETTINGS)
@given(
    case=st.sampled_from(sorted(MALFORMED)),
    N=st.integers(1, 9),
    D=st.integers(1, 9),
    C=st.integers(1, 9),
    impl=st.sampled_from(["auto", "chunked", "triton", "reference"]),
)
def test_malformed_calls_raise_naming_the_argument(case, N, D, C, impl):
    name, error, corrupt = MALFORMED[case]
    args, opts = corrupt(*_valid(N, D, C), N, D, C)
    opts = {"impl": impl, **opts}
    with pytest.raises(error, match=name):
        linear_cross_entropy(*args, **opts)
