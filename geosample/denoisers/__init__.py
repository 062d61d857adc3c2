"""Denoisers shipped with the engine: analytic Gaussian mixtures and the closed-form KDE."""
from .gaussian import GaussianMixtureDenoiser
from .kde import KDEDenoiser

__all__ = ["GaussianMixtureDenoiser", "KDEDenoiser"]
