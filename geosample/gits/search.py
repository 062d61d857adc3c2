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
5. Gamma selection (``gamma`` a sequence, e.g. :data:`GAMMAS`): the DP objective is a proxy (Euler
   jump costs, discounted by gamma^k), and the best gamma depends on the model and the solver.  So
   the DP runs once per gamma, and of the distinct paths (each with its AFS point when ``afs``) the
   one whose ``solver`` sample from round 0's noise lands closest (mean L2) to the teacher's is kept
   (ties: the earlier gamma).  The same yardstick as step 4; a single gamma skips it.
"""
from __future__ import annotations

import hashlib
import numbers

import numpy as np
import torch
from tqdm.auto import tqdm

from ..solvers import nfe as count_nfe
from ..solvers import sample
from ..solvers.sampling import get_solver
from . import cache
from .cost import METRICS, cost_matrix
from .dp import _check_gamma, path_cost, solve_dp_sweep
from .schedule import GRIDS, GITSSchedule, fine_grid

__all__ = ["search", "fingerprint", "round_cost", "GAMMAS"]

_PROBE_SEED = 20240101
#: A gamma sweep for ``search(gamma=GAMMAS)``: 0.8 to 1.3 in steps of 0.05 (the authors sweep
#: 0.8-1.2 by hand for Stable Diffusion; 1.15 is their CIFAR-10 default).
GAMMAS = tuple(round(0.8 + 0.05 * k, 2) for k in range(11))


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


def _check_gammas(gamma) -> list[float]:
    """One gamma or a non-empty sequence of them, each finite and > 0."""
    if isinstance(gamma, numbers.Real) and not isinstance(gamma, bool):
        return [_check_gamma(gamma)]
    try:
        gammas = [_check_gamma(g) for g in gamma]
    except TypeError:
        raise TypeError(f"gamma must be a float or a sequence of floats, got {type(gamma).__name__}") from None
    if not gammas:
        raise ValueError("gamma must be a float or a non-empty sequence of floats, got an empty sequence")
    return gammas


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


def _validation(denoiser, grid, shape, p, device, key) -> tuple[torch.Tensor, torch.Tensor]:
    """Round 0's noise and the teacher's samples from it (cached under ``key`` when given): the
    yardstick of steps 4 and 5."""
    gen = torch.Generator().manual_seed(p["seed"])
    noise = torch.randn((min(p["batch_size"], p["num_warmup"]), *shape), generator=gen).to(device)
    target = cache.get_tensor("target", key, noise.shape, noise.dtype) if key else None
    if target is None:
        target = _teacher(denoiser, grid, noise, p["teacher"], p["afs"]).x[-1]
        if key:
            cache.put_tensor("target", key, target)
    return noise, target.to(device)


def _endpoint_error(denoiser, grid, indices, validation, p) -> float:
    """Mean L2 distance of ``solver``'s samples on ``grid[indices]`` to the teacher's."""
    noise, target = validation
    x = sample(denoiser, noise, grid[indices], solver=p["solver"], afs=p["afs"])
    return float((x - target).flatten(1).double().norm(dim=1).mean())


def _judge(denoiser, grid, indices, validation, p) -> tuple[list[int], float]:
    """(path, error): the DP path itself, or with ``afs`` the best AFS insertion k in
    (indices[0], indices[1]) (none when indices[1] == 1)."""
    cands = [[0, k] + indices[1:] for k in range(1, indices[1])] if p["afs"] else []
    errors = [_endpoint_error(denoiser, grid, c, validation, p) for c in cands or [indices]]
    best = int(np.argmin(errors))                    # first minimum: the smallest k
    return (cands or [indices])[best], errors[best]


def _select(denoiser, grid, cost, steps, gammas, shape, p, device, backend, key) -> dict:
    """Steps 3-5: the record {gamma, dp_indices, indices, error} of the best gamma, and with
    "selection" every gamma's record when there was a choice."""
    dp = solve_dp_sweep(cost, [steps], gammas, backend)
    path = dp[steps, gammas[0]]
    if len(gammas) == 1 and (not p["afs"] or path[1] == 1):
        return {"gamma": gammas[0], "dp_indices": path, "indices": path}
    validation = _validation(denoiser, grid, shape, p, device, key)
    judged, records = {}, []                             # distinct DP paths are judged once
    for g in gammas:
        dp_path = tuple(dp[steps, g])
        if dp_path not in judged:
            judged[dp_path] = _judge(denoiser, grid, list(dp_path), validation, p)
        path, error = judged[dp_path]
        records.append({"gamma": g, "dp_indices": list(dp_path), "indices": path, "error": error})
    best = min(records, key=lambda r: r["error"])       # first minimum: the earlier gamma
    return {**best, "selection": records}


def search(denoiser, shape, steps: int, teacher: str = "ipndm", teacher_steps: int = 60,
           grid: str = "polynomial", metric: str = "dev", gamma=1.15, num_warmup: int = 256,
           seed: int = 0, batch_size: int = 64, afs: bool = False, solver: str = "ipndm",
           sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
           device="cpu", backend: str = "auto", use_cache: bool = True,
           progress: bool = False, round_cost=round_cost) -> GITSSchedule:
    """Search a GITS schedule of ``steps`` steps (``steps + 1`` with ``afs``) for ``denoiser``.

    denoiser: D(x, sigma) on samples of ``shape`` (one sample, e.g. (3, 32, 32)).
    teacher / teacher_steps / grid / rho / sigma_min / sigma_max: the teacher solve on the fine grid.
    metric: "dev" | "l1" | "l2"; gamma: DP discount (> 0), or a sequence of them to pick from by
    ``solver``'s error to the teacher (e.g. :data:`GAMMAS`; ``params["selection"]`` then records
    each gamma's path and error, ``params["selected_gamma"]`` the winner); num_warmup samples in
    rounds of batch_size, seeded by seed; afs: search the inserted analytical first step, judged
    with ``solver``; backend: DP backend; use_cache: read and write the schedule cache
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
    gammas = _check_gammas(gamma)
    p.update(steps=steps, gamma=gammas[0] if isinstance(gamma, numbers.Real) else gammas, solver=solver)
    sched_key = cache.key({"grid": gridp, **p, "fingerprint": fp})
    if use_cache and (hit := cache.get_schedule(sched_key)) is not None:
        return hit
    cost = cache.get_tensor("cost", cost_key, (g.numel(),) * 2, torch.float64) if use_cache else None
    if cost is None:
        cost = _warmup_cost(denoiser, g, shape, p, device, progress, round_cost)
        if use_cache:
            cache.put_tensor("cost", cost_key, cost)
    best = _select(denoiser, g, cost.numpy(), steps, gammas, shape, p, device, backend,
                   cost_key if use_cache else None)
    indices = best["indices"]
    if len(gammas) > 1:
        p.update(selected_gamma=best["gamma"], selection=best["selection"])
    total, step_costs = path_cost(cost.numpy(), best["dp_indices"], best["gamma"])
    p["nfe"] = count_nfe(solver, len(indices) - 1, afs=afs)
    sched = GITSSchedule(sigmas=g[indices].clone(), indices=indices, grid=gridp, cost=total,
                         step_costs=step_costs, params=p, fingerprint=fp, cost_matrix=cost)
    if use_cache:
        cache.put_schedule(sched_key, sched)
    return sched
