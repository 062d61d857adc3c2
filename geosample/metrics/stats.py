"""Gaussian feature statistics (mu, sigma) and the EDM ``.npz`` reference-statistics format.

EDM's ``fid.py ref`` writes ``np.savez(path, mu=mu, sigma=sigma)`` with mu [d] and sigma [d, d]
(float64); the CIFAR-10 reference files published with EDM load with :func:`load_stats`.
"""
from __future__ import annotations


import numpy as np
import torch

from .._io import atomic_write

__all__ = ["feature_stats", "save_stats", "load_stats"]


def feature_stats(features, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """mu = mean_i f_i [d] and the unbiased covariance sigma = sum_i (f_i - mu)(f_i - mu)^T / (n-1)
    [d, d], float64, from features [n, d] with n >= 2 (any float dtype; summed in float64
    ``block`` rows at a time, so 50,000 float32 Inception features need no float64 copy)."""
    f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [n, d] with n >= 2, got shape {f.shape}")
    n, d = f.shape
    mu = np.zeros(d)
    for i in range(0, n, block):
        mu += f[i:i + block].sum(0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((d, d))
    for i in range(0, n, block):
        c = f[i:i + block].astype(np.float64) - mu
        sigma += c.T @ c
    return mu, sigma / (n - 1)


def save_stats(path, mu, sigma) -> None:
    """Write ``mu``, ``sigma`` as an EDM-style ``.npz`` atomically."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"need mu [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
    atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma))


def load_stats(path) -> tuple[np.ndarray, np.ndarray]:
    """(mu [d], sigma [d, d]) float64 from an EDM-style ``.npz`` (keys ``mu`` and ``sigma``)."""
    with np.load(path) as z:
        missing = {"mu", "sigma"} - set(z.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; EDM reference stats need 'mu' and 'sigma'")
        mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise ValueError(f"{path}: need mu [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
    return mu, sigma
