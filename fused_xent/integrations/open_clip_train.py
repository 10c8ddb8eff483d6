"""open_clip's own training entry point with the fused losses.

    python -m fused_xent.integrations.open_clip_train <open_clip_train.main arguments>

trains exactly as ``python -m open_clip_train.main`` does, except that the loss factory
(``open_clip.create_loss``) returns :class:`~fused_xent.integrations.open_clip.FusedClipLoss`
for CLIP models and :class:`~fused_xent.integrations.open_clip.FusedSigLipLoss` with
``--siglip``; distillation and CoCa keep open_clip's losses. Every flag (``--local-loss``,
``--gather-with-grad``, ``--loss-dist-impl``, ...) keeps its meaning.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from fused_xent.integrations.open_clip import FusedClipLoss, FusedSigLipLoss


def fused_create_loss(args, original=None):
    """``open_clip.create_loss(args)`` with the fused CLIP / SigLIP losses; ``original`` (open_clip's
    factory) builds the losses that have no fused counterpart."""
    if args.distill or "coca" in args.model.lower():
        if original is None:
            import open_clip.factory

            original = open_clip.factory.create_loss
        return original(args)
    if args.siglip:
        if getattr(args, "horovod", False):  # as open_clip's own create_loss refuses it
            raise ValueError("--horovod is not supported with --siglip (open_clip's SigLipLoss has no horovod path)")
        return FusedSigLipLoss(rank=args.rank, world_size=args.world_size, dist_impl=args.loss_dist_impl)
    return FusedClipLoss(
        local_loss=args.local_loss,
        gather_with_grad=args.gather_with_grad,
        cache_labels=True,
        rank=args.rank,
        world_size=args.world_size,
        use_horovod=args.horovod,
    )


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """Within the block, ``open_clip.create_loss`` (and the names that training code imported from
    it) build the fused losses; open_clip's factory is restored on exit."""
    import open_clip
    import open_clip.factory

    original = open_clip.factory.create_loss
    modules = [open_clip, open_clip.factory]
    main_module = sys.modules.get("open_clip_train.main")
    if main_module is not None:
        modules.append(main_module)

    def create_loss(args):
        return fused_create_loss(args, original)

    saved = [(module, module.create_loss) for module in modules]
    for module in modules:
        module.create_loss = create_loss
    try:
        yield
    finally:
        for module, value in saved:
            module.create_loss = value


def main(argv: list[str] | None = None):
    """Run ``open_clip_train.main.main(argv)`` with the fused losses."""
    try:
        import open_clip_train.main
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"open_clip's training entry point needs its training packages ({e.name} is missing): "
            'pip install "fused_xent[clip-train]" (open_clip_torch[training])'
        ) from e

    with patched():
        return open_clip_train.main.main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
