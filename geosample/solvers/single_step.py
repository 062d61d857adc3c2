"""One-step solvers in sigma: Euler (= DDIM), Heun (EDM) and DPM-Solver-2.

All integrate dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma, with h = sigma_next - sigma;
every stage is one fused update (:mod:`.fused`) on a ring buffer of directions.
"""
from __future__ import annotations

import math

from .base import afs_denoised, register
from .fused import History


def first_denoised(x, sigma: float, use_afs: bool):
    """Request D(x, sigma), or return its analytic AFS stand-in (no denoiser call) when ``use_afs``."""
    if use_afs:
        return afs_denoised(x, sigma)
    return (yield x, sigma)


@register("euler")
def euler(x, sigmas, *, afs=False, on_step):
    """x_next = x + h d(x, sigma).  Order 1."""
    hist = History(x, 1)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = yield from first_denoised(x, s, afs and i == 0)
        on_step(i, x, denoised)
        x = hist.update(x, (s_next - s,), denoised=denoised, sigma=s)
    return x


@register("heun", evals_per_step=2)
def heun(x, sigmas, *, afs=False, on_step):
    """Trapezoidal predictor-corrector: x' = x + h d, x_next = x + h (d + d(x', sigma_next)) / 2.  Order 2."""
    hist = History(x, 2)  # d(x, sigma), then d(x', sigma_next)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = yield from first_denoised(x, s, afs and i == 0)
        on_step(i, x, denoised)
        h = s_next - s
        x_pred = hist.update(x, (h,), denoised=denoised, sigma=s)
        x = hist.update(x, (0.5 * h, 0.5 * h), denoised=(yield x_pred, s_next), sigma=s_next, at=x_pred)
    return x


@register("dpm2", evals_per_step=2, r=0.5)
def dpm2(x, sigmas, *, afs=False, on_step, r=0.5):
    """DPM-Solver-2 in sigma: midpoint s_mid = s_next^r s^(1-r) (geometric for r=1/2), then
    x_next = x + h ((1 - 1/2r) d + (1/2r) d(x_mid, s_mid)).  Order 2."""
    if not 0 < r <= 1:
        raise ValueError(f"dpm2 needs 0 < r <= 1, got r={r}")
    hist = History(x, 2)  # d(x, sigma), then d(x_mid, s_mid)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = yield from first_denoised(x, s, afs and i == 0)
        on_step(i, x, denoised)
        h = s_next - s
        s_mid = math.exp(r * math.log(s_next) + (1 - r) * math.log(s))
        x_mid = hist.update(x, (s_mid - s,), denoised=denoised, sigma=s)
        x = hist.update(x, ((0.5 / r) * h, (1 - 0.5 / r) * h), denoised=(yield x_mid, s_mid), sigma=s_mid,
                        at=x_mid)
    return x
