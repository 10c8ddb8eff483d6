"""nn.Module wrappers."""

from __future__ import annotations

import torch
from torch import nn

from fused_xent import functional
from fused_xent.functional import (
    _check_budget,
    _check_ignore_index,
    _check_options,
    _check_torch_options,
    _describe,
    _deterministic_impl,
    linear_cross_entropy,
)
from fused_xent.graphs import GraphedLoss


class LinearCrossEntropyLoss(nn.Module):
    """Holds the options of :func:`fused_xent.linear_cross_entropy`.

    ``forward(input, linear_weight, target, linear_bias=None, *, target2=None, lam=None)``
    returns what the function returns for those tensors and the stored options.

    ``cuda_graph=True`` (opt-in) records a training call (CUDA, grad enabled, class-index
    targets without ``target2`` / ``lam``, reduction "mean" or "sum", no ``return_lse``, no
    autocast, a float or no ``scale``) and its gradients into a CUDA graph once per signature
    (shapes, dtypes, the weight's, bias's and class weight's tensors) and replays it on later
    calls: a few launches of host work instead of ~30, for small heads where the host is the
    bound. Between calls the graph keeps its memory (``graph_bytes()``: a copy of the rows,
    one of the gradients, the chunks); ``memory_budget`` covers it. A backward that comes after
    a later call's replay recomputes its gradients. Other calls run as without it.
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
        cuda_graph: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph must be a bool, got {_describe(cuda_graph)}")
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
        self.cuda_graph = cuda_graph
        self._graphs = GraphedLoss()

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
        if self.cuda_graph and target2 is None and lam is None and self._graphable(input, linear_weight, target,
                                                                                   linear_bias):  # fmt: skip
            budget = self.memory_budget if self.memory_budget is not None else functional._MEMORY_BUDGET
            signature = self._signature(input, linear_weight, target, linear_bias)
            loss = self._graphs(self._call, signature, input, linear_weight, target, linear_bias, budget)
            if target.numel():  # the replay skips the label range check (NaN rows): it runs here, deferred
                functional._check_target_range(target.reshape(-1), None, None, linear_weight.shape[0],
                                               self.ignore_index)  # fmt: skip
            return loss
        return self._call(input, linear_weight, target, linear_bias, self.memory_budget, target2=target2, lam=lam)

    def graph_bytes(self) -> int:
        """Device memory the recorded CUDA graphs keep between calls (0 without ``cuda_graph``)."""
        return self._graphs.held_bytes()

    def _call(self, input, linear_weight, target, linear_bias, memory_budget, target2=None, lam=None):
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
            memory_budget=memory_budget,
        )

    def _graphable(self, x, w, target, b) -> bool:
        """Whether ``cuda_graph`` applies to the call (see the class's docstring)."""
        tensors = [t for t in (x, w, target, b, self.weight) if t is not None]
        return (
            all(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in (x, w, b) if t is not None)
            and not target.is_floating_point()
            and self.reduction != "none"
            and not self.return_lse
            and not isinstance(self.scale, torch.Tensor)
            and not torch.is_autocast_enabled("cuda")  # its casts are new tensors at every call
            and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing()
            and not functional._without_data(*tensors)
        )

    def _signature(self, x, w, target, b) -> tuple:
        """What a recorded graph is valid for: the tensors' layouts (the weights' addresses too)
        and the options, which a user may change on the module."""

        def held(t):
            return None if t is None else (t.data_ptr(), t.shape, t.stride(), t.dtype, t.device, t.requires_grad)

        deterministic = self.deterministic or torch.are_deterministic_algorithms_enabled()
        options = (self.reduction, self.ignore_index, self.label_smoothing, self.scale, self.softcap, self.z_loss,
                   self.impl, deterministic, self.memory_budget, functional._MEMORY_BUDGET)  # fmt: skip
        return (x.shape, x.dtype, x.device, x.requires_grad, target.shape, target.dtype, held(w), held(b),
                held(self.weight), options)  # fmt: skip

    def __getstate__(self) -> dict:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        state = dict(state)
        state["_graphs"] = None  # graphs and locks do not copy; a copy records its own
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._graphs = GraphedLoss()
        if not hasattr(self, "cuda_graph"):  # pickled before the option existed
            self.cuda_graph = False

    def extra_repr(self) -> str:
        return (
            f"reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, scale={self.scale}, softcap={self.softcap}, "
            f"z_loss={self.z_loss}, return_lse={self.return_lse}, impl={self.impl!r}, "
            f"deterministic={self.deterministic}, memory_budget={self.memory_budget}"
            + (", cuda_graph=True" if self.cuda_graph else "")
            + (f", options={self.options!r}" if self.options is not None else "")
        )
