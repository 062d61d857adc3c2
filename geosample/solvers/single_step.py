"""One-step solvers in sigma: Euler (= DDIM), Heun (EDM) and DPM-Solver-2.

All integrate dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma, with h = sigma_next - sigma.
"""
from __future__ import annotations

import math

from .base import afs_denoised, register


def first_denoised(model, x, sigma: float, use_afs: bool):
    """D(x, sigma), or its analytic AFS stand-in (no denoiser call) when ``use_afs``."""
    return afs_denoised(x, sigma) if use_afs else model(x, sigma)


@register("euler")
def euler(model, x, sigmas, *, afs=False, on_step):
    """x_next = x + h d(x, sigma).  Order 1."""
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = first_denoised(model, x, s, afs and i == 0)
        on_step(i, x, denoised)
        x = x + (s_next - s) * ((x - denoised) / s)
    return x


@register("heun", evals_per_step=2)
def heun(model, x, sigmas, *, afs=False, on_step):
    """Trapezoidal predictor-corrector: x' = x + h d, x_next = x + h (d + d(x', sigma_next)) / 2.  Order 2."""
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = first_denoised(model, x, s, afs and i == 0)
        on_step(i, x, denoised)
        d = (x - denoised) / s
        x_pred = x + (s_next - s) * d
        d_next = (x_pred - model(x_pred, s_next)) / s_next
        x = x + (s_next - s) * (0.5 * d + 0.5 * d_next)
    return x


@register("dpm2", evals_per_step=2, r=0.5)
def dpm2(model, x, sigmas, *, afs=False, on_step, r=0.5):
    """DPM-Solver-2 in sigma: midpoint s_mid = s_next^r s^(1-r) (geometric for r=1/2), then
    x_next = x + h ((1 - 1/2r) d + (1/2r) d(x_mid, s_mid)).  Order 2."""
    if not 0 < r <= 1:
        raise ValueError(f"dpm2 needs 0 < r <= 1, got r={r}")
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = first_denoised(model, x, s, afs and i == 0)
        on_step(i, x, denoised)
        d = (x - denoised) / s
        s_mid = math.exp(r * math.log(s_next) + (1 - r) * math.log(s))
        x_mid = x + (s_mid - s) * d
        d_mid = (x_mid - model(x_mid, s_mid)) / s_mid
        x = x + (s_next - s) * ((1 - 0.5 / r) * d + (0.5 / r) * d_mid)
    return x
