"""Tile sweep for CLIP's lean backend at B = 32768, D = 768 bf16 (issue 4's anchor): the forward
from cuBLAS chunks + the stats kernel against the one-pass Triton forward (``clip_xent``), the
backward's dz from a cuBLAS GEMM + the grad kernel against ``clip_fused_grad_kernel`` at several
tiles, and whole forward + backward steps; gradient errors against fp32 logits.

    PYTHONPATH=. python benchmarks/tune_clip.py [--B 32768] [--D 768]
"""

import argparse
import itertools

import torch
import torch.nn.functional as F
import triton

from fused_xent.integrations import open_clip as fused
from fused_xent.kernels import clip_chunked, clip_xent


def _features(B: int, D: int):
    g = torch.Generator(device="cuda").manual_seed(1)
    images = F.normalize(torch.randn(B, D, device="cuda", generator=g), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(B, D, device="cuda", generator=g), dim=-1)
    return images, texts


def _reference_grads(x32, y32, scale):
    x32, y32 = x32.clone().requires_grad_(), y32.clone().requires_grad_()
    logits = scale * x32 @ y32.T
    labels = torch.arange(x32.shape[0], device="cuda")
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    loss.backward()
    return x32.grad, y32.grad


def _err(got, want) -> float:
    return ((got.float() - want).norm() / want.norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=32768)
    parser.add_argument("--D", type=int, default=768)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    x32, y32 = _features(args.B, args.D)
    x, y = x32.bfloat16(), y32.bfloat16()
    scale = torch.tensor([100.0 / 1.5], device="cuda")
    rows = []

    # forward: lean (cuBLAS + stats) vs the one-pass Triton forward at several tiles
    ms = triton.testing.do_bench(lambda: clip_chunked.clip_chunked_forward(x, y, scale))
    rows.append(("forward lean (cuBLAS + stats)", ms, ""))
    ref_stats = clip_chunked.clip_chunked_forward(x, y, scale)
    default_blocks, default_programs = clip_xent._forward_blocks, clip_xent._forward_programs
    for (bm, bn, warps, stages), waves in itertools.product(
        [(128, 128, 8, 3), (128, 128, 4, 3), (128, 256, 8, 3), (64, 256, 4, 3), (128, 128, 8, 4)], [1, 2]
    ):
        blocks = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64, num_warps=warps, num_stages=stages)
        clip_xent._forward_blocks = lambda device, blocks=blocks: blocks
        clip_xent._forward_programs = lambda device, waves=waves: waves * 132
        try:
            got = clip_xent.clip_xent_forward(x, y, scale)
            diff = max((a - b).abs().max().item() for a, b in zip(got, ref_stats, strict=True))
            ms = triton.testing.do_bench(lambda: clip_xent.clip_xent_forward(x, y, scale))
            rows.append((f"forward triton {bm}x{bn} w{warps} s{stages} x{waves}", ms, f"max |d lse| {diff:.3f}"))
        except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
            rows.append((f"forward triton {bm}x{bn} w{warps} s{stages} x{waves}", float("nan"), type(e).__name__))
    clip_xent._forward_blocks, clip_xent._forward_programs = default_blocks, default_programs

    # backward alone, the loss's upstream gradients
    B = args.B
    lse_row, lse_col, _ = ref_stats
    g_row = torch.full((B,), 0.5 / B, device="cuda")
    g_col = g_row.clone()
    g_diag = torch.full((B,), -1.0 / B, device="cuda")
    want_dx, want_dy = _reference_grads(x.float(), y.float(), scale)

    def backward():
        return clip_chunked.clip_chunked_backward(x, y, scale, lse_row, lse_col, g_row, g_col, g_diag)

    clip_chunked.FUSED_GRAD = False
    dx, dy, _ = backward()
    ms = triton.testing.do_bench(backward)
    rows.append(("backward cuBLAS + grad kernel", ms, f"err dx {_err(dx, want_dx):.2e} dy {_err(dy, want_dy):.2e}"))
    clip_chunked.FUSED_GRAD = True
    default_fused = dict(clip_chunked.FUSED_GRAD_BLOCKS)
    for bm, bn, warps, stages, group in [
        (128, 128, 8, 3, 8),
        (128, 128, 4, 3, 8),
        (128, 256, 8, 3, 8),
        (128, 128, 8, 4, 8),
        (64, 256, 4, 3, 8),
        (128, 128, 4, 4, 16),
        (256, 128, 8, 3, 8),
    ]:
        clip_chunked.FUSED_GRAD_BLOCKS.update(
            GROUP_M=group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=64, num_warps=warps, num_stages=stages
        )
        name = f"backward fused {bm}x{bn} w{warps} s{stages} g{group}"
        try:
            dx, dy, _ = backward()
            ms = triton.testing.do_bench(backward)
            rows.append((name, ms, f"err dx {_err(dx, want_dx):.2e} dy {_err(dy, want_dy):.2e}"))
        except Exception as e:  # noqa: BLE001
            rows.append((name, float("nan"), type(e).__name__))
    clip_chunked.FUSED_GRAD_BLOCKS.clear()
    clip_chunked.FUSED_GRAD_BLOCKS.update(default_fused)

    # whole steps through FusedClipLoss
    loss_fn = fused.FusedClipLoss(impl="lean")
    xi, yi = x.clone().requires_grad_(), y.clone().requires_grad_()

    def step():
        xi.grad = yi.grad = None
        loss_fn(xi, yi, scale[0]).backward()

    for fused_grad in (False, True):
        clip_chunked.FUSED_GRAD = fused_grad
        step()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
        ms = triton.testing.do_bench(step)
        errs = f"err dx {_err(xi.grad, want_dx):.2e} dy {_err(yi.grad, want_dy):.2e}, {peak:.0f} MiB"
        rows.append((f"step lean, fused grad {fused_grad}", ms, errs))

    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} B={B} D={args.D}")
    for name, ms, extra in rows:
        print(f"{name:45s} {ms:8.3f} ms  {extra}")


if __name__ == "__main__":
    main()
