"""``gs.gits.search``: teacher trajectories on a fine grid -> averaged cost matrix -> DP -> schedule.

The settings are one :class:`~geosample.gits.GITSConfig`.

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
6. Refinement (``refine=True``): the path of steps 3-5 is moved on the fine grid by coordinate
   descent on that same yardstick, ``solver``'s mean L2 distance to the teacher on round 0
   (:func:`geosample.gits.refine.coordinate_descent`): the DP's Euler-jump cost is a proxy that a
   multistep solver does not follow.  Cost: ``nfe`` denoiser calls on round 0 per distinct path
   tried, recorded in ``params["refinement"]``.
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch
from tqdm.auto import tqdm

from ..solvers import nfe as count_nfe
from ..solvers import sample
from ..solvers.base import checked_output
from . import cache
from .config import GITSConfig, _check_int
from .cost import cost_matrix
from .dp import path_cost, solve_dp_sweep
from .refine import coordinate_descent
from .schedule import GITSSchedule

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
        out = checked_output(denoiser(n * s, torch.full((2,), s, device=device)), n)
        h.update(np.round(out.detach().to("cpu", torch.float64).numpy(), 4).tobytes())
    return h.hexdigest()[:16]


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


def _teacher(denoiser, fine, noise, config: GITSConfig):
    return sample(denoiser, noise, fine, solver=config.teacher, afs=config.afs, return_trajectory=True)


def round_cost(denoiser, fine: torch.Tensor, noise: torch.Tensor, config: GITSConfig) -> torch.Tensor:
    """One warm-up round's summed cost, n * C over its n samples of ``noise`` solved on the fine
    grid's sigmas ``fine`` [T]: float64 [T, T] on the CPU."""
    traj = _teacher(denoiser, fine, noise, config)
    return cost_matrix(traj, config.metric).cpu() * noise.shape[0]


def _warmup_cost(denoiser, fine, shape, config, device, progress, round_cost) -> torch.Tensor:
    """Sample-weighted mean of the per-round cost matrices, float64 [T, T] on the CPU."""
    gen = torch.Generator().manual_seed(config.seed)
    total = torch.zeros(fine.numel(), fine.numel(), dtype=torch.float64)
    sizes = _rounds(config.num_warmup, config.batch_size)
    for n in tqdm(sizes, disable=not progress, desc="gits teacher", leave=False):
        noise = torch.randn((n, *shape), generator=gen).to(device)
        total += round_cost(denoiser, fine, noise, config)
    return total / config.num_warmup


def _validation(denoiser, fine, shape, config, device, key) -> tuple[torch.Tensor, torch.Tensor]:
    """Round 0's noise and the teacher's samples from it (cached under ``key`` when given): the
    yardstick of steps 4 and 5."""
    gen = torch.Generator().manual_seed(config.seed)
    noise = torch.randn((min(config.batch_size, config.num_warmup), *shape), generator=gen).to(device)
    target = cache.get_tensor("target", key, noise.shape, noise.dtype) if key else None
    if target is None:
        target = _teacher(denoiser, fine, noise, config).x[-1]
        if key:
            cache.put_tensor("target", key, target)
    return noise, target.to(device)


def _endpoint_error(denoiser, fine, indices, validation, config) -> float:
    """Mean L2 distance of ``solver``'s samples on ``fine[indices]`` to the teacher's."""
    noise, target = validation
    x = sample(denoiser, noise, fine[indices], solver=config.solver, afs=config.afs)
    return float((x - target).flatten(1).double().norm(dim=1).mean())


def _judge(denoiser, fine, indices, validation, config) -> tuple[list[int], float]:
    """(path, error): the DP path itself, or with ``afs`` the best AFS insertion k in
    (indices[0], indices[1]) (none when indices[1] == 1)."""
    cands = [[0, k] + indices[1:] for k in range(1, indices[1])] if config.afs else []
    errors = [_endpoint_error(denoiser, fine, c, validation, config) for c in cands or [indices]]
    best = int(np.argmin(errors))                    # first minimum: the smallest k
    return (cands or [indices])[best], errors[best]


def _select(denoiser, fine, cost, steps, shape, config, device, backend, key) -> dict:
    """Steps 3-5: the record {gamma, dp_indices, indices, error} of the best gamma, and with
    "selection" every gamma's record when there was a choice."""
    gammas = config.gammas
    dp = solve_dp_sweep(cost, [steps], gammas, backend)
    path = dp[steps, gammas[0]]
    if len(gammas) == 1 and (not config.afs or path[1] == 1):
        return {"gamma": gammas[0], "dp_indices": path, "indices": path}
    validation = _validation(denoiser, fine, shape, config, device, key)
    judged, records = {}, []                             # distinct DP paths are judged once
    for g in gammas:
        dp_path = tuple(dp[steps, g])
        if dp_path not in judged:
            judged[dp_path] = _judge(denoiser, fine, list(dp_path), validation, config)
        path, error = judged[dp_path]
        records.append({"gamma": g, "dp_indices": list(dp_path), "indices": path, "error": error})
    best = min(records, key=lambda r: r["error"])       # first minimum: the earlier gamma
    return {**best, "selection": records}


def _refine(denoiser, fine, indices, shape, config, device, key) -> tuple[list[int], dict]:
    """Step 6: (refined path, record {from, error_from, error, paths, nfe, samples}): ``paths``
    distinct paths tried, ``nfe`` denoiser calls per sample on the ``samples`` of round 0."""
    validation = _validation(denoiser, fine, shape, config, device, key)
    error = lambda path: _endpoint_error(denoiser, fine, path, validation, config)  # noqa: E731
    path, seen = coordinate_descent(error, indices)
    calls = count_nfe(config.solver, len(indices) - 1, afs=config.afs)
    return path, {"from": list(indices), "error_from": seen[tuple(indices)], "error": seen[tuple(path)],
                  "paths": len(seen), "nfe": len(seen) * calls, "samples": validation[0].shape[0]}


def _config(config, options: dict) -> GITSConfig:
    """``config`` (default :class:`GITSConfig`) with the keyword ``options`` replacing its fields."""
    if config is not None and not isinstance(config, GITSConfig):
        raise TypeError(f"config must be a GITSConfig, got {type(config).__name__}; pass search options as keywords")
    fields = {f.name for f in dataclasses.fields(GITSConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"gits.search got unknown options {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    return dataclasses.replace(config or GITSConfig(), **options)


def search(denoiser, shape, steps: int, config: GITSConfig | None = None, *, device="cpu", backend: str = "auto",
           use_cache: bool = True, progress: bool = False, round_cost=round_cost, **options) -> GITSSchedule:
    """Search a GITS schedule of ``steps`` steps (``steps + 1`` with ``afs``) for ``denoiser``.

    denoiser: D(x, sigma) on samples of ``shape`` (one sample, e.g. (3, 32, 32)).
    config: a :class:`GITSConfig` (default: its defaults); keyword ``options`` (teacher,
    teacher_steps, grid, metric, gamma, num_warmup, seed, batch_size, afs, solver, sigma_min,
    sigma_max, rho, refine) replace its fields, so ``search(D, shape, steps, teacher="euler")`` and
    ``search(D, shape, steps, GITSConfig(teacher="euler"))`` are the same search.  With a gamma
    sweep ``params["selection"]`` records each gamma's path and error, ``params["selected_gamma"]``
    the winner; with ``refine=True`` ``params["refinement"]`` the path before it, both errors and
    its cost; the result's ``config`` is the configuration used.
    device: where the teacher runs; backend: DP backend; use_cache: read and write the schedule
    cache (:mod:`geosample.gits.cache`).
    round_cost(denoiser, fine, noise, config) -> n * C: how one warm-up round's summed cost is
    computed (:func:`geosample.distributed.gits_search` splits each round across ranks).
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
    shape = _check_shape(shape)
    config = _config(config, options)
    steps = _check_int("steps", steps, 1)
    if steps > config.teacher_steps:
        raise ValueError(f"steps must be <= teacher_steps ({config.teacher_steps}), got {steps}")
    fine = config.fine_grid()
    fp = fingerprint(denoiser, shape, device)
    grid = config.grid_record()                   # cache keys: the same dicts as format 2's entries
    cost_key = cache.key({"grid": grid, **config.teacher_record(shape), "fingerprint": fp})
    params = config.record(shape, steps)
    sched_key = cache.key({"grid": grid, **params, "fingerprint": fp})
    if use_cache and (hit := cache.get_schedule(sched_key)) is not None:
        return hit
    cost = cache.get_tensor("cost", cost_key, (fine.numel(),) * 2, torch.float64) if use_cache else None
    if cost is None:
        cost = _warmup_cost(denoiser, fine, shape, config, device, progress, round_cost)
        if use_cache:
            cache.put_tensor("cost", cost_key, cost)
    best = _select(denoiser, fine, cost.numpy(), steps, shape, config, device, backend,
                   cost_key if use_cache else None)
    indices = best["indices"]
    if len(config.gammas) > 1:
        params.update(selected_gamma=best["gamma"], selection=best["selection"])
    if config.refine:
        indices, params["refinement"] = _refine(denoiser, fine, indices, shape, config, device,
                                                cost_key if use_cache else None)
    total, step_costs = path_cost(cost.numpy(), best["dp_indices"], best["gamma"])
    params["nfe"] = count_nfe(config.solver, len(indices) - 1, afs=config.afs)
    sched = GITSSchedule(sigmas=fine[indices].clone(), indices=indices, grid=grid, cost=total,
                         step_costs=step_costs, params=params, fingerprint=fp, cost_matrix=cost)
    if use_cache:
        cache.put_schedule(sched_key, sched)
    return sched
