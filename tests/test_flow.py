"""Flow-matching models as EDM denoisers (FlowDenoiser), shifted flow schedules, sampling from t = 1."""
import math

import pytest
import torch

import geosample as gs
from geosample import schedules
from geosample.denoisers.adapters import FlowDenoiser
from geosample.denoisers.gaussian import GaussianMixtureDenoiser
from geosample.denoisers.gaussian_flow import GaussianMixtureFlow


@pytest.fixture
def mixture():
    g = torch.Generator().manual_seed(0)
    return GaussianMixtureDenoiser(torch.randn(3, 2, 4, generator=g, dtype=torch.float64), [0.3, 0.5, 0.2])


def test_flow_denoiser_is_the_edm_denoiser(mixture):
    x = 3 * torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    D = FlowDenoiser(GaussianMixtureFlow(mixture))
    for sigma in (0.05, 1.0, 40.0, torch.tensor([0.1, 0.5, 2.0, 9.0, 70.0], dtype=torch.float64)):
        torch.testing.assert_close(D(x, sigma), mixture(x, sigma), rtol=0, atol=1e-12)


def test_flow_denoiser_at_infinity_is_noise_minus_velocity(mixture):
    flow = GaussianMixtureFlow(mixture)
    n = torch.randn(4, 2, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    d = FlowDenoiser(flow)(n, math.inf)
    torch.testing.assert_close(d, n - flow(n, torch.full((4,), 1000.0)))
    torch.testing.assert_close(d, flow.mean.reshape(1, 2, 4).expand(4, 2, 4))


def test_flow_denoiser_passes_timestep_and_kwargs():
    seen = {}

    def model(x_t, timestep, emb=None):
        seen.update(x_t=x_t, timestep=timestep, emb=emb)
        return torch.zeros_like(x_t)

    x = torch.ones(2, 3)
    out = FlowDenoiser(model, timestep_scale=1.0, model_kwargs={"emb": torch.ones(1, 7)})(x, 3.0)
    assert seen["timestep"].tolist() == [0.75, 0.75] and seen["emb"].shape == (2, 7)
    torch.testing.assert_close(seen["x_t"], x / 4)
    torch.testing.assert_close(out, x / 4)  # v = 0: D = x_t
    with pytest.raises(TypeError):
        FlowDenoiser(3)
    with pytest.raises(ValueError, match="timestep_scale"):
        FlowDenoiser(model, timestep_scale=0.0)


@pytest.mark.parametrize("solver", sorted(gs.SOLVERS))
def test_every_solver_samples_from_t_equal_one(mixture, solver):
    """Sampling a flow model from t = 1 (sigma = inf) converges to the 800-step solve."""
    D = FlowDenoiser(GaussianMixtureFlow(mixture))
    n = torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)
    ref = gs.sample(D, n, torch.cat([schedules.flow_shifted(800), zero]), "ipndm")
    errs = [(gs.sample(D, n, torch.cat([schedules.flow_shifted(k), zero]), solver) - ref).abs().max().item()
            for k in (10, 40)]
    assert all(math.isfinite(e) for e in errs)
    assert errs[1] < 0.6 * errs[0] and errs[1] < 0.05


def test_flow_shifted_matches_diffusers_formulas():
    t = torch.linspace(1, 0.1, 10, dtype=torch.float64)
    torch.testing.assert_close(schedules.flow_shift(t, 3.0), 3 * t / (1 + 2 * t))
    torch.testing.assert_close(schedules.flow_time_shift(t, 0.7), math.exp(0.7) / (math.exp(0.7) + 1 / t - 1))
    assert schedules.flux_mu(256) == pytest.approx(0.5) and schedules.flux_mu(4096) == pytest.approx(1.15)
    s = schedules.flow_shifted(9, t_min=0.1, shift=3.0)
    assert s.dtype == torch.float64 and math.isinf(float(s[0])) and bool((s[1:] < s[:-1]).all())
    torch.testing.assert_close(schedules.sigma_to_flow_t(s), schedules.flow_shift(t, 3.0))
    torch.testing.assert_close(schedules.flow_t_to_sigma(schedules.sigma_to_flow_t(s[1:])), s[1:])
    with pytest.raises(ValueError, match="t_min"):
        schedules.flow_shifted(4, t_min=0.0)
    with pytest.raises(ValueError, match="shift"):
        schedules.flow_shifted(4, shift=-1.0)


def test_flow_shifted_reproduces_flow_match_euler():
    diffusers = pytest.importorskip("diffusers")
    for shift, mu in ((3.0, None), (1.0, 0.9)):
        sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=mu is not None)
        sched.set_timesteps(8, mu=mu)
        t_min = float(schedules.flow_shift(1e-3, shift)) if mu is None else 1e-3  # diffusers' sigma_min
        ours = schedules.sigma_to_flow_t(schedules.flow_shifted(7, t_min=t_min, shift=shift, mu=mu))
        torch.testing.assert_close(ours.float(), sched.sigmas[:-1], rtol=1e-6, atol=1e-7)
