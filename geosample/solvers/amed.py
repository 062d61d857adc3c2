"""AMED as plans (:mod:`.base`): one extra denoiser call per interval, at a predicted time.

After Zhou, Chen, Wang, Chen, "Fast ODE-based Sampling for Diffusion Models in Around 5 Steps"
(CVPR 2024).  A trajectory lies close to a 2-D subspace, so by the mean-value theorem one direction,
taken at the right intermediate time, carries a whole interval.  Per interval [t_i, t_{i+1}] of a
base grid, with predictions r (where), c = scale_dir and a = scale_time:

    t_m = t_{i+1}^r t_i^(1-r);   the extra call is D(x_m, a t_m), its direction divided by t_m.

AMED-Solver ("amed"):  x_m = x_i + (t_m - t_i) d_i,  x_{i+1} = x_i + c (t_{i+1} - t_i) d_m.
AMED-Plugin on a base solver:
  "dpm2"   x_{i+1} = x_i + c (t_{i+1} - t_i) [d_m / 2r + (1 - 1/2r) d_i]  (DPM-Solver-2 at t_m);
  "euler", "ipndm", "dpmpp"  the base solver's own plan on the refined grid t_0, t_m0, t_1, t_m1,
           ..., t_K (its orders, history and coefficients counted on that grid), with c scaling
           the second sub-step's update (for DPM-Solver++ its model part; the x part is t_{i+1}/t_m).
Every variant has two ops per interval: ``ops[2i]`` evaluates D(x_i, t_i) (recorded as step i),
``ops[2i + 1]`` is the extra call.  With ``afs`` only the first call of interval 0 is analytic, so a
run of K intervals makes 2K - afs calls (:func:`nfe`).

:class:`Fixed` holds predictions given per interval; learned predictors (:mod:`geosample.amed`)
build the same plans per sample at run time.
"""
from __future__ import annotations

import dataclasses
import math
import numbers

from .base import SOLVERS, Op
from .plan import Run, _build, _cached_plan
from .single_step import two_stage

__all__ = ["VARIANTS", "Fixed", "t_mid", "amed_plan", "check_options", "nfe", "steps_for_nfe", "label"]

#: The solvers AMED runs on: "amed" (AMED-Solver) and the AMED-Plugin's base solvers.
VARIANTS = ("amed", "euler", "dpm2", "ipndm", "dpmpp")


def t_mid(t: float, t_next: float, r: float) -> float:
    """The intermediate time t_next^r t^(1-r) (the reference's expression)."""
    return t_next ** r * t ** (1 - r)


def label(variant: str) -> str:
    """The solver name a trajectory records: "amed" or "<base>+amed"."""
    return "amed" if variant == "amed" else f"{variant}+amed"


def check_variant(solver) -> str:
    if not isinstance(solver, str) or solver not in VARIANTS:
        raise ValueError(f"AMED runs on the solvers {', '.join(VARIANTS)} ('amed' is AMED-Solver, the others the "
                         f"AMED-Plugin), got {solver!r}")
    return solver


def check_options(solver: str, options: dict) -> dict:
    """The base solver's options with its defaults ("amed" has none; dpm2's r is the prediction's)."""
    solver = check_variant(solver)
    defaults = {} if solver == "amed" else {k: v for k, v in SOLVERS[solver].defaults.items() if k != "r"}
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        why = "; dpm2's r is AMED's prediction" if "r" in unknown and solver == "dpm2" else ""
        raise TypeError(f"AMED on {solver!r} got unknown options {unknown}; its options: "
                        f"{', '.join(sorted(defaults)) or 'none'}{why}")
    return {**defaults, **options}


def nfe(intervals: int, afs: bool = False, denoise_to_zero: bool = False) -> int:
    """Denoiser calls of an AMED run over ``intervals`` intervals (a final denoise to 0 among them
    when ``denoise_to_zero``): 2 per ODE interval, one fewer with AFS, one for the final denoise."""
    final = int(bool(denoise_to_zero))
    ode = intervals - final
    return 0 if ode <= 0 else 2 * ode - int(bool(afs)) + final


def steps_for_nfe(nfe_: int, afs: bool = False) -> int:
    """Intervals K with exactly 2K - afs = ``nfe_`` calls (ValueError listing the valid NFEs otherwise)."""
    if isinstance(nfe_, bool) or not isinstance(nfe_, numbers.Integral):
        raise TypeError(f"nfe must be an int, got {type(nfe_).__name__}")
    steps, rest = divmod(int(nfe_) + int(bool(afs)), 2)
    if rest or steps < 1:
        valid = ", ".join(str(2 * k - int(bool(afs))) for k in range(1, 6))
        raise ValueError(f"AMED cannot use exactly {nfe_} denoiser calls (afs={afs}): 2 per interval, one fewer with "
                         f"afs; valid NFEs: {valid}, ...")
    return steps


def _plan_fn(sigmas, *, afs, variant, r, scale_dir, scale_time, **options):
    """The ops of ``variant`` over the positive grid ``sigmas`` with per-interval predictions."""
    K = len(sigmas) - 1
    mids = [t_mid(s, s_next, ri) for s, s_next, ri in zip(sigmas, sigmas[1:], r)]
    if variant in ("amed", "dpm2"):
        weights = [1.0] * K if variant == "amed" else [0.5 / ri for ri in r]
        ops, size = two_stage(sigmas, afs, mids, weights)
    else:
        refined = [v for pair in zip(sigmas, mids) for v in pair] + [sigmas[-1]]
        ops, size = SOLVERS[variant].plan(refined, afs=afs, **options)
        ops = [dataclasses.replace(op, step=j // 2 if j % 2 == 0 else None) for j, op in enumerate(ops)]
    if len(ops) != 2 * K:  # pragma: no cover - every variant makes one op per sub-step
        raise AssertionError(f"AMED on {variant!r} planned {len(ops)} ops for {K} intervals")
    for i in range(K):
        op = ops[2 * i + 1]
        ops[2 * i + 1] = dataclasses.replace(op, eval_sigma=scale_time[i] * op.eval_sigma,
                                             coeffs=tuple(scale_dir[i] * v for v in op.coeffs))
    return ops, size


def _check_grid(sigmas: list) -> int:
    if math.isinf(sigmas[0]):
        raise ValueError("AMED needs a finite sigma_max (the intermediate time t_m = t_next^r t^(1-r)); "
                         "got sigmas[0] = inf")
    intervals = len(sigmas) - 1 - int(sigmas[-1] == 0.0)
    if intervals < 1:
        raise ValueError(f"AMED needs at least one interval of positive sigmas, got {sigmas}")
    return intervals


def amed_plan(variant: str, sigmas: list, afs: bool, options: dict, r, scale_dir, scale_time,
              cached: bool = True) -> tuple[tuple[Op, ...], int]:
    """(ops, history size) of ``variant`` (checked ``options``) over a checked grid ``sigmas`` (a list;
    a trailing 0 adds the final denoise) with per-interval predictions (sequences of floats, one
    per interval of positive sigmas)."""
    K = _check_grid(sigmas)
    preds = {"r": tuple(r), "scale_dir": tuple(scale_dir), "scale_time": tuple(scale_time)}
    for name, v in preds.items():
        if len(v) != K:
            raise ValueError(f"AMED {name} has {len(v)} values for a grid of {K} intervals")
    key = (tuple(sigmas), bool(afs), tuple(sorted({**options, **preds, "variant": variant}.items())))
    return (_cached_plan if cached else _build)(_plan_fn, *key)


def _sequence(name: str, v, low: float, high: float | None, open_low: bool = True) -> tuple[float, ...] | None:
    if v is None:
        return None
    if hasattr(v, "tolist"):
        v = v.tolist()
    try:
        vals = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of numbers (one per interval), got {v!r}") from None
    for x in vals:
        ok = math.isfinite(x) and x > low and (high is None or x < high)
        if not ok:
            bound = f"in ({low:g}, {high:g})" if high is not None else f"finite and > {low:g}"
            raise ValueError(f"every {name} must be {bound}, got {x}")
    return vals


@dataclasses.dataclass(frozen=True)
class Fixed:
    """AMED predictions given per interval of the base grid, the same for every sample.

    r: K positions in (0, 1) (t_m = t_{i+1}^r t_i^(1-r)); scale_dir, scale_time: K positive factors
    (None: all 1).  ``gs.sample(D, noise, sigmas, solver, amed=Fixed(...))`` with K = the number of
    intervals of positive sigmas; it is a plan like any solver's, so GITSScheduler and the fused
    sampler run it too.
    """
    r: tuple
    scale_dir: tuple | None = None
    scale_time: tuple | None = None

    def __post_init__(self):
        r = _sequence("r", self.r, 0.0, 1.0)
        if not r:
            raise ValueError("r must hold one value per interval (at least one)")
        object.__setattr__(self, "r", r)
        for name in ("scale_dir", "scale_time"):
            v = _sequence(name, getattr(self, name), 0.0, None)
            if v is not None and len(v) != len(r):
                raise ValueError(f"{name} has {len(v)} values, r has {len(r)}")
            object.__setattr__(self, name, v)

    @property
    def steps(self) -> int:
        """K, the number of intervals the predictions are for."""
        return len(self.r)

    def predictions(self) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """(r, scale_dir, scale_time), each K floats (ones where not given)."""
        ones = (1.0,) * len(self.r)
        return self.r, self.scale_dir or ones, self.scale_time or ones

    def plan(self, solver: str, sigmas: list, afs: bool, options: dict) -> tuple[tuple[Op, ...], int]:
        """(ops, history size) on a checked grid ``sigmas`` for checked ``options`` (:func:`amed_plan`)."""
        return amed_plan(check_variant(solver), sigmas, afs, options, *self.predictions())

    def start(self, solver: str, sigmas: list, afs: bool, options: dict, x, on_step=None, denoiser=None) -> Run:
        """A :class:`~geosample.solvers.plan.Run` of these predictions from the state ``x`` (what
        ``gs.sample`` runs; ``denoiser`` is not needed)."""
        ops, size = self.plan(solver, sigmas, afs, options)
        return Run(list(ops), size, x, on_step)

    def to_dict(self) -> dict:
        """{"r": [...], "scale_dir": [...] or None, "scale_time": [...] or None} (JSON)."""
        return {"r": list(self.r), "scale_dir": None if self.scale_dir is None else list(self.scale_dir),
                "scale_time": None if self.scale_time is None else list(self.scale_time)}

    @classmethod
    def from_dict(cls, d: dict) -> "Fixed":
        if not isinstance(d, dict) or "r" not in d:
            raise ValueError(f"AMED predictions must be a dict with 'r' (and 'scale_dir', 'scale_time'), got {d!r}")
        unknown = sorted(set(d) - {"r", "scale_dir", "scale_time"})
        if unknown:
            raise ValueError(f"AMED predictions got unknown keys {unknown}")
        return cls(d["r"], d.get("scale_dir"), d.get("scale_time"))
