"""Row splits and the collectives every distributed job uses (no-ops on one rank).

Batches are split contiguously: of B rows over W ranks, rank r owns rows [r B // W, (r+1) B // W).
Every rank works on ``m = ceil(B / W)`` rows, padding a short (or empty) slice by repeating a
row, so that collective denoisers see the same number of calls and the same shapes on every rank;
the padding is dropped when the slices are gathered.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .group import rank, world_size

__all__ = ["split", "shard", "gather_rows"]


def split(n: int, world: int) -> list[tuple[int, int]]:
    """Contiguous bounds [(lo_r, hi_r)] of n rows over ``world`` ranks: lo_r = r n // W."""
    return [(r * n // world, (r + 1) * n // world) for r in range(world)]


def shard(data, group=None):
    """This rank's contiguous shard ``data[lo_r:hi_r]`` of a dataset every rank can index."""
    lo, hi = split(len(data), world_size(group))[rank(group)]
    return data[lo:hi]


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """[W, *t.shape]: every rank's ``t`` (same shape on every rank), stacked in rank order."""
    if world_size(group) == 1:
        return t[None]
    out = t.new_empty((world_size(group) * t.shape[0], *t.shape[1:]))   # gloo: the concatenated form
    dist.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out.view(world_size(group), *t.shape)


def _all_reduce(t: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    """The ``op`` ("sum" | "min") of ``t`` over ranks, in place; bitwise identical on every rank."""
    if world_size(group) > 1:
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op.upper()), group=group)
    return t


def _reduce_scatter(t: torch.Tensor, group) -> torch.Tensor:
    """[W m, ...] summed over ranks -> this rank's rows [m, ...] of the sum."""
    if world_size(group) == 1:
        return t
    out = t.new_empty((t.shape[0] // world_size(group), *t.shape[1:]))
    dist.reduce_scatter_tensor(out, t.contiguous(), group=group)
    return out


def _local_slice(batch: torch.Tensor, group) -> tuple[torch.Tensor, list[int]]:
    """This rank's rows padded to m = ceil(B / W) by repeating a row, and every rank's row count."""
    bounds = split(batch.shape[0], world_size(group))
    lo, hi = bounds[rank(group)]
    size = max(b - a for a, b in bounds)
    rows = torch.cat([torch.arange(lo, hi), torch.full((size - (hi - lo),), min(lo, batch.shape[0] - 1))])
    return batch[rows.to(batch.device)], [b - a for a, b in bounds]


def _gather(local: torch.Tensor, counts: list[int], group, dim: int = 0) -> torch.Tensor:
    """Concatenate the first counts[r] entries (along ``dim``) of every rank's padded ``local``."""
    parts = _all_gather(local, group)
    return torch.cat([parts[r].narrow(dim, 0, c) for r, c in enumerate(counts)], dim)


def gather_rows(local: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenation in rank order of every rank's ``local`` [n_r, ...] (n_r may differ, even 0)."""
    counts = _all_gather(torch.tensor([local.shape[0]], device=local.device), group)[:, 0].tolist()
    pad = local.new_zeros((max(counts) - local.shape[0], *local.shape[1:]))
    return _gather(torch.cat([local, pad]), counts, group)
