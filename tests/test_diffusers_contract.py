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


def _ddim_loop(unet, ddim, latents, **step_options):
    with torch.no_grad():
        for t in ddim.timesteps:
            latents = ddim.step(unet(latents, t).sample, t, latents, **step_options).prev_sample
    return latents


@pytest.mark.parametrize("clipping", [{"clip_sample": True, "clip_sample_range": 0.5},
                                      {"thresholding": True, "dynamic_thresholding_ratio": 0.9,
                                       "sample_max_value": 1.5}])
def test_clip_sample_and_thresholding_as_ddim(unet, clipping):
    """clip_sample / thresholding of a DDIM config act on the x0 prediction (they were accepted and
    ignored: 1.0 off DDIM in image space): Euler then equals DDIM with use_clipped_model_output=True."""
    ddim = DDIMScheduler(set_alpha_to_one=True, timestep_spacing="trailing", **clipping)
    ours = GITSScheduler.from_config(ddim.config, solver="euler", schedule="discrete")
    ddim.set_timesteps(5)
    ours.set_timesteps(5)
    want = _ddim_loop(unet, ddim, _latents(), use_clipped_model_output=True)
    torch.testing.assert_close(loop(unet, ours, _latents(), ours.timesteps), want, rtol=1e-4, atol=1e-4)
    unclipped = GITSScheduler.from_config(ddim.config, solver="euler", schedule="discrete", clip_sample=False,
                                          thresholding=False)
    unclipped.set_timesteps(5)
    assert (loop(unet, unclipped, _latents(), unclipped.timesteps) - want).abs().max() > 0.05  # clipping acted


def test_a_default_ddim_config_keeps_clipping():
    """DDIMScheduler() clips by default; from_config drops default values, so this must be carried."""
    assert GITSScheduler.from_config(DDIMScheduler().config).config.clip_sample is True
    assert GITSScheduler.from_config(DDIMScheduler().config, clip_sample=False).config.clip_sample is False
    assert GITSScheduler.from_config(DDIMScheduler(clip_sample=False).config).config.clip_sample is False


def test_clipping_options_are_checked():
    for bad in ({"clip_sample_range": 0.0}, {"dynamic_thresholding_ratio": 1.5}, {"sample_max_value": 0.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GITSScheduler(**bad)


def test_timesteps_outside_the_model_range_are_refused():
    """set_timesteps(timesteps=[5000, 10]) was clamped to 999 and [500, -10] to 0, silently."""
    s = GITSScheduler()
    for bad in ([5000, 10], [500, -10], [float("nan"), 1]):
        with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
            s.set_timesteps(timesteps=bad)
    s.set_timesteps(timesteps=[999, 500, 0.5])
    assert s.num_inference_steps == 3


def test_gits_sigmas_of_the_wrong_length_are_refused():
    """gits_sigmas={"5": [14, 1, 0.03]} then set_timesteps(6) ran 3 steps."""
    with pytest.raises(ValueError, match=r"gits_sigmas\['5'\] must be a 5-step schedule \(6 sigmas\), got 3"):
        GITSScheduler(schedule="gits", gits_sigmas={"5": [14.0, 1.0, 0.03]})
    with pytest.raises(ValueError, match="keys must be step counts"):
        GITSScheduler(schedule="gits", gits_sigmas={"five": [14.0, 1.0]})
    with pytest.raises(ValueError):  # not decreasing
        GITSScheduler(schedule="gits", gits_sigmas={"2": [1.0, 14.0, 0.03]})


def test_zero_snr_step_checks_the_model_output_shape(unet):
    """At sigma = inf a wrongly shaped model output broadcast instead of raising (finite sigma raised)."""
    s = GITSScheduler(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing",
                      schedule="discrete")
    s.set_timesteps(4)
    assert math.isinf(float(s.eval_sigmas[0]))
    x = _latents()
    with pytest.raises(ValueError, match=r"model output has shape \(1, 3, 1, 1\), expected \(1, 3, 8, 8\)"):
        s.step(torch.ones(1, 3, 1, 1), s.timesteps[0], x)


def test_integer_samples_are_refused():
    """An int64 sample came back as int64 (truncated)."""
    s = GITSScheduler(solver="euler")
    s.set_timesteps(3)
    x = torch.ones(1, 3, 8, 8, dtype=torch.int64)
    with pytest.raises(TypeError, match="sample must be a floating-point tensor"):
        s.step(torch.zeros(1, 3, 8, 8), s.timesteps[0], x)
    with pytest.raises(TypeError, match="model_output must be a floating-point tensor"):
        s.step(torch.zeros(1, 3, 8, 8, dtype=torch.int64), s.timesteps[0], x.float())
    with pytest.raises(TypeError, match="original_samples must be a floating-point tensor"):
        s.add_noise(x, torch.zeros(1, 3, 8, 8), torch.tensor([10]))


def test_use_gits_on_another_model_drops_the_first_models_schedules(unet, capsys):
    """use_gits(model_b) after a search for model A served A's schedules (cached by step count only)."""
    from diffusers import UNet2DModel
    torch.manual_seed(1)
    other = UNet2DModel(**unet.config).eval()
    options = dict(num_warmup=2, batch_size=2, teacher_steps=6, use_cache=False)
    s = GITSScheduler(solver="euler")
    s.use_gits(unet, (3, 8, 8), **options)
    s.set_timesteps(4)
    first = s.config.gits_sigmas["3"]
    err = capsys.readouterr().err   # the recommended search for the scheduler's solver, with its progress
    assert "gits: a 3-step schedule for euler" in err and "gits refine" in err
    key = s.config.gits_key
    s.use_gits(unet, (3, 8, 8), **options)               # the same model and options keep them
    assert s.config.gits_sigmas == {"3": first} and s.config.gits_key == key
    s.use_gits(other, (3, 8, 8), **options)
    assert s.config.gits_sigmas == {} and s.config.gits_key != key
    s.set_timesteps(4)
    expect = gs.gits.search(EpsDenoiser(other, s._finite_ac), (3, 8, 8), 3, sigma_min=s.model_sigma_range[0],
                            sigma_max=s.model_sigma_range[1], solver="euler", gamma=gs.gits.GAMMAS, refine=True,
                            **options).sigmas
    torch.testing.assert_close(s._edm_sigmas[:-1], expect)
    s.use_gits(other, (3, 8, 8), **{**options, "gamma": 1.0})   # other options: searched again
    assert s.config.gits_sigmas == {}
