"""The result of a GITS search: a sub-grid of a fine grid, with everything needed to redo it."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from .. import schedules
from .._io import atomic_write_text
from .config import GRIDS, GITSConfig, fine_grid, with_points

__all__ = ["GITSSchedule", "load", "load_sigmas", "fine_grid", "GRIDS", "FORMAT_VERSION"]

FORMAT_VERSION = 1


@dataclass
class GITSSchedule:
    """A GITS schedule.

    sigmas: float64 [len(indices)] = grid_sigmas[indices], decreasing (the solver's sigmas);
    indices: positions in ``grid_sigmas``, from 0 to its last;
    grid: the fine grid's family and parameters (family, teacher_steps, sigma_min, sigma_max, rho;
    a refined search adds "points", the hand-made schedules' sigmas it could move through);
    cost: the DP objective sum_k gamma^k step_costs[k] (over the DP path, before any AFS step);
    step_costs: C[i_k, i_{k+1}] along the DP path;
    params: every other search argument (teacher, metric, gamma, num_warmup, seed, batch_size,
    steps, afs, solver, shape; refine only when True, then with the record "refinement");
    fingerprint: the model/data fingerprint;
    cost_matrix: the averaged [T, T] cost (upper triangle; +inf elsewhere), so other step counts
    and gammas can be solved again with :func:`geosample.gits.solve_dp` without the teacher.
    """
    sigmas: torch.Tensor
    indices: list[int]
    grid: dict
    cost: float
    step_costs: list[float]
    params: dict
    fingerprint: str
    cost_matrix: torch.Tensor = field(repr=False)

    @property
    def steps(self) -> int:
        """Solver steps on this schedule (``len(sigmas) - 1``; one more than NFE with AFS)."""
        return len(self.indices) - 1

    @property
    def gamma(self) -> float:
        """The DP discount behind ``indices``: the picked one when ``params["gamma"]`` was a sweep."""
        return self.params.get("selected_gamma", self.params["gamma"])

    @property
    def config(self) -> GITSConfig:
        """The search's :class:`GITSConfig`, read back from ``grid`` and ``params``."""
        return GITSConfig.from_record(self.grid, self.params)

    @property
    def grid_sigmas(self) -> torch.Tensor:
        """The sigmas ``indices`` point into: the fine grid, with a refined search's added points."""
        g = self.grid
        fine = fine_grid(g["family"], g["teacher_steps"], g["sigma_min"], g["sigma_max"], g["rho"])
        return with_points(fine, g.get("points", ()))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sigmas"] = self.sigmas.tolist()
        c = self.cost_matrix.clone()
        d["cost_matrix"] = [[v if v != float("inf") else None for v in row] for row in c.tolist()]
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GITSSchedule":
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported GITS schedule format {d.get('format_version')!r}; expected {FORMAT_VERSION}")
        cm = torch.tensor([[float("inf") if v is None else v for v in row] for row in d["cost_matrix"]],
                          dtype=torch.float64)
        return cls(sigmas=torch.tensor(d["sigmas"], dtype=torch.float64), indices=list(d["indices"]),
                   grid=dict(d["grid"]), cost=float(d["cost"]), step_costs=list(d["step_costs"]),
                   params=dict(d["params"]), fingerprint=str(d["fingerprint"]), cost_matrix=cm)

    def save(self, path) -> None:
        """Write JSON atomically."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1))


def load(path) -> GITSSchedule:
    """Read a schedule written by :meth:`GITSSchedule.save`."""
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not a GITS schedule JSON file: {e}") from None
    return GITSSchedule.from_dict(d)


def load_sigmas(path) -> torch.Tensor:
    """The checked sigmas (:func:`geosample.schedules.check_sigmas`) of a schedule file: a GITS
    schedule (:meth:`GITSSchedule.save`), a JSON object with "sigmas", or a JSON list of floats."""
    with open(path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
    if isinstance(d, dict) and "format_version" in d:
        try:
            sigmas = GITSSchedule.from_dict(d).sigmas
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path} is not a valid GITS schedule file ({type(e).__name__}: {e})") from None
    else:
        sigmas = d.get("sigmas") if isinstance(d, dict) else d
    if sigmas is None:
        raise ValueError(f"{path} has no 'sigmas' list")
    return schedules.check_sigmas(sigmas)
