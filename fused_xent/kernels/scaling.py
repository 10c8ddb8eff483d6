"""A stored gradient times the upstream gradient, in place, skipped on the device when that is 1.

The fast strategy forms dX, dW (and db, dscale) in the forward, for an upstream gradient of 1,
and its backward multiplies them by the loss's actual upstream gradient ``g``. As
``tensor.mul_(g)`` that is a read and a write of dW (1.2 GB at the Gemma 2 head) even when
``g`` is 1, which is what ``loss.backward()`` passes. Reading ``g`` on the host would cost a
sync; here every program reads it and returns at once when it is exactly 1: multiplying by 1
changes no value, so skipping the pass leaves every bit as the multiply would, and the
pass costs one launch (one for up to four tensors: ``scale_all_``). Any other ``g`` (NaN
included) multiplies in fp32 and rounds the product once to the tensor's dtype. (``mul_`` by
a 0-dim fp32 CUDA tensor rounds ``g`` itself to a 16-bit tensor's dtype first, an error of up
to 2**-9 of the gradient that this pass does not make.)
"""

import torch
import triton
import triton.language as tl

from fused_xent.kernels import config
from fused_xent.kernels.launch import fast_jit

#: Elements per program and iteration.
_BLOCK = 4096


#: Tensors one launch scales.
_SLOTS = 4


@triton.jit
def _scale_range(X, n, g, BLOCK: tl.constexpr):
    """``X[:n] *= g``, the programs striding over X by the grid's size."""
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        v = tl.load(X + offs, mask=mask)
        out = (v.to(tl.float32) * g).to(X.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(X + offs, out, mask=mask)


@fast_jit
@triton.jit
def scale_in_place_kernel(X0, n0, X1, n1, X2, n2, X3, n3, G, BLOCK: tl.constexpr):
    """``Xk[:nk] *= G[0]`` for the four tensors (an unused slot has ``nk = 0``) unless
    ``G[0] == 1``."""
    g = tl.load(G).to(tl.float32)
    if g != 1.0:
        _scale_range(X0, n0, g, BLOCK)
        _scale_range(X1, n1, g, BLOCK)
        _scale_range(X2, n2, g, BLOCK)
        _scale_range(X3, n3, g, BLOCK)


def scale_(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``t *= g`` for a one-element ``g`` on ``t``'s device, without the pass when ``g`` is 1
    (the kernel, for contiguous 16-bit or fp32 tensors on a GPU or under the interpreter;
    ``mul_`` otherwise, fp64 included). Returns ``t``."""
    scale_all_([t], g)
    return t


def scale_all_(tensors: list[torch.Tensor], g: torch.Tensor) -> None:
    """``scale_`` of every tensor, those the kernel takes four to a launch (the fast
    strategy's backward scales dX, dW, db and dscale in one)."""
    if g.numel() != 1:
        raise ValueError(f"scale_: g must hold one element, got shape {tuple(g.shape)}")
    ours, others = [], []
    for t in tensors:
        on_triton = t.is_cuda or (config.interpreting() and t.device.type == "cpu")
        if not on_triton or t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not t.is_contiguous():
            others.append(t)
        elif g.device != t.device:  # before any tensor changes
            raise ValueError(f"scale_: g is on {g.device}, the tensor on {t.device}")
        elif t.numel():
            ours.append(t)
    for t in others:
        t.mul_(g.reshape(()))
    for i in range(0, len(ours), _SLOTS):
        group = ours[i : i + _SLOTS]
        slots = [(t, t.numel()) for t in group] + [(group[0], 0)] * (_SLOTS - len(group))
        programs = min(triton.cdiv(max(n for _, n in slots), _BLOCK), config.target_programs(group[0].device) * 2)
        scale_in_place_kernel[(programs,)](*(a for slot in slots for a in slot), g, BLOCK=_BLOCK, num_warps=4)
