"""Refine a GITS path on the fine grid by the student solver's own error (coordinate descent).

The DP minimises a proxy, ``sum_k gamma^k C[i_k, i_{k+1}]`` with ``C`` the cost of an *Euler*
jump.  A multistep solver such as iPNDM does not make Euler's errors (its steps after the
first are of higher order and reuse earlier denoiser outputs), so the proxy's optimum can lose
to a hand-made schedule.  Refinement minimises the real objective instead, the mean L2 distance

    E(i) = mean_b |x_solver(noise_b; G[i]) - x_teacher(noise_b)|_2

over integer paths ``0 = i_0 < i_1 < ... < i_K = n - 1`` (the end points stay), starting from
the DP's path, by coordinate descent: for k = 1..K-1, move ``i_k`` by -1 while E falls, then by
+1 while E falls; repeat sweeps until a whole sweep moves nothing.  Every accepted move lowers E
strictly, so the descent stops, at a path no single +-1 move improves (a local minimum; never
worse than the start).  Each distinct path is evaluated once; a NaN error counts as +inf (never
an improvement).  With a ``budget`` the descent also stops once that many distinct paths have been
evaluated (the best path so far is returned).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

__all__ = ["coordinate_descent"]


def _check_path(indices) -> list[int]:
    try:
        path = [int(i) for i in indices]
    except (TypeError, ValueError):
        raise TypeError(f"indices must be a sequence of ints, got {indices!r}") from None
    if len(path) < 2 or any(a >= b for a, b in zip(path[:-1], path[1:])) or path[0] < 0:
        raise ValueError(f"indices must be at least 2 strictly increasing grid positions >= 0, got {path}")
    return path


def coordinate_descent(error: Callable[[list[int]], float], indices: Sequence[int],
                       budget: int | None = None) -> tuple[list[int], dict[tuple[int, ...], float]]:
    """(path, {every path evaluated, as a tuple: its E}) of the descent above from ``indices``.

    error: E, a path (list of grid positions) -> float; indices: the start path (strictly
    increasing ints; the first and last stay fixed); budget: at most this many distinct paths
    (None: no limit).
    """
    if not callable(error):
        raise TypeError(f"error must be callable path -> float, got {type(error).__name__}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget must be a positive int or None, got {budget!r}")
    seen: dict[tuple[int, ...], float] = {}

    def e(path: list[int]) -> float:
        if tuple(path) not in seen:
            v = float(error(path))
            seen[tuple(path)] = math.inf if math.isnan(v) else v
        return seen[tuple(path)]

    path = _check_path(indices)
    best, moved = e(path), True
    while moved:
        moved = False
        for k in range(1, len(path) - 1):
            for step in (-1, 1):
                while path[k - 1] < path[k] + step < path[k + 1]:
                    cand = path[:k] + [path[k] + step] + path[k + 1:]
                    if budget is not None and tuple(cand) not in seen and len(seen) >= budget:
                        return path, seen
                    if e(cand) >= best:
                        break
                    path, best, moved = cand, e(cand), True
    return path, seen
