"""``gs.gits.search``: teacher trajectories on a fine grid -> averaged cost matrix -> DP -> schedule.

The settings are one :class:`~geosample.gits.GITSConfig`.

1. Fine grid ``G`` = ``grid`` family with ``teacher_steps + 1`` points.
2. Warm-up (:func:`warmup`): ``num_warmup`` samples, noise drawn from
   ``torch.Generator().manual_seed(seed)`` in rounds of ``batch_size``, each solved on ``G`` by
   ``teacher`` (with ``afs``, as the reference does); the per-round cost matrices are averaged
   weighted by round size (= the mean over all samples; the reference resets its accumulator every
   round, so it keeps only the last one), and the teacher's samples are kept as the yardstick below.
3. ``indices = solve_dp(C, steps, gamma)`` for each gamma.

The reference search (``refine=False``) then judges on round 0 (the first ``batch_size`` warm-up
samples) by the mean L2 distance of ``solver``'s samples to the teacher's:

4. AFS (``afs=True``): the DP path gets one more point k between ``indices[0]`` and
   ``indices[1]``, the first step being the free analytical one (NFE stays ``steps`` for
   one-evaluation solvers); k is the one that lands closest.  If ``indices[1] == 1`` there is no
   room and the path is kept as it is.
5. Gamma selection (``gamma`` a sequence, e.g. :data:`GAMMAS`): of the distinct DP paths (each with
   its AFS point) the closest is kept (ties: the earlier gamma); a single gamma skips it.

The recommended search (``refine=True``).  The DP minimises a proxy, Euler-jump costs, that a
multistep solver does not follow, and one local search from the DP's path can lose to a hand-made
schedule depending on the warm-up draw.  So the error E of a path is ``solver``'s own: the pooled
RMSE of its samples to the teacher's, and

4'. Candidates: the DP path of every gamma (with ``afs``, an analytical first step inserted halfway
    to its second point) and the hand-made schedules :data:`~geosample.gits.config.HANDMADE` with
    as many steps, all on the grid R = G plus the hand-made schedules' points;
5'. each is judged on the *fit* half of the warm-up samples (even positions);
6'. the best DP candidate and the best hand-made one are refined on R by coordinate descent on E
    over the fit half (:func:`geosample.gits.refine.coordinate_descent`, at most ``refine_paths``
    paths per interior point each);
7'. the refined paths and the best hand-made schedule are judged on the *check* half (odd
    positions), which no step before used; a refined path wins only if it beats that schedule by
    more than :data:`~geosample.gits.config.CHECK_MARGIN`.  So the result is never a path that merely fits the fit half,
    and a hand-made schedule comes back when nothing beats it.

Denoiser calls of 4'-7' (and of 4-5) are memoised by sigma and the exact point, so paths sharing a
prefix share its calls.  ``params["calls"]`` records each phase's cost in sample evaluations
(denoiser calls x rows).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .. import schedules
from .._threads import search_threads
from ..solvers import nfe as count_nfe
from ..solvers import sample
from ..solvers.base import checked_output
from . import cache
from .config import HANDMADE, GITSConfig, _check_int, with_points
from .cost import cost_matrix
from .dp import path_cost, solve_dp_sweep
from .refine import coordinate_descent
from .schedule import GITSSchedule

__all__ = ["search", "warmup", "Warmup", "fingerprint", "round_cost", "GAMMAS"]

_PROBE_SEED = 20240101
#: A gamma sweep for ``search(gamma=GAMMAS)``: 0.8 to 1.3 in steps of 0.05 (the authors sweep
#: 0.8-1.2 by hand for Stable Diffusion; 1.15 is their CIFAR-10 default).
GAMMAS = tuple(round(0.8 + 0.05 * k, 2) for k in range(11))
#: Memoised denoiser outputs kept, in bytes (least recently used dropped first).
MEMO_BYTES = 512 * 2 ** 20


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


def round_cost(denoiser, fine: torch.Tensor, noise: torch.Tensor, config: GITSConfig):
    """One warm-up round: ``noise`` [n, ...] solved on the fine grid's sigmas ``fine`` [T] by the
    teacher; (n * C, float64 [T, T] on the CPU; the teacher's samples [n, ...])."""
    traj = sample(denoiser, noise, fine, solver=config.teacher, afs=config.afs, return_trajectory=True)
    return cost_matrix(traj, config.metric).cpu() * noise.shape[0], traj.x[-1]


@dataclass
class Warmup:
    """The teacher's run: ``cost`` the mean cost matrix (float64 [T, T], CPU), ``noise`` the warm-up
    noise [num_warmup, ...] and ``targets`` the teacher's samples from it (both on the device);
    ``rows``: sample evaluations it cost and ``seconds`` its time (0 when read from the cache)."""
    cost: torch.Tensor
    noise: torch.Tensor
    targets: torch.Tensor
    rows: int
    seconds: float = 0.0


def _say(progress: bool, text: str) -> None:
    if progress:
        tqdm.write(text, file=sys.stderr)


def warmup(denoiser, shape, config: GITSConfig, device="cpu", progress: bool = False, round_cost=round_cost,
           key: str | None = None) -> Warmup:
    """Step 2: the teacher on ``config.num_warmup`` seeded samples (read from and written to the
    cache under ``key`` when given).  ``round_cost(denoiser, fine, noise, config)`` -> (n C, the
    teacher's samples) computes one round (:mod:`geosample.distributed` splits it across ranks)."""
    fine = config.fine_grid()
    gen = torch.Generator().manual_seed(config.seed)
    sizes = _rounds(config.num_warmup, config.batch_size)
    noise = torch.cat([torch.randn((n, *shape), generator=gen) for n in sizes]).to(device)
    if key:
        cost = cache.get_tensor("cost", key, (fine.numel(),) * 2, torch.float64)
        targets = cache.get_tensor("targets", key, tuple(noise.shape), noise.dtype) if cost is not None else None
        if targets is not None:
            _say(progress, "gits: the teacher's run is cached")
            return Warmup(cost, noise, targets.to(device), 0)
    per_sample = count_nfe(config.teacher, config.teacher_steps, afs=config.afs)
    _say(progress, f"gits: teacher {config.teacher} on {fine.numel()} grid points for {config.num_warmup} samples "
                   f"= {config.num_warmup * per_sample:,} sample evaluations")
    total = torch.zeros(fine.numel(), fine.numel(), dtype=torch.float64)
    targets, start = [], time.perf_counter()
    for i, chunk in enumerate(tqdm(noise.split(sizes), disable=not progress, desc="gits teacher", leave=False)):
        c, t = round_cost(denoiser, fine, chunk, config)
        total += c
        targets.append(t)
        if i == 0 and len(sizes) > 1:
            took = time.perf_counter() - start
            _say(progress, f"gits: the teacher takes about {took * config.num_warmup / sizes[0]:.0f} s "
                           f"(its first round took {took:.1f} s)")
    out = Warmup(total / config.num_warmup, noise, torch.cat(targets), config.num_warmup * per_sample,
                 time.perf_counter() - start)
    if key:
        cache.put_tensor("cost", key, out.cost)
        cache.put_tensor("targets", key, out.targets)
    return out


class _Memo:
    """The denoiser with its outputs remembered by sigma and the exact bytes of x (a repeated call
    costs nothing; at most :data:`MEMO_BYTES` kept, least recently used dropped first); ``rows``
    counts the sample evaluations actually made."""

    def __init__(self, denoiser):
        self.denoiser, self.store, self.bytes, self.rows = denoiser, OrderedDict(), 0, 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        h = hashlib.blake2b(digest_size=20)
        for t in (x, sigma):
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
        key = h.digest()
        if key in self.store:
            self.store.move_to_end(key)
            return self.store[key]
        out = checked_output(self.denoiser(x, sigma), x)
        self.rows += x.shape[0]
        self.store[key] = out
        self.bytes += out.numel() * out.element_size()
        while self.bytes > MEMO_BYTES and len(self.store) > 1:
            _, old = self.store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        return out


class _Judge:
    """E(path): ``solver``'s samples on ``grid[path]`` from ``noise`` against the teacher's
    ``targets``: the pooled RMSE, or (``pooled=False``, the reference's yardstick) the mean L2
    distance; +inf when the solver diverges.  Paths are judged once each."""

    def __init__(self, memo: _Memo, grid: torch.Tensor, noise, targets, config: GITSConfig, pooled: bool):
        self.memo, self.grid, self.noise, self.targets = memo, grid, noise, targets
        self.config, self.pooled, self.seen = config, pooled, {}

    def __call__(self, path) -> float:
        path = tuple(int(i) for i in path)
        if path not in self.seen:
            try:
                x = sample(self.memo, self.noise, self.grid[list(path)], solver=self.config.solver, afs=self.config.afs)
            except FloatingPointError:
                self.seen[path] = math.inf
            else:
                d = (x - self.targets).flatten(1).double()
                self.seen[path] = float(d.pow(2).mean().sqrt() if self.pooled else d.norm(dim=1).mean())
        return self.seen[path]


def _afs_insertions(path: list[int]) -> list[list[int]]:
    """Every path with one more point between path[0] and path[1] (none when they are adjacent)."""
    return [[path[0], k] + path[1:] for k in range(path[0] + 1, path[1])]


def _reference_pick(dp, steps, config, judge) -> dict:
    """Steps 4-5: the record {gamma, dp_indices, indices, error} of the best gamma, and with
    "selection" every gamma's record when there was a choice."""
    gammas, records, judged = config.gammas, [], {}
    for g in gammas:
        dp_path = tuple(dp[steps, g])
        if dp_path not in judged:
            cands = (_afs_insertions(list(dp_path)) if config.afs else []) or [list(dp_path)]
            errors = [judge(c) for c in cands] if len(gammas) > 1 or len(cands) > 1 else [math.nan]
            best = int(np.argmin(errors)) if len(cands) > 1 else 0     # first minimum: the smallest k
            judged[dp_path] = (cands[best], errors[best])
        path, error = judged[dp_path]
        records.append({"gamma": g, "dp_indices": list(dp_path), "indices": path, "error": error})
    best = min(records, key=lambda r: r["error"]) if len(gammas) > 1 else records[0]  # ties: the earlier gamma
    return {**best, "selection": records} if len(gammas) > 1 else best


def _handmade(config: GITSConfig, intervals: int) -> dict[str, torch.Tensor]:
    """name -> each hand-made schedule of :data:`HANDMADE` with ``intervals`` steps over the config's range."""
    return {name: schedules.by_name(name, intervals, sigma_min=config.sigma_min, sigma_max=config.sigma_max)
            for name in HANDMADE}


def _positions(grid: torch.Tensor, sigmas: torch.Tensor) -> list[int]:
    """The position in ``grid`` of each of ``sigmas`` (each one of the grid's points)."""
    return [int((grid - s).abs().argmin()) for s in sigmas.tolist()]


def _recommended_pick(dp, steps, config, memo, grid, fit, check, margin, progress) -> dict:
    """Steps 4'-7': {gamma, dp_indices, indices, selected} with the records "candidates",
    "refinement", "check" and the rows each phase evaluated."""
    fine_pos = _positions(grid, config.fine_grid())
    gamma_of, candidates = {}, []
    for g in config.gammas:
        path = [fine_pos[i] for i in dp[steps, g]]
        if config.afs and path[1] - path[0] > 1:
            path = [path[0], (path[0] + path[1]) // 2] + path[1:]
        if path not in (c["indices"] for c in candidates):   # distinct paths: the first gamma names each
            gamma_of[f"gamma {g}"] = g
            candidates.append({"name": f"gamma {g}", "indices": path})
    candidates += [{"name": name, "indices": _positions(grid, sig)}
                   for name, sig in _handmade(config, steps + int(config.afs)).items()]
    rows = {"candidates": memo.rows}
    for c in tqdm(candidates, disable=not progress, desc="gits candidates", leave=False):
        c["error"] = fit(c["indices"])
    rows["candidates"] = memo.rows - rows["candidates"]
    best_dp = min((c for c in candidates if c["name"] in gamma_of), key=lambda c: c["error"])
    best_hm = min((c for c in candidates if c["name"] in HANDMADE), key=lambda c: c["error"])

    start, refinement = memo.rows, []
    budget = config.refine_paths * max(len(best_dp["indices"]) - 2, 1)
    with tqdm(total=2 * budget, disable=not progress, desc="gits refine", leave=False) as bar:
        for begin in dict.fromkeys((best_dp["name"], best_hm["name"])):
            first = next(c for c in candidates if c["name"] == begin)
            path, seen = coordinate_descent(lambda p: _counted(fit, p, bar), first["indices"], budget=budget)
            refinement.append({"from": begin, "indices_from": first["indices"], "error_from": first["error"],
                               "indices": path, "error": seen[tuple(path)], "paths": len(seen)})
    rows["refinement"] = memo.rows - start

    start = memo.rows
    finalists = {f"refined from {r['from']}": r["indices"] for r in refinement}
    finalists[best_hm["name"]] = best_hm["indices"]
    judged = [{"name": name, "indices": path, "error": check(path)}
              for name, path in tqdm(finalists.items(), disable=not progress, desc="gits check", leave=False)]
    rows["check"] = memo.rows - start
    hm = judged[-1]
    refined = min(judged[:-1], key=lambda r: r["error"])
    pick = refined if refined["error"] < hm["error"] * (1 - margin) else hm
    if not math.isfinite(pick["error"]):
        raise FloatingPointError(f"solver {config.solver!r} diverges on every candidate schedule; check the denoiser")
    gamma = gamma_of[best_dp["name"]]
    return {"gamma": gamma, "dp_indices": list(dp[steps, gamma]), "indices": pick["indices"], "selected": pick["name"],
            "candidates": candidates, "refinement": refinement, "check": judged, "rows": rows}


def _counted(fit, path, bar) -> float:
    new = tuple(path) not in fit.seen
    error = fit(path)
    if new:
        bar.update(1)
    return error


def _config(config, options: dict) -> GITSConfig:
    """``config`` (default :class:`GITSConfig`) with the keyword ``options`` replacing its fields."""
    if config is not None and not isinstance(config, GITSConfig):
        raise TypeError(f"config must be a GITSConfig, got {type(config).__name__}; pass search options as keywords")
    fields = {f.name for f in dataclasses.fields(GITSConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"gits.search got unknown options {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    return GITSConfig(**options) if config is None else dataclasses.replace(config, **options)


def search(denoiser, shape, steps: int, config: GITSConfig | None = None, *, device="cpu", backend: str = "auto",
           use_cache: bool = True, progress: bool = False, round_cost=round_cost, **options) -> GITSSchedule:
    """Search a GITS schedule of ``steps`` steps (``steps + 1`` with ``afs``) for ``denoiser``.

    denoiser: D(x, sigma) on samples of ``shape`` (one sample, e.g. (3, 32, 32)).
    config: a :class:`GITSConfig` (default: its defaults); keyword ``options`` (teacher,
    teacher_steps, grid, metric, gamma, num_warmup, seed, batch_size, afs, solver, sigma_min,
    sigma_max, rho, refine) replace its fields, so ``search(D, shape, steps, teacher="euler")`` and
    ``search(D, shape, steps, GITSConfig(teacher="euler"))`` are the same search.
    ``refine=True, gamma=GAMMAS`` is the recommended search (see the module docstring); the default
    is the reference's.  The result's ``params`` record the choices (reference: "selection" with a
    gamma sweep; recommended: "candidates", "refinement", "check", "selected") and "calls", each
    phase's sample evaluations; its ``config`` is the configuration used.
    device: where the teacher runs; backend: DP backend; use_cache: read and write the cache
    (:mod:`geosample.gits.cache`): the teacher's run is shared by every solver, step count and
    gamma, so a second search on the same model skips it.  progress: a bar per phase and an
    estimate of the cost before the work.  Small denoiser calls run on one torch thread
    (:func:`geosample._threads.search_threads`; the caller's setting is restored).
    round_cost(denoiser, fine, noise, config) -> (n C, the teacher's samples): how one warm-up
    round is computed (:func:`geosample.distributed.gits_search` splits each round across ranks).
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
    shape = _check_shape(shape)
    config = _config(config, options)
    steps = _check_int("steps", steps, 1)
    if steps > config.teacher_steps:
        raise ValueError(f"steps must be <= teacher_steps ({config.teacher_steps}), got {steps}")
    with search_threads(shape, config.batch_size):
        return _search(denoiser, shape, steps, config, device, backend, use_cache, progress, round_cost)


def _search(denoiser, shape, steps, config, device, backend, use_cache, progress, round_cost) -> GITSSchedule:
    fine = config.fine_grid()
    fp = fingerprint(denoiser, shape, device)
    cost_key = cache.key({"grid": config.grid_record(), **config.teacher_record(shape), "fingerprint": fp})
    params = config.record(shape, steps)
    sched_key = cache.key({"grid": config.grid_record(), **params, "fingerprint": fp})
    if use_cache and (hit := cache.get_schedule(sched_key)) is not None:
        return hit
    bound = _judge_bound(config, steps)
    _say(progress, f"gits: a {steps}-step schedule for {config.solver}: the teacher's run, then at most {bound:,} "
                   f"sample evaluations to judge paths (one batch of 64 at this NFE is "
                   f"{64 * count_nfe(config.solver, steps + int(config.afs), afs=config.afs):,})")
    run = warmup(denoiser, shape, config, device, progress, round_cost, cost_key if use_cache else None)
    if run.rows:
        _say(progress, f"gits: the teacher took {run.seconds:.0f} s; judging paths takes at most about "
                       f"{run.seconds / run.rows * bound:.0f} s more")
    cost = run.cost.numpy()
    dp = solve_dp_sweep(cost, [steps], config.gammas, backend)
    memo = _Memo(denoiser)
    if config.refine:
        handmade = _handmade(config, steps + int(config.afs))
        grid = with_points(fine, torch.cat(list(handmade.values())).tolist())
        half = lambda t, k: t[k::2]  # noqa: E731  (fit: even positions, check: odd)
        fit = _Judge(memo, grid, half(run.noise, 0), half(run.targets, 0), config, pooled=True)
        check = _Judge(memo, grid, half(run.noise, 1), half(run.targets, 1), config, pooled=True)
        best = _recommended_pick(dp, steps, config, memo, grid, fit, check, params["check_margin"], progress)
        rows = best.pop("rows")
        extra = [s for s in grid.tolist() if not any(abs(s - g) <= 1e-12 * g for g in fine.tolist())]
        params.update(selected_gamma=best["gamma"], selected=best["selected"], candidates=best["candidates"],
                      refinement=best["refinement"], check=best["check"],
                      samples={"fit": fit.noise.shape[0], "check": check.noise.shape[0]})
        grid_record = config.grid_record(extra)
    else:
        grid = fine
        n0 = min(config.batch_size, config.num_warmup)
        judge = _Judge(memo, fine, run.noise[:n0], run.targets[:n0], config, pooled=False)
        best = _reference_pick(dp, steps, config, judge)
        if len(config.gammas) > 1:
            params.update(selected_gamma=best["gamma"], selection=best["selection"])
        rows = {"selection": memo.rows}
        grid_record = config.grid_record()
    indices = best["indices"]
    total, step_costs = path_cost(cost, best["dp_indices"], best["gamma"])
    params["nfe"] = count_nfe(config.solver, len(indices) - 1, afs=config.afs)
    params["calls"] = {"teacher": run.rows, **rows}
    sched = GITSSchedule(sigmas=grid[indices].clone(), indices=indices, grid=grid_record, cost=total,
                         step_costs=step_costs, params=params, fingerprint=fp, cost_matrix=run.cost)
    if use_cache:
        cache.put_schedule(sched_key, sched)
    return sched


def _judge_bound(config, steps) -> int:
    """An upper bound on the sample evaluations that judge paths (memoised calls make it less):
    steps 4'-7' of the recommended search, or 4-5 of the reference's."""
    nfe = count_nfe(config.solver, steps + int(config.afs), afs=config.afs)
    if not config.refine:
        room = config.teacher_steps - steps if config.afs else 1
        paths = len(config.gammas) * room if len(config.gammas) > 1 or config.afs else 0
        return paths * min(config.batch_size, config.num_warmup) * nfe
    fit, check = (config.num_warmup + 1) // 2, config.num_warmup // 2
    paths = len(config.gammas) + len(HANDMADE) + 2 * config.refine_paths * max(steps - 1, 1)
    return paths * fit * nfe + 3 * check * nfe
