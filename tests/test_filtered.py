"""impl="filtered" (SPEC section 5): lean's backward, skipping the classes whose gradient
stays below the dtype's resolution on every row. Against lean bitwise with the threshold at
0, and against torch's F.cross_entropy on float64 logits (tests/torch_reference.py) on
peaked logits where some classes are dropped; CPU, the Triton kernels interpreted."""

from __future__ import annotations

import functools

import pytest
import torch
from torch_reference import rel_err, torch_linear_xent

from fused_xent import linear_cross_entropy
from fused_xent.kernels import class_chunked

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: Smoothing puts eps_s / C on every class: it stays below the threshold (finfo.eps / 32 is
#: 2**-12 for bf16, 2**-15 for fp16), or every class of every row would be kept.
SMOOTHING = {torch.float32: 0.0, torch.bfloat16: 0.05, torch.float16: 0.005}
C = 300  # chunks of 128, 128 and 48 classes, the last from class 252 (see small_chunks, _owned_ranges)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of 128 classes, so that one call has dense, gathered and empty chunks."""
    monkeypatch.setattr(class_chunked, "CHUNK_BYTES", 1)
    monkeypatch.setattr(class_chunked, "MIN_CHUNK_COLS", 128)


@pytest.fixture
def chunk_log(monkeypatch):
    """``(width, flagged)`` of every chunk of a filtered backward."""
    log = []
    finish = class_chunked._finish_filtered

    def spy(x, w, scale, dx, dw, counts, c0, c1, du, order, slot, ready):
        log.append((c1 - c0, int(counts[slot])))
        return finish(x, w, scale, dx, dw, counts, c0, c1, du, order, slot, ready)

    monkeypatch.setattr(class_chunked, "_finish_filtered", spy)
    return log


def random_problem(dtype, N=37, D=19, ignore=5, weight=False, seed=0):
    """Fresh random inputs in ``dtype``; ``ignore`` rows ignored."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(C, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, C, (N,), generator=g)
    y[torch.randperm(N, generator=g)[:ignore]] = -100
    cw = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype) if weight else None
    return x.to(dtype), w.to(dtype), b.to(dtype), y, cw


def peaked_problem(dtype, N=40, D=21, seed=0):
    """Logits ``x @ w.T + b`` built so that every kind of chunk occurs, far from the threshold:

    - classes [0, 128): rows [0, 16) put near-uniform mass on them (all kept, a dense chunk);
    - classes [128, 256): rows [16, 36) put almost all mass on one of them (logit 100 vs at
      most ~60), their targets elsewhere in it: a few dozen kept classes, a gathered chunk;
    - classes [256, 300): bias -40, nobody's target: every class dropped;
    - rows [36, 40) ignored.
    """
    g = torch.Generator().manual_seed(seed)
    f64 = dict(generator=g, dtype=torch.float64)
    w = torch.zeros(C, D, dtype=torch.float64)
    w[:128, 0] = 1.0
    w[:128, 1:] = 0.05 * torch.randn(128, D - 1, **f64)
    u = torch.randn(128, D - 1, **f64)
    w[128:256, 1:] = u / u.norm(dim=1, keepdim=True)
    w[256:, 1:] = 0.1 * torch.randn(C - 256, D - 1, **f64)
    b = 0.1 * torch.randn(C, **f64)
    b[256:] -= 40.0
    x = torch.randn(N, D, **f64)
    x[:16] = 0.1 * x[:16]
    x[:16, 0] = 30.0
    x[16:36, 0] = 0.0
    x[16:36, 1:] = 100.0 * w[torch.randint(128, 256, (20,), generator=g), 1:]
    y = torch.cat([torch.randint(0, 128, (16,), generator=g), torch.randint(128, 256, (20,), generator=g)])
    y = torch.cat([y, torch.full((N - 36,), -100)])
    return x.to(dtype), w.to(dtype), b.to(dtype), y


def torch_impl(x, w, y, *, linear_bias=None, **opts):
    """The shared reference under ``linear_cross_entropy``'s argument names."""
    return torch_linear_xent(x, w, y, b=linear_bias, **opts)


def run(impl, x, w, b, y, *, scale=None, grads="xwbs", loss_factor=1.0, **opts):
    """``(loss, grads)`` of one call of ``impl`` (a name, or ``torch_impl``); ``grads`` names
    the leaves differentiated (x, w, b and a learnable ``scale``). With ``return_lse`` the lse
    gets a fixed random upstream gradient."""
    leaves = {"x": x, "w": w, "b": b, "s": scale}
    leaves = {k: t.detach().clone().requires_grad_(k in grads) if t is not None else None for k, t in leaves.items()}
    fn = impl if callable(impl) else functools.partial(linear_cross_entropy, impl=impl)
    out = fn(leaves["x"], leaves["w"], y, linear_bias=leaves["b"], scale=leaves["s"], **opts)
    loss, lse = out if opts.get("return_lse") else (out, None)
    total = loss.sum() * loss_factor
    if lse is not None:
        total = total + (lse * torch.randn(lse.shape, generator=torch.Generator().manual_seed(1)).to(lse)).sum()
    wrt = [leaves[k] for k in grads if leaves[k] is not None]
    return loss.detach(), dict(zip(grads, torch.autograd.grad(total, wrt), strict=True))


def dropped_classes(dw: torch.Tensor) -> torch.Tensor:
    return (dw == 0).all(dim=1)


def _random_calls(dtype):
    x, w, b, y, cw = random_problem(dtype, weight=True)
    s = torch.tensor(1.5, dtype=dtype)
    y_none = torch.full_like(y, -100)
    return [
        ((x, w, b, y), dict(scale=s, label_smoothing=0.1, reduction="mean")),
        ((x, w, b, y), dict(scale=s, weight=cw, softcap=20.0, z_loss=1e-3, reduction="sum", return_lse=True)),
        ((x, w, b, y_none), dict(scale=s, reduction="sum")),
        (peaked_problem(dtype), dict(scale=torch.tensor(1.25, dtype=dtype), label_smoothing=SMOOTHING[dtype])),
    ]


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_zero_is_lean_bitwise(dtype, monkeypatch):
    monkeypatch.setattr(class_chunked, "FILTER_EPS_FACTOR", 0.0)
    for args, opts in _random_calls(dtype):
        loss, grads = run("filtered", *args, **opts)
        lean_loss, lean_grads = run("lean", *args, **opts)
        assert torch.equal(loss, lean_loss)
        for name, g in grads.items():
            assert torch.equal(g, lean_grads[name]), (name, opts)


def reference_grads(x, w, b, y, scale, reduction, label_smoothing):
    """Float64 logits, torch's ``dL/dz`` for them (the reference with an identity weight),
    ``p`` and the target distribution ``t`` (zero on ignored rows)."""
    s = float(scale)
    x64, w64 = x.double(), w.double()
    z = (s * x64 @ w64.T + b.double()).requires_grad_()
    loss = torch_linear_xent(z, torch.eye(C, dtype=torch.float64), y, reduction=reduction,
                             label_smoothing=label_smoothing)  # fmt: skip
    (dz,) = torch.autograd.grad(loss, z)
    keep = (y != -100)[:, None]
    t = torch.full_like(dz, label_smoothing / C)
    t.scatter_add_(1, y.clamp(min=0)[:, None], torch.full_like(dz[:, :1], 1.0 - label_smoothing))
    return dz, torch.where(keep, (z.detach().softmax(-1) - t).abs(), 0.0)


def check_against_reference(x, w, b, y, s, eps, reduction, label_smoothing=0.0, grads="xwbs"):
    """Filtered vs float64: the classes dropped (dW rows exactly zero) are exactly those with
    ``|p - t| < eps`` on every row (with db: the recomputing backward; without, the bounded
    one drops a subset of them), and every gradient matches the float64 one with the dropped
    classes' dL/dz zeroed (db, the loss: unfiltered, lean's bitwise). Returns ``dropped``."""
    opts = dict(scale=s, reduction=reduction, label_smoothing=label_smoothing, grads=grads)
    loss, got = run("filtered", x, w, b, y, **opts)
    lean_loss, lean = run("lean", x, w, b, y, **opts)
    dz, p_minus_t = reference_grads(x, w, b, y, s, reduction, label_smoothing)
    dropped = dropped_classes(got["w"])
    insignificant = (p_minus_t < eps).all(dim=0)
    if "b" in grads:
        assert torch.equal(dropped, insignificant)
    else:
        assert not (dropped & ~insignificant).any()

    x64, w64 = x.double(), w.double()
    dz_kept = dz * (~dropped).double()
    want = {
        "x": float(s) * dz_kept @ w64,
        "w": float(s) * dz_kept.T @ x64,
        "b": dz.sum(0),
        "s": (dz_kept * (x64 @ w64.T)).sum(),
    }
    opts = dict(reduction=reduction, label_smoothing=label_smoothing, grads=grads)
    _, low = run(torch_impl, x, w, b, y, scale=s, **opts)
    _, exact = run(torch_impl, x64, w64, b.double(), y, scale=s.double(), **opts)
    for name, g in got.items():
        bound = 2 * rel_err(low[name], exact[name]) + 2e-6 if x.dtype != torch.float32 else 2e-5
        assert rel_err(g, want[name]) <= bound, (name, rel_err(g, want[name]), bound)
    assert torch.equal(loss, lean_loss)
    if "b" in grads:
        assert torch.equal(got["b"], lean["b"])
    return dropped


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_peaked_logits_drop_only_insignificant_classes(dtype, reduction, chunk_log):
    x, w, b, y = peaked_problem(dtype)
    eps = torch.finfo(dtype).eps / 32
    s = torch.tensor(1.25, dtype=dtype)
    dropped = check_against_reference(x, w, b, y, s, eps, reduction, SMOOTHING[dtype])
    assert dropped.any() and not dropped.all()
    # two of the three paths ran: a dense chunk and a gathered one (of a width not a multiple
    # of 8); the third, a chunk with nothing kept: test_chunks_with_nothing_kept
    assert any(k > width // 2 for width, k in chunk_log), chunk_log
    assert any(0 < k <= width // 2 and k % 8 for width, k in chunk_log), chunk_log


def test_large_threshold_drops_whole_contributions(monkeypatch, chunk_log):
    """At eps = 1/16 the dropped classes carry gradients far above fp32's resolution: any
    contribution of theirs to dX or dW would show."""
    eps = 2.0**-4
    monkeypatch.setattr(class_chunked, "FILTER_EPS_FACTOR", eps / torch.finfo(torch.float32).eps)
    x, w, b, y, _ = random_problem(torch.float32)
    dropped = check_against_reference(x, w, b, y, torch.tensor(3.0), eps, "mean")
    assert dropped.any() and not dropped.all()
    assert any(0 < k <= width // 2 and k % 8 for width, k in chunk_log), chunk_log


def test_chunks_with_nothing_kept(chunk_log):
    """Classes [128, 300) far below every row's mass (bias -40) and nobody's target: the chunks
    over them keep nothing (no GEMM; their dW rows zero) and the gradients stay float64's."""
    x, w, b, y, _ = random_problem(torch.float32)
    b = b.clone()
    b[128:] -= 40.0
    y = torch.where(y == -100, y, y % 128)
    dropped = check_against_reference(x, w, b, y, torch.tensor(1.0), torch.finfo(torch.float32).eps / 32, "mean")
    assert dropped[128:].all() and not dropped.all()
    assert [k for _, k in chunk_log][1:] == [0, 0], chunk_log


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_is_relative_to_the_row_coefficient(dtype):
    """The kept classes depend on |p - t| only: not on the reduction, the upstream gradient
    or class weights (which rescale a hard-label row's gradient without changing t)."""
    x, w, b, y = peaked_problem(dtype)
    cw = torch.linspace(0.5, 3.0, C).to(dtype)
    calls = [dict(reduction="mean"), dict(reduction="sum", loss_factor=1e3), dict(reduction="mean", weight=cw)]
    dropped = [dropped_classes(run("filtered", x, w, b, y, grads="w", **opts)[1]["w"]) for opts in calls]
    assert dropped[0].any() and not dropped[0].all()
    for other in dropped[1:]:
        assert torch.equal(dropped[0], other)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_each_gradient_alone_and_reproducible(dtype):
    x, w, b, y = peaked_problem(dtype)
    opts = dict(label_smoothing=SMOOTHING[dtype], scale=torch.tensor(1.25, dtype=dtype))
    _, with_db = run("filtered", x, w, b, y, **opts)  # db: the recomputing backward
    _, again = run("filtered", x, w, b, y, **opts)
    for name, g in with_db.items():
        assert torch.equal(g, again[name]), name
    _, both = run("filtered", x, w, b, y, grads="xws", **opts)  # no db: the bounded backward
    _, again = run("filtered", x, w, b, y, grads="xws", **opts)
    _, only_w = run("filtered", x, w, b, y, grads="w", **opts)
    _, only_x = run("filtered", x, w, b, y, grads="x", **opts)
    for name, g in both.items():
        assert torch.equal(g, again[name]), name
    assert torch.equal(only_w["w"], both["w"]) and torch.equal(only_x["x"], both["x"])


@pytest.fixture
def pieces_log(monkeypatch):
    """The recompute GEMMs' widths of a bounded backward, ``(width, gathered)`` each."""
    log = []
    pieces = class_chunked._bounded_pieces

    def spy(*args):
        out = pieces(*args)
        log.extend((k1 - k0, idx is not None) for k0, k1, idx in out)
        return out

    monkeypatch.setattr(class_chunked, "_bounded_pieces", spy)
    return log


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("row_splits", [False, True])
def test_bounded_backward_on_peaked_logits(dtype, row_splits, pieces_log, chunk_log, monkeypatch):
    """Without a bias gradient the forward's per-class bound decides: the classes it drops
    are insignificant on every row, recomputing none of them (classes [256, 300), bias -40),
    and the kept ones get exact gradients. ``row_splits``: the column maxima come from two
    programs per column block (40 rows in tiles of 32), as on a GPU."""
    if row_splits:
        monkeypatch.setattr(class_chunked, "target_programs", lambda device: 64)
    x, w, b, y = peaked_problem(dtype)
    eps = torch.finfo(dtype).eps / 32
    dropped = check_against_reference(x, w, b, y, torch.tensor(1.25, dtype=dtype), eps, "mean", SMOOTHING[dtype], "xws")
    assert dropped[256:].all() and not dropped[:256].any()
    assert sum(width for width, _ in pieces_log) == 256  # the two forward chunks kept whole, once
    assert not chunk_log  # the recomputing backward did not run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bounded_backward_gathers_kept_classes(monkeypatch, pieces_log, dtype, reduction):
    """At eps = 1/16 on random logits the bound drops some classes of every chunk but the
    first: those kept are gathered into one dense chunk, and nothing else is recomputed. The
    gathered chunk's width is no multiple of 8: its GEMMs run over W's gathered rows padded
    with zero rows (``_gathered_rows``), whose columns must add nothing (fp16: the padding
    columns of dU lie over fp32 products)."""
    eps = 2.0**-4
    monkeypatch.setattr(class_chunked, "FILTER_EPS_FACTOR", eps / torch.finfo(dtype).eps)
    padded = []
    gathered_rows = class_chunked._gathered_rows

    def spy(w, idx, max_rows):
        out = gathered_rows(w, idx, max_rows)
        padded.append(out.shape[0] - idx.numel())
        return out

    monkeypatch.setattr(class_chunked, "_gathered_rows", spy)
    x, w, b, y, _ = random_problem(dtype)
    dropped = check_against_reference(x, w, b, y, torch.tensor(3.0, dtype=dtype), eps, reduction, grads="xws")
    assert dropped[128:].any() and not dropped[:128].any()
    gathered = [width for width, g in pieces_log if g]
    assert gathered and sum(width for width, _ in pieces_log) == int((~dropped).sum())
    assert any(padded), (gathered, padded)


def test_bounded_backward_smoothing_above_threshold_keeps_all(pieces_log):
    """Smoothing mass above the threshold on every class: nothing can be dropped, and the
    exact backward runs (lean's gradients bitwise)."""
    x, w, b, y, _ = random_problem(torch.bfloat16)
    opts = dict(label_smoothing=0.5, grads="xw")
    _, got = run("filtered", x, w, b, y, **opts)
    _, lean = run("lean", x, w, b, y, **opts)
    assert not pieces_log
    for name, g in got.items():
        assert torch.equal(g, lean[name]), name


def test_gathered_rows_pad_to_a_multiple_of_eight():
    """W's gathered rows, then zero rows up to a multiple of 8 classes; none past ``max_rows``
    (the chunk buffer's width) and none when the count is a multiple of 8 already."""
    w = torch.randn(50, 6, dtype=torch.bfloat16)
    idx = torch.tensor([3, 7, 8, 20, 41])
    padded = class_chunked._gathered_rows(w, idx, max_rows=128)
    assert padded.shape == (8, 6)
    assert torch.equal(padded[:5], w[idx]) and not padded[5:].any()
    assert torch.equal(class_chunked._gathered_rows(w, idx, max_rows=6), w[idx])  # 8 > 6: unpadded
    eight = torch.arange(8) * 5
    assert torch.equal(class_chunked._gathered_rows(w, eight, max_rows=128), w[eight])


@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("C,cc", [(300, 128), (1003, 256), (5, 128), (16, 8)])
def test_kept_classes_against_their_definition(C, cc, smoothing):
    """``_kept_classes`` (one Triton launch after the labels' flags) against the bounded
    filter's rule in torch: class j kept when it is some row's label, or ``exp(bound_j) +
    t_max >= eps`` (NaN kept), and the kept count of each forward chunk, the tail of fewer than
    8 classes included. Bounds lie on both sides of the threshold but outside the band of
    ``_EXP_MARGIN`` around it, where the kernel keeps what the exact comparison might drop."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(C + cc + smoothing)
    eps = 2.0**-12
    N = 7
    log_eps = torch.tensor(eps).log()
    bound = log_eps + torch.empty(C).uniform_(-3, 3, generator=g)
    bound[(bound - log_eps).abs() < 1e-3] += 0.01
    bound[::11] = float("nan")
    bound[1::13] = float("-inf")
    bound[2::17] = float("inf")
    y1 = torch.randint(0, C, (N,), generator=g)
    y2 = torch.randint(0, C, (N,), generator=g)
    e = torch.rand(N, generator=g) * 1e-5 if smoothing else torch.zeros(N)
    cp = torch.rand(N, generator=g) + 0.5
    cw = torch.rand(C, generator=g) + 0.5
    rt_g = SimpleNamespace(y1=y1, y2=y2, e=e, class_weight=cw)
    keep, counts = class_chunked._kept_classes(bound, cp, rt_g, eps, smoothing, cc)
    t_max = (e / cp).max() * cw.max() if smoothing else 0.0
    want = ~(torch.exp(bound) + t_max < eps)
    want[y1] = True
    want[y2] = True
    assert torch.equal(keep, want)
    ranges = class_chunked._chunk_ranges(C, cc)
    assert counts == [int(want[c0:c1].sum()) for c0, c1 in ranges]
    assert C % 8 == 0 or ranges[-1][1] - ranges[-1][0] < 8  # a tail chunk of its own
