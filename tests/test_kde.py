"""KDEDenoiser against the float64 reference, invariants, bad input, and gs.sample end to end."""
import math
import os

import numpy as np
import pytest
import torch

import geosample as gs
from geosample.denoisers.kde import KDEDenoiser

SIGMAS = [80.0, 10.0, 1.0, 0.05, 0.002]


def rel_err(a, b):
    a, b = a.double().flatten(1), b.double().flatten(1)
    return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()


def tol(sigma):
    return 1e-4 if sigma >= 1 else 2e-5


@pytest.fixture(scope="module")
def data():
    """600 random points in [-1, 1]^(3x4x4) plus a cluster of 8 near-duplicates of point 7."""
    g = torch.Generator().manual_seed(0)
    y = torch.rand(600, 3, 4, 4, generator=g) * 2 - 1
    y[100:108] = y[7] + 1e-4 * torch.randn(8, 3, 4, 4, generator=g)
    return y


def queries(y, sigma, b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = y[torch.randint(0, y.shape[0], (b,), generator=g)] + sigma * torch.randn(b, *y.shape[1:], generator=g)
    x[0] = y[7] + sigma * torch.randn(*y.shape[1:], generator=g)   # lands among the near-duplicates
    return x


@pytest.mark.parametrize("storage", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("sigma", SIGMAS)
def test_cpu_matches_reference(data, sigma, storage):
    cpu = KDEDenoiser(data, backend="cpu", chunk_size=128, storage=storage)
    ref = KDEDenoiser(data, backend="reference", storage=storage)
    x = queries(data, sigma)
    out, st = cpu(x, sigma, return_stats=True)
    r, rs = ref(x.double(), sigma, return_stats=True)
    assert rel_err(out, r) <= tol(sigma)
    assert torch.allclose(st.log_z, rs.log_z, rtol=1e-9, atol=1e-6 * max(1.0, sigma ** -2))
    assert torch.allclose(st.ess, rs.ess, rtol=1e-4)
    assert torch.equal(st.argmax, rs.argmax)


def test_reference_matches_direct_softmax(data):
    """The reference itself against the formula, written out in float64."""
    y = data.double().flatten(1)
    x = queries(data, 1.0).double()
    w = torch.softmax(-torch.cdist(x.flatten(1), y) ** 2 / 2, dim=1)
    out, st = KDEDenoiser(data, backend="reference")(x, 1.0, return_stats=True)
    assert torch.allclose(out.flatten(1), w @ y, atol=1e-12)
    assert torch.allclose(st.ess, 1 / (w ** 2).sum(1), rtol=1e-10)
    logits = (x.flatten(1) @ y.T - 0.5 * (y ** 2).sum(1))
    assert torch.allclose(st.log_z, torch.logsumexp(logits, 1), rtol=1e-12)


def test_per_sample_sigma_and_dtype(data):
    kde = KDEDenoiser(data, backend="cpu")
    x = queries(data, 1.0, b=3).double()
    sig = torch.tensor([80.0, 1.0, 0.002])
    out = kde(x, sig)
    assert out.dtype == torch.float64 and out.shape == x.shape
    for i in range(3):
        assert rel_err(out[i:i + 1], kde(x[i:i + 1], float(sig[i]))) < 1e-6


def test_fast_precision_error_is_bounded(data):
    x = queries(data, 1.0)
    fast = KDEDenoiser(data, backend="cpu", precision="fast")(x, 1.0)
    ref = KDEDenoiser(data, backend="reference")(x.double(), 1.0)
    assert rel_err(fast, ref) < 0.1


def test_invariants(data):
    kde = KDEDenoiser(data, backend="cpu", chunk_size=64)
    x = queries(data, 0.5)
    base = kde(x, 0.5)
    perm = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(3))
    assert rel_err(KDEDenoiser(data[perm], backend="cpu")(x, 0.5), base) < 1e-5
    shift = torch.full_like(data[0], 0.3)
    assert rel_err(KDEDenoiser(data + shift, backend="cpu")(x + shift, 0.5) - shift, base) < 1e-5
    for c in (1, 7, 1000):
        assert rel_err(KDEDenoiser(data, backend="cpu", chunk_size=c)(x, 0.5), base) < 1e-5
    mean = data.double().mean(0)
    assert torch.allclose(kde(x, 1e6).double(), mean.expand_as(x), atol=1e-5)
    y = data[:50].clone()
    y[20] = y[3] + 1e-3
    nearest = torch.cdist(x.flatten(1)[:, None], y.flatten(1)[None]).squeeze(1).argmin(1)
    assert torch.allclose(KDEDenoiser(y, backend="cpu")(x, 1e-4), y[nearest], atol=1e-6)


def test_duplicates_add_weight():
    y = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    x = torch.tensor([[0.5, 0.0]])
    assert torch.allclose(KDEDenoiser(y)(x, 0.5), torch.tensor([[0.5, 0.0]]))
    dup = KDEDenoiser(torch.cat([y, y[1:]]))(x, 0.5)
    assert torch.allclose(dup, torch.tensor([[2 / 3, 0.0]]), atol=1e-6)


def test_far_queries_small_sigma_finite(data):
    x = torch.full((2, *data.shape[1:]), 50.0)
    x[1] = -50.0
    out, st = KDEDenoiser(data, backend="cpu")(x, 0.002, return_stats=True)
    ref = KDEDenoiser(data, backend="reference")(x.double(), 0.002)
    assert torch.isfinite(out).all() and torch.isfinite(st.log_z).all()
    assert rel_err(out, ref) < 2e-5


def test_tiny_batch_thread_split(data):
    kde = KDEDenoiser(data, backend="cpu", chunk_size=64, threads=2)
    x = queries(data, 0.05, b=2)
    assert rel_err(kde(x, 0.05), KDEDenoiser(data, backend="reference")(x.double(), 0.05)) < 2e-5


def test_memmap_streamed(tmp_path, data):
    path = tmp_path / "y.npy"
    np.save(path, data.numpy())
    mm = np.load(path, mmap_mode="r")
    kde = KDEDenoiser(mm, backend="cpu", chunk_size=100)
    assert kde.store.mmap and kde.store.data is mm
    x = queries(data, 0.05)
    assert rel_err(kde(x, 0.05), KDEDenoiser(data, backend="reference")(x.double(), 0.05)) < 2e-5


@pytest.mark.parametrize("bad, err", [
    (lambda y: KDEDenoiser(torch.full((3, 2), math.nan)), ValueError),
    (lambda y: KDEDenoiser(torch.empty(0, 4)), ValueError),
    (lambda y: KDEDenoiser([[1.0, 2.0]]), TypeError),
    (lambda y: KDEDenoiser(y, backend="gpu"), ValueError),
    (lambda y: KDEDenoiser(y)(torch.zeros(2, 5), 1.0), ValueError),
    (lambda y: KDEDenoiser(y)(torch.zeros(2, 3, 4, 4), 0.0), ValueError),
    (lambda y: KDEDenoiser(y)(torch.zeros(2, 3, 4, 4), -1.0), ValueError),
    (lambda y: KDEDenoiser(y)(torch.zeros(2, 3, 4, 4), torch.ones(3)), ValueError),
    (lambda y: KDEDenoiser(y)(torch.zeros(2, 3, 4, 4, dtype=torch.long), 1.0), TypeError),
])
def test_bad_input(data, bad, err):
    with pytest.raises(err):
        bad(data)


def test_sample_end_to_end_on_digits():
    y = gs.data.load_dataset("digits")
    kde = gs.KDEDenoiser(y)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = gs.sample(kde, noise, gs.schedules.polynomial(10), solver="ipndm")
    assert x.shape == noise.shape and torch.isfinite(x).all()
    nearest = y[torch.cdist(x.flatten(1), y.flatten(1)).argmin(1)]
    assert torch.allclose(kde(x, 0.002), nearest, atol=1e-5)   # at sigma_min it returns training images


@pytest.mark.parametrize("kind", ["tensor", "numpy", "indexed"])
def test_in_place_edits_of_the_callers_data_do_not_leak_in(kind):
    """The denoiser owns a copy of in-memory rows: editing the caller's tensor or array afterwards
    (y[:250] += 3) leaves it the denoiser of the data it was built on (it kept a reference and
    cached means and norms of the old rows: results matched neither)."""
    g = torch.Generator().manual_seed(3)
    y = torch.rand(600, 3, 4, 4, generator=g) * 2 - 1
    before = y.clone()
    data = y.numpy() if kind == "numpy" else y
    kde = KDEDenoiser(data, backend="cpu", index=dict(cache=False) if kind == "indexed" else False)
    data[:250] += 3
    ref = KDEDenoiser(before, backend="reference")
    for sigma in SIGMAS:
        x = queries(before, sigma)
        assert rel_err(kde(x, sigma), ref(x.double(), sigma)) <= tol(sigma), sigma


def test_a_memmap_whose_file_changes_is_refused(tmp_path):
    """A memmap is read in place: a file rewritten after the denoiser was built is an error, not a mix."""
    path = tmp_path / "y.npy"
    np.save(path, np.random.default_rng(0).random((200, 8), dtype=np.float32))
    os.utime(path, ns=(0, 0))
    kde = KDEDenoiser(np.load(path, mmap_mode="r"))
    x = torch.zeros(2, 8)
    kde(x, 1.0)
    rows = np.load(path, mmap_mode="r+")
    rows[:100] += 3
    rows.flush()
    with pytest.raises(ValueError, match="changed"):
        kde(x, 1.0)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_memmap_whose_file_is_deleted_or_replaced_keeps_its_rows(tmp_path, how):
    """The mapping keeps the old rows when the file is unlinked or renamed over (a new inode): the
    denoiser stays right (before: FileNotFoundError / a refusal); an in-place rewrite is refused above."""
    path = tmp_path / "y.npy"
    y = np.random.default_rng(0).random((200, 8), dtype=np.float32)
    np.save(path, y)
    kde = KDEDenoiser(np.load(path, mmap_mode="r"))
    x = torch.zeros(2, 8)
    before = kde(x, 1.0)
    if how == "deleted":
        os.unlink(path)
    else:
        np.save(tmp_path / "z.npy", y + 3)
        os.replace(tmp_path / "z.npy", path)
    torch.testing.assert_close(kde(x, 1.0), before, rtol=0, atol=0)
