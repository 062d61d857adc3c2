"""The geometry of sampling trajectories: the measurements of Chen, Zhou, Wang, Lyu (ICML 2024,
"On the Trajectory Regularity of ODE-based Diffusion Sampling"; JSTAT 2025, "Geometric Regularity
in Deterministic Sampling Dynamics of Diffusion-Based Generative Models").

Every function takes a :class:`~geosample.Trajectory` (or a tensor of points [T, B, ...]) and
``which``: ``"x"`` for the sampling trajectory x[0..T-1] (x[0] = sigma_max * noise, x[-1] the
sample) or ``"denoised"`` for the denoising trajectory D(x[t], sigma[t]), t = 0..T-2.
Everything is computed in float64 on flattened points X [B, T, D]; O(T D) or O(T^2 D) per sample,
never a D x D matrix.

The chord of a trajectory is the segment from its first point a = X[0] to its last c = X[-1],
with unit direction u = (c - a) / |c - a|.
"""
from __future__ import annotations

from typing import Callable

import torch

from .solvers import Trajectory, sample
from .solvers.base import check_denoised_at_x

__all__ = ["points", "deviation", "distance_to_end", "norms", "direction_cosine", "pca_spectrum",
           "explained_variance", "explained_variance_curve", "project_3d", "procrustes_align",
           "curvature_torsion", "trajectory_distance", "closed_form_gap", "is_single_bump", "measure", "report"]

WHICH = ("x", "denoised")
QUANTILES = (0.1, 0.5, 0.9)


def points(traj, which: str = "x") -> torch.Tensor:
    """The trajectory's points as float64 [B, T, D] (T = steps+1 for "x", steps for "denoised")."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if isinstance(traj, Trajectory):
        xs = traj.x if which == "x" else traj.denoised
    elif isinstance(traj, torch.Tensor):
        xs = traj
    else:
        raise TypeError(f"traj must be a geosample.Trajectory or a tensor [T, B, ...], got {type(traj).__name__}")
    if xs.dim() < 2 or xs.shape[0] < 2 or xs.shape[1] == 0:
        raise ValueError(f"trajectory points must have shape [T, B, ...] with T >= 2, B >= 1, got {tuple(xs.shape)}")
    if xs.is_meta:
        raise ValueError("trajectory points are a meta tensor (they have no values)")
    X = xs.detach().to(torch.float64).reshape(xs.shape[0], xs.shape[1], -1).transpose(0, 1)
    finite = torch.isfinite(X).all(-1)
    if not bool(finite.all()):
        b, t = (int(i) for i in (~finite).nonzero()[0])
        raise ValueError(f"trajectory {which!r} has non-finite values (NaN or inf) at sample {b}, point {t}")
    return X


def _chord(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, u): start points [B, D] and unit chord directions [B, D] of X [B, T, D]."""
    a, c = X[:, 0], X[:, -1]
    length = (c - a).norm(dim=-1, keepdim=True)
    if not bool((length > 0).all()):
        raise ValueError("trajectory has a zero-length chord (first point == last point)")
    if not bool(torch.isfinite(length).all()):
        raise ValueError(f"trajectory's chord length overflows float64 (|x| up to {float(X.abs().max()):.3g}); rescale it")
    return a, (c - a) / length


def _remove_chord(X: torch.Tensor) -> torch.Tensor:
    """P_perp (X[t] - a) = (X[t] - a) - ((X[t] - a) . u) u, [B, T, D]."""
    a, u = _chord(X)
    v = X - a[:, None]
    return v - (v @ u[:, :, None]) * u[:, None]


def deviation(traj, which: str = "x") -> torch.Tensor:
    """Distance of every point to the chord's line, [B, T]:

        dev_t = |(X[t] - a) - ((X[t] - a) . u) u|,

    zero at t = 0 and t = T-1.  For ``which="denoised"`` the chord joins D(x[0]) and D(x[T-2]).
    """
    return _remove_chord(points(traj, which)).norm(dim=-1)


def distance_to_end(traj, which: str = "x") -> torch.Tensor:
    """|X[t] - X[-1]|, [B, T]: how far each point still is from where the trajectory ends."""
    X = points(traj, which)
    return (X - X[:, -1:]).norm(dim=-1)


def _ode_parts(traj: Trajectory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t [B, S, D], D_t [B, S, D], d_t [B, S, D]) at the S = steps evaluation points,
    d_t = (x_t - D_t) / sigma_t the ODE direction dx/dsigma."""
    if not isinstance(traj, Trajectory):
        raise TypeError(f"traj must be a geosample.Trajectory (it needs sigmas and denoised), got {type(traj).__name__}")
    check_denoised_at_x(traj, "the ODE direction")
    X, Dn = points(traj, "x"), points(traj, "denoised")
    s = traj.sigmas[: Dn.shape[1]].to(torch.float64).to(X.device)
    return X[:, : Dn.shape[1]], Dn, (X[:, : Dn.shape[1]] - Dn) / s[None, :, None]


def norms(traj: Trajectory) -> dict[str, torch.Tensor]:
    """L2 norms along the path: "x" [B, T] = |x_t|, "denoised" [B, T-1] = |D(x_t, sigma_t)|,
    "direction" [B, T-1] = |d_t|, d_t = (x_t - D_t) / sigma_t.  In D dimensions, |x_t| ~ sigma_t sqrt(D)
    at large sigma and |d_t| ~ sqrt(D) (the ODE moves at a near-constant speed)."""
    x, Dn, d = _ode_parts(traj)
    return {"x": points(traj, "x").norm(dim=-1), "denoised": Dn.norm(dim=-1), "direction": d.norm(dim=-1)}


def direction_cosine(traj: Trajectory) -> torch.Tensor:
    """cos(d_t, x_t - x[-1]) = d_t . (x_t - x_end) / (|d_t| |x_t - x_end|), [B, T-1]: how well the
    ODE direction at each step points from the current state straight to the final sample
    (1 = straight line).  Where x_t == x_end the cosine is defined as 1."""
    x, _, d = _ode_parts(traj)
    v = x - points(traj, "x")[:, -1:]
    den = d.norm(dim=-1) * v.norm(dim=-1)
    return torch.where(den > 0, (d * v).sum(-1) / den.clamp_min(torch.finfo(torch.float64).tiny), torch.ones_like(den))


def _gram_pca(Y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of each row set Y [B, T, D] through its centred T x T Gram matrix.

    Yc = Y - mean_t Y, G = Yc Yc^T = V diag(lam) V^T.  lam [B, T] (descending, clamped >= 0) are the
    variances along the principal directions times T, and V [B, T, T] the matching left singular
    vectors: PC_j = Yc^T V[:, j] / sqrt(lam_j).  Cost O(T^2 D), memory O(T^2 + T D).
    """
    Yc = Y - Y.mean(dim=1, keepdim=True)
    G = Yc @ Yc.transpose(1, 2)
    if not bool(torch.isfinite(G).all()):
        raise ValueError(f"trajectory points are too large for PCA in float64 (|x| up to {float(Y.abs().max()):.3g}: "
                         "their squares overflow); rescale them")
    lam, V = torch.linalg.eigh(G)
    return lam.flip(-1).clamp_min(0.0), V.flip(-1)


def pca_spectrum(traj, remove_chord: bool = True, which: str = "x") -> torch.Tensor:
    """Principal variances of each trajectory's points, [B, T] (descending, sum = total variance * T).

    remove_chord: first project every point onto the complement of the chord direction u,
    Y_t = P_perp (X[t] - a); otherwise plain PCA of X."""
    X = points(traj, which)
    return _gram_pca(_remove_chord(X) if remove_chord else X)[0]


def explained_variance_curve(traj, max_k: int | None = None, remove_chord: bool = True,
                             which: str = "x") -> torch.Tensor:
    """Cumulative explained-variance ratio for k = 1..max_k, [B, max_k]:
    r_k = sum_{j<=k} lam_j / sum_j lam_j (lam from :func:`pca_spectrum`).  max_k defaults to T."""
    lam = pca_spectrum(traj, remove_chord, which)
    max_k = lam.shape[1] if max_k is None else max_k
    if isinstance(max_k, bool) or not isinstance(max_k, int) or not 1 <= max_k <= lam.shape[1]:
        raise ValueError(f"max_k must be an int in [1, {lam.shape[1]}] (the number of points), got {max_k!r}")
    total = lam.sum(1, keepdim=True)
    if not bool((total > 0).all()):
        raise ValueError("a trajectory has zero variance (after removing the chord it is a straight line)")
    return lam[:, :max_k].cumsum(1) / total


def explained_variance(traj, k: int = 2, remove_chord: bool = True, which: str = "x") -> torch.Tensor:
    """Fraction of each trajectory's variance held by its top-k principal components, [B].

    With ``remove_chord`` (the papers' measurement) the variance is that of the points with the chord
    direction projected out, Y_t = P_perp (X[t] - a); so r_2 ~ 1 means the trajectory lies in the
    3-D subspace spanned by the chord and two more directions.  ``remove_chord=False``: plain PCA."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return explained_variance_curve(traj, k, remove_chord, which)[:, k - 1]


def project_3d(traj, which: str = "x") -> torch.Tensor:
    """Coordinates [B, T, 3] of every point on (chord, PC1, PC2) of its own trajectory:

        c0_t = (X[t] - a) . u,   c_j_t = Y_t . w_j  (j = 1, 2),

    Y_t = P_perp (X[t] - a) and w_1, w_2 the top principal directions of Y (centred PCA via the
    Gram matrix).  So the path starts at (0, 0, 0) and ends at (|c - a|, 0, 0).  Signs are fixed so
    that sum_t c1_t >= 0 (the bump points to +PC1) and sum_t (1 - 2t/(T-1)) c2_t >= 0 (PC2 is
    positive on the first half of the path), which makes similar trajectories comparable.
    """
    X = points(traj, which)
    a, u = _chord(X)
    Y = _remove_chord(X)
    lam, V = _gram_pca(Y)
    Yc = Y - Y.mean(dim=1, keepdim=True)
    top = lam[:, :2]
    inv = torch.where(top > 1e-12 * top[:, :1], top.clamp_min(1e-300).rsqrt(), torch.zeros_like(top))
    W = Yc.transpose(1, 2) @ V[:, :, :2] * inv[:, None, :]   # [B, D, 2]; degenerate PCs give 0
    c = Y @ W                                                                          # [B, T, 2]
    T = X.shape[1]
    ramp = 1.0 - 2.0 * torch.arange(T, dtype=torch.float64, device=X.device) / (T - 1)
    flip = torch.stack([c[:, :, 0].sum(1), (c[:, :, 1] * ramp).sum(1)], dim=1)
    c = c * torch.where(flip < 0, -1.0, 1.0)[:, None, :]
    return torch.cat([((X - a[:, None]) @ u[:, :, None]), c], dim=2)


def procrustes_align(coords: torch.Tensor, reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each point set onto a reference by orthogonal Procrustes: (aligned [B, T, k], R [B, k, k]).

    For P = coords[b] [T, k] and Q = reference [T, k] (default: the mean of coords over B),
    R = argmin_{R^T R = I} |P R - Q|_F = U @ Vh with U S Vh = svd(P^T Q); aligned[b] = P R.
    No centring: the point sets keep their common origin (project_3d starts every path at 0).
    """
    if not isinstance(coords, torch.Tensor) or coords.dim() != 3:
        raise ValueError(f"coords must be a tensor [B, T, k], got {getattr(coords, 'shape', type(coords).__name__)}")
    P = coords.to(torch.float64)
    Q = P.mean(0) if reference is None else torch.as_tensor(reference, dtype=torch.float64, device=P.device)
    if Q.shape != P.shape[1:]:
        raise ValueError(f"reference must have shape {tuple(P.shape[1:])}, got {tuple(Q.shape)}")
    U, _, Vh = torch.linalg.svd(P.transpose(1, 2) @ Q)
    R = U @ Vh
    return P @ R, R


def _local_cubic(s: torch.Tensor, X: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """First three derivatives [T, D] of a least-squares cubic in arc length s [T] fitted to X [T, D]
    on the 2*window+1 points around each t (shifted inward at the ends)."""
    T = s.shape[0]
    n = min(2 * window + 1, T)
    lo = (torch.arange(T) - window).clamp(0, T - n)
    idx = lo[:, None] + torch.arange(n)                                  # [T, n]
    ds = s[idx] - s[:, None]                                             # [T, n]
    h = ds.abs().amax(1, keepdim=True).clamp_min(1e-300)                 # scale to [-1, 1] for conditioning
    V = torch.stack([(ds / h) ** p for p in range(4)], dim=2)            # [T, n, 4]
    Q, R = torch.linalg.qr(V)                                            # least squares by QR
    coef = torch.linalg.solve_triangular(R, Q.transpose(1, 2) @ X[idx], upper=True)   # [T, 4, D]
    return coef[:, 1] / h, 2 * coef[:, 2] / h ** 2, 6 * coef[:, 3] / h ** 3


def curvature_torsion(traj, window: int = 3, which: str = "x") -> tuple[torch.Tensor, torch.Tensor]:
    """Curvature and torsion [B, T] of each trajectory by a windowed local cubic fit in arc length.

    Arc length s_t = sum_{i<t} |X[i+1] - X[i]| (the polyline's).  At each t a cubic
    X(s) ~ sum_p a_p (s - s_t)^p is least-squares fitted to the 2*window+1 points t-window..t+window
    (the window is shifted inward near the ends, so it always holds min(2*window+1, T) >= 4 points),
    giving r' = a_1, r'' = 2 a_2, r''' = 6 a_3.  With G_k the Gram determinant of r', ..., r^(k),
    the (generalised Frenet) curvatures in R^D are

        kappa = sqrt(G_2) / |r'|^3   ( = |r' ^ r''| / |r'|^3 ),   tau = sqrt(G_3) / G_2,

    both invariant to the parametrisation; tau is the unsigned torsion (in R^3, |det(r', r'', r''')| /
    |r' x r''|^2).  Units: 1 / length of X.  Where G_2 = 0 (a straight piece) tau is 0.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an int >= 2 (a cubic needs 4 points), got {window!r}")
    X = points(traj, which)
    if X.shape[1] < 4:
        raise ValueError(f"curvature_torsion needs at least 4 points per trajectory, got {X.shape[1]}")
    steps = (X[:, 1:] - X[:, :-1]).norm(dim=-1)
    s = torch.cat([torch.zeros_like(steps[:, :1]), steps.cumsum(1)], dim=1)
    kappa, tau = [], []
    for b in range(X.shape[0]):
        r1, r2, r3 = _local_cubic(s[b], X[b], window)
        R = torch.stack([r1, r2, r3], dim=1)                                  # [T, 3, D]
        G = R @ R.transpose(1, 2)                                             # [T, 3, 3]
        g1, g2, g3 = G[:, 0, 0], torch.linalg.det(G[:, :2, :2]), torch.linalg.det(G)
        kappa.append(g2.clamp_min(0).sqrt() / g1.pow(1.5))
        tau.append(torch.where(g2 > 0, g3.clamp_min(0).sqrt() / g2.clamp_min(1e-300), torch.zeros_like(g2)))
    return torch.stack(kappa), torch.stack(tau)


def trajectory_distance(traj, reference, which: str = "x") -> torch.Tensor:
    """|X[t] - X_ref[t]| per sample and step, [B, T], for two trajectories on the same grid."""
    if isinstance(traj, Trajectory) and isinstance(reference, Trajectory) and \
            not torch.equal(traj.sigmas.cpu(), reference.sigmas.cpu()):
        raise ValueError("trajectories are on different sigma grids")
    X, Xr = points(traj, which), points(reference, which)
    if X.shape != Xr.shape:
        raise ValueError(f"trajectories differ in shape: {tuple(X.shape)} vs {tuple(Xr.shape)} ([B, T, D])")
    return (X - Xr.to(X.device)).norm(dim=-1)


def closed_form_gap(denoiser: Callable, optimal: Callable, noise: torch.Tensor, sigmas,
                    solver: str = "euler") -> dict[str, torch.Tensor]:
    """How far a model's sampling follows the closed-form optimum from the same noise.

    Runs ``solver`` on ``sigmas`` twice from ``noise``: with ``denoiser`` (a trained model) and with
    ``optimal`` (e.g. ``KDEDenoiser(data)``, the exact posterior mean of the training set).  Returns
    "x" [B, T] = |x_t - x*_t|, "denoised" [B, T-1] = |D(x_t) - D*(x*_t)|, and "relative" [B, T-1] =
    |x_t - x*_t| / |x*_t - x*_end| for t < T-1 (the gap relative to the distance still to travel).
    """
    traj = sample(denoiser, noise, sigmas, solver=solver, return_trajectory=True)
    ref = sample(optimal, noise, sigmas, solver=solver, return_trajectory=True)
    gap = trajectory_distance(traj, ref)
    rel = gap[:, :-1] / distance_to_end(ref)[:, :-1]
    return {"x": gap, "denoised": trajectory_distance(traj, ref, "denoised"), "relative": rel}


def is_single_bump(curve: torch.Tensor, tol: float = 1e-3) -> torch.Tensor:
    """Whether each curve [B, T] is one bump, [B] bool: non-decreasing up to its argmax m and
    non-increasing after it, where a step against that direction counts only if it exceeds
    ``tol * max_t curve`` (so float noise near the ends does not count as a second bump)."""
    if not isinstance(curve, torch.Tensor) or curve.dim() != 2 or curve.shape[1] < 2:
        raise ValueError(f"curve must be a tensor [B, T] with T >= 2, got {getattr(curve, 'shape', type(curve).__name__)}")
    c = curve.to(torch.float64)
    m = c.argmax(1, keepdim=True)
    step = c[:, 1:] - c[:, :-1]                                             # [B, T-1], step t -> t+1
    rising = torch.arange(step.shape[1], device=c.device)[None] < m         # steps before the peak
    against = torch.where(rising, -step, step)
    return (against <= tol * c.amax(1, keepdim=True)).all(1)


def _stats(v) -> dict:
    """Per-step mean and quantiles over samples of v [B, T] as lists."""
    q = torch.quantile(v, torch.tensor(QUANTILES, dtype=v.dtype), dim=0)
    return {"mean": v.mean(0).tolist(), **{f"q{int(100 * p)}": q[i].tolist() for i, p in enumerate(QUANTILES)}}


def _summary(v) -> dict:
    """min / mean / max of a per-sample value v [B]."""
    return {"min": float(v.min()), "mean": float(v.mean()), "max": float(v.max())}


def _shape_similarity(curves):
    """Pearson correlation of each curve [B, T] with the mean curve over t, [B]."""
    c = curves - curves.mean(1, keepdim=True)
    m = c.mean(0, keepdim=True)
    return (c * m).sum(1) / (c.norm(dim=1) * m.norm(dim=1))


def measure(traj: Trajectory, window: int = 3) -> dict:
    """Every measurement above of a batch of trajectories, as tensors: deviation (sampling and
    denoising, relative to the chord), distances, norms, cosines, explained-variance curves
    (chord removed, plain, denoising), curvature/torsion, 3-D coordinates (Procrustes-aligned),
    single-bump flags and each sample's correlation with the mean relative-deviation curve."""
    dev, dev_d = deviation(traj), deviation(traj, "denoised")
    chord = distance_to_end(traj)[:, 0]
    rel = dev / chord[:, None]
    kappa, tau = curvature_torsion(traj, window=window)
    coords = project_3d(traj)
    aligned, _ = procrustes_align(coords)
    return {"sigmas": traj.sigmas, "deviation": dev, "relative_deviation": rel, "deviation_denoised": dev_d,
            "distance_to_end": distance_to_end(traj), "norms": norms(traj), "cosine": direction_cosine(traj),
            "ev_chord": explained_variance_curve(traj, min(10, traj.x.shape[0])),
            "ev_plain": explained_variance_curve(traj, min(10, traj.x.shape[0]), remove_chord=False),
            "ev_denoised": explained_variance_curve(traj, min(10, traj.denoised.shape[0]), which="denoised"),
            "kappa": kappa, "tau": tau, "coords": coords, "aligned": aligned,
            "single_bump": is_single_bump(dev), "single_bump_denoised": is_single_bump(dev_d),
            "shape_corr": _shape_similarity(rel), "chord": chord}


def report(m: dict) -> dict:
    """The JSON-ready numbers of :func:`measure`'s output: per-step means and 10/50/90% quantiles,
    per-sample min/mean/max summaries."""
    sig = m["sigmas"]
    peak = m["relative_deviation"].argmax(1)
    return {
        "sigmas": sig.tolist(),
        "explained_variance_top2_chord_removed": _summary(m["ev_chord"][:, 1]),
        "explained_variance_top2_fraction_ge_0.99": float((m["ev_chord"][:, 1] >= 0.99).double().mean()),
        "explained_variance_top2_plain": _summary(m["ev_plain"][:, 1]),
        "explained_variance_top2_denoised_chord_removed": _summary(m["ev_denoised"][:, 1]),
        "explained_variance_curve_chord_removed": _stats(m["ev_chord"]),
        "explained_variance_curve_plain": _stats(m["ev_plain"]),
        "deviation_single_bump_fraction": float(m["single_bump"].double().mean()),
        "deviation_denoised_single_bump_fraction": float(m["single_bump_denoised"].double().mean()),
        "deviation_ends_max_abs": float(m["deviation"][:, [0, -1]].abs().max()),
        "relative_deviation_peak": _summary(m["relative_deviation"].amax(1)),
        "relative_deviation_peak_sigma": _summary(sig[peak].double()),
        "shape_correlation_with_mean": _summary(m["shape_corr"]),
        "chord_length": _summary(m["chord"]),
        "relative_deviation": _stats(m["relative_deviation"]),
        "deviation_denoised": _stats(m["deviation_denoised"]),
        "distance_to_end": _stats(m["distance_to_end"]),
        "norm_x": _stats(m["norms"]["x"]), "norm_denoised": _stats(m["norms"]["denoised"]),
        "norm_direction": _stats(m["norms"]["direction"]),
        "cosine_direction_to_end": _stats(m["cosine"]),
        "curvature": _stats(m["kappa"]), "torsion": _stats(m["tau"]),
    }
