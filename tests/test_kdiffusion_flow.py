"""flow_sampler: the k-diffusion-signature samplers on a flow-matching model as ComfyUI passes one
(sigmas are flow times t in [0, 1], x is x_t, the model returns x0), against an analytic flow."""
import pytest
import torch

import geosample as gs
from geosample import schedules
from geosample.denoisers.adapters import FlowDenoiser
from geosample.denoisers.gaussian import GaussianMixtureDenoiser
from geosample.denoisers.gaussian_flow import GaussianMixtureFlow
from geosample.integrations import kdiffusion as kd


@pytest.fixture(scope="module")
def flow():
    g = torch.Generator().manual_seed(0)
    return GaussianMixtureFlow(GaussianMixtureDenoiser(torch.randn(3, 2, 4, generator=g, dtype=torch.float64),
                                                       [0.3, 0.5, 0.2]), timestep_scale=1.0)


@pytest.fixture(scope="module")
def noise():
    return torch.randn(5, 2, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def comfy_model(flow):
    """ComfyUI's flow model wrapper (CONST sampling): x0 = x_t - t v at flow time t ([B])."""
    def model(x_t, t, offset=0.0):
        assert t.shape == (x_t.shape[0],) and bool(((t > 0) & (t <= 1)).all())
        return x_t - t.reshape(-1, 1, 1) * flow(x_t, t) + offset
    return model


def _times(n, shift=3.0):
    """n + 1 shifted flow times from 1 to 0 (a ComfyUI-style SD3 schedule)."""
    return torch.cat([schedules.flow_shift(torch.linspace(1, 1 / n, n, dtype=torch.float64), shift),
                      torch.zeros(1, dtype=torch.float64)])


def test_euler_is_flow_euler(flow, noise):
    t = _times(8)
    x = noise.clone()
    for i in range(8):
        x = x + (t[i + 1] - t[i]) * flow(x, t[i].expand(5))
    got = kd.flow_sampler(kd.sample_euler)(comfy_model(flow), noise, t, disable=True)
    torch.testing.assert_close(got, x, rtol=0, atol=1e-12)
    # k-diffusion's Euler fed the flow times directly is the same method (DDIM = flow Euler)
    torch.testing.assert_close(kd.sample_euler(comfy_model(flow), noise, t, disable=True), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,solver,options", [
    ("sample_dpmpp_2m", "dpmpp", dict(max_order=2, lower_order_final=False)), ("sample_ipndm", "ipndm", {}),
    ("sample_heun", "heun", {})])
def test_samplers_solve_the_edm_form(flow, noise, name, solver, options):
    """Each wrapped sampler equals gs.sample on FlowDenoiser with sigma = t / (1 - t), from inf."""
    t = _times(8)
    got = kd.flow_sampler(getattr(kd, name))(comfy_model(flow), noise, t, disable=True)
    want = gs.sample(FlowDenoiser(flow, timestep_scale=1.0), noise, schedules.flow_t_to_sigma(t), solver, **options)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_partial_range_extra_args_and_callback(flow, noise):
    """img2img-style start below t = 1 (x = x_t there), a stop above 0 (x_t returned), extra_args,
    and the callback in flow coordinates."""
    t = torch.tensor([0.8, 0.6, 0.4, 0.2], dtype=torch.float64)
    x0 = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x_t = 0.2 * x0 + 0.8 * noise
    seen = []
    got = kd.flow_sampler(kd.sample_dpmpp_2m)(comfy_model(flow), x_t, t, extra_args={"offset": 0.0}, disable=True,
                                              callback=lambda info: seen.append(info))
    edm = gs.sample(FlowDenoiser(flow, timestep_scale=1.0), x_t / 0.8, schedules.flow_t_to_sigma(t), "dpmpp",
                    max_order=2, lower_order_final=False)
    torch.testing.assert_close(got, edm * 0.8, rtol=0, atol=1e-12)
    assert [float(i["sigma"]) for i in seen] == [0.8, 0.6, 0.4] and [i["i"] for i in seen] == [0, 1, 2]
    torch.testing.assert_close(seen[0]["x"], x_t, rtol=0, atol=1e-12)


def test_flow_times_outside_unit_interval_raise(flow, noise):
    with pytest.raises(ValueError, match="flow times"):
        kd.flow_sampler(kd.sample_euler)(comfy_model(flow), noise, torch.tensor([14.6, 1.0, 0.0]))
    with pytest.raises(TypeError, match="sampler must be"):
        kd.flow_sampler("sample_euler")
    with pytest.raises(ValueError, match="only sigmas.0. may be inf"):  # t = 1 twice (was "must be finite ... sigma[0]")
        kd.flow_sampler(kd.sample_euler)(comfy_model(flow), noise, torch.tensor([1.0, 1.0, 0.0]))
