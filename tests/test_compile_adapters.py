"""torch.compile(model, fullgraph=True) over a small model whose loss is one of the adapters'
(timm, margins, open_clip, transformers): no graph break, and the loss and every gradient
equal eager's.

The tests run in float64 on the chunked torch backends (Triton on CPU has no float64), plus
float32 runs through the Triton kernels under the interpreter. ``aot_eager`` runs the same
aten ops as eager, only traced and decomposed, and the custom ops call the same backends,
so compiled and eager agree to float64 rounding (``TOL_64``), or to a few float32 ulps of
the surrounding elementwise code (``TOL_32``, as in test_compile.py).
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from fused_xent.integrations.margins import MarginHead, margin_cross_entropy
from fused_xent.integrations.open_clip import FusedClipLoss, FusedSigLipLoss
from fused_xent.integrations.timm import FusedHeadLoss, MixedTarget

#: The Triton runs take CPU tensors: they need the interpreter (a CUDA machine without it skips them).
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU needs TRITON_INTERPRET=1"
)

TOL_64 = dict(rtol=1e-12, atol=1e-14)  # reassociation in float64: ~1e-16 relative per op
TOL_32 = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


def _loss_and_grads(model: nn.Module, step) -> list[torch.Tensor]:
    """``step(model)``'s loss, then the gradient of every parameter (in order)."""
    model.zero_grad(set_to_none=True)
    loss = step(model)
    loss.backward()
    return [loss.detach()] + [p.grad.clone() for p in model.parameters()]


def _assert_compiled_matches_eager(model: nn.Module, step, tol) -> list[torch.Tensor]:
    """Run ``step`` eagerly, then compiled with fullgraph=True; compare; return eager's."""
    eager = _loss_and_grads(model, step)
    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled = _loss_and_grads(model, compiled_step)
    assert len(compiled) == len(eager) and all(g is not None for g in compiled)
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, **tol)
    assert torch.isfinite(eager[0])
    return eager


def _trunk(d_in: int, d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, d), nn.GELU(), nn.LayerNorm(d))


# ---------------------------------------------------------------- timm


class _TimmLike(nn.Module):
    """A trunk, a timm-style classifier and :class:`FusedHeadLoss` on its pre-logits."""

    def __init__(self, label_smoothing: float, impl: str, D: int = 12, C: int = 29):
        super().__init__()
        self.trunk = _trunk(10, D)
        self.head = nn.Linear(D, C)
        self.loss = FusedHeadLoss(self.head, label_smoothing, impl=impl)

    def forward(self, inputs, target):
        return self.loss(self.trunk(inputs), target)


def _timm_target(kind: str, N: int, C: int):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, C, (N,), generator=g)
    if kind == "indices":
        y[3] = -100
        return y
    if kind == "mixup_float_lam":  # SparseMixup's mode="batch"
        return MixedTarget(y, y.flip(0), 0.3, 0.1)
    if kind == "mixup_row_lam":  # mode="elem" / "pair"
        return MixedTarget(y, y.flip(0), torch.rand(N, generator=g, dtype=torch.float64), 0.1)
    return torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1)  # dense, SoftTargetCE


@pytest.mark.parametrize("kind", ["indices", "mixup_float_lam", "mixup_row_lam", "dense"])
def test_timm_head_loss_fullgraph(kind):
    torch.manual_seed(0)
    model = _TimmLike(label_smoothing=0.1, impl="chunked").double()
    inputs = torch.randn(16, 10, dtype=torch.float64)
    target = _timm_target(kind, 16, 29)
    _assert_compiled_matches_eager(model, lambda m: m(inputs, target), TOL_64)


@needs_interpreter
@pytest.mark.parametrize("impl", ["triton", "lean"])
def test_timm_head_loss_triton_fullgraph(impl):
    torch.manual_seed(0)
    model = _TimmLike(label_smoothing=0.1, impl=impl)
    inputs = torch.randn(16, 10)
    target = _timm_target("mixup_row_lam", 16, 29)
    target = target._replace(lam=target.lam.float())
    _assert_compiled_matches_eager(model, lambda m: m(inputs, target), TOL_32)


# ---------------------------------------------------------------- margins


class _MarginModel(nn.Module):
    def __init__(self, m2: float, m3: float, impl: str = "chunked"):
        super().__init__()
        self.trunk = _trunk(10, 12)
        self.head = MarginHead(12, 31, s=16.0, m2=m2, m3=m3, impl=impl)

    def forward(self, inputs, target):
        return self.head(self.trunk(inputs), target)


def _margin_target(N: int = 16, C: int = 31) -> torch.Tensor:
    y = torch.randint(0, C, (N,), generator=torch.Generator().manual_seed(2))
    y[5] = y[2]  # a class twice in the batch
    y[7] = -100
    return y


@pytest.mark.parametrize("m2, m3", [(0.5, 0.0), (0.0, 0.35)], ids=["arcface", "cosface"])
def test_margin_head_fullgraph(m2, m3):
    torch.manual_seed(0)
    model = _MarginModel(m2, m3).double()
    inputs = torch.randn(16, 10, dtype=torch.float64)
    target = _margin_target()
    _assert_compiled_matches_eager(model, lambda m: m(inputs, target), TOL_64)


@needs_interpreter
def test_margin_head_triton_fullgraph():
    torch.manual_seed(0)
    model = _MarginModel(0.5, 0.0, impl="triton")
    inputs, target = torch.randn(16, 10), _margin_target()
    _assert_compiled_matches_eager(model, lambda m: m(inputs, target), TOL_32)


def test_margin_out_of_range_target_gives_nan_row_when_compiled():
    """The range check needs a host sync and is skipped while compiling: that row's loss is
    NaN, the others equal eager's with the row ignored; eager still raises."""
    torch.manual_seed(0)
    w = torch.randn(31, 12, dtype=torch.float64)
    x = torch.randn(16, 12, dtype=torch.float64)

    def per_row(xx, yy):
        return margin_cross_entropy(xx, w, yy, s=16.0, reduction="none")

    bad, ignored = _margin_target(), _margin_target()
    bad[4], ignored[4] = 31, -100
    got = torch.compile(per_row, fullgraph=True, backend="aot_eager")(x, bad)
    assert torch.isnan(got[4])
    others = torch.arange(16) != 4
    torch.testing.assert_close(got[others], per_row(x, ignored)[others], **TOL_64)
    with pytest.raises(ValueError, match="outside"):
        per_row(x, bad)


# ---------------------------------------------------------------- open_clip


class _TwoTowers(nn.Module):
    """Image and text towers with open_clip's learnable ``logit_scale`` (and ``logit_bias``)."""

    def __init__(self, loss: nn.Module, bias: bool, init_scale: float = 2.0):
        super().__init__()
        self.image = _trunk(10, 12)
        self.text = _trunk(7, 12)
        self.logit_scale = nn.Parameter(torch.tensor(init_scale))
        self.logit_bias = nn.Parameter(torch.tensor(-1.0)) if bias else None
        self.loss = loss

    def forward(self, images, texts):
        i = nn.functional.normalize(self.image(images), dim=-1)
        t = nn.functional.normalize(self.text(texts), dim=-1)
        return self.loss(i, t, self.logit_scale.exp(), self.logit_bias)


def _towers_batch(dtype, B: int = 12):
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, 10, generator=g, dtype=dtype), torch.randn(B, 7, generator=g, dtype=dtype)


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_clip_loss_fullgraph(bias):
    torch.manual_seed(0)
    model = _TwoTowers(FusedClipLoss(impl="chunked"), bias).double()
    images, texts = _towers_batch(torch.float64)
    _assert_compiled_matches_eager(model, lambda m: m(images, texts), TOL_64)


@needs_interpreter
def test_clip_loss_triton_fullgraph():
    torch.manual_seed(0)
    model = _TwoTowers(FusedClipLoss(impl="triton"), bias=False)
    images, texts = _towers_batch(torch.float32)
    _assert_compiled_matches_eager(model, lambda m: m(images, texts), TOL_32)


def test_siglip_loss_fullgraph():
    torch.manual_seed(0)
    model = _TwoTowers(FusedSigLipLoss(), bias=True).double()
    images, texts = _towers_batch(torch.float64)
    _assert_compiled_matches_eager(model, lambda m: m(images, texts), TOL_64)


def test_clip_custom_ops_pass_opcheck():
    """Schema, fake implementation and autograd registration of the CLIP ops."""
    g = torch.Generator().manual_seed(4)
    x, y = (torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    s = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.fused_xent.clip_lse_forward.default, (x, y, s, "chunked"))
    lse_row, lse_col, _ = torch.ops.fused_xent.clip_lse_forward(x.detach(), y.detach(), s.detach(), "chunked")
    grads = [torch.rand(6, generator=g, dtype=torch.float64) for _ in range(3)]
    args = (x.detach(), y.detach(), s.detach(), lse_row, lse_col, *grads, "chunked")
    torch.library.opcheck(torch.ops.fused_xent.clip_lse_backward.default, args)


# ---------------------------------------------------------------- transformers


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, -3:] = 0
    labels[1, -3:] = -100
    return model, ids, labels, mask


def test_causal_lm_loss_fullgraph():
    """The whole Llama forward and the fused loss in one graph. The first call for a model
    runs eagerly (it registers the capture hook and checks the head with a host sync)."""
    from fused_xent.integrations.transformers import causal_lm_loss

    model, ids, labels, mask = _tiny_llama()
    eager = _assert_compiled_matches_eager(model, lambda m: causal_lm_loss(m, ids, labels, mask), TOL_64)
    own = _loss_and_grads(model, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss)
    for f, o in zip(eager, own, strict=True):  # the model's own loss rounds its logits to float32
        torch.testing.assert_close(f, o.to(f.dtype), rtol=2e-6, atol=1e-7)


def test_patched_model_fullgraph():
    from fused_xent.integrations.transformers import patch_model

    model, ids, labels, mask = _tiny_llama()
    patch_model(model)
    _assert_compiled_matches_eager(
        model, lambda m: m(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=20).loss, TOL_64
    )


def test_causal_lm_loss_first_call_compiled_says_to_run_eagerly():
    from fused_xent.integrations.transformers import causal_lm_loss

    model, ids, labels, mask = _tiny_llama()
    compiled = torch.compile(lambda: causal_lm_loss(model, ids, labels, mask), fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="must run eagerly"):
        compiled()
