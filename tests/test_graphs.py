"""``LinearCrossEntropyLoss(cuda_graph=True)`` (``fused_xent.graphs``): replayed calls against
the ordinary module.

On the CPU the option is checked and leaves every call ordinary. On a GPU (marked ``gpu``):
values and every gradient against the ordinary call over several calls on fresh data, the
upstream gradient, a backward after a later call's replay, a second backward, a new weight
tensor (a new recording), hooks, the deferred label check, and the memory the graph keeps
against the budget."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch

from fused_xent import LinearCrossEntropyLoss, graphs

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_the_option_is_a_bool():
    with pytest.raises(TypeError, match="cuda_graph"):
        LinearCrossEntropyLoss(cuda_graph=1)
    assert "cuda_graph=True" in repr(LinearCrossEntropyLoss(cuda_graph=True))
    assert "cuda_graph" not in repr(LinearCrossEntropyLoss())


def test_cpu_calls_stay_ordinary_and_the_module_copies():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 6, generator=g, requires_grad=True)
    w = torch.randn(11, 6, generator=g, requires_grad=True)
    y = torch.randint(0, 11, (9,), generator=g)
    graphed, plain = (
        LinearCrossEntropyLoss(cuda_graph=True, label_smoothing=0.1),
        LinearCrossEntropyLoss(label_smoothing=0.1),
    )
    for module in (graphed, copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert module.cuda_graph
        torch.testing.assert_close(module(x, w, y), plain(x, w, y), rtol=0, atol=0)
        assert module.graph_bytes() == 0


def _inputs(N, D, C, seed, dtype=torch.bfloat16, bias=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, D, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(C, D, device="cuda", generator=g) / D**0.5).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(C, device="cuda", generator=g)).to(dtype).requires_grad_() if bias else None
    y = torch.randint(0, C, (N,), device="cuda", generator=g)
    return x, w, b, y


def _grads(module, x, w, y, b, upstream=1.0):
    leaves = [t for t in (x, w, b) if t is not None]
    for t in leaves:
        t.grad = None
    loss = module(x, w, y, b)
    (loss * upstream).backward()
    return [loss.detach(), *[t.grad for t in leaves]]


def _same(got, want, exact=True):
    """Bit for bit where both ran the same kernels on the same data; otherwise (the upstream
    gradient applied after the GEMMs instead of before, or atomics) within bf16's rounding."""
    for a, e in zip(got, want, strict=True):
        if exact:
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        else:
            assert ((a.float() - e.float()).norm() / e.float().norm()).item() < 4e-3


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("impl", ["lean", "auto", "fast", "triton"])
@pytest.mark.parametrize("options", [dict(label_smoothing=0.1), dict(reduction="sum", z_loss=1e-3, scale=0.7)])
def test_replays_equal_the_ordinary_call_on_fresh_data(impl, options):
    N, D, C = 300, 96, 2053
    _, w, b, _ = _inputs(N, D, C, 0)
    graphed = LinearCrossEntropyLoss(impl=impl, cuda_graph=True, **options)
    plain = LinearCrossEntropyLoss(impl=impl, **options)
    for step in range(4):  # the first records; fresh rows and labels in the weight's tensor each call
        x, w_new, _, y = _inputs(N, D, C, step + 1)
        y[::7] = -100
        with torch.no_grad():
            w.copy_(w_new)  # an optimizer's in-place step: the same tensor, new values
        upstream = 1.0 if step < 2 else 2.5
        want = _grads(plain, x, w, y, b, upstream)
        _same(_grads(graphed, x, w, y, b, upstream), want, exact=upstream == 1.0 and impl != "triton")
    assert graphed._graphs.recordings == 1
    assert graphed.graph_bytes() > 0


@pytest.mark.gpu
@cuda
def test_a_backward_after_a_later_replay_recomputes():
    N, D, C = 256, 64, 1000
    _, w, b, _ = _inputs(N, D, C, 0)
    graphed, plain = LinearCrossEntropyLoss(cuda_graph=True, impl="lean"), LinearCrossEntropyLoss(impl="lean")
    x1, _, _, y1 = _inputs(N, D, C, 1)
    x2, _, _, y2 = _inputs(N, D, C, 2)
    graphed(x1, w, y1, b)  # records
    for module in (plain, graphed):
        for t in (x1, x2, w, b):
            t.grad = None
        loss1, loss2 = module(x1, w, y1, b), module(x2, w, y2, b)  # the second replay overwrites the first's
        (loss1 + 3 * loss2).backward(retain_graph=True)
        first = [t.grad.clone() for t in (x1, x2, w, b)]
        loss1.backward()  # a second backward of the first call, after the replay of the second
        second = [t.grad.clone() for t in (x1, x2, w, b)]
        if module is plain:
            want = first, second
    # the second call's gradients come from its replay, times 3 (rounding apart); the first's are
    # recomputed, the ordinary call's (a stale replay would be the second call's: far off)
    _same(first, want[0], exact=False)
    _same(second, want[1], exact=False)


@pytest.mark.gpu
@cuda
def test_a_new_weight_tensor_records_anew_and_warns_when_it_keeps_changing():
    N, D, C = 128, 64, 500
    graphed, plain = LinearCrossEntropyLoss(cuda_graph=True), LinearCrossEntropyLoss()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(graphs.WARN_AFTER):
            x, w, b, y = _inputs(N, D, C, seed)
            _same(_grads(graphed, x, w, y, b), _grads(plain, x, w, y, b))
    assert graphed._graphs.recordings == graphs.WARN_AFTER
    assert sum("recorded" in str(c.message) for c in caught) == 1
    assert len(graphed._graphs._recorded) == 1  # one per device: the old graph is dropped


@pytest.mark.gpu
@cuda
def test_hooks_fire_once_per_backward_and_frozen_tensors_get_nothing():
    N, D, C = 128, 64, 500
    x, w, b, y = _inputs(N, D, C, 0)
    x.requires_grad_(False)  # frozen features: a linear probe
    seen = []
    w.register_hook(lambda g: seen.append(g.shape))
    graphed, plain = LinearCrossEntropyLoss(cuda_graph=True), LinearCrossEntropyLoss()
    for _ in range(3):
        got = _grads(graphed, x, w, y, b)
    assert x.grad is None
    assert len(seen) == 3  # not during the warm-up or the recording
    _same(got, _grads(plain, x, w, y, b))


@pytest.mark.gpu
@cuda
def test_a_label_out_of_range_raises_at_a_later_call():
    N, D, C = 128, 64, 500
    x, w, b, y = _inputs(N, D, C, 0)
    graphed = LinearCrossEntropyLoss(cuda_graph=True)
    graphed(x, w, y, b)
    bad = y.clone()
    bad[3] = C
    loss = graphed(x, w, bad, b)
    torch.cuda.synchronize()
    assert loss.isnan()
    with pytest.raises(ValueError, match=f"target contains {C}"):
        graphed(x, w, y, b)


@pytest.mark.gpu
@cuda
def test_calls_the_graph_does_not_take_stay_ordinary():
    N, D, C = 128, 64, 500
    x, w, b, y = _inputs(N, D, C, 0)
    graphed, plain = LinearCrossEntropyLoss(cuda_graph=True), LinearCrossEntropyLoss()
    with torch.no_grad():
        torch.testing.assert_close(graphed(x, w, y, b), plain(x, w, y, b), rtol=0, atol=0)
    xf = x.detach().float().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _same(_grads(graphed, xf, w, y, b), _grads(plain, xf, w, y, b))
    y2 = torch.randint(0, C, (N,), device="cuda")
    _same(
        [graphed(x, w, y, b, target2=y2, lam=0.3)],
        [plain(x, w, y, b, target2=y2, lam=0.3)],
    )
    assert graphed._graphs.recordings == 0


@pytest.mark.gpu
@cuda
def test_the_graph_and_the_call_stay_within_the_budget():
    """The ViT-21k head at SPEC's 128 MiB: what the graph keeps plus the call's own peak."""
    N, D, C = 4096, 768, 21841
    x, w, b, y = _inputs(N, D, C, 0)
    grads = x.nbytes + w.nbytes + b.nbytes
    budget = 128 * 2**20 - grads
    graphed = LinearCrossEntropyLoss(impl="lean", label_smoothing=0.1, memory_budget=budget, cuda_graph=True)
    plain = LinearCrossEntropyLoss(impl="lean", label_smoothing=0.1, memory_budget=budget)
    got = _grads(graphed, x, w, y, b)
    for t in (x, w, b):
        t.grad = None
    del got
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = _grads(graphed, x, w, y, b)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert graphed.graph_bytes() + peak <= budget + grads, (graphed.graph_bytes() / 2**20, peak / 2**20)
    want = _grads(plain, x, w, y, b)
    for a, e in zip(got, want, strict=True):  # other chunks than the plain call's: rounding apart
        assert ((a.float() - e.float()).norm() / e.float().norm()).item() < 2e-3
