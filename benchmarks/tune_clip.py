"""Tile sweep for CLIP's lean backend at B = 32768, D = 768 bf16 (issue 4's anchor): the
backward's grad kernel and the forward's stats kernel over several tiles, then whole forward +
backward steps with the best of each (time, peak memory, gradient errors against fp32 logits,
the profiler's kernel time against the wall time, host syncs).

    PYTHONPATH=. python benchmarks/tune_clip.py [--B 32768] [--D 768]
"""

import argparse

import torch
import torch.nn.functional as F
import triton
from torch.profiler import ProfilerActivity, profile

from fused_xent.integrations import open_clip as fused
from fused_xent.kernels import clip_chunked


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

    ref_stats = clip_chunked.clip_chunked_forward(x, y, scale)
    B = args.B
    lse_row, lse_col, _ = ref_stats
    g_row = torch.full((B,), 0.5 / B, device="cuda")
    g_col = g_row.clone()
    g_diag = torch.full((B,), -1.0 / B, device="cuda")
    want_dx, want_dy = _reference_grads(x.float(), y.float(), scale)

    def backward():
        return clip_chunked.clip_chunked_backward(x, y, scale, lse_row, lse_col, g_row, g_col, g_diag)

    best_grad = (float("inf"), None)
    for block_n, block_c, warps, stages, per_program in [
        (8, 128, 2, 2, 1024),
        (16, 256, 4, 2, 1024),
        (32, 256, 4, 2, 256),
        (32, 256, 8, 2, 1024),
        (64, 128, 4, 2, 128),
        (64, 256, 8, 2, 256),
        (32, 128, 4, 3, 1024),
        (16, 512, 4, 2, 512),
        (8, 512, 4, 2, 1024),
        (16, 128, 2, 3, 1024),
    ]:
        config = dict(BLOCK_N=block_n, BLOCK_C=block_c, STAGES=stages, num_warps=warps)
        clip_chunked.GRAD_BLOCKS = config
        clip_chunked.GRAD_COLS_PER_PROGRAM = per_program
        dx, dy, _ = backward()
        ms = triton.testing.do_bench(backward)
        errs = f"err dx {_err(dx, want_dx):.2e} dy {_err(dy, want_dy):.2e}"
        rows.append((f"backward grad {block_n}x{block_c} w{warps} s{stages} cols/prog {per_program}", ms, errs))
        best_grad = min(best_grad, (ms, (config, per_program)), key=lambda t: t[0])
    clip_chunked.GRAD_BLOCKS, clip_chunked.GRAD_COLS_PER_PROGRAM = best_grad[1]

    best_stats = (float("inf"), None)
    for block_n, block_c, stages, warps in [
        (32, 64, 3, 1),
        (64, 64, 3, 2),
        (32, 128, 3, 2),
        (64, 128, 3, 4),
        (16, 64, 4, 1),
        (32, 64, 4, 1),
        (128, 64, 3, 4),
        (16, 128, 3, 1),
    ]:
        config = dict(BLOCK_N=block_n, BLOCK_C=block_c, STAGES=stages, num_warps=warps)
        clip_chunked.STATS_BLOCKS = config
        got = clip_chunked.clip_chunked_forward(x, y, scale)
        diff = max((a - b).abs().max().item() for a, b in zip(got, ref_stats, strict=True))
        ms = triton.testing.do_bench(lambda: clip_chunked.clip_chunked_forward(x, y, scale))
        rows.append((f"forward stats {block_n}x{block_c} w{warps} s{stages}", ms, f"max |d stat| {diff:.1e}"))
        best_stats = min(best_stats, (ms, config), key=lambda t: t[0])
    clip_chunked.STATS_BLOCKS = best_stats[1]
    rows.append((f"best: grad {best_grad[1]}, stats {best_stats[1]}", float("nan"), ""))

    # whole steps through FusedClipLoss
    loss_fn = fused.FusedClipLoss(impl="lean")
    xi, yi = x.clone().requires_grad_(), y.clone().requires_grad_()

    def step():
        xi.grad = yi.grad = None
        loss_fn(xi, yi, scale[0]).backward()

    step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    ms = triton.testing.do_bench(step)
    errs = f"err dx {_err(xi.grad, want_dx):.2e} dy {_err(yi.grad, want_dy):.2e}, {peak:.0f} MiB"
    rows.append(("step lean, best tiles", ms, errs))
    torch.cuda.set_sync_debug_mode("warn")
    step()
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
    kernels = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    rows.append(("step profiled: wall (events) / kernels", start.elapsed_time(end), f"{kernels:.3f} ms in kernels"))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=50))

    print(f"\n{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} B={B} D={args.D}")
    for name, ms, extra in rows:
        print(f"{name:60s} {ms:8.3f} ms  {extra}")


if __name__ == "__main__":
    main()
