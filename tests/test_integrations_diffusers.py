"""GITSScheduler in real diffusers loops with a random tiny UNet, against gs.sample through EpsDenoiser."""
import math

import pytest
import torch

import geosample as gs

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler  # noqa: E402

from geosample.denoisers.adapters import EpsDenoiser  # noqa: E402
from geosample.integrations.diffusers import GITSScheduler  # noqa: E402
from tiny_diffusers import one_thread, unet  # noqa: E402,F401  (fixtures)






def _latents(seed=3, batch=2):
    return torch.randn(batch, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def run_like_a_pipeline(unet, scheduler, latents, steps):
    """The denoising loop of diffusers' text-to-image pipelines, scheduler API only."""
    scheduler.set_timesteps(steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            noise_pred = unet(model_input, t).sample
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def reference(unet, scheduler, latents):
    """gs.sample on the same model and schedule, from the same x_T = sqrt(1 + sigma_0^2) x_vp."""
    s0 = float(scheduler.sigmas[0])
    noise = latents * math.sqrt(1 + s0 * s0) / s0
    model = EpsDenoiser(unet, scheduler.alphas_cumprod, scheduler.config.prediction_type)
    denoiser = lambda x, sigma: scheduler.clip_denoised(model(x, sigma))  # noqa: E731  (clip_sample, thresholding)
    return gs.sample(denoiser, noise, scheduler.sigmas, scheduler.config.solver,
                     **(scheduler.config.solver_options or {}))


@pytest.mark.parametrize("solver, options, prediction_type", [
    ("euler", {}, "epsilon"), ("heun", {}, "v_prediction"), ("dpm2", {}, "epsilon"), ("ipndm", {}, "v_prediction"),
    ("ipndm_v", {}, "epsilon"), ("dpmpp", {}, "epsilon"), ("dpmpp", {"max_order": 2}, "v_prediction"),
    ("unipc", {}, "v_prediction"), ("deis", {}, "epsilon"),
])
def test_matches_gs_sample(unet, solver, options, prediction_type):
    config = DDPMScheduler(prediction_type=prediction_type, clip_sample=False).config  # DDPM clips x0 by default
    scheduler = GITSScheduler.from_config(config, solver=solver, solver_options=options)
    latents = _latents(batch=1)
    got = run_like_a_pipeline(unet, scheduler, latents, 5)
    want = reference(unet, scheduler, latents)
    assert len(scheduler.timesteps) == gs.nfe(solver, 5, denoise_to_zero=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - latents).abs().max() > 0.1


def test_in_ddpm_pipeline(unet):
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = GITSScheduler.from_config(pipe.scheduler.config, solver="ipndm", schedule="logsnr")
    images = pipe(batch_size=1, generator=torch.Generator().manual_seed(5), num_inference_steps=4,
                  output_type="pt").images
    latents = diffusers.utils.torch_utils.randn_tensor((1, 3, 8, 8), generator=torch.Generator().manual_seed(5))
    want = reference(unet, pipe.scheduler, latents)
    torch.testing.assert_close(images, (want / 2 + 0.5).clamp(0, 1), rtol=1e-4, atol=1e-4)
    assert 0.05 < float(images.std())


def test_schedules_and_evaluation_points():
    s = GITSScheduler(solver="heun")
    s.set_timesteps(4)
    assert s.sigmas.shape == (5,) and s.sigmas[-1] == 0
    sig = gs.schedules.discrete_sigmas(s.alphas_cumprod)
    torch.testing.assert_close(s.sigmas[:-1], gs.schedules.polynomial(3, float(sig[0]), float(sig[-1])))
    # Heun evaluates at both ends of each interval, then once for the final denoise
    want = [s.sigmas[0], s.sigmas[1], s.sigmas[1], s.sigmas[2], s.sigmas[2], s.sigmas[3], s.sigmas[3]]
    torch.testing.assert_close(s.eval_sigmas, torch.stack(want))
    assert s.order == 2 and s.timesteps.dtype == torch.float32
    torch.testing.assert_close(gs.schedules.timestep_to_sigma(s.timesteps.double(), s.alphas_cumprod),
                               s.eval_sigmas, rtol=1e-5, atol=0)
    s.set_timesteps(sigmas=[10.0, 1.0, 0.1])
    assert s.num_inference_steps == 2 and len(s.timesteps) == 4  # no trailing 0: Heun twice per step
    s.set_timesteps(timesteps=[900, 500, 100])
    torch.testing.assert_close(s.timesteps[[0, 2, 4]], torch.tensor([900.0, 500.0, 100.0]))
    fixed = GITSScheduler(sigmas=[50.0, 5.0, 0.5, 0.0])
    fixed.set_timesteps(3)
    assert fixed.sigmas.tolist() == [50.0, 5.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="3 steps"):
        fixed.set_timesteps(5)


def test_add_noise_and_model_input():
    s = GITSScheduler()
    x0, n = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([10, 700])
    a = s.alphas_cumprod[t].reshape(2, 1, 1, 1)
    torch.testing.assert_close(s.add_noise(x0, n, t), a.sqrt() * x0 + (1 - a).sqrt() * n)
    assert s.scale_model_input(x0, 3) is x0 and s.init_noise_sigma == 1.0


def test_misuse_raises(unet):
    s = GITSScheduler(solver="euler")
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1, 3, 8, 8), 999, torch.zeros(1, 3, 8, 8))
    s.set_timesteps(4)
    x = _latents(batch=1)
    with pytest.raises(ValueError, match="starts no interval"):
        s.step(torch.zeros_like(x), 123.25, x)
    out = s.step(torch.zeros_like(x), s.timesteps[0], x).prev_sample
    with pytest.raises(ValueError, match="step 1 expects timestep"):
        s.step(torch.zeros_like(x), s.timesteps[2], out)
    with pytest.raises(FloatingPointError, match="step 1 .* not finite"):
        s.step(torch.full_like(x, math.nan), s.timesteps[1], out)
    heun = GITSScheduler(solver="heun")
    heun.set_timesteps(4)
    heun.set_begin_index(1)  # the second evaluation of interval 0
    with pytest.raises(ValueError, match="begin index 1"):
        heun.step(torch.zeros_like(x), heun.timesteps[1], x)
    with pytest.raises(ValueError, match="schedule must be"):
        GITSScheduler(schedule="karras")
    with pytest.raises(ValueError, match="timestep_spacing"):
        GITSScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="rho does not apply"):
        GITSScheduler(schedule="logsnr", rho=3.0)
    with pytest.raises(TypeError, match="unknown options"):
        GITSScheduler(solver="euler", solver_options={"max_order": 2})
    with pytest.raises(ValueError, match="use_gits"):
        GITSScheduler(schedule="gits").set_timesteps(5)
    with pytest.raises(ValueError, match="epsilon"):
        GITSScheduler(rescale_betas_zero_snr=True).set_timesteps(5)


def test_gits_schedule_is_searched_lazily(unet):
    s = GITSScheduler(solver="ipndm")
    s.use_gits(unet, (3, 8, 8), num_warmup=2, teacher_steps=8, use_cache=False)
    got = run_like_a_pipeline(unet, s, _latents(batch=1), 4)
    assert s.config.schedule == "gits" and s.sigmas.shape == (5,) and s.sigmas[-1] == 0
    torch.testing.assert_close(got, reference(unet, s, _latents(batch=1)), rtol=1e-4, atol=1e-4)


def test_config_round_trip_and_foreign_configs(tmp_path):
    euler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                             prediction_type="v_prediction")
    s = GITSScheduler.from_config(euler.config, solver="unipc", solver_options={"max_order": 2},
                                  sigmas=[14.6, 3.0, 0.5, 0.0])
    assert s.config.prediction_type == "v_prediction"
    torch.testing.assert_close(s.alphas_cumprod, euler.alphas_cumprod.double())
    s.save_config(tmp_path)
    again = GITSScheduler.from_pretrained(tmp_path)
    assert again.config.solver_options == {"max_order": 2} and list(again.config.sigmas) == [14.6, 3.0, 0.5, 0.0]
    again.set_timesteps()
    assert again.sigmas.tolist() == [14.6, 3.0, 0.5, 0.0]
