"""Data-parallel sampling and evaluation: the full batch on every rank in, the full result on every
rank out, each rank working on its contiguous slice (:mod:`.collectives`)."""
from __future__ import annotations

import dataclasses

import torch

from ..metrics.features import extract_features as _extract_features
from ..solvers import Trajectory
from ..solvers import sample as _sample
from .collectives import _gather, _local_slice
from .group import is_main

__all__ = ["sample", "extract_features"]


def _denoiser_for_slices(denoiser, group):
    """The callable that serves this rank's slice: ``sharded_call`` for collective denoisers."""
    call = getattr(denoiser, "sharded_call", None)
    if call is None:
        return denoiser
    if getattr(denoiser, "group", None) is not group:
        raise ValueError("the batch must be split over the sharded denoiser's own group (pass group=denoiser.group)")
    return call


def _solve_slice(denoiser, noise, sigmas, group, **options):
    """gs.sample on this rank's padded slice of ``noise``; returns (result, every rank's count)."""
    local, counts = _local_slice(noise, group)
    options["progress"] = options.get("progress", False) and is_main(group)
    return _sample(_denoiser_for_slices(denoiser, group), local, sigmas, **options), counts


def sample(denoiser, noise: torch.Tensor, sigmas, solver: str = "ipndm", *, group=None, **options):
    """Data-parallel :func:`geosample.sample`: the full ``noise`` [B, ...] on every rank in, the
    full sample (or :class:`geosample.Trajectory`) on every rank out.

    Each rank solves its contiguous slice (padded to ceil(B / W) rows); the slices are joined
    with one all_gather.  ``group`` defaults to the denoiser's group for a
    :class:`ShardedKDEDenoiser`; ``progress`` shows only on rank 0; a ``callback`` sees this
    rank's padded slice.
    """
    group = getattr(denoiser, "group", None) if group is None else group
    out, counts = _solve_slice(denoiser, noise, sigmas, group, solver=solver, **options)
    if isinstance(out, Trajectory):
        return dataclasses.replace(out, x=_gather(out.x, counts, group, 1),
                                   denoised=_gather(out.denoised, counts, group, 1))
    return _gather(out, counts, group)


def extract_features(extractor, images: torch.Tensor, group=None, batch_size: int = 64) -> torch.Tensor:
    """Data-parallel :func:`geosample.metrics.extract_features`: full ``images`` [N, C, H, W] on
    every rank in, all N features [N, d] float64 on every rank out (for FID / KID)."""
    local, counts = _local_slice(images, group)
    return _gather(_extract_features(extractor, local, batch_size=batch_size), counts, group)
