"""geosample: fast few-step sampling for diffusion models with geometry-inspired schedules."""
from . import schedules
from ._cpp import has_cpp
from .denoisers import GaussianMixtureDenoiser
from .solvers import SOLVERS, Trajectory, nfe, sample

__version__ = "0.1.0"
__all__ = ["schedules", "sample", "nfe", "SOLVERS", "Trajectory", "GaussianMixtureDenoiser", "has_cpp"]
