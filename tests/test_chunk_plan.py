"""Lean's chunks beyond its logit buffer (``kernels.class_chunked``, under the interpreter here).

The training forward runs before the backward allocates dW and the fp32 dX, so it may hold
their bytes as logits (``functional._spare_bytes``): fewer, wider chunks. The exact backward
writes dW one chunk of rows at a time, so a chunk's logits may live in dW's rows past it, not
yet written (``_dw_ranges``, ``_dw_tail``). The gradients stay those of torch's own bf16 / fp16 /
fp32 computation against float64 (``test_functional.check``), and the chunks are checked to be
the wider ones."""

from __future__ import annotations

import pytest
import torch
from test_filtered import random_problem, reference_grads
from test_functional import check, make_problem
from test_margins import loss_and_grads, problem, reference
from torch_reference import rel_err

from fused_xent import linear_cross_entropy
from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.integrations.margins import margin_cross_entropy
from fused_xent.kernels import class_chunked


@pytest.fixture
def chunks(monkeypatch):
    """A 128-class logit buffer, and the widths of every chunk's products by pass: the
    forward's (``_raw_products`` before any backward) and the backward's (their ``dW``-row
    chunks marked ``"dw"``)."""
    monkeypatch.setattr(class_chunked, "CHUNK_BYTES", 1)
    monkeypatch.setattr(class_chunked, "MIN_CHUNK_COLS", 128)
    seen = {"forward": [], "backward": [], "dw": []}
    phase = ["forward"]
    raw_products, recompute, dw_tail = class_chunked._raw_products, class_chunked._recompute_du, class_chunked._dw_tail

    def spy_products(x, w_chunk, out):
        if phase[0] == "forward":
            seen["forward"].append(w_chunk.shape[0])
        return raw_products(x, w_chunk, out)

    def spy_recompute(x, w_k, *args, **kwargs):
        phase[0] = "backward"
        seen["backward"].append(w_k.shape[0])
        return recompute(x, w_k, *args, **kwargs)

    def spy_tail(dw, c1, N, width, dtype):
        seen["dw"].append(width)
        return dw_tail(dw, c1, N, width, dtype)

    monkeypatch.setattr(class_chunked, "_raw_products", spy_products)
    monkeypatch.setattr(class_chunked, "_recompute_du", spy_recompute)
    monkeypatch.setattr(class_chunked, "_dw_tail", spy_tail)
    return seen


@pytest.mark.parametrize(
    "C,cc,logit_bytes,dw_bytes",
    [(1003, 128, 32, 128), (301, 128, 74, 64), (256000, 6016, 16384, 4608), (1_000_000, 13696, 8192, 1024),
     (21841, 9088, 8192, 1536), (64, 128, 2, 4096), (7, 128, 4, 4), (1000, 1000, 1, 1)],
)  # fmt: skip
def test_dw_ranges_cover_the_classes_and_fit_in_dw(C, cc, logit_bytes, dw_bytes):
    ranges = class_chunked._dw_ranges(C, cc, logit_bytes, dw_bytes)
    aligned = C - C % 8
    assert ranges[0][0] == 0 and ranges[-1][1] == C
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    for c0, c1 in ranges:
        width = c1 - c0
        if c0 >= aligned:  # the tail of fewer than 8 classes
            assert width == C - aligned
            continue
        assert width % 8 == 0 or c1 == aligned == C, (c0, c1)
        if width > cc:  # its logits in dW's rows past it, as many as fit in multiples of 128
            assert width * logit_bytes <= (C - c1) * dw_bytes
            assert width % 128 == 0 or c1 == aligned
            assert c1 == aligned or (width + 128) * logit_bytes > (C - c1 - 128) * dw_bytes
    regular = [c1 - c0 for c0, c1 in ranges if c1 - c0 <= cc and c0 < aligned]
    if regular:  # the fewest chunks of the buffer's width at most, equal but for the last
        assert max(regular) <= cc and len(regular) == -(-sum(regular) // cc)
        assert len(set(regular[:-1])) <= 1 and regular[-1] <= regular[0]


@pytest.mark.parametrize(
    "dtype,opts,forward",
    [
        (torch.bfloat16, dict(), [1000, 3]),  # the one-pass recompute at D = 64
        (torch.float32, dict(label_smoothing=0.1, ignore=3), [1000, 3]),
        (torch.float16, dict(dense=True), [512, 496]),  # fp32 logits, over fp16 dW's bytes in the backward
        (torch.float32, dict(reduction="sum"), [1000, 3]),
    ],
)
def test_lean_chunks_in_spare_bytes_keep_the_gradients(dtype, opts, forward, chunks):
    check("lean", dtype, 64, 64, 1003, **opts)
    # the forward holds dW's and the fp32 dX's bytes as logits (the buffer alone: 9 chunks);
    # the backward's logits of its first chunks in dW's rows past them
    assert chunks["forward"] == forward
    per_class = 64 * (2 if dtype == torch.bfloat16 else 4)
    ranges = class_chunked._dw_ranges(1003, 128, per_class, 64 * torch.empty((), dtype=dtype).element_size())
    expected = class_chunked._owned_ranges(ranges, 128)  # the last chunk takes the tail of 3
    assert chunks["backward"] == [c1 - c0 for c0, c1, _ in expected] and len(expected) == len(ranges) - 1
    assert chunks["dw"] == [w for w in chunks["backward"] if w > 128] and chunks["dw"]


def test_lean_forward_without_dw_keeps_its_chunk(chunks):
    """A frozen W allocates no dW: the forward's chunks are the buffer's, and the backward has no
    dW rows to hold logits."""
    x, w, _, y, _ = make_problem(64, 64, 1003, torch.bfloat16, seed=3)
    x.requires_grad_()
    linear_cross_entropy(x, w, y, impl="lean").backward()
    assert chunks["forward"] == [128] * 7 + [112]  # the last 104 and the tail of 3 as one, from class 891
    assert chunks["backward"] == chunks["forward"] and not chunks["dw"]


@pytest.mark.parametrize("features", ["bias", "scale"])
def test_lean_backward_keeps_its_buffer_for_a_bias_or_a_scale(features, chunks):
    """The bias's partial sums are as wide as the buffer, and a scale rounds dW after an fp32
    product per chunk: both keep the buffer's chunks (the forward still widens)."""
    check("lean", torch.float32, 64, 64, 1003, bias=features == "bias", scale=1.3 if features == "scale" else None)
    assert chunks["forward"] == [1000, 3]
    assert max(chunks["backward"]) <= 128 and not chunks["dw"]


def test_margins_backward_logits_in_dw(chunks):
    """The margins' cosine logits (W's norms inside the kernels, then the tangent pass over dW)
    through lean with wide chunks: the gradients of the materialised reference."""
    x, w, y = problem(64, 64, 1003, dtype=torch.float32, seed=7, spread=0.8)
    got = loss_and_grads(lambda a, b: margin_cross_entropy(a, b, y, s=32.0, m2=0.5, impl="lean"), x, w)
    want = loss_and_grads(lambda a, b: reference(a, b, y, s=32.0, m=(1.0, 0.5, 0.0)), x, w)
    assert chunks["dw"], chunks
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) < 1e-5, rel_err(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_filtered_bound_over_wider_chunks(dtype, chunks, monkeypatch):
    """Filtered's training forward: its first chunk the buffer's (kept whole), the later ones
    widened by the gradients' bytes (here one of 168 classes, then the tail of 4). The classes
    it drops must still be below the threshold on every row, and the gradients those of
    float64 with the dropped classes' dL/dz zeroed."""
    eps = 2.0**-4  # far above the dtypes' resolution: a class wrongly dropped would show
    monkeypatch.setattr(class_chunked, "FILTER_EPS_FACTOR", eps / torch.finfo(dtype).eps)
    x, w, b, y, _ = random_problem(dtype, D=64)
    s = torch.tensor(1.0)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    loss = linear_cross_entropy(*leaves, y, linear_bias=b, scale=s, impl="filtered")
    gx, gw = torch.autograd.grad(loss, leaves)
    assert chunks["forward"] == [128, 168, 4]
    dz, p_minus_t = reference_grads(x, w, b, y, s, "mean", 0.0)
    dropped = (gw == 0).all(dim=1)
    assert dropped.any() and not dropped.all()
    assert not (dropped & ~(p_minus_t < eps).all(dim=0)).any()
    dz_kept = dz * (~dropped).double()
    bound = 2e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(gx, dz_kept @ w.double()) < bound
    assert rel_err(gw, dz_kept.T @ x.double()) < bound


def test_filtered_bound_is_its_definition_per_chunk():
    """The per-class bound of filtered's forward, chunk by chunk over a narrow first chunk and
    wider later ones: ``+inf`` on the first, then ``max_i (z_ij - lse_k,i) - min_i (lse_i -
    lse_k,i)`` with ``lse_k`` the rows' lse over the classes before chunk k, from float64."""
    N, D, C = 24, 16, 1003
    x, w, _, y, _ = make_problem(N, D, C, torch.float32, seed=5)
    opts = XentOptions(num_classes=C, chunk_bytes=128 * N * 4)  # a buffer of 128 fp32 columns
    rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
    lse, _, bound = class_chunked.class_chunked_forward_bounded(
        x, w, None, torch.ones(1), rt, opts, chunk_bytes=300 * N * 4
    )
    # the first chunk, three of 256 columns, then one of 112 that takes the tail of 3 and the 5
    # classes before it (_owned_ranges): its bound is over the lse of classes [0, 891)
    starts = [0, 128, 384, 640, 891]
    z = x.double() @ w.double().T
    lse64 = torch.logsumexp(z, 1)
    assert torch.allclose(lse.double(), lse64, rtol=0, atol=1e-5)
    assert torch.isinf(bound[:128]).all()
    for c0, c1 in zip(starts[1:], starts[2:] + [C], strict=True):
        before = torch.logsumexp(z[:, :c0], 1)
        want = (z[:, c0:c1] - before[:, None]).amax(0) - (lse64 - before).amin()
        torch.testing.assert_close(bound[c0:c1].double(), want, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "C,cc,merged",
    [(301, 128, True), (1003, 128, True), (21841, 11008, True), (1003, 1000, False), (21841, 10920, False),
     (263, 128, False), (131, 128, False), (7, 128, False), (1000, 128, False)],
)  # fmt: skip
def test_owned_ranges_count_every_class_once(C, cc, merged):
    """The last chunk takes the tail where it fits in the buffer and a chunk comes before it
    (``merged``); otherwise the ranges stay ``_chunk_ranges``'. Either way every class is owned
    by one chunk, a chunk's classes past what it owns are the next chunk's first, and every chunk
    but a tail is a multiple of 8 wide and fits in the buffer."""
    ranges = class_chunked._chunk_ranges(C, cc)
    owned = class_chunked._owned_ranges(ranges, cc)
    assert (len(owned) == len(ranges) - 1) == merged
    assert merged or owned == [(c0, c1, c1 - c0) for c0, c1 in ranges]
    counts = torch.zeros(C, dtype=torch.int64)
    for (c0, c1, own), nxt in zip(owned, owned[1:] + [None], strict=True):
        counts[c0 : c0 + own] += 1
        assert 0 < own <= c1 - c0 <= cc
        assert (c1 - c0) % 8 == 0 or (c0 == C - C % 8 and not merged)
        assert own == c1 - c0 or nxt[0] == c0 + own
    assert (counts == 1).all() and owned[-1][1] == C


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [None, 1.3])
def test_classes_the_last_chunk_takes_get_their_gradients(dtype, scale, monkeypatch):
    """C = 301 over a 128-class buffer: the last chunk is classes [205, 301), the one before it
    [104, 208) owning [104, 205). Rows labelled 205-207 (counted by the last chunk only), with a
    bias, smoothing and a scale (with one, the backward keeps the buffer's chunks; without one, it
    writes dW from its GEMMs): loss and every gradient of float64's, the bias gradient included
    (the chunk before writes those classes' dW rows and bias entries as zero first)."""
    monkeypatch.setattr(class_chunked, "CHUNK_BYTES", 1)
    monkeypatch.setattr(class_chunked, "MIN_CHUNK_COLS", 128)
    x, w, b, y, _ = make_problem(48, 32, 301, dtype, bias=True, seed=11)
    y[:12] = torch.tensor([205, 206, 207] * 4)
    s = None if scale is None else torch.tensor(scale, dtype=torch.float64)

    def grads(dt, impl):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, w, b)]
        loss = linear_cross_entropy(
            leaves[0], leaves[1], y, linear_bias=leaves[2], label_smoothing=0.1, impl=impl,
            scale=None if s is None else s.to(dt),
        )  # fmt: skip
        return [loss, *torch.autograd.grad(loss, leaves)]

    got, want = grads(dtype, "lean"), grads(torch.float64, "reference")
    bound = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, b_ in zip(("loss", "dx", "dw", "db"), got, want, strict=True):
        assert rel_err(a, b_) < bound, (name, rel_err(a, b_))
    assert want[3][205:208].abs().min() > 0  # the classes the last chunk takes have a gradient to get right
