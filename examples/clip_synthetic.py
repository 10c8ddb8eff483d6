"""Train a small CLIP on synthetic image-text pairs with fused_xent's contrastive loss.

    python examples/clip_synthetic.py                 # CLIP loss, CPU or GPU, ~30 s on CPU
    python examples/clip_synthetic.py --loss siglip   # SigLIP's sigmoid loss

Each pair shows one of ``--concepts`` hidden concepts: the "image" is the concept's random
pattern plus noise, the "caption" a bag of the concept's words plus random ones. Two small
encoders learn to meet in one embedding space; the loss never forms the B x B logit matrix
(``FusedClipLoss`` / ``FusedSigLipLoss`` are drop-ins for open_clip's ``ClipLoss`` /
``SigLipLoss``). The script ends with image-to-text retrieval accuracy on fresh pairs.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fused_xent.integrations.open_clip import FusedClipLoss, FusedSigLipLoss

IMAGE_SHAPE = (3, 16, 16)
WORDS_PER_CONCEPT, CAPTION_LENGTH, VOCAB = 4, 8, 1024


class SyntheticPairs:
    """Image-text pairs drawn from hidden concepts (a fixed generator, so runs repeat)."""

    def __init__(self, concepts: int, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(concepts, *IMAGE_SHAPE, generator=self.generator)
        self.concepts = concepts

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` (size, 3, 16, 16) float and ``captions`` (size, 8) int64 word ids."""
        g = self.generator
        concept = torch.randint(self.concepts, (size,), generator=g)
        images = self.patterns[concept] + 1.5 * torch.randn(size, *IMAGE_SHAPE, generator=g)
        own = concept[:, None] * WORDS_PER_CONCEPT
        own = own + torch.randint(WORDS_PER_CONCEPT, (size, CAPTION_LENGTH), generator=g)
        noise = torch.randint(self.concepts * WORDS_PER_CONCEPT, VOCAB, (size, CAPTION_LENGTH), generator=g)
        captions = torch.where(torch.rand(size, CAPTION_LENGTH, generator=g) < 0.6, own, noise)
        return images, captions


class TinyClip(nn.Module):
    """An MLP image tower, a bag-of-words text tower, and CLIP's learnable temperature (and bias)."""

    def __init__(self, dim: int, width: int = 256, siglip: bool = False):
        super().__init__()
        self.visual = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(IMAGE_SHAPE), width), nn.GELU(), nn.Linear(width, dim)
        )
        self.words = nn.EmbeddingBag(VOCAB, width, mode="mean")
        self.text = nn.Sequential(nn.GELU(), nn.Linear(width, dim))
        # open_clip's initialisations: CLIP log(1/0.07); SigLIP log(10) and bias -10
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0) if siglip else math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if siglip else None

    def forward(self, images, captions):
        image_features = F.normalize(self.visual(images), dim=-1)
        text_features = F.normalize(self.text(self.words(captions)), dim=-1)
        return image_features, text_features, self.logit_scale.exp(), self.logit_bias


@torch.no_grad()
def retrieval_accuracy(model: TinyClip, data: SyntheticPairs, size: int, device: torch.device) -> float:
    """Share of fresh images whose most similar caption shows the same concept."""
    g = data.generator
    concept = torch.randint(data.concepts, (size,), generator=g)
    images = data.patterns[concept] + 1.5 * torch.randn(size, *IMAGE_SHAPE, generator=g)
    words = concept[:, None] * WORDS_PER_CONCEPT + torch.randint(WORDS_PER_CONCEPT, (size, CAPTION_LENGTH), generator=g)
    image_features, text_features, _, _ = model(images.to(device), words.to(device))
    best = (image_features.float() @ text_features.float().T).argmax(dim=1).cpu()
    return (concept[best] == concept).float().mean().item()


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--concepts", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in ("steps", "dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 1 <= args.concepts <= VOCAB // WORDS_PER_CONCEPT:  # each concept owns its caption words
        parser.error(f"--concepts must lie in [1, {VOCAB // WORDS_PER_CONCEPT}], got {args.concepts}")

    torch.manual_seed(0)
    device = torch.device(args.device)
    data = SyntheticPairs(args.concepts)
    model = TinyClip(args.dim, siglip=args.loss == "siglip").to(device)
    loss_fn = FusedSigLipLoss() if args.loss == "siglip" else FusedClipLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    print(f"before training: retrieval accuracy {retrieval_accuracy(model, data, 1000, device):.3f}")
    progress = tqdm(range(args.steps), desc=f"{args.loss} loss, batch {args.batch_size}")
    for _ in progress:
        images, captions = (t.to(device) for t in data.batch(args.batch_size))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            image_features, text_features, scale, bias = model(images, captions)
        if bias is None:
            loss = loss_fn(image_features, text_features, scale)
        else:
            loss = loss_fn(image_features, text_features, scale, bias)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        progress.set_postfix(loss=f"{loss.item():.3f}", scale=f"{scale.item():.1f}")
    accuracy = retrieval_accuracy(model, data, 1000, device)
    print(f"after {args.steps} steps: retrieval accuracy {accuracy:.3f} (chance {1 / args.concepts:.3f})")
    return accuracy


if __name__ == "__main__":
    main()
