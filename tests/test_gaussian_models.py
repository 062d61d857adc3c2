"""GaussianDenoiser / LowRankMixtureDenoiser against dense float64 formulas and the RK4 ODE solve."""
import math

import pytest
import torch

import geosample as gs
from geosample.denoisers import GaussianDenoiser, GaussianMixtureDenoiser, LowRankMixtureDenoiser
from geosample.denoisers.gaussian import solve_flow


def _data(n=40, shape=(2, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    d = math.prod(shape)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.linspace(0.05, 1.0, d, dtype=torch.float64)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T + 0.3).reshape(n, *shape)


def _dense_cov(model):
    u, lam = model.eigvecs, model.eigvals
    eye = torch.eye(model.dim, dtype=torch.float64)
    return u @ torch.diag(lam) @ u.T + (0.0 if model.full else model.floor * (eye - u @ u.T))


def _dense_denoise(mean, cov, x, sigma):
    """mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu), rows of x flat."""
    a = cov + sigma ** 2 * torch.eye(cov.shape[0], dtype=torch.float64)
    return mean + torch.linalg.solve(a, (x - mean).T).T @ cov  # Sigma symmetric, (A^-1 z)^T Sigma = (Sigma A^-1 z)^T


@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("sigma", [0.01, 0.7, 30.0])
def test_gaussian_matches_dense_formula(rank, sigma):
    data = _data()
    model = GaussianDenoiser.fit(data, rank=rank)
    x = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = _dense_denoise(model.mean, _dense_cov(model), x.reshape(5, -1), sigma)
    torch.testing.assert_close(model(x, sigma).reshape(5, -1), want, rtol=1e-10, atol=1e-12)


def test_fit_full_is_the_sample_covariance_and_low_rank_floor_is_the_mean_rest():
    data = _data()
    flat = data.reshape(len(data), -1)
    full = GaussianDenoiser.fit(data)
    torch.testing.assert_close(_dense_cov(full), torch.cov(flat.T, correction=0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(full.mean, flat.mean(0))
    low = GaussianDenoiser.fit(data, rank=2)
    ev = torch.linalg.eigvalsh(torch.cov(flat.T, correction=0)).flip(0)
    torch.testing.assert_close(low.eigvals, ev[:2])
    assert low.floor == pytest.approx(float(ev[2:].mean()), rel=1e-10)


@pytest.mark.parametrize("rank", [None, 2])
def test_flow_is_the_ode_solution(rank):
    model = GaussianDenoiser.fit(_data(), rank=rank)
    x0 = 20.0 * torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = model.flow(x0, 20.0, 0.05)
    rk4 = solve_flow(model, x0, 20.0, 0.05, steps=800)
    torch.testing.assert_close(exact, rk4, rtol=1e-8, atol=1e-8)
    # a flow map composes: 20 -> 1 -> 0.05 equals 20 -> 0.05; and it runs backwards
    torch.testing.assert_close(model.flow(model.flow(x0, 20.0, 1.0), 1.0, 0.05), exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.flow(exact, 0.05, 20.0), x0, rtol=1e-10, atol=1e-10)


def test_flow_endpoint_at_zero_and_the_samplers_converge_to_it():
    model = GaussianDenoiser.fit(_data(), rank=3)
    noise = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    exact = model.flow(80.0 * noise, 80.0, 0.002)
    err = [float((gs.sample(model, noise, gs.schedules.polynomial(n), solver="heun") - exact).abs().max())
           for n in (200, 400)]
    assert err[1] < 1e-3 and 3.5 < err[0] / err[1] < 4.5  # Heun converges to it at second order
    # sigma_to = 0: directions with lam > 0 keep their share, sqrt(lam / (lam + s0^2))
    torch.testing.assert_close(model.flow(exact, 0.002, 0.0), model.flow(80.0 * noise, 80.0, 0.0), rtol=1e-10,
                               atol=1e-10)


def test_mixture_matches_dense_posterior_mean():
    data = _data(60)
    labels = torch.arange(60) % 3
    mix = LowRankMixtureDenoiser.fit(data, labels, rank=2)
    x = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    flat = x.reshape(6, -1)
    for sigma in (0.05, 0.5, 5.0):
        eye = torch.eye(6, dtype=torch.float64)
        logp = torch.stack([torch.distributions.MultivariateNormal(c.mean, _dense_cov(c) + sigma ** 2 * eye)
                            .log_prob(flat) for c in mix.components], 1) + mix.log_weights
        p = torch.softmax(logp, 1)
        want = sum(p[:, k:k + 1] * _dense_denoise(c.mean, _dense_cov(c), flat, sigma)
                   for k, c in enumerate(mix.components))
        torch.testing.assert_close(mix(x, sigma).reshape(6, -1), want, rtol=1e-9, atol=1e-11)
    assert mix.log_weights.exp().tolist() == pytest.approx([1 / 3] * 3)


def test_isotropic_components_reproduce_the_isotropic_mixture():
    means = torch.randn(3, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    stds = torch.tensor([0.2, 0.5, 1.1], dtype=torch.float64)
    e = torch.eye(4, dtype=torch.float64)[:, :1]
    comps = [GaussianDenoiser(m, s[None] ** 2, e, float(s) ** 2) for m, s in zip(means, stds)]
    mix = LowRankMixtureDenoiser(comps, weights=[1.0, 2.0, 3.0])
    ref = GaussianMixtureDenoiser(means, stds, weights=[1.0, 2.0, 3.0])
    x = 2 * torch.randn(7, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for sigma in (0.01, 0.3, 3.0, 60.0):
        torch.testing.assert_close(mix(x, sigma), ref(x, sigma), rtol=1e-10, atol=1e-12)


def test_one_component_mixture_is_the_gaussian_and_dtype_is_kept():
    model = GaussianDenoiser.fit(_data(), rank=2)
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(7))
    out = LowRankMixtureDenoiser([model])(x, torch.tensor([0.1, 1.0, 10.0]))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, model(x, torch.tensor([0.1, 1.0, 10.0])))


def test_bad_input_is_refused():
    data = _data()
    model = GaussianDenoiser.fit(data, rank=2)
    x = torch.zeros(2, 2, 3)
    with pytest.raises(ValueError, match="sigma"):
        model(x, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        model(torch.full((2, 2, 3), float("nan")), 1.0)
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(2, 6), 1.0)
    with pytest.raises(ValueError, match="orthonormal"):
        GaussianDenoiser(torch.zeros(3), torch.ones(2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="eigvals"):
        GaussianDenoiser(torch.zeros(3), -torch.ones(1), torch.eye(3)[:, :1])
    with pytest.raises(ValueError, match="rank"):
        GaussianDenoiser.fit(data, rank=0)
    with pytest.raises(ValueError, match="flow"):
        model.flow(x, 0.0, 1.0)
    with pytest.raises(ValueError, match="labels"):
        LowRankMixtureDenoiser.fit(data, torch.zeros(3), rank=2)
    with pytest.raises(TypeError):
        LowRankMixtureDenoiser([])
