"""Class-parallel cross-entropy (the classifier's rows sharded across ranks) and CLIP
feature gathering, on ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

Rank r holds the rows ``[o_r, o_r + C_r)`` of the classifier; ``input`` and ``target`` are
the same on every rank. Each rank streams its own classes through the core backend and
gets per row its partial log-sum-exp ``lse_r`` and linear term ``lin_r = sum_{j in r} tt_ij
z_ij``. The global row values follow from an all-reduce (max) of N floats and one (sum)
of 2N:

    m = max_r lse_r,   lse = m + log sum_r exp(lse_r - m),   lin = sum_r lin_r

and the row coefficients ``A_i`` (which hold ``eps / C * sum_j a_j`` over every class) and
the mean's denominator are sums over ranks too. With the global ``lse`` the softmax of a
shard's logits is exact, so the core backward gives the shard's own ``dW``, ``db`` and a
partial ``dX`` whose sum over ranks is the full one. Nothing of size N x C is formed or
sent; shards may differ in size.
"""

from __future__ import annotations

import dataclasses
import numbers
import zlib

import torch
import torch.distributed as dist

from fused_xent import functional, reference
from fused_xent.formulation import RowTargets, XentOptions, build_row_targets, prob_coef, row_loss

#: Backends of the core that take a shard; "reference" differentiates materialised logits
#: with autograd and has no sharded form.
IMPLS = ("auto", "triton", "lean", "chunked")


def shard_classes(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """``(class_offset, num_local)`` of rank ``rank`` when ``num_classes`` are split as evenly
    as possible into ``world_size`` contiguous shards (the first ``num_classes % world_size``
    ranks get one class more)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size), got rank={rank}, world_size={world_size}")
    if num_classes < world_size:
        raise ValueError(f"num_classes={num_classes} must be >= world_size={world_size}: every shard needs a class")
    base, extra = divmod(num_classes, world_size)
    return rank * base + min(rank, extra), base + (rank < extra)


class _ShardedLinearCrossEntropy(torch.autograd.Function):
    """Global per-row loss and lse from this rank's shard; the backward returns the shard's
    ``dW``, ``db`` and the (all-reduced, or partial) ``dX`` and ``dscale``."""

    @staticmethod
    def forward(ctx, x, w, b, scale, rt: RowTargets, opts: XentOptions, backend, group, reduce_input_grad: bool):
        lse, lin = _global_lse_lin(x, w, b, scale, rt, opts, backend, group)
        ctx.save_for_backward(x, w, b, scale, lse)
        ctx.rt, ctx.opts, ctx.backend, ctx.group, ctx.reduce_input_grad = rt, opts, backend, group, reduce_input_grad
        return row_loss(lse, lin, rt), lse

    @staticmethod
    def backward(ctx, g, g_lse):
        if torch.is_grad_enabled():  # create_graph=True: the collectives below are outside autograd
            raise RuntimeError(
                "fused_xent.distributed's backward combines the ranks' lse and dX with collectives that autograd "
                "does not differentiate; a backward with create_graph=True (double backward, gradient "
                "penalties) is not supported on any impl"
            )
        # The loss is replicated: every rank receives the same upstream g and g_lse.
        x, w, b, scale, lse = ctx.saved_tensors
        rt, group = ctx.rt, ctx.group
        g = torch.where((rt.lse_coef != 0) | (rt.zl != 0), g, torch.zeros_like(g))
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        cp, rt_g = prob_coef(g, g_lse, lse, rt), rt.scaled(g)
        with torch.autocast(x.device.type, enabled=False):  # the backends choose their own precision
            dx_raw, dw, db = ctx.backend.backward(
                x, w, b, scale, lse, cp, rt_g, ctx.opts, need_x or need_s, need_w, need_b
            )
        full_dx = need_x and ctx.reduce_input_grad
        if full_dx:  # reduced in the compute dtype (fp32), not in the input's bf16
            dist.all_reduce(dx_raw, group=group)
        dscale = None
        if need_s:
            dscale = (dx_raw * x).sum().reshape(1)
            if not full_dx:  # <dX_raw, X> is linear in dX_raw: reduce the rank's scalar instead
                dist.all_reduce(dscale, group=group)
            dscale = dscale.reshape(scale.shape).to(scale.dtype)
        dx = (dx_raw * scale).to(x.dtype) if need_x else None
        dw = dw.to(w.dtype) if need_w else None
        db = db.to(b.dtype) if need_b else None
        return dx, dw, db, dscale, None, None, None, None, None


def _global_lse_lin(x, w, b, scale, rt, opts, backend, group, forward=None):
    """The shard's ``(lse_r, lin_r)`` combined over ranks into the global ``(lse, lin)``."""
    with torch.autocast(x.device.type, enabled=False):
        lse_r, lin_r = (forward or backend.forward)(x, w, b, scale, rt, opts)
    m = lse_r.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    sums = torch.stack([torch.exp(lse_r - m), lin_r])
    dist.all_reduce(sums, group=group)
    return m + torch.log(sums[0]), sums[1]


def shard_row_targets(
    target: torch.Tensor,
    *,
    target2: torch.Tensor | None,
    lam: torch.Tensor | None,
    class_weight: torch.Tensor | None,
    ignore_index: int | None,
    opts: XentOptions,
    class_offset: int,
    num_local: int,
    group: dist.ProcessGroup | None = None,
    dtype: torch.dtype = torch.float32,
) -> RowTargets:
    """The :class:`RowTargets` of this rank's classes with every per-row sum global.

    ``target`` (N,) holds global class indices (or is the (N, C_local) shard of the
    probabilities), ``class_weight`` is the (C_local,) shard of the weights and
    ``opts.num_classes`` the global C. Labels outside the shard put no mass here (``k = 0``);
    the smoothing mass ``eps / C`` uses the global C; ``lse_coef`` (whose smoothing term
    holds the sum of all class weights) and ``row_weight`` are summed over ranks (one
    all-reduce of 2N floats). The local parts come from ``build_row_targets`` itself: a
    label outside the shard is sent to one extra class of weight 0 past the shard's end; a
    kept label outside [0, C) makes its row NaN on every rank (no index past the shard's
    weights: the range check is deferred on CUDA and skipped while compiling).
    """
    local_weight = class_weight if class_weight is not None else torch.ones(num_local, device=target.device)
    local_weight = local_weight.to(dtype)
    if target.is_floating_point():
        rt = build_row_targets(
            target, target2=None, lam=None, class_weight=local_weight, ignore_index=None, opts=opts, dtype=dtype
        )
        dist.all_reduce(rt.lse_coef, group=group)
        return dataclasses.replace(rt, class_weight=class_weight.to(dtype) if class_weight is not None else None)

    C = opts.num_classes
    keep = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index

    def local(t):
        # in-shard labels -> [0, C_local); every other one -> C_local, the extra class of weight 0
        mine = (t >= class_offset) & (t < class_offset + num_local)
        return torch.where(mine, t - class_offset, num_local)

    def invalid(t):  # a kept label outside [0, C): NaN on every rank (the range check may be deferred)
        return None if t is None else keep & ((t < 0) | (t >= C))

    ignored = -1  # not a value `local` produces, unlike a user's ignore_index in [0, C)
    rt = build_row_targets(
        torch.where(keep, local(target), ignored),
        target2=None if target2 is None else local(target2),
        lam=lam,
        class_weight=torch.cat([local_weight, local_weight.new_zeros(1)]),
        ignore_index=ignored,
        opts=opts,
        dtype=dtype,
    )
    bad = invalid(target) if target2 is None else invalid(target) | invalid(target2)
    nan = float("nan")
    rt = dataclasses.replace(rt, k1=rt.k1.masked_fill(bad, nan), lse_coef=rt.lse_coef.masked_fill(bad, nan))
    sums = torch.stack([rt.lse_coef, rt.row_weight])
    dist.all_reduce(sums, group=group)

    def in_shard(y):  # the extra class index back to a real one; its k is 0
        return None if y is None else torch.where(y < num_local, y, torch.zeros_like(y))

    return dataclasses.replace(
        rt,
        y1=in_shard(rt.y1),
        y2=in_shard(rt.y2),
        class_weight=class_weight.to(dtype) if class_weight is not None else None,
        lse_coef=sums[0],
        row_weight=sums[1],
    )


@functional.on_input_device
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    class_offset: int,
    num_classes: int | None = None,
    group: dist.ProcessGroup | None = None,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    scale: float | torch.Tensor | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    target2: torch.Tensor | None = None,
    lam: float | torch.Tensor | None = None,
    return_lse: bool = False,
    reduce_input_grad: bool = True,
    impl: str = "auto",
    deterministic: bool = False,
):
    """Cross-entropy of ``softcap(scale * input @ W.T + b)`` with the classifier ``W`` (C, D)
    sharded by rows over the ranks of ``group``; the global loss on every rank.

    Equals :func:`fused_xent.linear_cross_entropy` on the whole classifier (the shards of
    every rank stacked in class order), in value and gradients, for every option. Every
    per-class tensor is this rank's shard of the classes ``[class_offset, class_offset +
    C_local)``: ``linear_weight``, ``linear_bias``, ``weight`` and, for probability targets,
    the columns of ``target``. Everything per row (``input``, class-index ``target``,
    ``target2``, ``lam``, ``scale``) is the same on every rank, and every rank must call
    with the same options and backpropagate the same upstream gradient (as when each rank
    calls ``backward`` on the loss it got).

    Communication per call: the forward all-reduces at most 2N floats for the row
    coefficients, then N (max) and 2N (sum) for lse and the target term; the backward all-reduces the (N, D)
    fp32 ``dX`` (or nothing but a scalar when ``reduce_input_grad=False``). Never N x C.

    Args:
        input: (..., D), the same on every rank.
        linear_weight: (C_local, D), this rank's rows of the classifier.
        target: (...) global class indices in [0, C) or ``ignore_index``, the same on every
            rank; or (..., C_local) float probabilities of this rank's classes.
        class_offset: the global index of this rank's first class.
        num_classes: the global C. None gathers every rank's ``(class_offset, C_local)``,
            checks that the shards tile [0, C) and syncs the host once; pass it in a
            training loop.
        group: the process group over which the classes are sharded (default: the world).
        linear_bias: (C_local,) or None.
        weight: (C_local,) this rank's per-class weights, or None.
        reduction, ignore_index, label_smoothing, scale, softcap, z_loss, target2, lam,
        return_lse: as in :func:`fused_xent.linear_cross_entropy` (``label_smoothing`` and
            ``weight``'s mean use the global C and every rank's weights).
        reduce_input_grad: True gives every rank the full gradient of ``input`` (one
            all-reduce); False gives this rank's partial sum over its classes, for a caller
            that reduces it itself (the sum over ranks is the full gradient). The gradient
            of a tensor ``scale`` is the full one either way.
        impl: "auto", "triton", "lean" or "chunked": the core backend run on the shard.
        deterministic: as in :func:`fused_xent.linear_cross_entropy`; the collectives add
            in a fixed order for a fixed group and backend.

    Returns:
        The global loss (fp32; fp64 for fp64 input), and the global per-row lse when
        ``return_lse``; identical on every rank.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "fused_xent.distributed.linear_cross_entropy needs an initialised process group "
            "(torch.distributed.init_process_group); for one process use fused_xent.linear_cross_entropy"
        )
    low = functional._autocast_dtype(input)
    if low is not None:  # as the core: F.linear's operands in the autocast dtype, fp32 accumulation
        with torch.autocast(input.device.type, enabled=False):
            return linear_cross_entropy(
                functional._autocast_operand(input, low),
                functional._autocast_operand(linear_weight, low),
                target,
                class_offset=class_offset,
                num_classes=num_classes,
                group=group,
                linear_bias=functional._autocast_operand(linear_bias, low),
                weight=weight,
                reduction=reduction,
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
                scale=scale,
                softcap=softcap,
                z_loss=z_loss,
                target2=target2,
                lam=lam,
                return_lse=return_lse,
                reduce_input_grad=reduce_input_grad,
                impl=impl,
                deterministic=deterministic,
            )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS} for a sharded classifier, got {impl!r}")
    functional._check_options(reduction, label_smoothing, z_loss, softcap, impl, return_lse)
    ignore_index = functional._check_ignore_index(ignore_index)
    impl = functional._deterministic_impl(impl, deterministic)
    x, w, b = functional._check_linear(input, linear_weight, linear_bias)
    num_local = w.shape[0]
    # the backward's collectives run where x or a tensor scale needs grad (a rank's own shard may be frozen)
    grad = torch.is_grad_enabled() and any(isinstance(p, torch.Tensor) and p.requires_grad for p in (x, scale))
    call = (  # what must agree across ranks, beside the shards: checked where the shards are gathered
        tuple(x.shape), str(x.dtype), str(w.dtype), b is not None, weight is not None, _describe_rows(target, True),
        _describe_rows(target2), _describe_rows(lam), _describe_rows(scale), reduction, ignore_index,
        float(label_smoothing), float(z_loss), softcap, return_lse, reduce_input_grad, impl, grad,
    )  # fmt: skip
    C = _global_classes(class_offset, num_local, num_classes, group, x.device, call)
    batch_shape = input.shape[:-1]
    dense = target.is_floating_point() if isinstance(target, torch.Tensor) else False
    if dense and target.requires_grad:
        raise ValueError("target (probabilities) must not require grad: the sharded loss does not differentiate it")
    t = functional._check_target(target, batch_shape, num_local, x.device, dense)
    t2, lam_rows = functional._check_mixup(target2, lam, target, batch_shape, dense, x.device)
    class_weight = functional._check_class_weight(weight, num_local, x.device)
    if not dense:
        functional._check_target_range(t, t2, lam_rows, C, ignore_index)
    wide = reference.compute_dtype(x.dtype)
    scale_t = functional._check_scale(scale, x.device, wide)

    opts = XentOptions(num_classes=C, label_smoothing=float(label_smoothing), z_loss=float(z_loss), softcap=softcap)
    rt = shard_row_targets(
        t,
        target2=t2,
        lam=None if lam_rows is None else lam_rows.to(wide),
        class_weight=class_weight,
        ignore_index=None if dense else ignore_index,
        opts=opts,
        class_offset=class_offset,
        num_local=num_local,
        group=group,
        dtype=wide,
    )
    backend = functional._choose(impl, x, False)
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in (x, w, b, scale_t)):
        rows, lse = _ShardedLinearCrossEntropy.apply(x, w, b, scale_t, rt, opts, backend, group, reduce_input_grad)
    else:
        lse, lin = _global_lse_lin(x, w, b, scale_t, rt, opts, backend, group, backend.forward_only)
        rows = row_loss(lse, lin, rt)

    if reduction == "none":
        loss = rows.reshape(batch_shape)
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / rt.row_weight.sum()
    return (loss, lse.reshape(batch_shape)) if return_lse else loss


def _describe_rows(value, is_target: bool = False):
    """A per-row argument as the ranks must agree on it: a tensor's shape and dtype (its values
    would cost a collective of their own; a probability target's last dim is the rank's own
    classes, also for an unbatched (C_local,) one), a number itself."""
    if isinstance(value, torch.Tensor):
        shape = value.shape[:-1] if is_target and value.is_floating_point() else value.shape
        return tuple(shape), str(value.dtype)
    return value


def _global_classes(class_offset, num_local, num_classes, group, device, call=()) -> int:
    """The global C, checked against this rank's shard (and every shard when not given). When not
    given, the same gather also checks that every rank made the same ``call`` (input shape and
    dtype, per-row arguments' shapes, options): a rank that differs would otherwise enter the
    collectives with other sizes (gloo aborts the process, NCCL may hang) or give a wrong loss."""
    if isinstance(class_offset, bool) or not isinstance(class_offset, numbers.Integral) or class_offset < 0:
        raise ValueError(f"class_offset must be an int >= 0, got {class_offset!r}")
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
            raise ValueError(f"num_classes must be an int or None, got {num_classes!r}")
        if class_offset + num_local > num_classes:
            raise ValueError(
                f"class_offset={class_offset} + C_local={num_local} (linear_weight's rows) exceeds "
                f"num_classes={num_classes}"
            )
        return int(num_classes)
    world = dist.get_world_size(group)
    fingerprint = zlib.crc32(repr(call).encode())
    mine = torch.tensor([class_offset, num_local, fingerprint], dtype=torch.int64, device=device)
    shards = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(shards, mine, group=group)
    gathered = [s.tolist() for s in shards]
    if len({g[2] for g in gathered}) > 1:
        differs = [r for r, g in enumerate(gathered) if g[2] != fingerprint]
        raise ValueError(
            f"rank {dist.get_rank(group)}'s call differs from that of rank(s) {differs} (input shape or dtype, the "
            f"per-row arguments' shapes, or the options): every rank must call with the same; this rank's: {call}"
        )
    table = sorted(tuple(g[:2]) for g in gathered)
    end = 0
    for offset, count in table:
        if offset != end:
            raise ValueError(
                f"the ranks' shards (class_offset, C_local) = {table} must tile [0, C) without gap or "
                f"overlap; class_offset={offset} should be {end}"
            )
        end += count
    return end


class _AllGather(torch.autograd.Function):
    """Every rank's tensor, in rank order; the backward sums over ranks the gradients of
    this rank's slice (a reduce-scatter; gloo has none, there an all-reduce and a slice)."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads):
        rank = dist.get_rank()
        if dist.get_backend() == dist.Backend.GLOO:
            total = torch.stack(grads)
            dist.all_reduce(total)
            return total[rank]
        out = torch.empty_like(grads[rank])
        dist.reduce_scatter(out, [g.contiguous() for g in grads])
        return out


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    local_loss: bool = False,
    gather_with_grad: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's (B, D) features concatenated in rank order, (world_size * B, D) each,
    with the semantics of ``open_clip.loss.gather_features`` (without horovod).

    ``gather_with_grad``: the gather is differentiable; the gradient of a rank's features is
    the sum over ranks of the gradient of its slice. Otherwise the gathered copies carry no
    gradient, and unless ``local_loss`` this rank's own slice is its input tensor, so the
    local features still get the gradient of their slice.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("gather_features needs an initialised process group (torch.distributed)")
    if gather_with_grad:
        return torch.cat(_AllGather.apply(image_features), dim=0), torch.cat(_AllGather.apply(text_features), dim=0)
    gathered = []
    for features in (image_features, text_features):
        parts = [torch.zeros_like(features) for _ in range(world_size)]
        dist.all_gather(parts, features)
        if not local_loss:
            parts[rank] = features
        gathered.append(torch.cat(parts, dim=0))
    return gathered[0], gathered[1]
