"""Margin heads for extreme classification (ArcFace / CosFace / combined margin).

Cosine logits with normalised features and class weights, ``c_ij = <x_i/|x_i|, w_j/|w_j|>``,
and the combined margin of insightface on the target class only:

    z_ij = s * c_ij                                      (j != y_i)
    z_iy = s * (cos(m1 * arccos(c_iy) + m2) - m3)        (ArcFace: m2, CosFace: m3, SphereFace: m1)
    loss_i = lse_j(z_ij) - z_iy

The (N, C) logits are never formed. The batch's distinct target classes T (at most N)
are taken out of the core's sum by a bias of ``-1e4`` on their columns, so the core
returns ``lse_R`` over the other classes; the block of logits against T is formed
densely, the margin applied at each row's target, and

    lse'_i = logaddexp(lse_R_i, logsumexp_{j in T} z'_ij),    loss_i = lse'_i - z'_iy.

T is held as the N sorted targets, each class live in its first slot only (the other
slots' logits are -inf), so its size never depends on the data: no host sync, and
``torch.compile(fullgraph=True)`` traces it.

Every term is a sum of exponentials, nothing is subtracted, so value and gradients are
as exact as the core's (autograd hands the core the exact coefficient on ``lse_R``). The
core forms a row's loss as ``lse - z_y`` from one fp32 lse: on confident float32 rows that
is 3-4x torch fp32's error at s = 64 and target cosine 0.95 (README, "Precision").

Why not swap the target term inside the full lse, ``lse' = lse + log1p(exp(z'_y - lse) -
exp(z_y - lse))``: ``1 - p_y`` is then a difference of numbers near 1 and carries an
absolute error of ~2**-24 (fp32). In a trained ArcFace head (target cosine 0.8, others
near 0, s = 64) ``1 - p_y`` is about e**-29 and ``p'_y`` about e**-25, so the error is
~1e3 times the quantity: the non-target gradient is lost entirely.

Memory: on CUDA ("auto" / "lean") the class-chunked kernels divide each class's products by
its weight's norm (``w_norm``), so W is never normalised in memory, and the backward writes W's
gradient already projected on the sphere's tangent: beyond the gradients, lean's chunk and the
(N, N) block. The other impls (and torch.compile) take a normalised copy of W (C, D), held for
the backward, and project its gradient without a second (C, D) buffer.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from fused_xent.formulation import XentOptions, build_row_targets
from fused_xent.functional import (
    IMPLS,
    _autocast_dtype,
    _autocast_operand,
    _check_budget,
    _check_ignore_index,
    _check_target_range,
    _lean_chunk_bytes,
    _spare_bytes,
    linear_cross_entropy,
    on_input_device,
    refuse_create_graph,
)
from fused_xent.kernels.config import interpreting
from fused_xent.reference import compute_dtype, matmul_wide

__all__ = ["MarginHead", "margin_cross_entropy", "margin_logits", "margin_target_logit"]

#: Cosines are clamped to [-1 + COS_EPS, 1 - COS_EPS] before arccos, whose slope is infinite at +-1.
COS_EPS = 1e-6
#: Bias that takes a class out of the core's log-sum-exp: exp(-1e4 + 2 s (1 + |m3|)) is 0 in every dtype
#: while ``s * (2 + |m3|) <= 9900`` (checked).
_EXCLUDED = -1e4
#: Bytes of wide temporaries the weight normalisation may hold at once.
_CHUNK_BYTES = 32 * 2**20


#: ArcFace's target logit where ``arccos(c) + m2`` passes pi (``c < cos(pi - m2)``), where
#: ``cos(arccos(c) + m2)`` turns and grows again as c falls: None keeps that formula
#: (insightface's current ``CombinedMarginLoss``); "linear" takes ``c - m2 sin(m2)`` there
#: (insightface's earlier one, and the common ``ArcMarginProduct`` with ``easy_margin=False``);
#: "easy" takes ``c`` itself wherever ``c <= 0`` (every such target, not only those past pi:
#: ``ArcMarginProduct`` with ``easy_margin=True``).
FALLBACKS = (None, "linear", "easy")


def margin_target_logit(
    cos: torch.Tensor, m1: float, m2: float, m3: float, fallback: str | None = None
) -> torch.Tensor:
    """``cos(m1 * arccos(c) + m2) - m3`` (before the scale), c clamped to +-(1 - COS_EPS);
    ``fallback`` (ArcFace, m1 = 1): see ``FALLBACKS``."""
    _check_fallback(fallback)
    if m1 == 1.0 and m2 == 0.0:
        return cos - m3  # CosFace: no arccos, no clamp
    c = cos.clamp(-1.0 + COS_EPS, 1.0 - COS_EPS)
    target = torch.cos(m1 * torch.arccos(c) + m2)
    if fallback == "linear":
        target = torch.where(cos > math.cos(math.pi - m2), target, cos - m2 * math.sin(m2))
    elif fallback == "easy":
        target = torch.where(cos > 0, target, cos)
    return target - m3


def _check_fallback(fallback) -> None:
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")


def margin_logits(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    ignore_index: int = -100,
    fallback: str | None = None,
) -> torch.Tensor:
    """The materialised (N, C) margin logits (the reference; evaluation of small heads).

    ``s * c_ij`` off target, ``s * margin_target_logit(c_iy)`` on target; rows whose target
    is ``ignore_index`` keep plain ``s * c``."""
    cos = nn.functional.normalize(input, dim=-1) @ nn.functional.normalize(linear_weight, dim=-1).T
    keep = target != ignore_index
    y = torch.where(keep, target, torch.zeros_like(target))
    c_y = cos.gather(1, y[:, None])
    onehot = nn.functional.one_hot(y, cos.shape[1]).bool() & keep[:, None]
    return s * torch.where(onehot, margin_target_logit(c_y, m1, m2, m3, fallback), cos)


class _NormalizedRows(torch.autograd.Function):
    """``(w / |w|, w[idx] / |w[idx]|)`` in w's dtype; saves only w, idx and the norms.

    Both passes work in fp32 (fp64 for fp64) on chunks of rows of at most ``_CHUNK_BYTES``;
    the backward writes the gradient of both outputs into one (C, D) buffer."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        C, D = w.shape
        norm = torch.linalg.vector_norm(w, dim=1, dtype=compute_dtype(w.dtype)).clamp_min(1e-12)
        out = torch.empty_like(w)
        for i, j in _row_chunks(C, D):
            out[i:j] = w[i:j].to(norm.dtype) / norm[i:j, None]
        ctx.save_for_backward(w, idx, norm)
        return out, out[idx]

    @staticmethod
    def backward(ctx, g: torch.Tensor, g_idx: torch.Tensor):
        w, idx, norm = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the norms depend on w too, for the second derivative
            norm = torch.linalg.vector_norm(w, dim=1, dtype=norm.dtype).clamp_min(1e-12)
        C, D = w.shape
        dw = torch.empty_like(w)
        for i, j in _row_chunks(C, D):
            dw[i:j] = _tangent(g[i:j], w[i:j], norm[i:j])
        dw.index_add_(0, idx, _tangent(g_idx, w[idx], norm[idx]).to(dw.dtype))
        return dw, None


class _CosineRest(torch.autograd.Function):
    """``(lse_R, w[idx] / |w[idx]|)``: ``lse_R`` per row the log-sum-exp of ``s * cos`` over the
    classes outside ``idx``, from the class-chunked kernels with W's rows divided by their norms
    inside the kernels (no normalised copy of W). The backward writes W's gradient (both
    outputs') into one (C, D) buffer, projected on the tangent."""

    @staticmethod
    def forward(ctx, xn, w, idx, excluded, s, chunk_bytes, spare_bytes):
        from fused_xent.kernels.class_chunked import class_chunked_forward, forward_chunk_bytes

        C = w.shape[0]
        w = w.contiguous()  # the tangent pass (class_chunked._tangent_rows) reads and writes W's rows densely
        norm = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32).clamp_min(1e-12)
        bias, scale = _excluding_bias(C, excluded, w), torch.full((1,), float(s), device=xn.device)
        opts = XentOptions(num_classes=C, chunk_bytes=chunk_bytes)
        rt = build_row_targets(
            torch.zeros(xn.shape[0], device=xn.device, dtype=torch.long),
            target2=None, lam=None, class_weight=None, ignore_index=None, opts=opts,
        )  # fmt: skip
        chunk = forward_chunk_bytes(chunk_bytes, spare_bytes)
        lse, _ = class_chunked_forward(xn, w, bias, scale, rt, opts, need_lin=False, chunk_bytes=chunk, w_norm=norm)
        ctx.save_for_backward(xn, w, idx, bias, scale, norm, lse)
        ctx.rt, ctx.opts = rt, opts
        return lse, (w[idx].to(norm.dtype) / norm[idx, None]).to(w.dtype)

    @staticmethod
    def backward(ctx, g_lse, g_t):
        from fused_xent.kernels.class_chunked import class_chunked_backward

        refuse_create_graph("lean")

        xn, w, idx, bias, scale, norm, lse = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        rt_g = ctx.rt.scaled(torch.zeros_like(lse))  # no target term: lse_R's gradient only
        g_lse = torch.zeros_like(lse) if g_lse is None else g_lse.contiguous()
        dx, dw, _ = class_chunked_backward(
            xn, w, bias, scale, lse, g_lse, rt_g, ctx.opts, need_x, need_w, False, w_norm=norm
        )  # fmt: skip
        if need_w and g_t is not None:
            dw.index_add_(0, idx, _tangent(g_t, w[idx], norm[idx]).to(dw.dtype))
        return dx.mul_(scale).to(xn.dtype) if need_x else None, dw if need_w else None, *[None] * 5


def _excluding_bias(C: int, excluded: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(C,) in ``like``'s dtype: ``_EXCLUDED`` on the classes ``excluded`` (C stands for none), 0 elsewhere."""
    return torch.zeros(C + 1, device=like.device, dtype=like.dtype).index_fill_(0, excluded, _EXCLUDED)[:C]


def _tangent(g: torch.Tensor, w: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``d(w/|w|)^T g = (g - (g . w) w / |w|^2) / |w|`` in norm's dtype: g without its radial part."""
    g, w, n = g.to(norm.dtype), w.to(norm.dtype), norm[:, None]
    radial = (g * w).sum(1, keepdim=True) / (n * n)
    return (g - radial * w) / n


def _row_chunks(rows: int, cols: int):
    step = max(1, _CHUNK_BYTES // (8 * cols))
    return ((i, min(i + step, rows)) for i in range(0, rows, step))


@on_input_device
def margin_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    ignore_index: int | None = -100,
    reduction: str = "mean",
    impl: str = "auto",
    memory_budget: int | None = None,
    fallback: str | None = None,
) -> torch.Tensor:
    """Combined-margin cross-entropy (ArcFace m2, CosFace m3, SphereFace m1) on cosine logits,
    without the (N, C) logits.

    ``loss_i = lse_j(z_ij) - z_iy`` with ``z = s * cos`` off target and
    ``z_iy = s * (cos(m1 * arccos(c_iy) + m2) - m3)``; see the module docstring for how
    and how precisely. Equals ``F.cross_entropy(margin_logits(...), target)``.

    Args:
        input: (N, D) features (any norm); float32 / float16 / bfloat16 / float64.
        linear_weight: (C, D) class centres (any norm), input's dtype.
        target: (N,) integer class indices, or ``ignore_index``.
        s: logit scale; m1, m2, m3: the margins (ArcFace 1, 0.5, 0; CosFace 1, 0, 0.35-0.4).
        reduction: "mean" (over kept rows) | "sum" | "none".
        impl: as in :func:`fused_xent.linear_cross_entropy`. On CUDA "auto" and "lean" divide
            by W's norms inside the class-chunked kernels (no normalised copy of W); while
            compiling, and for the other impls, the normalised copy goes to that impl.
        memory_budget: as in :func:`fused_xent.linear_cross_entropy` (sizes lean's chunk).
        fallback: None (the formula above everywhere), "linear" (``c - m2 sin m2`` past
            ``arccos(c) + m2 = pi``) or "easy" (``c`` wherever ``c <= 0``); ``FALLBACKS``,
            ArcFace (m1 = 1) only.

    A class outside [0, C) on a row that is not ignored raises a ValueError, except while
    compiling (the check needs a host sync): there that row's loss is NaN.
    """
    ignore_index = _check_margin_options(s, m1, m2, m3, impl, ignore_index, fallback)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not isinstance(input, torch.Tensor) or input.dim() != 2:
        raise ValueError(f"input must be an (N, D) tensor, got {_shape(input)}")
    if not input.is_floating_point():
        raise TypeError(f"input must be a float tensor (float32, float16, bfloat16, float64), got dtype {input.dtype}")
    if input.shape[1] == 0:
        raise ValueError(f"input must have at least one feature (a cosine needs one), got {_shape(input)}")
    if not isinstance(linear_weight, torch.Tensor) or linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be a (C, D) tensor, got {_shape(linear_weight)}")
    if linear_weight.shape[1] != input.shape[1]:
        raise ValueError(
            f"input has {input.shape[1]} features but linear_weight has {linear_weight.shape[1]} "
            f"(shapes {tuple(input.shape)} and {tuple(linear_weight.shape)})"
        )
    if not isinstance(target, torch.Tensor) or target.shape != input.shape[:1]:
        raise ValueError(f"target must be ({input.shape[0]},) class indices, got {_shape(target)}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    target = target.long()

    memory_budget = _check_budget(memory_budget)
    low = _autocast_dtype(input)
    if low is not None:  # as F.linear's operands under autocast
        input, linear_weight = _autocast_operand(input, low), _autocast_operand(linear_weight, low)
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight dtype {linear_weight.dtype} must equal input dtype {input.dtype}")

    C, N = linear_weight.shape[0], target.shape[0]
    keep = target != ignore_index
    bad = keep & ((target < 0) | (target >= C))
    _check_target_range(target, None, None, C, ignore_index)
    # T as N sorted slots without a host sync (torch.unique's size is data-dependent): ignored
    # and out-of-range rows hold the absent class C, and only each class's first slot is live
    t = torch.where(keep & ~bad, target, C)
    slots = torch.sort(t).values
    live = (slots < C) & torch.cat([slots[:1] == slots[:1], slots[1:] != slots[:-1]])
    col = torch.searchsorted(slots, t)  # each row's first slot
    xn = nn.functional.normalize(input, dim=-1)
    if _in_kernel_norms(input, impl):
        chunk_bytes = _lean_chunk_bytes(_lean_budget(memory_budget, xn, C), xn, True, False)
        needs = [torch.is_grad_enabled() and t.requires_grad for t in (xn, linear_weight)]
        spare = _spare_bytes(xn, linear_weight, [*needs, False, False])
        lse_rest, wn_t = _CosineRest.apply(xn, linear_weight, slots.clamp(max=C - 1), slots, s, chunk_bytes, spare)
    else:
        wn, wn_t = _NormalizedRows.apply(linear_weight, slots.clamp(max=C - 1))
        bias = _excluding_bias(C, slots, wn)
        _, lse_rest = linear_cross_entropy(
            xn, wn, torch.zeros_like(target), linear_bias=bias, scale=s, reduction="none", return_lse=True,
            impl=impl, memory_budget=memory_budget,
        )  # fmt: skip
    wide = lse_rest.dtype
    block = matmul_wide(xn, wn_t.T).to(wide)  # (N, N) cosines against the batch's classes
    is_target = (col[:, None] == torch.arange(N, device=col.device)) & keep[:, None]
    z_y = s * margin_target_logit(block.gather(1, col[:, None]), m1, m2, m3, fallback)  # (N, 1)
    block = torch.where(is_target, z_y, s * block).masked_fill(~live, float("-inf"))
    lse = torch.logaddexp(lse_rest, torch.logsumexp(block, dim=1))
    rows = torch.where(keep, lse - z_y[:, 0], torch.zeros_like(lse))
    return _reduce(rows.masked_fill(bad, float("nan")), keep, reduction)


def _check_margin_options(s, m1, m2, m3, impl, ignore_index, fallback=None) -> int:
    """The scalar arguments of :func:`margin_cross_entropy` (and :class:`MarginHead`'s); returns
    ``ignore_index`` as an int (None is -100, as in torch)."""
    for name, value in (("s", s), ("m1", m1), ("m2", m2), ("m3", m3)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite float, got {value!r}")
    _check_fallback(fallback)
    if fallback is not None and m1 != 1.0:
        raise ValueError(f"fallback={fallback!r} is ArcFace's (m1 = 1), got m1={m1}")
    if not s > 0:
        raise ValueError(f"s must be > 0, got {s}")
    if s * (2 + abs(m3)) > -_EXCLUDED - 100:
        # every logit lies in [-s (1 + |m3|), s]; a class taken out of the core's lse by _EXCLUDED must
        # stay e^-100 below the smallest of them
        raise ValueError(
            f"s * (2 + |m3|) must be at most {-_EXCLUDED - 100:g} (logits beyond that reach the bias that "
            f"excludes the batch's classes from the lse), got s={s}, m3={m3}"
        )
    if impl == "fast":
        raise ValueError(
            "impl='fast' does not apply to margin_cross_entropy (it needs each row's lse over the non-target "
            "classes); use impl='auto' or 'lean'"
        )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {tuple(i for i in IMPLS if i != 'fast')}, got {impl!r}")
    return _check_ignore_index(ignore_index)


def _lean_budget(memory_budget: int | None, xn: torch.Tensor, C: int) -> int | None:
    """What a budget (the call's, else ``set_memory_budget``'s) leaves the core's chunk beside
    the margin's own tensors held during its backward: xn, the gradients of xn and of the
    target rows (N x D each), W's norms and their inverses (fp32) and the excluding bias (C
    each). None: no budget was set."""
    from fused_xent import functional

    budget = memory_budget if memory_budget is not None else functional._MEMORY_BUDGET
    if budget is None:
        return None
    return max(0, budget - 3 * xn.numel() * xn.element_size() - C * (8 + xn.element_size()))


def _in_kernel_norms(input: torch.Tensor, impl: str) -> bool:
    """Whether W's norms divide inside the class-chunked kernels (``_CosineRest``)."""
    if impl not in ("auto", "lean") or input.dtype == torch.float64 or torch.compiler.is_compiling():
        return False
    return input.is_cuda or (impl == "lean" and interpreting())


def _reduce(rows: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / keep.sum()


def _shape(obj) -> str:
    return f"shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else type(obj).__name__


class MarginHead(nn.Module):
    """A class-centre matrix (C, D) trained with :func:`margin_cross_entropy`.

    ``MarginHead(512, 1_000_000)`` is ArcFace (s = 64, m2 = 0.5); ``m2=0.0, m3=0.4`` is
    CosFace. ``forward(features (N, D), target (N,))`` returns the loss;
    :meth:`cosine` gives the (N, C) cosines for evaluation of small batches.
    """

    #: a class default: a head pickled before the option existed loads with the plain formula
    fallback: str | None = None

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        ignore_index: int = -100,
        impl: str = "auto",
        memory_budget: int | None = None,
        fallback: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_margin_options(s, m1, m2, m3, impl, ignore_index, fallback)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=0.01)
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.ignore_index = ignore_index
        self.impl = impl
        self.memory_budget = memory_budget
        self.fallback = fallback

    def forward(self, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return margin_cross_entropy(
            features.to(self.weight.dtype),
            self.weight,
            target,
            s=self.s,
            m1=self.m1,
            m2=self.m2,
            m3=self.m3,
            ignore_index=self.ignore_index,
            impl=self.impl,
            memory_budget=self.memory_budget,
            fallback=self.fallback,
        )

    def cosine(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) cosines ``<x/|x|, w/|w|>`` (materialised)."""
        w = nn.functional.normalize(self.weight, dim=-1)
        return nn.functional.normalize(features.to(w.dtype), dim=-1) @ w.T

    def extra_repr(self) -> str:
        C, D = self.weight.shape
        fallback = "" if self.fallback is None else f", fallback={self.fallback!r}"
        return f"in_features={D}, num_classes={C}, s={self.s}, m=({self.m1}, {self.m2}, {self.m3}){fallback}"
