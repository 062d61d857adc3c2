"""A solver's plan for a whole schedule, and :class:`Run`, which executes it one evaluation at a time.

:func:`plan` completes the solver's own plan (:mod:`.base`) for any schedule:

- a trailing 0 adds the final full denoise, x = D(x, sigmas[-2]) (an op with a = 0, c = (1,));
- ``sigmas[0] = inf`` (a zero-SNR start): the state starts as the noise n itself (the limit of
  x / sigma_0, i.e. the VP sample) and the denoiser is evaluated there, D_0 = D(n, inf).  The first
  interval is the exact limit of a first-order step, x_1 = D_0 + sigma_1 n (Euler, DDIM and
  DPM-Solver-1 all tend to it); the solver then runs on ``sigmas[1:]`` from x_1, its history
  starting there (as with img2img).  For Euler and DPM-Solver++(2M) this is exactly their limit
  sigma_0 -> inf (see docs/solvers.md).

``gs.sample`` answers each request of a :class:`Run` with the denoiser; ``GITSScheduler.step``
answers it with the pipeline's model output and may replace the point it was evaluated at (latents
edited between steps); the fused sampler runs the same ops on preallocated buffers.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import torch

from .base import X, Op, Solver, afs_denoised, dynamic_threshold
from .fused import History

__all__ = ["plan", "initial_state", "Run"]


def plan(spec: Solver, sigmas: list, afs: bool, options: dict) -> tuple[tuple[Op, ...], int]:
    """(ops, history size) running ``spec`` with checked ``options`` over a checked schedule ``sigmas``.
    Plans are cached per (solver, schedule, afs, options), so repeated calls only look them up."""
    key = (tuple(sigmas), bool(afs), tuple(sorted(options.items())))
    try:
        return _cached_plan(spec.plan, *key)
    except TypeError:  # an unhashable option value: build it uncached
        return _build(spec.plan, *key)


def _build(plan_fn: Callable, sigmas: tuple, afs: bool, options: tuple) -> tuple[tuple[Op, ...], int]:
    final = sigmas[-1] == 0.0
    ode = list(sigmas[:-1] if final else sigmas)
    ops: list[Op] = []
    start = 0
    if math.isinf(ode[0]) and len(ode) > 1:
        ops.append(Op(ode[0], X, X, ode[1], (1.0,), afs=afs, step=0))
        start = 1
    body, size = plan_fn(ode[start:], afs=afs and start == 0, **dict(options))
    if start:  # the body's steps count from interval 1
        body = [op if op.step is None else dataclasses.replace(op, step=op.step + start) for op in body]
    ops += body
    if final:
        ops.append(Op(ode[-1], X, X, 0.0, (1.0,), step=len(ode) - 1))
    return tuple(ops), max(size, 1)


_cached_plan = functools.lru_cache(maxsize=128)(_build)


def initial_state(noise: torch.Tensor, sigma_max: float) -> torch.Tensor:
    """x_T = sigma_max * noise, or the noise itself for sigma_max = inf (see the module docstring)."""
    return noise if math.isinf(sigma_max) else noise * sigma_max


class Run:
    """One solve of ``ops`` from the state ``x``: ``request()`` names the next evaluation,
    ``send(D)`` applies it.  ``on_step(i, x, D)`` reports each op that carries a ``step``.

    Ops need no call when they have no ``eval_sigma`` or use AFS; those run at once.  Tensors are
    never modified in place, so states handed out (requests, on_step) stay valid.
    """

    def __init__(self, ops: list[Op], size: int, x: torch.Tensor, on_step: Callable | None = None):
        self.ops, self.on_step = ops, on_step
        self.hist = History(x, size)
        self.state = [x, x]
        self.j = 0
        self._skip()

    @property
    def x(self) -> torch.Tensor:
        """The current solution (the result once :meth:`request` returns None)."""
        return self.state[X]

    def request(self) -> tuple[torch.Tensor, float] | None:
        """(point, sigma) the denoiser must evaluate next, or None when the solve is done."""
        if self.j == len(self.ops):
            return None
        op = self.ops[self.j]
        return self.state[op.src], op.eval_sigma

    def send(self, denoised: torch.Tensor, at: torch.Tensor | None = None) -> None:
        """Apply the requested evaluation's op with D = ``denoised``; ``at``, when given, replaces
        the point it was evaluated at (a caller that edited the sample)."""
        op = self.ops[self.j]
        if at is not None:
            self.state[op.src] = at
        self._apply(op, denoised)
        self.j += 1
        self._skip()

    def _skip(self) -> None:
        while self.j < len(self.ops):
            op = self.ops[self.j]
            if op.eval_sigma is not None and not op.afs:
                return
            self._apply(op, afs_denoised(self.state[op.src], op.eval_sigma) if op.afs else None)
            self.j += 1

    def _apply(self, op: Op, denoised: torch.Tensor | None) -> None:
        at, x = self.state[op.src], self.state[X]
        report = denoised is not None and op.step is not None and self.on_step is not None
        if report and op.src == X:
            self.on_step(op.step, x, denoised)
        entry = dynamic_threshold(denoised) if op.threshold and denoised is not None else denoised
        self.state[op.dst] = self.hist.update(x, op.coeffs, a=op.a, denoised=entry, sigma=op.sigma, at=at)
        if report and op.src != X:
            self.on_step(op.step, self.state[X], denoised)
