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


def _student_error(denoiser, path, solver="ipndm", seed=0, n=6, afs=False):
    """Mean L2 distance of ``solver`` on polynomial(20)[path] to the 20-step iPNDM teacher, from
    round 0's noise (float32, as the search draws it)."""
    noise = torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(seed))
    grid = gs.schedules.polynomial(20)
    target = gs.sample(denoiser, noise, grid, solver="ipndm", afs=afs)
    x = gs.sample(denoiser, noise, grid[path], solver=solver, afs=afs)
    return float((x - target).flatten(1).double().norm(dim=1).mean())


@pytest.mark.parametrize("solver, gamma, steps", [("ipndm", 1.15, 3), ("euler", 1.15, 4), ("dpmpp", 1.15, 5),
                                                  ("ipndm", (0.8, 1.0, 1.15), 3)])
def test_refined_schedule_is_closer_to_the_teacher_than_the_dp_path(mixture, solver, gamma, steps):
    dp = gs.gits.search(mixture, SHAPE, steps, solver=solver, gamma=gamma, use_cache=False, **SMALL)
    s = gs.gits.search(mixture, SHAPE, steps, solver=solver, gamma=gamma, refine=True, use_cache=False, **SMALL)
    rec = s.params["refinement"]
    assert rec["from"] == dp.indices and s.params["refine"] and "refine" not in dp.params
    assert s.indices[0] == 0 and s.indices[-1] == 20 and len(s.indices) == steps + 1
    assert torch.equal(s.sigmas, gs.schedules.polynomial(20)[s.indices]) and s.params["nfe"] == dp.params["nfe"]
    # the recorded errors are the solver's own, recomputed here on round 0's noise
    before, after = _student_error(mixture, dp.indices, solver), _student_error(mixture, s.indices, solver)
    assert rec["error_from"] == pytest.approx(before, rel=1e-9) and rec["error"] == pytest.approx(after, rel=1e-9)
    assert after < before                            # these DP paths are not local minima of the solver's error
    assert rec["samples"] == 6 and rec["nfe"] == rec["paths"] * dp.params["nfe"] and rec["paths"] >= 1
    assert _is_local_minimum(lambda p: _student_error(mixture, p, solver), s.indices)
    # the DP part (cost matrix, its path and cost) is the reference search's
    assert torch.equal(s.cost_matrix, dp.cost_matrix) and s.cost == dp.cost and s.gamma == dp.gamma


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
    assert s.params["refinement"]["error"] == pytest.approx(_student_error(mixture, s.indices, afs=True), rel=1e-9)


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
