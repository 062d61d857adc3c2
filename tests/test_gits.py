"""GITS: cost matrix vs a per-pair loop, DP vs brute force, search reproducibility, I/O, cache, errors."""
import dataclasses
import itertools
import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import geosample as gs
from geosample.gits.dp import available_backends
from reference_cost import expansion_floor, jump_error_bound, loop_cost


# ----------------------------------------------------------------------------- cost matrix

@pytest.fixture(scope="module")
def mixture():
    g = torch.Generator().manual_seed(0)
    return gs.GaussianMixtureDenoiser(0.5 * torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64), 0.3)


@pytest.fixture(scope="module")
def traj(mixture):
    noise = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return gs.sample(mixture, noise, gs.schedules.polynomial(16), solver="ipndm", return_trajectory=True)


CPU_BACKENDS = gs.gits.cost.available_backends("cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("metric", ["l1", "l2", "dev"])
def test_cost_matrix_matches_pair_loop(traj, metric, backend):
    fast, slow = gs.gits.cost_matrix(traj, metric, backend=backend), loop_cost(traj, metric)
    assert fast.dtype == torch.float64 and fast.shape == (17, 17)
    upper = torch.ones(17, 17, dtype=torch.bool).triu(1)
    assert torch.isinf(fast[~upper]).all() and torch.isfinite(fast[upper]).all()
    # torch's l2 expands |e|^2 through Gram matrices, cpp's dev through dot products (|P r|^2 =
    # r.r - (r.c)^2 / c.c): the error floor is ~ sqrt(eps) |X[i] - X[-1]|
    expanded = (metric, backend) in (("l2", "torch"), ("dev", "cpp"))
    tol = 1e-12 + (3e-7 * expansion_floor(traj)[upper] if expanded else 1e-10 * slow[upper].abs())
    assert ((fast[upper] - slow[upper]).abs() <= tol).all()


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="geosample._C is not built")
@pytest.mark.parametrize("metric", ["l1", "l2", "dev"])
def test_cpp_cost_matrix_on_float32_within_its_rounding_bound(traj, metric):
    t32 = gs.Trajectory(x=traj.x.float(), denoised=traj.denoised.float(), sigmas=traj.sigmas, nfe=traj.nfe)
    fast, slow = gs.gits.cost_matrix(t32, metric, backend="cpp"), loop_cost(t32, metric)
    upper = torch.isfinite(slow)
    # dev works from float64 dot products of the float32 points: float64 rounding only
    bound = jump_error_bound(t32, metric) if metric != "dev" else 3e-7 * expansion_floor(t32)
    assert ((fast[upper] - slow[upper]).abs() <= bound[upper]).all()
    assert (fast[upper] - slow[upper]).abs().max() > 0 or metric == "dev"   # it really ran in float32


@pytest.mark.skipif("cpp" not in CPU_BACKENDS, reason="geosample._C is not built")
def test_cpp_cost_matrix_independent_of_threads_and_sample_groups():
    from geosample._cpp import _C
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 70, 300, generator=g)            # 70 samples: a group of 64 and one of 6
    den, grid = 0.5 * x[:-1], gs.schedules.polynomial(6).numpy()
    for metric in ("l1", "l2", "dev"):
        one = _C.cost_matrix(x.numpy(), den.numpy(), grid, metric, 1)
        assert np.array_equal(one, _C.cost_matrix(x.numpy(), den.numpy(), grid, metric, 3))
        halves = [_C.cost_matrix(x[:, s].numpy(), den[:, s].numpy(), grid, metric, 2)
                  for s in (slice(0, 35), slice(35, 70))]
        up = np.triu_indices(7, 1)
        np.testing.assert_allclose(one[up], ((halves[0] + halves[1]) / 2)[up], rtol=1e-12, atol=1e-12)


def test_cost_matrix_first_step_of_ipndm_is_exact_euler(traj):
    # iPNDM's first step is an Euler step, so jumping 0 -> 1 reproduces x[1]: l1 cost 0, dev cost 0
    assert gs.gits.cost_matrix(traj, "l1")[0, 1] == pytest.approx(0, abs=1e-12)
    assert gs.gits.cost_matrix(traj, "dev")[0, 1] == pytest.approx(0, abs=1e-10)


def test_cost_matrix_float32_trajectory_close_to_float64(traj):
    t32 = gs.Trajectory(x=traj.x.float(), denoised=traj.denoised.float(), sigmas=traj.sigmas, nfe=traj.nfe)
    for metric in ("l2", "dev"):
        a, b = gs.gits.cost_matrix(t32, metric), gs.gits.cost_matrix(traj, metric)
        m = torch.isfinite(b)
        assert torch.allclose(a[m], b[m], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_cost_matrix_rejects_non_finite_results(traj, backend):
    bad = traj.x.clone()
    bad[3, 1, 0, 0, 0] = math.nan
    t = gs.Trajectory(x=bad, denoised=traj.denoised, sigmas=traj.sigmas, nfe=traj.nfe)
    for metric in ("l1", "l2", "dev"):
        with pytest.raises(ValueError, match="non-finite"):
            gs.gits.cost_matrix(t, metric, backend=backend)
    same = traj.x.clone()
    same[-1] = same[0]                                   # no chord to measure deviations from
    t = gs.Trajectory(x=same, denoised=traj.denoised, sigmas=traj.sigmas, nfe=traj.nfe)
    with pytest.raises(ValueError, match="chord"):
        gs.gits.cost_matrix(t, "dev", backend=backend)


def test_cost_matrix_errors(traj):
    with pytest.raises(ValueError, match="unknown metric"):
        gs.gits.cost_matrix(traj, "l3")
    with pytest.raises(ValueError, match="unknown backend"):
        gs.gits.cost_matrix(traj, "l2", backend="cuda")
    if not gs.has_cpp():
        with pytest.raises(ValueError, match="not built"):
            gs.gits.cost_matrix(traj, "l2", backend="cpp")
    with pytest.raises(TypeError, match="Trajectory"):
        gs.gits.cost_matrix(traj.x, "l2")
    bad = gs.Trajectory(x=traj.x, denoised=traj.denoised[:-1], sigmas=traj.sigmas, nfe=1)
    with pytest.raises(ValueError, match="denoised"):
        gs.gits.cost_matrix(bad, "l2")


# ----------------------------------------------------------------------------- dynamic programme

def brute_force(c, steps, gamma):
    n = c.shape[0]
    best = math.inf
    for mid in itertools.combinations(range(1, n - 1), steps - 1):
        path = [0, *mid, n - 1]
        best = min(best, gs.gits.path_cost(c, path, gamma)[0])
    return best


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 8), data=st.data(), gamma=st.floats(0.5, 2.0),
       seed=st.integers(0, 2 ** 31 - 1))
def test_dp_is_optimal_and_backends_agree(n, data, gamma, seed):
    steps = data.draw(st.integers(1, n - 1))
    c = np.random.default_rng(seed).normal(size=(n, n))
    paths = {b: gs.gits.solve_dp(c, steps, gamma, backend=b) for b in available_backends()}
    path = paths["python"]
    assert all(p == path for p in paths.values()), paths
    assert len(path) == steps + 1 and path[0] == 0 and path[-1] == n - 1
    assert all(a < b for a, b in zip(path, path[1:]))
    assert gs.gits.path_cost(c, path, gamma)[0] == pytest.approx(brute_force(c, steps, gamma), rel=1e-12, abs=1e-12)


def test_dp_ties_pick_smallest_index_in_every_backend():
    c = np.zeros((9, 9))
    for b in available_backends():
        assert gs.gits.solve_dp(c, 3, 1.0, backend=b) == [0, 1, 2, 8]


@pytest.mark.parametrize("scale, gamma", [(1e307, 1.15), (1e308, 1.15), (1.7e308, 1.0), (-1e308, 1.15)])
def test_dp_huge_finite_costs_give_the_optimal_path_in_every_backend(scale, gamma):
    """Sums of costs near the top of the double range overflowed to inf: cpp and numba returned -1."""
    c = np.random.default_rng(5).uniform(0.5, 1.0, (8, 8))
    expected = gs.gits.solve_dp(c, 4, gamma, backend="python")
    for b in available_backends():
        assert gs.gits.solve_dp(c * scale, 4, gamma, backend=b) == (expected if scale > 0 else
                                                                   gs.gits.solve_dp(-c, 4, gamma, backend="python"))
        assert gs.gits.solve_dp_sweep(c * scale, 4, gamma, backend=b)[4, gamma] == gs.gits.solve_dp(c * scale, 4, gamma)


def test_dp_overflowing_gamma_still_gives_a_valid_path_in_every_backend():
    c = np.random.default_rng(6).uniform(0.5, 1.0, (8, 8))
    paths = {b: gs.gits.solve_dp(c, 5, 1e200, backend=b) for b in available_backends()}
    assert all(p == paths["python"] for p in paths.values()), paths
    assert paths["python"][0] == 0 and paths["python"][-1] == 7 and all(np.diff(paths["python"]) > 0)


def test_dp_ignores_lower_triangle():
    c = np.random.default_rng(0).random((12, 12))
    noisy = c.copy()
    noisy[np.tril_indices(12)] = np.nan
    for b in available_backends():
        assert gs.gits.solve_dp(noisy, 4, backend=b) == gs.gits.solve_dp(c, 4, backend=b)


def test_dp_sweep_matches_single_solves():
    c = np.random.default_rng(3).random((21, 21))
    out = gs.gits.solve_dp_sweep(c, 6, [0.9, 1.0, 1.15])
    assert set(out) == {(s, g) for s in range(1, 7) for g in (0.9, 1.0, 1.15)}
    for (s, g), path in out.items():
        for b in available_backends():
            assert gs.gits.solve_dp(c, s, g, backend=b) == path
    assert list(gs.gits.solve_dp_sweep(c, [5, 3], 1.0)) == [(3, 1.0), (5, 1.0)]


def test_dp_accepts_torch_cost_with_inf_lower_triangle(traj):
    c = gs.gits.cost_matrix(traj, "dev")
    assert gs.gits.solve_dp(c, 4) == gs.gits.solve_dp(c.numpy(), 4, backend="python")


@pytest.mark.parametrize("cost, steps, gamma, backend, err, match", [
    (np.zeros((5, 5)), 5, 1.0, "auto", ValueError, "steps must be in"),
    (np.zeros((5, 5)), 0, 1.0, "auto", ValueError, "steps must be in"),
    (np.zeros((5, 5)), 2.0, 1.0, "auto", TypeError, "steps must be an int"),
    (np.zeros((5, 4)), 2, 1.0, "auto", ValueError, "square"),
    (np.zeros(5), 2, 1.0, "auto", ValueError, "square"),
    (np.triu(np.full((5, 5), np.nan)), 2, 1.0, "auto", ValueError, "finite"),
    (np.zeros((5, 5)), 2, 0.0, "auto", ValueError, "gamma"),
    (np.zeros((5, 5)), 2, -1.0, "auto", ValueError, "gamma"),
    (np.zeros((5, 5)), 2, math.nan, "auto", ValueError, "gamma"),
    (np.zeros((5, 5)), 2, 1.0, "fortran", ValueError, "unknown backend"),
    ([["a"]], 1, 1.0, "auto", TypeError, "cost"),
])
def test_dp_errors(cost, steps, gamma, backend, err, match):
    with pytest.raises(err, match=match):
        gs.gits.solve_dp(cost, steps, gamma, backend=backend)


# ----------------------------------------------------------------------------- search

class Counting:
    def __init__(self, d):
        self.d, self.calls = d, 0

    def __call__(self, x, sigma):
        self.calls += 1
        return self.d(x, sigma)


SMALL = dict(teacher_steps=20, num_warmup=12, batch_size=5)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "gits"


def test_search_reproducible_and_seeded(mixture, cache_dir):
    a = gs.gits.search(mixture, (3, 4, 4), 4, use_cache=False, **SMALL)
    b = gs.gits.search(mixture, (3, 4, 4), 4, use_cache=False, **SMALL)
    c = gs.gits.search(mixture, (3, 4, 4), 4, seed=1, use_cache=False, **SMALL)
    assert a.indices == b.indices and torch.equal(a.cost_matrix, b.cost_matrix)
    assert not torch.equal(a.cost_matrix, c.cost_matrix)
    assert not cache_dir.exists()
    grid = gs.schedules.polynomial(20)
    assert a.sigmas.dtype == torch.float64 and torch.equal(a.sigmas, grid[a.indices])
    assert a.indices[0] == 0 and a.indices[-1] == 20 and len(a.indices) == 5
    assert a.cost == pytest.approx(gs.gits.path_cost(a.cost_matrix, a.indices, 1.15)[0])
    assert a.params["nfe"] == 4 and a.fingerprint == gs.gits.fingerprint(mixture, (3, 4, 4))
    assert a.gamma == 1.15 and "selected_gamma" not in a.params


def test_search_averages_rounds_over_all_samples(mixture):
    # rounds of 5, 5, 2 weighted by size = one cost matrix over all 12 samples
    s = gs.gits.search(mixture, (3, 4, 4), 3, metric="l2", use_cache=False, **SMALL)
    noise = torch.randn((12, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    traj = gs.sample(mixture, noise, gs.schedules.polynomial(20), solver="ipndm", return_trajectory=True)
    whole = gs.gits.cost_matrix(traj, "l2")
    m = torch.isfinite(whole)
    assert torch.allclose(s.cost_matrix[m], whole[m], rtol=1e-5, atol=1e-6)


def test_save_load_round_trip(mixture, tmp_path):
    s = gs.gits.search(mixture, (3, 4, 4), 3, grid="logsnr", metric="l1", use_cache=False, **SMALL)
    path = tmp_path / "sub" / "s.json"
    s.save(path)
    t = gs.gits.load(path)
    assert t.indices == s.indices and torch.equal(t.sigmas, s.sigmas)
    assert torch.equal(t.cost_matrix, s.cost_matrix) and t.params == s.params and t.grid == s.grid
    assert t.grid["rho"] is None and torch.equal(t.grid_sigmas, gs.schedules.logsnr(20))
    assert json.loads(path.read_text())["params"]["metric"] == "l1"
    assert [p.name for p in path.parent.iterdir()] == ["s.json"]          # no temporary left behind


def test_load_rejects_other_files(tmp_path):
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="format"):
        gs.gits.load(tmp_path / "x.json")


def test_cache_makes_second_search_free(mixture, cache_dir):
    first = Counting(mixture)
    a = gs.gits.search(first, (3, 4, 4), 4, **SMALL)
    again = Counting(mixture)
    b = gs.gits.search(again, (3, 4, 4), 4, **SMALL)
    assert again.calls == 3                                    # only the fingerprint probe
    assert b.indices == a.indices and torch.equal(b.cost_matrix, a.cost_matrix)
    other = Counting(mixture)
    c = gs.gits.search(other, (3, 4, 4), 6, gamma=1.0, **SMALL)   # same teacher: cost matrix reused
    assert other.calls == 3 and len(c.indices) == 7
    assert first.calls > 3 * 20
    assert sorted(p.name.split("-")[0] for p in cache_dir.iterdir()) == ["cost", "schedule", "schedule", "targets"]


def test_cache_key_includes_the_model(mixture, cache_dir):
    gs.gits.search(mixture, (3, 4, 4), 4, **SMALL)
    other = gs.GaussianMixtureDenoiser(mixture.means + 0.1, 0.3)
    counted = Counting(other)
    gs.gits.search(counted, (3, 4, 4), 4, **SMALL)
    assert counted.calls > 3


def test_afs_inserts_a_free_first_step(mixture):
    s = gs.gits.search(mixture, (3, 4, 4), 3, afs=True, use_cache=False, **SMALL)
    dp = gs.gits.solve_dp(s.cost_matrix, 3, 1.15)
    assert len(s.indices) == 5 and s.params["nfe"] == 3 and s.params["afs"]
    assert 0 < s.indices[1] < dp[1] and s.indices[2:] == dp[1:]
    # the inserted point is the best of all candidates on round 0, judged against the teacher
    noise = torch.randn((5, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    grid = gs.schedules.polynomial(20)
    target = gs.sample(mixture, noise, grid, solver="ipndm", afs=True)
    dist = {k: float((gs.sample(mixture, noise, grid[[0, k] + dp[1:]], afs=True) - target).flatten(1)
                     .norm(dim=1).mean()) for k in range(1, dp[1])}
    assert s.indices[1] == min(dist, key=dist.get)


def test_afs_without_room_keeps_the_dp_path(mixture):
    s = gs.gits.search(mixture, (3, 4, 4), 4, afs=True, use_cache=False, **SMALL)
    assert s.indices == gs.gits.solve_dp(s.cost_matrix, 4, 1.15) and s.indices[1] == 1
    assert s.params["nfe"] == 3


def test_gamma_sweep_keeps_the_path_closest_to_the_teacher(mixture, cache_dir):
    gammas = (0.6, 0.8, 1.0, 1.15, 1.5)
    s = gs.gits.search(Counting(mixture), (3, 4, 4), 4, gamma=gammas, solver="euler", **SMALL)
    sel = s.params["selection"]
    assert [r["gamma"] for r in sel] == list(gammas) and s.params["gamma"] == list(gammas)
    # every gamma's DP path, judged by euler's mean L2 distance to the teacher on round 0
    noise = torch.randn((5, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    grid = gs.schedules.polynomial(20)
    target = gs.sample(mixture, noise, grid, solver="ipndm")
    for r in sel:
        assert r["indices"] == r["dp_indices"] == gs.gits.solve_dp(s.cost_matrix, 4, r["gamma"])
        got = gs.sample(mixture, noise, grid[r["indices"]], solver="euler")
        assert r["error"] == pytest.approx(float((got - target).flatten(1).double().norm(dim=1).mean()), rel=1e-6)
    best = min(sel, key=lambda r: r["error"])
    assert s.indices == best["indices"] and s.params["selected_gamma"] == best["gamma"] == s.gamma
    assert s.cost == pytest.approx(gs.gits.path_cost(s.cost_matrix, s.indices, best["gamma"])[0])
    assert len({tuple(r["indices"]) for r in sel}) > 1          # the sweep really offered a choice
    # the teacher's samples are cached with the cost matrix: a new sweep runs no teacher
    again = Counting(mixture)
    t = gs.gits.search(again, (3, 4, 4), 5, gamma=gammas, solver="euler", **SMALL)
    assert again.calls <= 3 + len(gammas) * 5 and t.params["selected_gamma"] in gammas
    assert sorted(p.name.split("-")[0] for p in cache_dir.iterdir()) == ["cost", "schedule", "schedule", "targets"]


def test_gamma_sweep_with_afs_judges_each_insertion(mixture):
    s = gs.gits.search(mixture, (3, 4, 4), 3, gamma=(1.0, 1.15), afs=True, use_cache=False, **SMALL)
    inserted = 0
    for r in s.params["selection"]:
        dp = r["dp_indices"]
        if dp[1] == 1:                                   # no room: judged as it is
            assert r["indices"] == dp
        else:
            assert r["indices"][2:] == dp[1:] and 0 < r["indices"][1] < dp[1]
            inserted += 1
    assert inserted and s.params["nfe"] == 3 and s.indices in [r["indices"] for r in s.params["selection"]]


@pytest.mark.parametrize("gamma, err, match", [((), ValueError, "empty"), ((1.0, -1.0), ValueError, "gamma"),
                                               ("1.0", TypeError, "gamma"), (True, TypeError, "gamma")])
def test_gamma_sweep_errors(mixture, gamma, err, match):
    with pytest.raises(err, match=match):
        gs.gits.search(mixture, (3, 4, 4), 3, gamma=gamma, use_cache=False, **SMALL)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(steps=21), ValueError, "teacher_steps"),
    (dict(metric="l3"), ValueError, "unknown metric"),
    (dict(grid="cosine"), ValueError, "unknown grid"),
    (dict(teacher="rk45"), ValueError, "unknown solver"),
    (dict(gamma=0.0), ValueError, "gamma"),
    (dict(num_warmup=0), ValueError, "num_warmup"),
    (dict(batch_size=1.5), TypeError, "batch_size"),
    (dict(shape=()), ValueError, "shape"),
])
def test_search_errors(mixture, kwargs, err, match):
    args = dict(shape=(3, 4, 4), steps=4, use_cache=False, **SMALL)
    args.update(kwargs)
    with pytest.raises(err, match=match):
        gs.gits.search(mixture, **args)


def _entry(cache_dir, kind):
    (path,) = [p for p in cache_dir.iterdir() if p.name.startswith(kind + "-")]
    return path


def _search_again(mixture, expect_teacher: bool):
    """A cached search after an entry was damaged: a CacheWarning, the right schedule, the entry
    rewritten (a third search reads it silently)."""
    counted = Counting(mixture)
    with pytest.warns(gs.gits.cache.CacheWarning):
        b = gs.gits.search(counted, (3, 4, 4), 4, **SMALL)
    assert (counted.calls > 3 * 20) == expect_teacher
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = Counting(mixture)
        c = gs.gits.search(again, (3, 4, 4), 4, **SMALL)
    assert again.calls == 3 and c.indices == b.indices
    return b


def _flip_byte(path, at):
    blob = bytearray(path.read_bytes())
    blob[at] ^= 0x10
    path.write_bytes(bytes(blob))


@pytest.mark.parametrize("damage", ["random bytes", "empty", "wrong shape", "nan", "bit flip", "bare tensor"])
def test_damaged_cost_entries_are_misses_recomputed_and_rewritten(mixture, cache_dir, damage):
    """Random bytes raised IndexError, a NaN made every later search fail, a bit flip changed the schedule."""
    a = gs.gits.search(Counting(mixture), (3, 4, 4), 4, **SMALL)
    _entry(cache_dir, "schedule").unlink()
    cost, k = _entry(cache_dir, "cost"), _entry(cache_dir, "cost").stem.split("-", 1)[1]
    good = a.cost_matrix
    if damage == "random bytes":
        cost.write_bytes(np.random.default_rng(0).bytes(3000))
    elif damage == "empty":
        cost.write_bytes(b"")
    elif damage == "wrong shape":
        gs.gits.cache.put_tensor("cost", k, torch.zeros(3, 3, dtype=torch.float64))
    elif damage == "nan":
        bad = good.clone()
        bad[0, 5] = math.nan
        gs.gits.cache.put_tensor("cost", k, bad)           # a valid hash: only the finiteness check sees it
    elif damage == "bit flip":
        blob = cost.read_bytes()
        _flip_byte(cost, blob.index(good[0, 5].numpy().tobytes()) + 3)
    else:
        torch.save(good, cost)                             # an entry without key and hash
    b = _search_again(mixture, expect_teacher=True)
    assert b.indices == a.indices and torch.equal(b.cost_matrix, good)


def _forged_schedule(s, **changes):
    d = s.to_dict()
    d.update(changes)
    return gs.gits.GITSSchedule.from_dict(d)


@pytest.mark.parametrize("damage", ["[]", "null", "random bytes", "bad indices", "unsorted indices",
                                    "sigmas off the grid", "nan cost", "bit flip", "plain schedule file"])
def test_damaged_schedule_entries_are_misses_recomputed_and_rewritten(mixture, cache_dir, damage):
    """[] or null raised AttributeError; indices [0, 99, -5, 20] were returned as they were."""
    a = gs.gits.search(Counting(mixture), (3, 4, 4), 4, **SMALL)
    path = _entry(cache_dir, "schedule")
    k = path.stem.split("-", 1)[1]
    if damage in ("[]", "null"):
        path.write_text(damage)
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(1).bytes(500))
    elif damage == "bad indices":
        gs.gits.cache.put_schedule(k, _forged_schedule(a, indices=[0, 99, -5, 20]))
    elif damage == "unsorted indices":
        gs.gits.cache.put_schedule(k, _forged_schedule(a, indices=[0, 9, 4, 12, 20]))
    elif damage == "sigmas off the grid":
        gs.gits.cache.put_schedule(k, _forged_schedule(a, sigmas=(a.sigmas * 1.01).tolist()))
    elif damage == "nan cost":
        gs.gits.cache.put_schedule(k, _forged_schedule(a, cost=math.nan))
    elif damage == "bit flip":
        text = path.read_text()
        at = text.index('"indices"') + 40
        path.write_text(text[:at] + ("7" if text[at] != "7" else "3") + text[at + 1:])
    else:
        a.save(path)
    b = _search_again(mixture, expect_teacher=False)       # the cost entry is intact: no teacher
    assert b.indices == a.indices and torch.equal(b.sigmas, a.sigmas)


def test_unipc_trajectories_are_rejected(mixture):
    noise = torch.randn((4, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    traj = gs.sample(mixture, noise, gs.schedules.polynomial(8), solver="unipc", return_trajectory=True)
    with pytest.raises(ValueError, match="predictor"):
        gs.gits.cost_matrix(traj)
    with pytest.raises(ValueError, match="predictor"):
        gs.gits.search(mixture, (3, 4, 4), 3, teacher="unipc", use_cache=False, **SMALL)


# ----------------------------------------------------------------------------- GITSConfig

def test_config_object_and_keywords_are_one_search(mixture, tmp_path):
    config = gs.gits.GITSConfig(teacher_steps=20, num_warmup=8, batch_size=4, gamma=(1.0, 1.15), solver="euler")
    a = gs.gits.search(mixture, (3, 4, 4), 3, config, use_cache=False)
    b = gs.gits.search(mixture, (3, 4, 4), 3, use_cache=False, teacher_steps=20, num_warmup=8, batch_size=4,
                       gamma=[1.0, 1.15], solver="euler")
    assert a.indices == b.indices and torch.equal(a.cost_matrix, b.cost_matrix) and a.params == b.params
    assert a.config == b.config == config and config.gamma == (1.0, 1.15)
    a.save(tmp_path / "s.json")
    assert gs.gits.load(tmp_path / "s.json").config == config      # saved with the schedule, read back
    c = gs.gits.search(mixture, (3, 4, 4), 3, config, use_cache=False, seed=1)  # keywords replace fields
    assert c.config == dataclasses.replace(config, seed=1) and not torch.equal(c.cost_matrix, a.cost_matrix)


def test_config_is_frozen_and_normalised():
    config = gs.gits.GITSConfig(grid="logsnr", gamma=1, num_warmup=np.int64(8), sigma_max=np.float32(10))
    assert config.rho is None and config.gamma == 1.0 and isinstance(config.gamma, float)
    assert type(config.num_warmup) is int and type(config.sigma_max) is float
    assert torch.equal(config.fine_grid(), gs.schedules.logsnr(60, sigma_max=10.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 3


def test_config_errors(mixture):
    with pytest.raises(TypeError, match="config must be a GITSConfig"):
        gs.gits.search(mixture, (3, 4, 4), 3, "ipndm")         # the old positional teacher
    with pytest.raises(TypeError, match="unknown options warmup"):
        gs.gits.search(mixture, (3, 4, 4), 3, warmup=8)
    with pytest.raises(ValueError, match="unknown grid"):
        gs.gits.GITSConfig(grid="cosine")


def test_cache_keys_unchanged_by_the_config(tmp_path, monkeypatch):
    """Entry names written by the keyword-dict search before GITSConfig (same search, same names):
    caches filled by earlier versions stay hits."""
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path))
    mix = gs.GaussianMixtureDenoiser(torch.tensor([[0.5, -0.5], [-1.0, 0.25]]), torch.tensor([0.3, 0.5]))

    class Fixed:
        def __call__(self, x, s):
            return mix(x, s)

        def fingerprint(self):
            return "fixed-fingerprint"

    kw = dict(teacher_steps=8, num_warmup=4, batch_size=2)
    gs.gits.search(Fixed(), (2,), 3, **kw)
    gs.gits.search(Fixed(), (2,), 3, gamma=(1.0, 1.15), afs=True, grid="logsnr", **kw)
    assert sorted(p.name for p in (tmp_path / "gits").iterdir()) == [
        "cost-75888c92818cf1eb6e7f11be52c5a82a.pt", "cost-8d6b71be4c6a1f5e12e71ed480645e28.pt",
        "schedule-09f050bb5722d0184f71bae3996b18d2.json", "schedule-bcf6a65fdc6f52ff204f785a09379bf5.json",
        "targets-75888c92818cf1eb6e7f11be52c5a82a.pt", "targets-8d6b71be4c6a1f5e12e71ed480645e28.pt"]
