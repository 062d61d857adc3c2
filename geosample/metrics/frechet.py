"""Distances between feature distributions: Frechet distance of Gaussians and KID.

Frechet (FID when the features are Inception-v3 pool features) between N(mu1, S1), N(mu2, S2):

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1 S2, which is similar
to a symmetric PSD matrix M, so one float64 ``eigvalsh`` gives them (round-off negatives clamped
to 0); no complex parts and no ``eps * I`` offset are needed, unlike ``scipy.linalg.sqrtm``:

* S1 positive definite (a reference set larger than d): S1 = L L^T (Cholesky), M = L^T S2 L
  (L^-1 (S1 S2) L = L^T S2 L).  By Sylvester's law of inertia M is PSD exactly when S2 is, so
  M's eigenvalues also check S2.
* otherwise: A = S1^(1/2) from ``eigh``, M = A S2 A (A^-1 M A = S1 S2 when S1 is invertible, and
  by continuity otherwise), and S2 is checked by its own eigenvalues.

KID: the unbiased estimate of MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3,
averaged over random subsets (Binkowski et al. 2018).
"""
from __future__ import annotations

import numpy as np
import torch

from .stats import feature_stats

__all__ = ["fid_from_features", "sqrtm_psd", "trace_sqrt_product", "frechet_distance", "frechet_distances",
           "frechet_distance_to_features", "mmd2_unbiased", "kid"]


#: Relative tolerance for a covariance's negative eigenvalues (round-off of a PSD estimate is
#: ~ d eps |S|; a larger negative one means the matrix is not a covariance).
PSD_RTOL = 1e-9


def _as64(a, name: str, ndim: int) -> torch.Tensor:
    if isinstance(a, torch.Tensor) and a.is_meta:
        raise ValueError(f"{name} is a meta tensor (it has no values)")
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).detach().to("cpu", torch.float64)
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has non-finite values")
    return t


def _check_cov(s: torch.Tensor, name: str) -> torch.Tensor:
    if s.shape[0] != s.shape[1]:
        raise ValueError(f"{name} must be square, got shape {tuple(s.shape)}")
    return 0.5 * (s + s.T)


def _check_psd(evals: torch.Tensor, name: str) -> None:
    """A symmetric matrix's eigenvalues must be >= -PSD_RTOL * max |eigenvalue|."""
    floor = -PSD_RTOL * float(evals.abs().max()) if evals.numel() else 0.0
    if evals.numel() and float(evals.min()) < floor:
        raise ValueError(f"{name} is not positive semi-definite (eigenvalue {float(evals.min()):.6g}); "
                         "a covariance matrix is")


def sqrtm_psd(s) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix [d, d] (float64): V diag(sqrt(max(l, 0))) V^T."""
    return _sqrtm_psd(_check_cov(_as64(s, "matrix", 2), "matrix"), "matrix")


def _sqrtm_psd(s: torch.Tensor, name: str) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh(s)
    _check_psd(evals, name)
    return (evecs * evals.clamp(min=0).sqrt()) @ evecs.T


def _root(s1: torch.Tensor):
    """(R, congruent): R with S1 = R R^T.  The Cholesky factor when S1 is positive definite
    (congruent: M = R^T S2 R), else the symmetric root A = S1^(1/2) (M = A S2 A)."""
    factor, info = torch.linalg.cholesky_ex(s1)
    if int(info) == 0:
        return factor, True
    return _sqrtm_psd(s1, "sigma1"), False


def _trace_sqrt(root, s2) -> float:
    """sum_i sqrt(max(l_i, 0)), l = eig(M), M similar to S1 S2 (``root`` from :func:`_root`)."""
    r, congruent = root
    s2 = _check_cov(_as64(s2, "sigma2", 2), "sigma2")
    if r.shape != s2.shape:
        raise ValueError(f"covariances differ in shape: {tuple(r.shape)} vs {tuple(s2.shape)}")
    m = r.T @ s2 @ r if congruent else r @ s2 @ r
    evals = torch.linalg.eigvalsh(0.5 * (m + m.T))
    _check_psd(evals if congruent else torch.linalg.eigvalsh(s2), "sigma2")
    return float(evals.clamp(min=0).sqrt().sum())


def trace_sqrt_product(s1, s2) -> float:
    """tr((S1 S2)^(1/2)) = sum_i sqrt(max(l_i, 0)), l = eig(M) for M similar to S1 S2 (module doc)."""
    return _trace_sqrt(_root(_check_cov(_as64(s1, "sigma1", 2), "sigma1")), s2)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)); mu [d], sigma [d, d]; float64."""
    return frechet_distances(mu1, sigma1, [(mu2, sigma2)])[0]


def frechet_distances(mu1, sigma1, others) -> list[float]:
    """:func:`frechet_distance` from (mu1, sigma1) to each (mu2, sigma2) of ``others``, with
    S1's factor computed once (a bootstrap scores many sample sets against one reference)."""
    mu1 = _as64(mu1, "mu1", 1)
    s1 = _check_cov(_as64(sigma1, "sigma1", 2), "sigma1")
    if s1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}")
    root = _root(s1)
    out = []
    for mu2, sigma2 in others:
        mu2 = _as64(mu2, "mu2", 1)
        s2 = _check_cov(_as64(sigma2, "sigma2", 2), "sigma2")
        if not (mu1.shape == mu2.shape and s1.shape == s2.shape):
            raise ValueError(f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, "
                             f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}")
        fd = float(((mu1 - mu2) ** 2).sum()) + float(s1.trace() + s2.trace()) - 2 * _trace_sqrt(root, s2)
        out.append(max(fd, 0.0))
    return out


def frechet_distance_to_features(mu1, sigma1, features) -> float:
    """:func:`frechet_distance` from (mu1, sigma1) to the Gaussian statistics of ``features`` [n, d].

    With n <= d the samples' covariance S2 = X^T X / (n - 1) (X: the centred features, [n, d]) has
    rank < n, and the nonzero eigenvalues of S1 S2 are those of the n x n PSD matrix
    X S1 X^T / (n - 1) (AB and BA share them), so the trace term is an n x n eigenproblem and S1
    needs no factorisation (its PSD check is that matrix's).  X's rows sum to zero, so that matrix
    has the eigenvector of ones with eigenvalue exactly 0, its smallest: it is left out, rather than
    let its round-off e enter the trace as sqrt(e).  Larger n: :func:`feature_stats`, then
    :func:`frechet_distance`."""
    f = _as64(features, "features", 2)
    if f.shape[0] > f.shape[1]:
        return frechet_distance(mu1, sigma1, *feature_stats(f))
    mu1 = _as64(mu1, "mu1", 1)
    s1 = _check_cov(_as64(sigma1, "sigma1", 2), "sigma1")
    n, d = f.shape
    if n < 2 or s1.shape != (d, d) or mu1.numel() != d:
        raise ValueError(f"shapes do not match: mu1 {tuple(mu1.shape)}, sigma1 {tuple(s1.shape)}, features {tuple(f.shape)}")
    mu2 = f.mean(0)
    x = f - mu2
    m = x @ s1 @ x.T / (n - 1)
    evals = torch.linalg.eigvalsh(0.5 * (m + m.T))
    _check_psd(evals, "sigma1 seen through the samples")
    fd = float(((mu1 - mu2) ** 2).sum()) + float(s1.trace()) + float((x * x).sum()) / (n - 1) \
        - 2 * float(evals[1:].clamp(min=0).sqrt().sum())
    return max(fd, 0.0)


def fid_from_features(features1, features2) -> float:
    """Frechet distance between the Gaussian statistics of two feature sets [n, d] and [m, d]."""
    return frechet_distance(*feature_stats(features1), *feature_stats(features2))


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 of x [m, d], y [n, d] with k(a, b) = (a.b / d + 1)^3:
    sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (n (n-1)) - 2 mean k(x_i, y_j)."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1) ** 3
    kyy = (y @ y.T / d + 1) ** 3
    kxy = (x @ y.T / d + 1) ** 3
    m, n = x.shape[0], y.shape[0]
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1)) - 2 * kxy.mean())


def kid(features1, features2, num_subsets: int = 100, subset_size: int = 1000,
        generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of :func:`mmd2_unbiased` over ``num_subsets``
    random subsets of ``min(subset_size, m, n)`` rows drawn without replacement from each set.

    features1 [m, d], features2 [n, d] (float64 maths); ``generator`` seeds the subsets."""
    f1, f2 = _as64(features1, "features1", 2), _as64(features2, "features2", 2)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"feature dimensions differ: {f1.shape[1]} vs {f2.shape[1]}")
    size = min(subset_size, f1.shape[0], f2.shape[0])
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {f1.shape[0]} and {f2.shape[0]}")
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be >= 1, got {num_subsets}")
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    vals = torch.tensor([mmd2_unbiased(f1[torch.randperm(f1.shape[0], generator=g)[:size]],
                                       f2[torch.randperm(f2.shape[0], generator=g)[:size]])
                         for _ in range(num_subsets)], dtype=torch.float64)
    std = float(vals.std()) if num_subsets > 1 else 0.0
    return float(vals.mean()), std
