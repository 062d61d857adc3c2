"""GITS (geometry-inspired time scheduling): search a few-step schedule from teacher trajectories.

``search`` runs a teacher on a fine grid, ``cost_matrix`` scores every Euler jump between grid
points, ``solve_dp`` picks the cheapest sub-grid; results are cached (:mod:`.cache`).  A search's
settings are one :class:`GITSConfig`, recorded by the :class:`GITSSchedule` it returns.
"""
from .config import GITSConfig
from .cost import METRICS, cost_matrix
from .dp import available_backends, path_cost, solve_dp, solve_dp_sweep
from .schedule import GITSSchedule, fine_grid, load, load_sigmas
from .search import GAMMAS, Warmup, fingerprint, search, warmup

__all__ = ["search", "GITSConfig", "cost_matrix", "solve_dp", "solve_dp_sweep", "path_cost", "available_backends",
           "GITSSchedule", "load", "load_sigmas", "fine_grid", "fingerprint", "METRICS", "GAMMAS", "warmup", "Warmup"]
