"""The "fast" strategy (``fused_xent.kernels.row_chunked``): values and every gradient
against torch's float64 loss through ``test_functional.check`` (Triton kernels under the
interpreter on CPU), with several row chunks so that dW goes through the split fp32
accumulator, its in-place narrowing, the memory plan and the refusals."""

from __future__ import annotations

import pytest
import torch
from test_functional import check, labels_at_every_class, make_problem
from torch_reference import torch_linear_xent

from fused_xent import functional, linear_cross_entropy
from fused_xent.kernels import row_chunked


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 16 rows: a zero memory budget leaves "fast" at MIN_FAST_ROWS rows."""
    monkeypatch.setattr(row_chunked, "MIN_FAST_ROWS", 16)
    monkeypatch.setattr(functional, "_MEMORY_BUDGET", 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_options_one_chunk(reduction):
    check("fast", torch.float32, 37, 19, 101, reduction=reduction, bias=True, weight=True, ignore=5,
          label_smoothing=0.1)  # fmt: skip
    check("fast", torch.float32, 29, 17, 70, reduction=reduction, dense=True, label_smoothing=0.2, bias=True)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_several_row_chunks(dtype):
    """Chunks of 16 rows, the last one short; in fp32 C * D is odd, so the split
    accumulator's halves are unequal."""
    N, D, C = (37, 19, 101) if dtype == torch.float32 else (61, 33, 130)
    check("fast", dtype, N, D, C, bias=True, ignore=3, label_smoothing=0.1)
    check("fast", dtype, N, D, C, reduction="sum", scale=torch.tensor(1.75), softcap=5.0, z_loss=1e-3)


@pytest.mark.usefixtures("small_chunks")
def test_mixup_and_class_weights():
    g = torch.Generator().manual_seed(3)
    y2 = torch.randint(0, 101, (37,), generator=g)
    lam = torch.rand(37, generator=g).float()
    check("fast", torch.float32, 37, 19, 101, target2=y2, lam=lam, weight=True, ignore=4)


@pytest.mark.usefixtures("small_chunks")
@pytest.mark.parametrize("smoothing", [0.0, 0.15])
def test_first_pass_label_logits_at_every_class(smoothing):
    """The fast kernel's first pass reads each row's label logits from the row chunk after its
    loop (as the lean forward does) and sums z only with smoothing: every class is some row's
    first and some row's second (mixup) label, ignored rows included, across chunks of 16 rows;
    the summed loss matches float64 with and without bias and softcap."""
    C = 70
    for extras in (dict(), dict(softcap=2.0, bias=True)):
        bias = extras.pop("bias", False)
        x, w, b, _, _ = make_problem(2 * C, 16, C, torch.float32, bias=bias)
        x.requires_grad_()
        y, y2, lam = labels_at_every_class(C, ignore_every=13)
        for kw in (dict(), dict(target2=y2, lam=lam)):
            kw_ref = {k: (v.double() if k == "lam" else v) for k, v in kw.items()}
            ref = torch_linear_xent(x.detach().double(), w.double(), y, b=None if b is None else b.double(),
                                    reduction="sum", label_smoothing=smoothing, **kw_ref, **extras)  # fmt: skip
            got = linear_cross_entropy(x, w, y, linear_bias=b, reduction="sum", label_smoothing=smoothing,
                                       impl="fast", **kw, **extras)  # fmt: skip
            assert abs(got.item() - ref.item()) <= 1e-6 * abs(ref.item()), (kw.keys(), got.item(), ref.item())


def test_every_row_ignored():
    x, w, b, y, _ = make_problem(8, 5, 11, torch.float32, bias=True)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    loss = linear_cross_entropy(x, w, torch.full_like(y, -100), linear_bias=b, reduction="sum", impl="fast")
    loss.backward()
    assert loss == 0 and all(torch.all(t.grad == 0) for t in leaves)


@pytest.mark.usefixtures("small_chunks")
def test_only_some_inputs_need_grad():
    x, w, b, y, _ = make_problem(37, 19, 101, torch.bfloat16, bias=True)
    w.requires_grad_()
    loss = linear_cross_entropy(x, w, y, linear_bias=b, impl="fast")
    (gw,) = torch.autograd.grad(loss * 3.0, [w])
    wr = w.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(torch_linear_xent(x.double(), wr, y, b=b.double()) * 3.0, [wr])
    assert (gw.double() - want).norm() / want.norm() < 1e-2


def test_no_grad_uses_the_forward_only_path():
    x, w, b, y, _ = make_problem(37, 19, 101, torch.float32, bias=True)
    with torch.no_grad():
        got = linear_cross_entropy(x, w, y, linear_bias=b, impl="fast")
    want = torch_linear_xent(x.double(), w.double(), y, b=b.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("opts", [dict(reduction="none"), dict(return_lse=True)])
def test_fast_refuses_what_it_cannot_precompute(opts):
    x, w, _, y, _ = make_problem(8, 5, 11, torch.float32)
    with pytest.raises(ValueError, match="impl='fast'.*reduction"):
        linear_cross_entropy(x.requires_grad_(), w, y, impl="fast", **opts)


def test_memory_budget_is_checked():
    x, w, _, y, _ = make_problem(8, 5, 11, torch.float32)
    for bad in (-1, 1.5, "1GB", True):
        with pytest.raises(ValueError, match="memory_budget"):
            linear_cross_entropy(x, w, y, memory_budget=bad)


@pytest.mark.parametrize("raw_dx", [True, False])
@pytest.mark.parametrize("N,C,D,budget", [(8192, 256000, 2304, 3 * 2**30), (8192, 128256, 4096, 1558183936),
                                          (8192, 256000, 2304, 1953497088), (5000, 50000, 1024, 2**28)])  # fmt: skip
def test_chunk_rows_fit_the_budget(N, C, D, budget, raw_dx):
    """The fewest chunks that fit (the largest multiple of 128 rows that fits sets their count),
    as equal as multiples of 128 allow; SPEC's fast budgets at Gemma 2 and Llama 3 among them.
    Without ``raw_dx`` (no scale: no fp32 dX) the same budget holds at least as many rows."""

    def ws(rows, raw=raw_dx):
        return row_chunked.fast_workspace_bytes(N, C, D, torch.bfloat16, rows, raw)

    assert row_chunked.fast_chunk_rows(N, C, D, torch.bfloat16, ws(N), raw_dx) == N
    rows = row_chunked.fast_chunk_rows(N, C, D, torch.bfloat16, budget, raw_dx)
    assert rows % 128 == 0 and rows >= row_chunked.MIN_FAST_ROWS
    assert ws(rows) <= budget
    widest = max(r for r in range(128, N, 128) if ws(r) <= budget)
    assert -(-N // rows) == -(-N // widest)  # as few chunks as the widest that fits
    assert rows - 128 < row_chunked.MIN_FAST_ROWS or -(-N // (rows - 128)) > -(-N // widest)  # and no wider than needed
    assert ws(rows, raw=True) - ws(rows, raw=False) == 4 * N * D  # the fp32 dX, held only with a scale
    if raw_dx:
        assert row_chunked.fast_chunk_rows(N, C, D, torch.bfloat16, budget, raw_dx=False) >= rows


def test_no_chunk_fits_a_small_budget():
    N, C, D = 8192, 256000, 2304
    assert row_chunked.fast_chunk_rows(N, C, D, torch.bfloat16, 2**30) is None  # the fp32 half alone is 1.1 GiB


@pytest.mark.parametrize("C,D", [(7, 5), (2, 3), (1, 4), (300, 7001)])
def test_narrowing_in_place_equals_a_copy(C, D):
    """fp32 values held in dW's own bytes (first half) and beside it (second half) come out
    as one rounding each, as ``.to(dtype)`` gives, with and without a scale."""
    for dtype in (torch.bfloat16, torch.float16):
        for scale in (None, torch.tensor([0.37])):
            dw = torch.empty(C, D, dtype=dtype)
            first, rest = row_chunked._split_accumulator(dw)
            values = torch.randn(C, D, generator=torch.Generator().manual_seed(C))
            first.copy_(values[: first.shape[0]])
            rest.copy_(values[first.shape[0] :])
            row_chunked._narrow_in_place(first, rest, dw, scale)
            want = (values if scale is None else values * scale).to(dtype)
            assert torch.equal(dw, want)


def test_compiled_fast_matches_eager():
    x, w, b, y, _ = make_problem(13, 11, 37, torch.float32, bias=True, ignore=2)
    s = torch.tensor([1.3])

    def fn(xx, ww, bb, ss):
        return linear_cross_entropy(xx, ww, y, linear_bias=bb, scale=ss, label_smoothing=0.1, impl="fast")

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (compiled, fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, s)]
        loss = f(*leaves)
        results.append([loss, *torch.autograd.grad(loss * 0.5, leaves)])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dx_straight_from_its_gemm():
    """C a multiple of 8, no scale: dX leaves its GEMM in the input dtype, one rounding.
    (fp16: in bf16 the logits' own rounding moves this shape's loss past check's fp32 bound,
    for lean as well.)"""
    check("fast", torch.float16, 64, 33, 128, bias=True, label_smoothing=0.1, ignore=3)


@pytest.mark.parametrize("chunks", ["one", "several"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dx_from_its_gemms_with_a_class_tail(request, chunks, dtype):
    """C = 8k + 3, no scale: dX from the tail's GEMM and the rest added to it in one more
    (``_final_dx``), in the input dtype, in one chunk of rows and in several; some rows are
    labelled with a tail class (there the tail's product is of dX's size)."""
    if chunks == "several":
        request.getfixturevalue("small_chunks")
    N, D, C = 96, 33, 131
    y = make_problem(N, D, C, dtype, bias=True)[3]
    assert (y >= C - C % 8).sum() >= 2  # check draws the same labels
    check("fast", dtype, N, D, C, bias=True, label_smoothing=0.1)


def test_auto_takes_fast_only_where_it_fits_and_pays(monkeypatch):
    """Auto on CUDA-like tensors: fast when a chunk of at least MIN_FAST_ROWS rows fits in
    the budget and the loss is reduced, lean otherwise (a CPU tensor stands in: _fast_rows
    only reads shapes)."""
    lean = functional._class_chunked_backend()
    x = torch.empty(8192, 2304, dtype=torch.bfloat16)
    w = torch.empty(256000, 2304, dtype=torch.bfloat16)

    def rows(budget, reduction="mean", return_lse=False, impl="auto", need_grad=True):
        return functional._fast_rows(impl, lean, x, w, reduction, return_lse, need_grad, budget)

    assert rows(6 * 2**30) == 8192  # every row in one chunk
    assert 1024 <= rows(2 * 2**30) < 8192  # row chunks with the split accumulator
    assert rows(2**30) is None  # the fp32 half of dW alone is 1.1 GiB: lean
    assert rows(6 * 2**30, reduction="none") is None
    assert rows(6 * 2**30, return_lse=True) is None
    assert rows(6 * 2**30, need_grad=False) is None  # evaluation streams instead
    assert rows(2**30, impl="fast") == row_chunked.MIN_FAST_ROWS  # asked for: the smallest chunks
    assert functional._fast_rows("lean", lean, x, w, "mean", False, True, 6 * 2**30) is None
    half = x.half(), w.half()  # float16: auto takes lean (below); "fast" when asked for
    assert functional._fast_rows("auto", lean, *half, "mean", False, True, 6 * 2**30) is None
    assert functional._fast_rows("fast", lean, *half, "mean", False, True, 6 * 2**30) is not None


def test_float16_under_a_loss_scale_takes_lean():
    """A GradScaler multiplies the loss by 65536 after the forward. "fast" forms the gradients
    in the forward at their unscaled size (1 / N per row for the mean), where float16 flushes
    their small entries (the session-19 pass: 5226 of 262144 dX entries exactly 0, 44x torch's
    error, at N = 8192); "auto" on CUDA took it whenever it fitted. Here the choice itself (CPU
    tensors take "chunked" under auto, so _fast_rows is asked as CUDA's "auto" asks it) and the
    gradients "lean" then forms, against float64, under a loss scale of 65536: no entry of dW
    that float64 has is flushed."""
    N, D, C = 64, 32, 300
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g).half()
    w = (torch.randn(C, D, generator=g) * 1.4).half()  # confident rows: many small p
    y = torch.randint(0, C, (N,), generator=g)
    lean = functional._class_chunked_backend()
    assert functional._fast_rows("auto", lean, x, w, "mean", False, True, 2**40) is None
    ref_w = w.double().requires_grad_()
    torch.nn.functional.cross_entropy(x.double() @ ref_w.T, y).backward()

    def flushed(fn) -> int:
        leaf = w.detach().clone().requires_grad_()
        (65536.0 * fn(leaf)).backward()
        return int(((leaf.grad == 0) & (ref_w.grad != 0)).sum())

    torch_flushed = flushed(lambda ww: torch.nn.functional.cross_entropy((x @ ww.T).float(), y))
    assert flushed(lambda ww: linear_cross_entropy(x, ww, y, impl="lean")) <= torch_flushed
    fast_flushed = flushed(lambda ww: linear_cross_entropy(x, ww, y, impl="fast"))
    assert fast_flushed > 10 * max(torch_flushed, 1)  # what auto no longer takes for float16


@pytest.mark.parametrize("impl", ["lean", "filtered"])
def test_memory_budget_sizes_the_lean_chunk(monkeypatch, impl):
    """A budget the user sets gives "lean" and "filtered" a chunk of what it leaves beside the
    fp32 dX accumulator (here 256 fp32 columns: three chunks of 600 classes); without one they keep the
    default chunk. Lean's training forward adds the bytes of the gradients its backward will
    allocate (dW and the fp32 dX: ``functional._spare_bytes``). The result is the one-chunk
    result up to summation order."""
    from fused_xent.kernels import class_chunked

    monkeypatch.setattr(class_chunked, "BUDGET_SLACK_BYTES", 0)
    monkeypatch.setattr(class_chunked, "MIN_BUDGET_CHUNK_BYTES", 0)
    sizes, chunk = [], class_chunked._chunk

    def spy(x, C, nbytes=None, **kwargs):
        sizes.append(nbytes)
        return chunk(x, C, nbytes, **kwargs)

    monkeypatch.setattr(class_chunked, "_chunk", spy)
    N, D, C = 8, 16, 600
    x, w, _, y, _ = make_problem(N, D, C, torch.float32, seed=3)
    budget = 256 * N * 4  # 256 fp32 columns: fp32 dX (the accumulator, then dX itself) counts once
    results = []
    for memory_budget in (None, budget):
        sizes.clear()
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = linear_cross_entropy(xs, ws, y, impl=impl, memory_budget=memory_budget)
        loss.backward()
        results.append((loss.detach(), xs.grad, ws.grad))
        spare = (C * D + N * D) * 4 if impl == "lean" else 0  # dW and the fp32 dX, both fp32 here
        if memory_budget is None:
            assert sizes[0] == (class_chunked.CHUNK_BYTES + spare if spare else None) and sizes[-1] is None
        else:
            assert sizes[0] == 256 * N * 4 + spare  # the forward's chunk
            assert sizes[-1] == 256 * N * 4  # the backward's: 256 columns
            assert class_chunked._chunk_cols(x, C, sizes[-1]) == 256
    for one, three in zip(*results, strict=True):
        torch.testing.assert_close(three, one, rtol=1e-5, atol=1e-7)
