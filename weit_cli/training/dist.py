"""Processes and devices: torchrun-aware set-up (gloo on CPU, nccl on GPU; a no-op alone), the device
choice, bf16 autocast on CUDA, and seeding every RNG."""

from __future__ import annotations

import os
import random
from contextlib import nullcontext
from typing import NamedTuple

import numpy as np
import torch

from weit_cli.errors import WeitError
from weit_cli.options import check_seed


class Dist(NamedTuple):
    rank: int
    world_size: int
    device: torch.device


def setup_distributed(device: str | None = None) -> Dist:
    """Join the torchrun process group if there is one (env WORLD_SIZE > 1); pick the device.

    `device` overrides the choice ('cpu', 'cuda', 'cuda:1'); by default CUDA when present. Under
    torchrun each rank takes the GPU of its LOCAL_RANK, and the backend is nccl on GPU, gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def cleanup_distributed() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    """The mean of a scalar over all processes (all_reduce; itself alone)."""
    if world > 1:
        import torch.distributed as tdist

        value = value.clone()
        tdist.all_reduce(value)
        value /= world
    return float(value)


def device_autocast(device: torch.device | str):
    """bf16 autocast on CUDA; a no-op context on CPU (CPU runs stay in exact float32)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def resolve_device(device: str | None) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' … (None: CUDA when present); a bad or absent device is a WeitError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise WeitError(f"unknown device '{device}'", "use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise WeitError(f"device '{device}' is not supported", "use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise WeitError("CUDA was requested but no GPU is visible", "leave the device unset to use the CPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise WeitError(f"device {device}: only {torch.cuda.device_count()} GPU(s) visible", "use cuda:0 … or leave it unset")
    return dev


def seed_everything(seed: int) -> None:
    check_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
