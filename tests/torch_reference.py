"""The one reference every test compares with: torch's own F.cross_entropy on
materialised float64 logits. Extensions (scale, softcap, z-loss, mixup) are written
with torch operations on top of it, never with fused_xent's own formulation."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def torch_linear_xent(
    x,
    w,
    target,
    *,
    b=None,
    weight=None,
    reduction="mean",
    ignore_index=-100,
    label_smoothing=0.0,
    scale=None,
    softcap=None,
    z_loss=0.0,
    target2=None,
    lam=None,
    return_lse=False,
):
    """Loss (and lse) exactly as a user would write it with torch, in x's dtype."""
    z = x @ w.T
    if scale is not None:
        z = z * scale
    if b is not None:
        z = z + b
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    C = w.shape[0]
    lse = torch.logsumexp(z, dim=-1)
    dense = target.is_floating_point()
    zf = z.reshape(-1, C)
    tf = target.reshape(-1, C) if dense else target.reshape(-1)
    ii = -100 if ignore_index is None else ignore_index
    kw = dict(weight=weight, ignore_index=ii, label_smoothing=label_smoothing)
    if target2 is None and z_loss == 0.0:
        loss = F.cross_entropy(zf, tf, reduction=reduction, **kw)
        if reduction == "none":
            loss = loss.reshape(target.shape[:-1] if dense else target.shape)
    else:
        rows = F.cross_entropy(zf, tf, reduction="none", **kw)
        keep = torch.ones_like(rows, dtype=torch.bool) if dense else tf != ii
        wt = weight if weight is not None else torch.ones(C, dtype=zf.dtype)
        if dense:
            denom_rows = torch.ones_like(rows)
        else:
            denom_rows = torch.where(keep, wt[tf.clamp(0, C - 1)], torch.zeros_like(rows))
        if target2 is not None:
            t2 = target2.reshape(-1)
            lam_rows = (
                torch.as_tensor(lam, dtype=zf.dtype).expand(rows.shape)
                if not torch.is_tensor(lam) or lam.numel() == 1
                else lam.reshape(-1).to(zf.dtype)
            )
            rows2 = F.cross_entropy(zf, t2.masked_fill(~keep, ii), reduction="none", **kw)
            rows = lam_rows * rows + (1 - lam_rows) * rows2
            denom_rows = lam_rows * denom_rows + (1 - lam_rows) * torch.where(
                keep, wt[t2.clamp(0, C - 1)], torch.zeros_like(rows)
            )
        rows = rows + z_loss * torch.where(keep, lse.reshape(-1) ** 2, torch.zeros_like(rows))
        if reduction == "none":
            loss = rows.reshape(lse.shape)
        elif reduction == "sum":
            loss = rows.sum()
        else:
            loss = rows.sum() / denom_rows.sum()
    return (loss, lse) if return_lse else loss


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (nan-aware: equal nans count as equal)."""
    a, b = a.detach().double(), b.detach().double()
    if torch.isnan(b).any() or torch.isnan(a).any():
        return (
            0.0
            if torch.equal(torch.isnan(a), torch.isnan(b)) and torch.allclose(a.nan_to_num(), b.nan_to_num())
            else float("inf")
        )
    den = b.norm()
    return float((a - b).norm() / den) if den > 0 else float((a - b).norm())
