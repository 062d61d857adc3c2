"""Scale-out on torch.distributed (NCCL on GPUs, gloo on CPU): a dataset sharded across ranks,
data-parallel sampling, GITS search and feature extraction.  Every function here returns the
same tensor on every rank, equal (to float rounding) to what one process computes.

Batches are split contiguously: of B rows over W ranks, rank r owns rows [r B // W, (r+1) B // W).
Every rank works on ``m = ceil(B / W)`` rows, padding a short (or empty) slice by repeating a
row, so that collective denoisers (:class:`ShardedKDEDenoiser`) see the same number of calls
and the same shapes on every rank; the padding is dropped when the slices are gathered.

Without an initialised process group everything runs as one rank (W = 1, no collectives), so
code written against this module runs unchanged in a single process.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from .denoisers.kde import KDEDenoiser, check_query
from .gits import search as _gits_search
from .gits.cost import cost_matrix
from .metrics.features import extract_features as _extract_features
from .solvers import Trajectory
from .solvers import sample as _sample


__all__ = ["ShardedKDEDenoiser", "closed_form_denoiser", "sample", "gits_search", "extract_features", "gather_rows", "shard",
           "split", "rank", "world_size", "is_main", "init_from_env"]


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


def closed_form_denoiser(data, group=None, **kde_options):
    """The dataset's closed-form denoiser for this process: a :class:`ShardedKDEDenoiser` over
    this rank's shard when running distributed, else a plain :class:`KDEDenoiser` over all of it."""
    if world_size(group) > 1:
        return ShardedKDEDenoiser(shard(data, group), group=group, **kde_options)
    return KDEDenoiser(data, **kde_options)


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


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    """Sum of ``t`` over ranks, in place; bitwise identical on every rank."""
    if world_size(group) > 1:
        dist.all_reduce(t, group=group)
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


class ShardedKDEDenoiser:
    """Exact KDE denoiser of the union of every rank's shard (:class:`geosample.KDEDenoiser`).

    Rank r holds rows I_r of the data (any size, empty included) and computes, with the local
    KDE backend on its shard, for logits l_i = -|x - y_i|^2 / (2 sigma^2) (``KDEStats.log_mass``,
    free of the per-query constant |x|^2 / (2 sigma^2), which would cost precision at small sigma):

        logZ_r = logsumexp_{i in I_r} l_i  [B],    D_r = sum_{i in I_r} e^{l_i - logZ_r} y_i  [B, D]

    (logZ_r = -inf, D_r = 0 for an empty shard).  The logits carry no per-shard constant, so the
    partial sums merge exactly by log-sum-exp: with M = max_r logZ_r and w_r = e^{logZ_r - M},

        D = sum_r w_r D_r / sum_r w_r.

    Collectives per call: an all_gather of logZ_r ([W, B] float64; every rank then forms M and
    the denominator itself) and one SUM of w_r D_r ([B, D] float64).  That is the same two
    latencies as all_reduce(MAX) + all_reduce(SUM) over [B, D + 1], without the extra column;
    an all_gather of the D_r would move W times more data.

    Two ways to call it, both collective (every rank of ``group`` must make the same calls):

    * ``D(x, sigma)``: x [B, ...] and sigma identical on every rank (``check_inputs=True``
      verifies it with one small all_gather per call); the SUM is an all_reduce.
    * ``D.sharded_call(x, sigma)``: x [m, ...] is this rank's rows of a batch split across
      ranks (the same m on every rank); the queries are all-gathered, each rank scores all W m
      of them against its shard, and the SUM is a reduce_scatter back to each rank's rows.
      :func:`sample` uses this.

    local_data: this rank's shard [n_r, ...] (trailing shape equal on every rank);
    kde_options: :class:`geosample.KDEDenoiser` options (backend, precision, chunk_size, ...).
    """

    def __init__(self, local_data, group=None, check_inputs: bool = False, **kde_options):
        if not isinstance(local_data, torch.Tensor) or local_data.dim() < 2:
            got = tuple(local_data.shape) if isinstance(local_data, torch.Tensor) else type(local_data).__name__
            raise TypeError(f"local_data must be a torch.Tensor [n, ...], got {got}")
        self.group, self.check_inputs = group, check_inputs
        self.shape = tuple(local_data.shape[1:])
        shapes = [None] * world_size(group)
        if world_size(group) > 1:
            dist.all_gather_object(shapes, self.shape, group=group)
            if len(set(shapes)) > 1:
                raise ValueError(f"shards must share the trailing shape on every rank, got {shapes}")
        self.n = int(_all_reduce(torch.tensor([local_data.shape[0]], device=local_data.device), group))
        if self.n == 0:
            raise ValueError("every shard is empty: the dataset needs at least one row")
        self.local = KDEDenoiser(local_data, **kde_options) if local_data.shape[0] else None

    def __len__(self) -> int:
        return self.n

    def _check(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """sigma as float64 [B]; the same checks as KDEDenoiser, on ranks with empty shards too."""
        return check_query(x, sigma, self.shape)[1]

    def _partial(self, x64: torch.Tensor, sig: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logZ_r [B], D_r [B, ...]) of this shard, float64."""
        if self.local is None:
            return x64.new_full((x64.shape[0],), -torch.inf), torch.zeros_like(x64)
        out, stats = self.local(x64, sig, return_stats=True)
        return stats.log_mass, out

    def _weights(self, log_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_r [B] of this rank, sum_r w_r [B]) from an all_gather of logZ_r."""
        every = _all_gather(log_z, self.group)                         # [W, B]
        w = torch.exp(every - every.amax(0))                           # empty shards: e^-inf = 0
        return w[rank(self.group)], w.sum(0)

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        sig = self._check(x, sigma)
        x64 = x.double()
        if self.check_inputs:
            probe = torch.stack([x64.sum(), (x64 * x64).sum(), sig.sum()])
            if not bool((_all_gather(probe, self.group) == probe).all()):
                raise ValueError("x and sigma must be identical on every rank (use sharded_call for split batches)")
        log_z, part = self._partial(x64, sig)
        w, den = self._weights(log_z)
        ones = [1] * len(self.shape)
        num = _all_reduce(part.mul_(w.view(-1, *ones)), self.group)
        return num.div_(den.view(-1, *ones)).to(x.dtype)

    def sharded_call(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """D of this rank's rows x [m, ...] of a batch split across ranks (same m on every rank)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        sig = torch.as_tensor(sigma, dtype=torch.float64).to(x.device).reshape(-1).expand(x.shape[0])
        xs = _all_gather(x.double(), self.group).flatten(0, 1)        # [W m, ...]: all queries
        sigs = _all_gather(sig.contiguous(), self.group).flatten()
        self._check(xs, sigs)
        log_z, part = self._partial(xs, sigs)
        w, den = self._weights(log_z)
        ones = [1] * len(self.shape)
        num = _reduce_scatter(part.mul_(w.view(-1, *ones)), self.group)
        mine = den.view(world_size(self.group), -1)[rank(self.group)]
        return num.div_(mine.view(-1, *ones)).to(x.dtype)


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


def _round_cost(group):
    """``gits.search``'s warm-up round split across ranks: every rank draws the same noise, rank r
    adds n_r C_r (its slice's mean cost matrix times its row count), one all_reduce SUM gives the
    round's summed cost n C that one process computes, float64 [T, T] on the CPU."""
    def round_cost(denoiser, grid, noise, p):
        traj, counts = _solve_slice(denoiser, noise, grid, group, solver=p["teacher"], afs=p["afs"],
                                    return_trajectory=True)
        mine = counts[rank(group)]
        total = torch.zeros(grid.numel(), grid.numel(), dtype=torch.float64, device=noise.device)
        if mine:
            mine_traj = dataclasses.replace(traj, x=traj.x[:, :mine], denoised=traj.denoised[:, :mine])
            total += cost_matrix(mine_traj, p["metric"]) * mine
        return _all_reduce(total, group).cpu()
    return round_cost


def gits_search(denoiser, shape, steps: int, *, group=None, **options):
    """Distributed :func:`geosample.gits.search`: the warm-up samples split across ranks, the
    cost matrix all-reduced, the same DP on every rank, so every rank returns the schedule one
    process finds (the AFS point, when ``afs=True``, is judged on round 0 by every rank with
    replicated denoiser calls, as one process does).  The on-disk cache is per process and is
    not used (a hit on one rank and a miss on another would leave ranks waiting on each other).
    ``progress`` shows on rank 0.
    """
    if options.pop("use_cache", False):
        raise ValueError("gits_search does not use the schedule cache (it is per process); drop use_cache")
    group = getattr(denoiser, "group", None) if group is None else group
    options["progress"] = options.get("progress", False) and is_main(group)
    return _gits_search(denoiser, shape, steps, use_cache=False, round_cost=_round_cost(group), **options)
