"""What a closed-form denoiser call reports per query, shared by the streaming pass (kde.py) and
the index (kde_index.py): :class:`KDEStats`, the path codes, assembly from sub-batches, and the
float64 distances both re-score candidates with."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["KDEStats", "put_rows", "candidate_sq_dists", "EXACT", "MIXED", "FULL64", "FAST", "INDEXED"]

EXACT, MIXED, FULL64, FAST = 0, 1, 2, 3           # KDEStats.path: how each query was computed
INDEXED = 4                                       # computed on its certified set (kde_index.py)


@dataclass
class KDEStats:
    """Per-query statistics [B]: log_z = logsumexp_i (x.y_i - |y_i|^2/2) / sigma^2,
    log_mass = logsumexp_i -|x - y_i|^2 / (2 sigma^2), ess = 1 / sum_i w_i^2, argmax = argmax_i w_i,
    path = how it was computed (EXACT, MIXED, FULL64, FAST or INDEXED; see kde.py's docstring)."""
    log_z: torch.Tensor
    ess: torch.Tensor
    argmax: torch.Tensor
    log_mass: torch.Tensor = None
    path: torch.Tensor = None

    def select(self, idx: torch.Tensor) -> "KDEStats":
        """The statistics of the queries ``idx`` alone."""
        return KDEStats(*(getattr(self, f.name)[idx] for f in fields(self)))


def put_rows(out: torch.Tensor, stats: KDEStats, idx: torch.Tensor, out_i: torch.Tensor, stats_i: KDEStats):
    """out[idx] = out_i and every field of stats[idx] = stats_i, in place."""
    out[idx] = out_i
    for f in fields(stats):
        getattr(stats, f.name)[idx] = getattr(stats_i, f.name)


def candidate_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x_b - y_bj|^2 [B, K] in float64 from direct differences (x [B, D], y [B, K, D]; no
    [B, K, D] temporary)."""
    return torch.cdist(x[:, None, :], y, compute_mode="donot_use_mm_for_euclid_dist")[:, 0].square()
