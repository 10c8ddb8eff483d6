"""torch.compile(fullgraph=True) over fused_xent: no graph break, the same values and
gradients as eager. The backends run inside the custom ops ``fused_xent::linear_xent_forward``
and ``fused_xent::linear_xent_backward``; on CPU the compiled graph calls the same kernels
as eager, so compiled and eager agree to the last bits or to fp32 rounding of the
surrounding elementwise code (inductor fuses it differently)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch_reference import torch_linear_xent

import fused_xent
from fused_xent import LinearCrossEntropyLoss, linear_cross_entropy


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own closures; one code object per test stays far below the recompile limit."""
    torch._dynamo.reset()
    yield


# fp32 elementwise code around the ops may be reassociated by the compiler: a few ulps
TOL = dict(rtol=1e-5, atol=1e-6)


def _problem(N, D, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    w = torch.randn(C, D, generator=g) / D**0.5
    b = 0.5 * torch.randn(C, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    y[::5] = -100
    return x, w, b, y


def _value_and_grads(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    loss, lse = out if isinstance(out, tuple) else (out, None)
    total = (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum()
    if lse is not None:
        total = total + (lse * torch.linspace(-1.0, 1.0, lse.numel()).reshape(lse.shape)).sum()
    return [loss, lse, *torch.autograd.grad(total, leaves)]


def _assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, **TOL)


OPTION_SETS = {
    "plain": dict(),
    "smoothing_zloss_none": dict(label_smoothing=0.1, z_loss=1e-3, reduction="none"),
    "softcap_lse_sum": dict(softcap=3.0, reduction="sum", return_lse=True),
    "class_weight": dict(weight_seed=1, label_smoothing=0.05),
}


@pytest.mark.parametrize("impl", ["chunked", "triton", "reference"])
@pytest.mark.parametrize("name", sorted(OPTION_SETS))
def test_function_fullgraph_matches_eager(impl, name):
    opts = dict(OPTION_SETS[name])
    x, w, b, y = _problem(13, 11, 37)
    if opts.pop("weight_seed", None) is not None:
        opts["weight"] = torch.rand(37, generator=torch.Generator().manual_seed(1)) + 0.5
    s = torch.tensor([1.3])

    def fn(xx, ww, bb, ss):
        return linear_cross_entropy(xx, ww, y, linear_bias=bb, scale=ss, impl=impl, **opts)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(_value_and_grads(compiled, x, w, b, s), _value_and_grads(fn, x, w, b, s))


@pytest.mark.parametrize("bias_grad", [False, True])
def test_filtered_fullgraph_matches_eager(bias_grad, monkeypatch):
    """impl="filtered" through the custom ops: its forward's per-class bound (the op's third
    output) reaches the backward; without a bias gradient the backward skips classes from
    it, with one it recomputes every chunk. bf16, large logits (scale 8) and chunks of 128
    classes, so that classes drop."""
    from fused_xent.kernels import class_chunked

    monkeypatch.setattr(class_chunked, "CHUNK_BYTES", 1)
    monkeypatch.setattr(class_chunked, "MIN_CHUNK_COLS", 128)
    x, w, b, y = (t.to(torch.bfloat16) if t.is_floating_point() else t for t in _problem(13, 11, 300))
    s = torch.tensor([8.0])

    def fn(xx, ww, ss, bb):
        return linear_cross_entropy(xx, ww, y, linear_bias=bb, scale=ss, impl="filtered")

    def value_and_grads(f):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, s)]
        bb = b.detach().clone().requires_grad_(bias_grad)
        loss = f(*leaves, bb)
        wrt = leaves + ([bb] if bias_grad else [])
        return [loss, *torch.autograd.grad(loss, wrt)]

    want = value_and_grads(fn)
    assert (want[2] == 0).all(dim=1).any(), "no class dropped: the test would not exercise the filter"
    _assert_same(value_and_grads(torch.compile(fn, fullgraph=True, backend="aot_eager")), want)


def test_mixup_and_probability_targets_compile():
    x, w, b, y = _problem(9, 7, 23, seed=2)
    y2 = torch.randint(0, 23, (9,), generator=torch.Generator().manual_seed(3))
    lam = torch.rand(9, generator=torch.Generator().manual_seed(4))
    probs = torch.softmax(torch.randn(9, 23, generator=torch.Generator().manual_seed(5)), -1)

    def fn(xx, ww, bb):
        mix = linear_cross_entropy(xx, ww, y, linear_bias=bb, target2=y2, lam=lam, impl="chunked")
        soft = linear_cross_entropy(xx, ww, probs, linear_bias=bb, label_smoothing=0.1, impl="chunked")
        return mix + soft

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    _assert_same(_value_and_grads(compiled, x, w, b), _value_and_grads(fn, x, w, b))


def test_dynamic_batch_size_compiles_once():
    w = torch.randn(19, 8, requires_grad=True)
    counter = CompileCounterWithBackend("aot_eager")
    fn = torch.compile(lambda xx, yy: linear_cross_entropy(xx, w, yy), fullgraph=True, backend=counter, dynamic=True)
    compiles = []
    for n in (5, 12, 33):
        x = torch.randn(n, 8, requires_grad=True)
        y = torch.randint(0, 19, (n,))
        got = fn(x, y)
        want = torch_linear_xent(x.detach().double(), w.detach().double(), y)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
        compiles.append(counter.frame_count)
    assert compiles[1:] == compiles[:1] * 2  # the first call compiles, later batch sizes reuse it


class _TinyClassifier(nn.Module):
    """A trunk and a classifier head whose loss is fused_xent, as a training step sees it."""

    def __init__(self, D=12, C=29):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, D), nn.GELU(), nn.LayerNorm(D))
        self.head = nn.Linear(D, C)
        self.loss = LinearCrossEntropyLoss(label_smoothing=0.1, z_loss=1e-4)

    def forward(self, inputs, target):
        h = self.trunk(inputs)
        return self.loss(h, self.head.weight, target, self.head.bias)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_model_with_module_loss_fullgraph(backend):
    torch.manual_seed(0)
    model = _TinyClassifier()
    inputs = torch.randn(16, 10)
    target = torch.randint(0, 29, (16,))
    target[3] = -100

    def step(m):
        m.zero_grad(set_to_none=True)
        loss = m(inputs, target)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True, backend=backend))
    _assert_same(compiled, eager)
    # and the eager value is torch's own loss on materialised logits
    h = model.trunk(inputs).double()
    want = torch_linear_xent(
        h, model.head.weight.double(), target, b=model.head.bias.double(), label_smoothing=0.1, z_loss=1e-4
    )
    torch.testing.assert_close(eager[0].double(), want, rtol=1e-6, atol=0)


def test_out_of_range_target_gives_nan_rows_when_compiled():
    """The range check needs a host sync and is skipped while compiling; the bad row's loss
    (and so the mean) is NaN, the other rows are untouched, and nothing is raised."""
    x, w, b, y = _problem(6, 5, 7, seed=6)
    y[1] = 7  # == C
    y[4] = -3
    fn = torch.compile(
        lambda xx, ww: linear_cross_entropy(xx, ww, y, reduction="none"), fullgraph=True, backend="aot_eager"
    )
    rows = fn(x, w)
    bad = torch.tensor([False, True, False, False, True, False])
    assert torch.isnan(rows[bad]).all()
    ok = ~bad & (y != -100)
    want = torch_linear_xent(x.double(), w.double(), y.clamp(0, 6), reduction="none")
    torch.testing.assert_close(rows[ok].double(), want[ok], rtol=1e-6, atol=0)
    mean = torch.compile(lambda xx, ww: linear_cross_entropy(xx, ww, y), fullgraph=True, backend="aot_eager")
    assert torch.isnan(mean(x, w))
    with pytest.raises(ValueError, match="target contains"):
        linear_cross_entropy(x, w, y)  # eager still raises


def test_lam_outside_unit_interval_gives_nan_when_compiled():
    x, w, b, _ = _problem(4, 5, 7, seed=7)
    y, y2 = torch.randint(0, 7, (2, 4))
    lam = torch.tensor([0.2, 1.5, 0.7, 0.0])
    fn = torch.compile(
        lambda xx: linear_cross_entropy(xx, w, y, target2=y2, lam=lam, reduction="none", ignore_index=None),
        fullgraph=True,
        backend="aot_eager",
    )
    rows = fn(x)
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2, 3]]).all()


@pytest.mark.parametrize("need", ["all", "weight_only"])
def test_custom_ops_pass_opcheck(need):
    """Schema, fake (meta) implementation and autograd registration of the three ops (the
    fast one through the interpreter's kernels)."""
    x, w, b, y = _problem(5, 6, 9, seed=8)
    s = torch.tensor([1.2])
    if need == "weight_only":
        w.requires_grad_()
    else:
        for t in (x, w, b, s):
            t.requires_grad_()
    rt = fused_xent.formulation.build_row_targets(
        y,
        target2=None,
        lam=None,
        class_weight=None,
        ignore_index=-100,
        opts=fused_xent.formulation.XentOptions(num_classes=9, label_smoothing=0.1),
    )
    targets = fused_xent.functional._targets_args(rt)
    fwd_args = (x, w, b, s, targets, 9, 0.1, 0.0, None, None, False, "chunked", True, 0)
    torch.library.opcheck(torch.ops.fused_xent.linear_xent_forward.default, fwd_args)
    filtered_args = (*fwd_args[:-5], 2**20, True, "filtered", True, 0)  # a third output: the per-class bound
    torch.library.opcheck(torch.ops.fused_xent.linear_xent_forward.default, filtered_args)
    lse = torch.logsumexp(x @ w.detach().T + b.detach(), -1).detach()
    aux = torch.empty(0)
    options = (9, 0.1, 0.0, None, None, False)  # classes, smoothing, z-loss, softcap, chunk bytes, unit scale
    bwd_args = (x.detach(), w.detach(), b.detach(), s.detach(), lse, torch.rand(5), aux, targets, *options)
    torch.library.opcheck(torch.ops.fused_xent.linear_xent_backward.default, (*bwd_args, "chunked", True, True, True))
    torch.library.opcheck(torch.ops.fused_xent.linear_xent_backward.default, (*bwd_args, "chunked", False, True, False))
    needs = [t.requires_grad for t in (x, w, b, s)]
    fast_args = (x, w, b, s, targets, *options, "mean", 5, *needs)
    torch.library.opcheck(torch.ops.fused_xent.linear_xent_fast.default, fast_args)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["auto", "lean", "fast", "filtered", "triton", "chunked"])
def test_gpu_model_fullgraph_inductor(impl):
    torch.manual_seed(0)
    model = _TinyClassifier(D=256, C=5003).cuda()
    model.loss.impl = impl
    inputs = torch.randn(512, 10, device="cuda")
    target = torch.randint(0, 5003, (512,), device="cuda")

    def step(m):
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(inputs, target)
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    assert compiled[0].dtype == torch.float32
    # bf16 operands: the compiled trunk may round differently (fusions), so compare at bf16 resolution
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=2e-2, atol=2e-2 * float(e.abs().max()))


@pytest.mark.parametrize("backend", ["class_chunked", "filtered", "triton", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_custom_ops_return_what_their_fake_implementations_declare(backend, dtype):
    """Compiled code (inductor) allocates and reads an op's outputs as its fake implementation
    declares them: a real output of another dtype is read as the wrong bytes. Under
    ``torch.compile(mode="reduce-overhead")`` on the H100 lean's bf16 dW, declared fp32,
    came back 2.3e3 off or faulted. ``opcheck`` runs each op on real and on fake tensors."""
    from fused_xent import functional
    from fused_xent.formulation import XentOptions, build_row_targets

    x, w, b, y = (t.to(dtype) if t.is_floating_point() else t for t in _problem(6, 5, 37))
    opts = XentOptions(num_classes=37, label_smoothing=0.1, unit_scale=False)
    rt = build_row_targets(y, target2=None, lam=None, class_weight=None, ignore_index=-100, opts=opts)
    targets, options = functional._targets_args(rt), functional._options_args(opts)
    scale = torch.tensor([1.25])
    checks = ("test_schema", "test_faketensor")
    forward_args = (x, w, b, scale, targets, *options, backend, True, 4096)  # lean's forward: wider chunks
    torch.library.opcheck(functional._forward_op, forward_args, test_utils=checks)
    lse, _, aux = functional._forward_op(*forward_args)
    cp = torch.linspace(0.5, 1.5, 6)
    backward_args = (x, w, b, scale, lse, cp, aux, targets, *options, backend, True, True, True)
    torch.library.opcheck(functional._backward_op, backward_args, test_utils=checks)
    if backend == "class_chunked":  # the fast strategy's op, in one and in two row chunks
        for rows in (6, 3):
            fast_args = (x, w, b, scale, targets, *options, "mean", rows, True, True, True, True)
            torch.library.opcheck(functional._fast_op, fast_args, test_utils=checks)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_open_clip_ops_return_what_their_fake_implementations_declare(dtype):
    """As above for the CLIP lse ops (the Triton backend under the interpreter) and the
    SigLIP block ops."""
    from fused_xent.integrations import open_clip as oc

    g = torch.Generator().manual_seed(0)
    x, y = (torch.nn.functional.normalize(torch.randn(24, 8, generator=g), dim=-1).to(dtype) for _ in range(2))
    scale, bias = torch.tensor([3.0]), torch.tensor([-2.0])
    checks = ("test_schema", "test_faketensor")
    for backend in ("lean", "chunked"):
        torch.library.opcheck(oc._clip_forward_op, (x, y, scale, backend), test_utils=checks)
        lse_row, lse_col, _ = oc._clip_forward_op(x, y, scale, backend)
        gs = [torch.full((24,), v) for v in (0.5, -0.25, 1.0)]
        args = (x, y, scale, lse_row, lse_col, *gs, backend)
        torch.library.opcheck(oc._clip_backward_op, args, test_utils=checks)
    torch.library.opcheck(oc._siglip_forward_op, (x, y, scale, bias, True), test_utils=checks)
    args = (x, y, scale, bias, True, torch.tensor(0.5))
    torch.library.opcheck(oc._siglip_backward_op, args, test_utils=checks)
