"""A tiny timm ViT trained on sklearn's 8x8 digits with label smoothing and Mixup / CutMix,
the loss computed from pre-logits by fused_xent (no logits, no dense mixup targets).

    python examples/timm_vit_mixup.py --epochs 30

The only changes to a timm training loop: ``SparseMixup`` for ``Mixup``, ``PreLogits(model)``
for ``model`` and ``FusedHeadLoss.from_model`` for ``SoftTargetCrossEntropy``.
"""

from __future__ import annotations

import argparse

import numpy as np
import timm
import torch
from sklearn.datasets import load_digits
from tqdm import tqdm

from fused_xent.integrations.timm import FusedHeadLoss, PreLogits, SparseMixup


def digits(device: str):
    """Images (1797, 1, 8, 8) scaled to [-1, 1] and labels, split 80 / 20."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm].to(device), y[perm].to(device)
    cut = int(0.8 * len(y))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be at least 1, got {args.epochs}")
    if args.batch_size < 2 or args.batch_size % 2:  # timm's Mixup pairs the batch with its reverse
        parser.error(f"--batch-size must be an even number >= 2 (Mixup), got {args.batch_size}")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)  # Mixup draws from numpy, as timm's
    device = "cuda" if torch.cuda.is_available() else "cpu"

    (x_train, y_train), (x_test, y_test) = digits(device)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=2,
        in_chans=1,
        num_classes=10,
        embed_dim=64,
        depth=4,
        num_heads=4,
    ).to(device)
    model = PreLogits(model)  # training: pre-logits; eval: logits
    loss_fn = FusedHeadLoss.from_model(model)  # smoothing comes with the mixed target
    mixup = SparseMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=args.smoothing, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = args.epochs * (len(y_train) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)

    bar = tqdm(total=steps, desc="train")
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(len(y_train), device=device)
        for i in range(len(y_train) // args.batch_size):
            idx = order[i * args.batch_size : (i + 1) * args.batch_size]
            x, target = mixup(x_train[idx].clone(), y_train[idx])
            loss = loss_fn(model(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(-1) == y_test).float().mean().item()
    print(f"test accuracy {accuracy:.3f} on {len(y_test)} digits")


if __name__ == "__main__":
    main()
