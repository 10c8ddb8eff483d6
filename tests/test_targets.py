"""``kernels.targets.row_targets`` (Triton, under the interpreter here) against its definition,
``formulation.build_row_targets``, and the label range summary against ``functional``'s."""

import os

import pytest
import torch

import fused_xent
from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.functional import _label_range
from fused_xent.kernels.targets import row_targets

#: CUDA where there is one (no interpreter there), else the CPU under the interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FIELDS = ("y1", "k1", "y2", "k2", "e", "lse_coef", "zl", "row_weight")


def _labels(n: int, C: int, gen: torch.Generator, ignore_index, bad: bool) -> torch.Tensor:
    t = torch.randint(0, C, (n,), generator=gen)
    if ignore_index is not None and n > 2:
        t[::3] = ignore_index
    if bad and n > 4:
        t[1], t[4] = C + 5, -7
    return t


@pytest.mark.parametrize("n", [0, 1, 5, 1500])
@pytest.mark.parametrize("mixup", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("ignore_index", [-100, None, 3])
def test_row_targets_match_build_row_targets(n, mixup, weighted, ignore_index):
    C = 11
    gen = torch.Generator().manual_seed(n * 7 + mixup + 2 * weighted)
    opts = XentOptions(num_classes=C, label_smoothing=0.15, z_loss=1e-3)
    t = _labels(n, C, gen, ignore_index, bad=True)
    t2 = _labels(n, C, gen, ignore_index, bad=False) if mixup else None
    lam = torch.rand(n, generator=gen) if mixup else None
    if mixup and n > 3:
        lam[2] = 1.5  # outside [0, 1]: NaN on every row
    cw = torch.rand(C, generator=gen) + 0.5 if weighted else None
    kw = dict(target2=t2, lam=lam, class_weight=cw, ignore_index=ignore_index, opts=opts)
    t_dev, kw_dev = _on_device(t, kw)
    rt, summary = row_targets(t_dev, **kw_dev)
    ref = build_row_targets(t, **kw)
    for name in FIELDS:
        got, want = getattr(rt, name), getattr(ref, name)
        if want is None:
            assert got is None, name
            continue
        got = got.cpu()
        assert got.dtype == want.dtype and got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0, equal_nan=True, msg=name)
    if n > 4:  # the bad labels made NaN rows, as the definition says
        assert rt.k1.isnan().sum().item() == ref.k1.isnan().sum().item() > 0
    if n == 0:  # nothing to range-check: the summary stays at its start, zeros
        assert summary.tolist() == [0] * (5 if mixup else 2)
        return
    keep = None if ignore_index is None else t != ignore_index
    flags = [_label_range(t, keep)]
    if mixup:
        flags += [_label_range(t2, keep), (~((lam >= 0) & (lam <= 1))).any().long()[None]]
    summary_ref = torch.cat(flags)
    # the kernel starts from 0, a valid label: same verdict, and the same numbers once 0 is folded in
    assert summary.tolist()[:4] == [
        min(v, 0) if i % 2 == 0 else max(v, 0) for i, v in enumerate(summary_ref.tolist()[:4])
    ]
    assert summary.tolist()[4:] == summary_ref.tolist()[4:]


def _on_device(t, kw):
    moved = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return t.to(DEVICE), moved


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="raises at once for CPU tensors only")
def test_out_of_range_label_raises_through_the_kernel_path():
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    for bad, text in ((5, "target contains 5"), (-3, "target contains -3")):
        y = torch.tensor([0, 1, bad, 2, 3, 4])
        with pytest.raises(ValueError, match=text):
            fused_xent.linear_cross_entropy(x, w, y, impl="lean")
    y, y2 = torch.tensor([0, 1, 2, 3, 4, 0]), torch.tensor([0, 9, 2, 3, 4, 0])
    with pytest.raises(ValueError, match="target2 contains 9"):
        fused_xent.linear_cross_entropy(x, w, y, target2=y2, lam=0.5, impl="fast")
