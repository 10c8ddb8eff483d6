"""``linear_cross_entropy``: argument checks, target preparation and dispatch.

The math is in ``fused_xent.formulation``; the backends (Triton kernels, chunked torch,
materialised reference) evaluate it. This module only checks arguments, flattens leading
dimensions, picks a backend and wires autograd.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import numbers
import operator
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor

from fused_xent import reference
from fused_xent.formulation import RowTargets, XentOptions, build_row_targets, row_loss
from fused_xent.kernels.row_loss import loss_grad_coefs, reduced_loss
from fused_xent.kernels.scaling import scale_all_
from fused_xent.kernels.targets import row_targets

IMPLS = ("auto", "lean", "fast", "filtered", "triton", "chunked", "reference")
REDUCTIONS = ("mean", "sum", "none")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def on_input_device(fn: Callable) -> Callable:
    """``fn`` run with the CUDA device of its first argument (a tensor) current.

    Triton launches on the current device and stream, and ``torch.cuda.Event`` records there,
    while torch's operators run on their tensors' own device. For tensors on another GPU than
    the current one (a model moved to ``cuda:1`` without ``torch.cuda.set_device``) the Triton
    kernels would run on the wrong device, unordered with the GEMMs beside them. A no-op on the
    CPU, on the current device and while compiling (the compiled graph guards its device).
    The backward needs no guard: autograd runs a CUDA node's backward on a thread whose current
    device is that node's."""

    @functools.wraps(fn)
    def run(first, *args, **kwargs):
        if isinstance(first, torch.Tensor) and first.is_cuda and not torch.compiler.is_compiling():
            index = first.get_device()
            if index != torch.cuda.current_device():
                with torch.cuda.device(index):
                    return fn(first, *args, **kwargs)
        return fn(first, *args, **kwargs)

    return run


@dataclass(frozen=True)
class Backend:
    """A pair of functions with the signatures of the Triton launchers."""

    name: str
    forward: Callable
    backward: Callable
    forward_only: Callable | None = None  # a leaner forward for calls that need no gradient


def _triton_backend() -> Backend:
    from fused_xent.kernels.linear_xent_backward import linear_xent_backward
    from fused_xent.kernels.linear_xent_forward import linear_xent_forward

    return Backend("triton", linear_xent_forward, linear_xent_backward)


CHUNKED = Backend("chunked", reference.chunked_forward, reference.chunked_backward)


def _class_chunked_backend() -> Backend:
    from fused_xent.kernels.class_chunked import class_chunked_backward, class_chunked_forward
    from fused_xent.kernels.linear_xent_forward import linear_xent_forward

    # training recomputes chunks through cuBLAS; a forward without grad streams with no logits at all
    return Backend("class_chunked", class_chunked_forward, class_chunked_backward, linear_xent_forward)


def _filtered_backend() -> Backend:
    from fused_xent.kernels.class_chunked import class_chunked_backward_filtered, class_chunked_forward_bounded
    from fused_xent.kernels.linear_xent_forward import linear_xent_forward

    # the forward also returns a per-class bound that lets the backward skip classes unseen
    return Backend("filtered", class_chunked_forward_bounded, class_chunked_backward_filtered, linear_xent_forward)


#: Every backend ``_choose`` can return, by name: the custom ops below receive the name.
_BACKENDS = {
    "chunked": lambda: CHUNKED,
    "triton": _triton_backend,
    "class_chunked": _class_chunked_backend,
    "filtered": _filtered_backend,
}


# The backends run inside two custom ops, so that torch.compile(fullgraph=True) sees one
# opaque node per pass (shapes from the fake implementations) instead of Triton launches
# and Python loops. A dataclass cannot cross an op boundary: RowTargets travels as the list
# of its fields, XentOptions as its scalars, the backend as its name.


_TARGET_FIELDS = tuple(field.name for field in dataclasses.fields(RowTargets))


def _targets_args(rt: RowTargets) -> list[torch.Tensor | None]:
    return [getattr(rt, name) for name in _TARGET_FIELDS]


def _options_args(opts: XentOptions) -> tuple:
    return opts.num_classes, opts.label_smoothing, opts.z_loss, opts.softcap, opts.chunk_bytes, opts.unit_scale


def _rows_like(x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0],), dtype=reference.compute_dtype(x.dtype))


def _forward_impl(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    scale: torch.Tensor,
    targets: list[torch.Tensor | None],
    num_classes: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_bytes: int | None,
    unit_scale: bool,
    backend: str,
    need_grad: bool,
    spare_bytes: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``backend.forward`` on flat arguments (its ``forward_only`` when no backward follows):
    ``(lse, lin, aux)``, lse and lin (N,) in the compute dtype; ``aux`` what the backend's
    forward hands its backward besides lse (filtered's per-class bound, ``_aux_size``), else
    empty. ``spare_bytes``: the bytes the backward will allocate for the gradients before its
    chunks run (``_spare_bytes``), which lean's and filtered's training forwards add to their
    logit chunks (filtered's after its first)."""
    aux = x.new_empty((0,), dtype=torch.float32)
    if x.shape[0] == 0:
        return _rows_like(x), _rows_like(x), aux
    rt, opts = RowTargets(*targets), XentOptions(num_classes, label_smoothing, z_loss, softcap, chunk_bytes, unit_scale)
    chosen = _BACKENDS[backend]()
    forward = chosen.forward if need_grad or chosen.forward_only is None else chosen.forward_only
    if need_grad and spare_bytes and backend in ("class_chunked", "filtered"):
        from fused_xent.kernels.class_chunked import forward_chunk_bytes

        forward = functools.partial(forward, chunk_bytes=forward_chunk_bytes(chunk_bytes, spare_bytes))
    with torch.autocast(x.device.type, enabled=False):  # the backends choose their own precision
        lse, lin, *rest = forward(x, w, b, scale, rt, opts)
    return lse, lin, rest[0] if rest else aux


def _spare_bytes(x: torch.Tensor, w: torch.Tensor, needs: list[bool]) -> int:
    """The bytes lean's and filtered's backwards allocate before their chunks run: dW (in w's
    dtype) and the fp32 dX accumulator, for the gradients ``needs`` (x, w, b, scale) asks. The
    forward comes before them and may hold them as logits: fewer, wider chunks, the call's peak
    unchanged."""
    need_x, need_w, _, need_s = needs
    return (w.numel() * w.element_size() if need_w else 0) + (4 * x.numel() if need_x or need_s else 0)


def _aux_size(x, w, targets, backend: str, need_grad: bool) -> int:
    """The length of ``_forward_impl``'s ``aux``: filtered's training forward bounds every
    class unless the targets are dense."""
    dense = targets[_TARGET_FIELDS.index("dense")] is not None
    return w.shape[0] if backend == "filtered" and need_grad and x.shape[0] and not dense else 0


_forward_op = torch.library.custom_op("fused_xent::linear_xent_forward", _forward_impl, mutates_args=())


@_forward_op.register_fake
def _(x, w, b, scale, targets, *options_backend_need_grad_spare):
    *_, backend, need_grad, _spare = options_backend_need_grad_spare
    aux = x.new_empty((_aux_size(x, w, targets, backend, need_grad),), dtype=torch.float32)
    return _rows_like(x), _rows_like(x), aux


def _backward_impl(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    scale: torch.Tensor,
    lse: torch.Tensor,
    cp: torch.Tensor,
    aux: torch.Tensor,
    targets: list[torch.Tensor | None],
    num_classes: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_bytes: int | None,
    unit_scale: bool,
    backend: str,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``backend.backward`` on flat arguments (``aux`` from the forward): ``(dx_raw, dw, db)``,
    dx_raw and db in the compute dtype, dw in w's dtype (the class-chunked backends round it
    there once; the others return fp32, narrowed here), an empty tensor for each one not
    needed. The dtypes are the fake implementation's: compiled code reads these buffers as
    the fake declares them."""
    rt, opts = RowTargets(*targets), XentOptions(num_classes, label_smoothing, z_loss, softcap, chunk_bytes, unit_scale)
    extra = {"log_p_max": aux} if aux.numel() else {}
    with torch.autocast(x.device.type, enabled=False):
        grads = _BACKENDS[backend]().backward(x, w, b, scale, lse, cp, rt, opts, need_dx, need_dw, need_db, **extra)
    wide = reference.compute_dtype(x.dtype)
    return tuple(
        (g if g.dtype == dtype else g.to(dtype)) if g is not None else x.new_empty((0,), dtype=dtype)
        for g, dtype in zip(grads, (wide, w.dtype, wide), strict=True)
    )


_backward_op = torch.library.custom_op("fused_xent::linear_xent_backward", _backward_impl, mutates_args=())


@_backward_op.register_fake
def _(
    x, w, b, scale, lse, cp, aux, targets, num_classes, label_smoothing, z_loss, softcap, chunk_bytes, unit_scale,
    backend, need_dx, need_dw, need_db,
):  # fmt: skip
    (N, D), C = x.shape, w.shape[0]
    wide = reference.compute_dtype(x.dtype)

    def out(needed: bool, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return x.new_empty(shape if needed else (0,), dtype=dtype)

    return out(need_dx, wide, N, D), out(need_dw, w.dtype, C, D), out(need_db, wide, C)


def _setup_forward(ctx, inputs, output):
    x, w, b, scale, targets, *options, backend, _, _ = inputs
    ctx.save_for_backward(x, w, b, scale, output[0], output[2], *targets)
    ctx.options, ctx.backend = options, backend


def _forward_op_backward(ctx, g_lse, g_lin, _g_aux=None, backward=_backward_op):
    """``dz = g_lse * p + g_lin * tt``: the kernels subtract ``tt`` scaled by ``-g_lin``. The
    loss rows are formed from (lse, lin) outside the op, so autograd supplies both."""
    saved = ctx.saved_tensors  # once: non-reentrant checkpointing and saved-tensor hooks unpack per read
    rt_g = RowTargets(*saved[6:]).scaled(-g_lin)
    # no gradient for: the targets, the options, the backend, need_grad, spare_bytes
    return *_input_grads(ctx, saved, g_lse.contiguous(), rt_g, backward), *[None] * 10


def _input_grads(ctx, saved: tuple, cp: torch.Tensor, rt_g: RowTargets, backward) -> tuple:
    """``(dx, dw, db, dscale)`` (None where not needed) from the backend's backward, for the
    per-row coefficient ``cp`` on ``p`` and the targets ``rt_g`` scaled as it subtracts them;
    ``saved`` is ``ctx.saved_tensors``, read once by the caller."""
    x, w, b, scale, lse, aux = saved[:6]
    need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
    dx_raw, dw, db = backward(
        x, w, b, scale, lse, cp, aux, _targets_args(rt_g), *ctx.options, ctx.backend, need_x or need_s, need_w, need_b,
    )  # fmt: skip
    dscale = (dx_raw * x).sum().reshape(scale.shape).to(scale.dtype) if need_s else None
    if need_x and not ctx.options[-1]:  # a scale that may not be 1 (options end with unit_scale)
        # in place (no second fp32 N x D buffer), unless a graph of the backward is being
        # built ("chunked" / "reference" under create_graph): dscale's product saved dx_raw
        dx_raw = dx_raw * scale if torch.is_grad_enabled() else dx_raw.mul_(scale)
    dx = dx_raw.to(x.dtype) if need_x else None
    dw = dw if need_w else None  # already in w's dtype (_backward_impl)
    db = db.to(b.dtype) if need_b else None
    return dx, dw, db, dscale


_forward_op.register_autograd(_forward_op_backward, setup_context=_setup_forward)


class _EagerLinearXent(torch.autograd.Function):
    """The same two passes outside the dispatcher. Eager calls take this path: the custom-op
    bookkeeping cost about 1 ms per call on the H100 host (benchmarks/profile_host.py), more
    than the whole GPU work of a ViT-21k head; torch.compile traces the custom ops instead."""

    @staticmethod
    def forward(ctx, x, w, b, scale, targets, *args):
        inputs = (x, w, b, scale, targets, *args)  # the options, the backend's name, need_grad, spare_bytes
        output = _forward_impl(*inputs)
        _setup_forward(ctx, inputs, output)
        ctx.mark_non_differentiable(output[2])
        return output

    @staticmethod
    def backward(ctx, g_lse, g_lin, _g_aux):
        refuse_create_graph(ctx.backend)
        return _forward_op_backward(ctx, g_lse, g_lin, backward=_backward_impl)


class _EagerLinearXentReduced(torch.autograd.Function):
    """``_EagerLinearXent`` with the reduction ("mean" or "sum") inside: the loss from one
    launch after the backend's forward and, in the backward, the per-row coefficients from
    one launch (``kernels.row_loss``), where the row loss, its reduction and their autograd
    nodes took ~26 small launches (host time, more than a small head's GPU time)."""

    @staticmethod
    def forward(ctx, x, w, b, scale, targets, *args):
        *inputs, reduction = x, w, b, scale, targets, *args  # the options, the backend, need_grad, spare_bytes
        output = _forward_impl(*inputs)
        loss, ctx.divisor = reduced_loss(output[0], output[1], RowTargets(*targets), reduction)
        _setup_forward(ctx, inputs, output)
        ctx.reduction = reduction
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        refuse_create_graph(ctx.backend)
        return *_reduced_input_grads(ctx, g_loss, ctx.divisor), *[None] * 11  # and the reduction


def _reduced_input_grads(ctx, g_loss: torch.Tensor, divisor: torch.Tensor | None) -> tuple:
    """``_input_grads`` of a reduced loss ("mean" or "sum", ``ctx.reduction``) from the saved
    ``(x, w, b, scale, lse, aux, *targets)``; ``divisor`` the mean's (``reduced_loss``'s second
    output), None to take it from the row targets."""
    saved = ctx.saved_tensors  # once (see _forward_op_backward)
    lse, rt = saved[4], RowTargets(*saved[6:])
    if divisor is None:
        divisor = rt.row_weight.sum().reshape(1) if ctx.reduction == "mean" else torch.ones_like(lse[:1])
    cp, rt_g = loss_grad_coefs(g_loss, divisor, lse, rt, ctx.reduction)
    return _input_grads(ctx, saved, cp, rt_g, _backward_impl)


# The fast strategy forms the gradients during the forward, for the upstream gradient a
# reduced loss ("mean" or "sum") sends to each row; the backward only multiplies them by the
# scalar upstream gradient. The same two layers as above: a custom op while compiling, an
# autograd.Function in eager mode.


def _fast_impl(
    x: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    scale: torch.Tensor,
    targets: list[torch.Tensor | None],
    num_classes: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_bytes: int | None,
    unit_scale: bool,
    reduction: str,
    rows: int,
    need_dx: bool,
    need_dw: bool,
    need_db: bool,
    need_ds: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, lse, dx, dw, db, dscale)``: the reduced loss, the per-row lse and the
    gradients of the loss (empty tensors for those not needed), each in its input's dtype."""
    from fused_xent.kernels.row_chunked import row_chunked_loss_grads

    rt, opts = RowTargets(*targets), XentOptions(num_classes, label_smoothing, z_loss, softcap, chunk_bytes, unit_scale)
    denominator = rt.row_weight.sum() if reduction == "mean" else None
    g = torch.reciprocal(denominator.reshape(1)) if reduction == "mean" else torch.ones(1, device=x.device)
    with torch.autocast(x.device.type, enabled=False):
        lse, row_losses, dx, dw, db, dscale = row_chunked_loss_grads(
            x, w, b, scale, rt, opts, g, rows, need_dx, need_dw, need_db, need_ds
        )
    loss = row_losses.sum() if reduction == "sum" else row_losses.sum() / denominator

    def out(grad: torch.Tensor | None) -> torch.Tensor:  # a fresh tensor each: op outputs may not alias
        return grad if grad is not None else x.new_empty((0,))

    return loss, lse, out(dx), out(dw), out(None if db is None else db.to(b.dtype)), out(dscale)


_fast_op = torch.library.custom_op("fused_xent::linear_xent_fast", _fast_impl, mutates_args=())


@_fast_op.register_fake
def _(
    x, w, b, scale, targets, num_classes, label_smoothing, z_loss, softcap, chunk_bytes, unit_scale, reduction, rows,
    *needs,
):  # fmt: skip
    need_dx, need_dw, need_db, need_ds = needs

    def out(needed: bool, like: torch.Tensor | None, *shape: int) -> torch.Tensor:
        return (like if needed else x).new_empty(shape if needed else (0,))

    loss = x.new_empty((), dtype=reference.compute_dtype(x.dtype))
    grads = out(need_dx, x, *x.shape), out(need_dw, w, *w.shape), out(need_db, b, w.shape[0]), out(need_ds, scale, 1)
    return loss, _rows_like(x), *grads


def _fast_setup(ctx, inputs, output):
    ctx.grads = output[2:]


def _fast_backward(ctx, g_loss, g_lse, *_):
    """Each stored gradient (dx, dw, db, dscale) times the upstream gradient of the loss (an
    empty one too: dx of an empty batch is needed, with no elements)."""
    grads = zip(ctx.grads, ctx.needs_input_grad[:4], strict=True)
    return *(g * g_loss if needed else None for g, needed in grads), *[None] * 13


_fast_op.register_autograd(_fast_backward, setup_context=_fast_setup)


class _EagerFast(torch.autograd.Function):
    """The fast strategy outside the dispatcher (see ``_EagerLinearXent``); its backward
    scales the stored gradients in place, with no pass over them when the upstream gradient
    is 1 (``kernels.scaling``), and hands them to autograd without a copy. A second backward
    through the same loss (``retain_graph=True``) finds them gone and runs the exact lean
    backward from the saved inputs instead (as ``_EagerLinearXentReduced``'s)."""

    @staticmethod
    def forward(ctx, x, w, b, scale, targets, *args):
        loss, lse, dx, dw, db, dscale = _fast_impl(x, w, b, scale, targets, *args)
        ctx.grads = (dx, dw, db, dscale)
        # for a second backward: references to the inputs (no copies), the lse and the row targets
        ctx.save_for_backward(x, w, b, scale, lse, x.new_empty((0,), dtype=torch.float32), *targets)
        ctx.options, ctx.backend, ctx.reduction = args[:6], "class_chunked", args[6]
        ctx.mark_non_differentiable(lse)
        # the first backward reads no saved tensor, so autograd's check of in-place changes
        # would not run: their versions, through weak references (unpacking the saved tensors only
        # to check would undo an offloading hook's work). Under saved-tensor hooks autograd checks
        # nothing (it uses what was packed), and neither does this
        hooked = torch._C._autograd._top_saved_tensors_default_hooks(False) is not None
        inputs = () if hooked else (t for t in (x, w, b, scale) if t is not None and not t.is_inference())
        ctx.versions = [(weakref.ref(t), t._version) for t in inputs]
        return loss, lse

    @staticmethod
    def backward(ctx, g_loss, _):
        refuse_create_graph("fast")
        if ctx.grads is None:  # handed over in the first backward: recompute, the lean way
            return *_reduced_input_grads(ctx, g_loss, None), *[None] * 13
        for ref, version in ctx.versions:
            t = ref()
            if t is not None and t._version != version:
                raise RuntimeError(
                    "one of the variables needed for gradient computation has been modified by an inplace "
                    f"operation: a {tuple(t.shape)} input of fused_xent's loss (impl 'fast') is at version "
                    f"{t._version}, expected version {version}"
                )
        grads = tuple(g if needed else None for g, needed in zip(ctx.grads, ctx.needs_input_grad[:4], strict=True))
        scale_all_([g for g in grads if g is not None and g.numel()], g_loss)
        ctx.grads = None  # autograd takes the tensors over as .grad, without a copy
        return *grads, *[None] * 13


def refuse_create_graph(backend: str) -> None:
    """Raise inside a backward run with ``create_graph=True`` (grad mode on: double backward,
    gradient penalties) unless ``backend`` is the plain-torch "chunked" one. The kernels' backward
    is not differentiable itself: its gradients would come back without a graph, and whatever is
    differentiated through them would silently get nothing."""
    if torch.is_grad_enabled() and backend != "chunked":
        raise RuntimeError(
            f"the backward of impl/backend {backend!r} runs fused kernels and is not differentiable itself; "
            "a backward with create_graph=True (double backward, gradient penalties) needs impl='chunked' "
            "(CPU or CUDA, plain torch) or impl='reference'"
        )


def _fast_loss(x, w, b, scale, *args) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse)`` of the fast strategy, through the custom op while compiling."""
    if torch.compiler.is_compiling():
        loss, lse, *_ = _fast_op(x, w, b, scale, *args)
        return loss, lse
    return _EagerFast.apply(x, w, b, scale, *args)


def _reduce(rows: torch.Tensor, rt: RowTargets, reduction: str) -> torch.Tensor:
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / rt.row_weight.sum()


def _linear_xent_rows(*args):
    """``(lse, lin)`` per row through the custom op while compiling, directly otherwise."""
    if torch.compiler.is_compiling():
        return _forward_op(*args)[:2]
    return _EagerLinearXent.apply(*args)[:2]


@on_input_device
def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    options=None,
    scale: float | torch.Tensor | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    target2: torch.Tensor | None = None,
    lam: float | torch.Tensor | None = None,
    return_lse: bool = False,
    impl: str = "auto",
    deterministic: bool = False,
    memory_budget: int | None = None,
):
    """Cross-entropy of ``softcap(scale * input @ linear_weight.T + linear_bias)`` without
    materialising the logits.

    Equals ``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target,
    weight=weight, reduction=reduction, ignore_index=ignore_index,
    label_smoothing=label_smoothing)`` in value and gradients, and extends it:

    Args:
        input: (..., D) float32 / float16 / bfloat16 (float64 on the torch paths).
        linear_weight: (C, D), same dtype and device as ``input``.
        target: (...) integer class indices in [0, C) or ``ignore_index``, or (..., C)
            float class probabilities.
        linear_bias: (C,) or None.
        weight: (C,) per-class rescaling weight, as in ``F.cross_entropy``.
        reduction: "mean" | "sum" | "none" (then the loss has the shape of ``input[..., 0]``).
        ignore_index: class index whose rows are skipped; None means -100, as in torch's
            ``linear_cross_entropy``.
        label_smoothing: eps in [0, 1], mixing the target with the uniform distribution.
        options: None or a ``torch.nn.LinearCrossEntropyOptions``, taken so that a call of
            ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13) runs unchanged. Its
            fields choose torch's own row chunks; fused_xent chooses its strategy from ``impl``
            and ``memory_budget``, so they change neither the result nor the memory bound.
        scale: float or 1-element tensor (learnable, gets a gradient) multiplying the logits.
        softcap: logits become ``softcap * tanh(logits / softcap)`` (Gemma 2).
        z_loss: adds ``z_loss * lse**2`` per kept row (PaLM).
        target2, lam: mixup / cutmix as a second label per row and its weight
            ``1 - lam``; ``lam`` a float or a tensor of ``target``'s shape.
        return_lse: also return the per-row log-sum-exp (differentiable, fp32).
        impl: "auto" picks "fast" on CUDA when its workspace fits in ``memory_budget`` and the
            input is not float16, "lean" otherwise, and "chunked" on CPU. "lean": class chunks through cuBLAS with fused
            Triton kernels between them (exact, memory: one chunk beyond the gradients, 4
            GEMMs). "fast": row chunks holding every class, the gradients formed during the
            forward (exact, 3 GEMMs; needs reduction "mean" or "sum" without return_lse; in
            float16 the gradients are formed at the unscaled size, before the upstream gradient
            such as a GradScaler's loss scale is known, so their small entries flush: use
            "lean" under a GradScaler;
            memory: one chunk of logits plus half of dW in fp32). "filtered": lean, skipping
            the classes whose gradient stays below the dtype's resolution (eps / 32) on every
            row (opt-in, not exact); the forward bounds every class's probability over the
            rows, so the backward recomputes only the classes it keeps (with a bias gradient
            it recomputes every chunk and flags classes on the exact rule; inside a captured
            CUDA graph, where its counts cannot reach the host, it runs exact). "triton":
            all-Triton streaming kernels (atomics in the backward); "chunked": row chunks in
            plain torch; "reference": materialises the logits. All but "chunked" and
            "reference" also run on CPU tensors under ``TRITON_INTERPRET=1``.
        deterministic: bitwise-reproducible loss and gradients; refuses impl="triton" (its
            backward adds tiles with atomics). Every other impl is deterministic anyway
            (no atomics; "filtered"'s class flags and bounds are order-free maxima). Also on under
            ``torch.use_deterministic_algorithms(True)``.
        memory_budget: bytes of device memory beyond the gradients "auto" may use to run
            "fast" (default: ``set_memory_budget``'s, a sixteenth of the device's memory).
            A budget set by the user (here or by ``set_memory_budget``) also sizes the logit
            chunk of "lean" and "filtered": what it leaves beside their fp32 dX (wider chunks,
            fewer launches; without one they hold a 64 MiB chunk). Their training forwards,
            which run before the backward allocates dW and the fp32 dX, add those bytes to
            their chunks (filtered's after its first): the call's peak stays the backward's.

    Under ``torch.autocast`` ``input``, ``linear_weight`` and ``linear_bias`` are cast to the
    autocast dtype (as ``F.linear``'s operands are); the accumulation and the loss stay fp32.
    Out-of-range class indices raise a ValueError, except while compiling or capturing a CUDA
    graph (the check needs a host sync): there their rows' loss is NaN.

    Autograd: a second backward through the loss (``retain_graph=True``) works on every impl
    ("fast", which hands the gradients it formed in the forward to autograd in the first,
    recomputes them the "lean" way in a second). A backward with ``create_graph=True``
    (double backward, gradient penalties) needs "chunked" or "reference": the fused backends raise
    a RuntimeError there rather than return gradients without a graph.

    Returns:
        The loss (fp32; fp64 for fp64 input), and the lse when ``return_lse``.
    """
    _check_torch_options(options)
    low = _autocast_dtype(input)
    if low is not None:
        with torch.autocast(input.device.type, enabled=False):
            return linear_cross_entropy(
                _autocast_operand(input, low),
                _autocast_operand(linear_weight, low),
                target,
                linear_bias=_autocast_operand(linear_bias, low),
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
                impl=impl,
                deterministic=deterministic,
                memory_budget=memory_budget,
            )
    _check_options(reduction, label_smoothing, z_loss, softcap, impl, return_lse)
    ignore_index = _check_ignore_index(ignore_index)
    memory_budget = _check_budget(memory_budget)
    impl = _deterministic_impl(impl, deterministic)
    x, w, b = _check_linear(input, linear_weight, linear_bias)
    C, D = w.shape
    if D == 0:  # no features: the logits are the bias, nothing to fuse (and no kernel for empty rows)
        impl = "reference"
    if _without_data(x, w, b, target, scale, target2, lam, weight):
        if impl not in ("auto", "reference"):
            raise ValueError(
                f"impl={impl!r} cannot run under a torch.func transform (grad, vjp, jacrev, vmap) or on meta / "
                "fake tensors: its kernels need the tensors' storage; use impl='auto' or 'reference' there"
            )
        impl = "reference"  # plain torch operations, which the transforms and the meta device go through
    batch_shape = input.shape[:-1]
    dense = target.is_floating_point() if isinstance(target, torch.Tensor) else False
    if dense and ignore_index not in (None, -100):  # torch refuses it too; -100 is the default of both
        raise ValueError(
            f"ignore_index={ignore_index} does not apply to class-probability targets (a float target), "
            "as in torch.nn.functional.cross_entropy; leave it at its default"
        )
    t = _check_target(target, batch_shape, C, x.device, dense)
    t2, lam_rows = _check_mixup(target2, lam, target, batch_shape, dense, x.device)
    class_weight = _check_class_weight(weight, C, x.device)
    wide = reference.compute_dtype(x.dtype)
    opts = XentOptions(
        num_classes=C, label_smoothing=float(label_smoothing), z_loss=float(z_loss), softcap=softcap,
        unit_scale=scale is None,
    )  # fmt: skip
    backend = _choose(impl, x, dense and target.requires_grad)
    lam_w = None if lam_rows is None else lam_rows.to(wide)
    weight_w = None if class_weight is None else class_weight.to(wide)
    if not dense and backend is not None and _eager_triton(backend):
        # the Triton backends: every per-row coefficient and the label range in one launch
        rt, summary = row_targets(t, target2=t2, lam=lam_w, class_weight=weight_w, ignore_index=ignore_index, opts=opts)
        _report_target_range(summary, C, ignore_index)
    else:
        if not dense:
            _check_target_range(t, t2, lam_rows, C, ignore_index)
        rt = build_row_targets(
            t, target2=t2, lam=lam_w, class_weight=weight_w, ignore_index=None if dense else ignore_index, opts=opts,
            dtype=wide,
        )  # fmt: skip
    scale_t = _check_scale(scale, x.device, wide)
    if backend is not None and backend.name in ("class_chunked", "filtered"):
        chunk_bytes = _lean_chunk_bytes(memory_budget, x, scale is None, b is not None and b.requires_grad)
        opts = dataclasses.replace(opts, chunk_bytes=chunk_bytes)
    needs = [torch.is_grad_enabled() and p is not None and p.requires_grad for p in (x, w, b, scale_t)]
    fast_rows = _fast_rows(impl, backend, x, w, reduction, return_lse, any(needs), memory_budget, scale is None)
    if fast_rows is not None:
        loss, lse = _fast_loss(x, w, b, scale_t, _targets_args(rt), *_options_args(opts), reduction, fast_rows, *needs)
        return loss
    if backend is None:
        rows, lse = reference.reference_rows(x, w, b, scale_t, rt, opts)
    else:
        spare = _spare_bytes(x, w, needs) if backend.name in ("class_chunked", "filtered") else 0
        args = _targets_args(rt), *_options_args(opts), backend.name, any(needs), spare
        if reduction != "none" and not return_lse and _eager_triton(backend) and x.dtype != torch.float64:
            return _EagerLinearXentReduced.apply(x, w, b, scale_t, *args, reduction)
        lse, lin = _linear_xent_rows(x, w, b, scale_t, *args)
        rows = row_loss(lse, lin, rt)
    loss = rows.reshape(batch_shape) if reduction == "none" else _reduce(rows, rt, reduction)
    return (loss, lse.reshape(batch_shape)) if return_lse else loss


def _eager_triton(backend: Backend) -> bool:
    """Whether the call launches Triton kernels outside a compiled graph: it then forms its row
    targets (``kernels.targets``) and, for fp32 rows, its reduced loss (``kernels.row_loss``,
    ``_EagerLinearXentReduced``) in one launch each; compiled code keeps the torch operations,
    which inductor fuses."""
    return backend.name != "chunked" and not torch.compiler.is_compiling()


def _choose(impl: str, x: torch.Tensor, target_needs_grad: bool) -> Backend | None:
    """The backend for ``impl``; None means the materialised reference. "fast" answers
    lean's backend: ``_fast_rows`` decides whether the call can take the fast path."""
    if impl == "reference" or target_needs_grad:
        return None  # only the reference differentiates probability targets
    if impl == "chunked":
        return CHUNKED
    if impl in ("triton", "lean", "fast", "filtered"):
        if x.dtype == torch.float64:
            raise ValueError(f"impl={impl!r} supports float32, float16 and bfloat16 input, got float64")
        if not x.is_cuda:
            from fused_xent.kernels.config import interpreting

            if not interpreting():
                raise ValueError(f"impl={impl!r} on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
        if impl == "triton":
            return _triton_backend()
        return _filtered_backend() if impl == "filtered" else _class_chunked_backend()
    if x.is_cuda and x.dtype != torch.float64:
        return _class_chunked_backend()
    return CHUNKED


#: Bytes "auto" may hold beyond the gradients (None: a sixteenth of the device's memory).
_MEMORY_BUDGET: int | None = None


def set_memory_budget(nbytes: int | None) -> None:
    """Set the default ``memory_budget`` of every call (None restores a sixteenth of the
    device's memory)."""
    global _MEMORY_BUDGET
    _MEMORY_BUDGET = _check_budget(nbytes)


def _check_budget(nbytes) -> int | None:
    if nbytes is not None and (not isinstance(nbytes, numbers.Integral) or isinstance(nbytes, bool) or nbytes < 0):
        raise ValueError(f"memory_budget must be None or a number of bytes >= 0, got {_describe(nbytes)}")
    return None if nbytes is None else int(nbytes)


def _budget(memory_budget: int | None, device: torch.device) -> int:
    if memory_budget is not None:
        return memory_budget
    if _MEMORY_BUDGET is not None:
        return _MEMORY_BUDGET
    if device.type != "cuda":
        return 2**30
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_MEMORY:
        _DEVICE_MEMORY[index] = torch.cuda.get_device_properties(index).total_memory
    return _DEVICE_MEMORY[index] // 16


def _lean_chunk_bytes(memory_budget: int | None, x: torch.Tensor, unit_scale: bool, bias_grad: bool) -> int | None:
    """The class-chunked backends' logit chunk under a memory budget set by the user (the
    call's, else ``set_memory_budget``'s); None without one (their default chunk)."""
    budget = memory_budget if memory_budget is not None else _MEMORY_BUDGET
    if budget is None:
        return None
    from fused_xent.kernels.class_chunked import budget_chunk_bytes

    N, D = x.shape
    return budget_chunk_bytes(budget, N, D, x.dtype, unit_scale, bias_grad)


#: Total memory per CUDA device index, read once.
_DEVICE_MEMORY: dict[int, int] = {}


def _fast_rows(impl, backend, x, w, reduction, return_lse, need_grad, memory_budget, unit_scale=True) -> int | None:
    """Rows per chunk when this call takes the fast strategy, None when it does not. "auto"
    takes it when its workspace fits in the memory budget, "fast" whenever it can.
    ``unit_scale``: no scale, so dX leaves its GEMMs in x's dtype (no fp32 dX to hold)."""
    if impl not in ("auto", "fast") or backend is None or backend.name != "class_chunked" or not need_grad:
        return None
    if reduction == "none" or return_lse:
        if impl == "fast":
            raise ValueError(
                "impl='fast' forms the gradients during the forward and needs reduction='mean' or 'sum' "
                f"without return_lse (got reduction={reduction!r}, return_lse={return_lse}); use impl='lean'"
            )
        return None
    if x.dtype == torch.float16 and impl == "auto":
        # fast forms the gradients here, before the upstream gradient (a GradScaler's loss scale)
        # is known: at the unscaled size (1 / N for the mean) fp16 flushes their small entries
        return None
    from fused_xent.kernels.row_chunked import MIN_FAST_ROWS, fast_chunk_rows

    (N, D), C = x.shape, w.shape[0]
    rows = fast_chunk_rows(N, C, D, x.dtype, _budget(memory_budget, x.device), raw_dx=not unit_scale)
    if rows is None and impl == "fast":
        return min(N, MIN_FAST_ROWS)
    return rows


def _autocast_dtype(input) -> torch.dtype | None:
    """The dtype autocast gives ``F.linear``'s operands on ``input``'s device; None when off
    (and on the meta device, which autocast's query refuses)."""
    if not isinstance(input, torch.Tensor) or input.device.type == "meta":
        return None
    if not torch.is_autocast_enabled(input.device.type):
        return None
    return torch.get_autocast_dtype(input.device.type)


def _autocast_operand(t, dtype: torch.dtype):
    """As autocast treats ``F.linear``'s operands: float32 / float16 / bfloat16 go to ``dtype``."""
    if isinstance(t, torch.Tensor) and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return t.to(dtype)
    return t


def _without_data(*values) -> bool:
    """Whether a tensor among ``values`` has no storage a kernel or the host could read: on the
    meta device, a fake tensor (shape propagation outside compiling: FLOP counters, memory
    estimators), or wrapped by a torch.func transform (grad, vjp, jacrev, vmap). Not while
    compiling, where the custom ops' fake implementations take such tensors."""
    if torch.compiler.is_compiling():
        return False
    for t in values:
        if isinstance(t, torch.Tensor) and (
            t.is_meta or isinstance(t, FakeTensor) or torch._C._functorch.is_functorch_wrapped_tensor(t)
        ):
            return True
    return False


def _deterministic_impl(impl: str, deterministic: bool, read_global: bool = True) -> str:
    """``impl``, refused when determinism is asked for and it is the atomic "triton" path;
    ``read_global``: torch's global flag asks too (the call's; a module built earlier
    checks its own flag only, since the global one may change before the call)."""
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {_describe(deterministic)}")
    if not (deterministic or (read_global and torch.are_deterministic_algorithms_enabled())):
        return impl
    if impl == "triton":
        raise ValueError(
            "impl='triton' is not deterministic (its backward adds tiles with atomics); with "
            "deterministic=True or torch.use_deterministic_algorithms(True) use impl='auto', 'chunked' or 'reference'"
        )
    return impl  # "auto" is deterministic: lean on CUDA (no atomics), chunked torch on CPU


def _check_options(reduction, label_smoothing, z_loss, softcap, impl, return_lse) -> None:
    if not isinstance(return_lse, bool):  # as deterministic: a truthy string is not a choice
        raise TypeError(f"return_lse must be a bool, got {_describe(return_lse)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, numbers.Real) or not 0.0 <= z_loss < float("inf"):
        raise ValueError(f"z_loss must be a finite float >= 0, got {z_loss!r}")
    if softcap is not None and (not isinstance(softcap, numbers.Real) or not 0.0 < softcap < float("inf")):
        raise ValueError(f"softcap must be None or a finite float > 0, got {softcap!r}")


def _check_torch_options(options) -> None:
    """``options`` as ``torch.nn.functional.linear_cross_entropy`` takes it: None or a
    ``torch.nn.LinearCrossEntropyOptions`` (a class of torch >= 2.13)."""
    kind = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if options is not None and (kind is None or not isinstance(options, kind)):
        raise TypeError(f"options must be None or a torch.nn.LinearCrossEntropyOptions, got {_describe(options)}")


def _check_ignore_index(ignore_index) -> int:
    """``ignore_index`` as an int: None is -100, as in ``torch.nn.functional.linear_cross_entropy``
    (for class indices; probability targets ignore nothing either way)."""
    if ignore_index is None:
        return -100
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int or None, got {_describe(ignore_index)}")
    return operator.index(ignore_index)


def _check_linear(input, linear_weight, linear_bias):
    if not isinstance(input, torch.Tensor) or input.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"input must be a float tensor (float32, float16, bfloat16), got {_describe(input)}")
    if input.dim() < 1:
        raise ValueError("input must have shape (..., D), got a 0-d tensor")
    if not isinstance(linear_weight, torch.Tensor) or linear_weight.dim() != 2:
        raise ValueError(f"linear_weight must be a (C, D) tensor, got {_describe(linear_weight)}")
    C, D = linear_weight.shape
    if C == 0:
        raise ValueError("linear_weight must have at least one class (row), got shape (0, D)")
    if input.shape[-1] != D:
        raise ValueError(
            f"input has {input.shape[-1]} features (shape {tuple(input.shape)}) but linear_weight "
            f"has {D} (shape {tuple(linear_weight.shape)}); the last dims must match"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight dtype {linear_weight.dtype} must equal input dtype {input.dtype}")
    if linear_weight.device != input.device:
        raise ValueError(f"linear_weight is on {linear_weight.device} but input is on {input.device}")
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor) or tuple(linear_bias.shape) != (C,):
            raise ValueError(f"linear_bias must have shape ({C},), got {_describe(linear_bias)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias dtype {linear_bias.dtype} must equal input dtype {input.dtype}")
        if linear_bias.device != input.device:
            raise ValueError(f"linear_bias is on {linear_bias.device} but input is on {input.device}")
        linear_bias = linear_bias.contiguous()  # the kernels read it through one flat pointer
    return input.reshape(math.prod(input.shape[:-1]), D), linear_weight, linear_bias


def _check_target(target, batch_shape, C, device, dense):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {_describe(target)}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but input is on {device}")
    if dense:
        expected = (*batch_shape, C)
        if tuple(target.shape) != expected:
            raise ValueError(
                f"target holds class probabilities (float dtype) and must have shape {expected}, "
                f"got {tuple(target.shape)}"
            )
        return target.reshape(-1, C)
    if target.dtype == torch.bool or target.is_complex() or target.dtype.is_floating_point:
        raise TypeError(f"target must be integer class indices or float probabilities, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(batch_shape):
        raise ValueError(
            f"target has shape {tuple(target.shape)} but input {tuple(batch_shape) + ('D',)} needs "
            f"target of shape {tuple(batch_shape)} (class indices) or {(*batch_shape, C)} (probabilities)"
        )
    return target.reshape(-1).long().contiguous()  # a strided view stays strided through both


def _check_mixup(target2, lam, target, batch_shape, dense, device):
    if target2 is None:
        if lam is not None:
            raise ValueError("lam was given without target2; mixup needs both")
        return None, None
    if dense:
        raise ValueError("target2 (mixup) needs class-index targets; target holds probabilities")
    if lam is None:
        raise ValueError("target2 was given without lam; mixup needs both")
    if not isinstance(target2, torch.Tensor) or tuple(target2.shape) != tuple(target.shape):
        raise ValueError(f"target2 must have target's shape {tuple(target.shape)}, got {_describe(target2)}")
    if target2.dtype.is_floating_point or target2.dtype == torch.bool or target2.device != device:
        raise TypeError(f"target2 must be integer class indices on {device}, got {_describe(target2)}")
    n = target.numel()
    if isinstance(lam, numbers.Real):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {lam}")
        lam_rows = torch.full((n,), float(lam), device=device, dtype=torch.float64)  # rounded later, per dtype
    elif isinstance(lam, torch.Tensor):
        if lam.requires_grad and torch.is_grad_enabled():  # as the class weights: no gradient flows to it
            raise RuntimeError(
                "lam requires grad, but the loss is not differentiable with respect to the mixup weight; "
                "pass lam.detach()"
            )
        if lam.numel() == 1:
            lam_rows = lam.detach().reshape(()).double().expand(n)
        elif tuple(lam.shape) == tuple(batch_shape) or tuple(lam.shape) == (n,):
            lam_rows = lam.detach().reshape(n).double()
        else:
            raise ValueError(
                f"lam must be a float or a tensor of shape () or {tuple(batch_shape)}, got {_describe(lam)}"
            )
        lam_rows = lam_rows.to(device)
    else:
        raise TypeError(f"lam must be a float or a tensor, got {_describe(lam)}")
    return target2.reshape(-1).long().contiguous(), lam_rows.contiguous()


def _check_class_weight(weight, C, device):
    if weight is None:
        return None
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (C,) or not weight.dtype.is_floating_point:
        raise ValueError(f"weight must be a float tensor of shape ({C},), got {_describe(weight)}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but input is on {device}")
    if weight.requires_grad and torch.is_grad_enabled():  # as torch's cross_entropy: no gradient flows to it
        raise RuntimeError(
            "weight (the class weights) requires grad, but the loss is not differentiable with respect to it, "
            "as in torch.nn.functional.cross_entropy; pass weight.detach()"
        )
    return weight.detach().contiguous()


#: Range checks of earlier CUDA calls whose flags are still on their way to the host:
#: (event, pinned host copy, C, ignore_index).
_PENDING_CHECKS: collections.deque = collections.deque()


def _check_target_range(t, t2, lam_rows, C, ignore_index) -> None:
    """Class indices outside [0, C) on kept rows, or ``lam`` outside [0, 1], raise a
    ValueError naming the argument.

    CPU tensors are checked at once. CUDA tensors are checked without a host sync (a sync in
    the loss stalls every training step): the flags travel to pinned memory behind an event,
    and the first later call that finds the copy complete raises; meanwhile the offending
    rows' loss is NaN (``build_row_targets``), never a silently wrong number. Skipped while
    compiling or capturing a CUDA graph (NaN rows only)."""
    if t.numel() == 0 or torch.compiler.is_compiling() or _without_data(t, t2, lam_rows):
        return  # (under a torch.func transform or on meta: the NaN rows only, as while compiling)
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    keep = t != ignore_index  # an int: _check_ignore_index resolves None
    flags = [_label_range(t, keep)]
    if t2 is not None:
        lam_bad = ~((lam_rows >= 0) & (lam_rows <= 1))  # NaN too; on every row, as build_row_targets
        flags += [_label_range(t2, keep), lam_bad.any().long()[None]]
    _report_target_range(torch.cat(flags) if len(flags) > 1 else flags[0], C, ignore_index)


def _report_target_range(summary: torch.Tensor, C: int, ignore_index) -> None:
    """Raise now for a CPU ``summary`` (``[min, max]`` of the kept labels per label tensor, then
    a bad-``lam`` flag) that ``_raise_if_bad`` rejects; for a CUDA one, start its copy to the
    host and raise in a later call (see ``_check_target_range``)."""
    if torch.compiler.is_compiling() or (summary.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    _raise_finished_checks()
    if not summary.is_cuda:
        _raise_if_bad(summary.tolist(), C, ignore_index, deferred=False)
        return
    host = _FREE_PINNED.pop() if _FREE_PINNED and _FREE_PINNED[-1].shape == summary.shape else None
    if host is None:
        with torch.inference_mode(False):  # reused by later calls, which may write it outside inference_mode
            host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
    host.copy_(summary, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    _PENDING_CHECKS.append((event, host, C, ignore_index))


#: Pinned buffers of finished checks, reused (a pinned allocation costs more than the check).
_FREE_PINNED: list[torch.Tensor] = []


def _label_range(t: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """``[min, max]`` of the kept labels (0 stands for ignored rows; None keeps every row, as
    ``kernels.targets.row_targets`` without an ignore_index, which its test checks against this)."""
    return torch.stack(torch.aminmax(t if keep is None else torch.where(keep, t, 0)))


def _raise_finished_checks() -> None:
    while _PENDING_CHECKS and _PENDING_CHECKS[0][0].query():
        _, host, C, ignore_index = _PENDING_CHECKS.popleft()
        summary = host.tolist()
        if len(_FREE_PINNED) < 8:
            _FREE_PINNED.append(host)
        _raise_if_bad(summary, C, ignore_index, deferred=True)


def _raise_if_bad(summary: list[int], C: int, ignore_index, deferred: bool) -> None:
    when = " (found after that call returned: its loss is NaN)" if deferred else ""
    names = ("target", "target2")[: len(summary) // 2]
    for name, lo, hi in zip(names, summary[0:4:2], summary[1:4:2], strict=True):
        if lo < 0 or hi >= C:
            value = lo if lo < 0 else hi
            if name == "target2":  # target's ignore_index decides which rows count, for both labels
                raise ValueError(
                    f"target2 contains {value} on a row that target keeps (not ignore_index={ignore_index}); "
                    f"target2 must lie in [0, {C}) on every such row{when}"
                )
            raise ValueError(f"{name} contains {value}, outside [0, {C}) and not ignore_index={ignore_index}{when}")
    if len(summary) > 4 and summary[4]:
        raise ValueError(f"lam must lie in [0, 1] on every row{when}")


#: The scale of calls without one, per (device, dtype): read only, so shared (a launch less per call).
_UNIT_SCALES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _check_scale(scale, device, dtype) -> torch.Tensor:
    if scale is None:
        if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            return torch.ones(1, device=device, dtype=dtype)  # a graph's fill runs only when it replays
        key = (device, dtype)
        if key not in _UNIT_SCALES:
            with torch.inference_mode(False):  # a tensor made under inference_mode could not be saved later
                _UNIT_SCALES[key] = torch.ones(1, device=device, dtype=dtype)
        return _UNIT_SCALES[key]
    if isinstance(scale, numbers.Real):
        return torch.full((1,), float(scale), device=device, dtype=dtype)
    if not isinstance(scale, torch.Tensor) or scale.numel() != 1 or not is_real(scale):
        raise ValueError(f"scale must be a float or a 1-element real tensor, got {_describe(scale)}")
    if scale.device != device:
        raise ValueError(f"scale is on {scale.device} but input is on {device}")
    return scale.reshape(1).to(dtype)


def is_real(t: torch.Tensor) -> bool:
    """A floating or integer tensor (an integer one is a constant, as in torch's own products)."""
    return not t.is_quantized and (t.dtype.is_floating_point or not (t.dtype.is_complex or t.dtype == torch.bool))


def _describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"tensor of shape {tuple(obj.shape)} and dtype {obj.dtype} on {obj.device}"
    return f"{type(obj).__name__} {obj!r}"
