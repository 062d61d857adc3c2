"""geosample: fast few-step sampling for diffusion models with geometry-inspired (GITS) schedules."""
from . import amed, data, geometry, gits, kernels, metrics, models, schedules, solvers
from ._cpp import has_cpp
from .denoisers import GaussianMixtureDenoiser, KDEDenoiser
from .solvers import SOLVERS, Trajectory, nfe, sample

from ._version import __version__
__all__ = ["schedules", "solvers", "sample", "nfe", "SOLVERS", "Trajectory", "KDEDenoiser",
           "GaussianMixtureDenoiser", "gits", "amed", "geometry", "metrics", "models", "data", "has_cpp"]
