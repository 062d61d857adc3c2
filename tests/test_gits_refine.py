"""GITS refinement: coordinate descent on the student solver's own error to the teacher."""
import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st

import geosample as gs
from geosample.gits.refine import coordinate_descent
from test_gits import Counting  # tests/ is on sys.path, as for triton_script

SMALL = dict(teacher_steps=20, num_warmup=12, batch_size=6)
SHAPE = (3, 4, 4)


@pytest.fixture(scope="module")
def mixture():
    g = torch.Generator().manual_seed(0)
    return gs.GaussianMixtureDenoiser(0.5 * torch.randn(5, *SHAPE, generator=g, dtype=torch.float64), 0.3)


def _is_local_minimum(error, path) -> bool:
    """No single +-1 move of an interior point lowers the error."""
    for k, step in itertools.product(range(1, len(path) - 1), (-1, 1)):
        if path[k - 1] < path[k] + step < path[k + 1]:
            if error(path[:k] + [path[k] + step] + path[k + 1:]) < error(path):
                return False
    return True


def test_descent_finds_the_minimum_of_a_separable_convex_error():
    target = [0, 3, 9, 14, 20]
    error = lambda p: sum((a - b) ** 2 for a, b in zip(p, target))  # noqa: E731
    path, seen = coordinate_descent(error, [0, 1, 2, 3, 20])
    assert path == target and seen[tuple(target)] == 0
    assert seen[(0, 1, 2, 3, 20)] == error([0, 1, 2, 3, 20])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.integers(3, 6))
def test_descent_ends_at_a_local_minimum_never_worse_than_the_start(seed, steps):
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(steps + 1, 16, generator=g, dtype=torch.float64)
    error = lambda p: float(sum(table[k, i] for k, i in enumerate(p)))  # noqa: E731
    start = [0] + sorted(torch.randperm(14, generator=g)[:steps - 1].add(1).tolist()) + [15]
    calls = []
    path, seen = coordinate_descent(lambda p: calls.append(tuple(p)) or error(p), start)
    assert path[0] == 0 and path[-1] == 15 and len(path) == len(start)
    assert all(a < b for a, b in zip(path[:-1], path[1:]))
    assert error(path) <= error(start) and seen[tuple(path)] == error(path)
    assert _is_local_minimum(error, path)
    assert len(calls) == len(set(calls)) == len(seen)                # each path evaluated once


def test_descent_never_moves_to_a_nan_error():
    error = lambda p: float("nan") if p[1] != 5 else 1.0  # noqa: E731
    assert coordinate_descent(error, [0, 5, 9])[0] == [0, 5, 9]
    path, seen = coordinate_descent(lambda p: float("nan"), [0, 5, 9])
    assert path == [0, 5, 9] and seen[(0, 5, 9)] == float("inf") and len(seen) == 3


@pytest.mark.parametrize("error, indices, err, match", [
    (None, [0, 1, 2], TypeError, "error must be callable"),
    (len, [0, "a", 2], TypeError, "sequence of ints"),
    (len, 5, TypeError, "sequence of ints"),
    (len, [0], ValueError, "at least 2"),
    (len, [0, 2, 2, 4], ValueError, "strictly increasing"),
    (len, [-1, 2, 4], ValueError, "strictly increasing"),
])
def test_descent_errors(error, indices, err, match):
    with pytest.raises(err, match=match):
        coordinate_descent(error, indices)


def _warmup(denoiser, afs=False):
    """The search's warm-up noise (rounds of 6, seed 0) and the 20-step iPNDM teacher's samples."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.cat([torch.randn((6, *SHAPE), generator=gen) for _ in range(2)])
    return noise, gs.sample(denoiser, noise, gs.schedules.polynomial(20), solver="ipndm", afs=afs)


def _pooled_error(denoiser, sigmas, half, solver="ipndm", afs=False):
    """Pooled RMSE of ``solver`` on ``sigmas`` to the teacher on the fit (0) or check (1) half."""
    noise, target = _warmup(denoiser, afs)
    x = gs.sample(denoiser, noise[half::2], sigmas, solver=solver, afs=afs)
    return float((x - target[half::2]).double().pow(2).mean().sqrt())


@pytest.mark.parametrize("solver, gamma, steps", [("ipndm", 1.15, 3), ("euler", 1.15, 4), ("dpmpp", 1.15, 5),
                                                  ("ipndm", (0.8, 1.0, 1.15), 3), ("heun", (1.0, 1.15), 2)])
def test_recommended_search_judges_refines_and_checks(mixture, solver, gamma, steps):
    dp = gs.gits.search(mixture, SHAPE, steps, solver=solver, gamma=gamma, use_cache=False, **SMALL)
    s = gs.gits.search(mixture, SHAPE, steps, solver=solver, gamma=gamma, refine=True, use_cache=False, **SMALL)
    grid, p = s.grid_sigmas, s.params
    assert s.params["refine"] and "refine" not in dp.params and torch.equal(s.sigmas, grid[s.indices])
    # R: the fine grid plus every hand-made schedule's points, each hand-made schedule a candidate on it
    for name in gs.gits.config.HANDMADE:
        hm = gs.schedules.by_name(name, steps)
        cand = next(c for c in p["candidates"] if c["name"] == name)
        torch.testing.assert_close(grid[cand["indices"]], hm, rtol=1e-12, atol=0)
    assert set(gs.schedules.polynomial(20).tolist()) <= set(grid.tolist())
    # every candidate's error is the solver's pooled RMSE to the teacher on the fit half
    for c in p["candidates"]:
        assert c["error"] == pytest.approx(_pooled_error(mixture, grid[c["indices"]], 0, solver), rel=1e-9)
    gammas = [gamma] if isinstance(gamma, float) else list(gamma)
    dp_paths = {tuple(gs.gits.solve_dp(dp.cost_matrix, steps, g)) for g in gammas}
    assert {tuple(c["indices"]) for c in p["candidates"] if c["name"].startswith("gamma")} == \
        {tuple(grid.tolist().index(float(v)) for v in dp.grid_sigmas[list(q)]) for q in dp_paths}
    # refinement from the best DP path and the best hand-made one: never worse on the fit half
    assert [r["from"] for r in p["refinement"]][0].startswith("gamma")
    for r in p["refinement"]:
        assert r["error"] <= r["error_from"] and r["paths"] >= 1
        assert r["error"] == pytest.approx(_pooled_error(mixture, grid[r["indices"]], 0, solver), rel=1e-9)
    # the pick, on the check half no step before used: a refined path only if clearly better
    for c in p["check"]:
        assert c["error"] == pytest.approx(_pooled_error(mixture, grid[c["indices"]], 1, solver), rel=1e-9)
    hm, refined = p["check"][-1], min(p["check"][:-1], key=lambda c: c["error"])
    assert hm["name"] in gs.gits.config.HANDMADE
    assert p["check_margin"] == gs.gits.config.CHECK_MARGIN and p["refine_paths"] == 6
    want = refined if refined["error"] < hm["error"] * (1 - p["check_margin"]) else hm
    assert s.indices == want["indices"] and p["selected"] == want["name"]
    assert p["nfe"] == dp.params["nfe"] and p["samples"] == {"fit": 6, "check": 6}
    assert set(p["calls"]) == {"teacher", "candidates", "refinement", "check"} and p["calls"]["teacher"] == 12 * 20
    assert torch.equal(s.cost_matrix, dp.cost_matrix)


def test_refined_path_is_a_local_minimum_unless_the_budget_ran_out(mixture):
    s = gs.gits.search(mixture, SHAPE, 4, solver="euler", refine=True, use_cache=False, **SMALL)
    grid = s.grid_sigmas
    for r in s.params["refinement"]:
        fit = lambda q: _pooled_error(mixture, grid[q], 0, "euler")  # noqa: E731
        budget = s.params["refine_paths"] * 3
        assert r["paths"] <= budget and (r["paths"] == budget or _is_local_minimum(fit, r["indices"]))


def test_a_hand_made_schedule_comes_back_exactly_when_no_path_beats_it(mixture, monkeypatch):
    """With a margin no refined path can clear, the best hand-made schedule (on the fit half) is the
    result, with its exact sigmas (points of R, not snapped to the fine grid)."""
    import importlib
    monkeypatch.setattr(importlib.import_module("geosample.gits.config"), "CHECK_MARGIN", 0.999)
    s = gs.gits.search(mixture, SHAPE, 4, solver="ipndm", refine=True, use_cache=False, **SMALL)
    fit_best = min((c for c in s.params["candidates"] if c["name"] in gs.gits.config.HANDMADE),
                   key=lambda c: c["error"])
    assert s.params["selected"] == fit_best["name"] == s.params["check"][-1]["name"]
    torch.testing.assert_close(s.sigmas, gs.schedules.by_name(fit_best["name"], 4), rtol=1e-12, atol=0)


def test_refined_gaussian_schedule_also_helps_on_new_noise():
    """On a closed-form Gaussian (float64) the refined grid is closer to the teacher on noise the
    search never saw, too."""
    g = torch.Generator().manual_seed(3)
    data = torch.randn(200, 8, generator=g, dtype=torch.float64) * torch.linspace(0.05, 1.5, 8, dtype=torch.float64)
    gauss = gs.denoisers.GaussianDenoiser.fit(data)
    kw = dict(teacher_steps=40, num_warmup=64, batch_size=64, use_cache=False)
    dp = gs.gits.search(gauss, (8,), 4, **kw)
    s = gs.gits.search(gauss, (8,), 4, refine=True, **kw)
    assert s.indices != dp.indices
    noise = torch.randn(256, 8, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    exact = gauss.flow(80.0 * noise, 80.0, 0.002)
    err = {k: float((gs.sample(gauss, noise, v.sigmas) - exact).norm(dim=1).mean()) for k, v in
           (("dp", dp), ("refined", s))}
    assert err["refined"] < err["dp"]


def test_refine_with_afs_keeps_the_free_first_step(mixture):
    s = gs.gits.search(mixture, SHAPE, 3, afs=True, refine=True, use_cache=False, **SMALL)
    assert len(s.indices) == 5 and s.params["nfe"] == 3
    best = min(s.params["check"], key=lambda c: c["error"])
    assert best["error"] == pytest.approx(_pooled_error(mixture, s.grid_sigmas[best["indices"]], 1, afs=True),
                                          rel=1e-9)
    assert all(len(c["indices"]) == 5 for c in s.params["candidates"])


def test_refine_is_part_of_the_config_and_the_cache_key(mixture, tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path))
    plain = gs.gits.search(mixture, SHAPE, 4, **SMALL)
    counted = Counting(mixture)
    refined = gs.gits.search(counted, SHAPE, 4, refine=True, **SMALL)
    assert counted.calls > 3                         # not the plain search's cache entry (the teacher is)
    assert refined.config == gs.gits.GITSConfig(refine=True, **SMALL) and not plain.config.refine
    again = Counting(mixture)
    assert gs.gits.search(again, SHAPE, 4, refine=True, **SMALL).indices == refined.indices and again.calls == 3
    refined.save(tmp_path / "s.json")
    assert gs.gits.load(tmp_path / "s.json").config.refine


@pytest.mark.parametrize("value", [1, "yes", None])
def test_refine_must_be_a_bool(value):
    with pytest.raises(TypeError, match="refine must be a bool"):
        gs.gits.GITSConfig(refine=value)


def test_the_recommended_search_defaults_to_64_warm_up_samples(mixture):
    assert gs.gits.GITSConfig(refine=True).num_warmup == 64 and gs.gits.GITSConfig().num_warmup == 256
    s = gs.gits.search(mixture, SHAPE, 2, refine=True, teacher_steps=6, use_cache=False)
    assert s.params["num_warmup"] == 64 and s.params["samples"] == {"fit": 32, "check": 32}
    assert s.params["calls"]["teacher"] == 64 * 6


def test_every_phase_shows_progress_and_an_estimate_first(mixture, capsys):
    gs.gits.search(mixture, SHAPE, 3, refine=True, progress=True, use_cache=False, **SMALL)
    err = capsys.readouterr().err
    first = err.index("gits: a 3-step schedule for ipndm")
    assert first < err.index("gits teacher") < err.index("gits candidates") < err.index("gits refine") < \
        err.index("gits check")
    assert "gits: the teacher took" in err and "judging paths takes at most about" in err
    gs.gits.search(mixture, SHAPE, 3, refine=True, progress=False, use_cache=False, **SMALL)
    assert capsys.readouterr().err == ""


def test_refine_paths_is_a_knob_in_the_cache_key(mixture, tmp_path, monkeypatch):
    """A cached schedule searched with another refinement budget must not be served."""
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path))
    a = gs.gits.search(mixture, SHAPE, 4, refine=True, refine_paths=1, **SMALL)
    b = gs.gits.search(mixture, SHAPE, 4, refine=True, refine_paths=6, **SMALL)
    assert all(r["paths"] <= 3 for r in a.params["refinement"]) and a.params["refine_paths"] == 1
    assert b.params["refine_paths"] == 6 and b.config.refine_paths == 6 and a.config.refine_paths == 1
    with pytest.raises(ValueError, match="refine_paths must be >= 1"):
        gs.gits.GITSConfig(refine_paths=0)
