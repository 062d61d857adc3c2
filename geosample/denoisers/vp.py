"""Discrete-time (VP) models' noise levels: sigma <-> alpha (alphas_cumprod) and <-> continuous
timestep, the conversions the diffusers adapters and the ``discrete`` schedule share (re-exported by
:mod:`geosample.schedules`)."""
from __future__ import annotations

import torch

__all__ = ["sigma_to_alpha", "alpha_to_sigma", "discrete_sigmas", "timestep_to_sigma", "sigma_to_timestep"]


def sigma_to_alpha(sigma):
    """alpha = 1 / (1 + sigma^2): the VP signal level (alphas_cumprod) at noise level sigma."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + sigma ** 2)


def alpha_to_sigma(alpha):
    """sigma = sqrt((1 - alpha) / alpha)."""
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    return torch.sqrt((1.0 - alpha) / alpha)


def discrete_sigmas(alphas_cumprod) -> torch.Tensor:
    """The model's sigma at each integer timestep k: sqrt((1 - a_k) / a_k), increasing in k."""
    ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
    if ac.numel() < 2:
        raise ValueError(f"alphas_cumprod needs at least 2 entries, got {ac.numel()}")
    if not bool(torch.all((ac > 0) & (ac < 1))):
        raise ValueError("alphas_cumprod must lie strictly inside (0, 1)")
    if not bool(torch.all(ac[1:] < ac[:-1])):
        raise ValueError("alphas_cumprod must be strictly decreasing")
    return alpha_to_sigma(ac)


def timestep_to_sigma(t, alphas_cumprod) -> torch.Tensor:
    """Continuous timestep -> sigma, by linear interpolation of log sigma between integer steps."""
    log_s = discrete_sigmas(alphas_cumprod).log()
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, log_s.numel() - 1)
    lo = t.floor().long().clamp(max=log_s.numel() - 2)
    w = t - lo
    return torch.exp((1 - w) * log_s[lo] + w * log_s[lo + 1])


def sigma_to_timestep(sigma, alphas_cumprod) -> torch.Tensor:
    """sigma -> continuous timestep, the inverse of :func:`timestep_to_sigma` (clamped to the range)."""
    log_s = discrete_sigmas(alphas_cumprod).log()
    ls = torch.as_tensor(sigma, dtype=torch.float64).log().clamp(log_s[0], log_s[-1])
    hi = torch.searchsorted(log_s, ls.contiguous()).clamp(1, log_s.numel() - 1)
    lo = hi - 1
    w = (ls - log_s[lo]) / (log_s[hi] - log_s[lo])
    return lo.to(torch.float64) + w
