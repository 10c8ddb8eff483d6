"""nn.Module wrappers."""

from __future__ import annotations

import torch
from torch import nn

from fused_xent.functional import (
    _check_budget,
    _check_ignore_index,
    _check_options,
    _check_torch_options,
    _describe,
    _deterministic_impl,
    linear_cross_entropy,
)


class LinearCrossEntropyLoss(nn.Module):
    """Holds the options of :func:`fused_xent.linear_cross_entropy`.

    ``forward(input, linear_weight, target, linear_bias=None, *, target2=None, lam=None)``
    returns what the function returns for those tensors and the stored options.
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        *,
        reduction: str = "mean",
        ignore_index: int | None = -100,
        label_smoothing: float = 0.0,
        options=None,
        scale: float | None = None,
        softcap: float | None = None,
        z_loss: float = 0.0,
        return_lse: bool = False,
        impl: str = "auto",
        deterministic: bool = False,
        memory_budget: int | None = None,
    ) -> None:
        super().__init__()
        _check_torch_options(options)
        # the options' own checks at construction (tensor-dependent ones wait for the call)
        _check_options(reduction, label_smoothing, z_loss, softcap, impl, return_lse)
        _check_ignore_index(ignore_index)
        _check_budget(memory_budget)
        _deterministic_impl(impl, deterministic, read_global=False)
        if weight is not None and (not isinstance(weight, torch.Tensor) or weight.dim() != 1):
            raise ValueError(f"weight must be None or a (C,) tensor of class weights, got {_describe(weight)}")
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.options = options
        self.scale = scale
        self.softcap = softcap
        self.z_loss = z_loss
        self.return_lse = return_lse
        self.impl = impl
        self.deterministic = deterministic
        self.memory_budget = memory_budget

    def forward(
        self,
        input: torch.Tensor,
        linear_weight: torch.Tensor,
        target: torch.Tensor,
        linear_bias: torch.Tensor | None = None,
        *,
        target2: torch.Tensor | None = None,
        lam: float | torch.Tensor | None = None,
    ):
        return linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias=linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            options=self.options,
            scale=self.scale,
            softcap=self.softcap,
            z_loss=self.z_loss,
            target2=target2,
            lam=lam,
            return_lse=self.return_lse,
            impl=self.impl,
            deterministic=self.deterministic,
            memory_budget=self.memory_budget,
        )

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, scale={self.scale}, softcap={self.softcap}, "
            f"z_loss={self.z_loss}, return_lse={self.return_lse}, impl={self.impl!r}, "
            f"deterministic={self.deterministic}, memory_budget={self.memory_budget}"
            + (f", options={self.options!r}" if self.options is not None else "")
        )
