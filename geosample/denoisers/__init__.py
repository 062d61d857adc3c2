"""Denoisers shipped with the engine: analytic Gaussian mixtures and the closed-form KDE."""
from .gaussian import GaussianMixtureDenoiser

__all__ = ["GaussianMixtureDenoiser"]
