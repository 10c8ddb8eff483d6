"""The causal-LM loss of any Hugging Face ``*ForCausalLM`` without its logit matrix.

One code path for every family, through the model's public pieces only:

- the model's own ``forward`` runs with ``labels=None`` and ``logits_to_keep`` set to no
  position (or one position, on the first call, to check the head; see below), so the head
  projects nothing; a forward hook on ``model.base_model`` keeps its last hidden state
  ``h`` (B, T, D). A forward that calls the base model's ``decoder`` directly (OPT's) is
  taken through a hook there. Every model's loss must be ``self.loss_function`` and that
  ``ForCausalLMLoss`` (read on the first call); others are refused (the BART family and
  CpmAnt take an unshifted ``CrossEntropyLoss``, Granite Speech a masked one);
- the head is ``model.get_output_embeddings()``: weight W (V, D), tied or not, bias b or None;
- the logits transformers would form are ``z = softcap(s * (h @ W.T + b))`` with
  ``softcap`` from the softcap fields (:data:`SOFTCAP_FIELDS`: Gemma 2 and later,
  RecurrentGemma) and the scale ``s`` from the logit-scaling fields
  (:data:`LOGIT_SCALE_FIELDS`), each where the class's ``forward`` uses it;
- the loss is ``ForCausalLMLoss``'s: position t predicts ``labels[t + 1]``, ``-100`` (or the
  ``ignore_index`` passed to the model) is ignored, the mean over kept tokens, or their sum
  over ``num_items_in_batch`` when given; a MoE model's ``router_aux_loss_coef * aux_loss``
  and Bamba's z-loss are added as its forward adds them.

Nothing copies a family's ``forward``. The first call for a model compares the logits the
model itself returns for the last position with ``z`` above and raises if they differ, so a
family that transforms its logits in a way this module does not know fails loudly instead
of training on a different loss. That first call also registers the hook for good (inert
outside the loss) and must run eagerly; later calls compile with
``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import operator
import re
from dataclasses import dataclass

import torch
from torch import nn

from fused_xent.functional import linear_cross_entropy

IGNORE_INDEX = -100

#: Config fields that scale the head's output before the loss, and how transformers 5.x
#: applies each: ``True`` multiplies (Cohere's ``logit_scale``, Falcon-H1's
#: ``lm_head_multiplier``), ``False`` divides (Granite's ``logits_scaling``; Inkling's
#: ``logits_mup_width_multiplier``, on the hidden states of a head without bias: the same).
LOGIT_SCALE_FIELDS = {
    "logit_scale": True,
    "logits_scaling": False,
    "lm_head_multiplier": True,
    "logits_mup_width_multiplier": False,
    "output_multiplier": True,  # MuseGlimmer's, before its softcap
}

#: Config fields of a final logit softcap ``cap * tanh(z / cap)``: Gemma 2 and later,
#: RecurrentGemma.
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap")

#: Largest ``max|z_model - z| / max|z_model|`` the head check accepts, per dtype: the rounding
#: of one GEMM and one elementwise op in that dtype; a missed scale or softcap is far above.
_HEAD_CHECK_TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}

_ORIGINAL_FORWARD = "_fused_xent_original_forward"
_CAPTURE = "_fused_xent_capture"
_REPLICATE = "_replicate_for_data_parallel"


@dataclass(frozen=True)
class LMHead:
    """What a causal LM's head computes: ``logits = softcap(scale * (h @ weight.T + bias))``."""

    weight: torch.Tensor  # (V, D)
    bias: torch.Tensor | None  # (V,)
    scale: float
    softcap: float | None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """``softcap(scale * (h @ weight.T + bias))`` in fp32 (fp64 for fp64), materialised:
        (..., D) -> (..., V). For the head check only."""
        dtype = _operand_dtype(h, self.weight)  # the loss's (Mamba's hidden states are fp32)
        b = None if self.bias is None else self.bias.to(dtype)
        z = nn.functional.linear(h.to(dtype), self.weight.to(dtype), b)
        z = z.double() if z.dtype == torch.float64 else z.float()
        z = z * self.scale
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)


def read_head(model: nn.Module) -> LMHead:
    """The head of a transformers causal LM: ``get_output_embeddings()`` and the logit
    transforms its ``forward`` applies, from the config (model config or its text config): the
    softcap fields of :data:`SOFTCAP_FIELDS` and the scaling fields of
    :data:`LOGIT_SCALE_FIELDS`, each taken where the class's ``forward`` uses it (with the
    operator it uses there) when its source can be read, every one set in the config otherwise.

    Raises:
        ValueError: the model has no readable output embeddings; the head has trainable
            parameters beside its weight and bias (a LoRA adapter on ``lm_head``), which the
            fused loss would leave without gradient; the forward applies a softcap (``tanh``)
            through no field this module knows.
    """
    name = type(model).__name__
    if not hasattr(model, "get_output_embeddings") or not hasattr(model, "config"):
        raise ValueError(f"model must be a transformers PreTrainedModel with a language-model head, got {name}")
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"cannot read the LM head of {name}: get_output_embeddings() returned {type(head).__name__}, "
            "expected a module with a (vocab_size, hidden_size) weight such as nn.Linear"
        )
    bias = getattr(head, "bias", None)
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"cannot read the LM head of {name}: its bias is not a ({weight.shape[0]},) tensor")
    extra = [n for n, p in head.named_parameters() if p.requires_grad and p is not weight and p is not bias]
    if extra:
        raise ValueError(
            f"the LM head of {name} ({type(head).__name__}) has trainable parameters beside its weight and bias "
            f"({', '.join(extra[:3])}): a LoRA adapter on lm_head? fused_xent computes h @ W.T + b from the head's "
            "weight alone, so they would get no gradient; merge the adapter, or leave lm_head out of target_modules"
        )
    configs = [model.config]
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if text_config is not model.config:
        configs.append(text_config)
    used = _forward_transforms(type(model))
    if used is not None and used.unknown_softcap:
        raise ValueError(
            f"{name}.forward applies tanh to its logits through no field fused_xent knows "
            f"({', '.join(SOFTCAP_FIELDS)}), so it cannot compute this model's loss"
        )
    scale, softcap = 1.0, None
    for config in configs:
        for field, multiplies in LOGIT_SCALE_FIELDS.items():
            value = getattr(config, field, None)
            if value is not None and (used is None or field in used.scales):
                multiplies = multiplies if used is None or used.scales[field] is None else used.scales[field]
                scale = scale * value if multiplies else scale / value
        for field in SOFTCAP_FIELDS:
            cap = getattr(config, field, None)
            if cap is not None and (used is None or field in used.softcaps):
                softcap = cap
        rows = getattr(config, "unpadded_vocab_size", None)
        if isinstance(rows, int) and 0 < rows < weight.shape[0] and (used is None or used.unpadded):
            # the forward slices its logits to the real tokens (Inkling): the padding rows are no class
            weight, bias = weight[:rows], None if bias is None else bias[:rows]
    return LMHead(weight=weight, bias=bias, scale=float(scale), softcap=None if softcap is None else float(softcap))


@dataclass(frozen=True)
class _Transforms:
    """The logit transforms named in a ``*ForCausalLM.forward``'s source."""

    scales: dict  # field -> True (multiplies), False (divides), None (operator not found: the table's)
    softcaps: tuple[str, ...]
    unknown_softcap: bool  # tanh without a known softcap field
    unpadded: bool  # slices the logits to config.unpadded_vocab_size


#: ``_forward_transforms`` per class (a plain dict: compiled code reads it; the first call
#: for a model, which runs eagerly, fills it)
_TRANSFORMS: dict[type, _Transforms | None] = {}


def _forward_transforms(cls: type) -> _Transforms | None:
    """What ``cls.forward`` does to its logits, read once per class from its source (None when
    the source cannot be read: then every field set in the config counts). A field set in the
    config is applied only where the forward uses it: Gemma 3's ``ForConditionalGeneration``
    keeps ``final_logit_softcapping`` in its text config but applies none, HyperCLOVAX multiplies
    by ``logits_scaling`` where Granite divides."""
    if cls not in _TRANSFORMS:
        _TRANSFORMS[cls] = _read_transforms(cls)
    return _TRANSFORMS[cls]


@torch.compiler.disable  # reads source code; compiled code finds the class in _TRANSFORMS already
def _read_transforms(cls: type) -> _Transforms | None:
    """The sources of every ``forward`` along the class's MRO (a subclass that calls
    ``super().forward`` keeps its base's transforms). A scaling field counts where a source names
    it, with the operator there. A softcap field set in the config counts unless no source shows
    any softcap at all (neither a field's name, nor "softcap" / "soft_cap" / "tanh": Inkling 2
    applies the field through a ``logit_softcap`` submodule), so it is dropped only where the
    model plainly applies none (Gemma 3's ``ForConditionalGeneration``)."""
    sources = [source for _, source in _forward_sources(cls)]
    if not sources or None in sources:
        return None
    source = "\n".join(sources)
    scales = {}
    for field in LOGIT_SCALE_FIELDS:
        if re.search(rf"\b{field}\b", source):
            op = re.search(rf"([*/])\s*[A-Za-z_][\w.]*\.{field}\b", source)
            scales[field] = None if op is None else op.group(1) == "*"
    named = tuple(f for f in SOFTCAP_FIELDS if re.search(rf"\b{f}\b", source))
    any_softcap = bool(named) or re.search(r"soft_?cap|tanh", source) is not None
    softcaps = SOFTCAP_FIELDS if any_softcap and not named else named
    unpadded = re.search(r"\bunpadded_vocab_size\b", source) is not None
    return _Transforms(scales, softcaps, unknown_softcap="tanh" in source and not named, unpadded=unpadded)


def causal_lm_loss(
    model: nn.Module,
    input_ids: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
    **model_kwargs,
) -> torch.Tensor:
    """``model(input_ids, attention_mask=..., labels=labels, ...).loss`` without the logits.

    ``loss = sum_{b,t: y_bt != -100} (lse(z_bt) - z_bt[y_bt]) / n`` with ``y_bt =
    labels[b, t + 1]`` (the last position predicts nothing), ``z = softcap(s * (h @ W.T +
    b))`` from :func:`read_head`, and ``n`` the number of kept tokens, or
    ``num_items_in_batch`` when given (transformers' gradient-accumulation-aware sum).

    Args:
        model: a transformers causal LM (``*ForCausalLM`` or any model whose ``forward``
            takes ``logits_to_keep``, whose head is ``get_output_embeddings()`` and whose loss
            is ``self.loss_function``'s ``ForCausalLMLoss``), patched by :func:`patch_model` or
            not. Its loss function is read on the first call (one set later is not seen).
        input_ids: (B, T) token ids, or None with ``inputs_embeds`` in ``model_kwargs``.
        labels: (B, T) int64 target ids, ``-100`` where ignored; unshifted, as for the model.
        attention_mask: (B, T), passed to the model.
        num_items_in_batch: number of target tokens over the whole (accumulated) batch.
        model_kwargs: passed to the model's ``forward`` (``position_ids``, ``inputs_embeds``,
            ``token_type_ids``, ...); ``shift_labels`` (B, T) replaces the shifted ``labels``
            as in transformers.

    Returns:
        The scalar loss, fp32 (fp64 for a float64 model), differentiable with respect to
        every parameter the model's own loss reaches. Under ``torch.no_grad()`` it is a
        single forward pass with no logits (perplexity: ``loss.exp()``).
    """
    if labels is None and model_kwargs.get("shift_labels") is None:
        raise ValueError("causal_lm_loss needs labels (B, T): the next-token targets, -100 where ignored")
    _, loss = _fused_forward(
        model, _original_forward(model), input_ids, labels, attention_mask, num_items_in_batch, model_kwargs
    )
    return loss


def patch_model(model: nn.Module) -> nn.Module:
    """Make ``model(..., labels=labels)`` compute its loss with :func:`causal_lm_loss`.

    With labels the output is the model's usual output class with ``loss`` set and
    ``logits`` None (the logits are never formed); without labels the call goes to the
    original ``forward`` unchanged. The signature seen by ``inspect`` (and so by
    ``transformers.Trainer``) is the original's. Patching twice is a no-op. A deep copy of
    the patched model (an EMA or reference copy) is patched too, and runs itself; the model
    pickles (``torch.save(model)``).

    Returns:
        ``model`` itself, patched in place; :func:`unpatch_model` undoes it.
    """
    if _ORIGINAL_FORWARD in model.__dict__:
        return model
    read_head(model)
    _check_logits_to_keep(model, model.forward)
    # an instance-level forward (accelerate's device hooks) is kept; the class's is looked up per
    # call, so that a copy of the model runs its own (a bound method would run the original's)
    model.__dict__[_ORIGINAL_FORWARD] = model.__dict__.get("forward")
    model.forward = _PatchedForward(model)
    model.__dict__[_REPLICATE] = _refuse_replication  # shadows nn.Module's, for this instance only
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo :func:`patch_model`, and take off the hooks a fused loss left; returns ``model``."""
    if _ORIGINAL_FORWARD in model.__dict__:
        original = model.__dict__.pop(_ORIGINAL_FORWARD)
        del model.forward
        if original is not None:
            model.forward = original
    model.__dict__.pop(_REPLICATE, None)
    capture = model.__dict__.pop(_CAPTURE, None)
    if capture is not None:
        capture.remove()
    return model


def _refuse_replication():
    """A patched model's ``_replicate_for_data_parallel``: ``nn.DataParallel`` (``Trainer`` with
    several GPUs in one process) copies a module's ``__dict__`` into each replica, so every replica
    would run the original's patched forward, on the original's weights, and the replicas' threads
    would share one hidden-state capture."""
    raise RuntimeError(
        "a model patched by fused_xent cannot be replicated by nn.DataParallel (its replicas would run the "
        "original model's forward and share its hidden-state capture); use DistributedDataParallel (torchrun, "
        "accelerate launch: one process per GPU), or unpatch_model first"
    )


class _PatchedForward:
    """``model.forward`` after :func:`patch_model`: the fused loss with labels, the original
    forward without. A module-level class, not a closure: ``copy.deepcopy`` copies it with the
    model (a closure would keep calling the original model) and pickle can store it."""

    def __init__(self, model: nn.Module) -> None:
        original = _original_forward(model)
        self.model = model
        self.__signature__ = inspect.signature(original)  # what Trainer inspects
        self.__doc__ = getattr(original, "func", original).__doc__  # a partial's is functools'.
        self.names = list(self.__signature__.parameters)
        self.labels_at = self.names.index("labels") if "labels" in self.names else len(self.names)

    def __call__(self, *args, **kwargs):
        model, names, labels_at = self.model, self.names, self.labels_at
        original = _original_forward(model)
        if len(args) > len(names):
            raise TypeError(f"{type(model).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
        if kwargs.get("labels") is None and (len(args) <= labels_at or args[labels_at] is None):
            return original(*args, **kwargs)
        kwargs = {**dict(zip(names, args, strict=False)), **kwargs}
        labels = kwargs.pop("labels")
        input_ids = kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        num_items = kwargs.pop("num_items_in_batch", None)
        output, _ = _fused_forward(model, original, input_ids, labels, attention_mask, num_items, kwargs)
        return output


def _original_forward(model: nn.Module):
    """The forward :func:`patch_model` replaced (the model's own when it is not patched)."""
    if _ORIGINAL_FORWARD not in model.__dict__:
        return model.forward
    original = model.__dict__[_ORIGINAL_FORWARD]
    # a partial, not a bound method: torch 2.11's dynamo cannot trace function.__get__ (fullgraph)
    return original if original is not None else functools.partial(type(model).forward, model)


def _check_logits_to_keep(model: nn.Module, forward) -> None:
    if "logits_to_keep" not in inspect.signature(forward).parameters:
        raise ValueError(
            f"{type(model).__name__}.forward takes no logits_to_keep argument, so it cannot run without "
            "forming every logit; fused_xent supports causal LMs whose forward slices the hidden states "
            "with logits_to_keep (every transformers *ForCausalLM built on the generation API)"
        )


def _fused_forward(model, forward, input_ids, labels, attention_mask, num_items_in_batch, kwargs):
    """Run ``forward`` without logits, then the fused loss; returns (output with loss, loss)."""
    head = read_head(model)
    if head.weight.is_meta:  # not at patch time: a model may be patched before its weights load
        raise ValueError(
            f"the LM head of {type(model).__name__} has its weight on the meta device (not loaded yet, or offloaded "
            "by accelerate's cpu_offload / disk offload, which loads it only inside the head's own forward): "
            "fused_xent reads the head's weight directly, so keep lm_head on a device"
        )
    if kwargs.get("logits_to_keep") not in (None, 0):
        raise ValueError("logits_to_keep cannot be combined with labels: the loss needs every position")
    kwargs.pop("logits_to_keep", None)
    shift_labels = kwargs.pop("shift_labels", None)
    user_return_dict = kwargs.pop("return_dict", None)
    # ForCausalLMLoss's keyword, which the model's forward hands its loss (the base model ignores it)
    given = kwargs.pop("ignore_index", IGNORE_INDEX)
    try:  # an int, a numpy integer or a 0-d integer tensor, as transformers takes them
        ignore_index = None if isinstance(given, bool) else operator.index(given)
    except TypeError:
        ignore_index = None
    if ignore_index is None:
        raise ValueError(f"ignore_index must be an int, got {given!r}")
    targets = _shift(labels, shift_labels, ignore_index)
    base = model.base_model
    if base is model:  # base_model_prefix names no attribute (Llama 4's text model): the usual one
        base = getattr(model, "model", None)
        if not isinstance(base, nn.Module):
            raise ValueError(
                f"cannot find the base model of {type(model).__name__}: model.base_model is the model itself "
                "and it has no .model"
            )

    capture = _hidden_state_capture(model, base, forward)
    if not capture.shifted_loss:
        raise ValueError(
            f"{type(model).__name__}'s loss is not self.loss_function's ForCausalLMLoss (a loss function set on "
            "the model, or a forward with a loss of its own: the BART family's and CpmAnt's unshifted "
            "CrossEntropyLoss, Granite Speech's masked one), so fused_xent's shifted loss would differ from "
            "model(..., labels).loss; call fused_xent.linear_cross_entropy on its hidden states instead"
        )
    check = not capture.head_checked
    positions = torch.arange(targets.shape[-1] - 1, targets.shape[-1]) if check else torch.empty(0, dtype=torch.long)
    capture.armed, capture.hidden = True, None
    try:
        output = forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            logits_to_keep=positions.to(targets.device),
            return_dict=True,
            **kwargs,
        )
    finally:
        capture.armed = False
    h, capture.hidden = capture.hidden, None
    if h is None:
        raise ValueError(
            f"{type(base).__name__} (model.base_model) did not run during {type(model).__name__}.forward, "
            "so fused_xent finds no hidden states to take the loss from"
        )
    if tuple(h.shape[:-1]) != tuple(targets.shape):
        raise ValueError(
            f"labels have shape {tuple(targets.shape)} but the model's hidden states have shape {tuple(h.shape)}; "
            "labels must be (batch, sequence) like input_ids"
        )
    if check:
        _check_head(model, head, h[:, positions.to(h.device)], output.logits)
        capture.head_checked = True

    x, w, b = _head_operands(h, head)
    z_coef = float(getattr(model, "z_loss_coefficient", None) or 0.0)  # Bamba's
    loss = linear_cross_entropy(
        x,
        w,
        targets.to(h.device),
        linear_bias=b,
        reduction="mean" if num_items_in_batch is None else "sum",
        ignore_index=ignore_index,
        scale=None if head.scale == 1.0 else head.scale,
        softcap=head.softcap,
        return_lse=z_coef > 0,
    )
    if z_coef > 0:
        loss, lse = loss
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(loss.device)
        loss = loss / num_items_in_batch
    if z_coef > 0:  # as Bamba's forward adds it: the mean over every position, ignored ones too
        loss = loss + z_coef * lse.pow(2).mean()
    loss = loss + _router_aux_loss(model, output, loss.device)

    fields = {k: v for k, v in output.items() if k != "logits"}
    output = type(output)(**{**fields, "loss": loss})
    if user_return_dict is False or (user_return_dict is None and not getattr(model.config, "return_dict", True)):
        output = _as_tuple(output)
    return output, loss


def _as_tuple(output) -> tuple:
    """``output.to_tuple()`` with None where the logits would be: to_tuple drops None fields, and
    the model's own tuple has its logits there, so every later field keeps its index."""
    names = [f.name for f in dataclasses.fields(output)]  # a ModelOutput is a dataclass
    return tuple(None if name == "logits" else output[name] for name in names if name == "logits" or name in output)


class _HiddenStateCapture:
    """The forward hooks on ``model.base_model`` and on its ``decoder`` (where it has one) that
    keep the last hidden state while armed (one call of :func:`_fused_forward`) and do nothing
    otherwise: the base model's, which runs after its decoder, wins. Also records that the
    model's head passed :func:`_check_head`. Plain objects (no closures), so that a deep copy
    of the model gets its own capture, hooked to its own modules, and the model pickles."""

    def __init__(self, shifted_loss: bool) -> None:
        self.armed = False
        self.hidden: torch.Tensor | None = None
        self.head_checked = False
        #: ``_shifted_loss_function`` of the model, read once (eagerly: it reads source code)
        self.shifted_loss = shifted_loss
        self.handles: list = []

    def register(self, module: nn.Module) -> None:
        self.handles.append(module.register_forward_hook(_CaptureHook(self)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __getstate__(self) -> dict:
        return {**self.__dict__, "armed": False, "hidden": None}


class _CaptureHook:
    """One forward hook of a :class:`_HiddenStateCapture`."""

    def __init__(self, capture: _HiddenStateCapture) -> None:
        self.capture = capture

    def __call__(self, module, args, out) -> None:
        if self.capture.armed:
            self.capture.hidden = _last_hidden_state(out)


def _hidden_state_capture(model: nn.Module, base: nn.Module, forward) -> _HiddenStateCapture:
    """The model's capture hook, registered by its first call and kept: torch.compile cannot
    trace registering a hook, nor the head check's host sync, nor the signature and source
    reads, so the first call runs eagerly."""
    capture = model.__dict__.get(_CAPTURE)
    if capture is not None and capture.head_checked:
        return capture
    if torch.compiler.is_compiling():
        raise RuntimeError(
            f"the first fused_xent loss of this {type(model).__name__} must run eagerly: it registers a hook "
            "on model.base_model and checks the model's logits against the head (a host sync), neither of "
            "which torch.compile can trace; call causal_lm_loss (or the patched model with labels) once "
            "without torch.compile, then compile"
        )
    if capture is None:
        _check_logits_to_keep(model, forward)
        capture = _HiddenStateCapture(_shifted_loss_function(model))
        decoder = getattr(base, "decoder", None)
        if isinstance(decoder, nn.Module) and decoder is not base:
            capture.register(decoder)
        capture.register(base)
        model.__dict__[_CAPTURE] = capture
        model.__dict__[_REPLICATE] = _refuse_replication  # its replicas would share this capture
    return capture


def _shifted_loss_function(model: nn.Module) -> bool:
    """Whether the model's loss is ``self.loss_function`` and that is transformers'
    ``ForCausalLMLoss``, the loss this module computes; read on the first call. The forward
    that runs must call it, or hand its labels on to ``super().forward`` (a subclass's), whose
    forward is then read the same way; a forward that does neither has a loss of its own.
    Where a source cannot be read (a generated class), the model's ``loss_function`` decides."""
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:
        return False
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return False
    for forward, source in _forward_sources(type(model)):
        if source is None:
            return True
        if "self.loss_function(" in source:
            return True
        if not re.search(r"super\([^)]*\)\.forward\(", source):
            return False
        # labels handed on: by name where the forward names them, else inside *args / **kwargs
        named = "labels" in inspect.signature(forward).parameters
        if not re.search(r"\blabels\s*=\s*labels\b" if named else r"\*\w", source):
            return False
    return False


def _forward_sources(cls: type) -> list:
    """``(forward, its source or None where it cannot be read)`` for each ``forward`` defined
    along ``cls``'s MRO, the one that runs first; nn.Module's placeholder left out."""
    out = []
    for klass in cls.__mro__:
        if klass is nn.Module or "forward" not in vars(klass):
            continue
        forward = vars(klass)["forward"]
        try:
            out.append((forward, inspect.getsource(forward)))
        except (OSError, TypeError):
            out.append((forward, None))
    return out


def _shift(labels, shift_labels, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets per position: ``labels[:, t + 1]``, ``ignore_index`` at the last position, as
    transformers shifts."""
    if shift_labels is not None:
        return shift_labels
    if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dim() < 1:
        raise ValueError(f"labels must be an integer tensor of shape (B, T), got {labels!r}")
    return nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _operand_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's ``nn.Linear`` computes in: autocast's when it is on, else the weight's."""
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return weight.dtype


def _head_operands(h: torch.Tensor, head: LMHead):
    """``(h, W, s * b)`` in the dtype the head's ``nn.Linear`` would compute in (autocast's
    when it is on, as for ``F.linear``); the bias folds the scale in, ``s * (hW + b) = s hW + s b``."""
    w, b = head.weight, head.bias
    dtype = _operand_dtype(h, w)
    h, w = h.to(dtype), w.to(dtype)
    if b is not None:
        b = (b if head.scale == 1.0 else b * head.scale).to(dtype)
    return h, w, b


def _last_hidden_state(out) -> torch.Tensor:
    h = getattr(out, "last_hidden_state", None)
    return h if h is not None else out[0]


def _check_head(model, head: LMHead, h_kept: torch.Tensor, model_logits: torch.Tensor | None) -> None:
    """Raise unless the model's own logits at the kept positions equal ``head.logits``."""
    name = type(model).__name__
    if model_logits is None or tuple(model_logits.shape[:-1]) != tuple(h_kept.shape[:-1]):
        raise ValueError(f"{name}.forward did not return the logits of the positions in logits_to_keep")
    if h_kept.shape[-1] != head.weight.shape[1]:
        raise ValueError(
            f"{name}'s hidden states have {h_kept.shape[-1]} features but its head (get_output_embeddings()) takes "
            f"{head.weight.shape[1]}: the forward transforms the hidden states before the head (a projection, as "
            "Electra's and RemBert's), which fused_xent does not know"
        )
    if model_logits.shape[-1] != head.weight.shape[0]:
        raise ValueError(
            f"{name}'s logits have {model_logits.shape[-1]} classes but its head (get_output_embeddings()) has "
            f"{head.weight.shape[0]} rows: the forward slices or extends the logits in a way fused_xent does not know"
        )
    with torch.no_grad():
        ref = model_logits.to(torch.float64 if model_logits.dtype == torch.float64 else torch.float32)
        ours = head.logits(h_kept)
        diff = torch.where(ref.isnan() & ours.isnan(), 0.0, (ref - ours).abs())  # a row NaN in both agrees
        err = (diff.max() / ref.nan_to_num(0.0).abs().max().clamp_min(1e-30)).item()
    if not err <= _HEAD_CHECK_TOL.get(model_logits.dtype, 3e-2):
        raise ValueError(
            f"{name}'s logits differ from softcap(scale * (h @ W.T + b)) with scale={head.scale}, "
            f"softcap={head.softcap} read from its config (relative error {err:.3g}): the model transforms its "
            "hidden states or logits in a way fused_xent does not know, so it cannot compute this model's loss"
        )


def _router_aux_loss(model, output, device) -> torch.Tensor | float:
    """``router_aux_loss_coef * aux_loss`` when the output carries a MoE load-balancing loss."""
    aux = getattr(output, "aux_loss", None)
    if aux is None:
        return 0.0
    owners = (model, model.config.get_text_config())
    fields = ("router_aux_loss_coef", "aux_loss_coef")  # the second: JetMoe's
    coef = next((c for o in owners for f in fields if (c := getattr(o, f, None)) is not None), None)
    if coef is None:
        raise ValueError(f"{type(model).__name__} returned an aux_loss but has no router_aux_loss_coef to weigh it")
    return coef * aux.to(device)
