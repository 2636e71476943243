"""Multi-process runs on torch.distributed, as launched by torchrun: joining the process group, this
process's rank and device. A plain single process is the one-process case of everything here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

__all__ = ["world_info", "distributed", "resolve_device"]


def world_info() -> tuple[int, int]:
    """(rank, number of processes) of the current torch.distributed process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[tuple[int, int]]:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1) for the
    duration of the block: NCCL with one GPU per process (LOCAL_RANK) on CUDA, gloo on the CPU. A plain
    single process, or one already in a group, passes through. Yields (rank, number of processes)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not torch.distributed.is_available():
        if launched:
            raise ValueError("launched with WORLD_SIZE > 1 but this PyTorch has no torch.distributed support")
        yield 0, 1
        return
    if not launched or torch.distributed.is_initialized():
        yield world_info()
        return
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}, but no CUDA device is available")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        yield world_info()
    finally:
        torch.distributed.destroy_process_group()


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'; in a multi-process CUDA run, the GPU of
    this process. ValueError for an unknown or unavailable device."""
    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}, but no CUDA device is available")
        if world_info()[1] > 1:
            device = torch.device("cuda", torch.cuda.current_device())
    return device
