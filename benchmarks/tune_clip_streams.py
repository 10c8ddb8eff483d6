"""CLIP's lean backward with and without the side stream for the dY GEMMs (B = 32768, D = 768
bf16): fw+bw steps of ``FusedClipLoss`` timed alternately (do_bench medians), the gradients of
both compared bitwise, peak memory of each.

    PYTHONPATH=. python benchmarks/tune_clip_streams.py [--B 32768] [--D 768] [--rounds 3]
"""

import argparse

import torch
import torch.nn.functional as F
import triton

from fused_xent.integrations import open_clip as fused
from fused_xent.kernels import clip_chunked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--B", type=int, default=32768)
    parser.add_argument("--D", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(1)
    images = F.normalize(torch.randn(args.B, args.D, device="cuda", generator=g), dim=-1)
    texts = F.normalize(images + 0.8 * torch.randn(args.B, args.D, device="cuda", generator=g), dim=-1)
    x, y = (t.bfloat16().requires_grad_() for t in (images, texts))
    scale = torch.tensor(100.0 / 1.5, device="cuda")
    loss_fn = fused.FusedClipLoss(impl="lean")

    def step():
        x.grad = y.grad = None
        loss_fn(x, y, scale).backward()

    grads, times, peaks = {}, {False: [], True: []}, {}
    for side in (False, True):
        clip_chunked.SIDE_STREAM = side
        step()
        torch.cuda.synchronize()
        grads[side] = (x.grad.clone(), y.grad.clone())
        x.grad = y.grad = None
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peaks[side] = (torch.cuda.max_memory_allocated() - before) / 2**20
    for _ in range(args.rounds):
        for side in (False, True):
            clip_chunked.SIDE_STREAM = side
            times[side].append(triton.testing.do_bench(step))
    same = all(torch.equal(a, b) for a, b in zip(grads[False], grads[True], strict=True))
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} B={args.B} D={args.D}")
    for side in (False, True):
        ms = " ".join(f"{t:.3f}" for t in times[side])
        mid = sorted(times[side])[len(times[side]) // 2]
        print(f"side stream {side!s:5}: ms {ms} (middle {mid:.3f}), peak {peaks[side]:.0f} MiB above the features")
    print(f"gradients bitwise equal: {same}")


if __name__ == "__main__":
    main()
