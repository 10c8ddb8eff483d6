"""Train a classifier head of 10,000,000 classes sharded over the GPUs of one machine.

Each rank holds ``C / world`` rows of the head (``fused_xent.distributed.shard_classes``)
and the same small replicated "neck" (a Linear layer standing in for a backbone). Every
step all ranks see the same batch of synthetic features and labels; the loss
(``fused_xent.distributed.linear_cross_entropy``, exact softmax over all C classes) is
reduced across ranks with a few (N,)-sized all-reduces, each rank updates its own rows,
and the neck gets the full input gradient on every rank, so it stays identical without
any further synchronisation. The batch is fixed, so the loss falls as the head memorises
it. At the end every rank reports its parameter memory and its peak allocated memory.

GPU (8 GPUs, 10M classes):   torchrun --nproc_per_node=8 examples/sharded_head.py
CPU (gloo, 20k classes):     torchrun --nproc_per_node=2 examples/sharded_head.py
One process:                 python examples/sharded_head.py

Peak memory is the CUDA allocator's peak on each GPU (``max_memory_allocated``), or on
CPU the peak resident set of each process (Linux), a rougher figure.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fused_xent import distributed  # noqa: E402

GiB = 2**30


def parse_args(argv=None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=10_000_000 if cuda else 20_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096 if cuda else 256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.02, help="SGD step; the head takes lr * batch")
    p.add_argument("--scale", type=float, default=16.0, help="logit scale on the normalised features")
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16" if cuda else "float32")
    p.add_argument("--impl", default="auto")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def init_process_group() -> torch.device:
    """NCCL with one GPU per rank under torchrun, gloo on CPU; a one-process group otherwise."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return device


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB  # Linux reports KiB


def main(argv=None) -> None:
    args = parse_args(argv)
    device = init_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    offset, num_local = distributed.shard_classes(args.classes, rank, world)

    # the replicated part: same seed on every rank; the head: each rank its own rows
    torch.manual_seed(args.seed)
    inputs = torch.randn(args.batch, args.dim, device=device, dtype=dtype)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    neck = torch.nn.Linear(args.dim, args.dim, device=device, dtype=dtype)
    torch.manual_seed(args.seed + 1 + rank)
    head = (torch.randn(num_local, args.dim, device=device, dtype=dtype) * 0.02).requires_grad_()
    params = [head, *neck.parameters()]
    param_gib = sum(p.numel() * p.element_size() for p in params) / GiB

    if rank == 0:
        print(f"{args.classes:,} classes x {args.dim} features over {world} rank(s) ({device.type}, {args.dtype}); "
              f"batch {args.batch}; rank 0 holds classes [{offset:,}, {offset + num_local:,})")  # fmt: skip
    for step in range(args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        features = F.normalize(neck(inputs), dim=-1)
        loss = distributed.linear_cross_entropy(
            features,
            head,
            labels,
            class_offset=offset,
            num_classes=args.classes,
            scale=args.scale,
            label_smoothing=args.label_smoothing,
            impl=args.impl,
        )
        loss.backward()
        with torch.no_grad():
            for p in params:
                p.add_(p.grad, alpha=-args.lr * (args.batch if p is head else 1))
                p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - start) * 1e3
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}  ({ms:.0f} ms)")

    report = dict(rank=rank, classes=num_local, param_gib=param_gib, peak_gib=peak_memory_gib(device))
    if device.type == "cuda":
        report["device"] = torch.cuda.get_device_name(device)
    reports = [None] * world
    dist.all_gather_object(reports, report)
    if rank == 0:
        kind = "peak allocated" if device.type == "cuda" else "peak RSS"
        for r in reports:
            print(f"rank {r['rank']}: {r['classes']:,} classes, parameters {r['param_gib']:.2f} GiB, "
                  f"{kind} {r['peak_gib']:.2f} GiB {r.get('device', '')}")  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
