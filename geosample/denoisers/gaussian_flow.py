"""The exact velocity of a Gaussian mixture under flow matching: an analytic flow model for tests.

x_t = (1 - t) x0 + t noise.  The EDM state x = x_t / (1 - t) has noise level sigma = t / (1 - t),
so the posterior mean is the mixture's EDM denoiser, x0_hat = D(x_t / (1 - t), t / (1 - t)), and
the velocity E[noise - x0 | x_t] is v = (x_t - x0_hat) / t.  At t = 1, x0_hat is the mixture mean.
"""
from __future__ import annotations

import torch

from .gaussian import GaussianMixtureDenoiser

__all__ = ["GaussianMixtureFlow"]


class GaussianMixtureFlow:
    """Velocity model ``v(x_t, timestep)`` of a :class:`GaussianMixtureDenoiser`'s data, with
    t = timestep / timestep_scale in (0, 1] per sample ([B] tensor or float).  Float64 inside; returns
    x_t's dtype.  ``calls`` counts evaluations.  Any other analytic EDM denoiser (e.g. a
    :class:`~geosample.denoisers.gaussian.LowRankMixtureDenoiser`) serves with its data ``mean``
    (the posterior mean at t = 1) given."""

    def __init__(self, mixture, timestep_scale: float = 1000.0, mean: torch.Tensor | None = None):
        self.mixture, self.timestep_scale = mixture, float(timestep_scale)
        if mean is None:
            if not isinstance(mixture, GaussianMixtureDenoiser):
                raise TypeError(f"mean is needed for a {type(mixture).__name__} (only a GaussianMixtureDenoiser's is known)")
            mean = (mixture.log_weights.exp()[:, None] * mixture.means.reshape(mixture.means.shape[0], -1)).sum(0)
        self.mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        self.calls = 0

    def __call__(self, x_t: torch.Tensor, timestep, **kwargs) -> torch.Tensor:
        self.calls += 1
        xf = x_t.to(torch.float64)
        t = torch.as_tensor(timestep, dtype=torch.float64, device=xf.device).flatten() / self.timestep_scale
        t = t.expand(x_t.shape[0]) if t.numel() == 1 else t
        if not bool(((t > 0) & (t <= 1)).all()):
            raise ValueError(f"flow times must lie in (0, 1], got {t.tolist()}")
        at_one = t == 1
        tc = torch.where(at_one, 0.5, t)  # a finite stand-in where t = 1 (replaced below)
        view = (-1,) + (1,) * (x_t.dim() - 1)
        x0 = self.mixture(xf / (1 - tc).reshape(view), tc / (1 - tc))
        mean = self.mean.to(xf.device).reshape(1, *x_t.shape[1:])
        x0 = torch.where(at_one.reshape(view), mean, x0)
        return ((xf - x0) / t.reshape(view)).to(x_t.dtype)
