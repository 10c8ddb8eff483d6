"""A stored gradient times the upstream gradient, in place, skipped on the device when that is 1.

The fast strategy forms dX, dW (and db, dscale) in the forward, for an upstream gradient of 1,
and its backward multiplies them by the loss's actual upstream gradient ``g``. As
``tensor.mul_(g)`` that is a read and a write of dW (1.2 GB at the Gemma 2 head) even when
``g`` is 1, which is what ``loss.backward()`` passes. Reading ``g`` on the host would cost a
sync; here every program reads it and returns at once when it is exactly 1: multiplying by 1
changes no value, so skipping the pass leaves every bit as the multiply would, and the
pass costs one launch. Any other ``g`` (NaN included) multiplies in fp32 and rounds the product
once to the tensor's dtype. (``mul_`` by a 0-dim fp32 CUDA tensor rounds ``g`` itself to a 16-bit
tensor's dtype first, an error of up to 2**-9 of the gradient that this pass does not make.)
"""

import torch
import triton
import triton.language as tl

from fused_xent.kernels import config

#: Elements per program and iteration.
_BLOCK = 4096


@triton.jit
def scale_in_place_kernel(X, G, n, BLOCK: tl.constexpr):
    """``X[:n] *= G[0]`` unless ``G[0] == 1``; programs stride over X by the grid's size."""
    g = tl.load(G).to(tl.float32)
    if g != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        for start in range(tl.program_id(0).to(tl.int64) * BLOCK, n, step):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            v = tl.load(X + offs, mask=mask)
            out = (v.to(tl.float32) * g).to(X.dtype.element_ty, fp_downcast_rounding="rtne")
            tl.store(X + offs, out, mask=mask)


def scale_(t: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``t *= g`` for a one-element ``g`` on ``t``'s device, without the pass when ``g`` is 1
    (the kernel, for contiguous 16-bit or fp32 tensors on a GPU or under the interpreter;
    ``mul_`` otherwise, fp64 included). Returns ``t``."""
    if g.numel() != 1:
        raise ValueError(f"scale_: g must hold one element, got shape {tuple(g.shape)}")
    on_triton = t.is_cuda or (config.interpreting() and t.device.type == "cpu")
    if not on_triton or t.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not t.is_contiguous():
        return t.mul_(g.reshape(()))
    if g.device != t.device:
        raise ValueError(f"scale_: g is on {g.device}, the tensor on {t.device}")
    n = t.numel()
    if n:
        programs = min(triton.cdiv(n, _BLOCK), config.target_programs(t.device) * 2)
        scale_in_place_kernel[(programs,)](t, g, n, BLOCK=_BLOCK, num_warps=4)
    return t
