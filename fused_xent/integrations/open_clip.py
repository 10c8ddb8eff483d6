"""open_clip's contrastive losses without the B x B logit matrix.

CLIP (``open_clip.loss.ClipLoss``), for image features ``I`` and text features ``T`` (B, D) and
``z = s * I @ T.T (+ bias)``, averages the two cross-entropies whose targets are the diagonal:

    loss = (mean_i (lse_row_i - z_ii) + mean_j (lse_col_j - z_jj)) / 2

so it needs the row and the column log-sum-exp of one matrix. ``clip_lse`` returns both and the
diagonal (differentiable): on CUDA from ``fused_xent.kernels.clip_chunked`` (column chunks of
cuBLAS products with Triton kernels between them, "lean") or ``fused_xent.kernels.clip_xent``
(all-Triton, "triton"), on CPU from row chunks in plain torch; a scalar bias shifts ``lse``
and ``z_ii`` alike, so it cancels in value and stays in the graph (its gradient is 0, as in
open_clip).

SigLIP (``open_clip.loss.SigLipLoss``) sums a sigmoid loss over every pair of a block,

    loss = -sum_ij log sigmoid(y_ij * (s * I_i . T_j + bias)) / B,   y_ij = 2 [i == j] - 1

(``y = -1`` everywhere for the blocks of other ranks), with
``dloss / dz_ij = (sigmoid(z_ij) - [y_ij = 1]) / B``; it is evaluated one chunk of rows at a
time, forward and backward, so memory holds one chunk of logits.

The distributed modes follow open_clip exactly: features gathered with or without gradient
(``gather_with_grad``), the local loss with labels offset by the rank, and SigLIP's exchange of
text features between neighbouring ranks.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fused_xent.distributed import gather_features
from fused_xent.functional import is_real, linear_cross_entropy, on_input_device, refuse_create_graph
from fused_xent.reference import chunk_rows, compute_dtype, matmul_wide

IMPLS = ("auto", "lean", "triton", "chunked")
DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


# ---------------------------------------------------------------- row and column lse of s * X @ Y.T


def chunked_clip_forward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor):
    """Plain-torch ``clip_xent_forward``: ``(lse_row, lse_col, diag)`` of ``z = scale * x @ y.T``
    in the compute dtype, one chunk of rows of ``z`` at a time; the column statistics are an
    online max / sum-exp carried from chunk to chunk."""
    B = x.shape[0]
    wide = compute_dtype(x.dtype)
    s = scale.to(wide)
    lse_row = torch.empty(B, device=x.device, dtype=wide)
    diag = torch.empty(B, device=x.device, dtype=wide)
    col_m = torch.full((B,), float("-inf"), device=x.device, dtype=wide)
    col_s = torch.zeros(B, device=x.device, dtype=wide)
    step = chunk_rows(B)
    for start in range(0, B, step):
        z = matmul_wide(x[start : start + step], y.T) * s
        lse_row[start : start + step] = torch.logsumexp(z, dim=1)
        diag[start : start + step] = z.diagonal(offset=start)
        m = torch.maximum(col_m, z.max(dim=0).values)
        col_s = col_s * torch.exp(col_m - m) + torch.exp(z - m).sum(dim=0)
        col_m = m
    return lse_row, col_m + torch.log(col_s), diag


def chunked_clip_backward(x, y, scale, lse_row, lse_col, g_row, g_col, g_diag):
    """Plain-torch ``clip_xent_backward``: gradients of ``g_row . lse_row + g_col . lse_col +
    g_diag . diag`` as ``(dx, dy, dscale)``, recomputing one chunk of logits at a time."""
    B = x.shape[0]
    wide = compute_dtype(x.dtype)
    s = scale.to(wide)
    x_w, y_w = x.to(wide), y.to(wide)
    dx_raw = torch.empty_like(x_w)
    dy_raw = torch.zeros_like(y_w)
    step = chunk_rows(B)
    for start in range(0, B, step):
        z = (x_w[start : start + step] @ y_w.T) * s
        dz = g_row[start : start + step, None] * torch.exp(z - lse_row[start : start + step, None])
        dz += g_col[None, :] * torch.exp(z - lse_col[None, :])
        dz.diagonal(offset=start).add_(g_diag[start : start + step])
        dx_raw[start : start + step] = dz @ y_w
        dy_raw += dz.T @ x_w[start : start + step]
    dscale = (dx_raw * x_w).sum().reshape(1)
    return (dx_raw * s).to(x.dtype), (dy_raw * s).to(y.dtype), dscale


@dataclass(frozen=True)
class _ClipBackend:
    """``clip_xent_forward`` / ``clip_xent_backward`` or their plain-torch twins."""

    name: str
    forward: Callable
    backward: Callable


def _triton_clip_backend() -> _ClipBackend:
    from fused_xent.kernels.clip_xent import clip_xent_backward, clip_xent_forward

    return _ClipBackend("triton", clip_xent_forward, clip_xent_backward)


def _lean_clip_backend() -> _ClipBackend:
    from fused_xent.kernels.clip_chunked import clip_chunked_backward, clip_chunked_forward

    return _ClipBackend("lean", clip_chunked_forward, clip_chunked_backward)


#: Every backend ``_clip_backend`` can return, by name: the custom ops below receive the name.
_CLIP_BACKENDS = {
    "chunked": lambda: _ClipBackend("chunked", chunked_clip_forward, chunked_clip_backward),
    "triton": _triton_clip_backend,
    "lean": _lean_clip_backend,
}


def _clip_backend(impl: str, x: torch.Tensor) -> _ClipBackend:
    if impl == "auto":
        impl = "lean" if x.is_cuda and x.dtype != torch.float64 else "chunked"
    if impl == "chunked":
        return _CLIP_BACKENDS["chunked"]()
    if x.dtype == torch.float64:
        raise ValueError(f"impl={impl!r} supports float32, float16 and bfloat16 features, got float64")
    from fused_xent.kernels.config import interpreting

    if not x.is_cuda and not interpreting():
        raise ValueError(f"impl={impl!r} on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    return _CLIP_BACKENDS[impl]()


# As in fused_xent.functional: the backends run inside two custom ops, so that
# torch.compile(fullgraph=True) sees one opaque node per pass instead of kernel launches and
# Python loops over chunks; eager calls go through _EagerClipLse, outside the dispatcher.


def _clip_rows_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0],), dtype=compute_dtype(x.dtype))


def _clip_forward_impl(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lse_row, lse_col, diag)`` of ``scale * x @ y.T`` from the named backend."""
    with torch.autocast(x.device.type, enabled=False):
        return _CLIP_BACKENDS[backend]().forward(x, y, scale)


_clip_forward_op = torch.library.custom_op("fused_xent::clip_lse_forward", _clip_forward_impl, mutates_args=())


@_clip_forward_op.register_fake
def _(x, y, scale, backend):
    return _clip_rows_like(x), _clip_rows_like(x), _clip_rows_like(x)


def _clip_backward_impl(
    x: torch.Tensor,
    y: torch.Tensor,
    scale: torch.Tensor,
    lse_row: torch.Tensor,
    lse_col: torch.Tensor,
    g_row: torch.Tensor,
    g_col: torch.Tensor,
    g_diag: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dy, dscale)`` of ``g_row . lse_row + g_col . lse_col + g_diag . diag``."""
    with torch.autocast(x.device.type, enabled=False):
        return _CLIP_BACKENDS[backend]().backward(x, y, scale, lse_row, lse_col, g_row, g_col, g_diag)


_clip_backward_op = torch.library.custom_op("fused_xent::clip_lse_backward", _clip_backward_impl, mutates_args=())


@_clip_backward_op.register_fake
def _(x, y, scale, lse_row, lse_col, g_row, g_col, g_diag, backend):
    return torch.empty_like(x), torch.empty_like(y), x.new_empty((1,), dtype=compute_dtype(x.dtype))


def _clip_setup(ctx, inputs, output):
    x, y, scale, backend = inputs
    ctx.save_for_backward(x, y, scale, output[0], output[1])
    ctx.backend = backend


def _clip_lse_backward(ctx, g_row, g_col, g_diag, backward=_clip_backward_op):
    """Backward of ``(lse_row, lse_col, diag)``: the logits are recomputed once."""
    x, y, scale, lse_row, lse_col = ctx.saved_tensors
    wide = lse_row.dtype
    dx, dy, dscale = backward(
        x, y, scale, lse_row, lse_col, g_row.to(wide), g_col.to(wide), g_diag.to(wide), ctx.backend
    )
    need_x, need_y, need_s = ctx.needs_input_grad[:3]
    return dx if need_x else None, dy if need_y else None, dscale.to(scale.dtype) if need_s else None, None


_clip_forward_op.register_autograd(_clip_lse_backward, setup_context=_clip_setup)


class _EagerClipLse(torch.autograd.Function):
    """The same two passes outside the dispatcher, for eager calls."""

    @staticmethod
    def forward(ctx, x, y, scale, backend: str):
        output = _clip_forward_impl(x, y, scale, backend)
        _clip_setup(ctx, (x, y, scale, backend), output)
        return output

    @staticmethod
    def backward(ctx, g_row, g_col, g_diag):
        refuse_create_graph(ctx.backend)
        return _clip_lse_backward(ctx, g_row, g_col, g_diag, backward=_clip_backward_impl)


@on_input_device
def clip_lse(x: torch.Tensor, y: torch.Tensor, scale: float | torch.Tensor = 1.0, *, impl: str = "auto"):
    """Row and column log-sum-exp and diagonal of ``z = scale * x @ y.T``, without ``z``.

    Args:
        x, y: (B, D) features of one dtype (float32 / float16 / bfloat16; float64 on CPU).
        scale: float or 1-element tensor (learnable: gets a gradient).
        impl: "auto" ("lean" on CUDA, "chunked" elsewhere), "lean" (cuBLAS products per
            column chunk, Triton kernels between them), "triton" (all-Triton) or "chunked"
            (plain torch).

    Returns:
        ``(lse_row, lse_col, diag)``, each (B,) fp32 (fp64 for fp64 input) and differentiable:
        ``lse_row_i = log sum_j exp(z_ij)``, ``lse_col_j = log sum_i exp(z_ij)``, ``diag_i = z_ii``.
    """
    _check_features(x, y, "x", "y")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    scale_t = _as_scale(scale, x, "scale")
    backend = _clip_backend(impl, x).name
    with torch.autocast(x.device.type, enabled=False):
        if torch.compiler.is_compiling():
            return _clip_forward_op(x, y, scale_t, backend)
        return _EagerClipLse.apply(x, y, scale_t, backend)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """CLIP's symmetric loss ``(CE(z, arange(B)) + CE(z.T, arange(B))) / 2`` for
    ``z = logit_scale * image_features @ text_features.T + logit_bias``, without ``z``.

    Args:
        image_features, text_features: (B, D), one dtype.
        logit_scale: float or 1-element tensor (learnable).
        logit_bias: None or a 1-element tensor (learnable; it cancels, gradient 0).
        impl: as in :func:`clip_lse`.

    Returns:
        The 0-d loss, fp32 (fp64 for fp64 features).
    """
    lse_row, lse_col, diag = clip_lse(image_features, text_features, logit_scale, impl=impl)
    if logit_bias is not None:
        bias = _as_bias(logit_bias, image_features).to(lse_row.dtype).reshape(())
        lse_row, lse_col, diag = lse_row + bias, lse_col + bias, diag + bias
    return ((lse_row - diag).mean() + (lse_col - diag).mean()) / 2


# ---------------------------------------------------------------- SigLIP block loss


def chunked_siglip_forward(x, y, scale, bias, positive_diag: bool) -> torch.Tensor:
    """``-sum_ij log sigmoid(y_ij z_ij)`` for ``z = scale * x @ y.T + bias`` (0-d, compute dtype)."""
    wide = compute_dtype(x.dtype)
    s, b = scale.to(wide), bias.to(wide)
    total = torch.zeros((), device=x.device, dtype=wide)
    step = chunk_rows(y.shape[0])
    for start in range(0, x.shape[0], step):
        z = matmul_wide(x[start : start + step], y.T) * s + b
        if positive_diag:
            z.diagonal(offset=start).neg_()  # y_ii = +1: -log sigmoid(z) = -log sigmoid(-(-z))
        total += -F.logsigmoid(-z).sum()
    return total


def chunked_siglip_backward(x, y, scale, bias, positive_diag: bool, g: torch.Tensor):
    """Gradients of ``g * chunked_siglip_forward`` as ``(dx, dy, dscale, dbias)``, logits
    recomputed one chunk at a time. ``sigmoid(z) - [y = 1]`` lies in [-1, 1] and goes to the
    GEMMs in the input dtype; ``g`` is applied after the fp32-accumulated products."""
    wide = compute_dtype(x.dtype)
    s, b = scale.to(wide), bias.to(wide)
    dx_raw = torch.empty(x.shape, device=x.device, dtype=wide)
    dy_raw = torch.zeros(y.shape, device=x.device, dtype=wide)
    dbias = torch.zeros((), device=x.device, dtype=wide)
    step = chunk_rows(y.shape[0])
    for start in range(0, x.shape[0], step):
        x_rows = x[start : start + step]
        z = matmul_wide(x_rows, y.T) * s + b
        dz = torch.sigmoid(z)
        if positive_diag and torch.is_grad_enabled():  # create_graph: sigmoid's backward reads dz
            dz = dz.diagonal_scatter(dz.diagonal(offset=start) - 1.0, offset=start)
        elif positive_diag:
            dz.diagonal(offset=start).sub_(1.0)
        dbias += dz.sum()
        dz = dz.to(x.dtype)
        dx_raw[start : start + step] = matmul_wide(dz, y)
        dy_raw += matmul_wide(dz.T, x_rows)
    dscale = (dx_raw * x).sum() * g
    return (dx_raw * (s * g)).to(x.dtype), (dy_raw * (s * g)).to(y.dtype), dscale.reshape(1), (dbias * g).reshape(1)


class _SigLipBlock(torch.autograd.Function):
    """``-sum_ij log sigmoid(y_ij (scale * x_i . y_j + bias))``; backward recomputes the logits."""

    @staticmethod
    def forward(ctx, x, y, scale, bias, positive_diag: bool):
        _siglip_setup(ctx, (x, y, scale, bias, positive_diag), None)
        return chunked_siglip_forward(x, y, scale, bias, positive_diag)

    @staticmethod
    def backward(ctx, g):
        return _siglip_block_backward(ctx, g)


def _siglip_block_backward(ctx, g, backward=chunked_siglip_backward):
    """The block's input gradients from ``backward`` (the chunked function, or its custom op
    while compiling) on the saved tensors."""
    x, y, scale, bias = ctx.saved_tensors
    with torch.autocast(x.device.type, enabled=False):
        dx, dy, dscale, dbias = backward(x, y, scale, bias, ctx.positive_diag, g)
    need = ctx.needs_input_grad
    return (
        dx if need[0] else None,
        dy if need[1] else None,
        dscale.to(scale.dtype) if need[2] else None,
        dbias.to(bias.dtype) if need[3] else None,
        None,
    )


# While compiling, the block runs inside two custom ops as the CLIP backends do: inductor traced
# into the chunk loops and, on CUDA in bf16, gave a zero image-feature gradient (H100, torch
# 2.11, tests/test_gpu_compile.py); an opaque op runs the same code as eager.


def _siglip_forward_impl(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, positive_diag: bool
) -> torch.Tensor:
    return chunked_siglip_forward(x, y, scale, bias, positive_diag)


_siglip_forward_op = torch.library.custom_op("fused_xent::siglip_block", _siglip_forward_impl, mutates_args=())


@_siglip_forward_op.register_fake
def _(x, y, scale, bias, positive_diag):
    return x.new_empty((), dtype=compute_dtype(x.dtype))


def _siglip_backward_impl(
    x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, positive_diag: bool, g: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dy, dscale, dbias)``: dx and dy in the features' dtypes, the others (1,) fp32."""
    with torch.autocast(x.device.type, enabled=False):
        return chunked_siglip_backward(x, y, scale, bias, positive_diag, g)


_siglip_backward_op = torch.library.custom_op(
    "fused_xent::siglip_block_backward", _siglip_backward_impl, mutates_args=()
)


@_siglip_backward_op.register_fake
def _(x, y, scale, bias, positive_diag, g):
    wide = compute_dtype(x.dtype)
    return torch.empty_like(x), torch.empty_like(y), x.new_empty((1,), dtype=wide), x.new_empty((1,), dtype=wide)


def _siglip_setup(ctx, inputs, output):
    """What both backwards read: the inputs, and which diagonal is positive."""
    x, y, scale, bias, positive_diag = inputs
    ctx.save_for_backward(x, y, scale, bias)
    ctx.positive_diag = positive_diag


def _siglip_op_backward(ctx, g):
    return _siglip_block_backward(ctx, g, backward=_siglip_backward_op)


_siglip_forward_op.register_autograd(_siglip_op_backward, setup_context=_siglip_setup)


def siglip_block_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: float | torch.Tensor,
    logit_bias: float | torch.Tensor | None = None,
    *,
    negative_only: bool = False,
) -> torch.Tensor:
    """open_clip's ``SigLipLoss._loss`` without the logit matrix.

    ``-sum_ij log sigmoid(y_ij * (logit_scale * I_i . T_j + logit_bias)) / B`` with
    ``y_ij = 2 [i == j] - 1``, or ``y = -1`` everywhere when ``negative_only``.

    Args:
        image_features: (B, D); text_features: (B2, D) of the same dtype (B2 = B unless
            ``negative_only``).
        logit_scale, logit_bias: floats or 1-element tensors (learnable); bias None means 0.

    Returns:
        The 0-d loss, fp32 (fp64 for fp64 features).
    """
    _check_features(image_features, text_features, "image_features", "text_features", same_rows=not negative_only)
    scale = _as_scale(logit_scale, image_features, "logit_scale")
    if logit_bias is None:
        bias = torch.zeros(1, device=image_features.device)
    else:
        bias = _as_bias(logit_bias, image_features).reshape(1)
    with torch.autocast(image_features.device.type, enabled=False):
        if torch.compiler.is_compiling():
            total = _siglip_forward_op(image_features, text_features, scale, bias, not negative_only)
        else:
            total = _SigLipBlock.apply(image_features, text_features, scale, bias, not negative_only)
    return total / image_features.shape[0]


# ---------------------------------------------------------------- distributed plumbing


def _exchange(from_rank: int, to_rank: int, tensor: torch.Tensor) -> torch.Tensor:
    received = torch.zeros_like(tensor)
    ops = [dist.P2POp(dist.isend, tensor.contiguous(), to_rank), dist.P2POp(dist.irecv, received, from_rank)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _exchange_bidir(left: int, right: int, to_left: torch.Tensor, to_right: torch.Tensor):
    from_left, from_right = torch.zeros_like(to_right), torch.zeros_like(to_left)
    ops = [
        dist.P2POp(dist.isend, to_right.contiguous(), right),
        dist.P2POp(dist.isend, to_left.contiguous(), left),
        dist.P2POp(dist.irecv, from_right, right),
        dist.P2POp(dist.irecv, from_left, left),
    ]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return from_right, from_left


class _Exchange(torch.autograd.Function):
    """Receive from ``from_rank`` what was sent to ``to_rank``; the gradient goes back the other way."""

    @staticmethod
    def forward(ctx, from_rank, to_rank, tensor):
        ctx.ranks = from_rank, to_rank
        return _exchange(from_rank, to_rank, tensor)

    @staticmethod
    def backward(ctx, grad):
        from_rank, to_rank = ctx.ranks
        return None, None, _Exchange.apply(to_rank, from_rank, grad)


class _ExchangeBidir(torch.autograd.Function):
    """Both neighbours at once: returns ``(from_right, from_left)``."""

    @staticmethod
    def forward(ctx, left, right, to_left, to_right):
        ctx.ranks = left, right
        return _exchange_bidir(left, right, to_left, to_right)

    @staticmethod
    def backward(ctx, grad_from_right, grad_from_left):
        left, right = ctx.ranks
        return (None, None) + _ExchangeBidir.apply(right, left, grad_from_right, grad_from_left)


# ---------------------------------------------------------------- the open_clip losses


class FusedClipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.ClipLoss``: same constructor, forward, value and gradients
    (features and ``logit_scale``), without the B x B logits.

    ``forward(image_features (b, D), text_features (b, D), logit_scale (0-d), logit_bias=None,
    output_dict=False)`` returns the 0-d fp32 loss, or ``{"contrastive_loss": loss}``. With
    ``world_size > 1`` (``torch.distributed`` initialised): ``local_loss`` gives each rank the
    cross-entropy of its own rows against every rank's features, labels offset by ``b * rank``;
    otherwise every rank computes the loss of the gathered (B, B) problem. ``impl`` (keyword
    only, beyond open_clip) chooses the backend as in :func:`clip_lse`.
    """

    def __init__(
        self,
        local_loss: bool = False,
        gather_with_grad: bool = False,
        cache_labels: bool = False,
        rank: int = 0,
        world_size: int = 1,
        use_horovod: bool = False,
        *,
        impl: str = "auto",
    ):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("FusedClipLoss supports torch.distributed, not horovod (use_horovod=True)")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        _check_ranks(rank, world_size)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod
        self.impl = impl
        self.prev_num_logits = 0
        self.labels: dict = {}

    def get_ground_truth(self, device: torch.device, num_logits: int) -> torch.Tensor:
        """Targets of the local loss, ``arange(num_logits) + num_logits * rank`` (cached if asked)."""
        if self.prev_num_logits == num_logits and device in self.labels:
            return self.labels[device]
        labels = torch.arange(num_logits, device=device, dtype=torch.long)
        if self.world_size > 1 and self.local_loss:
            labels = labels + num_logits * self.rank
        if self.cache_labels:
            self.labels[device] = labels
            self.prev_num_logits = num_logits
        return labels

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """open_clip's ``ClipLoss.get_logits``: ``(logits_per_image, logits_per_text)``,
        materialised (for in-batch retrieval metrics; the loss never forms them). With
        ``world_size > 1`` the features are gathered as the loss gathers them."""
        if self.world_size > 1:
            all_images, all_texts = gather_features(
                image_features, text_features, self.local_loss, self.gather_with_grad, self.rank, self.world_size
            )
            if self.local_loss:
                per_image = logit_scale * image_features @ all_texts.T
                per_text = logit_scale * text_features @ all_images.T
            else:
                per_image = logit_scale * all_images @ all_texts.T
                per_text = per_image.T
        else:
            per_image = logit_scale * image_features @ text_features.T
            per_text = logit_scale * text_features @ image_features.T
        if logit_bias is not None:
            per_image, per_text = per_image + logit_bias, per_text + logit_bias
        return per_image, per_text

    def forward(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        output_dict: bool = False,
    ):
        _check_features(image_features, text_features, "image_features", "text_features")
        if self.world_size == 1:
            loss = clip_loss(image_features, text_features, logit_scale, logit_bias, impl=self.impl)
        else:
            all_images, all_texts = gather_features(
                image_features, text_features, self.local_loss, self.gather_with_grad, self.rank, self.world_size
            )
            if self.local_loss:
                loss = self._local_loss(image_features, text_features, all_images, all_texts, logit_scale, logit_bias)
            else:
                loss = clip_loss(all_images, all_texts, logit_scale, logit_bias, impl=self.impl)
        return {"contrastive_loss": loss} if output_dict else loss

    def _local_loss(self, images, texts, all_images, all_texts, logit_scale, logit_bias):
        labels = self.get_ground_truth(images.device, images.shape[0])
        bias = None
        if logit_bias is not None:
            bias = _as_bias(logit_bias, images).to(images.dtype).reshape(1).expand(all_texts.shape[0])
            bias = bias.contiguous()
        options = dict(scale=logit_scale, linear_bias=bias, impl=self.impl)
        per_image = linear_cross_entropy(images, all_texts, labels, **options)
        per_text = linear_cross_entropy(texts, all_images, labels, **options)
        return (per_image + per_text) / 2


class FusedSigLipLoss(nn.Module):
    """Drop-in for ``open_clip.loss.SigLipLoss``: same constructor, forward, value and gradients
    (features, ``logit_scale`` and ``logit_bias``), holding one chunk of logits at a time.

    ``forward(image_features (b, D), text_features (b, D), logit_scale, logit_bias,
    output_dict=False)``; with ``world_size > 1`` the text features of the other ranks come
    in as open_clip's ``dist_impl`` brings them ("bidir" neighbour exchange by default,
    "shift", "reduce" or "gather"), each adding its negative-only block loss.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl: str | None = None):
        super().__init__()
        dist_impl = dist_impl or "bidir"
        if dist_impl not in DIST_IMPLS:
            raise ValueError(f"dist_impl must be one of {DIST_IMPLS} or None, got {dist_impl!r}")
        _check_ranks(rank, world_size)
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl

    def get_ground_truth(self, device, dtype, num_logits: int, negative_only: bool = False) -> torch.Tensor:
        """open_clip's (num_logits, num_logits) +-1 label matrix (the loss never forms it)."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        return labels if negative_only else labels + 2 * torch.eye(num_logits, device=device, dtype=dtype)

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None) -> torch.Tensor:
        """open_clip's ``SigLipLoss.get_logits``, materialised (the loss never forms them)."""
        logits = logit_scale * image_features @ text_features.T
        return logits if logit_bias is None else logits + logit_bias

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        def block(texts, negative_only=True):
            return siglip_block_loss(image_features, texts, logit_scale, logit_bias, negative_only=negative_only)

        loss = block(text_features, negative_only=False)
        if self.world_size > 1:
            for texts, used in self._other_texts(text_features):
                # an unused all_reduce output stays in the graph: every rank must run its backward collective
                # (zeros summed, not 0 * sum: an fp16 sum past 65504 is inf, and 0 * inf NaN)
                loss = loss + (block(texts) if used else (texts * 0.0).sum())
        return {"contrastive_loss": loss} if output_dict else loss

    def _other_texts(self, text_features):
        """The other ranks' text features in open_clip's order, each differentiable, and whether
        it enters the loss."""
        rank, world = self.rank, self.world_size
        right, left = (rank + 1) % world, (rank - 1 + world) % world
        if self.dist_impl == "bidir":
            to_left = to_right = text_features
            pairs, odd = divmod(world - 1, 2)
            for _ in range(pairs):
                received = _ExchangeBidir.apply(left, right, to_left, to_right)
                yield from ((texts, True) for texts in received)
                to_left, to_right = received
            if odd:
                yield _Exchange.apply(left, right, to_right), True
        elif self.dist_impl == "shift":
            to_right = text_features
            for _ in range(world - 1):
                to_right = _Exchange.apply(left, right, to_right)
                yield to_right, True
        elif self.dist_impl == "reduce":
            from torch.distributed import nn as dist_nn

            for other in range(world):
                yield dist_nn.all_reduce(text_features * (rank == other), dist.ReduceOp.SUM), other != rank
        else:
            from torch.distributed import nn as dist_nn

            texts = dist_nn.all_gather(text_features)
            yield from ((t, other != rank) for other, t in enumerate(texts))


# ---------------------------------------------------------------- argument checks


def _check_features(x, y, x_name: str, y_name: str, same_rows: bool = True) -> None:
    for name, t in ((x_name, x), (y_name, y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be a (B, D) float tensor, got {_describe(t)}")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"{x_name} and {y_name} need at least one row each, got {tuple(x.shape)} and {tuple(y.shape)}")
    if (x.shape if same_rows else x.shape[1:]) != (y.shape if same_rows else y.shape[1:]):
        expected = "the same shape" if same_rows else "the same feature size D"
        raise ValueError(f"{x_name} {tuple(x.shape)} and {y_name} {tuple(y.shape)} must have {expected}")
    if x.dtype != y.dtype or x.device != y.device:
        raise TypeError(f"{x_name} ({x.dtype}, {x.device}) and {y_name} ({y.dtype}, {y.device}) must match")


def _as_scale(scale, like: torch.Tensor, name: str) -> torch.Tensor:
    """A 1-element fp32 tensor (fp64 stays fp64), still in the graph when ``scale`` is a tensor;
    a Python float takes the features' (``like``) compute dtype (fp64 for fp64 features)."""
    device = like.device
    if isinstance(scale, numbers.Real):
        return torch.full((1,), float(scale), device=device, dtype=compute_dtype(like.dtype))
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or not is_real(scale):
        raise ValueError(f"{name} must be a float or a 1-element real tensor, got {_describe(scale)}")
    if scale.device != device:
        raise ValueError(f"{name} is on {scale.device} but the features are on {device}")
    if not scale.dtype.is_floating_point:  # an integer constant, as a Python number would be
        return scale.reshape(1).to(compute_dtype(like.dtype))
    return scale.reshape(1).to(compute_dtype(scale.dtype))


def _as_bias(bias, like: torch.Tensor) -> torch.Tensor:
    """``logit_bias`` as a 1-element tensor on the features' (``like``) device; a Python float in
    their compute dtype."""
    device = like.device
    if isinstance(bias, numbers.Real):
        return torch.full((1,), float(bias), device=device, dtype=compute_dtype(like.dtype))
    if not isinstance(bias, torch.Tensor) or bias.numel() != 1 or not is_real(bias):
        raise ValueError(f"logit_bias must be None, a float or a 1-element real tensor, got {_describe(bias)}")
    if bias.device != device:
        raise ValueError(f"logit_bias is on {bias.device} but the features are on {device}")
    return bias if bias.dtype.is_floating_point else bias.to(compute_dtype(like.dtype))


def _check_ranks(rank: int, world_size: int) -> None:
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"tensor of shape {tuple(obj.shape)} and dtype {obj.dtype} on {obj.device}"
    return f"{type(obj).__name__} {obj!r}"
