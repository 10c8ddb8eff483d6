"""Tensors on a GPU other than the current one (a model moved to ``cuda:1`` without
``torch.cuda.set_device``). Triton launches on the current device, torch's operators on their
tensors' own: without ``on_input_device`` the kernels ran on the wrong GPU, unordered with the
GEMMs beside them. Needs two GPUs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch_reference import rel_err

from fused_xent import linear_cross_entropy
from fused_xent.integrations.margins import margin_cross_entropy, margin_logits
from fused_xent.integrations.open_clip import clip_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"),
]

OTHER = "cuda:1"


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(loss, leaves):
    loss.backward()
    return [loss.detach().double()] + [t.grad.double() for t in leaves]


@pytest.mark.parametrize("impl", ["auto", "lean", "fast", "filtered", "triton"])
def test_core_on_another_gpu(impl):
    assert torch.cuda.current_device() == 0
    g = torch.Generator(device=OTHER).manual_seed(0)
    N, D, C = 1024, 256, 5003
    x = torch.randn(N, D, device=OTHER, generator=g).bfloat16()
    w = (torch.randn(C, D, device=OTHER, generator=g) / math.sqrt(D)).bfloat16()
    b = (0.1 * torch.randn(C, device=OTHER, generator=g)).bfloat16()
    y = torch.randint(0, C, (N,), device=OTHER, generator=g)
    before = torch.cuda.memory_allocated(0)
    leaves = _leaves(x, w, b)
    got = _grads(linear_cross_entropy(leaves[0], leaves[1], y, linear_bias=leaves[2], impl=impl), leaves)
    assert torch.cuda.memory_allocated(0) == before  # nothing of the call landed on cuda:0
    ref_leaves = _leaves(x.float(), w.float(), b.float())
    ref = _grads(F.cross_entropy(F.linear(*ref_leaves), y), ref_leaves)
    assert all(t.device == torch.device(OTHER) for t in got)
    # bf16 operands against an fp32 reference; the wrong-device failure is a wrong number or a crash
    for a, r in zip(got, ref, strict=True):
        assert rel_err(a, r) < 2e-2


def test_clip_and_margins_on_another_gpu():
    g = torch.Generator(device=OTHER).manual_seed(1)
    B, D = 2048, 128
    img = F.normalize(torch.randn(B, D, device=OTHER, generator=g), dim=-1)
    txt = F.normalize(torch.randn(B, D, device=OTHER, generator=g), dim=-1)
    scale = torch.tensor(20.0, device=OTHER)
    leaves = _leaves(img, txt, scale)
    got = _grads(clip_loss(*leaves, impl="lean"), leaves)
    ref_leaves = _leaves(img, txt, scale)
    z = ref_leaves[2] * ref_leaves[0] @ ref_leaves[1].T
    labels = torch.arange(B, device=OTHER)
    ref = _grads((F.cross_entropy(z, labels) + F.cross_entropy(z.T, labels)) / 2, ref_leaves)
    for a, r in zip(got, ref, strict=True):
        assert rel_err(a, r) < 1e-4

    C = 3001
    x = torch.randn(B, D, device=OTHER, generator=g)
    w = torch.randn(C, D, device=OTHER, generator=g)
    y = torch.randint(0, C, (B,), device=OTHER, generator=g)
    opts = dict(s=30.0, m2=0.3)
    leaves = _leaves(x, w)
    got = _grads(margin_cross_entropy(*leaves, y, impl="lean", **opts), leaves)
    ref_leaves = _leaves(x, w)
    ref = _grads(F.cross_entropy(margin_logits(*ref_leaves, y, **opts), y), ref_leaves)
    for a, r in zip(got, ref, strict=True):
        assert rel_err(a, r) < 1e-4


def test_a_bad_label_on_another_gpu_is_reported():
    x = torch.randn(64, 32, device=OTHER)
    w = torch.randn(100, 32, device=OTHER)
    y = torch.randint(0, 100, (64,), device=OTHER)
    y[3] = 100
    with pytest.raises(ValueError, match="target contains 100"):
        linear_cross_entropy(x, w, y, impl="lean")
        torch.cuda.synchronize(OTHER)
        linear_cross_entropy(x, w, y.clamp(max=99), impl="lean")
