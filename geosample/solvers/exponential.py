"""Exponential integrators in data prediction: multistep DPM-Solver++ and UniPC.

With lambda = -log sigma and h = lambda_next - lambda_i, the exact solution is
x_next = (sigma_next / sigma_i) x_i + sigma_next int_{lambda_i}^{lambda_next} e^lambda D dlambda;
both methods approximate D by a polynomial in lambda through past denoiser outputs m_k (newest
first).  Every update is x_next = (sigma_next / sigma_i) x + sum_k b_k m_k, one op of the
solver's plan (:mod:`.base`); the b_k are float64 functions of the grid, computed here by
evaluating each method's formula on unit vectors.
"""
from __future__ import annotations

import math

import numpy as np

from .base import X, Y, Op, check_order, register


def _lams(sigmas, i: int, count: int) -> list[float]:
    """lambda = -log sigma at steps i, i-1, ..., i-count+1 (newest first)."""
    return [-math.log(sigmas[i - k]) for k in range(count)]


def dpmpp_coefficients(sigmas, i: int, order: int) -> np.ndarray:
    """b_k of the multistep DPM-Solver++ update of the given order (1..3) from step i."""
    lam = _lams(sigmas, i, order)
    h = -math.log(sigmas[i + 1]) - lam[0]
    m = np.eye(order)                       # m[k] stands for the k-th newest denoiser output
    phi1 = math.expm1(-h)
    if order == 1:
        return -phi1 * m[0]
    r0 = (lam[0] - lam[1]) / h
    d1_0 = (m[0] - m[1]) / r0
    if order == 2:
        return -phi1 * m[0] - 0.5 * phi1 * d1_0
    r1 = (lam[1] - lam[2]) / h
    d1_1 = (m[1] - m[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    phi2 = phi1 / h + 1.0
    phi3 = phi2 / h - 0.5
    return -phi1 * m[0] + phi2 * d1 - phi3 * d2


def unipc_coefficients(sigmas, i: int, order: int, variant: str = "bh2") -> tuple[np.ndarray, np.ndarray]:
    """(predictor b over m_0..m_{order-1}, corrector b over m_t, m_0..m_{order-1}) for UniPC.

    rk = (lambda_{i-k} - lambda_i) / h, D1_k = (m_k - m_0) / rk; B(h) = -h (bh1) or expm1(-h) (bh2);
    the predictor weights solve R[:-1, :-1] rho = g[:-1] (rho = 1/2 at order 2), the corrector's
    R rho = g (rho = 1/2 at order 1), with R_pq = rk_q^p and g_p = (p+1)! phi_{p+2}(-h) h^... / B(h).
    """
    lam = _lams(sigmas, i, order)
    h = -math.log(sigmas[i + 1]) - lam[0]
    hh = -h
    h_phi_1 = math.expm1(hh)
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = math.expm1(hh)
    else:
        raise ValueError(f"unipc variant must be 'bh1' or 'bh2', got {variant!r}")
    rks = np.array([(lam[k] - lam[0]) / h for k in range(1, order)] + [1.0])
    g, h_phi_k, fact = [], h_phi_1 / hh - 1.0, 1.0
    for p in range(1, order + 1):
        g.append(h_phi_k * fact / b_h)
        fact *= p + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    R = np.stack([rks ** (p - 1) for p in range(1, order + 1)])
    g = np.array(g)

    m = np.eye(order + 1)                   # m[0] is the new output m_t, m[1 + k] is m_k
    d1s = [(m[1 + k] - m[1]) / rks[k - 1] for k in range(1, order)]
    base = -h_phi_1 * m[1]
    if order == 1:
        pred = base
    else:
        rho_p = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], g[:-1])
        pred = base - b_h * sum(r * d for r, d in zip(rho_p, d1s))
    rho_c = np.array([0.5]) if order == 1 else np.linalg.solve(R, g)
    corr = base - b_h * (sum((r * d for r, d in zip(rho_c[:-1], d1s)), np.zeros(order + 1))
                         + rho_c[-1] * (m[0] - m[1]))
    return pred[1:], corr


def step_order(i: int, steps: int, max_order: int, lower_order_final: bool) -> int:
    """The reference's order schedule: i+1 while warming up, then max_order, lowered to the
    number of steps left at the end when ``lower_order_final`` (1, 2, 3, ..., 3, 2, 1)."""
    if i + 1 < max_order:
        return i + 1
    return min(max_order, steps - i) if lower_order_final else max_order


@register("dpmpp", max_order=3, lower_order_final=True, thresholding=False)
def dpmpp(sigmas, *, afs=False, max_order=3, lower_order_final=True, thresholding=False):
    """Multistep DPM-Solver++ (2M for max_order=2, 3M for 3); orders 1, 2, 3, ..., 3, 2, 1."""
    max_order = check_order(max_order, 3)
    steps = len(sigmas) - 1
    return [Op(s, X, X, s_next / s, tuple(dpmpp_coefficients(sigmas, i, step_order(i, steps, max_order,
                                                                                   lower_order_final))),
               afs=afs and i == 0, threshold=thresholding, step=i)
            for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:]))], max_order


@register("unipc", denoised_at_x=False, max_order=3, variant="bh2", lower_order_final=True, thresholding=False)
def unipc(sigmas, *, afs=False, max_order=3, variant="bh2", lower_order_final=True, thresholding=False):
    """UniPC: UniP predictor (to Y), then the UniC corrector (to X) with the new output
    m_t = D(x_pred, sigma_next), which the next predictor reuses (no extra call); no corrector on
    the last step.  The recorded evaluation of step i+1 is m_t, with the corrected x."""
    max_order = check_order(max_order, 3)
    steps, ops = len(sigmas) - 1, []
    for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
        b_pred, b_corr = unipc_coefficients(sigmas, i, step_order(i, steps, max_order, lower_order_final), variant)
        last = i == steps - 1
        ops.append(Op(s if i == 0 else None, X, X if last else Y, s_next / s, tuple(b_pred), afs=afs and i == 0,
                      threshold=thresholding, step=0 if i == 0 else None))
        if not last:
            ops.append(Op(s_next, Y, X, s_next / s, tuple(b_corr), threshold=thresholding, step=i + 1))
    return ops, max_order + 1  # outputs m_k, newest first (+1 for the corrector's m_t)
