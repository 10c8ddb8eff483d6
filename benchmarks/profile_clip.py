"""Where each CLIP backend spends its time: torch.profiler over one forward + backward of
``FusedClipLoss`` at B = 32768, D = 768 bf16 (the issue's anchor), top kernels by CUDA time.

    PYTHONPATH=. python benchmarks/profile_clip.py [--impls lean,triton] [--B 32768] [--D 768]
"""

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from fused_xent.integrations.open_clip import FusedClipLoss


def profile_backend(impl: str, images, texts, scale, rows: int) -> None:
    """Warm up, time one step with CUDA events, then print the profiler's kernel table."""
    loss_fn = FusedClipLoss(impl=impl)

    def step():
        images.grad = texts.grad = None
        loss_fn(images, texts, scale).backward()

    for _ in range(3):  # compilation, autotuning, allocator warm-up
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    B, D = images.shape
    print(
        f"\n=== impl={impl}  B={B} D={D} bf16: one step {start.elapsed_time(end):.2f} ms,"
        f" {kernels_ms:.2f} ms in kernels"
    )
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", default="lean,triton", help="comma-separated CLIP backends")
    parser.add_argument("--B", type=int, default=32768)
    parser.add_argument("--D", type=int, default=768)
    parser.add_argument("--rows", type=int, default=15, help="kernels listed per backend")
    args = parser.parse_args()

    g = torch.Generator(device="cuda").manual_seed(1)
    images = F.normalize(torch.randn(args.B, args.D, device="cuda", generator=g), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(args.B, args.D, device="cuda", generator=g), dim=-1)
    images, texts = (t.bfloat16().requires_grad_() for t in (images, texts))
    scale = torch.tensor(100.0 / 1.5, device="cuda")
    for impl in args.impls.split(","):
        profile_backend(impl, images, texts, scale, args.rows)


if __name__ == "__main__":
    main()
