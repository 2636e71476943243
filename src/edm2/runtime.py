"""Where and how the code runs: the device, the precision of the U-Net, the fast paths that go with it, the
CUDA math flags, torch.distributed (as launched by torchrun) and stop requests. The one place for these
rules: training, generation and the benchmarks ask here.

A plain single process is the one-process case of everything here.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

import numpy as np
import torch

from edm2.layers import fast_paths
from edm2.networks import PRECISIONS

__all__ = [
    "resolve_device", "resolve_precision", "set_cuda_math", "fast_paths_for", "prepare_for_sampling",
    "world_info", "rank_batches", "distributed", "StopRequest", "agree_on_stop", "STOP_NONE", "STOP_PAUSE",
    "STOP_SIGNAL",
]


# ----------------------------------------------------------------------------------------------------
# Device and precision.


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


def resolve_precision(precision: str | None, device: torch.device, use_fp16: bool = False) -> str:
    """The precision to run the U-Net in: `precision` checked against the device, or the default for None
    (float16 on CUDA for networks built with use_fp16, as the official code; float32 otherwise)."""
    if precision is None:
        return "fp16" if use_fp16 and device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"--precision fp16 needs a CUDA device (float16 with loss scaling is not supported on "
                         f"{device.type}); use --precision bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16 is not supported by this CUDA device; use --precision fp16 or fp32")
    return precision


def set_cuda_math(device: torch.device, allow_tf32: bool = False,
                  reduced_precision_reductions: bool = False) -> None:
    """CUDA math flags, set when `device` is a CUDA device (training and generation call this). The defaults
    are those the official implementation trains with: no TF32 in convolutions or matrix products and
    full-precision reductions inside fp16/bf16 matrix products, so that float32 means float32.
    `allow_tf32=True` trades about 3 decimal digits for speed on Ampere and later."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = reduced_precision_reductions
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = reduced_precision_reductions
    torch.backends.cudnn.benchmark = True  # picks the fastest kernel per shape; results stay float32-exact


def fast_paths_for(precision: str, compile: bool) -> contextlib.AbstractContextManager:
    """The fast paths that go with a precision: fused attention and sum-of-squares norms change float32
    results by rounding, so they come on with mixed precision or torch.compile only; plain float32 eager
    stays the exact path the golden tests check. The weight cache (exact) is always on."""
    fast = precision != "fp32" or compile
    return fast_paths(sdpa=fast, strided_norm=fast)


def prepare_for_sampling(net: torch.nn.Module, precision: str = "fp32", compile: bool = False) -> torch.nn.Module:
    """`net` (a Precond) set up for sampling: eval mode without gradients, the U-Net at `precision`, channels_last
    with low precision (where it pays: oneDNN/AMX on CPU, tensor cores on CUDA), optionally torch.compile'd.
    Check the precision against the device first (`resolve_precision`)."""
    net = net.eval().requires_grad_(False).set_precision(precision)
    if precision != "fp32":
        net = net.to(memory_format=torch.channels_last)
    return torch.compile(net) if compile else net


# ----------------------------------------------------------------------------------------------------
# torch.distributed.


def world_info() -> tuple[int, int]:
    """(rank, number of processes) of the current torch.distributed process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_batches(num: int, batch_size: int) -> list[np.ndarray]:
    """This process's batches of indices 0..num-1: the official split (equal-sized batches dealt in turn)."""
    rank, world = world_info()
    num_batches = max((num - 1) // (batch_size * world) + 1, 1) * world
    return np.array_split(np.arange(num), num_batches)[rank::world]


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


# ----------------------------------------------------------------------------------------------------
# Stopping: signals become a flag checked between steps, and every process stops at the same step.

STOP_NONE, STOP_PAUSE, STOP_SIGNAL = 0, 1, 2


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps (the loop then checkpoints and exits)."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def agree_on_stop(code: int, device: torch.device) -> int:
    """The strongest stop request of any process (all-reduced), so that every process stops at one step."""
    if world_info()[1] == 1:
        return code
    flag = torch.tensor([code], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return int(flag.item())
