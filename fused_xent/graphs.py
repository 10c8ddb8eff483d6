"""A loss call and its gradients replayed from one CUDA graph (``LinearCrossEntropyLoss(cuda_graph=True)``).

A small head is bound by the host, not the GPU: lean's fw+bw at the ViT-21k head (4096 x 768 x
21841) is ~30 launches and ~1.35 ms of GPU work, but 1.9-3 ms of Python, launches and autograd
per call on the H100's host (``benchmarks/NOTES.md``, sessions 17-18). Here the first call of
each signature records the loss and its gradients for an upstream gradient of 1 into a CUDA
graph, on static copies of the rows and labels (the weight and bias are read in place: the
signature holds their addresses). A later call copies its rows and labels in and replays the
graph; its backward hands autograd fresh tensors, the recorded gradients times the upstream
gradient (autograd may keep what it is given, and the next replay overwrites the graph's own).

Memory: the graph keeps its private pool between calls: the copy of the rows, one set of
gradients, and the backend's chunks. ``GraphedLoss.held_bytes`` reports it; the call's peak
comes on top (the fresh gradients). A user's ``memory_budget`` (bytes beyond the gradients)
covers both: the recorded call gets what remains after the pool's copy of the rows and of the
gradients, less 8 MiB for the pool's rounding.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings
from collections.abc import Callable

import torch

from fused_xent import functional

#: The pool's rounding and small blocks (lse, row targets), beyond the bytes counted
#: (``benchmarks/NVIDIA-H100-80GB-HBM3/probe_lean_graph.log``: 2-12 MiB at the ViT-21k head).
POOL_SLACK = 8 * 2**20
#: Re-recordings of one module before it warns that its calls' signatures keep changing.
WARN_AFTER = 4


@dataclasses.dataclass
class _Recorded:
    """One recorded signature: the graph, its static inputs and outputs, and its generation,
    which each replay advances (a backward of an older generation recomputes instead)."""

    key: tuple
    graph: torch.cuda.CUDAGraph
    rows: torch.Tensor
    target: torch.Tensor
    loss: torch.Tensor
    grads: tuple[torch.Tensor | None, ...]  # (dx, dw, db) for an upstream gradient of 1
    held: int
    generation: int = 0


class GraphedLoss:
    """The recorded graphs of one module, one per device (a new signature replaces the old)."""

    def __init__(self) -> None:
        self._recorded: dict[torch.device, _Recorded] = {}
        self._lock = threading.Lock()
        self.recordings = 0

    def held_bytes(self) -> int:
        """Device memory the recorded graphs keep between calls (their pools and static rows)."""
        return sum(r.held for r in self._recorded.values())

    def clear(self) -> None:
        """Drop every recorded graph; a backward still to come recomputes its gradients."""
        with self._lock:
            for recorded in self._recorded.values():
                recorded.generation = -1
                recorded.grads = ()
            self._recorded.clear()

    def __call__(self, run: Callable, key: tuple, x, w, target, b, budget: int | None) -> torch.Tensor:
        """The loss of ``run(x, w, target, b, memory_budget)`` from a replay, recording first
        where ``key`` (the call's signature) is new on this device."""
        with self._lock:
            recorded = self._recorded.get(x.device)
            if recorded is None or recorded.key != key:
                if recorded is not None:
                    recorded.generation, recorded.grads = -1, ()
                    del self._recorded[x.device]
                recorded = self._record(run, key, x, w, target, b, budget)
                self._recorded[x.device] = recorded
            recorded.rows.detach().copy_(x)
            recorded.target.copy_(target)
            recorded.graph.replay()
            recorded.generation += 1
            generation = recorded.generation
        return _Replayed.apply(recorded, generation, _Recompute(run, budget), x, w, b, target)

    def _record(self, run, key, x, w, target, b, budget) -> _Recorded:
        self.recordings += 1
        if self.recordings == WARN_AFTER:
            warnings.warn(
                f"LinearCrossEntropyLoss(cuda_graph=True) has recorded {WARN_AFTER} graphs: the shapes, dtypes or "
                "the weight's / bias's tensors (addresses) change between calls, and each change records anew; "
                "cuda_graph=True helps only where they stay the same",
                stacklevel=4,
            )
        rows = x.detach().clone(memory_format=torch.contiguous_format).requires_grad_(x.requires_grad)
        labels = target.clone()
        # fresh leaves on the weight's and bias's storage: their hooks fire at the replay's
        # backward (autograd's, outside the graph), not while recording
        w_leaf = w.detach().requires_grad_(w.requires_grad)
        b_leaf = None if b is None else b.detach().requires_grad_(b.requires_grad)
        leaves = [t for t in (rows, w_leaf, b_leaf) if t is not None and t.requires_grad]
        static = rows.nbytes + sum(t.nbytes for t in leaves)
        inner = None if budget is None else max(0, budget - static - POOL_SLACK)

        def body():
            with torch.enable_grad():
                loss = run(rows, w_leaf, labels, b_leaf, inner)
                grads = iter(torch.autograd.grad(loss, leaves))
            return loss.detach(), tuple(next(grads) if t is not None and t.requires_grad else None
                                        for t in (rows, w_leaf, b_leaf))  # fmt: skip

        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # compiles the kernels and makes cuBLAS's handles outside the capture
            for _ in range(2):
                body()
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        token = functional.RECORDING_GRAPH.set(True)
        try:
            with torch.cuda.graph(graph):
                # read after entering: entering empties the allocator's cache; the private pool's
                # segments are new ones, so the reserved memory grows by the pool
                reserved = torch.cuda.memory_reserved(x.device)
                loss, grads = body()
        finally:
            functional.RECORDING_GRAPH.reset(token)
        held = torch.cuda.memory_reserved(x.device) - reserved + rows.nbytes + labels.nbytes
        return _Recorded(key, graph, rows, labels, loss, grads, held)


@dataclasses.dataclass
class _Recompute:
    """A backward whose replay is no longer the graph's latest (another call replayed it since,
    or a new signature replaced it) recomputes its gradients through the ordinary call."""

    run: Callable
    budget: int | None

    def __call__(self, x, w, b, target, g: torch.Tensor, needs: list[bool]) -> list[torch.Tensor | None]:
        leaves = [
            None if t is None else t.detach().requires_grad_(need) for t, need in zip((x, w, b), needs, strict=True)
        ]
        with torch.enable_grad():
            loss = self.run(*leaves[:2], target, leaves[2], self.budget)
            wanted = [t for t in leaves if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(loss, wanted, g))
        return [next(grads) if t is not None and t.requires_grad else None for t in leaves]


class _Replayed(torch.autograd.Function):
    """The replayed loss as a node of the caller's autograd graph."""

    @staticmethod
    def forward(ctx, recorded: _Recorded, generation: int, recompute: _Recompute, x, w, b, target):
        ctx.recorded, ctx.generation, ctx.recompute = recorded, generation, recompute
        ctx.save_for_backward(x, w, b, target)  # version checks, and the recompute's inputs
        return recorded.loss.clone()

    @staticmethod
    def backward(ctx, g):
        x, w, b, target = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[3:6])
        if ctx.recorded.generation != ctx.generation:
            grads = ctx.recompute(x, w, b, target, g, needs)
        else:
            grads = [
                s * g if s is not None and need else None for s, need in zip(ctx.recorded.grads, needs, strict=True)
            ]
        return None, None, None, *grads, None
