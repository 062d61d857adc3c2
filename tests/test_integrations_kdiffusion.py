"""k-diffusion-style samplers against k-diffusion's own loops, restated here in float64."""
import math

import pytest
import torch

import geosample as gs
from geosample.integrations import kdiffusion as kd


def _karras(n, sigma_min=0.02, sigma_max=80.0):
    """k-diffusion's get_sigmas_karras(n): n polynomial sigmas then a 0."""
    return torch.cat([gs.schedules.polynomial(n - 1, sigma_min, sigma_max), torch.zeros(1, dtype=torch.float64)])


def _model(gmm):
    """A k-diffusion model with an extra argument, checking the [B] sigma convention."""
    def model(x, sigma, offset=0.0):
        assert sigma.shape == (x.shape[0],)
        return gmm(x, sigma) + offset
    return model


def _to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def ref_euler(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * x.new_ones(x.shape[0]))
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def ref_heun(model, x, sigmas):
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = _to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * dt
    return x


def ref_dpm_2(model, x, sigmas):
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        d = _to_d(x, sigmas[i], model(x, sigmas[i] * s_in))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = _to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


def ref_dpmpp_2m(model, x, sigmas):
    s_in = x.new_ones(x.shape[0])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def ref_dpmpp_3m_sde_eta0(model, x, sigmas, warmup="kdiffusion"):
    """k-diffusion's sample_dpmpp_3m_sde with eta=0; warmup="2m" uses DPM-Solver++(2M) on step 2."""
    s_in = x.new_ones(x.shape[0])
    denoised_1 = denoised_2 = h = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigmas[i].log() - sigmas[i + 1].log()
            x = torch.exp(-h) * x - (-h).expm1() * denoised
            phi_2 = (-h).expm1() / h + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h - 0.5) * d2
            elif h_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                x = x + (phi_2 * d if warmup == "kdiffusion" else -0.5 * (-h).expm1() * d)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


def ref_ipndm(model, x, sigmas, max_order=4):
    """ComfyUI's sample_ipndm (k_diffusion/sampling.py)."""
    s_in = x.new_ones(x.shape[0])
    buffer = []
    for i in range(len(sigmas) - 1):
        t, t_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, t * s_in)
        d = (x - denoised) / t
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = denoised
        elif order == 1:
            x_next = x + (t_next - t) * d
        elif order == 2:
            x_next = x + (t_next - t) * (3 * d - buffer[-1]) / 2
        elif order == 3:
            x_next = x + (t_next - t) * (23 * d - 16 * buffer[-1] + 5 * buffer[-2]) / 12
        else:
            x_next = x + (t_next - t) * (55 * d - 59 * buffer[-1] + 37 * buffer[-2] - 9 * buffer[-3]) / 24
        buffer = (buffer + [d])[-(max_order - 1):]
        x = x_next
    return x


@pytest.mark.parametrize("name, ref", [
    ("sample_euler", ref_euler), ("sample_heun", ref_heun), ("sample_dpm_2", ref_dpm_2),
    ("sample_dpmpp_2m", ref_dpmpp_2m), ("sample_ipndm", ref_ipndm),
    ("sample_dpmpp_3m", lambda m, x, s: ref_dpmpp_3m_sde_eta0(m, x, s, warmup="2m")),
])
@pytest.mark.parametrize("trailing_zero", [True, False])
def test_matches_kdiffusion_maths(gmm, noise, name, ref, trailing_zero):
    sigmas = _karras(8)
    if not trailing_zero:
        sigmas = sigmas[:-1]
    model = _model(gmm)
    x = noise * sigmas[0]
    got = getattr(kd, name)(model, x, sigmas, extra_args={"offset": 0.01}, disable=True)
    want = ref(lambda xi, s: model(xi, s, offset=0.01), x, sigmas)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_dpmpp_3m_differs_from_kdiffusion_sde_warmup_only(gmm, noise):
    """The documented difference: k-diffusion's 3M-SDE (eta=0) warm-up step is not 2M's."""
    sigmas, model = _karras(8), _model(gmm)
    x = noise * sigmas[0]
    got = kd.sample_dpmpp_3m(model, x, sigmas, disable=True)
    kdiff = ref_dpmpp_3m_sde_eta0(model, x, sigmas)
    gap = (got - kdiff).abs().max().item()
    assert 1e-8 < gap < 0.05 * (got - x).abs().max().item()


@pytest.mark.parametrize("name, solver, options", [
    ("sample_ipndm_v", "ipndm_v", {}), ("sample_unipc", "unipc", {}), ("sample_deis", "deis", {}),
    ("sample_dpmpp_2m", "dpmpp", {"max_order": 2, "lower_order_final": False}),
])
def test_same_as_gs_sample(gmm, noise, name, solver, options):
    sigmas = _karras(7)
    got = getattr(kd, name)(_model(gmm), noise * sigmas[0], sigmas, disable=True)
    want = gs.sample(gmm, noise, sigmas, solver, **options)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_callback_follows_kdiffusion(gmm, noise):
    sigmas = _karras(5).float()
    seen = []
    out = kd.sample_heun(_model(gmm), noise.float() * sigmas[0], sigmas, callback=seen.append, disable=True)
    assert out.dtype == torch.float32
    assert [c["i"] for c in seen] == list(range(5))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}
    for c in seen:
        assert isinstance(c["sigma"], torch.Tensor) and c["sigma"] == sigmas[c["i"]] == c["sigma_hat"]
    torch.testing.assert_close(seen[-1]["denoised"], out)


def test_options_reach_the_solver(gmm, noise):
    sigmas = _karras(6)
    a = kd.sample_ipndm(_model(gmm), noise * sigmas[0], sigmas, disable=True, max_order=1)
    torch.testing.assert_close(a, kd.sample_euler(_model(gmm), noise * sigmas[0], sigmas, disable=True))
    with pytest.raises(TypeError, match="unknown options"):
        kd.sample_euler(_model(gmm), noise * sigmas[0], sigmas, disable=True, s_churn=1.0)


def test_bad_input(gmm, noise):
    with pytest.raises(TypeError, match="sigmas"):
        kd.sample_euler(_model(gmm), noise, [80.0, 0.0])
    with pytest.raises(ValueError, match="decreasing"):
        kd.sample_euler(_model(gmm), noise, torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="n must be"):
        kd.get_sigmas_gits(1, _model(gmm), (6,))


def test_get_sigmas_gits(gmm, capsys):
    sigmas = kd.get_sigmas_gits(5, gmm, (6,), num_warmup=16, teacher_steps=20, use_cache=False)
    err = capsys.readouterr().err   # the recommended search, with its progress
    assert "gits teacher" in err and "gits refine" in err and "gits check" in err
    assert sigmas.dtype == torch.float32 and sigmas.shape == (6,)      # as k-diffusion's get_sigmas_karras
    wide = kd.get_sigmas_gits(5, gmm, (6,), num_warmup=16, teacher_steps=20, use_cache=False, dtype=torch.float64)
    assert wide.dtype == torch.float64 and torch.equal(wide.float(), sigmas)
    assert sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    assert math.isclose(float(sigmas[0]), 80.0)

    class Wrapped:  # like k-diffusion's DiscreteEpsDDPMDenoiser: a model with its sigma range
        sigma_min, sigma_max = torch.tensor(0.03), torch.tensor(14.6)

        def __call__(self, x, sigma, offset):
            return gmm(x, sigma) + offset

    sigmas = kd.get_sigmas_gits(4, Wrapped(), (6,), extra_args={"offset": 0.0}, num_warmup=8, teacher_steps=12,
                                use_cache=False)
    assert sigmas.shape == (5,)
    assert math.isclose(float(sigmas[0]), 14.6, rel_tol=1e-6) and math.isclose(float(sigmas[-2]), 0.03, rel_tol=1e-6)


def test_get_sigmas_gits_runs_kdiffusion_samplers_on_a_float32_model(gmm):
    """float64 sigmas turned x into float64 inside k-diffusion's loop (``to_d`` divides by
    ``append_dims(sigma, x.ndim)``, a dimensioned tensor), and the float32 model then failed with
    "Input type (double) and bias type (float)"."""
    net = torch.nn.Linear(6, 6)
    with torch.no_grad():
        net.weight.copy_(torch.eye(6) * 0.5)
        net.bias.zero_()

    def model(x, sigma):
        return net(x / (1 + sigma[:, None] ** 2).sqrt())

    def kdiffusion_euler(x, sigmas):                      # k-diffusion's sample_euler, s_churn = 0
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas) - 1):
            sigma_hat = sigmas[i]
            denoised = model(x, sigma_hat * s_in)
            d = (x - denoised) / sigma_hat[(...,) + (None,) * (x.ndim - sigma_hat.ndim)]
            x = x + d * (sigmas[i + 1] - sigma_hat)
        return x

    with torch.no_grad():
        sigmas = kd.get_sigmas_gits(4, model, (6,), num_warmup=8, teacher_steps=12, use_cache=False)
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0)) * sigmas[0]
        assert kdiffusion_euler(x, sigmas).dtype == torch.float32
