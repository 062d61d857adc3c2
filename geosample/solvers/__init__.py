"""Deterministic ODE solvers behind one call, :func:`sample`, and a registry, :data:`SOLVERS`."""
from .base import SOLVERS, Op, Solver, Trajectory, register
from . import single_step, adams, exponential  # noqa: F401  (register the built-in solvers)
from .sampling import get_solver, nfe, sample, steps_for_nfe

__all__ = ["SOLVERS", "Op", "Solver", "Trajectory", "register", "get_solver", "nfe", "sample", "steps_for_nfe"]
