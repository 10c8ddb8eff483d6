"""A 1,000,000-class ArcFace head trained a few steps on synthetic features, with fused_xent
computing the margin loss without the batch x classes logits.

    python examples/extreme_classes.py                 # 1M classes on CUDA, 20k on CPU
    python examples/extreme_classes.py --classes 100000 --steps 50 --margin cosface

Each class has a random unit prototype; a sample is its class's prototype plus noise,
passed through a trainable linear embedding (what a face backbone would be). Few classes
are seen twice in a few steps, so the loss falls because the embedding learns to map the
prototypes onto the head's (randomly initialised) class centres.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn
from tqdm import tqdm

from fused_xent.integrations.margins import MarginHead

MARGINS = {"arcface": dict(m2=0.5, m3=0.0), "cosface": dict(m2=0.0, m3=0.4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=None, help="default: 1,000,000 on CUDA, 20,000 on CPU")
    parser.add_argument("--features", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4096 on CUDA, 256 on CPU")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--margin", choices=list(MARGINS), default="arcface")
    parser.add_argument("--scale", type=float, default=64.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("classes", "batch_size", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    C = args.classes or (1_000_000 if cuda else 20_000)
    N = args.batch_size or (4096 if cuda else 256)
    D = args.features
    torch.manual_seed(args.seed)

    prototypes = nn.functional.normalize(torch.randn(C, D, device=device), dim=-1).to(dtype)
    backbone = nn.Linear(D, D, device=device, dtype=dtype)
    head = MarginHead(D, C, s=args.scale, **MARGINS[args.margin], device=device, dtype=dtype)
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=args.lr)
    print(f"{C:,} classes x {D} features, batch {N}, {args.margin}, {dtype} on {device}; log(C) = {math.log(C):.2f}")
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    bar = tqdm(range(args.steps), desc="train")
    for _ in bar:
        y = torch.randint(0, C, (N,), device=device)
        x = prototypes[y] + 0.5 * torch.randn(N, D, device=device, dtype=dtype) / math.sqrt(D)
        loss = head(backbone(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    if cuda:
        print(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (weights + optimizer state included)")


if __name__ == "__main__":
    main()
