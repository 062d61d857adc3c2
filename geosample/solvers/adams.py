"""Linear multistep solvers on the ODE direction d = (x - D) / sigma: iPNDM, iPNDM_v and DEIS-tAB.

Each step is x_next = x + sum_k c_k d_{i-k} over the newest directions (k = 0 is the current
one), one op of the solver's plan (:mod:`.base`); only the coefficients differ.  All coefficients
are float64 functions of the grid, so the C++ core and the GPU kernels can reproduce them exactly.
"""
from __future__ import annotations

import functools

import numpy as np

from ..schedules import vp_params, vp_sigma_inv
from .base import X, Op, check_order, register

# Adams-Bashforth coefficients for a uniform step, newest direction first.
AB_COEFFS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def ipndm_coefficients(sigmas, i: int, order: int) -> tuple[float, ...]:
    """iPNDM: fixed Adams-Bashforth weights times the step h = sigma_{i+1} - sigma_i, on any grid."""
    h = sigmas[i + 1] - sigmas[i]
    return tuple(h * c for c in AB_COEFFS[order])


def ipndm_v_coefficients(sigmas, i: int, order: int) -> tuple[float, ...]:
    """iPNDM_v: the reference implementation's variable-step Adams-Bashforth weights times h.

    With h = sigma_{i+1} - sigma_i and past steps g_k = sigma_{i-k+1} - sigma_{i-k}.  Orders 2 and
    3 reduce to :data:`AB_COEFFS` on a uniform grid and are exact for linear d(sigma) on any grid.
    The order-4 weights are the reference's as published: they are not AB4 on a uniform grid and
    do not sum to h on a non-uniform one (kept so that published numbers stay comparable).
    """
    h = sigmas[i + 1] - sigmas[i]
    if order == 1:
        return (h,)
    g1 = sigmas[i] - sigmas[i - 1]
    q1 = h / g1
    c = [1 + q1 / 2, -q1 / 2]
    if order >= 3:
        g2 = sigmas[i - 1] - sigmas[i - 2]
        r2 = g1 / g2
        a = (1 - h / (3 * (h + g1)) * (h * (h + g1)) / (g1 * (g1 + g2))) / 2
        c = [c[0] + a, c[1] - (1 + r2) * a, a * r2]
        if order == 4:
            g3 = sigmas[i - 2] - sigmas[i - 3]
            w = g1 * (g1 + g2) / (g2 * (g2 + g3))
            b = ((1 - h / (3 * (h + g1))) / 2 + (1 - h / (2 * (h + g1))) * h / (6 * (h + g1 + g2))) \
                * (h * (h + g1) * (h + g1 + g2)) / (g1 * (g1 + g2) * (g1 + g2 + g3))
            c = [c[0] + b, c[1] - (1 + r2 + w) * b, c[2] + (r2 + w * (1 + g2 / g3)) * b, -b * w * r2]
    return tuple(h * v for v in c)


GAUSS_NODES = 64  # Gauss-Legendre nodes per step for the DEIS integrals (exact to float64 here)


@functools.lru_cache(maxsize=1)
def _gauss_legendre() -> tuple[np.ndarray, np.ndarray]:
    return np.polynomial.legendre.leggauss(GAUSS_NODES)


def deis_tab_coefficients(sigmas, max_order: int = 4) -> list[tuple[float, ...]]:
    """DEIS-tAB weights: c_ij = int_{t_i}^{t_i+1} sigma'(tau) L_j(tau) dtau for every step i.

    t is the VP time of the standard VP-SDE fitted to sigma in [0.002, 80] (as in the reference);
    L_j are the Lagrange bases on the last min(i+1, max_order) times t_i, t_{i-1}, ...; the
    integrals use Gauss-Legendre quadrature with :data:`GAUSS_NODES` nodes.  Cached per grid.
    """
    return list(_deis_tab(tuple(float(s) for s in sigmas), max_order))


@functools.lru_cache(maxsize=64)
def _deis_tab(sigmas: tuple, max_order: int) -> tuple[tuple[float, ...], ...]:
    beta_d, beta_min = vp_params()
    t = vp_sigma_inv(np.asarray(sigmas, dtype=np.float64), beta_d, beta_min).numpy()
    u, w = _gauss_legendre()
    out = []
    for i in range(len(t) - 1):
        order = min(i + 1, max_order)
        a, b = t[i], t[i + 1]
        tau = 0.5 * (b - a) * u + 0.5 * (a + b)
        g = 0.5 * beta_d * tau ** 2 + beta_min * tau
        dsigma = (beta_d * tau + beta_min) * np.exp(g) / (2 * np.sqrt(np.expm1(g)))
        weights = 0.5 * (b - a) * w * dsigma
        nodes = t[i - np.arange(order)]
        coeffs = []
        for j in range(order):
            others = np.delete(nodes, j)
            basis = np.prod((tau[:, None] - others) / (nodes[j] - others), axis=1)
            coeffs.append(float(weights @ basis))
        out.append(tuple(coeffs))
    return tuple(out)


def _adams(sigmas, coefficients, max_order, afs):
    """One op per step on the directions d = (x - D) / sigma, newest first."""
    return [Op(s, X, X, 1.0, tuple(coefficients(i, min(i + 1, max_order))), sigma=s, afs=afs and i == 0, step=i)
            for i, s in enumerate(sigmas[:-1])], max_order


@register("ipndm", max_order=4)
def ipndm(sigmas, *, afs=False, max_order=4):
    """Improved PNDM: Adams-Bashforth of order min(i+1, max_order) with fixed uniform-step weights."""
    max_order = check_order(max_order, 4)
    return _adams(sigmas, lambda i, k: ipndm_coefficients(sigmas, i, k), max_order, afs)


@register("ipndm_v", max_order=4)
def ipndm_v(sigmas, *, afs=False, max_order=4):
    """iPNDM with the reference's variable-step weights (:func:`ipndm_v_coefficients`)."""
    max_order = check_order(max_order, 4)
    return _adams(sigmas, lambda i, k: ipndm_v_coefficients(sigmas, i, k), max_order, afs)


@register("deis", max_order=4, mode="tab")
def deis(sigmas, *, afs=False, max_order=4, mode="tab"):
    """DEIS-tAB: exponential-integrator multistep with Lagrange extrapolation of d in VP time.

    max_order=4 uses the current and 3 past directions (DEIS-tAB3).
    """
    max_order = check_order(max_order, 4)
    if mode != "tab":
        raise ValueError(f"deis mode must be 'tab', got {mode!r}")
    table = deis_tab_coefficients(sigmas, max_order)
    return _adams(sigmas, lambda i, k: table[i], max_order, afs)
