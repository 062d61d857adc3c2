"""The process group: which rank this process is, of how many, and joining the group under torchrun.

Without an initialised process group every function answers for one rank (W = 1, rank 0).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["world_size", "rank", "is_main", "init_from_env"]


def world_size(group=None) -> int:
    """Ranks in ``group`` (1 without an initialised process group)."""
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank in ``group`` (0 without an initialised process group)."""
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def is_main(group=None) -> bool:
    """True on rank 0: the one rank that prints and writes files."""
    return rank(group) == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1 set).

    backend: "nccl" when CUDA is available, else "gloo".  Returns whether the process runs
    distributed; a no-op (False) in a plain single process or when already initialised.
    """
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    if dist.get_backend() == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True
