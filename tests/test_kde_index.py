"""The KDE index: its bound is a true lower bound, indexed results equal the float64 softmax, the
fallback takes over where sets are large, and the cache never serves another dataset's index."""
import math

import numpy as np
import pytest
import torch

from geosample.denoisers.kde import KDEDenoiser, Query, reference
from geosample.denoisers.kde_index import INDEXED, IndexCacheWarning, KDEIndex


def clustered(n=3000, d=48, k=12, spread=0.05, offset=0.0, seed=0):
    """Rows around k centres (a concentrated posterior at small sigma), optionally far from 0."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g, dtype=torch.float64)
    rows = centres[torch.randint(0, k, (n,), generator=g)] + spread * torch.randn(n, d, generator=g, dtype=torch.float64)
    return (rows + offset).float()


def near_data(y, b, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(y), (b,), generator=g)
    return y[idx].double() + sigma * torch.randn(b, y.shape[1], generator=g, dtype=torch.float64)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm(dim=1) / b.norm(dim=1).clamp(min=1e-300)).max().item()


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("far", [0.0, 50.0])
@pytest.mark.parametrize("rank", [8, 48])
def test_lower_bound_holds_for_every_row(offset, far, rank):
    y = clustered(offset=offset)                                  # D = 48: rank 48 spans every direction
    kd = KDEDenoiser(y, index=dict(cache=False, rank=rank))
    x = near_data(y, 8, 0.1) + far
    q = Query.prepare(kd.store, x, torch.ones(8, dtype=torch.float64))
    lb = kd.index._lower_bounds(kd.index._query_cols(kd.store, q), 0, kd.store.n).double()
    d2 = torch.cdist(x, kd.store.gather64(torch.arange(kd.store.n)), compute_mode="donot_use_mm_for_euclid_dist") ** 2
    assert bool((lb <= d2).all()), (lb - d2).max().item()
    assert (lb / d2).median() > 0.5        # and a useful one: most of the distance is seen


@pytest.mark.parametrize("storage", ["float16", "uint8"])
def test_lower_bound_holds_with_reduced_precision_matmuls(storage):
    """float16 / uint8 rows, and float32 matmuls allowed to round (the bound then takes float64)."""
    y = clustered(d=64, spread=0.3)
    kw = dict(storage="uint8", scale=6 / 255, offset=-3.0) if storage == "uint8" else dict(storage="float16")
    kd = KDEDenoiser(y.clamp(-3, 3), index=dict(cache=False, rank=16), **kw)
    x = near_data(kd.store.gather64(torch.arange(kd.store.n)), 8, 0.5)
    q = Query.prepare(kd.store, x, torch.ones(8, dtype=torch.float64))
    d2 = torch.cdist(x, kd.store.gather64(torch.arange(kd.store.n)), compute_mode="donot_use_mm_for_euclid_dist") ** 2
    before = torch.get_float32_matmul_precision()
    try:
        for precision in ("highest", "medium"):
            torch.set_float32_matmul_precision(precision)
            lb = kd.index._lower_bounds(kd.index._query_cols(kd.store, q), 0, kd.store.n).double()
            assert bool((lb <= d2).all()), (precision, (lb - d2).max().item())
    finally:
        torch.set_float32_matmul_precision(before)


def test_global_threshold_from_other_shards():
    """reduce_min (a shard's collective) that reports a nearer row elsewhere: at small sigma every
    local row is negligible, so no row is evaluated: D = 0, log_mass = -inf, path INDEXED."""
    y = clustered(n=500, d=16)
    kd = KDEDenoiser(y, index=dict(cache=False, rank=8, n_total=1000, reduce_min=torch.zeros_like))
    x = near_data(y, 4, 0.01) + 0.5
    out, st = kd(x, 0.01, return_stats=True)
    assert bool((st.path == INDEXED).all()) and bool(torch.isneginf(st.log_mass).all())
    assert bool((out == 0).all())


@pytest.mark.parametrize("storage", ["float32", "uint8"])
@pytest.mark.parametrize("sigma", [1e-4, 0.003, 0.02])
def test_indexed_equals_float64_softmax(storage, sigma):
    y = clustered(spread=0.05)
    if storage == "uint8":
        y = ((y.clamp(-3, 3) + 3) * 40).round().to(torch.uint8)
    kd = KDEDenoiser(y, index=dict(cache=False), scale=None if storage == "float32" else 1 / 40,
                     offset=None if storage == "float32" else -3.0)
    x = near_data(kd.store.gather64(torch.arange(kd.store.n)), 16, sigma)
    out, st = kd(x, sigma, return_stats=True)
    ref, _ = reference(kd.store, x, torch.full((16,), sigma ** -2, dtype=torch.float64))
    assert bool((st.path == INDEXED).all())
    assert rel(out, ref) < 1e-12


def test_large_sets_take_the_full_pass_and_stay_exact():
    y = clustered()
    kd = KDEDenoiser(y, index=dict(cache=False, max_fraction=0.05))
    x = near_data(y, 6, 0.0)
    sigma = torch.tensor([0.01, 0.01, 0.01, 30.0, 30.0, 30.0], dtype=torch.float64)
    out, st = kd(x, sigma, return_stats=True)
    assert st.path[:3].tolist() == [INDEXED] * 3
    assert INDEXED not in st.path[3:].tolist()
    ref, _ = reference(kd.store, x, sigma ** -2)
    assert rel(out, ref) < 1e-6
    plain = KDEDenoiser(y)(x, sigma)
    assert rel(out, plain) < 1e-6          # the full pass of a sub-batch: within its own bound


def test_index_matches_the_unindexed_denoiser_along_a_schedule():
    y = clustered(n=2000, d=32)
    with_index, without = KDEDenoiser(y, index=dict(cache=False)), KDEDenoiser(y)
    x = near_data(y, 8, 0.0)
    for sigma in [80.0, 5.0, 1.0, 0.3, 0.05, 0.002]:
        xs = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        ref, _ = reference(with_index.store, xs, torch.full((8,), sigma ** -2, dtype=torch.float64))
        assert rel(with_index(xs, sigma), ref) < 1e-6, sigma
        assert rel(with_index(xs, sigma), without(xs, sigma)) < 1e-6, sigma


def test_cache_hits_misses_and_corruption(tmp_path, monkeypatch):
    y = clustered(n=1500, d=16)
    kd = KDEDenoiser(y)
    first = KDEIndex.build(kd.store, cache=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    monkeypatch.setattr(KDEIndex, "_compute", staticmethod(lambda *a: pytest.fail("rebuilt on a hit")))
    hit = KDEIndex.build(kd.store, cache=tmp_path)
    assert torch.equal(hit.vecs, first.vecs) and torch.equal(hit.basis, first.basis)
    monkeypatch.undo()

    y2 = y.clone()
    y2[0] += 1.0                                                         # another dataset, same shape
    assert KDEIndex.key(KDEDenoiser(y2).store, 32, 256, 4096, 0) != KDEIndex.key(kd.store, 32, 256, 4096, 0)
    assert KDEIndex.key(kd.store, 16, 256, 4096, 0) != KDEIndex.key(kd.store, 32, 256, 4096, 0)

    raw = bytearray(files[0].read_bytes())
    raw[len(raw) // 2] ^= 0xFF                                           # a flipped byte
    files[0].write_bytes(bytes(raw))
    with pytest.warns(IndexCacheWarning):
        rebuilt = KDEIndex.build(kd.store, cache=tmp_path)
    assert torch.equal(rebuilt.vecs, first.vecs)
    KDEIndex.build(kd.store, cache=tmp_path)                            # the rewritten file is valid again


def test_memmap_data(tmp_path):
    y = ((clustered(n=2000, d=24).clamp(-3, 3) + 3) * 40).round().to(torch.uint8).numpy()
    path = tmp_path / "rows.npy"
    np.save(path, y)
    mm = np.load(path, mmap_mode="r")
    kd = KDEDenoiser(mm, index=dict(cache=False), scale=1 / 40, offset=-3.0)
    x = near_data(kd.store.gather64(torch.arange(kd.store.n)), 4, 0.01)
    out, st = kd(x, 0.01, return_stats=True)
    ref, _ = reference(kd.store, x, torch.full((4,), 1e4, dtype=torch.float64))
    assert bool((st.path == INDEXED).all()) and rel(out, ref) < 1e-12


def test_build_is_seeded():
    kd = KDEDenoiser(clustered(n=1000, d=16))
    a, b = KDEIndex.build(kd.store, cache=False, seed=3), KDEIndex.build(kd.store, cache=False, seed=3)
    assert torch.equal(a.vecs, b.vecs)
    assert torch.allclose(a.basis.T @ a.basis, torch.eye(a.rank, dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("options, word", [
    (dict(rank=0), "rank"), (dict(sample=True), "sample"), (dict(tol=0.0), "tol"), (dict(tol=1.5), "tol"),
    (dict(max_fraction=0.0), "max_fraction"), (dict(max_fraction=math.nan), "max_fraction"),
    (dict(n_total=10), "n_total"), (dict(n_total=1e6), "n_total"), (dict(probe=0), "probe"),
    (dict(probe=1.5), "probe"), (dict(probe=True), "probe"), (dict(seed=None), "seed"), (dict(seed=1.5), "seed")])
def test_bad_options(options, word):
    with pytest.raises(ValueError, match=word):
        KDEDenoiser(clustered(n=200, d=8), index=dict(cache=False, **options))


def test_cache_key_sees_an_edited_row_outside_the_sampled_ones(tmp_path):
    """Editing one row that the key's 64 seeded rows miss is another dataset: no stale index."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(30, 48, generator=g)
    y = centres[torch.randint(0, 30, (3000,), generator=g)] + 0.05 * torch.randn(3000, 48, generator=g)
    KDEDenoiser(y, index=dict(cache=tmp_path, rank=48))
    y2 = y.clone()
    y2[1] = centres[0] + 0.05 * torch.randn(48, generator=g)              # row 1: not a sampled row
    kd = KDEDenoiser(y2, index=dict(cache=tmp_path, rank=48))
    x = y2[1:2].double() + 0.001 * torch.randn(1, 48, generator=g, dtype=torch.float64)
    out, st = kd(x, 0.003, return_stats=True)
    assert rel(out, reference(kd.store, x, torch.full((1,), 0.003 ** -2, dtype=torch.float64))[0]) < 1e-12
    assert st.argmax.tolist() == [1] and len(list(tmp_path.glob("*.npz"))) == 2


def test_queries_and_data_outside_float32_range():
    """|x - c|^2 beyond float32 (the bound's GEMM would overflow to +inf and drop every row: the
    full pass takes the query), data near 1e18 (the build's float32 sketch), and data near 1e-22
    (float32 subnormal products and thresholds): all equal the float64 softmax."""
    y = clustered(n=600, d=48)
    x = y[:4].double() + 2.2e18
    kd = KDEDenoiser(y, index=dict(cache=False, rank=8))
    out, st = kd(x, 1.0, return_stats=True)
    assert rel(out, KDEDenoiser(y, backend="reference")(x, 1.0)) < 1e-12 and not bool((st.path == INDEXED).any())
    for scale, sigma in ((1e18, 1e15), (1e-22, 1e-24)):
        ys = (clustered(n=600, d=48, k=30).double() * scale).float()
        kd, ref = KDEDenoiser(ys, index=dict(cache=False, rank=8)), KDEDenoiser(ys, backend="reference")
        x = near_data(ys, 16, sigma)
        out, st = kd(x, sigma, return_stats=True)
        assert rel(out, ref(x, sigma)) < 1e-12, scale


@pytest.mark.parametrize("offset", [1e2, 1e4, 1e6])
def test_far_from_origin_data_keep_tight_sets(offset):
    """The build centres the stored rows before its float32 GEMM: a mean far from the origin does
    not widen the margins (offset 100 gave sets of a whole 100-row cluster before)."""
    y = clustered(n=3000, d=48, k=30, spread=0.05, offset=offset)
    kd = KDEDenoiser(y, index=dict(cache=False, rank=16))
    x = near_data(kd.store.gather64(torch.arange(kd.store.n)), 16, 0.003)
    q = Query.prepare(kd.store, x, torch.full((16,), 0.003, dtype=torch.float64) ** -2)
    _, cols, _ = kd.index.certify(kd.store, q, 2 * math.log(3000 / 1e-12) / q.inv_s2)
    assert torch.bincount(cols, minlength=16).median() <= 2
    out, st = kd(x, 0.003, return_stats=True)
    assert bool((st.path == INDEXED).all()) and rel(out, reference(kd.store, x, q.inv_s2)[0]) < 1e-12


def signed_pairs(n=3000, d=48, seed=0):
    """Rows in +/- pairs of multiples of 1/64: the float64 mean is exactly 0 and every norm exact,
    whatever the row order (what a key built from the mean and the norms cannot tell apart)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randint(-40, 41, (20, d), generator=g)
    half = centres[torch.randint(0, 20, (n // 2,), generator=g)] + torch.randint(-2, 3, (n // 2, d), generator=g)
    return torch.cat([half, -half]).float() / 64


def unsampled_rows(n, count):
    """Rows the old key (64 seeded rows, the first and the last) did not read."""
    seen = set(np.random.default_rng(12345).integers(0, n, 64).tolist()) | {0, n - 1}
    return [i for i in range(1, n - 1) if i not in seen][:count]


@pytest.mark.parametrize("edit", ["swap_equal_norms", "replace_pair"])
def test_cache_key_covers_every_byte(tmp_path, edit):
    """Swapping two rows of equal norm, or replacing a pair (v, -v) by (u, -u) with |u| = |v|, keeps
    the mean and every norm: the key must still change (it loaded the old index: D off by ~1)."""
    y = signed_pairs()
    n = len(y)
    i, j = unsampled_rows(n // 2, 2)
    y[i] = y[i].flip(0)                                                 # |y_i| = |y_j|, another row
    y[n // 2 + i] = -y[i]
    y[j] = y[i].roll(5)
    y[n // 2 + j] = -y[j]
    KDEDenoiser(y, index=dict(cache=tmp_path, rank=48))
    y2 = y.clone()
    if edit == "swap_equal_norms":
        y2[[i, j]] = y[[j, i]]
        y2[[n // 2 + i, n // 2 + j]] = y[[n // 2 + j, n // 2 + i]]
    else:
        u = y[i].roll(11)
        y2[i], y2[n // 2 + i] = u, -u
    kd = KDEDenoiser(y2, index=dict(cache=tmp_path, rank=48))
    x = y2[i:i + 1].double() + 1e-3
    out, st = kd(x, 0.003, return_stats=True)
    assert rel(out, reference(kd.store, x, torch.full((1,), 0.003 ** -2, dtype=torch.float64))[0]) < 1e-12
    assert len(list(tmp_path.glob("*.npz"))) == 2


@pytest.mark.parametrize("bad", ["cache_is_a_file", "entry_is_a_folder", "read_only"])
def test_unwritable_cache_warns_and_keeps_the_index(tmp_path, monkeypatch, bad):
    """GEOSAMPLE_CACHE naming a regular file, a cache entry that is a folder, a folder that refuses
    writes: the index is built, used, and the cache skipped with a warning (never a traceback)."""
    y = clustered(n=800, d=16)
    root = tmp_path / "cache"
    if bad == "cache_is_a_file":
        root.write_text("not a folder")
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(root))
    kd = KDEDenoiser(y)
    if bad == "entry_is_a_folder":
        (root / "kde_index" / f"{KDEIndex.key(kd.store, 128, 256, 4096, 0)}.npz").mkdir(parents=True)
    if bad == "read_only":
        import geosample.denoisers.kde_index as kde_index

        def refuse(path, write):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr(kde_index, "atomic_write", refuse)
    with pytest.warns(IndexCacheWarning, match="cache"):
        index = KDEIndex.build(kd.store)
    kd.index = index
    x = near_data(y, 4, 0.003)
    out, st = kd(x, 0.003, return_stats=True)
    assert bool((st.path == INDEXED).all())
    assert rel(out, reference(kd.store, x, torch.full((4,), 0.003 ** -2, dtype=torch.float64))[0]) < 1e-12


@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("far", [0.0, 50.0])
@pytest.mark.parametrize("storage", ["float32", "float16", "uint8"])
def test_fine_bound_holds_for_every_row_and_is_tighter(offset, far, storage):
    """The fine level (rank 40 over a coarse rank 8; its extra coordinates in float16) is a true
    lower bound on every row, and sees more of the distance than the coarse one."""
    y = clustered(d=48, spread=0.3, offset=offset)
    kw = dict(storage="uint8", scale=(y.max() - y.min()).item() / 255, offset=y.min().item()) if storage == "uint8" \
        else dict(storage=storage)
    kd = KDEDenoiser(y, index=dict(cache=False, rank=8, fine_rank=40), **kw)
    assert kd.index.fine is not None and kd.index.fine_rank == 40
    rows = kd.store.gather64(torch.arange(kd.store.n))
    x = near_data(rows, 8, 0.3) + far
    q = Query.prepare(kd.store, x, torch.ones(8, dtype=torch.float64))
    d2 = torch.cdist(x, rows, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    coarse = kd.index._lower_bounds(kd.index._query_cols(kd.store, q), 0, kd.store.n).double()
    fine = kd.index._fine_bounds(kd.index._query_cols(kd.store, q, 40), torch.arange(kd.store.n)).double()
    assert bool((fine <= d2).all()), (fine - d2).max().item()
    assert (fine / d2).median() > (coarse / d2).median()


def test_fine_level_shrinks_sets_and_stays_exact(tmp_path):
    """Sets certified with the fine level are subsets of the coarse ones (here much smaller), the
    results equal the float64 softmax, and the fine arrays survive the cache."""
    y = clustered(n=3000, d=64, k=30, spread=0.2)
    coarse = KDEDenoiser(y, index=dict(cache=False, rank=8, fine_rank=8))
    both = KDEDenoiser(y, index=dict(cache=tmp_path, rank=8, fine_rank=48))
    assert coarse.index.fine is None and both.index.fine is not None
    x = near_data(y, 16, 0.05)
    q = Query.prepare(both.store, x, torch.full((16,), 0.05 ** -2, dtype=torch.float64))
    gap = 2 * math.log(3000 / 1e-12) / q.inv_s2
    sets = [torch.bincount(ix.certify(ix_kd.store, q, gap)[1], minlength=16)
            for ix_kd, ix in ((coarse, coarse.index), (both, both.index))]
    assert bool((sets[1] <= sets[0]).all()) and sets[1].sum() < sets[0].sum() / 2, sets
    out, st = both(x, 0.05, return_stats=True)
    assert bool((st.path == INDEXED).all()) and rel(out, reference(both.store, x, q.inv_s2)[0]) < 1e-12
    again = KDEDenoiser(y, index=dict(cache=tmp_path, rank=8, fine_rank=48)).index
    assert again.cached and torch.equal(again.fine, both.index.fine) and torch.equal(again.fine_cols, both.index.fine_cols)
    assert again.report()["bytes"] == both.index.nbytes == 3000 * (4 * 15 + 2 * 40 + 12) + 64 * 48 * 8


def test_auto_index_is_built_at_the_first_small_sigma(monkeypatch, tmp_path):
    """index="auto": none for small stores; for large ones (INDEX_AUTO_N, lowered here) built at
    the first call with sigma <= 2 sigma_data, then used; index=False refuses it."""
    import geosample.denoisers.kde as kde_module
    y = clustered(n=2000, d=300, k=20, spread=0.05)
    assert KDEDenoiser(y).index is None and KDEDenoiser(y)._index_options is None       # 2000 < INDEX_AUTO_N
    monkeypatch.setattr(kde_module, "INDEX_AUTO_N", 1000)
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path))
    kd, off = KDEDenoiser(y), KDEDenoiser(y, index=False)
    assert off._index_options is None
    x = near_data(y, 4, 0.01)
    big = 10 * kd.index_below
    kd(x, big)
    assert kd.index is None                                                   # large sigma: not yet
    out, st = kd(x, 0.01, return_stats=True)
    assert kd.index is not None and bool((st.path == INDEXED).all())
    assert kd.index.report()["hit_rate"] == 1.0 and kd.index.report()["build_s"] > 0
    assert rel(out, off(x, 0.01)) < 1e-12


def test_a_large_build_shows_progress(monkeypatch, tmp_path, capsys):
    """An automatic build runs inside a denoiser call (tens of seconds at 10^6 rows): a bar from
    PROGRESS_ROWS rows (lowered here), none below."""
    import geosample.denoisers.kde_index as index_module
    y = clustered(n=2000, d=300, k=20, spread=0.05)
    KDEIndex.build(KDEDenoiser(y, index=False).store, cache=False)
    assert "kde index" not in capsys.readouterr().err
    monkeypatch.setattr(index_module, "PROGRESS_ROWS", 1000)
    KDEIndex.build(KDEDenoiser(y, index=False).store, cache=False)
    assert "kde index (2,000 rows)" in capsys.readouterr().err


def test_rank_follows_the_data():
    """Rows on a 10-dimensional subspace get a rank-10 index (no fine level, 4 * 17 bytes a row),
    exact all the same; full-rank rows get the default ranks 128 / 256."""
    g = torch.Generator().manual_seed(9)
    low = (torch.randn(3000, 10, generator=g) @ torch.randn(10, 400, generator=g)).float()
    kd = KDEDenoiser(low, index=dict(cache=False))
    assert (kd.index.rank, kd.index.fine_rank, kd.index.fine) == (10, 10, None)
    x = near_data(low, 4, 0.01)
    out, st = kd(x, 0.01, return_stats=True)
    assert bool((st.path == INDEXED).all()) and rel(out, reference(kd.store, x, torch.full((4,), 1e4, dtype=torch.float64))[0]) < 1e-12
    full = KDEDenoiser(torch.rand(3000, 400, generator=g), index=dict(cache=False)).index
    assert (full.rank, full.fine_rank) == (128, 256)


def test_data_without_spread_and_unused_auto_index(monkeypatch):
    """One row (sigma_data = 0) divided by zero in the index's sigma test; "auto" built an index for
    precision="fast" and the reference backend, which never use it."""
    import geosample.denoisers.kde as kde_module
    y = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    out = KDEDenoiser(y, index=dict(cache=False))(torch.randn(3, 16), 0.5)
    torch.testing.assert_close(out, y.expand(3, -1))
    monkeypatch.setattr(kde_module, "INDEX_AUTO_N", 100)
    big = clustered(n=400, d=300, k=4)
    assert KDEDenoiser(big)._index_options is not None
    assert KDEDenoiser(big, precision="fast")._index_options is None
    assert KDEDenoiser(big, backend="reference")._index_options is None
