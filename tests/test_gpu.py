"""GPU equivalences at real sizes (``pytest -m gpu`` on a CUDA machine).

The bound is SPEC section 4's: the gradient error of fused_xent against an fp32 reference
(no TF32) is at most twice the error of torch's own computation in the same dtype."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch_reference import rel_err

from fused_xent import linear_cross_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SIZES = {"gemma2": (8192, 2304, 256000), "vit21k": (4096, 768, 21841)}


def _problem(N, D, C, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, D, device="cuda", generator=g).to(dtype)
    w = (torch.randn(C, D, device="cuda", generator=g) / math.sqrt(D)).to(dtype)
    b = (0.1 * torch.randn(C, device="cuda", generator=g)).to(dtype)
    y = torch.randint(0, C, (N,), device="cuda", generator=g)
    y[:: max(1, N // 50)] = -100
    return x, w, b, y


def _grads(fn, x, w, b, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, w, b)]
    loss = fn(*leaves)
    loss.backward()
    out = [loss.detach().float()] + [t.grad.float() for t in leaves]
    del leaves, loss
    return out


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("impl", ["auto", "lean", "fast", "fast_min_rows", "triton"])
def test_real_size_within_twice_torch_error(size, dtype, impl):
    """The "fast_min_rows" case: the fast mode with no memory budget, so in chunks of
    MIN_FAST_ROWS rows whose dW sums go through the split fp32 accumulator."""
    N, D, C = SIZES[size]
    budget = 0 if impl == "fast_min_rows" else None
    impl = "fast" if impl == "fast_min_rows" else impl
    x, w, b, y = _problem(N, D, C, dtype, seed=hash((size, str(dtype))) % 1000)
    opts = dict(label_smoothing=0.1, ignore_index=-100)

    def torch_loss(xx, ww, bb):
        return F.cross_entropy(F.linear(xx, ww, bb).float(), y, **opts)

    def fused(xx, ww, bb):
        return linear_cross_entropy(xx, ww, y, linear_bias=bb, impl=impl, memory_budget=budget, **opts)

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = _grads(torch_loss, x, w, b, torch.float32)
        own = _grads(torch_loss, x, w, b, dtype) if dtype != torch.float32 else None
        got = _grads(fused, x, w, b, dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    floor = 2e-5 if dtype == torch.float32 else 1e-4
    assert rel_err(got[0], ref[0]) < floor
    for name, g_, r_, o_ in zip(("dx", "dw", "db"), got[1:], ref[1:], own[1:] if own else [None] * 3, strict=True):
        bound = 2 * rel_err(o_, r_) if o_ is not None else floor
        assert rel_err(g_, r_) <= max(bound, floor), (name, rel_err(g_, r_), bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_lean_chunks_in_the_gradients_bytes_at_real_size(dtype, monkeypatch):
    """Lean without a bias (no db: its backward may put a chunk's logits in dW's rows past it,
    ``class_chunked._dw_tail``; fp16's fp32 logits over fp16 dW bytes) at the Gemma 2 head: every
    gradient within twice torch's own error, and the wider chunks taken."""
    from fused_xent.kernels import class_chunked

    tails, dw_tail = [], class_chunked._dw_tail

    def spy(dw, c1, N, width, chunk_dtype):
        tails.append(width)
        return dw_tail(dw, c1, N, width, chunk_dtype)

    monkeypatch.setattr(class_chunked, "_dw_tail", spy)
    N, D, C = SIZES["gemma2"]
    x, w, _, y = _problem(N, D, C, dtype, seed=11)
    opts = dict(label_smoothing=0.1, ignore_index=-100)

    def grads(fn, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, w)]
        loss = fn(*leaves)
        loss.backward()
        return [loss.detach().float()] + [t.grad.float() for t in leaves]

    def torch_loss(xx, ww):
        return F.cross_entropy(F.linear(xx, ww).float(), y, **opts)

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = grads(torch_loss, torch.float32)
        own = grads(torch_loss, dtype) if dtype != torch.float32 else None
        got = grads(lambda xx, ww: linear_cross_entropy(xx, ww, y, impl="lean", **opts), dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert len(tails) >= 2 and all(t % class_chunked.CHUNK_ALIGN == 0 for t in tails), tails
    floor = 2e-5 if dtype == torch.float32 else 1e-4
    assert rel_err(got[0], ref[0]) < floor
    for name, g_, r_, o_ in zip(("dx", "dw"), got[1:], ref[1:], own[1:] if own else [None] * 2, strict=True):
        bound = 2 * rel_err(o_, r_) if o_ is not None else floor
        assert rel_err(g_, r_) <= max(bound, floor), (name, rel_err(g_, r_), bound)


def test_forward_only_needs_no_logit_memory():
    N, D, C = SIZES["gemma2"]
    x, w, b, y = _problem(N, D, C, torch.bfloat16, seed=3)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, y)
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    ref = F.cross_entropy(F.linear(x.float(), w.float()), y)
    assert rel_err(loss, ref) < 1e-4
    assert extra < 16, f"forward-only used {extra:.1f} MiB"


@pytest.mark.parametrize("D", [2304, 2300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forward_only_through_descriptors_and_pointers(D, dtype):
    """The no-grad forward at a real size: through TMA descriptors (16-bit, D = 2304) or
    pointers (fp32, or rows of 2300 elements, not 16-byte aligned), with bias, smoothing and
    softcap, against the fp32 loss of the same rounded inputs: within torch's own error there."""
    from fused_xent.kernels.linear_xent_forward import tma_loads

    N, C = 4096, 50000
    x, w, b, y = _problem(N, D, C, dtype, seed=D)
    assert tma_loads(x, w) is (dtype != torch.float32 and D % 8 == 0)
    opts = dict(label_smoothing=0.1, softcap=30.0, reduction="none")
    with torch.no_grad():
        got = linear_cross_entropy(x, w, y, linear_bias=b, **opts)
        ref = _softcapped_loss(x.float(), w.float(), b.float(), y, opts)
        own = _softcapped_loss(x, w, b, y, opts)
    assert rel_err(got, ref) <= max(2 * rel_err(own, ref), 1e-5)


def _softcapped_loss(x, w, b, y, opts):
    z = F.linear(x, w, b).float()
    z = opts["softcap"] * torch.tanh(z / opts["softcap"])
    return F.cross_entropy(z, y, label_smoothing=opts["label_smoothing"], reduction="none", ignore_index=-100)


def test_out_of_range_target_raises_on_a_later_call():
    """CUDA calls check the labels without a host sync: the bad row's loss is NaN at once,
    and the next call after the check has landed raises, naming the argument and value."""
    x, w, b, y = _problem(64, 32, 100, torch.float32, seed=1)
    y[5] = 100
    rows = linear_cross_entropy(x, w, y, reduction="none")
    torch.cuda.synchronize()
    assert torch.isnan(rows[5]) and torch.isfinite(rows[y != 100]).all()
    with pytest.raises(ValueError, match="target contains 100"):
        linear_cross_entropy(x, w, y.clamp(0, 99))
    linear_cross_entropy(x, w, y.clamp(0, 99))  # reported once


def test_row_targets_kernel_matches_its_definition_on_gpu():
    """``kernels.targets.row_targets`` (the CUDA path's one launch) against
    ``build_row_targets`` at an LM batch: ignored rows, class weights, mixup with one bad
    ``lam``, labels out of range."""
    from fused_xent.formulation import XentOptions, build_row_targets
    from fused_xent.kernels.targets import row_targets

    N, C = 32768 + 3, 128256
    g = torch.Generator(device="cuda").manual_seed(7)
    y = torch.randint(0, C, (N,), device="cuda", generator=g)
    y2 = torch.randint(0, C, (N,), device="cuda", generator=g)
    y[::97] = -100
    y[5], y2[9] = C, -2
    lam = torch.rand(N, device="cuda", generator=g)
    cw = torch.rand(C, device="cuda", generator=g) + 0.5
    opts = XentOptions(num_classes=C, label_smoothing=0.1, z_loss=1e-4)
    for kw in (dict(target2=None, lam=None, class_weight=None), dict(target2=y2, lam=lam, class_weight=cw)):
        rt, summary = row_targets(y, ignore_index=-100, opts=opts, **kw)
        ref = build_row_targets(y, ignore_index=-100, opts=opts, **kw)
        for name in ("y1", "k1", "y2", "k2", "e", "lse_coef", "zl", "row_weight"):
            if getattr(ref, name) is not None:
                torch.testing.assert_close(getattr(rt, name), getattr(ref, name), rtol=1e-6, atol=0, equal_nan=True)
        assert summary[:2].tolist() == [0, C]
        if kw["target2"] is not None:
            assert summary[2:4].tolist() == [-2, torch.where(y != -100, y2, 0).max().item()]


def test_filtered_bounded_at_gemma2_size():
    """impl="filtered" without a bias gradient skips classes from the forward's bound: at the
    Gemma 2 head on random logits it drops most classes, each of them below the threshold on
    every row (p from fp32 logits; 5 % for bf16's rounding of the logits), the loss stays
    exact, and its gradients are no further from fp32 than the recomputing filter's (the
    one taken with a bias gradient), which drops classes by the exact per-row rule."""
    N, D, C = SIZES["gemma2"]
    x, w, _, y = _problem(N, D, C, torch.bfloat16, seed=11)
    eps = torch.finfo(torch.bfloat16).eps / 32
    zero_b = torch.zeros(C, device="cuda", dtype=torch.bfloat16)

    def run(impl, bias_grad):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
        b = zero_b.clone().requires_grad_(bias_grad)
        loss = linear_cross_entropy(*leaves, y, linear_bias=b, impl=impl)
        loss.backward()
        return loss.detach().float(), leaves[0].grad.float(), leaves[1].grad.float()

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        leaves = [t.detach().float().requires_grad_() for t in (x, w)]
        F.cross_entropy(F.linear(*leaves), y).backward()
        ref = [None] + [t.grad for t in leaves]
        del leaves
        p_max = torch.zeros(C, device="cuda")
        for r0 in range(0, N, 1024):  # max over kept rows of p = softmax(fp32 logits), by row blocks
            z = x[r0 : r0 + 1024].float() @ w.float().T
            p = torch.softmax(z, dim=1)[y[r0 : r0 + 1024] != -100]
            p_max = torch.maximum(p_max, p.amax(0))
            del z, p
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    bounded = run("filtered", False)
    recomputed = run("filtered", True)
    lean = run("lean", False)
    dropped = (bounded[2] == 0).all(dim=1)
    assert dropped.float().mean() > 0.5, dropped.float().mean()
    labels = torch.zeros(C, device="cuda", dtype=torch.bool)
    labels[y[y != -100]] = True
    assert not (dropped & labels).any()
    assert (p_max[dropped] < 1.05 * eps).all(), p_max[dropped].max()
    assert rel_err(bounded[0], lean[0]) < 1e-6
    for got, alt, r in zip(bounded[1:], recomputed[1:], ref[1:], strict=True):
        assert rel_err(got, r) <= 1.01 * rel_err(alt, r), (rel_err(got, r), rel_err(alt, r))


@pytest.mark.parametrize("impl", ["lean", "filtered"])
def test_memory_budget_bounds_lean_at_1m_classes(impl):
    """SPEC's lean memory at the 1M-class head (1100 MiB with the gradients): a budget of what
    that leaves beside the gradients gives "lean" / "filtered" a chunk that keeps the peak
    within it, and the same loss and gradients as the default 64 MiB chunk (lean: up to the
    order of the fp32 dX sums)."""
    N, D, C = 4096, 512, 1_000_000
    x, w, _, y = _problem(N, D, C, torch.bfloat16, seed=5)
    budget = 1100 * 2**20 - (N + C) * D * 2

    def run(memory_budget):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        loss = linear_cross_entropy(*leaves, y, impl=impl, memory_budget=memory_budget)
        loss.backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return peak, [loss.detach().float()] + [t.grad.float() for t in leaves]

    run(budget)  # warm-up: compilation, cuBLAS workspaces
    peak, got = run(budget)
    _, want = run(None)
    assert peak <= 1100 * 2**20, peak / 2**20
    assert rel_err(got[0], want[0]) < 1e-6
    # filtered drops classes from bounds that depend on the chunks: its gradients differ by
    # about its own error against fp32 (4e-2 on dX at this head)
    tol = 2e-3 if impl == "lean" else 1e-1
    for a, b in zip(got[1:], want[1:], strict=True):
        assert rel_err(a, b) < tol, rel_err(a, b)


def test_scale_skips_its_pass_when_the_upstream_gradient_is_one():
    """``kernels.scaling.scale_`` on a Gemma 2-sized dW (1.2 GB bf16): the fp32 product rounded
    once for g = 0.37, untouched for g = 1, and at g = 1 at most a fifth of the time of the pass (the
    programs return before reading anything; the pass reads and writes 2.4 GB)."""
    from triton.testing import do_bench

    from fused_xent.kernels.scaling import scale_

    t = torch.randn(256000, 2304, device="cuda", dtype=torch.bfloat16)
    want = (t.float() * 0.37).to(t.dtype)
    got = scale_(t.clone(), torch.tensor([0.37], device="cuda"))
    assert torch.equal(got, want)
    one, other = torch.ones(1, device="cuda"), torch.full((1,), 0.999, device="cuda")
    before = t.clone()
    scale_(t, one)
    assert torch.equal(t, before)
    del got, want, before
    skipped = do_bench(lambda: scale_(t, one), warmup=5, rep=50, return_mode="median")
    scaled = do_bench(lambda: scale_(t, other), warmup=5, rep=50, return_mode="median")
    assert skipped < 0.2 * scaled, (skipped, scaled)


@pytest.mark.parametrize("features", [dict(), dict(label_smoothing=0.1, softcap=20.0, scale=1.5)])
def test_one_pass_recompute_gives_the_two_pass_gradients(features, monkeypatch):
    """Lean's backward at K = 512 in bf16 takes ``chunk_grad_tma_kernel`` (products and dU in one
    pass): dX and dW are those of the cuBLAS GEMM + ``chunk_grad_kernel`` path bit for bit (its
    products rounded to bf16 as cuBLAS's, the same epilogue, the same GEMMs after), over several
    chunks of a 100003-class head (a tail of 3 classes)."""
    from fused_xent.kernels import class_chunked

    N, D, C = 8192, 512, 100_003
    x, w, _, y = _problem(N, D, C, torch.bfloat16, seed=11)
    calls = []
    fused = class_chunked._fused_du
    monkeypatch.setattr(class_chunked, "_fused_du", lambda *a: (calls.append(1), fused(*a))[1])

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
        linear_cross_entropy(*leaves, y, impl="lean", memory_budget=256 * 2**20, **features).backward()
        return [t.grad for t in leaves]

    one = grads()
    n_calls = len(calls)
    assert n_calls > 2
    monkeypatch.setattr(class_chunked, "FUSED_DU_MAX_D", 0)
    two = grads()
    assert len(calls) == n_calls  # the second call took the two passes
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)
