"""Analytic denoiser of an isotropic Gaussian mixture, with a high-accuracy reference ODE solve.

Data p(y) = sum_k w_k N(y; mu_k, s_k^2 I).  At noise level sigma the noisy marginal is a mixture
with variances v_k = s_k^2 + sigma^2, and the exact denoiser is

    D(x; sigma) = sum_k p_k(x) (mu_k + s_k^2 / v_k (x - mu_k)),
    p_k(x) = softmax_k(log w_k - |x - mu_k|^2 / (2 v_k) - (d/2) log v_k).
"""
from __future__ import annotations

import math

import torch

__all__ = ["GaussianMixtureDenoiser"]


class GaussianMixtureDenoiser:
    """Exact D(x, sigma) for means [K, ...], stds [K] (or a scalar) and weights [K] (default uniform).

    Computed in float64; returns x's dtype.  ``solve`` integrates the probability-flow ODE with
    classical RK4 in log sigma (error ~1e-10 at 800 steps over 80 -> 0.05), the ground truth
    for solver tests.
    """

    def __init__(self, means, stds, weights=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.dim() < 2 or means.shape[0] == 0:
            raise ValueError(f"means must have shape [K, ...] with K >= 1, got {tuple(means.shape)}")
        k = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).flatten()
        if stds.numel() == 1:
            stds = stds.expand(k).clone()
        if stds.numel() != k or not bool((stds > 0).all() & torch.isfinite(stds).all()):
            raise ValueError(f"stds must be one finite positive value or {k} of them")
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64).flatten()
        if w.numel() != k or not bool((w > 0).all() & torch.isfinite(w).all()):
            raise ValueError(f"weights must be {k} finite positive values")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means must be finite")
        self.means = means
        self.stds = stds
        self.log_weights = (w / w.sum()).log()
        self.shape = tuple(means.shape[1:])
        self.dim = int(means[0].numel())

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"x must have shape [B, {', '.join(map(str, self.shape))}], got {tuple(x.shape)}")
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        mu = self.means.reshape(self.means.shape[0], -1).to(xf.device)
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=xf.device).reshape(-1, 1)
        if sig.numel() not in (1, xf.shape[0]):
            raise ValueError(f"sigma must be a float or a [B] tensor with B = {xf.shape[0]}, got {sig.numel()} values")
        if not bool((sig > 0).all() & torch.isfinite(sig).all()):
            raise ValueError("sigma must be finite and > 0")
        if not bool(torch.isfinite(xf).all()):
            raise ValueError("x contains NaN or inf")
        var_data = (self.stds.to(xf.device) ** 2)[None, :]          # [1, K]
        var = var_data + sig ** 2                                    # [B or 1, K]
        diff = xf[:, None, :] - mu[None]                             # [B, K, d]
        dist2 = (diff * diff).sum(-1)                                # [B, K]
        logits = self.log_weights.to(xf.device) - dist2 / (2 * var) - 0.5 * self.dim * var.log()
        p = torch.softmax(logits, dim=1)                             # [B, K]
        w = p * (var_data / var)                                     # p_k s_k^2 / v_k
        out = p @ mu + w.sum(1, keepdim=True) * xf - w @ mu
        return out.reshape(x.shape).to(x.dtype)

    def solve(self, x: torch.Tensor, sigma_from: float, sigma_to: float, steps: int = 4000) -> torch.Tensor:
        """x(sigma_to) from x(sigma_from) on the probability-flow ODE, RK4 in u = log sigma, float64.

        dx/du = x - D(x, e^u); both sigmas must be > 0 (for sigma_to = 0 apply D at the end).
        """
        if not (sigma_from > 0 and sigma_to > 0):
            raise ValueError("solve needs sigma_from > 0 and sigma_to > 0")
        x = x.to(torch.float64)
        u0, u1 = math.log(sigma_from), math.log(sigma_to)
        h = (u1 - u0) / steps

        def f(y, u):
            return y - self(y, math.exp(u))

        u = u0
        for _ in range(steps):
            k1 = f(x, u)
            k2 = f(x + 0.5 * h * k1, u + 0.5 * h)
            k3 = f(x + 0.5 * h * k2, u + 0.5 * h)
            k4 = f(x + h * k3, u + h)
            x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
            u += h
        return x
