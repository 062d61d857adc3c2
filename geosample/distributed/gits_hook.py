"""Distributed GITS search: the warm-up teacher rounds split across ranks through
``gits.search``'s ``round_cost`` hook; the DP runs on every rank."""
from __future__ import annotations

import dataclasses

import torch

from ..gits import search as _gits_search
from ..gits.cost import cost_matrix
from .collectives import _all_reduce, _gather
from .data_parallel import _solve_slice
from .group import is_main, rank

__all__ = ["gits_search"]


def _round_cost(group):
    """``gits.search``'s warm-up round split across ranks: every rank draws the same noise, rank r
    adds n_r C_r (its slice's mean cost matrix times its row count), one all_reduce SUM gives the
    round's summed cost n C that one process computes, float64 [T, T] on the CPU; the teacher's
    samples are gathered, so every rank holds all of them."""
    def round_cost(denoiser, fine, noise, config):
        traj, counts = _solve_slice(denoiser, noise, fine, group, solver=config.teacher, afs=config.afs,
                                    return_trajectory=True)
        mine = counts[rank(group)]
        total = torch.zeros(fine.numel(), fine.numel(), dtype=torch.float64, device=noise.device)
        if mine:
            mine_traj = dataclasses.replace(traj, x=traj.x[:, :mine], denoised=traj.denoised[:, :mine])
            total += cost_matrix(mine_traj, config.metric) * mine
        return _all_reduce(total, group).cpu(), _gather(traj.x[-1], counts, group)
    return round_cost


def gits_search(denoiser, shape, steps: int, *, group=None, **options):
    """Distributed :func:`geosample.gits.search`: the warm-up samples split across ranks, the
    cost matrix all-reduced and the teacher's samples gathered, the same DP on every rank, so every
    rank returns the schedule one process finds (the paths are judged by every rank with replicated
    denoiser calls, as one process does).  The on-disk cache is per process and is
    not used (a hit on one rank and a miss on another would leave ranks waiting on each other).
    ``progress`` shows on rank 0.
    """
    if options.pop("use_cache", False):
        raise ValueError("gits_search does not use the schedule cache (it is per process); drop use_cache")
    group = getattr(denoiser, "group", None) if group is None else group
    options["progress"] = options.get("progress", False) and is_main(group)
    return _gits_search(denoiser, shape, steps, use_cache=False, round_cost=_round_cost(group), **options)
