"""Error to a reference solve: the same noise solved with many steps stands in for the exact ODE.

For samples x and reference r of shape [B, ...] in [-1, 1] (peak-to-peak range 2):

    rmse_b = sqrt(mean_j (x_bj - r_bj)^2),   psnr_b = 20 log10(2 / rmse_b)  (dB)   per sample;
    RMSE = sqrt(mean_b rmse_b^2),            PSNR = 20 log10(2 / RMSE)             pooled.

A run is summarised by the pooled pair, so RMSE and PSNR always rank runs the same way (a mean of
per-sample PSNRs beside a pooled or mean RMSE can rank them oppositely).
"""
from __future__ import annotations

import math

import torch

from .. import schedules
from ..solvers import sample

__all__ = ["reference_solve", "rmse", "psnr", "reference_error", "DATA_RANGE"]

DATA_RANGE = 2.0


def reference_solve(denoiser, noise: torch.Tensor, steps: int = 100, solver: str = "heun",
                    sigma_min: float = schedules.SIGMA_MIN, sigma_max: float = schedules.SIGMA_MAX,
                    progress: bool = False, sample=sample) -> torch.Tensor:
    """High-accuracy solve of ``noise`` on the EDM rho=7 schedule (``steps`` steps of ``solver``).

    sample: the sampler (``gs.sample``, or ``geosample.distributed.sample`` to split the batch).
    """
    sigmas = schedules.polynomial(steps, sigma_min, sigma_max)
    return sample(denoiser, noise, sigmas, solver=solver, progress=progress)


def _check_pair(x: torch.Tensor, ref: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(ref, torch.Tensor):
        raise TypeError("samples and reference must be torch tensors")
    if x.is_meta or ref.is_meta:
        raise ValueError("samples and reference must hold values, got a meta tensor")
    if x.shape != ref.shape or x.dim() < 1:
        raise ValueError(f"samples {tuple(x.shape)} and reference {tuple(ref.shape)} must have the same shape [B, ...]")


def rmse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean squared error [B] (float64)."""
    _check_pair(x, ref)
    return (x.double() - ref.double()).flatten(1).pow(2).mean(1).sqrt()


def psnr(x: torch.Tensor, ref: torch.Tensor, data_range: float = DATA_RANGE) -> torch.Tensor:
    """Per-sample PSNR in dB [B]: 20 log10(data_range / rmse) (+inf where identical)."""
    return 20 * torch.log10(data_range / rmse(x, ref))


def reference_error(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """{"rmse": pooled RMSE (over every sample and value), "psnr": PSNR of that pooled MSE (dB),
    "rmse_per_sample": [B] list}."""
    e = rmse(x, ref)
    pooled = float(e.pow(2).mean().sqrt())
    return {"rmse": pooled, "psnr": 20 * math.log10(DATA_RANGE / pooled) if pooled > 0 else math.inf,
            "rmse_per_sample": e.tolist()}
