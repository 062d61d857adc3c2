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
``i >= j`` is ``+inf``.  The torch backend, without a Python loop over pairs:

* l2 expands ``|e_ij|^2 = |Y_i - Y_j|^2 + 2 h_ij <d_i, Y_i - Y_j> + h_ij^2 |d_i|^2`` with
  ``Y = X - X[-1]``, built from the float64 Gram matrices ``Y Y^T`` and ``d Y^T`` ([B, T, T]);
* dev needs only per-i vectors: ``|P(r_i - h d_i)|^2 = |P r_i|^2 - 2 h <P r_i, P d_i> +
  h^2 |P d_i|^2`` with ``r_i = X[-1] - X[i]``;
* l1 has no such expansion and is vectorised over all later points j for each i.

Backends (``backend=``): ``"torch"`` does all of the above in float64, a block of samples at a time
(the reference); ``"cpp"`` (``geosample._C``, CPU) forms every jump error ``(X[i] - X[j]) + h_ij d_i``
in the trajectory's precision inside a cache-blocked SIMD loop, sums each 1024-element block in that
precision and the blocks in float64 (l1, l2; never storing a jumped point), and
builds dev from five float64 dot products per point, ``r.r, r.c, d.d, d.c, r.d`` with
``c = X[-1] - X[0]`` (:func:`dev_from_moments`), in one pass over memory on all cores; ``"triton"``
(CUDA) runs the same two kernels on the GPU (:mod:`geosample.kernels.gits_cost`), falling back to
the torch backend if a kernel fails to compile or launch there.  ``"auto"``:
triton on CUDA, cpp on CPU, torch where those are missing.  Per-sample costs are summed in a fixed
order, then divided by B.
"""
from __future__ import annotations

import torch

from .._cpp import _C, has_cpp
from ..kernels import run_with_fallback, triton_available
from ..solvers import Trajectory
from ..solvers.base import check_denoised_at_x

__all__ = ["cost_matrix", "dev_from_moments", "METRICS", "BACKENDS", "available_backends"]

METRICS = ("l1", "l2", "dev")
BACKENDS = ("torch", "cpp", "triton")


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


def _deviation_cost(prr: torch.Tensor, prd: torch.Tensor, pdd: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[T-1, T] dev cost summed over samples from the projections |P r_t|^2 [T, b],
    <P r_i, P d_i> and |P d_i|^2 [T-1, b]: the student's |P (r_i - h d_i)|^2 expands to
    |P r_i|^2 - 2 h <P r_i, P d_i> + h^2 |P d_i|^2, the teacher's deviation is |P r_j|."""
    h = _steps(g)[:, :, None]                                              # [T-1, T, 1]
    dev2 = prr[:-1, None] - 2 * h * prd[:, None] + h * h * pdd[:, None]    # [T-1, T, b]
    return dev2.clamp_min(0).sqrt().sum(-1) - prr.sqrt().sum(-1)[None, :]


def _dev(x: torch.Tensor, d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    r = x[-1] - x                                                          # [T, b, D]
    u = r[0] / r[0].norm(dim=-1, keepdim=True)                             # [b, D]
    pr = r.sub_(_dot(r, u)[..., None] * u)                                 # P r_i
    pd = d - _dot(d, u)[..., None] * u                                     # P d_i
    return _deviation_cost(_dot(pr, pr), _dot(pr[:-1], pd), _dot(pd, pd), g)


def _l1(x: torch.Tensor, d: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    t = x.shape[0]
    h = _steps(g)
    out = torch.zeros(t - 1, t, dtype=torch.float64, device=x.device)
    for i in range(t - 1):
        jump = x[i] + h[i, i + 1:, None, None] * d[i]                      # [T-1-i, b, D]
        out[i, i + 1:] = (jump - x[i + 1:]).abs().sum((-1, -2))
    return out


_METRIC_FN = {"l1": _l1, "l2": _l2, "dev": _dev}


def dev_from_moments(m: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """[T-1, T] dev cost summed over samples from float64 moments m [T, B, 5] = (r.r, r.c, d.d, d.c, r.d):
    |P r|^2 = r.r - (r.c)^2 / c.c,  <P r, P d> = r.d - (r.c)(d.c) / c.c,  |P d|^2 = d.d - (d.c)^2 / c.c
    (c.c = r_0.c; d = 0 at the last point)."""
    rr, rc, dd, dc, rd = m.unbind(-1)
    cc = rc[0]
    prr = (rr - rc * rc / cc).clamp_min(0)
    prd = (rd - rc * dc / cc)[:-1]
    pdd = (dd - dc * dc / cc).clamp_min(0)[:-1]
    return _deviation_cost(prr, prd, pdd, g)


def available_backends(device="cpu") -> list[str]:
    """The cost-matrix backends usable here for tensors on ``device``, preferred first."""
    cuda = torch.device(device).type == "cuda"
    fast = ["triton"] if cuda and triton_available() else ["cpp"] if not cuda and has_cpp() else []
    return fast + ["torch"]


def _pick(backend: str, device) -> str:
    if backend == "auto":
        return available_backends(device)[0]
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: auto, {', '.join(BACKENDS)}")
    if backend == "cpp" and not has_cpp():
        raise ValueError("backend 'cpp' needs the C++ extension geosample._C, which is not built here")
    if backend == "triton" and not triton_available():
        raise ValueError("backend 'triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
    return backend


def _kernel_inputs(x: torch.Tensor, den: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """x and den contiguous on ``device`` in one kernel dtype: float64 if either is, else float32."""
    dtype = torch.float64 if torch.float64 in (x.dtype, den.dtype) else torch.float32
    return x.to(device=device, dtype=dtype).contiguous(), den.to(device=device, dtype=dtype).contiguous()


def _mean_torch(x, den, g, metric, chunk) -> torch.Tensor:
    t, b = x.shape[:2]
    chunk = chunk or max(1, (1 << 20) // (t * x.shape[-1]))
    total = torch.zeros(t - 1, t, dtype=torch.float64, device=x.device)
    for s in range(0, b, chunk):
        xc = x[:, s:s + chunk].to(torch.float64)
        dc = (xc[:-1] - den[:, s:s + chunk].to(torch.float64)) / g[:-1, None, None]
        total += _METRIC_FN[metric](xc, dc, g)
    return total / b


def _mean_cpp(x, den, g, metric) -> torch.Tensor:
    x, den = _kernel_inputs(x, den, "cpu")
    c = _C.cost_matrix(x.numpy(), den.numpy(), g.cpu().numpy(), metric, torch.get_num_threads())
    return torch.from_numpy(c[:-1]).to(g.device)


def _mean_triton(x, den, g, metric) -> torch.Tensor:
    from ..kernels import gits_cost

    x, den = _kernel_inputs(x, den, x.device)
    if metric == "dev":
        return dev_from_moments(gits_cost.dev_moments(x, den, g), g) / x.shape[1]
    sums = gits_cost.pair_sums(x, den, g, square=metric == "l2")
    per_sample = sums.sqrt() if metric == "l2" else sums
    return per_sample.sum(0)[:-1] / x.shape[1]


@torch.no_grad()
def cost_matrix(traj: Trajectory, metric: str = "dev", chunk: int | None = None,
                backend: str = "auto") -> torch.Tensor:
    """[T, T] float64 cost of an Euler jump between every pair of grid points (i < j; else +inf).

    traj: a :class:`geosample.Trajectory` (x [T, B, ...], denoised [T-1, B, ...], sigmas [T] > 0),
    e.g. ``gs.sample(..., return_trajectory=True)``.  metric: "l1" | "l2" | "dev".
    chunk: samples per float64 block of the torch backend (default: ~8 MB blocks).
    backend: "auto" | "torch" | "cpp" | "triton" (see the module docstring).
    Returned on the trajectory's device.  Raises ValueError when a cost is not finite (NaN or inf
    in the trajectory, or x[-1] == x[0] for dev).
    """
    if metric not in _METRIC_FN:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    _check(traj)
    t, b = traj.x.shape[:2]
    x = traj.x.reshape(t, b, -1)
    den = traj.denoised.reshape(t - 1, b, -1)
    g = traj.sigmas.to(x.device, torch.float64)
    backend = _pick(backend, x.device)
    if backend == "cpp":
        mean = _mean_cpp(x, den, g, metric)
    elif backend == "triton":  # the torch backend stands in for a kernel that fails on this device
        mean = run_with_fallback("gits_moment" if metric == "dev" else "gits_pair",
                                 lambda: _mean_triton(x, den, g, metric), lambda: _mean_torch(x, den, g, metric, chunk))
    else:
        mean = _mean_torch(x, den, g, metric, chunk)
    out = torch.full((t, t), float("inf"), dtype=torch.float64, device=x.device)
    mask = torch.ones(t - 1, t, dtype=torch.bool, device=x.device).triu(1)
    out[:-1][mask] = mean[mask]
    if not bool(torch.isfinite(mean[mask]).all()):
        raise ValueError(f"the {metric} cost matrix has non-finite entries: the trajectory holds NaN or inf"
                         + (", or its chord x[-1] - x[0] is zero" if metric == "dev" else ""))
    return out
