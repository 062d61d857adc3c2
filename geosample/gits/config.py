"""``GITSConfig``: every setting of a GITS search that shapes its result, as one typed, frozen value.

A searched :class:`~geosample.gits.GITSSchedule` records it (``schedule.grid`` holds the fine
grid's fields, ``schedule.params`` the others) and gives it back as ``schedule.config``, also
after :func:`geosample.gits.load`.  The step count is not part of it: one configuration (one
teacher, one cost matrix) serves every step count.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass

import torch

from .. import schedules
from ..solvers.sampling import get_solver
from .cost import METRICS
from .dp import _check_gamma

__all__ = ["GITSConfig", "fine_grid", "with_points", "GRIDS", "HANDMADE"]

#: |ln gamma^k| above which the DP's discount leaves float64 (e^700 ~ 1e304).
MAX_LOG_DISCOUNT = 700.0

#: The fine grid families (names of :data:`geosample.schedules.FAMILIES`).
GRIDS = ("polynomial", "logsnr", "time_uniform")
#: The hand-made schedules a refined search also considers (and never returns anything worse than).
HANDMADE = ("polynomial", "logsnr", "time_uniform")
#: Teacher samples when ``num_warmup`` is not given: the reference's 256; a refined search 64 (its
#: cost matrix picks the same paths from 64 samples, and the samples also judge the paths).
NUM_WARMUP, NUM_WARMUP_REFINE = 256, 64
#: A refined path replaces the best hand-made schedule only when its check error is lower by more
#: than this fraction (the check half is a finite sample: small differences are noise).
CHECK_MARGIN = 0.01


def fine_grid(grid: str, teacher_steps: int, sigma_min: float, sigma_max: float, rho: float | None) -> torch.Tensor:
    """The fine grid G (``teacher_steps + 1`` float64 sigmas) of a schedule family; ``rho`` is
    ignored for logsnr, which has none."""
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; valid: {', '.join(GRIDS)}")
    shape = {} if grid == "logsnr" else {"rho": rho}
    return schedules.by_name(grid, teacher_steps, sigma_min=sigma_min, sigma_max=sigma_max, **shape)


def with_points(grid: torch.Tensor, points) -> torch.Tensor:
    """``grid`` (decreasing float64 sigmas) with ``points`` added, decreasing; a point within a
    relative 1e-12 of a sigma already there is that sigma."""
    merged = grid.tolist()
    for p in map(float, points):
        if not any(abs(p - g) <= 1e-12 * g for g in merged):
            merged.append(p)
    return torch.tensor(sorted(merged, reverse=True), dtype=torch.float64)


def _check_int(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    return int(v)


def _check_gammas(gamma) -> float | tuple[float, ...]:
    """One gamma (a float) or a non-empty tuple of them, each finite and > 0."""
    if isinstance(gamma, numbers.Real) and not isinstance(gamma, bool):
        return _check_gamma(gamma)
    try:
        gammas = tuple(_check_gamma(g) for g in gamma)
    except TypeError:
        raise TypeError(f"gamma must be a float or a sequence of floats, got {type(gamma).__name__}") from None
    if not gammas:
        raise ValueError("gamma must be a float or a non-empty sequence of floats, got an empty sequence")
    return gammas


@dataclass(frozen=True)
class GITSConfig:
    """The settings of :func:`geosample.gits.search` (checked and normalised on construction).

    teacher / teacher_steps / grid / sigma_min / sigma_max / rho: the teacher's solve on the fine
    grid ``grid`` (a family of :data:`geosample.schedules.FAMILIES`: polynomial, logsnr or
    time_uniform) with ``teacher_steps + 1`` points; ``rho`` is None for logsnr (which has none).
    metric: "dev" | "l1" | "l2", the cost of an Euler jump.  gamma: the DP discount (> 0), or a
    tuple of them to pick from by ``solver``'s error to the teacher.  num_warmup teacher samples in
    rounds of batch_size, seeded by seed (None: :data:`NUM_WARMUP`, or :data:`NUM_WARMUP_REFINE`
    with refine).  afs: the analytical first step, judged with ``solver``.
    refine: the recommended search (:mod:`geosample.gits.search`): the DP paths of every gamma and
    the hand-made schedules :data:`HANDMADE` are judged by ``solver``'s own error to the teacher,
    the best are refined by coordinate descent (:mod:`geosample.gits.refine`) and the winner is
    picked on samples no step before saw; False (the default) is the reference's search.
    refine_paths: the most distinct paths one refinement evaluates, per interior point of the path.
    """
    teacher: str = "ipndm"
    teacher_steps: int = 60
    grid: str = "polynomial"
    metric: str = "dev"
    gamma: float | tuple[float, ...] = 1.15
    num_warmup: int | None = None
    seed: int = 0
    batch_size: int = 64
    afs: bool = False
    solver: str = "ipndm"
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float | None = 7.0
    refine: bool = False
    refine_paths: int = 6

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen)
        put("teacher_steps", _check_int("teacher_steps", self.teacher_steps, 2))
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; valid: {', '.join(METRICS)}")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown grid {self.grid!r}; valid: {', '.join(GRIDS)}")
        put("teacher", get_solver(self.teacher).name)
        put("solver", get_solver(self.solver).name)
        if not get_solver(self.teacher).denoised_at_x:
            raise ValueError(f"teacher {self.teacher!r} records D at its predictor points, not on the trajectory; "
                             "use ipndm, dpmpp, deis, euler, heun, dpm2 or ipndm_v")
        put("gamma", _check_gammas(self.gamma))
        for g in self.gammas:   # the DP's discount gamma^k, k <= teacher_steps, must stay a float64
            if abs(self.teacher_steps * math.log(g)) > MAX_LOG_DISCOUNT:
                raise ValueError(f"gamma={g} makes gamma^k overflow or vanish over {self.teacher_steps} teacher steps; "
                                 "use a gamma near 1 (0.8-1.3 is the useful range)")
        if not isinstance(self.refine, bool):
            raise TypeError(f"refine must be a bool, got {type(self.refine).__name__}")
        if self.num_warmup is None:
            put("num_warmup", NUM_WARMUP_REFINE if self.refine else NUM_WARMUP)
        put("num_warmup", _check_int("num_warmup", self.num_warmup, 2 if self.refine else 1))
        put("refine_paths", _check_int("refine_paths", self.refine_paths, 1))
        put("seed", _check_int("seed", self.seed, 0))
        put("batch_size", _check_int("batch_size", self.batch_size, 1))
        put("afs", bool(self.afs))
        put("sigma_min", float(self.sigma_min))
        put("sigma_max", float(self.sigma_max))
        put("rho", None if self.grid == "logsnr" else float(self.rho))

    @property
    def gammas(self) -> list[float]:
        """The gammas to try: [gamma] for one, else the sequence."""
        return [self.gamma] if isinstance(self.gamma, float) else list(self.gamma)

    def fine_grid(self) -> torch.Tensor:
        """The fine grid's ``teacher_steps + 1`` float64 sigmas."""
        return fine_grid(self.grid, self.teacher_steps, self.sigma_min, self.sigma_max, self.rho)

    def grid_record(self, points=()) -> dict:
        """The fine grid as a schedule records it (``GITSSchedule.grid``): with ``points``, the sigmas
        a refined search added to it (the hand-made schedules' points, under "points")."""
        extra = {"points": [float(p) for p in points]} if len(points) else {}
        return {"family": self.grid, "teacher_steps": self.teacher_steps, "sigma_min": self.sigma_min,
                "sigma_max": self.sigma_max, "rho": self.rho, **extra}

    def teacher_record(self, shape) -> dict:
        """What decides the teacher's cost matrix besides the grid and the denoiser (a cache key part)."""
        return {"teacher": self.teacher, "metric": self.metric, "num_warmup": self.num_warmup, "seed": self.seed,
                "batch_size": self.batch_size, "afs": self.afs, "shape": list(shape)}

    def record(self, shape, steps: int) -> dict:
        """Everything but the grid, as ``GITSSchedule.params`` records it before the search adds its
        results (gamma as a float, or a list for a sweep; ``refine`` with the recommended search's
        settings only when True, so that the reference search keeps the params and cache keys it had
        before the option existed)."""
        gamma = self.gamma if isinstance(self.gamma, float) else list(self.gamma)
        refine = {"refine": True, "refine_paths": self.refine_paths, "check_margin": CHECK_MARGIN} \
            if self.refine else {}
        return {**self.teacher_record(shape), "steps": steps, "gamma": gamma, "solver": self.solver, **refine}

    @classmethod
    def from_record(cls, grid: dict, params: dict) -> "GITSConfig":
        """The configuration behind a schedule's ``grid`` and ``params`` (no "refine": False)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"grid", "teacher_steps", "sigma_min", "sigma_max", "rho",
                                                             "refine", "refine_paths"}
        return cls(grid=grid["family"], teacher_steps=grid["teacher_steps"], sigma_min=grid["sigma_min"],
                   sigma_max=grid["sigma_max"], rho=grid["rho"], refine=params.get("refine", False),
                   refine_paths=params.get("refine_paths", cls.refine_paths), **{k: params[k] for k in names})
