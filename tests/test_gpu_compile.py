"""torch.compile with inductor (default and ``mode="reduce-overhead"``: CUDA graphs) over
fused_xent on the GPU (``pytest -m gpu``). The CPU tests compile with ``aot_eager``, which
runs the real ops; inductor allocates and reads each op's outputs as its fake
implementation declares them, and replays recorded graphs on the inputs' new values.

Each compiled call must give what the eager call gives (the same kernels; the surrounding
fp32 code may round differently) on two sets of inputs written into the same tensors, the
second after the graphs were recorded, and (the exact impls) stay within twice torch's own
bf16 error of an fp32 reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch_reference import rel_err

from fused_xent import linear_cross_entropy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

N, D, C = 1024, 256, 8003  # odd class count: a tail chunk; 4 MiB budgets give lean several chunks
OPTS = dict(label_smoothing=0.1, ignore_index=-100)


def _fill(x, w, b, y, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        x.copy_(torch.randn(N, D, device="cuda", generator=g))
        w.copy_(torch.randn(C, D, device="cuda", generator=g) / math.sqrt(D))
        b.copy_(0.1 * torch.randn(C, device="cuda", generator=g))
        y.copy_(torch.randint(0, C, (N,), device="cuda", generator=g))
        y[::37] = -100


def _step(fn, leaves, y):
    for t in leaves:
        t.grad = None
    loss = fn(*leaves, y)
    loss.backward()
    return [loss.detach().float().clone()] + [t.grad.float().clone() for t in leaves]


def _reference(leaves, y, dtype):
    copies = [t.detach().to(dtype).requires_grad_() for t in leaves]
    return _step(lambda xx, ww, bb, yy: F.cross_entropy(F.linear(xx, ww, bb).float(), yy, **OPTS), copies, y)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("impl", ["auto", "lean", "lean@4MiB", "fast@4MiB", "filtered", "triton"])
def test_inductor_matches_eager(impl, mode):
    impl, _, budget = impl.partition("@")
    budget = int(budget[:-3]) * 2**20 if budget else None

    def fused(xx, ww, bb, yy):
        return linear_cross_entropy(xx, ww, yy, linear_bias=bb, impl=impl, memory_budget=budget, **OPTS)

    def lean(xx, ww, bb, yy):
        return linear_cross_entropy(xx, ww, yy, linear_bias=bb, impl="lean", **OPTS)

    torch._dynamo.reset()
    compiled = torch.compile(fused, mode=None if mode == "default" else mode, dynamic=False)
    shapes = ((N, D), (C, D), (C,))
    leaves = [torch.empty(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for shape in shapes]
    y = torch.empty(N, device="cuda", dtype=torch.long)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for seed in (1, 2):  # the second set after the graphs were recorded on the first
            _fill(*leaves, y, seed)
            for _ in range(3):  # warm-up, recording, replay
                got = _step(compiled, leaves, y)
            # a captured graph cannot send filtered's kept-class counts to the host: it replays
            # the exact backward
            exact = impl == "filtered" and mode == "reduce-overhead"
            want = _step(lean if exact else fused, leaves, y)
            ref = _reference(leaves, y, torch.float32)
            own = _reference(leaves, y, torch.bfloat16)
            for name, g_, w_, r_, o_ in zip(("loss", "dx", "dw", "db"), got, want, ref, own, strict=True):
                assert torch.isfinite(g_).all(), name
                assert rel_err(g_, w_) < 1e-3, (name, seed, rel_err(g_, w_))
                if impl != "filtered":  # opt-in, not exact: compared with its eager call only
                    assert rel_err(g_, r_) <= max(2 * rel_err(o_, r_), 1e-4), (name, seed, rel_err(g_, r_))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _adapter_losses():
    from fused_xent.integrations.margins import margin_cross_entropy
    from fused_xent.integrations.open_clip import FusedClipLoss, FusedSigLipLoss

    clip, siglip = FusedClipLoss(), FusedSigLipLoss()
    return {
        "clip": lambda a, t, s, bias: clip(a, t, s),
        "clip_bias": lambda a, t, s, bias: clip(a, t, s, bias),
        "siglip": lambda a, t, s, bias: siglip(a, t, s, bias),
        "arcface": lambda a, t, s, bias: margin_cross_entropy(a, t, torch.arange(a.shape[0], device="cuda") % 1000),
    }


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("name", ["clip", "clip_bias", "siglip", "arcface"])
def test_inductor_adapters_match_eager(name, mode):
    """The open_clip losses (B = 2048, D = 256) and a margin head (2048 x 256 x 1000) compiled,
    on two sets of inputs written into the same tensors: within twice the eager bf16 call's
    error against the eager call on fp32 copies (compiled, the margin head takes the copying
    path where eager CUDA takes the in-kernel norms: not the same roundings)."""
    fn = _adapter_losses()[name]
    torch._dynamo.reset()
    compiled = torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)
    B, width = 2048, 256
    rows = 1000 if name == "arcface" else B
    leaves = [
        torch.empty(B, width, device="cuda", dtype=torch.bfloat16, requires_grad=True),
        torch.empty(rows, width, device="cuda", dtype=torch.bfloat16, requires_grad=True),
        torch.empty((), device="cuda", requires_grad=True),
        torch.empty((), device="cuda", requires_grad=True),
    ]

    def step(f, inputs):
        for t in inputs:
            t.grad = None
        loss = f(*inputs)
        loss.backward()
        return [loss.detach().float().clone()] + [t.grad.float().clone() for t in inputs if t.grad is not None]

    for seed in (1, 2):
        g = torch.Generator(device="cuda").manual_seed(seed)
        with torch.no_grad():
            leaves[0].copy_(F.normalize(torch.randn(B, width, device="cuda", generator=g), dim=-1))
            leaves[1].copy_(F.normalize(torch.randn(rows, width, device="cuda", generator=g), dim=-1))
            leaves[2].fill_(math.log(10.0) + seed)
            leaves[3].fill_(-5.0 - seed)
        for _ in range(3):  # warm-up, recording, replay
            got = step(compiled, leaves)
        want = step(fn, leaves)
        ref = step(fn, [t.detach().float().requires_grad_() for t in leaves])
        assert len(got) == len(want) == len(ref)
        for i, (g_, w_, r_) in enumerate(zip(got, want, ref, strict=True)):
            assert torch.isfinite(g_).all(), (name, i)
            assert rel_err(g_, r_) <= max(2 * rel_err(w_, r_), 1e-4), (name, seed, i, rel_err(g_, r_), rel_err(w_, r_))
