"""geosample.geometry: every measurement against a direct float64 computation (numpy / loops)."""
import json
import math

import numpy as np
import pytest
import torch

import geosample as gs
from geosample import geometry as g


def _rng(seed=0):
    return np.random.default_rng(seed)


def _random_traj(T=9, B=3, shape=(2, 3, 4), seed=0, dtype=torch.float64):
    """A Trajectory with random points, random denoised values and a decreasing grid."""
    r = _rng(seed)
    x = torch.tensor(r.normal(size=(T, B, *shape)), dtype=dtype)
    den = torch.tensor(r.normal(size=(T - 1, B, *shape)), dtype=dtype)
    sig = torch.tensor(np.geomspace(80.0, 0.002, T), dtype=torch.float64)
    return gs.Trajectory(x=x, denoised=den, sigmas=sig, nfe=T - 1)


def _gmm(dim=12, k=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return gs.GaussianMixtureDenoiser(torch.randn(k, dim, generator=gen, dtype=torch.float64) * 0.7, 0.15)


def _gmm_traj(num=6, steps=40, dim=12, seed=0):
    noise = torch.randn(num, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return gs.sample(_gmm(dim), noise, gs.schedules.polynomial(steps), solver="euler", return_trajectory=True)


def _dist_to_line(p, a, c):
    """Distance of point p to the line through a and c, by least squares: min_l |p - a - l (c - a)|."""
    u = c - a
    lam = np.dot(p - a, u) / np.dot(u, u)
    return np.linalg.norm(p - a - lam * u)


@pytest.mark.parametrize("which", ["x", "denoised"])
def test_deviation_matches_direct(which):
    traj = _random_traj()
    pts = (traj.x if which == "x" else traj.denoised).numpy().reshape(traj.x.shape[0] - (which != "x"), 3, -1)
    dev = g.deviation(traj, which)
    assert dev.shape == (3, pts.shape[0]) and dev.dtype == torch.float64
    want = np.array([[_dist_to_line(pts[t, b], pts[0, b], pts[-1, b]) for t in range(pts.shape[0])] for b in range(3)])
    np.testing.assert_allclose(dev.numpy(), want, rtol=1e-12, atol=1e-12)
    assert float(dev[:, [0, -1]].abs().max()) < 1e-12


def test_distance_norms_cosine_match_direct():
    traj = _random_traj()
    X = traj.x.numpy().reshape(9, 3, -1)
    Dn = traj.denoised.numpy().reshape(8, 3, -1)
    s = traj.sigmas.numpy()
    np.testing.assert_allclose(g.distance_to_end(traj).numpy(), np.linalg.norm(X - X[-1], axis=2).T, rtol=1e-13)
    n = g.norms(traj)
    d = (X[:-1] - Dn) / s[:-1, None, None]
    np.testing.assert_allclose(n["x"].numpy(), np.linalg.norm(X, axis=2).T, rtol=1e-13)
    np.testing.assert_allclose(n["denoised"].numpy(), np.linalg.norm(Dn, axis=2).T, rtol=1e-13)
    np.testing.assert_allclose(n["direction"].numpy(), np.linalg.norm(d, axis=2).T, rtol=1e-13)
    v = X[:-1] - X[-1]
    cos = (d * v).sum(2) / (np.linalg.norm(d, axis=2) * np.linalg.norm(v, axis=2))
    np.testing.assert_allclose(g.direction_cosine(traj).numpy(), cos.T, rtol=1e-12)


def test_explained_variance_matches_dxd_pca():
    """Gram-matrix PCA == eigenvalues of the D x D covariance (small D), with and without the chord."""
    traj = _random_traj(T=11, B=2, shape=(7,), seed=3)
    for remove in (True, False):
        curve = g.explained_variance_curve(traj, remove_chord=remove)
        for b in range(2):
            P = traj.x[:, b].numpy()
            if remove:
                u = (P[-1] - P[0]) / np.linalg.norm(P[-1] - P[0])
                P = (P - P[0]) - np.outer((P - P[0]) @ u, u)
            lam = np.sort(np.linalg.eigvalsh(np.cov(P.T, bias=True)))[::-1]
            want = np.cumsum(lam) / lam.sum()
            np.testing.assert_allclose(curve[b, :7].numpy(), want, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(curve[b, 7:].numpy(), 1.0, atol=1e-12)   # rank <= D
        assert torch.equal(g.explained_variance(traj, 2, remove), curve[:, 1])


def test_explained_variance_planar_vs_random():
    """Points in a 3-D affine subspace (chord + 2 directions) of R^40: exactly 1 for k=2; a random walk: < 0.9."""
    r = _rng(4)
    t = np.linspace(0, 1, 30)
    basis = np.linalg.qr(r.normal(size=(40, 3)))[0]
    curve3 = np.stack([t, np.sin(np.pi * t), 0.3 * np.sin(2 * np.pi * t)], 1) @ basis.T + r.normal(size=40)
    walk = np.cumsum(r.normal(size=(30, 40)), 0)
    X = torch.tensor(np.stack([curve3, walk], 1))
    ev = g.explained_variance(X, k=2)
    assert abs(float(ev[0]) - 1.0) < 1e-12
    assert float(ev[1]) < 0.9
    assert float(g.explained_variance(X, k=1)[0]) < 0.999     # the second direction is really there


def test_project_3d_isometry_signs_and_rotation_invariance():
    r = _rng(5)
    t = np.linspace(0, 1, 25)
    local = np.stack([4 * t, np.sin(np.pi * t), 0.2 * np.sin(2 * np.pi * t)], 1)      # a boomerang in 3-D
    basis = np.linalg.qr(r.normal(size=(30, 3)))[0]
    X = torch.tensor((local @ basis.T + r.normal(size=30))[:, None])
    c = g.project_3d(X)[0].numpy()
    P = X[:, 0].numpy()
    np.testing.assert_allclose(np.linalg.norm(c[:, None] - c[None], axis=2),
                               np.linalg.norm(P[:, None] - P[None], axis=2), atol=1e-10)   # an isometry
    np.testing.assert_allclose(c[0], 0, atol=1e-12)
    np.testing.assert_allclose(c[-1], [np.linalg.norm(P[-1] - P[0]), 0, 0], atol=1e-10)
    assert c[:, 1].sum() > 0 and (c[:, 2] * (1 - 2 * np.arange(25) / 24)).sum() > 0
    Q = np.linalg.qr(r.normal(size=(30, 30)))[0]                       # any rotation/reflection of the space
    c2 = g.project_3d(torch.tensor((P @ Q.T + 3.0)[:, None]))[0].numpy()
    np.testing.assert_allclose(c2, c, atol=1e-10)


def test_procrustes_recovers_rotation_and_matches_scipy():
    from scipy.linalg import orthogonal_procrustes

    r = _rng(6)
    Q = r.normal(size=(20, 3))
    R0 = np.linalg.qr(r.normal(size=(3, 3)))[0]
    P = np.stack([Q @ R0.T, r.normal(size=(20, 3))])
    aligned, R = g.procrustes_align(torch.tensor(P), torch.tensor(Q))
    np.testing.assert_allclose(R[0].numpy(), R0, atol=1e-12)
    np.testing.assert_allclose(aligned[0].numpy(), Q, atol=1e-12)
    np.testing.assert_allclose(R[1].numpy(), orthogonal_procrustes(P[1], Q)[0], atol=1e-12)
    np.testing.assert_allclose(R[1].numpy() @ R[1].numpy().T, np.eye(3), atol=1e-12)
    _, Rm = g.procrustes_align(torch.tensor(P))                        # default reference: the mean
    np.testing.assert_allclose(Rm[1].numpy(), orthogonal_procrustes(P[1], P.mean(0))[0], atol=1e-12)


def _helix_errors(step, a=2.0, b=0.5, seed=7):
    """Max relative errors of (kappa, tau) on a helix (a cos u, a sin u, b u) embedded in R^20, uneven grid."""
    r = _rng(seed)
    u = np.cumsum(step * (1 + r.random(int(3 / step))))
    basis = np.linalg.qr(r.normal(size=(20, 3)))[0]
    X = torch.tensor((np.stack([a * np.cos(u), a * np.sin(u), b * u], 1) @ basis.T)[:, None])
    kappa, tau = g.curvature_torsion(X, window=3)
    c2 = a * a + b * b
    return float((kappa / (a / c2) - 1).abs().max()), float((tau / (b / c2) - 1).abs().max())


def test_curvature_torsion_helix_converges():
    """kappa = a/(a^2+b^2), tau = b/(a^2+b^2); the cubic fit's error is O(h^2): halving h divides it by ~4."""
    coarse, fine = _helix_errors(0.02), _helix_errors(0.01)
    assert fine[0] < 2e-3 and fine[1] < 4e-3
    assert coarse[0] / fine[0] > 2.5 and coarse[1] / fine[1] > 2.5    # ~4 for O(h^2), 2 for O(h)


def test_curvature_torsion_circle_and_line():
    r = _rng(8)
    u = np.cumsum(0.01 + 0.01 * r.random(150))
    basis = np.linalg.qr(r.normal(size=(20, 2)))[0]
    circle = np.stack([2 * np.cos(u), 2 * np.sin(u)], 1) @ basis.T
    line = np.outer(u ** 2, r.normal(size=20))                          # straight, unevenly traversed
    kappa, tau = g.curvature_torsion(torch.tensor(np.stack([circle, line], 1)))
    np.testing.assert_allclose(kappa[0].numpy(), 0.5, rtol=2e-3)
    assert float(tau[0].abs().max()) < 1e-3 and float(kappa[1].abs().max()) < 1e-8


def test_trajectory_distance_and_closed_form_gap():
    traj = _random_traj()
    other = _random_traj(seed=9)
    want = np.linalg.norm((traj.x - other.x).numpy().reshape(9, 3, -1), axis=2).T
    np.testing.assert_allclose(g.trajectory_distance(traj, other).numpy(), want, rtol=1e-13)
    noise = torch.randn(4, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = gs.schedules.polynomial(10)
    same = g.closed_form_gap(_gmm(), _gmm(), noise, sig)
    assert float(same["x"].abs().max()) == 0.0 and float(same["relative"].abs().max()) == 0.0
    gap = g.closed_form_gap(_gmm(seed=2), _gmm(), noise, sig)
    a = gs.sample(_gmm(seed=2), noise, sig, solver="euler", return_trajectory=True)
    b = gs.sample(_gmm(), noise, sig, solver="euler", return_trajectory=True)
    np.testing.assert_allclose(gap["x"].numpy(), (a.x - b.x).norm(dim=2).T.numpy(), rtol=1e-12)
    np.testing.assert_allclose(gap["relative"].numpy(),
                               ((a.x - b.x).norm(dim=2) / (b.x - b.x[-1]).norm(dim=2)).T[:, :-1].numpy(), rtol=1e-12)
    assert gap["denoised"].shape == (4, 10)


def test_is_single_bump():
    t = torch.linspace(0, 1, 50, dtype=torch.float64)
    bump = torch.sin(math.pi * t) ** 2
    two = torch.sin(2 * math.pi * t) ** 2
    noisy = bump + 1e-6 * torch.randn(50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert g.is_single_bump(torch.stack([bump, two, noisy])).tolist() == [True, False, True]


def test_real_trajectories_have_the_papers_geometry():
    """Euler on a Gaussian-mixture denoiser: a single bump, >= 99% in 2 chord-orthogonal PCs."""
    traj = _gmm_traj()
    dev = g.deviation(traj)
    assert g.is_single_bump(dev).all()
    assert float(g.explained_variance(traj, 2).min()) >= 0.99
    assert float(g.explained_variance(traj, 1).max()) < 1.0 - 1e-9


def test_bad_input():
    traj = _random_traj()
    with pytest.raises(ValueError, match="which"):
        g.deviation(traj, "eps")
    with pytest.raises(TypeError, match="Trajectory"):
        g.deviation([1, 2])
    with pytest.raises(TypeError, match="sigmas"):
        g.norms(traj.x)
    with pytest.raises(ValueError, match="T >= 2"):
        g.deviation(traj.x[:1])
    with pytest.raises(ValueError, match="k must"):
        g.explained_variance(traj, k=0)
    with pytest.raises(ValueError, match="max_k"):
        g.explained_variance_curve(traj, max_k=100)
    with pytest.raises(ValueError, match="window"):
        g.curvature_torsion(traj, window=1)
    with pytest.raises(ValueError, match="zero-length chord"):
        g.deviation(torch.zeros(5, 2, 3))
    with pytest.raises(ValueError, match="different sigma grids"):
        other = _random_traj()
        other.sigmas = other.sigmas * 2
        g.trajectory_distance(traj, other)
    with pytest.raises(ValueError, match="reference"):
        g.procrustes_align(torch.zeros(2, 5, 3), torch.zeros(4, 3))


def test_analyze_cli_writes_figures_and_json(tmp_path):
    from geosample.cli import main

    out = tmp_path / "ana"
    assert main(["analyze", "--limit", "100", "--num", "4", "--steps", "8", "--out", str(out)]) == 0
    for name in ("boomerang", "explained_variance", "projection_3d", "curvature"):
        blob = (out / f"{name}.png").read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) < 300_000
    d = json.loads((out / "analysis.json").read_text())
    assert len(d["sigmas"]) == 9 and d["num"] == 4
    assert 0.9 < d["explained_variance_top2_chord_removed"]["min"] <= 1.0
    assert len(d["relative_deviation"]["mean"]) == 9 and d["deviation_ends_max_abs"] < 1e-4
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]   # no temporary files left
    from geosample._io import read_run
    assert set(read_run(out)["files"]) == {f"{n}.png" for n in ("boomerang", "explained_variance", "projection_3d",
                                                                 "curvature")} | {"analysis.json"}
    assert read_run(out)["run"] == d["run"]


def test_analyze_cli_on_the_trained_network(tmp_path):
    from geosample.cli import main

    out = tmp_path / "net"
    assert main(["analyze", "--model", "cifar10-tiny", "--num", "4", "--steps", "8", "--dtype", "float32",
                 "--out", str(out)]) == 0
    d = json.loads((out / "analysis.json").read_text())
    assert d["model"] == "cifar10-tiny" and d["data"] is None and len(d["sigmas"]) == 9
    assert 0.5 < d["explained_variance_top2_chord_removed"]["min"] <= 1.0


def test_measure_report_consistent():
    traj = _gmm_traj(num=4, steps=20)
    m = gs.geometry.measure(traj)
    rep = gs.geometry.report(m)
    assert rep["explained_variance_top2_chord_removed"]["min"] == pytest.approx(float(g.explained_variance(traj).min()))
    assert rep["deviation_single_bump_fraction"] == 1.0
    assert rep["shape_correlation_with_mean"]["min"] > 0.9


def test_project_3d_degenerate_components_are_exactly_zero():
    """Three points span one chord-orthogonal direction: PC2 has no variance and must read 0."""
    x = torch.tensor([[[0.0, 0.0, 0.0]], [[1.0, 0.5, 0.0]], [[2.0, 0.0, 0.0]]], dtype=torch.float64)
    traj = gs.Trajectory(x=x, denoised=x[:-1], sigmas=torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), nfe=2)
    c = g.project_3d(traj)
    assert torch.equal(c[0, :, 2], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(c[0, :, 0], torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))


@pytest.mark.parametrize("fn", [g.deviation, g.explained_variance, g.distance_to_end, g.project_3d])
def test_non_finite_or_meta_points_are_refused(fn):
    """A NaN passed through deviation silently and made explained_variance raise LinAlgError."""
    traj = _gmm_traj(num=2, steps=6)
    bad = traj.x.clone()
    bad[3, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite values .* at sample 1, point 3"):
        fn(bad)
    with pytest.raises(ValueError, match="meta tensor"):
        fn(traj.x.to("meta"))


@pytest.mark.parametrize("fn", [g.deviation, g.explained_variance])
def test_points_near_the_double_range_are_refused(fn):
    """sigma ~ 1e308 trajectories overflowed inside eigh (LinAlgError) or returned inf."""
    traj = _gmm_traj(num=2, steps=6)
    with pytest.raises(ValueError, match="overflow"):
        fn(traj.x / traj.x.abs().max() * 1e307)
