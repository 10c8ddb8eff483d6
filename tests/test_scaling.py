"""``kernels.scaling.scale_`` (Triton, under the interpreter here) against the fp32 product
rounded once, and the fast strategy's backward through it with an upstream gradient of exactly 1."""

import pytest
import torch
from test_functional import make_problem
from torch_reference import rel_err, torch_linear_xent

from fused_xent import linear_cross_entropy
from fused_xent.kernels.scaling import _BLOCK, scale_, scale_all_

#: CUDA where there is one (no interpreter there), else the CPU under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
#: Two programs' strides and a ragged tail under the interpreter (2 programs there).
N = 5 * _BLOCK + 37


def _values(dtype: torch.dtype) -> torch.Tensor:
    t = torch.randn(N, generator=torch.Generator().manual_seed(0)) * 3
    t[:6] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, torch.finfo(dtype).tiny / 4])
    return t.to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", [2.5, 1.0, -0.3, 0.0, float("nan"), 1.0 + 2**-20])
def test_scale_matches_mul(dtype, g):
    t = _values(dtype)
    # the fp32 product, rounded once (CUDA's mul_ by a 0-dim fp32 tensor would round g to
    # the 16-bit dtype first: -0.3 differs)
    want = (t.float() * torch.tensor(g, device=DEVICE)).to(dtype)
    got = scale_(t, torch.tensor([g], device=DEVICE))
    assert got is t
    finite = [0, 1, 3, 4] if g == g else []  # infinities and signed zeros keep their signs
    assert torch.equal(torch.signbit(got[finite]), torch.signbit(want[finite]))
    if DEVICE == "cpu" and dtype == torch.bfloat16 and g != 1.0:
        # the interpreter rounds fp32 to bf16 half away from zero and mishandles subnormals
        torch.testing.assert_close(got[:5], want[:5], rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(got[6:], want[6:], rtol=2**-7, atol=0, equal_nan=True)
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("case", ["float64", "strided"])
def test_scale_falls_back_to_mul(case):
    base = torch.randn(64, 33, dtype=torch.float64 if case == "float64" else torch.float32, device=DEVICE)
    t = base if case == "float64" else base[:, ::2]
    want = t.clone() * 1.75
    scale_(t, torch.tensor(1.75, dtype=torch.float64, device=DEVICE))
    torch.testing.assert_close(t, want, rtol=0, atol=0)


@pytest.mark.parametrize("g", [2.0, 1.0])
def test_scale_all_takes_four_to_a_launch(g):
    """Six tensors of four dtypes and sizes (two launches of four slots, the second with two
    unused), the fp64 one through ``mul_``: each becomes exactly ``g`` times itself (a power
    of two: the product is exact in every dtype)."""
    gen = torch.Generator().manual_seed(1)
    shapes = ((torch.bfloat16, N), (torch.float32, 3), (torch.float16, 2 * _BLOCK), (torch.float32, N - 5),
              (torch.bfloat16, 1), (torch.float64, 70))  # fmt: skip
    ts = [(torch.randn(n, generator=gen) * 3).to(dt).to(DEVICE) for dt, n in shapes]
    want = [(t.double() * g).to(t.dtype) for t in ts]
    scale_all_(ts, torch.tensor([g], device=DEVICE))
    for got, w in zip(ts, want, strict=True):
        assert torch.equal(got, w)


def test_scale_names_a_bad_g():
    with pytest.raises(ValueError, match="g must hold one element"):
        scale_(torch.ones(4, device=DEVICE), torch.ones(2, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_backward_of_the_loss_itself(dtype):
    """``loss.backward()`` passes exactly 1: every gradient as torch's (the kernel skips its pass)."""
    x, w, b, y, _ = make_problem(37, 19, 101, dtype, bias=True, ignore=3)
    leaves = [t.to(DEVICE).requires_grad_() for t in (x, w, b)]
    linear_cross_entropy(leaves[0], leaves[1], y.to(DEVICE), linear_bias=leaves[2], label_smoothing=0.1,
                         impl="fast").backward()  # fmt: skip
    ref = [t.detach().double().requires_grad_() for t in (x, w, b)]
    torch_linear_xent(ref[0], ref[1], y, b=ref[2], label_smoothing=0.1).backward()
    low = [t.detach().requires_grad_() for t in (x, w, b)]  # torch's own error in dtype
    torch_linear_xent(low[0], low[1], y, b=low[2], label_smoothing=0.1).backward()
    for name, got, want, own in zip("xwb", leaves, ref, low, strict=True):
        bound = 2e-6 if dtype == torch.float32 else 2 * rel_err(own.grad, want.grad)
        assert rel_err(got.grad.cpu(), want.grad) <= bound + 2e-6, name
