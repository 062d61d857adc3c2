"""One-step solvers in sigma: Euler (= DDIM), Heun (EDM) and DPM-Solver-2, as plans (:mod:`.base`).

All integrate dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma, with h = sigma_next - sigma.
"""
from __future__ import annotations

import math

from .base import X, Y, Op, register


@register("euler")
def euler(sigmas, *, afs=False):
    """x_next = x + h d(x, sigma).  Order 1."""
    return [Op(s, X, X, 1.0, (s_next - s,), sigma=s, afs=afs and i == 0, step=i)
            for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:]))], 1


def two_stage(sigmas, afs, mids, weights):
    """Per interval i: x' = x + (m_i - s) d at s' = mids[i], then x_next = x + h ((1 - w_i) d + w_i d(x', m_i))
    with w_i = weights[i] (Heun, DPM-Solver-2 and AMED's two-stage forms)."""
    ops = []
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        h, mid, w = s_next - s, mids[i], weights[i]
        ops += [Op(s, X, Y, 1.0, (mid - s,), sigma=s, afs=afs and i == 0, step=i),
                Op(mid, Y, X, 1.0, (h * w, h * (1 - w)), sigma=mid)]
    return ops, 2  # d(x, sigma), then d(x', s')


@register("heun", evals_per_step=2)
def heun(sigmas, *, afs=False):
    """Trapezoidal predictor-corrector: x' = x + h d, x_next = x + h (d + d(x', sigma_next)) / 2.  Order 2."""
    return two_stage(sigmas, afs, sigmas[1:], [0.5] * (len(sigmas) - 1))


@register("dpm2", evals_per_step=2, r=0.5)
def dpm2(sigmas, *, afs=False, r=0.5):
    """DPM-Solver-2 in sigma: midpoint s_mid = s_next^r s^(1-r) (geometric for r=1/2), then
    x_next = x + h ((1 - 1/2r) d + (1/2r) d(x_mid, s_mid)).  Order 2."""
    if not 0 < r <= 1:
        raise ValueError(f"dpm2 needs 0 < r <= 1, got r={r}")
    mids = [math.exp(r * math.log(s_next) + (1 - r) * math.log(s)) for s, s_next in zip(sigmas, sigmas[1:])]
    return two_stage(sigmas, afs, mids, [0.5 / r] * len(mids))
