"""The math of fused_xent, in one place.

For row i with logits ``z_i = softcap(s * x_i @ W.T + b)`` the loss is

    loss_i = A_i * lse_i - sum_j tt_ij * z_ij + zl_i * lse_i**2

where ``tt_ij`` is the *weighted target distribution* and ``A_i = sum_j tt_ij``:

- class indices y (optionally mixed with y2 by lam, and smoothed by eps):
  ``tt_ij = (1-eps) * (lam * a_y * [j == y] + (1-lam) * a_y2 * [j == y2]) + eps/C * a_j``
- class probabilities t (shape (..., C)): ``tt_ij = a_j * ((1-eps) * t_ij + eps/C)``

with ``a`` the per-class ``weight`` (ones when absent); ignored rows have ``tt = 0`` and
``zl = 0``. This reproduces ``F.cross_entropy`` for every argument they share, including
the weighted mean (denominator ``sum_i a_{y_i}`` over kept rows, or N for probabilities).

The gradient with respect to the logits is

    dloss_i/dz_ij = (A_i + 2 * zl_i * lse_i) * p_ij - tt_ij,      p = softmax(z_i)

and an upstream gradient on ``lse_i`` (``return_lse``) adds ``g_lse_i * p_ij``. Softcap
multiplies by ``1 - (z_ij / cap)**2``. The scale gradient is ``<dX_raw, X>`` where
``dX_raw = dZ @ W`` before the scale is applied, so it costs no extra pass.

Every backend (Triton kernels, chunked torch, materialised reference) receives the
targets as a :class:`RowTargets` and the options as a :class:`XentOptions`, and forms
``tt`` tile by tile from them; nothing of size N x C is built for class-index targets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class XentOptions:
    """Options every backend receives whole."""

    num_classes: int
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    softcap: float | None = None
    chunk_bytes: int | None = None  # the class-chunked backends' logit chunk (None: their default)
    unit_scale: bool = False  # the scale is known to be 1 (no scale argument): dW needs no scale pass


@dataclass(frozen=True)
class RowTargets:
    """Per-row description of ``tt`` (see the module docstring); all float tensors fp32.

    ``tt_ij = k1_i [j == y1_i] + k2_i [j == y2_i] + a_j * (e_i + d_i * dense_ij)``.
    """

    y1: torch.Tensor | None  # (N,) int64, or None for probability targets
    k1: torch.Tensor | None  # (N,)
    y2: torch.Tensor | None  # (N,) int64, mixup's second label
    k2: torch.Tensor | None  # (N,)
    e: torch.Tensor  # (N,) smoothing mass per class, 0 on ignored rows
    class_weight: torch.Tensor | None  # (C,) the `weight` argument, a_j
    dense: torch.Tensor | None  # (N, C) probability targets, any float dtype
    d: torch.Tensor | None  # (N,) factor on dense, (1 - eps)
    lse_coef: torch.Tensor  # (N,) A_i = sum_j tt_ij
    zl: torch.Tensor  # (N,) z-loss coefficient, 0 on ignored rows
    row_weight: torch.Tensor  # (N,) contribution of the row to the mean's denominator

    def scaled(self, g: torch.Tensor) -> RowTargets:
        """``tt`` multiplied row-wise by ``g``: what the backward kernels subtract."""

        def mul(t):
            return None if t is None else t * g

        return dataclasses.replace(self, k1=mul(self.k1), k2=mul(self.k2), e=self.e * g, d=mul(self.d))

    def rows(self, start: int, stop: int) -> RowTargets:
        """The targets of rows [start, stop)."""

        def cut(t):
            return None if t is None else t[start:stop]

        return RowTargets(
            y1=cut(self.y1),
            k1=cut(self.k1),
            y2=cut(self.y2),
            k2=cut(self.k2),
            e=cut(self.e),
            class_weight=self.class_weight,
            dense=cut(self.dense),
            d=cut(self.d),
            lse_coef=cut(self.lse_coef),
            zl=cut(self.zl),
            row_weight=cut(self.row_weight),
        )


def build_row_targets(
    target: torch.Tensor,
    *,
    target2: torch.Tensor | None,
    lam: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    ignore_index: int | None,
    opts: XentOptions,
    dtype: torch.dtype = torch.float32,
) -> RowTargets:
    """Per-row coefficients in ``dtype`` from flattened targets: ``target`` (N,) int64 or
    (N, C) float, ``target2`` (N,) int64, ``lam`` (N,) and ``class_weight`` (C,) in ``dtype``.

    A kept row whose label lies outside [0, C), or whose ``lam`` lies outside [0, 1], gets
    ``k1 = NaN`` (and its label replaced by 0, a valid index): its loss and gradients are
    NaN instead of silently wrong, and no host sync is needed (as under ``torch.compile``)."""
    eps, C = opts.label_smoothing, opts.num_classes
    device = target.device
    a_sum = class_weight.sum() if class_weight is not None else float(C)
    if target.is_floating_point():
        n = target.shape[0]
        d = torch.full((n,), 1.0 - eps, device=device, dtype=dtype)
        e = torch.full((n,), eps / C, device=device, dtype=dtype)
        t32 = target.to(dtype)
        mass = t32 @ class_weight if class_weight is not None else t32.sum(-1)
        return RowTargets(
            y1=None,
            k1=None,
            y2=None,
            k2=None,
            e=e,
            class_weight=class_weight,
            dense=target,
            d=d,
            lse_coef=d * mass + e * a_sum,
            zl=torch.full((n,), opts.z_loss, device=device, dtype=dtype),
            row_weight=torch.ones(n, device=device, dtype=dtype),
        )
    # few, small operations: on a small head every launch here is host time (benchmarks/NOTES.md)
    keep = None if ignore_index is None else target != ignore_index
    keep_f = torch.ones(target.shape, device=device, dtype=dtype) if keep is None else keep.to(dtype)

    def label(t):
        valid = t.clamp(0, C - 1)  # ignored rows get a valid index; their k is 0
        bad = valid != t
        if keep is not None:
            bad &= keep
        # where, not a product: an ignored row's stand-in label may carry an inf / NaN weight
        a = keep_f if class_weight is None else torch.where(keep_f != 0, class_weight[valid], 0.0)
        return valid, a, bad

    y1, a1, bad = label(target)
    k1 = (1.0 - eps) * a1 if lam is None else (1.0 - eps) * lam * a1
    row_weight = a1 if lam is None else lam * a1
    y2 = k2 = None
    if target2 is not None:
        y2, a2, bad2 = label(target2)
        k2 = (1.0 - eps) * (1.0 - lam) * a2
        row_weight = row_weight + (1.0 - lam) * a2
        bad = bad | bad2 | ~((lam >= 0) & (lam <= 1))
    k1 = k1.masked_fill(bad, float("nan"))
    e = (eps / C) * keep_f
    # no smoothing on the row, no weight sum: a class weight of inf (1 / count of an absent
    # class) or NaN that no kept label uses leaves the loss alone, as in torch
    lse_coef = k1 if k2 is None else k1 + k2
    if eps != 0:
        lse_coef = lse_coef + torch.where(e != 0, e * a_sum, 0.0)  # row_targets_kernel's rule
    return RowTargets(
        y1=y1,
        k1=k1,
        y2=y2,
        k2=k2,
        e=e,
        class_weight=class_weight,
        dense=None,
        d=None,
        lse_coef=lse_coef,
        zl=opts.z_loss * keep_f,
        row_weight=row_weight,
    )


def target_weights(rt: RowTargets, num_classes: int) -> torch.Tensor:
    """Dense ``tt`` for the rows of ``rt`` (n, C) fp32: for the chunked and reference paths,
    one chunk of rows at a time."""
    n = rt.e.shape[0]
    base = rt.e[:, None].expand(n, num_classes)
    if rt.dense is not None:
        base = base + rt.d[:, None] * rt.dense.to(rt.d.dtype)
    if rt.class_weight is not None:  # no mass, no weight (an inf / NaN weight adds nothing there)
        base = torch.where(base != 0, base * rt.class_weight[None, :], 0.0)
    tt = base.clone()
    if rt.y1 is not None:
        tt.scatter_add_(1, rt.y1[:, None], rt.k1[:, None])
    if rt.y2 is not None:
        tt.scatter_add_(1, rt.y2[:, None], rt.k2[:, None])
    return tt


def apply_softcap(u: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``cap * tanh(u / cap)`` (Gemma 2's final logit softcapping), identity when None."""
    return u if softcap is None else softcap * torch.tanh(u / softcap)


def row_loss(lse: torch.Tensor, lin: torch.Tensor, rt: RowTargets) -> torch.Tensor:
    """``A * lse - sum_j tt z + zl * lse**2``; rows with no target mass are exactly 0."""
    loss = rt.lse_coef * lse - lin + rt.zl * lse * lse
    return torch.where((rt.lse_coef != 0) | (rt.zl != 0), loss, torch.zeros_like(loss))


def prob_coef(g: torch.Tensor, g_lse: torch.Tensor, lse: torch.Tensor, rt: RowTargets) -> torch.Tensor:
    """Per-row coefficient on ``p_ij`` in the logit gradient (``g`` and ``g_lse`` upstream)."""
    return g * (rt.lse_coef + 2.0 * rt.zl * lse) + g_lse
