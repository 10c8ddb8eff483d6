"""A reduced loss from the rows' (lse, lin), and its per-row gradient coefficients, one launch each.

``formulation.row_loss`` defines a row's loss, ``loss_i = A_i lse_i - lin_i + zl_i lse_i**2``
(0 on rows with ``A_i = zl_i = 0``), and the reduction is its sum, or the sum over
``sum_i row_weight_i`` for "mean". For an upstream gradient ``g`` of that scalar, row i's loss
receives ``g_i = g`` ("sum") or ``g / sum_i row_weight_i`` ("mean"), 0 on the rows whose loss is
fixed at 0; the backward kernels then take (``formulation.prob_coef``, ``RowTargets.scaled``)

    cp_i = g_i (A_i + 2 zl_i lse_i),      tt scaled by g_i: k1, k2, e, d times g_i.

Eager lean and filtered calls formed these with ~13 torch launches in the forward and ~13 in
autograd's backward; on a small head each costs the host 20-60 us, more than the GPU spends
(``benchmarks/NOTES.md``, session 12). Both kernels sum or scale in fp32, in a fixed order:
deterministic.
"""

import dataclasses

import torch
import triton
import triton.language as tl

from fused_xent.formulation import RowTargets
from fused_xent.kernels.launch import fast_jit

#: Rows per step of the one program that reduces, and per program of the coefficients.
_BLOCK = 2048


@fast_jit
@triton.jit
def reduced_loss_kernel(Lse, Lin, LseCoef, ZL, RowWeight, Loss, Divisor, N, MEAN: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    """One program: ``Loss`` the sum of the rows' losses, divided by the row weights' sum
    when ``MEAN``, ``Divisor`` that sum (1 for "sum"). Each lane sums its rows in order, then
    one tree sum: a fixed order."""
    total = tl.zeros([BLOCK], tl.float32)
    weight = tl.zeros([BLOCK], tl.float32)
    for start in range(0, N, BLOCK):
        rows = start + tl.arange(0, BLOCK)
        mask = rows < N
        lse = tl.load(Lse + rows, mask=mask, other=0.0)
        a = tl.load(LseCoef + rows, mask=mask, other=0.0)
        zl = tl.load(ZL + rows, mask=mask, other=0.0)
        loss = a * lse - tl.load(Lin + rows, mask=mask, other=0.0) + zl * lse * lse
        total += tl.where((a != 0.0) | (zl != 0.0), loss, 0.0)  # masked rows: a = zl = 0
        if MEAN:
            weight += tl.load(RowWeight + rows, mask=mask, other=0.0)
    if MEAN:
        divisor = tl.sum(weight, axis=0)
        tl.store(Loss, tl.sum(total, axis=0) / divisor)
        tl.store(Divisor, divisor)
    else:
        tl.store(Loss, tl.sum(total, axis=0))
        tl.store(Divisor, 1.0)


def reduced_loss(
    lse: torch.Tensor, lin: torch.Tensor, rt: RowTargets, reduction: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, divisor)`` fp32, shapes () and (1,): the "mean" or "sum" of
    ``formulation.row_loss(lse, lin, rt)``, and the mean's divisor (1 for "sum") for
    ``loss_grad_coefs``. ``lse``, ``lin`` (N,) fp32."""
    loss = torch.empty((), device=lse.device, dtype=torch.float32)
    divisor = torch.empty(1, device=lse.device, dtype=torch.float32)
    reduced_loss_kernel[(1,)](
        lse, lin, rt.lse_coef, rt.zl, rt.row_weight, loss, divisor, lse.shape[0], MEAN=reduction == "mean",
        BLOCK=_BLOCK, num_warps=8,
    )  # fmt: skip
    return loss, divisor


@fast_jit
@triton.jit
def loss_grad_coefs_kernel(
    G, Divisor, Lse, LseCoef, ZL, K1, K2, E, Dn, Cp, K1s, K2s, Es, Ds, N, MEAN: tl.constexpr, HAS_HARD: tl.constexpr,
    HAS_Y2: tl.constexpr, HAS_DENSE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Program i fills rows ``[i * BLOCK, ...)`` of ``cp`` and of the targets scaled by ``g_i``
    (see the module docstring); ``G`` the upstream gradient (1 element), ``Divisor``
    ``reduced_loss``'s."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = rows < N
    g = tl.load(G).to(tl.float32)
    if MEAN:
        g = g / tl.load(Divisor)
    a = tl.load(LseCoef + rows, mask=mask, other=0.0)
    zl = tl.load(ZL + rows, mask=mask, other=0.0)
    lse = tl.load(Lse + rows, mask=mask, other=0.0)
    counts = (a != 0.0) | (zl != 0.0)
    g_i = tl.where(counts, g, 0.0)
    tl.store(Cp + rows, tl.where(counts, g * (a + 2.0 * zl * lse), 0.0), mask=mask)  # 0 even where lse is not finite
    tl.store(Es + rows, tl.load(E + rows, mask=mask, other=0.0) * g_i, mask=mask)
    if HAS_HARD:
        tl.store(K1s + rows, tl.load(K1 + rows, mask=mask, other=0.0) * g_i, mask=mask)
    if HAS_Y2:
        tl.store(K2s + rows, tl.load(K2 + rows, mask=mask, other=0.0) * g_i, mask=mask)
    if HAS_DENSE:
        tl.store(Ds + rows, tl.load(Dn + rows, mask=mask, other=0.0) * g_i, mask=mask)


def loss_grad_coefs(
    g: torch.Tensor, divisor: torch.Tensor, lse: torch.Tensor, rt: RowTargets, reduction: str
) -> tuple[torch.Tensor, RowTargets]:
    """``(cp, rt_g)`` for the upstream gradient ``g`` (1 element) of ``reduced_loss``'s loss
    (``divisor`` its second output): the backends' per-row coefficient on ``p``, and ``rt``
    with ``tt`` scaled by ``g_i``."""
    N = lse.shape[0]

    def like(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.empty_like(t)

    cp, k1, k2, e, d = torch.empty_like(lse), like(rt.k1), like(rt.k2), like(rt.e), like(rt.d)
    if N:
        loss_grad_coefs_kernel[(triton.cdiv(N, _BLOCK),)](
            g, divisor, lse, rt.lse_coef, rt.zl, *(t if t is not None else cp for t in (rt.k1, rt.k2, rt.e, rt.d)),
            cp, *(t if t is not None else cp for t in (k1, k2, e, d)), N, MEAN=reduction == "mean",
            HAS_HARD=rt.k1 is not None, HAS_Y2=rt.k2 is not None, HAS_DENSE=rt.d is not None, BLOCK=_BLOCK,
            num_warps=4,
        )  # fmt: skip
    return cp, dataclasses.replace(rt, k1=k1, k2=k2, e=e, d=d)
