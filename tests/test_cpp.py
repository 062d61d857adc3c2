"""The compiled core geosample._C against the Python reference (float64 maths, float32 sampling)."""
import math
import os

import numpy as np
import pytest
import torch

import geosample as gs
from geosample import schedules
from geosample._cpp import _C
from geosample.solvers.adams import deis_tab_coefficients, ipndm_coefficients, ipndm_v_coefficients
from geosample.solvers.exponential import dpmpp_coefficients, step_order, unipc_coefficients

if not gs.has_cpp():
    if os.environ.get("CI") and os.environ.get("GEOSAMPLE_NO_CPP", "") in ("", "0"):
        pytest.fail(f"CI must test the C++ extension, but {gs.__file__} has none", pytrace=False)
    pytest.skip("geosample._C is not built", allow_module_level=True)


def close(a, b, rel=1e-12):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("steps", [1, 2, 5, 18, 60])
@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0])
@pytest.mark.parametrize("lo,hi", [(0.002, 80.0), (0.03, 14.6)])
def test_schedules_match_python(steps, rho, lo, hi):
    close(_C.polynomial(steps, lo, hi, rho), schedules.polynomial(steps, lo, hi, rho))
    close(_C.time_uniform(steps, lo, hi, rho), schedules.time_uniform(steps, lo, hi, rho))
    close(_C.logsnr(steps, lo, hi), schedules.logsnr(steps, lo, hi))
    assert _C.polynomial(steps, lo, hi, rho)[0] == hi and _C.polynomial(steps, lo, hi, rho)[-1] == lo


@pytest.mark.parametrize("args", [(0, 0.002, 80.0, 7.0), (5, 0.0, 80.0, 7.0), (5, 80.0, 80.0, 7.0),
                                  (5, 0.002, 80.0, 0.0), (5, 0.002, math.nan, 7.0)])
def test_schedules_reject_bad_input(args):
    with pytest.raises(ValueError):
        _C.polynomial(*args)


def python_dp(cost, steps, gamma):
    """V[i][1] = C[i][n-1]; V[j][k] = min_{j<m<n-1} C[j][m] + gamma V[m][k-1]; smallest argmin."""
    n = len(cost)
    V = {(i, 1): (cost[i][n - 1], n - 1) for i in range(n - 1)}
    for k in range(2, steps + 1):
        for j in range(n - k):
            V[j, k] = min((cost[j][m] + gamma * V[m, k - 1][0], m) for m in range(j + 1, n - k + 1))
    path = [0]
    for k in range(steps, 0, -1):
        path.append(V[path[-1], k][1])
    return path


@pytest.mark.parametrize("seed", range(4))
def test_solve_dp_matches_python(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 25))
    cost = rng.random((n, n)) * 3 - 1  # signed, like the "dev" metric
    if seed == 3:
        cost = np.round(cost)  # many ties: the smallest m wins
    gamma = float(rng.uniform(0.5, 2.0))
    all_paths = _C.solve_dp_all(cost, n - 1, gamma)
    for steps in range(1, n):
        want = python_dp(cost.tolist(), steps, gamma)
        assert _C.solve_dp(cost, steps, gamma) == want
        assert all_paths[steps - 1] == want


def test_solve_dp_rejects_bad_input():
    cost = np.zeros((5, 5))
    for bad in [dict(steps=0), dict(steps=5), dict(gamma=0.0), dict(gamma=math.inf)]:
        with pytest.raises(ValueError):
            _C.solve_dp(cost, bad.get("steps", 2), bad.get("gamma", 1.0))
    cost[0, 3] = math.nan
    with pytest.raises(ValueError, match="finite"):
        _C.solve_dp(cost, 2, 1.0)
    with pytest.raises(ValueError, match="square"):
        _C.solve_dp(np.zeros((3, 4)), 1, 1.0)


def random_grid(rng, n):
    """n strictly decreasing sigmas in [0.002, 80] with random log spacing."""
    return sorted(np.exp(rng.uniform(math.log(0.002), math.log(80.0), n)).tolist(), reverse=True)


@pytest.mark.parametrize("seed", range(3))
def test_coefficients_match_python(seed):
    rng = np.random.default_rng(seed)
    s = random_grid(rng, 12)
    for i in range(len(s) - 1):
        for order in range(1, min(i + 1, 4) + 1):
            close(_C.ipndm_coefficients(s, i, order), ipndm_coefficients(s, i, order))
            close(_C.ipndm_v_coefficients(s, i, order), ipndm_v_coefficients(s, i, order))
        for order in range(1, min(i + 1, 3) + 1):
            close(_C.dpmpp_coefficients(s, i, order), dpmpp_coefficients(s, i, order))
            for variant in ("bh1", "bh2"):
                for got, want in zip(_C.unipc_coefficients(s, i, order, variant),
                                     unipc_coefficients(s, i, order, variant)):
                    close(got, want)
    for max_order in range(1, 5):
        got, want = _C.deis_tab_coefficients(s, max_order), deis_tab_coefficients(s, max_order)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            close(g, w, rel=1e-11)
    for steps in range(1, 8):
        for i in range(steps):
            for lof in (True, False):
                assert _C.step_order(i, steps, 3, lof) == step_order(i, steps, 3, lof)


def test_gauss_legendre_matches_numpy():
    x, w = _C.gauss_legendre(64)
    xn, wn = np.polynomial.legendre.leggauss(64)
    close(x, xn, rel=1e-14)
    close(w, wn, rel=1e-14)


@pytest.mark.parametrize("solver", sorted(gs.SOLVERS))
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("final_zero", [False, True])
def test_sample_matches_python(solver, afs, final_zero, gmm, noise):
    sigmas = schedules.polynomial(7).tolist() + ([0.0] if final_zero else [])
    traj = gs.sample(gmm, noise, sigmas, solver, afs=afs, return_trajectory=True)
    B = noise.shape[0]

    def denoiser(x, sigma):
        x = torch.from_numpy(x).to(torch.float64)
        return gmm(x, torch.full((B,), sigma, dtype=torch.float64)).to(torch.float32).numpy()

    x, nfe = _C.sample(denoiser, noise.to(torch.float32).numpy(), sigmas, solver, afs=afs)
    assert x.shape == tuple(noise.shape) and x.dtype == np.float32
    np.testing.assert_allclose(x, traj.x[-1].numpy(), rtol=0, atol=2e-5 * float(traj.x[-1].abs().max()))
    assert nfe == traj.nfe == gs.nfe(solver, len(sigmas) - 1, afs=afs, denoise_to_zero=final_zero)


@pytest.mark.parametrize("options", [dict(max_order=2), dict(max_order=1, lower_order_final=False)])
@pytest.mark.parametrize("solver", ["ipndm", "ipndm_v", "deis", "dpmpp", "unipc"])
def test_sample_options_match_python(solver, options, gmm, noise):
    sigmas = schedules.logsnr(6).tolist()
    opts = dict(options)
    if solver.startswith("ipndm") or solver == "deis":
        opts.pop("lower_order_final", None)
    want = gs.sample(gmm, noise, sigmas, solver, **opts)
    x, _ = _C.sample(lambda x, s: gmm(torch.from_numpy(x), torch.full((x.shape[0],), s)).numpy(),
                     noise.float().numpy(), sigmas, solver, **opts)
    np.testing.assert_allclose(x, want.numpy(), rtol=0, atol=2e-5 * float(want.abs().max()))


def test_sample_rejects_bad_input(gmm, noise):
    d = lambda x, s: x  # noqa: E731
    x = noise.float().numpy()
    with pytest.raises(ValueError, match="unknown solver"):
        _C.sample(d, x, [1.0, 0.5], "nope")
    with pytest.raises(ValueError, match="decreasing"):
        _C.sample(d, x, [0.5, 1.0], "euler")
    with pytest.raises(ValueError, match="max_order"):
        _C.sample(d, x, [1.0, 0.5], "dpmpp", max_order=4)
    with pytest.raises(ValueError, match="elements"):
        _C.sample(lambda x, s: x[:1], x, [1.0, 0.5], "euler")
