"""``gs.gits.search``: teacher trajectories on a fine grid -> averaged cost matrix -> DP -> schedule.

1. Fine grid ``G`` = ``grid`` family with ``teacher_steps + 1`` points.
2. Teacher: ``num_warmup`` samples, noise drawn from ``torch.Generator().manual_seed(seed)`` in
   rounds of ``batch_size``, each solved on ``G`` by ``teacher`` (with ``afs``, as the reference
   does); the per-round cost matrices are averaged weighted by round size (= the mean over all
   samples).  The reference resets its accumulator every round, so it keeps only the last
   round; here every sample counts.
3. ``indices = solve_dp(C, steps, gamma)``.
4. AFS (``afs=True``): the DP path gets one more point k between ``indices[0]`` and
   ``indices[1]``; the first step is then the free analytical one, so NFE stays ``steps`` for
   one-evaluation solvers.  k is the one whose ``solver`` sample (with ``afs=True``) from round 0's
   noise lands closest (mean L2) to the teacher's.  If ``indices[1] == 1`` there is no room and
   the path is kept as it is.
"""
from __future__ import annotations

import hashlib
import math
import numbers

import numpy as np
import torch
from tqdm.auto import tqdm

from ..solvers import nfe as count_nfe
from ..solvers import sample
from ..solvers.sampling import get_solver
from . import cache
from .cost import METRICS, cost_matrix
from .dp import _check_gamma, path_cost, solve_dp
from .schedule import GRIDS, GITSSchedule, fine_grid

__all__ = ["search", "fingerprint", "round_cost"]

_PROBE_SEED = 20240101


@torch.no_grad()
def fingerprint(denoiser, shape, device="cpu", sigmas=(80.0, 1.0, 0.002)) -> str:
    """A short hash identifying a denoiser (model + data).

    ``denoiser.fingerprint()`` when it has one; otherwise the sha256 of the denoiser's outputs,
    rounded to 4 decimals, on a fixed seeded probe x = sigma * n, n [2, *shape], at ``sigmas``.
    """
    own = getattr(denoiser, "fingerprint", None)
    if callable(own):
        return str(own())
    g = torch.Generator().manual_seed(_PROBE_SEED)
    n = torch.randn((2, *shape), generator=g).to(device)
    h = hashlib.sha256(f"{type(denoiser).__name__}{tuple(shape)}".encode())
    for s in sigmas:
        out = denoiser(n * s, torch.full((2,), s, device=device))
        h.update(np.round(out.detach().to("cpu", torch.float64).numpy(), 4).tobytes())
    return h.hexdigest()[:16]


def _check_int(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return int(v)


def _check_shape(shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints (one sample's shape), got {shape!r}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"shape must be one sample's shape with positive sizes, got {shape}")
    return shape


def _rounds(num_warmup: int, batch_size: int) -> list[int]:
    full, rest = divmod(num_warmup, batch_size)
    return [batch_size] * full + ([rest] if rest else [])


def _teacher(denoiser, grid, noise, teacher, afs):
    return sample(denoiser, noise, grid, solver=teacher, afs=afs, return_trajectory=True)


def round_cost(denoiser, grid, noise, p) -> torch.Tensor:
    """One warm-up round's summed cost, n * C over its n samples: float64 [T, T] on the CPU."""
    traj = _teacher(denoiser, grid, noise, p["teacher"], p["afs"])
    return cost_matrix(traj, p["metric"]).cpu() * noise.shape[0]


def _warmup_cost(denoiser, grid, shape, p, device, progress, round_cost) -> torch.Tensor:
    """Sample-weighted mean of the per-round cost matrices, float64 [T, T] on the CPU."""
    gen = torch.Generator().manual_seed(p["seed"])
    total = torch.zeros(grid.numel(), grid.numel(), dtype=torch.float64)
    sizes = _rounds(p["num_warmup"], p["batch_size"])
    for n in tqdm(sizes, disable=not progress, desc="gits teacher", leave=False):
        noise = torch.randn((n, *shape), generator=gen).to(device)
        total += round_cost(denoiser, grid, noise, p)
    return total / p["num_warmup"]


def _afs_insert(denoiser, grid, indices, shape, p, device) -> list[int]:
    """indices with the AFS point k in (indices[0], indices[1]) closest to the teacher on round 0."""
    if indices[1] <= 1:
        return indices
    gen = torch.Generator().manual_seed(p["seed"])
    noise = torch.randn((min(p["batch_size"], p["num_warmup"]), *shape), generator=gen).to(device)
    target = _teacher(denoiser, grid, noise, p["teacher"], True).x[-1]
    best, best_dist = indices, math.inf
    for k in range(1, indices[1]):
        cand = [0, k] + indices[1:]
        x = sample(denoiser, noise, grid[cand], solver=p["solver"], afs=True)
        dist = float((x - target).flatten(1).double().norm(dim=1).mean())
        if dist < best_dist:
            best, best_dist = cand, dist
    return best


def search(denoiser, shape, steps: int, teacher: str = "ipndm", teacher_steps: int = 60,
           grid: str = "polynomial", metric: str = "dev", gamma: float = 1.15, num_warmup: int = 256,
           seed: int = 0, batch_size: int = 64, afs: bool = False, solver: str = "ipndm",
           sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
           device="cpu", backend: str = "auto", use_cache: bool = True,
           progress: bool = False, round_cost=round_cost) -> GITSSchedule:
    """Search a GITS schedule of ``steps`` steps (``steps + 1`` with ``afs``) for ``denoiser``.

    denoiser: D(x, sigma) on samples of ``shape`` (one sample, e.g. (3, 32, 32)).
    teacher / teacher_steps / grid / rho / sigma_min / sigma_max: the teacher solve on the fine grid.
    metric: "dev" | "l1" | "l2"; gamma: DP discount (> 0); num_warmup samples in rounds of
    batch_size, seeded by seed; afs: search the inserted analytical first step, judged with
    ``solver``; backend: DP backend; use_cache: read and write the schedule cache
    (:mod:`geosample.gits.cache`).  ``rho`` is ignored (stored as None) for ``grid="logsnr"``.
    round_cost(denoiser, grid, noise, params) -> n * C: how one warm-up round's summed cost is
    computed (:func:`geosample.distributed.gits_search` splits each round across ranks).
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
    shape = _check_shape(shape)
    teacher_steps = _check_int("teacher_steps", teacher_steps, 2)
    steps = _check_int("steps", steps, 1)
    if steps > teacher_steps:
        raise ValueError(f"steps must be <= teacher_steps ({teacher_steps}), got {steps}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; valid: {', '.join(GRIDS)}")
    teacher, solver = get_solver(teacher).name, get_solver(solver).name
    if not get_solver(teacher).denoised_at_x:
        raise ValueError(f"teacher {teacher!r} records D at its predictor points, not on the trajectory; "
                         "use ipndm, dpmpp, deis, euler, heun, dpm2 or ipndm_v")
    rho = None if grid == "logsnr" else float(rho)
    g = fine_grid(grid, teacher_steps, sigma_min, sigma_max, rho)
    gridp = {"family": grid, "teacher_steps": teacher_steps, "sigma_min": float(sigma_min),
             "sigma_max": float(sigma_max), "rho": rho}
    p = {"teacher": teacher, "metric": metric, "num_warmup": _check_int("num_warmup", num_warmup, 1),
         "seed": _check_int("seed", seed, 0), "batch_size": _check_int("batch_size", batch_size, 1),
         "afs": bool(afs), "shape": list(shape)}
    fp = fingerprint(denoiser, shape, device)
    cost_key = cache.key({"grid": gridp, **p, "fingerprint": fp})
    p.update(steps=steps, gamma=_check_gamma(gamma), solver=solver)
    sched_key = cache.key({"grid": gridp, **p, "fingerprint": fp})
    if use_cache and (hit := cache.get_schedule(sched_key)) is not None:
        return hit
    cost = cache.get_cost(cost_key, g.numel()) if use_cache else None
    if cost is None:
        cost = _warmup_cost(denoiser, g, shape, p, device, progress, round_cost)
        if use_cache:
            cache.put_cost(cost_key, cost)
    indices = solve_dp(cost.numpy(), steps, gamma, backend)
    total, step_costs = path_cost(cost.numpy(), indices, gamma)
    if afs:
        indices = _afs_insert(denoiser, g, indices, shape, p, device)
    p["nfe"] = count_nfe(solver, len(indices) - 1, afs=afs)
    sched = GITSSchedule(sigmas=g[indices].clone(), indices=indices, grid=gridp, cost=total,
                         step_costs=step_costs, params=p, fingerprint=fp, cost_matrix=cost)
    if use_cache:
        cache.put_schedule(sched_key, sched)
    return sched
