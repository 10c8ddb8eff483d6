"""linear_cross_entropy against torch's own F.cross_entropy on float64 logits, for every
backend on CPU (the Triton kernels through the interpreter) over awkward shapes and the
option matrix of SPEC section 2."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch_reference import rel_err, torch_linear_xent

import fused_xent
from fused_xent import linear_cross_entropy

DEVICE = "cuda" if torch.cuda.is_available() and not torch.version.hip else "cpu"
CPU_IMPLS = ["chunked", "triton", "lean", "reference"]


def make_problem(N, D, C, dtype, *, lead=None, bias=False, weight=False, dense=False, ignore=0, seed=0, device="cpu"):
    """Fresh random inputs, rounded to ``dtype``; targets with ``ignore`` rows ignored."""
    g = torch.Generator().manual_seed(seed)
    shape = lead if lead is not None else (N,)
    x = torch.randn(*shape, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(C, generator=g, dtype=torch.float64) * 0.5 if bias else None
    if dense:
        y = torch.softmax(torch.randn(*shape, C, generator=g, dtype=torch.float64) * 2, -1)
    else:
        y = torch.randint(0, C, shape, generator=g)
        if ignore:
            y.view(-1)[torch.randperm(y.numel(), generator=g)[:ignore]] = -100
    cw = torch.rand(C, generator=g, dtype=torch.float64) + 0.5 if weight else None
    to = dict(device=device)
    x, w = x.to(dtype).to(**to), w.to(dtype).to(**to)
    b = b.to(dtype).to(**to) if b is not None else None
    return x, w, b, y.to(**to), (cw.to(**to) if cw is not None else None)


def labels_at_every_class(C: int, ignore_every: int | None = None):
    """``(y, y2, lam)`` for 2 C rows: every class is some row's first and some row's second
    (mixup) label; with ``ignore_every`` every such row is ignored in ``y`` (-100)."""
    y = torch.arange(2 * C) % C
    if ignore_every:
        y[::ignore_every] = -100
    y2 = (7 * torch.arange(2 * C) + 3) % C
    return y, y2, torch.rand(2 * C, generator=torch.Generator().manual_seed(1))


def check(impl, dtype, N, D, C, *, reduction="mean", lead=None, bias=False, weight=False, dense=False, ignore=0,
          noncontig=False, device="cpu", seed=0, **opts):  # fmt: skip
    """Value and every gradient of fused vs torch (float64), and the bound for low precision:
    the fused error is at most twice torch's own error in ``dtype`` (plus a float32 floor)."""
    x, w, b, y, cw = make_problem(N, D, C, dtype, lead=lead, bias=bias, weight=weight, dense=dense, ignore=ignore,
                                  seed=seed, device=device)  # fmt: skip
    if noncontig:  # same values, a strided view
        x = torch.cat([x, x], dim=-1)[..., ::2].clone().contiguous()
        x = x.transpose(0, -1).contiguous().transpose(0, -1) if x.dim() == 2 else x
        assert x.dim() != 2 or not x.is_contiguous()
    scale = opts.pop("scale", None)
    learn_scale = isinstance(scale, torch.Tensor)
    want_lse = opts.pop("return_lse", False)
    if dense:
        y = y.to(dtype if dtype != torch.float64 else torch.float64)

    def leaves(dt):
        ts = [t.detach().to(dt).requires_grad_() if t is not None else None for t in (x, w, b)]
        s = scale.detach().to(dt).requires_grad_() if learn_scale else scale
        return (*ts, s)

    def run(fn, xx, ww, bb, ss, dt):
        cw_ = cw.to(dt) if cw is not None else None
        yy = y.to(dt) if dense else y
        out = fn(xx, ww, yy, bb, ss, cw_)
        loss, lse = out if want_lse else (out, None)
        gl = torch.randn(loss.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(loss)
        total = (loss * gl).sum()
        if want_lse:
            gs = torch.randn(lse.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64).to(lse)
            total = total + (lse * gs).sum()
        grads = torch.autograd.grad(
            total, [t for t in (xx, ww, bb, ss) if isinstance(t, torch.Tensor)], allow_unused=True
        )
        return loss, lse, grads

    def fused(xx, ww, yy, bb, ss, cw_):
        return linear_cross_entropy(xx, ww, yy, linear_bias=bb, weight=cw_, reduction=reduction, scale=ss,
                                    return_lse=want_lse, impl=impl, **opts)  # fmt: skip

    def torch_ref(xx, ww, yy, bb, ss, cw_):
        return torch_linear_xent(xx, ww, yy, b=bb, weight=cw_, reduction=reduction, scale=ss,
                                 return_lse=want_lse, **opts)  # fmt: skip

    ref = run(torch_ref, *leaves(torch.float64), torch.float64)
    got = run(fused, *leaves(dtype), dtype)
    floor = 1e-11 if dtype == torch.float64 else 2e-6
    if dtype in (torch.float16, torch.bfloat16):
        low = run(torch_ref, *leaves(dtype), torch.float32)
        bounds = [2 * rel_err(a, r) + floor for a, r in zip(low[2], ref[2], strict=True)]
    else:
        bounds = [floor * 10] * len(ref[2])
    assert got[0].shape == ref[0].shape
    assert rel_err(got[0], ref[0]) <= floor * 10, (got[0], ref[0])
    if want_lse:
        assert rel_err(got[1], ref[1]) <= floor * 10
    for name, gg, rr, bound in zip("x w b s".split()[: len(got[2])], got[2], ref[2], bounds, strict=True):
        assert gg is not None and gg.dtype == (dtype if name != "s" else gg.dtype), name
        assert rel_err(gg, rr) <= bound, (name, rel_err(gg, rr), bound)
    return got


SHAPES = [(37, 19, 101), (1, 7, 3), (64, 33, 130)]


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("N,D,C", SHAPES)
def test_plain(impl, N, D, C):
    check(impl, torch.float32, N, D, C)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weight_smoothing_ignore_bias(impl, reduction):
    check(impl, torch.float32, 37, 19, 101, reduction=reduction, bias=True, weight=True, ignore=5, label_smoothing=0.1)


@pytest.mark.parametrize("tile", [dict(ROW_BLOCKS=3, COLS=256), dict(ROW_BLOCKS=2, COLS=1024)])
def test_lean_bias_gradient_over_several_row_blocks_per_program(tile, monkeypatch):
    """The grad kernel summing db over several row blocks per program (a partial last one at
    N = 37 with 16-row blocks) and over column splits, against float64."""
    from fused_xent.kernels import class_chunked

    monkeypatch.setattr(class_chunked, "GRAD_DB_TILE", tile)
    check("lean", torch.float32, 37, 19, 601, bias=True, label_smoothing=0.1, ignore=4)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_probability_targets(impl, reduction):
    check(impl, torch.float32, 29, 17, 70, reduction=reduction, dense=True, weight=True, label_smoothing=0.2, bias=True)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_leading_dims_and_strided_input(impl):
    check(impl, torch.float32, 0, 9, 45, lead=(3, 5), reduction="none", ignore=2)
    check(impl, torch.float32, 21, 9, 45, noncontig=True, bias=True)


@pytest.mark.parametrize("impl", CPU_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_row_ignored(impl, reduction):
    x, w, b, y, _ = make_problem(8, 5, 11, torch.float32, bias=True)
    x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    y = torch.full_like(y, -100)
    loss = linear_cross_entropy(x, w, y, linear_bias=b, reduction=reduction, label_smoothing=0.1, impl=impl)
    ref = F.cross_entropy(F.linear(x.double(), w.double(), b.double()), y, reduction=reduction, label_smoothing=0.1)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref))
    if reduction == "mean":
        assert torch.isnan(loss)
        loss.backward()
    else:
        assert torch.all(loss == 0)
        loss.sum().backward()
    for t in (x, w, b):
        assert torch.all(t.grad == 0)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_scale_softcap_zloss(impl):
    check(impl, torch.float32, 37, 19, 101, bias=True, scale=torch.tensor(2.5), softcap=4.0, z_loss=1e-2)
    check(impl, torch.float32, 37, 19, 101, scale=0.7, softcap=30.0, label_smoothing=0.1, reduction="sum")


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_mixup(impl):
    g = torch.Generator().manual_seed(3)
    y2 = torch.randint(0, 101, (37,), generator=g)
    check(impl, torch.float32, 37, 19, 101, target2=y2, lam=0.3, label_smoothing=0.1)
    lam = torch.rand(37, generator=g, dtype=torch.float64)
    check(impl, torch.float32, 37, 19, 101, target2=y2, lam=lam.float(), weight=True, ignore=4, reduction="mean")
    check(impl, torch.float32, 37, 19, 101, target2=y2, lam=lam.float(), reduction="none", bias=True)


@pytest.mark.parametrize("impl", CPU_IMPLS)
def test_return_lse_is_differentiable(impl):
    check(impl, torch.float32, 37, 19, 101, return_lse=True, reduction="none", ignore=3, bias=True)


@pytest.mark.parametrize("impl", ["triton", "lean", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(impl, dtype):
    check(impl, dtype, 64, 33, 130, bias=True, label_smoothing=0.1, ignore=3)


def test_float64_chunked_is_exact():
    check("chunked", torch.float64, 37, 19, 101, bias=True, weight=True, label_smoothing=0.1, ignore=5,
          scale=torch.tensor(1.3, dtype=torch.float64), z_loss=1e-3)  # fmt: skip


def test_chunked_bounds_memory_by_chunks(monkeypatch):
    from fused_xent import reference

    monkeypatch.setattr(reference, "DEFAULT_CHUNK_BYTES", 12 * 101 * 5)  # five rows per chunk
    assert reference.chunk_rows(101, reference.DEFAULT_CHUNK_BYTES) == 5
    check("chunked", torch.float32, 37, 19, 101, bias=True, label_smoothing=0.1, ignore=4)


def test_nan_row_gives_nan_for_that_row():
    for impl in CPU_IMPLS:
        x, w, _, y, _ = make_problem(6, 5, 11, torch.float32)
        x[2, 1] = float("nan")
        loss = linear_cross_entropy(x, w, y, reduction="none", impl=impl)
        assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3, 4, 5]]).all(), impl


def test_inputs_are_never_modified():
    x, w, b, y, cw = make_problem(17, 9, 23, torch.float32, bias=True, weight=True, ignore=3)
    saved = [t.clone() for t in (x, w, b, y, cw)]
    for impl in CPU_IMPLS:
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        linear_cross_entropy(xx, ww, y, linear_bias=bb, weight=cw, label_smoothing=0.1, impl=impl).backward()
        assert all(torch.equal(a, b_) for a, b_ in zip((xx, ww, bb, y, cw), saved, strict=True))


def test_forward_only_matches_training_forward():
    x, w, b, y, _ = make_problem(37, 19, 101, torch.float32, bias=True)
    for impl in CPU_IMPLS:
        with torch.no_grad():
            a = linear_cross_entropy(x, w, y, linear_bias=b, label_smoothing=0.1, impl=impl)
        bb = linear_cross_entropy(x.requires_grad_(), w, y, linear_bias=b, label_smoothing=0.1, impl=impl)
        x.requires_grad_(False)
        assert torch.allclose(a, bb.detach(), rtol=1e-6)


@pytest.mark.parametrize("D, tma", [(16, True), (13, False), ("broadcast", False)])
def test_forward_kernel_through_descriptors_and_pointers(D, tma):
    """The streaming forward reads X and W through TMA descriptors where rows are 16-byte
    aligned and distinct, else through pointers (rows of 13 fp32, or one row broadcast to all
    with stride 0); both give torch's value (bias, smoothing, softcap, z-loss, ragged row and
    class tiles)."""
    from fused_xent.kernels.linear_xent_forward import tma_loads

    x, w, b, y, _ = make_problem(37, 16 if D == "broadcast" else D, 101, torch.float32, bias=True, ignore=3)
    if D == "broadcast":
        x = x[:1].expand_as(x)
    assert tma_loads(x, w) is tma
    kw = dict(label_smoothing=0.1, softcap=3.0, z_loss=1e-3, reduction="none")
    with torch.no_grad():
        got = linear_cross_entropy(x, w, y, linear_bias=b, **kw, impl="triton")
    ref = torch_linear_xent(x.double(), w.double(), y, b=b.double(), **kw)
    assert rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("C", [63, 64, 65])
def test_forward_kernel_targets_at_every_class(C):
    """Every class is some row's first and some row's second (mixup) target, so targets fall on
    the first and last column of class tiles (32 wide under the interpreter) and in a last tile
    with one column, a full one, or all but one: the streaming forward's target logits and its
    column mask hold at every tile edge (session 8's candidates that skipped tiles or masked the
    last tile alone had to pass this)."""
    x, w, b, _, _ = make_problem(2 * C, 16, C, torch.float32, bias=True)
    y, y2, lam = labels_at_every_class(C)
    with torch.no_grad():
        got = linear_cross_entropy(x, w, y, linear_bias=b, target2=y2, lam=lam, reduction="none", impl="triton")
    ref = torch_linear_xent(x.double(), w.double(), y, b=b.double(), target2=y2, lam=lam.double(), reduction="none")
    assert rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("smoothing", [0.0, 0.15])
@pytest.mark.parametrize("extras", [dict(), dict(softcap=2.0, scale=1.7, bias=True)])
def test_lean_forward_label_logits_at_every_chunk_edge(smoothing, extras, monkeypatch):
    """The lean forward reads each row's label logits from its chunk after the chunk's loop
    (``class_chunked._label_term``) and sums z only with smoothing. Chunks of 128 classes here
    (the last one 25 wide): every class is some row's first and some row's second (mixup)
    target, ignored rows included, so labels fall on each chunk's first and last column and in
    the short last chunk; the loss per row matches float64 in both the lean and the filtered
    forward."""
    from fused_xent.kernels import class_chunked

    monkeypatch.setattr(class_chunked, "CHUNK_BYTES", 1)
    monkeypatch.setattr(class_chunked, "MIN_CHUNK_COLS", 128)
    C = 409
    bias = extras.pop("bias", False)
    x, w, b, _, _ = make_problem(2 * C, 16, C, torch.float32, bias=bias)
    x.requires_grad_()  # the training forward (a call without gradient streams through another kernel)
    y, y2, lam = labels_at_every_class(C, ignore_every=37)
    for kw in (dict(), dict(target2=y2, lam=lam)):
        kw_ref = {k: (v.double() if k == "lam" else v) for k, v in kw.items()}
        ref = torch_linear_xent(x.detach().double(), w.double(), y, b=None if b is None else b.double(),
                                reduction="none", label_smoothing=smoothing, **kw_ref, **extras)  # fmt: skip
        for impl in ("lean", "filtered"):
            got = linear_cross_entropy(x, w, y, linear_bias=b, reduction="none", label_smoothing=smoothing, impl=impl,
                                       **kw, **extras)  # fmt: skip
            assert rel_err(got.detach(), ref) < 1e-6, (impl, kw.keys(), rel_err(got.detach(), ref))


def test_module_matches_function():
    x, w, b, y, cw = make_problem(17, 9, 23, torch.float32, bias=True, weight=True, ignore=3)
    mod = fused_xent.LinearCrossEntropyLoss(cw, reduction="sum", label_smoothing=0.1, z_loss=1e-3)
    fn = linear_cross_entropy(x, w, y, linear_bias=b, weight=cw, reduction="sum", label_smoothing=0.1, z_loss=1e-3)
    assert torch.equal(mod(x, w, y, b), fn)
    assert "label_smoothing=0.1" in repr(mod) and "return_lse=False" in repr(mod)


BAD_INPUTS = [
    (dict(w=torch.randn(11, 7)), ValueError, "features"),
    (dict(y=torch.randint(0, 11, (5,))), ValueError, "target has shape"),
    (dict(y=torch.randn(8, 10)), ValueError, "target holds class probabilities"),
    (dict(y=torch.full((8,), 11)), ValueError, "target contains 11"),
    (dict(y=torch.full((8,), -3)), ValueError, "target contains -3"),
    (dict(y=torch.zeros(8, dtype=torch.bool)), TypeError, "target must be"),
    (dict(kw=dict(linear_bias=torch.randn(10))), ValueError, "linear_bias must have shape"),
    (dict(kw=dict(weight=torch.rand(12))), ValueError, "weight must be"),
    (dict(kw=dict(weight=torch.rand(11, requires_grad=True))), RuntimeError, "weight (the class weights) requires"),
    (dict(kw=dict(reduction="avg")), ValueError, "reduction must be"),
    (dict(kw=dict(label_smoothing=1.5)), ValueError, "label_smoothing"),
    (dict(kw=dict(label_smoothing=-0.1)), ValueError, "label_smoothing"),
    (dict(kw=dict(softcap=0.0)), ValueError, "softcap"),
    (dict(kw=dict(z_loss=-1.0)), ValueError, "z_loss"),
    (dict(kw=dict(impl="cuda")), ValueError, "impl must be"),
    (dict(kw=dict(scale=torch.ones(3))), ValueError, "scale must be"),
    (dict(kw=dict(target2=torch.zeros(8, dtype=torch.long))), ValueError, "lam"),
    (dict(kw=dict(target2=torch.full((8,), 99), lam=0.5)), ValueError, "target2 contains 99 on a row that"),
    (dict(y=torch.rand(8, 11), kw=dict(ignore_index=2)), ValueError, "ignore_index=2 does not apply"),
    (dict(kw=dict(target2=torch.zeros(8, dtype=torch.long), lam=1.5)), ValueError, "lam must be in"),
    (dict(kw=dict(target2=torch.zeros(8, dtype=torch.long), lam=torch.rand(3))), ValueError, "lam must be"),
    (
        dict(kw=dict(target2=torch.zeros(8, dtype=torch.long), lam=torch.rand(8, requires_grad=True))),
        RuntimeError,
        "lam requires grad",
    ),  # fmt: skip
    (dict(w=torch.randn(11, 6).double()), TypeError, "linear_weight dtype"),
    (dict(x=torch.randn(8, 6).int()), TypeError, "input must be a float tensor"),
    (dict(w=torch.randn(11)), ValueError, "linear_weight must be a (C, D)"),
    (dict(w=torch.randn(0, 6)), ValueError, "at least one class"),
    (dict(kw=dict(options="chunked")), TypeError, "options must be None or a torch.nn.LinearCrossEntropyOptions"),
    (dict(kw=dict(return_lse="yes")), TypeError, "return_lse must be a bool"),
    (dict(kw=dict(deterministic="no")), TypeError, "deterministic must be a bool"),
]


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("case", range(len(BAD_INPUTS)))
def test_bad_input_names_the_argument(impl, case):
    args, err, match = BAD_INPUTS[case]
    x = args.get("x", torch.randn(8, 6))
    w = args.get("w", torch.randn(11, 6))
    y = args.get("y", torch.randint(0, 11, (8,)))
    with pytest.raises(err, match=match.replace("(", r"\(").replace(")", r"\)")):
        linear_cross_entropy(x, w, y, **{"impl": impl, **args.get("kw", {})})


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(4, dtype=torch.long), impl="triton")


def test_deferred_range_check_raises_on_a_later_call(monkeypatch):
    """The CUDA path's bookkeeping, driven on CPU: a finished check whose flags show a bad
    label raises on the next call, naming the argument and the value, once; one still in
    flight waits."""
    from fused_xent import functional

    class Event:
        def __init__(self, done):
            self.done = done

        def query(self):
            return self.done

    pending = functional._PENDING_CHECKS
    monkeypatch.setattr(functional, "_PENDING_CHECKS", pending.__class__())
    x, w, _, y, _ = make_problem(6, 5, 11, torch.float32)
    functional._PENDING_CHECKS.append((Event(False), torch.tensor([0, 17]), 11, -100))
    linear_cross_entropy(x, w, y)  # still in flight: nothing yet
    functional._PENDING_CHECKS[0][0].done = True
    with pytest.raises(ValueError, match=r"target contains 17, outside \[0, 11\).*its loss is NaN"):
        linear_cross_entropy(x, w, y)
    linear_cross_entropy(x, w, y)  # reported once
    functional._PENDING_CHECKS.append((Event(True), torch.tensor([-2, 3, 0, 0, 1]), 11, None))
    with pytest.raises(ValueError, match="target contains -2"):
        linear_cross_entropy(x, w, y)
    functional._PENDING_CHECKS.append((Event(True), torch.tensor([0, 3, 0, 0, 1]), 11, None))
    with pytest.raises(ValueError, match="lam must lie in"):
        linear_cross_entropy(x, w, y)


@pytest.mark.parametrize("impl", ["lean", "filtered"])
def test_training_forward_nan_row_and_minus_inf_classes(impl):
    """The chunked training forward (not the no-grad stream): a NaN input row gives a NaN
    loss for that row only, and classes with a -inf bias count for nothing."""
    x, w, b, y, _ = make_problem(6, 5, 11, torch.float32, bias=True)
    b[[3, 7]] = float("-inf")
    y[(y == 3) | (y == 7)] = 0
    x[2, 1] = float("nan")
    xx = x.clone().requires_grad_()
    loss = linear_cross_entropy(xx, w, y, linear_bias=b, reduction="none", impl=impl)
    ref = torch_linear_xent(x.double(), w.double(), y, b=b.double(), reduction="none")
    finite = [0, 1, 3, 4, 5]
    assert torch.isnan(loss[2]) and torch.isfinite(loss[finite]).all()
    assert rel_err(loss[finite], ref[finite]) < 1e-6


def test_an_integer_scale_tensor_is_a_constant():
    """``scale=torch.tensor(2)`` multiplies as ``2.0`` does (torch's own products take integer
    tensors); a bool tensor is refused."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    want = linear_cross_entropy(x, w, y, scale=2.0)
    torch.testing.assert_close(linear_cross_entropy(x, w, y, scale=torch.tensor(2)), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="scale"):
        linear_cross_entropy(x, w, y, scale=torch.tensor(True))
    with pytest.raises(ValueError, match="scale"):  # an integer dtype underneath, but not a number
        linear_cross_entropy(x, w, y, scale=torch.quantize_per_tensor(torch.tensor([2.0]), 0.1, 0, torch.qint8))
