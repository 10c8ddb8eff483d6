"""Class-parallel loss on several GPUs against one GPU: correctness, time and memory per GPU.

The classifier (C, D) is split by rows over the ranks (``shard_classes``: as even as
possible; uneven when C % world != 0); input and targets are the same on every rank.
Rank 0 also runs the single-GPU ``fused_xent.linear_cross_entropy`` on the whole
classifier and an fp32 reference (the chunked torch path on fp32 copies, TF32 off), and
compares the loss, ``dX`` and ``dW`` (the shards gathered on rank 0) as
``||out - ref|| / ||ref||``.

Times are the median of ``--reps`` forward+backward calls after ``--warmup`` calls, each
timed with CUDA events, all ranks released together by a barrier. (``triton.testing.
do_bench`` picks its number of calls from a first estimate, which differs between ranks:
with collectives inside, ranks would wait on each other forever.) Memory is the peak
allocated during one call minus what was allocated before it, gradients included.

GPU (2 GPUs, NCCL, 8192 x 4096 x 256000 bf16):
    PYTHONPATH=. python benchmarks/bench_distributed.py --out benchmarks/results/h200
    torchrun --nproc_per_node=2 benchmarks/bench_distributed.py --out DIR      (the same)
CPU (2 processes, gloo, a tiny case): the same command on a machine without CUDA.

NCCL_NVLS_ENABLE=0 is set unless the environment sets it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fused_xent  # noqa: E402
from fused_xent import distributed  # noqa: E402

MiB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for bench_distributed.json and .md")
    p.add_argument("--nproc", type=int, default=2, help="processes to start when not launched by torchrun")
    p.add_argument("--N", type=int, default=8192 if cuda else 64)
    p.add_argument("--D", type=int, default=4096 if cuda else 32)
    p.add_argument("--C", type=int, default=256000 if cuda else 1001)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--impl", default="auto", help="the core backend on each shard")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=3 if cuda else 1)
    p.add_argument("--reps", type=int, default=10 if cuda else 3)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, warmup: int, reps: int, barrier: bool = True) -> float:
    """Median time of ``reps`` calls after ``warmup``: the same count on every rank, which
    a barrier releases together (``barrier=False`` when only this rank runs ``fn``)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if barrier:
        dist.barrier()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn, device: torch.device) -> float | None:
    """Peak allocated during one call of ``fn`` above what was allocated before it (CUDA)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MiB


def rel_err(out: torch.Tensor, ref: torch.Tensor, chunk: int = 2**24) -> float:
    """``||out - ref|| / ||ref||`` over fp32 chunks, summed in fp64 (no fp64 copy of W)."""
    out, ref = out.detach().reshape(-1), ref.detach().reshape(-1)
    num = den = 0.0
    for i in range(0, out.numel(), chunk):
        o, r = out[i : i + chunk].float(), ref[i : i + chunk].float()
        num += float(((o - r) ** 2).sum(dtype=torch.float64))
        den += float((r**2).sum(dtype=torch.float64))
    return (num / den) ** 0.5 if den > 0 else num**0.5


def init_process_group() -> torch.device:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def gather_rows(shard: torch.Tensor, total: int, offsets: list[tuple[int, int]]) -> torch.Tensor | None:
    """The (total, ...) tensor on rank 0 from every rank's rows [offset, offset + count)."""
    rank = dist.get_rank()
    if rank != 0:
        dist.send(shard.contiguous(), dst=0)
        return None
    full = shard.new_empty((total, *shard.shape[1:]))
    for r, (offset, count) in enumerate(offsets):
        if r == 0:
            full[offset : offset + count] = shard
        else:
            dist.recv(full[offset : offset + count], src=r)
    return full


def measure(name: str, loss_fn, params: list[torch.Tensor], device, args, classes: int, alone: bool):
    """One call whose loss and gradients are kept for the comparisons, then the memory and
    time of forward+backward and of the forward alone. ``alone``: only this rank runs."""

    def clear():
        for p in params:
            p.grad = None

    def step():
        clear()
        loss_fn().backward()

    def forward():
        with torch.no_grad():
            loss_fn()

    clear()
    loss = loss_fn()
    loss.backward()
    kept = (loss.detach(), *[p.grad for p in params])
    clear()
    rows = []
    for label, fn in [(f"{name} fw+bw", step), (f"{name} forward", forward)]:
        mib = peak_extra_mib(fn, device)
        ms = median_ms(fn, device, args.warmup, args.reps, barrier=not alone)
        clear()
        rows.append(dict(method=label, rank=dist.get_rank(), classes=classes, ms=ms, mib=mib, error=None))
    return rows, kept


def run(args: argparse.Namespace, command: str) -> None:
    device = init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    N, D, C = args.N, args.D, args.C
    offsets = [distributed.shard_classes(C, r, world) for r in range(world)]
    offset, num_local = offsets[rank]
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference is true fp32
    opts = dict(label_smoothing=args.label_smoothing, impl=args.impl)

    # the same full problem on every rank (same seed, same device type); each keeps its rows
    g = torch.Generator(device=device).manual_seed(args.seed)
    x = torch.randn(N, D, generator=g, device=device).to(dtype).requires_grad_()
    w_full = (torch.randn(C, D, generator=g, device=device) / D**0.5).to(dtype)
    y = torch.randint(0, C, (N,), generator=g, device=device)
    w_shard = w_full[offset : offset + num_local].clone().requires_grad_()
    if rank != 0:
        w_full = None

    rows, (loss_d, dx_d, dw_shard) = measure(
        "sharded",
        lambda: distributed.linear_cross_entropy(x, w_shard, y, class_offset=offset, num_classes=C, **opts),
        [x, w_shard],
        device,
        args,
        num_local,
        alone=False,
    )
    dw_d = gather_rows(dw_shard, C, offsets)
    w_shard = dw_shard = None

    errors = {}
    if rank == 0:
        errors = single_gpu(x, w_full, y, opts, args, device, rows, (loss_d, dx_d, dw_d))
    dist.barrier()
    gathered = [None] * world
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        report(args, command, device, world, offsets, [r for per_rank in gathered for r in per_rank], errors)
    dist.destroy_process_group()


def single_gpu(x, w_full, y, opts, args, device, rows: list[dict], sharded: tuple) -> dict:
    """Rank 0 alone: the whole classifier through the core, the fp32 reference, and the
    errors of both runs; appends the single-GPU rows (an error row when out of memory)."""
    w = w_full.detach().requires_grad_()
    errors = {}
    try:
        single_rows, single = measure(
            "single GPU", lambda: fused_xent.linear_cross_entropy(x, w, y, **opts), [x, w], device, args, args.C, True
        )
        rows += single_rows
    except torch.OutOfMemoryError as e:
        rows.append(dict(method="single GPU", rank=0, classes=args.C, ms=None, mib=None, error=_oom(e)))
        single = None
    w = None
    if single is not None:
        errors["sharded vs single GPU"] = _errors(sharded, single)
    try:
        ref = fp32_reference(x, w_full, y, dict(opts, impl="chunked"))
    except torch.OutOfMemoryError as e:
        errors["fp32 reference"] = dict(error=_oom(e))
        return errors
    for name, got in {"sharded": sharded, "single GPU": single}.items():
        if got is not None:
            errors[f"{name} vs fp32"] = _errors(got, ref)
    return errors


def _errors(got: tuple, ref: tuple) -> dict:
    return {name: rel_err(a, b) for name, a, b in zip(("loss", "input", "linear_weight"), got, ref, strict=True)}


def _oom(e: Exception) -> str:
    return "out of memory: " + str(e).splitlines()[0]


def fp32_reference(x, w_full, y, opts):
    """Loss, dX, dW in fp32 (the chunked torch path: exact fp32 GEMMs, one chunk of logits)."""
    x32 = x.detach().float().requires_grad_()
    w32 = w_full.detach().float().requires_grad_()
    loss = fused_xent.linear_cross_entropy(x32, w32, y, **opts)
    loss.backward()
    return loss.detach(), x32.grad, w32.grad


def report(args, command, device, world, offsets, rows, errors) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import triton

    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=gpu,
        world_size=world,
        backend=dist.get_backend(),
        torch=torch.__version__,
        triton=triton.__version__,
        command=command,
        NCCL_NVLS_ENABLE=os.environ.get("NCCL_NVLS_ENABLE"),
        shape=dict(N=args.N, D=args.D, C=args.C, dtype=args.dtype, impl=args.impl),
        shards=[dict(class_offset=o, classes=n) for o, n in offsets],
        options=dict(label_smoothing=args.label_smoothing),
        timing=f"median of {args.reps} calls after {args.warmup}"
        + (", CUDA events; memory: peak extra allocated" if device.type == "cuda" else ", wall clock"),
    )
    (out / "bench_distributed.json").write_text(json.dumps(dict(meta=meta, rows=rows, errors=errors), indent=2))

    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    lines = [
        f"# Class-parallel loss: {world} x {gpu}",
        "",
        f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · backend {meta['backend']} · "
        f"NCCL_NVLS_ENABLE={meta['NCCL_NVLS_ENABLE']}",
        "",
        f"`{command}`",
        "",
        f"N × D × C = {args.N} × {args.D} × {args.C}, {args.dtype}, impl={args.impl}, "
        f"label_smoothing={args.label_smoothing}; {meta['timing']}.",
        "",
        "| method | rank | classes | ms | peak extra MiB | error |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['rank']} | {r['classes']} | {fmt(r['ms'], '.2f')} | {fmt(r['mib'], '.0f')} "
            f"| {r['error'] or ''} |"
        )
    lines += ["", "| comparison | loss | dX | dW |", "|---|---|---|---|"]
    for name, e in errors.items():
        if "error" in e:
            lines.append(f"| {name} | {e['error']} | | |")
        else:
            lines.append(f"| {name} | {e['loss']:.2e} | {e['input']:.2e} | {e['linear_weight']:.2e} |")
    text = "\n".join(lines) + "\n"
    (out / "bench_distributed.md").write_text(text)
    print(text)


def _spawned(local_rank: int, world: int, port: int, args: argparse.Namespace, command: str) -> None:
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    run(args, command)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    if "TORCHELASTIC_RUN_ID" in os.environ:
        launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}"]
    else:
        launcher = ["PYTHONPATH=.", "python"]
    command = " ".join([*launcher, *(sys.argv if argv is None else ["benchmarks/bench_distributed.py", *argv])])
    if "RANK" in os.environ:
        run(args, command)
        return
    if torch.cuda.is_available() and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs as many GPUs, found {torch.cuda.device_count()}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(args.nproc, port, args, command), nprocs=args.nproc, start_method="spawn")


if __name__ == "__main__":
    main()
