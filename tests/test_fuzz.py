"""Property and fuzz tests over the public API: hostile input gets a correct result or a clear
ValueError/TypeError, never a crash, a hang, NaN or a wrong answer.

Derandomized by default (the same examples on every CI run, no example database);
``GEOSAMPLE_FUZZ=explore`` draws fresh random examples, ten times as many, for a local hunt.
"""
import io
import math
import os
import warnings
from contextlib import redirect_stderr
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import geosample as gs
from geosample import _io, cli, data
from geosample.gits import cache
from geosample.gits.dp import available_backends

EXPLORE = os.environ.get("GEOSAMPLE_FUZZ") == "explore"
FUZZ = settings(derandomize=not EXPLORE, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def examples(n: int) -> settings:
    return settings(FUZZ, max_examples=n * (10 if EXPLORE else 1))


def short_error(e: BaseException) -> None:
    """A clear error: one of the documented types, with a message of reasonable length."""
    assert isinstance(e, (ValueError, TypeError)), repr(e)
    assert 0 < len(str(e)) < 600, str(e)[:200]


any_float = st.floats(allow_nan=True, allow_infinity=True, width=64)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
positive = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False)


# ----------------------------------------------------------------------------- schedules

@examples(150)
@given(family=st.sampled_from(["polynomial", "logsnr", "time_uniform"]), steps=st.integers(1, 3000),
       lo=positive, hi=positive, rho=st.floats(0.1, 20))
def test_schedule_families_are_valid_or_refused(family, steps, lo, hi, rho):
    args = (steps, lo, hi) + ((rho,) if family != "logsnr" else ())
    try:
        s = getattr(gs.schedules, family)(*args)
    except ValueError as e:
        short_error(e)
        return
    assert s.dtype == torch.float64 and s.shape == (steps + 1,)
    assert s[0] == hi and s[-1] == lo and bool(torch.isfinite(s).all()) and bool((s[1:] < s[:-1]).all())


@examples(200)
@given(v=st.lists(any_float, min_size=0, max_size=40) | st.lists(finite, min_size=2, max_size=40).map(sorted))
def test_check_sigmas_accepts_exactly_valid_schedules(v):
    valid = (len(v) >= 2 and all(math.isfinite(a) for a in v) and all(a > 0 for a in v[:-1]) and v[-1] >= 0
             and all(b < a for a, b in zip(v, v[1:])))
    try:
        s = gs.schedules.check_sigmas(v)
    except (ValueError, TypeError) as e:
        assert not valid
        short_error(e)
        return
    assert valid and s.tolist() == v


# ----------------------------------------------------------------------------- GITS DP

@st.composite
def cost_problems(draw):
    n = draw(st.integers(2, 9))
    scale = draw(st.sampled_from([1.0, 1e-300, 1e150, 1e300, 1.7e308]))
    c = np.array(draw(st.lists(st.floats(-1, 1), min_size=n * n, max_size=n * n))).reshape(n, n) * scale
    return c, draw(st.integers(1, n - 1)), draw(st.floats(1e-3, 1e3))


@examples(150)
@given(problem=cost_problems())
def test_dp_paths_are_valid_and_backends_agree_at_any_magnitude(problem):
    c, steps, gamma = problem
    paths = {b: gs.gits.solve_dp(c, steps, gamma, backend=b) for b in available_backends()}
    path = paths["python"]
    assert all(p == path for p in paths.values()), paths
    assert len(path) == steps + 1 and path[0] == 0 and path[-1] == c.shape[0] - 1
    assert all(a < b for a, b in zip(path, path[1:]))
    sweep = gs.gits.solve_dp_sweep(c, steps, gamma)
    assert sweep[steps, gamma] == path


@examples(60)
@given(n=st.integers(2, 6), bad=st.sampled_from([math.nan, math.inf, -math.inf]), data_=st.data())
def test_dp_refuses_non_finite_costs(n, bad, data_):
    c = np.zeros((n, n))
    i = data_.draw(st.integers(0, n - 2))
    c[i, data_.draw(st.integers(i + 1, n - 1))] = bad
    with pytest.raises(ValueError, match="finite") as e:
        gs.gits.solve_dp(c, 1)
    short_error(e.value)


# ----------------------------------------------------------------------------- caches

@examples(60)
@given(blob=st.binary(max_size=2000) | st.sampled_from([b"[]", b"null", b"{}", b'{"format": 2}', b"\x80\x04N."]))
def test_any_bytes_in_a_cache_entry_are_a_miss(blob, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    with mock.patch.dict(os.environ, {"GEOSAMPLE_CACHE": str(root)}), warnings.catch_warnings():
        warnings.simplefilter("ignore", cache.CacheWarning)
        cache.cache_dir().mkdir(parents=True)
        (cache.cache_dir() / "cost-k.pt").write_bytes(blob)
        (cache.cache_dir() / "schedule-k.json").write_bytes(blob)
        assert cache.get_tensor("cost", "k", (3, 3), torch.float64) is None
        assert cache.get_schedule("k") is None


@examples(40)
@given(values=st.lists(any_float, min_size=9, max_size=9), shape_ok=st.booleans())
def test_cached_tensors_come_back_only_when_valid(values, shape_ok, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    t = torch.tensor(values, dtype=torch.float64).reshape(3, 3)
    with mock.patch.dict(os.environ, {"GEOSAMPLE_CACHE": str(root)}), warnings.catch_warnings():
        warnings.simplefilter("ignore", cache.CacheWarning)
        cache.put_tensor("cost", "k", t)
        got = cache.get_tensor("cost", "k", (3, 3) if shape_ok else (4, 4), torch.float64)
    upper_finite = bool(torch.isfinite(t[torch.ones(3, 3, dtype=torch.bool).triu(1)]).all())
    if shape_ok and upper_finite:
        assert got is not None and torch.equal(got.nan_to_num(), t.nan_to_num())
    else:
        assert got is None


# ----------------------------------------------------------------------------- files

@examples(40)
@given(blob=st.binary(max_size=3000))
def test_atomic_write_round_trips_and_leaves_no_temp(blob, tmp_path_factory):
    folder = tmp_path_factory.mktemp("out")
    _io.atomic_write(folder / "f.bin", lambda f: f.write(blob))
    assert (folder / "f.bin").read_bytes() == blob and [p.name for p in folder.iterdir()] == ["f.bin"]


@examples(40)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3), cut=st.floats(0, 1), mmap=st.booleans())
def test_npy_files_cut_anywhere_load_whole_or_are_refused(shape, cut, mmap, tmp_path_factory):
    path = tmp_path_factory.mktemp("npy") / "a.npy"
    arr = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    np.save(path, arr)
    size = os.path.getsize(path)
    os.truncate(path, int(cut * size))
    try:
        got = data.load_dataset(path, mmap=mmap)
    except (ValueError, EOFError) as e:
        assert int(cut * size) < size
        assert len(str(e)) < 600
        return
    assert np.array_equal(np.asarray(got), arr)


# ----------------------------------------------------------------------------- geometry and metrics

@examples(60)
@given(T=st.integers(2, 8), B=st.integers(1, 3), D=st.integers(1, 5), seed=st.integers(0, 2 ** 16),
       scale=st.sampled_from([1e-100, 1.0, 1e100]), poison=st.sampled_from([None, math.nan, math.inf]))
def test_geometry_is_finite_or_refused(T, B, D, seed, scale, poison):
    x = torch.randn(T, B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    if poison is not None:
        x[T // 2, 0, 0] = poison
    try:
        dev = gs.geometry.deviation(x)
        ev = gs.geometry.explained_variance(x, k=1) if T >= 3 else None
    except ValueError as e:
        short_error(e)
        assert poison is not None or "chord" in str(e) or "variance" in str(e)
        return
    assert poison is None
    assert bool(torch.isfinite(dev).all()) and bool((dev >= 0).all())
    assert float(dev[:, [0, -1]].abs().max()) <= 1e-9 * float(x.abs().max())
    if ev is not None:
        assert bool(((ev >= 0) & (ev <= 1 + 1e-12)).all())


@examples(60)
@given(d=st.integers(1, 5), seed=st.integers(0, 2 ** 16), symmetric_noise=st.floats(-3, 3))
def test_frechet_distance_is_non_negative_or_refuses_non_covariances(d, seed, symmetric_noise):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    s1 = a @ a.T
    s2 = s1 + symmetric_noise * torch.eye(d, dtype=torch.float64)
    mu = torch.randn(d, generator=g, dtype=torch.float64)
    try:
        fd = gs.metrics.frechet_distance(mu, s1, mu, s2)
    except ValueError as e:
        short_error(e)
        assert float(torch.linalg.eigvalsh(s2).min()) < 0
        return
    assert math.isfinite(fd) and fd >= 0
    assert gs.metrics.frechet_distance(mu, s1, mu, s1) == pytest.approx(0.0, abs=1e-7 * float(s1.trace()) + 1e-12)


# ----------------------------------------------------------------------------- sampling

@examples(40)
@given(solver=st.sampled_from(sorted(gs.SOLVERS)), steps=st.integers(1, 8), seed=st.integers(0, 2 ** 16),
       sigma_max=st.floats(0.5, 200), denoise_to_zero=st.booleans())
def test_sampling_any_valid_schedule_is_finite(solver, steps, seed, sigma_max, denoise_to_zero, gmm, noise):
    sigmas = gs.schedules.polynomial(steps, 0.002, sigma_max)
    if denoise_to_zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    x = gs.sample(gmm, noise, sigmas, solver=solver)
    assert x.shape == noise.shape and x.dtype == noise.dtype and bool(torch.isfinite(x).all())


# ----------------------------------------------------------------------------- command line

words = st.sampled_from(["--solver", "--nfe", "--batch", "--schedule", "--data", "--limit", "--threads", "--seed",
                         "--afs", "--gamma", "foo", "-1", "0", "3", "1e9", "nan", "euler", "heun", "gits", "",
                         "digits", "x.json", "--", "-h"])


@examples(80)
@given(argv=st.lists(words, max_size=6), command=st.sampled_from([[], ["sample"], ["gits"], ["analyze"]]))
def test_cli_never_crashes_on_any_arguments(argv, command, tmp_path_factory):
    """Every invocation ends in exit 0 or 2 with a one-line error; the job itself is stubbed so
    that arguments which pass every check stop at the data loader."""
    out = tmp_path_factory.mktemp("cli")
    stub = mock.patch("geosample.data.load_dataset", side_effect=ValueError("stub: the job would start here"))
    err = io.StringIO()
    with stub, redirect_stderr(err), mock.patch("sys.stdout", new_callable=io.StringIO):
        try:
            rc = cli.main([*command, *argv, "--out", str(out / ("s.json" if command == ["gits"] else "o"))])
        except SystemExit as e:                     # argparse: usage errors (2) and --help (0)
            rc = e.code
    assert rc in (0, 2), (argv, rc)
    if rc == 2:
        last = err.getvalue().strip().splitlines()[-1]
        assert ": error: " in last and "Traceback" not in err.getvalue()
        assert len(last) < 600

