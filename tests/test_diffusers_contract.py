"""GITSScheduler against diffusers' scheduler contract: begin index (img2img), stepping from the sample
given, one step, betas, zero-SNR, timestep spacing, prediction types, save/load of GITS schedules."""
import math

import pytest
import torch

import geosample as gs

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler  # noqa: E402

from geosample.denoisers.adapters import EpsDenoiser  # noqa: E402
from geosample.integrations.diffusers import GITSScheduler  # noqa: E402
from geosample.solvers.base import X, Y, Op  # noqa: E402
from tiny_diffusers import one_thread, unet  # noqa: E402,F401  (fixtures)

SOLVERS = sorted(gs.SOLVERS)






def _latents(seed=3):
    return torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def loop(unet, scheduler, latents, timesteps, edit=None):
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            latents = scheduler.step(unet(scheduler.scale_model_input(latents, t), t).sample, t, latents).prev_sample
            latents = latents if edit is None else edit(i, latents)
    return latents


def reference(unet, scheduler, x_vp, sigmas):
    """gs.sample from the VP sample x_vp at sigmas[0]."""
    s0 = float(sigmas[0])
    noise = x_vp if math.isinf(s0) else x_vp * math.sqrt(1 + s0 * s0) / s0
    finite = EpsDenoiser(unet, scheduler._finite_ac, scheduler.config.prediction_type)

    def denoiser(x, sigma):  # at sigma = inf, x is the noise (the VP sample) and D = -v
        if math.isinf(float(sigma[0])):
            assert scheduler.config.prediction_type == "v_prediction"
            return -unet(x, torch.full((x.shape[0],), len(scheduler.alphas_cumprod) - 1.0)).sample
        return finite(x, sigma)

    return gs.sample(denoiser, noise, sigmas, scheduler.config.solver, **(scheduler.config.solver_options or {}))


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("use_begin_index", [True, False])
def test_img2img_runs_the_rest_of_the_schedule(unet, solver, use_begin_index):
    """As diffusers' img2img: timesteps[t_start * order:], set_begin_index; the solver starts afresh there."""
    s = GITSScheduler(solver=solver)
    s.set_timesteps(6)
    t_start = 2
    k = t_start * s.order
    if use_begin_index:
        s.set_begin_index(k)
    x = _latents()
    got = loop(unet, s, x, s.timesteps[k:])
    torch.testing.assert_close(got, reference(unet, s, x, s.sigmas[t_start:]), rtol=1e-4, atol=1e-4)
    assert s.step_index == len(s.timesteps) and s.begin_index == (k if use_begin_index else None)


@pytest.mark.parametrize("solver", ["euler", "dpmpp", "unipc", "heun"])
def test_steps_from_the_sample_it_is_given(unet, solver):
    """Latents edited between steps are stepped from (diffusers' test_step_shape passes one sample twice)."""
    s = GITSScheduler(solver=solver)
    s.set_timesteps(4)
    x = _latents()
    out0 = s.step(torch.zeros_like(x), s.timesteps[0], x).prev_sample
    out1 = s.step(torch.zeros_like(x), s.timesteps[1], x).prev_sample
    assert out0.shape == out1.shape == x.shape
    s.set_timesteps(4)
    edited = loop(unet, s, x, s.timesteps, edit=lambda i, lat: lat * 0.5)
    s.set_timesteps(4)
    plain = loop(unet, s, x, s.timesteps)
    assert (edited - plain).abs().max() > 1e-2


def test_edited_euler_step_is_ddim(unet):
    """Euler from the edited sample is exactly DDIM (eta 0) from it."""
    ddim = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    ours = GITSScheduler.from_config(ddim.config, solver="euler", schedule="discrete")
    ddim.set_timesteps(5)
    ours.set_timesteps(5)
    edit = lambda i, lat: lat * 0.8 + 0.1 * (i == 1)  # noqa: E731
    torch.testing.assert_close(loop(unet, ours, _latents(), ours.timesteps, edit),
                               loop(unet, ddim, _latents(), ddim.timesteps, edit), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_inference_step(unet, solver):
    s = GITSScheduler(solver=solver, prediction_type="sample")
    s.set_timesteps(1)
    assert s.sigmas.tolist() == [s.model_sigma_range[1], 0.0] and len(s.timesteps) == 1
    x = _latents()
    out = s.step(2 * x, s.timesteps[0], x)
    torch.testing.assert_close(out.prev_sample, 2 * x)
    torch.testing.assert_close(out.pred_original_sample, 2 * x)


def test_betas_alphas_and_trained_betas(tmp_path):
    s = GITSScheduler(num_train_timesteps=2, trained_betas=[0.1, 0.3])
    torch.testing.assert_close(s.betas, torch.tensor([0.1, 0.3]))
    torch.testing.assert_close(s.alphas, torch.tensor([0.9, 0.7]))
    torch.testing.assert_close(s.alphas_cumprod, torch.tensor([0.9, 0.63], dtype=torch.float64))
    s.save_pretrained(tmp_path)
    torch.testing.assert_close(GITSScheduler.from_pretrained(tmp_path).betas, s.betas)


def test_zero_snr_starts_at_infinity_and_equals_ddim(unet):
    """rescale_betas_zero_snr: alphas_cumprod[-1] = 0, sigma_max = inf; Euler on trailing timesteps = DDIM."""
    config = dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")
    ddim = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, **config)
    ours = GITSScheduler.from_config(ddim.config, solver="euler", schedule="discrete")
    assert float(ours.alphas_cumprod[-1]) == 0.0 and ours.model_sigma_range[1] == math.inf
    torch.testing.assert_close(ours.alphas_cumprod, ddim.alphas_cumprod.double())
    ddim.set_timesteps(5)
    ours.set_timesteps(5)
    assert math.isinf(float(ours.sigmas[0])) and float(ours.timesteps[0]) == 999.0
    torch.testing.assert_close(ours.timesteps, ddim.timesteps.float())
    torch.testing.assert_close(loop(unet, ours, _latents(), ours.timesteps),
                               loop(unet, ddim, _latents(), ddim.timesteps), rtol=1e-4, atol=1e-4)
    x0, n = _latents(1), _latents(2)
    torch.testing.assert_close(ours.add_noise(x0, n, torch.tensor([999])), n)
    torch.testing.assert_close(ours.add_noise(x0, n, torch.tensor([500])), ddim.add_noise(x0, n, torch.tensor([500])))


@pytest.mark.parametrize("solver", ["dpmpp", "unipc", "ipndm"])
def test_zero_snr_polynomial_schedule(unet, solver):
    s = GITSScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction", solver=solver)
    s.set_timesteps(5)
    assert math.isinf(float(s.sigmas[0])) and s.sigmas[-1] == 0 and s.sigmas.numel() == 6
    x = _latents()
    torch.testing.assert_close(loop(unet, s, x, s.timesteps), reference(unet, s, x, s.sigmas), rtol=1e-4, atol=1e-4)


def test_timestep_spacing_matches_ddim():
    for spacing, offset in (("leading", 1), ("trailing", 0), ("linspace", 0)):
        ddim = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
        ours = GITSScheduler.from_config(ddim.config, solver="euler", schedule="discrete")
        ddim.set_timesteps(7)
        ours.set_timesteps(7)
        want = ddim.timesteps.float() if spacing != "linspace" else torch.linspace(999, 0, 7)
        torch.testing.assert_close(ours.timesteps, want, rtol=0, atol=1e-3)


def test_sample_prediction_type(unet):
    s = GITSScheduler(solver="dpmpp", prediction_type="sample")
    s.set_timesteps(5)
    x = _latents()
    torch.testing.assert_close(loop(unet, s, x, s.timesteps), reference(unet, s, x, s.sigmas), rtol=1e-4, atol=1e-4)


def test_gits_schedules_survive_save_and_load(unet, tmp_path):
    s = GITSScheduler(solver="ipndm")
    s.use_gits(unet, (3, 8, 8), num_warmup=2, teacher_steps=8, use_cache=False)
    s.set_timesteps(4)
    s.save_pretrained(tmp_path)
    loaded = GITSScheduler.from_pretrained(tmp_path)
    assert loaded.config.schedule == "gits" and list(loaded.config.gits_sigmas) == ["3"]
    loaded.set_timesteps(4)  # no model needed
    assert loaded.sigmas.tolist() == s.sigmas.tolist()
    with pytest.raises(ValueError, match="no 5-step schedule.*use_gits"):
        loaded.set_timesteps(6)


def test_registered_solver_runs_in_the_scheduler(unet):
    def midpoint(sigmas, *, afs=False):
        ops = []
        for i, (s, s_next) in enumerate(zip(sigmas, sigmas[1:])):
            mid = 0.5 * (s + s_next)
            ops += [Op(s, X, Y, 1.0, (mid - s,), sigma=s, afs=afs and i == 0, step=i),
                    Op(mid, Y, X, 1.0, (s_next - s,), sigma=mid)]
        return ops, 2

    gs.solvers.register("midpoint_contract", evals_per_step=2)(midpoint)
    try:
        s = GITSScheduler(solver="midpoint_contract")
        s.set_timesteps(4)
        assert s.order == 2 and len(s.timesteps) == 7
        x = _latents()
        torch.testing.assert_close(loop(unet, s, x, s.timesteps), reference(unet, s, x, s.sigmas),
                                   rtol=1e-4, atol=1e-4)
    finally:
        del gs.SOLVERS["midpoint_contract"]


def test_half_precision_sample_keeps_float32_state(unet):
    s = GITSScheduler(solver="dpmpp")
    s.set_timesteps(5)
    x = _latents()
    with torch.no_grad():
        half = x.half()
        for t in s.timesteps:
            half = s.step(unet(half.float(), t).sample.half(), t, half).prev_sample
            assert half.dtype == torch.float16 and s._run.x.dtype == torch.float32
        s.set_timesteps(5)
        want = loop(unet, s, x, s.timesteps)
    assert (half.float() - want).abs().max() < 2e-3 * want.abs().max()  # fp16 rounding of each step's sample
