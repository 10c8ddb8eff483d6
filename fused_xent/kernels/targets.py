"""Per-row target coefficients for class-index targets in one launch.

``formulation.build_row_targets`` defines them (``k1``, ``k2``, ``e``, ``A = lse_coef``, ``zl``,
the row weight, and NaN in ``k1`` on a kept row whose label lies outside [0, C) or, with mixup,
on every row when some ``lam`` lies outside [0, 1]); it takes ~15 small torch operations. On the
H100 machine each costs the host 30-60 us, and a small head's call is host-bound
(``benchmarks/NVIDIA-H100-80GB-HBM3/small_heads.md``), so the CUDA path computes the same
numbers here, in the same fp32 operations, and the label range check's summary with them.

The summary ``[min y1, max y1, min y2, max y2, any bad lam]`` (int64) takes the labels of kept
rows, 0 on ignored rows, as ``functional._label_range`` does: atomic minima and maxima over
programs, starting from 0 (a valid label, so it never changes the verdict of ``lo < 0 or
hi >= C``). Integer minima and maxima are order-free: the summary is deterministic.
"""

import torch
import triton
import triton.language as tl

from fused_xent.formulation import RowTargets, XentOptions
from fused_xent.kernels.launch import fast_jit

#: Rows per program.
_BLOCK = 1024


@triton.jit
def _label(t, mask, keep, keep_f, C, CW, HAS_WEIGHT: tl.constexpr):
    """``(valid, a, bad, kept label or 0)`` of labels ``t`` (int64, one per row), as
    ``build_row_targets``' ``label``; ``keep`` comes from the first target (its ignored rows),
    for both labels."""
    valid = tl.minimum(tl.maximum(t, 0), C - 1)
    bad = (valid != t) & keep
    if HAS_WEIGHT:  # where, not a product: an ignored row's stand-in label may weigh inf / NaN
        a = tl.where(keep, tl.load(CW + valid, mask=mask, other=0.0), 0.0)
    else:
        a = keep_f
    return valid, a, bad, tl.where(keep & mask, t, 0)


@fast_jit
@triton.jit
def row_targets_kernel(
    T, T2, Lam, CW, ASum, Y1, K1, Y2, K2, E, LseCoef, ZL, RowWeight, Summary, N, C, ignore_index,
    one_minus_eps, e_coef, z_loss, HAS_IGNORE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_Y2: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    """Program i fills rows ``[i * BLOCK, ...)`` of every output and folds their labels into
    ``Summary``. ``T``, ``T2`` (N,) integer labels; ``Lam`` (N,) fp32 with ``HAS_Y2``; ``CW`` (C,)
    and ``ASum`` (1,) the class weights and their sum with ``HAS_WEIGHT`` (else ``a_sum = C``)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    t = tl.load(T + rows, mask=mask, other=0).to(tl.int64)
    keep = t != ignore_index if HAS_IGNORE else rows >= 0
    keep_f = keep.to(tl.float32)
    y1, a1, bad, lab1 = _label(t, mask, keep, keep_f, C, CW, HAS_WEIGHT)
    if HAS_Y2:
        lam = tl.load(Lam + rows, mask=mask, other=0.0)
        k1 = one_minus_eps * lam * a1
        row_w = lam * a1
        t2 = tl.load(T2 + rows, mask=mask, other=0).to(tl.int64)
        y2, a2, bad2, lab2 = _label(t2, mask, keep, keep_f, C, CW, HAS_WEIGHT)
        k2 = one_minus_eps * (1.0 - lam) * a2
        row_w = row_w + (1.0 - lam) * a2
        lam_bad = ~((lam >= 0) & (lam <= 1)) & mask
        bad = bad | bad2 | lam_bad
        tl.store(Y2 + rows, y2, mask=mask)
        tl.store(K2 + rows, k2, mask=mask)
        tl.atomic_min(Summary + 2, tl.min(lab2, axis=0), sem="relaxed")
        tl.atomic_max(Summary + 3, tl.max(lab2, axis=0), sem="relaxed")
        tl.atomic_max(Summary + 4, tl.max(lam_bad.to(tl.int64), axis=0), sem="relaxed")
    else:
        k1 = one_minus_eps * a1
        row_w = a1
    k1 = tl.where(bad, float("nan"), k1)
    e = e_coef * keep_f
    a_sum = tl.load(ASum) if HAS_WEIGHT else C * 1.0
    # a row without smoothing takes no weight sum (an inf / NaN weight no kept label uses
    # leaves the loss alone, as in torch); build_row_targets' rule
    lse_coef = tl.where(e != 0, e * a_sum, 0.0)
    if HAS_Y2:
        lse_coef = k1 + k2 + lse_coef
    else:
        lse_coef = k1 + lse_coef
    tl.store(Y1 + rows, y1, mask=mask)
    tl.store(K1 + rows, k1, mask=mask)
    tl.store(E + rows, e, mask=mask)
    tl.store(LseCoef + rows, lse_coef, mask=mask)
    tl.store(ZL + rows, z_loss * keep_f, mask=mask)
    tl.store(RowWeight + rows, row_w, mask=mask)
    tl.atomic_min(Summary, tl.min(lab1, axis=0), sem="relaxed")
    tl.atomic_max(Summary + 1, tl.max(lab1, axis=0), sem="relaxed")


def row_targets(
    target: torch.Tensor,
    *,
    target2: torch.Tensor | None,
    lam: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    ignore_index: int | None,
    opts: XentOptions,
) -> tuple[RowTargets, torch.Tensor]:
    """``build_row_targets`` for class-index targets in fp32, and the label range summary
    (int64, 2 entries, 5 with ``target2``: see the module docstring). ``target``, ``target2``
    (N,) integer, ``lam`` (N,) fp32 with ``target2``, ``class_weight`` (C,) fp32 or None."""
    N, C, device = target.shape[0], opts.num_classes, target.device

    def rows(dtype=torch.float32):
        return torch.empty(N, device=device, dtype=dtype)

    y1, k1, e, lse_coef, zl, row_weight = rows(torch.int64), rows(), rows(), rows(), rows(), rows()
    y2, k2 = (rows(torch.int64), rows()) if target2 is not None else (None, None)
    summary = torch.zeros(5 if target2 is not None else 2, device=device, dtype=torch.int64)
    a_sum = class_weight.sum().reshape(1) if class_weight is not None else None
    if N:
        eps = opts.label_smoothing
        row_targets_kernel[(triton.cdiv(N, _BLOCK),)](
            target, target2 if target2 is not None else target, lam if lam is not None else k1,
            class_weight if class_weight is not None else k1, a_sum if a_sum is not None else k1,
            y1, k1, y2 if y2 is not None else y1, k2 if k2 is not None else k1, e, lse_coef, zl, row_weight,
            summary, N, C, ignore_index if ignore_index is not None else 0, 1.0 - eps, eps / C, opts.z_loss,
            HAS_IGNORE=ignore_index is not None, HAS_WEIGHT=class_weight is not None, HAS_Y2=target2 is not None,
            BLOCK=_BLOCK, num_warps=4,
        )  # fmt: skip
    rt = RowTargets(
        y1=y1, k1=k1, y2=y2, k2=k2, e=e, class_weight=class_weight, dense=None, d=None, lse_coef=lse_coef, zl=zl,
        row_weight=row_weight,
    )  # fmt: skip
    return rt, summary
