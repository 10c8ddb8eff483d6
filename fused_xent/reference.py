"""Plain-torch paths: the materialised reference and the chunked CPU/GPU path.

Both evaluate ``fused_xent.formulation`` with torch operations. The reference holds the
whole (N, C) logit matrix and lets autograd differentiate it; the chunked path holds one
chunk of rows at a time and computes the gradients itself, with the same signatures as
the Triton launchers so that ``functional`` can call either.
"""

from __future__ import annotations

import torch

from fused_xent.formulation import RowTargets, XentOptions, apply_softcap, row_loss, target_weights

#: Bytes of fp32 logits (and their gradient) the chunked path may hold at once.
DEFAULT_CHUNK_BYTES = 256 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_wide(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` with the result (and the accumulation) in fp32 or fp64."""
    wide = compute_dtype(a.dtype)
    if a.dtype == wide:
        return a @ b
    if a.is_cuda and not (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return torch.mm(a, b, out_dtype=wide)  # no autograd formula: only where no gradient flows
    return a.to(wide) @ b.to(wide)


def logits(x, w, b, scale, opts: XentOptions) -> torch.Tensor:
    """``softcap(scale * x @ w.T + b)`` in the compute dtype, differentiable."""
    z = matmul_wide(x, w.T) * scale
    if b is not None:
        z = z + b.to(z.dtype)
    return apply_softcap(z, opts.softcap)


def _masked_dot(tt: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    # tt = 0 where a row puts no mass: a non-finite logit there must not leak in
    return torch.where(tt != 0, tt * z, torch.zeros_like(z)).sum(-1)


def _target_dot(rt: RowTargets, z: torch.Tensor, smoothing: bool) -> torch.Tensor:
    """``sum_j tt_ij z_ij`` without a dense ``tt`` for class-index targets."""
    if rt.y1 is None:
        return _masked_dot(target_weights(rt, z.shape[1]).to(z.dtype), z)
    lin = torch.where(rt.k1 != 0, rt.k1 * z.gather(1, rt.y1[:, None])[:, 0], 0.0)
    if rt.y2 is not None:
        lin = lin + torch.where(rt.k2 != 0, rt.k2 * z.gather(1, rt.y2[:, None])[:, 0], 0.0)
    if smoothing:
        zs = z @ rt.class_weight.to(z.dtype) if rt.class_weight is not None else z.sum(-1)
        lin = lin + torch.where(rt.e != 0, rt.e * zs, 0.0)
    return lin


def _subtract_targets(dz: torch.Tensor, rt: RowTargets, smoothing: bool) -> None:
    """``dz -= tt`` in place, without a dense ``tt`` for class-index targets."""
    if rt.y1 is None:
        dz -= target_weights(rt, dz.shape[1]).to(dz.dtype)
        return
    dz.scatter_add_(1, rt.y1[:, None], -rt.k1[:, None].to(dz.dtype))
    if rt.y2 is not None:
        dz.scatter_add_(1, rt.y2[:, None], -rt.k2[:, None].to(dz.dtype))
    if smoothing:
        a = rt.class_weight.to(dz.dtype)[None, :] if rt.class_weight is not None else 1.0
        dz -= rt.e[:, None].to(dz.dtype) * a


def reference_rows(x, w, b, scale, rt: RowTargets, opts: XentOptions):
    """Per-row loss and lse with the whole logit matrix materialised (autograd does the rest)."""
    z = logits(x, w, b, scale, opts)
    lse = torch.logsumexp(z, dim=-1)
    lin = _masked_dot(target_weights(rt, w.shape[0]).to(z.dtype), z)
    return row_loss(lse, lin, rt), lse


def chunk_rows(num_classes: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Rows per chunk so that about three (rows, C) fp32 buffers fit in the budget."""
    return max(1, budget_bytes // (12 * max(num_classes, 1)))


def chunked_forward(x, w, b, scale, rt: RowTargets, opts: XentOptions, need_lin: bool = True):
    """``(lse, lin)`` per row, one chunk of logits at a time."""
    N = x.shape[0]
    step = chunk_rows(w.shape[0])
    lse = torch.empty(N, device=x.device, dtype=compute_dtype(x.dtype))
    lin = torch.zeros_like(lse)
    for start in range(0, N, step):
        stop = min(start + step, N)
        z = logits(x[start:stop], w, b, scale, opts)
        lse[start:stop] = torch.logsumexp(z, dim=-1)
        if need_lin:
            lin[start:stop] = _target_dot(rt.rows(start, stop), z, opts.label_smoothing != 0)
    return lse, lin


def chunked_backward(x, w, b, scale, lse, cp, rt_g: RowTargets, opts, need_dx, need_dw, need_db):
    """Gradients as ``linear_xent_backward`` returns them: ``dx_raw`` without the scale,
    ``dw`` with it, all in the compute dtype; logits recomputed one chunk at a time."""
    N, D = x.shape
    C = w.shape[0]
    wide = compute_dtype(x.dtype)
    dx = torch.zeros((N, D), device=x.device, dtype=wide) if need_dx else None
    dw = torch.zeros((C, D), device=x.device, dtype=wide) if need_dw else None
    db = torch.zeros((C,), device=x.device, dtype=wide) if need_db else None
    w_wide = w.to(wide)
    step = chunk_rows(C)
    for start in range(0, N, step):
        stop = min(start + step, N)
        z = logits(x[start:stop], w, b, scale, opts)
        dz = cp[start:stop, None] * torch.exp(z - lse[start:stop, None])
        _subtract_targets(dz, rt_g.rows(start, stop), opts.label_smoothing != 0)
        if opts.softcap is not None:
            dz *= 1.0 - (z / opts.softcap) ** 2
        if need_dx:
            dx[start:stop] = dz @ w_wide
        if need_dw:
            dw += dz.T @ x[start:stop].to(wide)
        if need_db:
            db += dz.sum(0)
    if need_dw:
        dw *= scale.to(wide)
    return dx, dw, db
