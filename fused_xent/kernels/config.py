"""Tile configurations and launch facts shared by the kernels' launchers."""

import functools
import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def capability(device: torch.device) -> int:
    """The CUDA device's compute capability major (9 for Hopper)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _capability(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


def target_programs(device: torch.device) -> int:
    """How many programs fill the machine: a few waves of the multiprocessors."""
    if device.type != "cuda":
        return 1
    return 4 * sm_count(device.index if device.index is not None else torch.cuda.current_device())


def dot_options(dtype: torch.dtype) -> dict:
    """fp32 inputs get true fp32 products (as torch's default matmul); bf16 / fp16 use the
    tensor cores. The interpreter's bf16 dot is wrong, so there operands go to fp32."""
    return dict(
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        UPCAST=interpreting() and dtype != torch.float32,
    )


def forward_blocks(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_C=32, BLOCK_D=16)
    # H100 sweep (benchmarks/tune_forward.py, Gemma 2 head): 128x256 tiles 20.8 ms vs 27.6 ms for 128x128
    return dict(BLOCK_N=128, BLOCK_C=256, BLOCK_D=64, num_warps=8, num_stages=3)


def backward_blocks(device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_N=16, BLOCK_C=32, BLOCK_D=16)
    return dict(BLOCK_N=128, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=2)
