"""What every solver shares: the solver record and registry, the step description, AFS.

A solver is described once, as a *plan*: a function ``plan(sigmas, *, afs, **options)`` that
turns a positive, strictly decreasing float64 grid (a Python list, the ODE part of a schedule)
into ``(ops, history_size)``, a list of :class:`Op`.  Each op is at most one denoiser call and
one update of the shared form

    D      = D(state[src], eval_sigma)                      (no call when eval_sigma is None)
    H_new  = (state[src] - D) / sigma   or   D  (sigma None)   pushed to a ring buffer
    state[dst] = a state[X] + sum_k c_k H_k                 (k = 0 newest)

over two state buffers, X (the solution) and Y (a predictor / midpoint point).  ``gs.sample``
(:mod:`.sampling`), ``GITSScheduler.step`` and the fused sampler (:mod:`geosample.solvers.fused_sampler`) all run
these ops (:mod:`.plan`), so :func:`register` gives a new solver all of them.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Op", "X", "Y", "Solver", "Trajectory", "CountedDenoiser", "checked_output", "afs_denoised", "SOLVERS",
           "register", "check_denoised_at_x", "dynamic_threshold"]

X, Y = 0, 1  # the two state buffers: the solution and an intermediate (predictor / midpoint) point


@dataclass(frozen=True)
class Op:
    """One denoiser call at ``state[src]`` (none when ``eval_sigma`` is None) and one update
    ``state[dst] = a state[X] + sum_k coeffs[k] H_k`` (see the module docstring).

    sigma: the divisor of the new direction (None: the new entry is D itself);
    afs: use the analytic first-step value instead of calling the denoiser;
    threshold: dynamic thresholding of D before it is pushed;
    step: this op's D is the recorded evaluation of interval ``step`` (for trajectories and
    callbacks): of the state before the op when src is X, else (UniPC's corrector) of the state after.
    """
    eval_sigma: float | None
    src: int
    dst: int
    a: float
    coeffs: tuple[float, ...]
    sigma: float | None = None
    afs: bool = False
    threshold: bool = False
    step: int | None = None

    def __post_init__(self):   # Python floats once, so the per-step update converts nothing
        object.__setattr__(self, "a", float(self.a))
        object.__setattr__(self, "coeffs", tuple(float(c) for c in self.coeffs))


@dataclass(frozen=True)
class Solver:
    """A registered solver: its plan function, denoiser calls per step, and default options."""
    name: str
    plan: Callable
    evals_per_step: int = 1
    defaults: dict = field(default_factory=dict)
    denoised_at_x: bool = True  # on_step's denoised is D(x, sigma) at the recorded x itself

    def nfe(self, steps: int, afs: bool = False) -> int:
        """Denoiser calls for ``steps`` ODE steps: evals_per_step * steps, one fewer with AFS."""
        if steps <= 0:
            return 0
        return self.evals_per_step * steps - int(bool(afs))


SOLVERS: dict[str, Solver] = {}


def register(name: str, evals_per_step: int = 1, denoised_at_x: bool = True, **defaults):
    """Decorator adding a solver, given by its plan function (see the module docstring), to :data:`SOLVERS`.

    denoised_at_x=False marks solvers whose recorded denoised values are evaluated elsewhere than
    at the recorded states (UniPC: at its predictor points).
    """
    def wrap(fn):
        SOLVERS[name] = Solver(name, fn, evals_per_step, dict(defaults), denoised_at_x)
        return fn
    return wrap


def check_denoised_at_x(traj: "Trajectory", use: str) -> None:
    """ValueError unless traj.denoised[i] = D(traj.x[i], sigmas[i]), which ``use`` relies on."""
    spec = SOLVERS.get(traj.solver)
    if spec is not None and not spec.denoised_at_x:
        raise ValueError(f"{use} needs a trajectory with denoised[i] = D(x[i], sigma_i); solver {traj.solver!r} "
                         "records D at other points (UniPC: its predictor); use another solver for the trajectory")


@dataclass
class Trajectory:
    """A sampling trajectory on the grid ``sigmas``.

    x: [steps+1, B, ...] states, x[0] = sigmas[0] * noise, x[-1] the sample;
    denoised: [steps, B, ...] the denoiser value at each step's start, D(x[i], sigmas[i]) (the
    analytic value with AFS; UniPC records its evaluation at the predictor point instead);
    sigmas: [steps+1] float64; nfe: denoiser calls per sample.
    """
    x: torch.Tensor
    denoised: torch.Tensor
    sigmas: torch.Tensor
    nfe: int
    solver: str = ""

    @property
    def steps(self) -> int:
        return self.sigmas.numel() - 1


class CountedDenoiser:
    """Wraps D(x, sigma) with a float sigma: passes x in ``dtype`` (the dtype the denoiser expects;
    default x's own) and sigma as a [B] tensor, checks the output, returns it in x's dtype, counts calls."""

    def __init__(self, denoiser: Callable, dtype: torch.dtype | None = None):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
        self.denoiser, self.dtype = denoiser, dtype
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """D(x, sigma) for a float sigma, or per-sample sigmas [B] (AMED with a learned predictor)."""
        self.calls += 1
        x_in = x if self.dtype in (None, x.dtype) else x.to(self.dtype)
        s = sigma.to(x.device, x_in.dtype) if isinstance(sigma, torch.Tensor) else \
            torch.full((x.shape[0],), sigma, dtype=x_in.dtype, device=x.device)
        return checked_output(self.denoiser(x_in, s), x)


def checked_output(out, x: torch.Tensor) -> torch.Tensor:
    """A denoiser's output in x's dtype; ValueError unless it is a tensor of x's shape."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"denoiser returned {got}, expected a tensor of shape {tuple(x.shape)}")
    return out if out.dtype == x.dtype else out.to(x.dtype)


def check_order(max_order, top: int) -> int:
    """max_order as an int in [1, top] (ValueError naming the range otherwise)."""
    if isinstance(max_order, bool) or not isinstance(max_order, numbers.Integral) or not 1 <= max_order <= top:
        raise ValueError(f"max_order must be an int in [1, {top}], got {max_order!r}")
    return int(max_order)


def afs_denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Analytical first step: d = x / sqrt(1 + sigma^2), so D = x - sigma d (data ~ unit variance;
    0 in the limit sigma = inf)."""
    if math.isinf(sigma):
        return torch.zeros_like(x)
    return x * (1.0 - sigma / math.sqrt(1.0 + sigma * sigma))


def dynamic_threshold(x0: torch.Tensor, p: float = 0.995, max_value: float = math.inf) -> torch.Tensor:
    """Imagen dynamic thresholding: s = quantile_p |x0| per sample clamped to [1, max_value],
    x0 -> clamp(x0, -s, s) / s (the quantile in float32 for half-precision x0, as diffusers does)."""
    flat = x0.reshape(x0.shape[0], -1).abs()
    flat = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()
    s = torch.quantile(flat, p, dim=1).clamp(min=1.0, max=max(max_value, 1.0)).to(x0.dtype)
    s = s.reshape(-1, *([1] * (x0.dim() - 1)))
    return torch.maximum(torch.minimum(x0, s), -s) / s
