"""Denoisers shipped with the engine: analytic Gaussians and mixtures, and the closed-form KDE."""
from .gaussian import GaussianDenoiser, GaussianMixtureDenoiser, LowRankMixtureDenoiser
from .kde import KDEDenoiser

__all__ = ["GaussianDenoiser", "GaussianMixtureDenoiser", "LowRankMixtureDenoiser", "KDEDenoiser"]
