"""timm: classifier-head losses without the logits, sparse Mixup / CutMix, training glue.

A timm model ends in ``logits = classifier(pre_logits)`` with ``pre_logits =
model.forward_head(model.forward_features(x), pre_logits=True)`` and ``classifier =
model.get_classifier()``. :class:`FusedHeadLoss` hands the classifier's weight and bias to
:func:`fused_xent.linear_cross_entropy`, so the (N, C) logits are never formed. With
Mixup / CutMix timm builds a dense (N, C) target

    t_i = (1 - eps) * (lam_i * e_{y_i} + (1 - lam_i) * e_{y2_i}) + eps / C,   y2 = y.flip(0)

(``timm.data.mixup_target``); :class:`SparseMixup` mixes the images exactly as
``timm.data.Mixup`` does and returns ``(y, y2, lam)`` instead, which the fused loss takes as
``target2`` / ``lam``. Swapping ``LabelSmoothingCrossEntropy`` / ``SoftTargetCrossEntropy``
on the logits for this loss on the pre-logits changes neither the value nor any gradient
(up to summation order, and with Mixup the fp32 rounding of ``lam``: ~1e-7 relative in fp64),
where the head is the classifier on the pre-logits (:func:`check_head`).

Training: :class:`FusedClassificationTask` is a ``timm.task.ClassificationTask`` (where the
installed timm has ``timm.task``); for ``train.py``-style loops :class:`PreLogits` wraps the
model so that ``model(x)`` returns pre-logits while training and logits in eval mode, and
:meth:`FusedHeadLoss.from_model` builds the criterion.
"""

from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import torch
from torch import nn

from fused_xent.functional import linear_cross_entropy

try:
    from timm.data import Mixup as _TimmMixup
except ImportError:  # the class is only defined with timm installed
    _TimmMixup = None

try:
    from timm.task import ClassificationTask as _TimmClassificationTask
except ImportError:  # timm < 1.0.20 has no training tasks
    _TimmClassificationTask = None

__all__ = ["FusedHeadLoss", "MixedTarget", "PreLogits", "check_head", "classifier_parameters"]


class MixedTarget(NamedTuple):
    """Mixup / CutMix labels as two class indices and a weight per row.

    Stands for the dense target ``(1 - eps) * (lam * e_y + (1 - lam) * e_y2) + eps / C``
    (``label_smoothing = eps``), which :meth:`dense` builds for checking.
    """

    y: torch.Tensor  # (N,) int64
    y2: torch.Tensor  # (N,) int64
    lam: float | torch.Tensor  # float, or (N,) tensor
    label_smoothing: float = 0.0

    def dense(self, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (N, C) target timm's ``Mixup`` would have returned (timm's is fp32)."""
        eps = self.label_smoothing
        lam = self.lam if isinstance(self.lam, numbers.Real) else self.lam.to(dtype).reshape(-1, 1)  # 0-d: one
        onehot = lambda t: nn.functional.one_hot(t.long(), num_classes).to(dtype)
        return (1.0 - eps) * (lam * onehot(self.y) + (1.0 - lam) * onehot(self.y2)) + eps / num_classes


class _MixupTarget(MixedTarget):
    """A :class:`MixedTarget` from :class:`SparseMixup`, which also records the Mixup's
    ``num_classes`` (an attribute: it still unpacks as four values)."""

    num_classes: int | None = None


def classifier_parameters(classifier: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight (C, D), bias (C,) or None)`` of a timm classifier: an ``nn.Linear`` or a
    1x1 ``nn.Conv2d`` (its weight viewed as (C, D), so gradients reach the conv)."""
    if isinstance(classifier, nn.Identity):
        raise ValueError(
            "classifier is nn.Identity: the model has no head (created with num_classes=0 or after "
            "reset_classifier(0)); create it with num_classes=C or call model.reset_classifier(C)"
        )
    if isinstance(classifier, nn.Linear):
        return classifier.weight, classifier.bias
    if isinstance(classifier, nn.Conv2d):
        if classifier.kernel_size != (1, 1) or classifier.groups != 1:
            raise ValueError(
                f"classifier must be a 1x1 Conv2d without groups, got kernel_size={classifier.kernel_size}, "
                f"groups={classifier.groups}"
            )
        return classifier.weight.flatten(1), classifier.bias
    if isinstance(classifier, (tuple, list, nn.ModuleList)):
        raise TypeError(
            f"classifier is a {type(classifier).__name__} of {len(classifier)} heads (a distilled or two-head "
            "model's get_classifier()): the fused loss takes one nn.Linear or 1x1 nn.Conv2d classifier"
        )
    raise TypeError(
        f"classifier must be nn.Linear or a 1x1 nn.Conv2d (what most timm models' get_classifier() returns), "
        f"got {type(classifier).__name__}"
    )


def head_classifier(model: nn.Module) -> nn.Module:
    """The layer a timm model applies to its pre-logits: ``model.get_classifier()``, or that
    module's ``fc`` where it is a whole head holding one (:func:`_layer_on_pre_logits`).
    :func:`check_head` confirms it on the first training step."""
    return _layer_on_pre_logits(model.get_classifier())


def _layer_on_pre_logits(classifier: nn.Module) -> nn.Module:
    """``classifier``, or its ``fc`` where it is a whole head holding one: sequencer2d's
    ``get_classifier()`` is its ``ClassifierHead`` (pooling, dropout, ``fc``), which
    ``forward_head(pre_logits=True)`` stops before."""
    fc = getattr(classifier, "fc", None)
    if not isinstance(classifier, (nn.Linear, nn.Conv2d)) and isinstance(fc, (nn.Linear, nn.Conv2d)):
        return fc
    return classifier


class FusedHeadLoss(nn.Module):
    """Cross-entropy of ``classifier(pre_logits)`` without the (N, C) logits.

    ``loss = mean_i [ lse(z_i) - sum_j t_ij z_ij ]``, ``z_i = W @ x_i + b``, with ``t_i`` the
    smoothed one-hot ``(1 - eps) e_{y_i} + eps / C`` for class indices (timm's
    ``LabelSmoothingCrossEntropy(eps)``, ``nn.CrossEntropyLoss`` at eps = 0), the Mixup
    target of :class:`MixedTarget` for two labels, or the given rows of a dense (N, C)
    target (timm's ``SoftTargetCrossEntropy``: dense targets carry their own smoothing).

    Args:
        classifier: the model's ``get_classifier()``: ``nn.Linear`` or 1x1 ``nn.Conv2d``
            (C outputs, bias optional). Held as a submodule, sharing its parameters.
        label_smoothing: eps for class-index targets (with or without ``target2``).
        reduction, ignore_index, impl: as in :func:`fused_xent.linear_cross_entropy`.
    """

    def __init__(
        self,
        classifier: nn.Module,
        label_smoothing: float = 0.0,
        *,
        reduction: str = "mean",
        ignore_index: int | None = -100,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        classifier = _layer_on_pre_logits(classifier)  # a whole head module: its fc
        classifier_parameters(classifier)  # fail at construction, not at the first step
        if not isinstance(label_smoothing, numbers.Real) or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be a float in [0, 1), got {label_smoothing!r}")
        self.classifier = classifier
        # the model of from_model, to notice a head replaced later (reset_classifier): a plain
        # reference in __dict__ (not a submodule), so that copies and pickles of the loss follow it
        self.__dict__["_model"] = None
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.impl = impl

    @classmethod
    def from_model(cls, model: nn.Module, label_smoothing: float = 0.0, **kwargs) -> FusedHeadLoss:
        """The loss on the model's classifier (a timm model, or a :class:`PreLogits`;
        :func:`head_classifier`)."""
        model = model.model if isinstance(model, PreLogits) else model
        if not hasattr(model, "get_classifier"):
            raise TypeError(f"model must be a timm model with get_classifier(), got {type(model).__name__}")
        loss = cls(head_classifier(model), label_smoothing, **kwargs)
        loss.__dict__["_model"] = model
        return loss

    def forward(
        self,
        pre_logits: torch.Tensor,
        target: torch.Tensor | MixedTarget,
        target2: torch.Tensor | None = None,
        lam: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Loss of ``pre_logits`` (N, D) (or (N, D, 1, 1) for a conv head) against ``target``:
        (N,) class indices, (N, C) probabilities, or a :class:`MixedTarget`; ``target2`` (N,)
        and ``lam`` (float or (N,)) give Mixup / CutMix as two labels and a weight."""
        model = self.__dict__["_model"]
        if model is not None and head_classifier(model) is not self.classifier:
            raise RuntimeError(
                f"{type(model).__name__}.get_classifier() is no longer the classifier this loss was built on "
                "(reset_classifier?): the loss would train the old head; build it again with FusedHeadLoss.from_model"
            )
        weight, bias = classifier_parameters(self.classifier)
        x = _flatten_pre_logits(pre_logits, weight.shape[1])
        eps = self.label_smoothing
        if isinstance(target, MixedTarget):
            if target2 is not None or lam is not None:
                raise ValueError("target is a MixedTarget, which holds target2 and lam already; pass neither")
            made_for = getattr(target, "num_classes", None)
            if made_for is not None and made_for != weight.shape[0]:
                raise ValueError(
                    f"the Mixup made this target for num_classes={made_for} but the classifier has "
                    f"{weight.shape[0]} classes (timm's Mixup + SoftTargetCrossEntropy fail on this too); set "
                    "SparseMixup(num_classes=...) to the model's"
                )
            target, target2, lam, eps = target.y, target.y2, target.lam, target.label_smoothing
        elif isinstance(target, torch.Tensor) and target.is_floating_point():
            eps = 0.0
        if isinstance(lam, torch.Tensor) and lam.dim() == 2 and lam.shape[1] == 1:
            lam = lam[:, 0]  # timm's per-element lam is (N, 1)
        dtype = _autocast_dtype(x) or weight.dtype
        return linear_cross_entropy(
            x.to(dtype),
            weight.to(dtype),
            target,
            linear_bias=None if bias is None else bias.to(dtype),
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=eps,
            target2=target2,
            lam=lam,
            impl=self.impl,
        )

    def extra_repr(self) -> str:
        return f"label_smoothing={self.label_smoothing}, reduction={self.reduction!r}, impl={self.impl!r}"


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype active for ``x``'s device (the logits' dtype timm would get), or None."""
    device_type = x.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _flatten_pre_logits(pre_logits: torch.Tensor, features: int) -> torch.Tensor:
    if not isinstance(pre_logits, torch.Tensor):
        raise TypeError(f"pre_logits must be a tensor, got {type(pre_logits).__name__}")
    if pre_logits.dim() == 4 and pre_logits.shape[2:] == (1, 1):
        pre_logits = pre_logits.flatten(1)  # a pooled map in front of a 1x1-conv head
    if pre_logits.dim() != 2 or pre_logits.shape[1] != features:
        raise ValueError(
            f"pre_logits must have shape (N, {features}) (model.forward_head(..., pre_logits=True)), "
            f"got {tuple(pre_logits.shape)}"
        )
    return pre_logits


class PreLogits(nn.Module):
    """A timm model whose ``forward`` returns pre-logits while training, logits in eval.

    ``train.py``-style loops change one place: ``model = PreLogits(model)`` with
    ``loss_fn = FusedHeadLoss.from_model(model, smoothing)``; validation still sees logits.
    Its state dict has the wrapped model's keys (no ``model.`` part), so checkpoints, EMA copies
    and pretrained weights load either way; nested in another module (DDP, ``torch.compile``, a
    task) its keys are the parent's prefix followed by those.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        for name in ("forward_features", "forward_head", "get_classifier"):
            if not hasattr(model, name):
                raise TypeError(f"model must be a timm model with {name}(), got {type(model).__name__}")
        self.model = model
        self._checked_id = 0  # id() of the classifier check_head passed (see forward)
        # hooks rather than overriding state_dict / load_state_dict: a parent module collects and
        # loads its children through these, with the child's prefix
        self.register_state_dict_post_hook(_drop_model_prefix)
        self.register_load_state_dict_pre_hook(_add_model_prefix)
        self.register_load_state_dict_post_hook(_report_without_model_prefix)

    def forward(self, x: torch.Tensor, pre_logits: bool | None = None) -> torch.Tensor:
        """Pre-logits (N, D) when ``pre_logits`` (default: ``self.training``), else logits (N, C).
        The first pre-logits call for a classifier checks that the model's logits are that
        classifier applied to them (:func:`check_head`).

        ``x`` is a batch of images: timm's NaFlex dict batches are refused, since their models'
        ``forward`` hands the padding mask to ``forward_head`` (masked pooling), which this
        forward could not pass on."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"x must be a tensor of images, got {type(x).__name__}: PreLogits calls forward_features(x) and "
                "forward_head, so a NaFlex dict batch's padding mask would not reach the head's pooling"
            )
        features = self.model.forward_features(x)
        pre_logits = self.training if pre_logits is None else pre_logits
        classifier = head_classifier(self.model)
        # an int attribute, which torch.compile guards: once checked, the recompiled graph holds no call
        if pre_logits and self._checked_id != id(classifier):
            self._check_head(features, classifier)
        return self.model.forward_head(features, pre_logits=pre_logits)

    @torch.compiler.disable  # under torch.compile: a graph break on the first step, the check eager
    def _check_head(self, features: torch.Tensor, classifier: nn.Module) -> None:
        if self.__dict__.get("_checked") is classifier:
            return
        check_head(self.model, features)
        # in __dict__: not a submodule, not in the state dict; holding it keeps its id from reuse
        self.__dict__["_checked"] = classifier
        self._checked_id = id(classifier)

    def get_classifier(self) -> nn.Module:
        return self.model.get_classifier()

    def __getattr__(self, name: str):
        """The wrapped model's attributes (``num_classes``, ``pretrained_cfg``,
        ``set_grad_checkpointing``, ...), so that training code written for a timm model
        finds them; ``no_weight_decay`` and ``group_matcher`` (timm's optimizer factory) name
        this module's parameters, which carry a ``model.`` prefix."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("__"):
                raise
        if name == "no_weight_decay" and hasattr(model, name):
            return lambda: {f"model.{n}" for n in model.no_weight_decay()}
        if name == "group_matcher" and hasattr(model, name):
            return functools.partial(_prefixed_group_matcher, model)
        return getattr(model, name)


def check_head(model: nn.Module, features: torch.Tensor) -> None:
    """Raise unless ``model.forward_head(features)`` is ``model.get_classifier()`` applied to
    ``model.forward_head(features, pre_logits=True)``: the fused loss takes those pre-logits
    and that classifier only, so a head that normalises or drops out after the pre-logits
    (EfficientViT's BatchNorm1d, MViTv2's head dropout) or adds a second head (VOLO's aux
    head, distilled models) would train on a different loss.

    Up to 4 rows of ``features``, in the model's current mode, the random generators forked
    and seeded alike for both calls (dropout before the pre-logits draws the same masks); the
    buffers (BatchNorm statistics) are restored afterwards. The classifier's input in the
    logits call must equal the pre-logits bit for bit, and the logits its output."""
    classifier = head_classifier(model)
    classifier_parameters(classifier)  # one Linear or 1x1 Conv2d, else a clear error
    rows = _first_rows(features, type(model).__name__)
    buffers = [(b, b.clone()) for b in model.buffers()]
    seen: list[torch.Tensor] = []
    hook = classifier.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    devices = [t.device for t in _tensors(rows) if t.is_cuda][:1]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            torch.manual_seed(0)
            pre = model.forward_head(rows, pre_logits=True)
            torch.manual_seed(0)
            logits = model.forward_head(rows)
    finally:
        hook.remove()
        with torch.no_grad():
            for b, saved in buffers:
                # through .data: no version bump, since the trunk's BatchNorm saved its running
                # statistics for the backward of this same step (copy_ on them failed it)
                b.data.copy_(saved)
    name = type(model).__name__
    if len(seen) != 1:
        raise ValueError(
            f"{name}.forward_head calls get_classifier() {len(seen)} times; the fused loss needs one "
            f"classifier on the pre-logits (models with two heads, such as distilled ones, are not supported)"
        )
    if seen[0].numel() != pre.numel() or not torch.equal(seen[0].reshape(pre.shape), pre):
        raise ValueError(
            f"{name}'s head transforms the pre-logits before its classifier (a norm or dropout after the "
            "pre-logits point), which the fused loss would skip; it cannot take this model's head"
        )
    with torch.no_grad():  # a Linear or 1x1 Conv2d: no randomness, no buffers
        direct = classifier(seen[0])
    if logits.numel() != direct.numel() or not torch.equal(logits.reshape(direct.shape), direct):
        raise ValueError(
            f"{name}'s logits are not its classifier's output (a second head or a transform after it), "
            "which the fused loss would skip; it cannot take this model's head"
        )


def _tensors(features) -> list[torch.Tensor]:
    return [features] if isinstance(features, torch.Tensor) else list(features)


def _first_rows(features, name: str):
    """Up to 4 rows of ``forward_features``' output: a tensor, or a list of per-stage tensors
    (CoaT) sliced alike; anything else (Inception v3's ``(features, aux)`` pair with
    ``aux_logits``) is refused."""
    if isinstance(features, torch.Tensor):
        return features[:4] if features.shape[0] > 1 else features
    if isinstance(features, list) and features and all(isinstance(t, torch.Tensor) for t in features):
        return [t[:4] for t in features]
    raise TypeError(
        f"{name}.forward_features returned a {type(features).__name__}, not a tensor or a list of tensors: "
        "the fused loss takes one classifier on the pre-logits (a model with an auxiliary head, such as "
        "Inception v3 with aux_logits, is not supported)"
    )


def _prefixed_group_matcher(model: nn.Module, coarse: bool = False):
    """``model.group_matcher`` for the names ``PreLogits`` gives its parameters: each name with
    its ``model.`` prefix goes to the layer the wrapped model's matcher gives it."""
    from timm.models import group_parameters

    layer_of = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
    return lambda name: layer_of.get(name.removeprefix("model."), float("inf"))


def _drop_model_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """``PreLogits``' keys ``prefix + "model." + key`` become ``prefix + key`` (in place, order kept)."""
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_model_prefix(module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
    """Before ``PreLogits`` loads: keys under ``prefix`` get back their ``model.`` part (a key
    that already has it, from a checkpoint saved before this naming, is left as it is)."""
    inner = prefix + "model."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix) :]] = state_dict.pop(key)
    module._loading_prefix = prefix


def _report_without_model_prefix(module: nn.Module, incompatible_keys) -> None:
    """After ``PreLogits`` loads: its missing and unexpected keys (``strict=False``'s report,
    ``strict=True``'s error) named as its state dict names them, without the ``model.`` part."""
    prefix = module.__dict__.pop("_loading_prefix", None)
    if prefix is None:
        return
    inner = prefix + "model."
    for keys in incompatible_keys:
        keys[:] = [prefix + k[len(inner) :] if k.startswith(inner) else k for k in keys]


if _TimmMixup is not None:

    class SparseMixup(_TimmMixup):
        """``timm.data.Mixup`` that returns ``(x_mixed, MixedTarget(y, y2, lam, eps))``.

        Same constructor, same random draws (numpy's global generator) and the same mixed
        images as timm's ``Mixup`` (modes "batch", "pair", "elem"; mixup, cutmix and their
        switch, ``correct_lam``); the target stays two labels and a weight, ``y2 = y.flip(0)``,
        ``lam`` a float ("batch") or an (N,) tensor. ``x, (y, y2, lam, eps) = mixup(x, y)``
        unpacks everything; ``x, target = mixup(x, y)`` drops into a timm training loop
        whose criterion is :class:`FusedHeadLoss`.
        """

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if self.multi_label:
                raise ValueError("SparseMixup mixes single-label class indices; multi_label=True needs timm's Mixup")

        def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, MixedTarget]:
            if len(x) % 2 != 0:
                raise ValueError(f"x must have an even batch size for Mixup, got {len(x)}")
            if target.dim() != 1 or target.is_floating_point():
                raise ValueError(f"target must be (N,) class indices, got {tuple(target.shape)} {target.dtype}")
            if self.mode == "elem":
                lam = self._mix_elem(x)[:, 0]
            elif self.mode == "pair":
                lam = self._mix_pair(x)[:, 0]
            else:
                lam = float(self._mix_batch(x))
            mixed = _MixupTarget(target, target.flip(0), lam, float(self.label_smoothing))
            mixed.num_classes = self.num_classes
            return x, mixed

    __all__.append("SparseMixup")


if _TimmClassificationTask is not None:

    class FusedClassificationTask(_TimmClassificationTask):
        """``timm.task.ClassificationTask`` with the fused head loss.

        ``FusedClassificationTask(model, label_smoothing=0.1)`` in place of
        ``ClassificationTask(model, criterion_kwargs=dict(smoothing=0.1))``; targets may be
        class indices, dense (N, C) probabilities or :class:`MixedTarget` (from
        :class:`SparseMixup`). The trainable module is :class:`PreLogits` (same state-dict
        keys as the model), so DDP, ``compile`` and EMA wrap the whole network. The result
        holds ``loss`` and ``pre_logits``; logits (``output``) only with
        ``return_logits=True``, computed without grad, since avoiding them is the point.
        """

        def __init__(
            self,
            model: nn.Module,
            label_smoothing: float = 0.0,
            *,
            return_logits: bool = False,
            impl: str = "auto",
            device: torch.device | None = None,
            dtype: torch.dtype | None = None,
            verbose: bool = True,
        ) -> None:
            criterion = FusedHeadLoss.from_model(model, label_smoothing, impl=impl)
            super().__init__(PreLogits(model), criterion=criterion, device=device, dtype=dtype, verbose=verbose)
            self.return_logits = return_logits

        def forward(self, input: torch.Tensor, target: torch.Tensor | MixedTarget) -> dict[str, torch.Tensor]:
            pre_logits = self.trainable_module(input, pre_logits=True)
            result = {"loss": self.criterion(pre_logits, target), "pre_logits": pre_logits}
            if self.return_logits:
                with torch.no_grad():
                    weight, bias = classifier_parameters(self.criterion.classifier)
                    result["output"] = nn.functional.linear(pre_logits.flatten(1), weight, bias)
            return result

    __all__.append("FusedClassificationTask")
