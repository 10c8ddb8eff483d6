"""CLIP's fused loss under CUDA graphs: ``torch.compile(FusedClipLoss(), mode="reduce-overhead")``
against the eager call, at B = 32768, D = 768 bf16 (SPEC's CLIP row).

In a fresh process: the compiled step is recorded, then the device memory its graphs keep is
read as the reserved memory after ``empty_cache`` less what was reserved before, less the
features' gradients; the median fw+bw of both (``triton.testing.do_bench``); and, on fresh
features written into the same tensors after recording, the compiled gradients against the
eager ones and both against an fp32 reference.

    PYTHONPATH=. python benchmarks/clip_graphs.py [--B 32768] [--D 768] [--impl auto]
"""

import argparse

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from fused_xent.integrations.open_clip import FusedClipLoss

SCALE = 100.0 / 1.5


def fresh(images, texts, seed: int) -> None:
    g = torch.Generator(device=images.device).manual_seed(seed)
    for t in (images, texts):
        t.data.copy_(F.normalize(torch.randn(t.shape, device=t.device, generator=g), dim=-1))


def reference(images, texts, scale):
    i, t = images.detach().float().requires_grad_(), texts.detach().float().requires_grad_()
    labels = torch.arange(i.shape[0], device=i.device)
    logits = scale.float() * i @ t.T
    ((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2).backward()
    return i.grad, t.grad


def rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=32768)
    parser.add_argument("--D", type=int, default=768)
    parser.add_argument("--impl", default="auto")
    args = parser.parse_args()
    dev = "cuda"
    images = torch.empty(args.B, args.D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    texts = torch.empty_like(images, requires_grad=True)
    scale = torch.tensor(SCALE, device=dev)
    loss_fn = FusedClipLoss(impl=args.impl)
    compiled = torch.compile(loss_fn, mode="reduce-overhead", dynamic=False)

    def step(fn):
        images.grad = texts.grad = None
        fn(images, texts, scale).backward()

    fresh(images, texts, 0)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    for _ in range(4):
        step(compiled)
    torch.cuda.synchronize()
    grads = 2 * images.numel() * images.element_size()
    torch.cuda.empty_cache()
    held = (torch.cuda.memory_reserved() - before - grads) / 2**20
    fresh(images, texts, 1)  # after recording: the graphs must read the new values
    step(compiled)
    got = (images.grad.clone(), texts.grad.clone())
    step(loss_fn)
    eager = (images.grad.clone(), texts.grad.clone())
    ref = reference(images, texts, scale)
    ms_graph = do_bench(lambda: step(compiled), warmup=25, rep=200, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(loss_fn)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms_eager = do_bench(lambda: step(loss_fn), warmup=25, rep=200, return_mode="median")
    print(f"# CLIP B={args.B} D={args.D} bf16 impl={args.impl}, {torch.cuda.get_device_name()}")
    print(f"eager:            {ms_eager:.2f} ms, peak extra {peak:.0f} MiB (grads included)")
    print(f"reduce-overhead:  {ms_graph:.2f} ms, graph pool held beyond the gradients {held:.0f} MiB")
    print(
        f"graph vs eager grads: {rel(got[0], eager[0]):.1e} / {rel(got[1], eager[1]):.1e}; vs fp32:"
        f" graph {rel(got[0], ref[0]):.1e} / {rel(got[1], ref[1]):.1e},"
        f" eager {rel(eager[0], ref[0]):.1e} / {rel(eager[1], ref[1]):.1e}"
    )


if __name__ == "__main__":
    main()
