"""AMED: learned (or given) intermediate times for few-step sampling (AMED-Solver, AMED-Plugin).

``gs.sample(D, noise, sigmas, solver=S, amed=P)`` with S = "amed" (AMED-Solver) or a base solver
of the AMED-Plugin ("euler", "dpm2", "ipndm", "dpmpp"); P is :class:`Fixed` (per-interval
predictions, the same for every sample) or a :class:`Predictor` from :func:`train` / :func:`load`
(per-sample predictions from features of the current state).  The update rules are in
:mod:`geosample.solvers.amed`; docs/amed.md has the guide and the measurements.
"""
from ..solvers.amed import VARIANTS, Fixed
from .features import FEATURES, find_bottleneck
from .predictor import Predictor, load
from .train import teacher_grid, train

__all__ = ["Fixed", "Predictor", "train", "load", "teacher_grid", "VARIANTS", "FEATURES", "find_bottleneck"]
