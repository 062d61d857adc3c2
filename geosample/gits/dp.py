"""The GITS dynamic programme: the cheapest path of ``steps`` jumps through a fine grid.

Given a cost ``C[j, m]`` (j < m) of one solver step from grid point j to m, and ``end = n - 1``,

    V[j][1] = C[j, end]
    V[j][k] = min_{j < m, m + k - 1 <= end} C[j, m] + gamma * V[m][k - 1]

and the path follows the argmin back-pointers ``P[j][k]`` from ``j = 0`` (never a float-equality
search).  The objective of a path 0 = i_0 < i_1 < ... < i_K = end is therefore
``sum_k gamma^k C[i_k, i_{k+1}]``: gamma > 1 makes late (low-noise) steps dearer.  Ties go to the
smallest m (strict ``<`` while m ascends), identically in every backend.  Only the strict upper
triangle of C is read; the diagonal and lower triangle are ignored.  Costs with |C| >= 2^512 are
first divided by a power of two (exact; the argmin is scale-invariant) so that sums cannot overflow.

Backends: ``"cpp"`` (``geosample._C``), ``"numba"`` (njit), ``"python"`` (numpy over m);
``"auto"`` takes the first one available in that order.
"""
from __future__ import annotations

import math
import numbers
from typing import Iterable

import numpy as np

from .._cpp import _C, has_cpp

__all__ = ["solve_dp", "solve_dp_sweep", "path_cost", "BACKENDS", "available_backends"]

BACKENDS = ("cpp", "numba", "python")

try:
    import numba
except ImportError:  # pragma: no cover - numba is optional
    numba = None


def _check_cost(cost) -> np.ndarray:
    try:
        c = np.ascontiguousarray(np.asarray(cost, dtype=np.float64))
    except (TypeError, ValueError) as e:
        raise TypeError(f"cost must be a square matrix of floats: {e}") from None
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cost must be a square [n, n] matrix, got shape {c.shape}")
    if c.shape[0] < 2:
        raise ValueError(f"cost must be at least 2 x 2, got {c.shape}")
    upper = c[np.triu_indices(c.shape[0], 1)]
    if not np.isfinite(upper).all():
        i, j = (int(v[0]) for v in np.nonzero(np.triu(~np.isfinite(c), 1)))
        raise ValueError(f"cost must be finite above the diagonal (no NaN or inf), got {c[i, j]} at ({i}, {j})")
    return _rescaled(c, np.abs(upper).max(initial=0.0))


def _rescaled(c: np.ndarray, peak: float) -> np.ndarray:
    """c / 2^e bringing the largest |C| into [0.5, 1) when it is >= 2^512 (sums of such costs would
    overflow to inf and hide the argmin); the objective is scale-invariant and the division exact.
    Smaller costs are returned as given (as the C++ core does)."""
    if peak < 2.0 ** 512:
        return c
    return np.ldexp(c, -np.frexp(peak)[1])


def _check_steps(steps, n: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if not 1 <= steps <= n - 1:
        raise ValueError(f"steps must be in [1, {n - 1}] for a grid of {n} points "
                         f"(steps >= grid size is impossible), got {steps}")
    return int(steps)


def _check_gamma(gamma) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"gamma must be a float, got {type(gamma).__name__}")
    if not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma}")
    return float(gamma)


def available_backends() -> list[str]:
    """The DP backends usable in this install, fastest first."""
    return [b for b in BACKENDS if (b != "cpp" or has_cpp()) and (b != "numba" or numba is not None)]


def _pick(backend: str) -> str:
    if backend == "auto":
        return available_backends()[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    if backend not in available_backends():
        raise ValueError(f"backend {backend!r} is not available here; available: {', '.join(available_backends())}")
    return backend


def _table_python(c: np.ndarray, max_steps: int, gamma: float) -> np.ndarray:
    """Back-pointers P[k, j] (k = 1..max_steps), numpy over m."""
    n = c.shape[0]
    end = n - 1
    ptr = np.full((max_steps + 1, n), -1, dtype=np.int64)
    prev = np.full(n, np.inf)
    prev[:end] = c[:end, end]
    ptr[1, :end] = end
    for k in range(2, max_steps + 1):
        cur = np.full(n, np.inf)
        for j in range(end - k + 1):
            ms = slice(j + 1, end - k + 2)
            with np.errstate(over="ignore"):     # gamma^k C may overflow to inf; argmin takes the first
                v = c[j, ms] + gamma * prev[ms]
            a = int(np.argmin(v))            # first minimum = smallest m, like strict '<'
            cur[j], ptr[k, j] = v[a], j + 1 + a
        prev = cur
    return ptr


def _table_loops(c, max_steps, gamma):
    n = c.shape[0]
    end = n - 1
    ptr = np.full((max_steps + 1, n), -1, dtype=np.int64)
    prev = np.full(n, np.inf)
    for j in range(end):
        prev[j] = c[j, end]
        ptr[1, j] = end
    for k in range(2, max_steps + 1):
        cur = np.full(n, np.inf)
        for j in range(end - k + 1):
            best, arg = np.inf, -1
            for m in range(j + 1, end - k + 2):
                v = c[j, m] + gamma * prev[m]
                if arg < 0 or v < best:      # the first m even when every sum is +inf (huge gamma^k)
                    best, arg = v, m
            cur[j], ptr[k, j] = best, arg
        prev = cur
    return ptr


_table_numba = numba.njit(cache=True)(_table_loops) if numba is not None else None


def _backtrack(ptr: np.ndarray, steps: int) -> list[int]:
    path = [0]
    for k in range(steps, 0, -1):
        path.append(int(ptr[k, path[-1]]))
    return path


def _paths(c: np.ndarray, max_steps: int, gamma: float, backend: str) -> list[list[int]]:
    """Optimal paths for steps = 1..max_steps from one DP table."""
    if backend == "cpp":
        return [list(p) for p in _C.solve_dp_all(c, max_steps, gamma)]
    table = _table_numba if backend == "numba" else _table_python
    ptr = table(c, max_steps, gamma)
    return [_backtrack(ptr, k) for k in range(1, max_steps + 1)]


def solve_dp(cost, steps: int, gamma: float = 1.15, backend: str = "auto") -> list[int]:
    """Grid indices ``[0, i_1, ..., n - 1]`` (``steps + 1`` of them) of the cheapest path.

    cost: [n, n] float matrix (numpy, torch or nested lists), finite above the diagonal.
    steps: 1 <= steps <= n - 1.  gamma > 0.  backend: "auto" | "cpp" | "numba" | "python".
    """
    c = _check_cost(cost)
    steps = _check_steps(steps, c.shape[0])
    gamma = _check_gamma(gamma)
    backend = _pick(backend)
    if backend == "cpp":
        return list(_C.solve_dp(c, steps, gamma))
    return _paths(c, steps, gamma, backend)[-1]


def solve_dp_sweep(cost, steps: int | Iterable[int], gamma: float | Iterable[float] = 1.15,
                   backend: str = "auto") -> dict[tuple[int, float], list[int]]:
    """Every ``(steps, gamma)`` combination at once: ``{(steps, gamma): indices}``.

    ``steps`` is an int K (meaning 1..K) or an iterable of step counts; ``gamma`` one value or an
    iterable (e.g. the authors' Stable Diffusion sweep 0.8, 0.85, ..., 1.2).  One DP table per
    gamma serves all step counts.
    """
    c = _check_cost(cost)
    n = c.shape[0]
    if isinstance(steps, numbers.Integral) and not isinstance(steps, bool):
        step_list = list(range(1, _check_steps(steps, n) + 1))
    else:
        step_list = sorted({_check_steps(s, n) for s in steps})
    gammas = [gamma] if isinstance(gamma, numbers.Real) else list(gamma)
    if not step_list or not gammas:
        raise ValueError("solve_dp_sweep needs at least one step count and one gamma")
    backend = _pick(backend)
    out = {}
    for g in map(_check_gamma, gammas):
        paths = _paths(c, step_list[-1], g, backend)
        out.update({(s, g): paths[s - 1] for s in step_list})
    return out


def path_cost(cost, indices, gamma: float = 1.15) -> tuple[float, list[float]]:
    """(objective sum_k gamma^k C[i_k, i_{k+1}], per-step costs C[i_k, i_{k+1}]) of a path."""
    c = np.asarray(cost, dtype=np.float64)
    steps = [float(c[a, b]) for a, b in zip(indices[:-1], indices[1:])]
    with np.errstate(over="ignore"):   # a huge gamma^k overflows to inf (the objective is then inf)
        weights = np.float64(gamma) ** np.arange(len(steps))
    return float(np.dot(weights, steps)), steps
