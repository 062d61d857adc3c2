"""A solve with a learned AMED predictor: the predictions are made per sample, interval by interval.

:class:`PredictedRun` answers ``request()`` / ``send(D)`` like :class:`geosample.solvers.plan.Run`
(what ``gs.sample`` drives).  At the start of interval i it requests D(x_i, t_i); on ``send`` it asks
the predictor for every sample's (r, c, a) from the features of that call, takes interval i's two
ops from each sample's own AMED plan (:func:`geosample.solvers.amed.amed_plan`, the description
fixed predictions run too, so the maths is written once), and applies them with per-sample [B]
coefficients; the extra call is D(x_m, a t_m) with a [B] sigma.

The same run trains the predictor (:mod:`.train`): when the predictions carry gradients, every
coefficient is ``value + (r - r.detach()) dvalue/dr`` with the derivative taken by central
differences of the float64 plan, and t_m, a t_m and c enter as tensors, so the loss at x_{i+1}
differentiates through the plan's own coefficients and the denoiser's extra call.  For a denoiser
autograd cannot go through, :meth:`PredictedRun.tangents` gives the extra call's input derivatives
in r and a, for a forward-difference stand-in.
"""
from __future__ import annotations

import torch

from ..solvers.amed import amed_plan, t_mid
from ..solvers.base import X, afs_denoised, dynamic_threshold

__all__ = ["PredictedRun"]

FD_STEP = 1e-6  # central-difference step in r for the coefficients' derivatives (float64 plans)


class _Batched:
    """One op with per-sample fields: a, coeffs as [B] tensors (float64), eval_sigma and sigma as
    floats or [B] tensors; src, dst, threshold, step as in :class:`geosample.solvers.base.Op`;
    slopes: (da/dr, [dc_k/dr]) when differentiating, else None."""

    def __init__(self, op, a, coeffs, eval_sigma, sigma, slopes=None):
        self.src, self.dst, self.threshold, self.step = op.src, op.dst, op.threshold, op.step
        self.a, self.coeffs, self.eval_sigma, self.sigma, self.slopes = a, coeffs, eval_sigma, sigma, slopes


class PredictedRun:
    """A solve of ``variant`` over ``sigmas`` (a checked list; a trailing 0 adds the final denoise)
    from the state ``x`` with predictions ``predictor(features, i) -> (r, c, a)`` ([B] each).

    features: ``features(D) -> [B, F] | None`` of interval i's first evaluation; start: the first
    interval (a run from the teacher's x_i when training a one-step variant); on_step(i, x, D) as
    for :class:`~geosample.solvers.plan.Run`.  ``done_intervals`` counts completed intervals;
    :meth:`detach` cuts the autograd history between intervals (training).
    """

    def __init__(self, variant: str, sigmas: list, afs: bool, options: dict, x: torch.Tensor, predictor, features,
                 on_step=None, start: int = 0):
        self.variant, self.afs, self.options = variant, bool(afs), options
        self.final = sigmas[-1] == 0.0
        self.grid = list(sigmas[:-1] if self.final else sigmas)
        self.K = len(self.grid) - 1
        self.predictor, self.features, self.on_step = predictor, features, on_step
        _, self.size = amed_plan(variant, self.grid, afs, options, [0.5] * self.K, [1.0] * self.K, [1.0] * self.K)
        self.r_past = torch.full((x.shape[0], self.K), 0.5, dtype=torch.float64)
        self.state = [x, x]
        self.hist: list[torch.Tensor] = []
        self.i, self.second, self.finished = start, None, False
        self.done_intervals = 0
        self.r = self.a = self.tm = self.x_dot = None  # the current interval's predictions, t_m, dx_m/dr
        if self.afs and start == 0:
            self._first(afs_denoised(x, self.grid[0]), None, analytic=True)

    @property
    def x(self) -> torch.Tensor:
        return self.state[X]

    @property
    def in_interval(self) -> bool:
        """True while the pending request is the extra call (it depends on this interval's predictions)."""
        return self.second is not None

    def request(self):
        if self.second is not None:
            return self.state[self.second.src], self.second.eval_sigma
        if self.i < self.K:
            return self.state[X], self.grid[self.i]
        if self.final and not self.finished:
            return self.state[X], self.grid[-1]
        return None

    def send(self, denoised: torch.Tensor, at: torch.Tensor | None = None, features: torch.Tensor | None = None):
        """Apply the requested evaluation; ``features`` replaces the features of an interval's first
        evaluation (training passes them precomputed with D)."""
        if self.second is not None:
            if at is not None:
                self.state[self.second.src] = at
            self._apply(self.second, denoised)
            self.second = None
            self.i += 1
            self.done_intervals += 1
            return
        if at is not None:
            self.state[X] = at
        if self.i < self.K:
            self._first(denoised, features)
            return
        if self.on_step is not None:  # the final denoise to 0
            self.on_step(self.K, self.state[X], denoised)
        self.state[X] = denoised
        self.finished = True

    def tangents(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dx/dr [B, ...], dsigma/dr [B], dsigma/da [B]) of the pending extra call D(x, sigma =
        a t_m), from the plan's coefficient slopes (needs predictions with gradients)."""
        if self.second is None or self.x_dot is None:
            raise RuntimeError("tangents exist while an extra call is pending, with predictions that carry gradients")
        log_ratio = torch.log(torch.as_tensor(self.grid[self.i + 1] / self.grid[self.i], dtype=torch.float64))
        tm = self.tm.detach()
        return self.x_dot, (self.a.detach() * tm * log_ratio), tm

    def detach(self) -> None:
        """Drop the autograd history of the state and the solver history (between training intervals)."""
        self.state = [s.detach() for s in self.state]
        self.hist = [h.detach() for h in self.hist]

    def close(self) -> None:
        close = getattr(self.features, "close", None)
        if close is not None:
            close()

    # ---- one interval -----------------------------------------------------------------------
    def _first(self, denoised, features, analytic: bool = False) -> None:
        x, i = self.state[X], self.i
        if features is None and not analytic:  # AFS: no evaluation, the predictor sees zeros
            features = self.features(denoised)
        r, c, a = (v.to(torch.float64) for v in self.predictor(features, i, x.shape[0]))
        if not bool(torch.isfinite(torch.cat([r, c, a])).all()):
            raise FloatingPointError(f"AMED predictions for interval {i} (sigma {self.grid[i]:.4g} -> "
                                     f"{self.grid[i + 1]:.4g}) are not finite: the denoiser's output there has NaN or inf")
        first, second = self._ops(i, r, c, a)
        if self.on_step is not None:
            self.on_step(i, x, denoised)
        self._apply(first, denoised)
        self.second, self.r, self.a, self.x_dot = second, r, a, None
        if first.slopes is not None:   # dx_m/dr = da/dr x + sum_k dc_k/dr H_k
            a_dot, c_dot = first.slopes
            self.x_dot = (_per_sample(a_dot, x) * x + sum(_per_sample(v, x) * h for v, h in zip(c_dot, self.hist)))
            self.x_dot = self.x_dot.detach()

    def _ops(self, i: int, r: torch.Tensor, c: torch.Tensor, a: torch.Tensor) -> tuple[_Batched, _Batched]:
        """Interval i's two ops with [B] fields, from every sample's own plan."""
        grad = r.requires_grad
        rows = []   # per sample: (first, second) ops at r, and at r +- FD_STEP when differentiating
        for b, rb in enumerate(r.detach().tolist()):
            past = self.r_past[b].tolist()
            trials = (rb, rb + FD_STEP, rb - FD_STEP) if grad else (rb,)
            rows.append([self._plan(past, i, v) for v in trials])
        self.r_past[:, i] = r.detach().cpu()

        def field(get):
            """(value, slope): [B] float64 tensors of ``get(op)`` over the samples and of its d/dr
            (None without gradients); the value is ``value + (r - r.detach()) slope`` then."""
            value = torch.tensor([get(row[0]) for row in rows], dtype=torch.float64, device=r.device)
            if not grad:
                return value, None
            slope = torch.tensor([(get(row[1]) - get(row[2])) / (2 * FD_STEP) for row in rows], dtype=torch.float64,
                                 device=r.device)
            return value + (r - r.detach()) * slope, slope

        t, t_next = self.grid[i], self.grid[i + 1]
        self.tm = tm = t_mid(t, t_next, r)
        op1, op2 = rows[0][0]
        a1 = field(lambda o: o[0].a)
        c1 = [field(lambda o, k=k: o[0].coeffs[k]) for k in range(len(op1.coeffs))]
        first = _Batched(op1, a1[0], [v for v, _ in c1], op1.eval_sigma, op1.sigma,
                         (a1[1], [d for _, d in c1]) if grad else None)
        second = _Batched(op2, field(lambda o: o[1].a)[0],
                          [c * field(lambda o, k=k: o[1].coeffs[k])[0] for k in range(len(op2.coeffs))],
                          a * tm, None if op2.sigma is None else tm)
        return first, second

    def _plan(self, past: list, i: int, r_i: float):
        r = past[:i] + [r_i] + past[i + 1:]
        ops, _ = amed_plan(self.variant, self.grid, self.afs, self.options, r, [1.0] * self.K, [1.0] * self.K,
                           cached=False)
        return ops[2 * i], ops[2 * i + 1]

    def _apply(self, op: _Batched, denoised: torch.Tensor) -> None:
        """state[dst] = a x + sum_k c_k H_k with the new entry H_0 = (state[src] - D) / sigma or D."""
        at, x = self.state[op.src], self.state[X]
        entry = dynamic_threshold(denoised) if op.threshold else denoised
        if op.sigma is not None:
            entry = (at - entry) / _per_sample(op.sigma, at)
        self.hist = [entry] + self.hist[:self.size - 1]
        out = _per_sample(op.a, x) * x
        for coeff, h in zip(op.coeffs, self.hist):
            out = out + _per_sample(coeff, x) * h
        self.state[op.dst] = out


def _per_sample(v, like: torch.Tensor):
    """A float as is; a [B] tensor as [B, 1, ...] in ``like``'s dtype."""
    if not isinstance(v, torch.Tensor):
        return v
    return v.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))
