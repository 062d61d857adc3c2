"""GITS cost matrix: how far one Euler jump from grid point i lands from the teacher at point j.

For a teacher trajectory ``X[0..T-1]`` on the grid ``G`` with denoised values ``Dn[0..T-2]``,
the direction at point i is ``d_i = (X[i] - Dn[i]) / G[i]`` and the jump to point j > i is

    x_hat_ij = X[i] + h_ij d_i,    h_ij = G[j] - G[i].

Per sample, the metrics are (then averaged over the batch):

    l1:  |x_hat_ij - X[j]|_1
    l2:  |x_hat_ij - X[j]|_2
    dev: dev(x_hat_ij) - dev(X[j]),  dev(y) = |P (X[-1] - y)|_2,  P = I - u u^T,
         u = (X[-1] - X[0]) / |X[-1] - X[0]|   (distance to the chord X[0] -> X[-1])

``dev`` is signed and, as in the reference, the batch means are subtracted (mean of the
student's deviation minus mean of the teacher's).  Only ``i < j`` is defined: every entry with
``i >= j`` is ``+inf``.  No loop over pairs:

* l2 expands ``|e_ij|^2 = |Y_i - Y_j|^2 + 2 h_ij <d_i, Y_i - Y_j> + h_ij^2 |d_i|^2`` with
  ``Y = X - X[-1]``, built from the float64 Gram matrices ``Y Y^T`` and ``d Y^T`` ([B, T, T]);
* dev needs only per-i vectors: ``|P(r_i - h d_i)|^2 = |P r_i|^2 - 2 h <P r_i, P d_i> +
  h^2 |P d_i|^2`` with ``r_i = X[-1] - X[i]``;
* l1 has no such expansion and is vectorised over all later points j for each i.

All maths is float64, a block of samples at a time; per-sample costs are summed, then divided by B.
"""
from __future__ import annotations

import torch

from ..solvers import Trajectory
from ..solvers.base import check_denoised_at_x

__all__ = ["cost_matrix", "METRICS"]

METRICS = ("l1", "l2", "dev")


def _check(traj: Trajectory) -> None:
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj must be a geosample Trajectory, got {type(traj).__name__}")
    x, den = traj.x, traj.denoised
    if x.dim() < 2 or x.shape[0] < 2 or den.shape[0] != x.shape[0] - 1 or den.shape[1:] != x.shape[1:]:
        raise ValueError(f"trajectory needs x [T, B, ...] and denoised [T-1, B, ...], got "
                         f"{tuple(x.shape)} and {tuple(den.shape)}")
    if traj.sigmas.numel() != x.shape[0] or not bool((traj.sigmas > 0).all()):
        raise ValueError("trajectory sigmas must be T positive values (no trailing 0)")
    check_denoised_at_x(traj, "cost_matrix")


def _steps(g: torch.Tensor) -> torch.Tensor:
    """h[i, j] = G[j] - G[i] for i < T-1, all j: [T-1, T]."""
    return g[None, :] - g[:-1, None]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over the last axis without materialising a * b."""
    return torch.einsum("...d,...d->...", a, b)


def _l2(x: torch.Tensor, d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    y = (x - x[-1]).transpose(0, 1)                                        # [b, T, D]
    db = d.transpose(0, 1)                                                 # [b, T-1, D]
    yy = torch.bmm(y, y.transpose(1, 2))                                   # [b, T, T]
    dy = torch.bmm(db, y.transpose(1, 2))                                  # [b, T-1, T]
    sq = yy.diagonal(dim1=1, dim2=2)                                       # |Y_j|^2  [b, T]
    dd = _dot(db, db)                                                      # |d_i|^2  [b, T-1]
    h = _steps(g)[None]
    dist2 = sq[:, :-1, None] + sq[:, None, :] - 2 * yy[:, :-1, :]
    cross = dy.diagonal(dim1=1, dim2=2)[:, :, None] - dy                   # <d_i, Y_i - Y_j>
    e2 = dist2 + 2 * h * cross + h * h * dd[:, :, None]
    return e2.clamp_min(0).sqrt().sum(0)                                   # [T-1, T]


def _dev(x: torch.Tensor, d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    r = x[-1] - x                                                          # [T, b, D]
    u = r[0] / r[0].norm(dim=-1, keepdim=True)                             # [b, D]
    pr = r.sub_(_dot(r, u)[..., None] * u)                                 # P r_i
    pd = d - _dot(d, u)[..., None] * u                                     # P d_i
    rr, rd, dd = _dot(pr[:-1], pr[:-1]), _dot(pr[:-1], pd), _dot(pd, pd)   # [T-1, b]
    h = _steps(g)[:, :, None]                                              # [T-1, T, 1]
    dev2 = rr[:, None] - 2 * h * rd[:, None] + h * h * dd[:, None]         # [T-1, T, b]
    student = dev2.clamp_min(0).sqrt().sum(-1)
    teacher = _dot(pr, pr).sqrt().sum(-1)                                  # [T]
    return student - teacher[None, :]


def _l1(x: torch.Tensor, d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    t = x.shape[0]
    h = _steps(g)
    out = torch.zeros(t - 1, t, dtype=torch.float64, device=x.device)
    for i in range(t - 1):
        jump = x[i] + h[i, i + 1:, None, None] * d[i]                      # [T-1-i, b, D]
        out[i, i + 1:] = (jump - x[i + 1:]).abs().sum((-1, -2))
    return out


_METRIC_FN = {"l1": _l1, "l2": _l2, "dev": _dev}


@torch.no_grad()
def cost_matrix(traj: Trajectory, metric: str = "dev", chunk: int | None = None) -> torch.Tensor:
    """[T, T] float64 cost of an Euler jump between every pair of grid points (i < j; else +inf).

    traj: a :class:`geosample.Trajectory` (x [T, B, ...], denoised [T-1, B, ...], sigmas [T] > 0),
    e.g. ``gs.sample(..., return_trajectory=True)``.  metric: "l1" | "l2" | "dev".
    chunk: samples per float64 block (default: ~8 MB blocks, which stay cache-friendly).
    Returned on the trajectory's device.
    """
    if metric not in _METRIC_FN:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    _check(traj)
    t, b = traj.x.shape[:2]
    x = traj.x.reshape(t, b, -1)
    den = traj.denoised.reshape(t - 1, b, -1)
    g = traj.sigmas.to(x.device, torch.float64)
    chunk = chunk or max(1, (1 << 20) // (t * x.shape[-1]))
    total = torch.zeros(t - 1, t, dtype=torch.float64, device=x.device)
    for s in range(0, b, chunk):
        xc = x[:, s:s + chunk].to(torch.float64)
        dc = (xc[:-1] - den[:, s:s + chunk].to(torch.float64)) / g[:-1, None, None]
        total += _METRIC_FN[metric](xc, dc, g)
    out = torch.full((t, t), float("inf"), dtype=torch.float64, device=x.device)
    mask = torch.ones(t - 1, t, dtype=torch.bool, device=x.device).triu(1)
    out[:-1][mask] = total[mask] / b
    return out
