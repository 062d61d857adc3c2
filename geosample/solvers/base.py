"""What every solver shares: the solver record, the counted denoiser, the driver, AFS.

A solver is a generator function ``fn(x, sigmas, *, afs, on_step, **options)`` that integrates
dx/dsigma = (x - D(x, sigma)) / sigma over the positive, strictly decreasing float64 grid
``sigmas`` (a Python list).  It asks for every denoiser value with ``denoised = yield x, sigma``
and returns the final x.  So the same solver runs in one call (:func:`drive` answers each request
with the denoiser) or one model call at a time (a diffusers scheduler sends the outputs itself).
``on_step(i, x, denoised)`` is called exactly once per step with the state at the step's start and
the denoiser value used there.  Solvers never modify tensors in place, so recorded states stay valid.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["Solver", "Trajectory", "CountedDenoiser", "checked_output", "drive", "afs_denoised", "SOLVERS", "register",
           "check_denoised_at_x"]


@dataclass(frozen=True)
class Solver:
    """A registered solver: its step function, denoiser calls per step, and default options."""
    name: str
    fn: Callable
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
    """Decorator adding a solver (a generator function, see the module docstring) to :data:`SOLVERS`.

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
    """Wraps D(x, sigma) with a float sigma: passes sigma as a [B] tensor, checks the output, counts calls."""

    def __init__(self, denoiser: Callable):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
        self.denoiser = denoiser
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls += 1
        return checked_output(self.denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype, device=x.device)), x)


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


def drive(solver, model: Callable):
    """Run a started solver generator to the end, answering each ``(x, sigma)`` with ``model(x, sigma)``."""
    try:
        request = next(solver)
        while True:
            request = solver.send(model(*request))
    except StopIteration as done:
        return done.value


def afs_denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Analytical first step: d = x / sqrt(1 + sigma^2), so D = x - sigma d (data ~ unit variance)."""
    return x * (1.0 - sigma / math.sqrt(1.0 + sigma * sigma))
