"""GITSScheduler on flow-matching models (SD3 / Flux conventions) against diffusers' flow schedulers,
stepped with the same analytic velocity model (the exact flow of a Gaussian mixture)."""
import math

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler  # noqa: E402

import geosample as gs  # noqa: E402
from geosample import schedules  # noqa: E402
from geosample.denoisers.adapters import FlowDenoiser  # noqa: E402
from geosample.denoisers.gaussian import GaussianMixtureDenoiser  # noqa: E402
from geosample.denoisers.gaussian_flow import GaussianMixtureFlow  # noqa: E402
from geosample.integrations.diffusers import GITSScheduler  # noqa: E402

STEPS = 8
DPM2 = {"max_order": 2, "lower_order_final": False}


@pytest.fixture(scope="module")
def flow():
    g = torch.Generator().manual_seed(0)
    return GaussianMixtureFlow(GaussianMixtureDenoiser(torch.randn(3, 4, 4, 4, generator=g, dtype=torch.float64),
                                                       [0.3, 0.5, 0.2]))


@pytest.fixture(scope="module")
def noise():
    return torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))


def _run(scheduler, model, x, timestep_of=None):
    """The pipeline loop: model at each timestep (or at ``timestep_of(i)``), then step."""
    for i, t in enumerate(scheduler.timesteps):
        v = model(x, t if timestep_of is None else timestep_of(i))
        x = scheduler.step(v, t, x, return_dict=False)[0]
    return x


def _dpm(shift=3.0):
    return DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction",
                                       solver_order=2, lower_order_final=False)


@pytest.mark.parametrize("source,mu", [(dict(shift=3.0), None), (dict(use_dynamic_shifting=True), 0.8)])
def test_euler_equals_flow_match_euler(flow, noise, source, mu):
    """schedule='flow' is Flux's (N flow times 1 .. 1 / N, shifted); Euler equals FlowMatchEuler."""
    theirs = FlowMatchEulerDiscreteScheduler(**source)
    ours = GITSScheduler.from_config(theirs.config, solver="euler")
    assert (ours.config.use_flow_sigmas, ours.config.prediction_type, ours.config.schedule) == \
        (True, "flow_prediction", "flow")
    assert ours.init_noise_sigma == 1.0 and ours.config.shift == source.get("shift", 1.0)
    theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)  # as FluxPipeline calls it
    ours.set_timesteps(STEPS, mu=mu)  # a pipeline seeing use_flow_sigmas passes no sigmas
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=1e-6, atol=1e-4)
    assert math.isinf(float(ours._edm_sigmas[0])) and float(ours.sigmas[0]) == 1.0 and float(ours.sigmas[-1]) == 0.0
    torch.testing.assert_close(_run(ours, flow, noise), _run(theirs, flow, noise), rtol=0, atol=1e-6)


def test_euler_equals_flow_match_euler_on_its_own_sigmas(flow, noise):
    """FlowMatchEuler's default timesteps (SD3 without sigmas=) passed to GITSScheduler as flow sigmas."""
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(STEPS)
    ours = GITSScheduler.from_config(theirs.config, solver="euler")
    ours.set_timesteps(sigmas=theirs.sigmas)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(_run(ours, flow, noise), _run(theirs, flow, noise), rtol=0, atol=1e-6)



@pytest.mark.parametrize("source,mu", [(dict(shift=3.0), None), (dict(use_dynamic_shifting=True), 0.8)])
def test_sigmas_are_flow_times_as_flow_match_euler(flow, noise, source, mu, tmp_path):
    """In flow mode ``sigmas`` are FlowMatchEuler's (flow times, float32, then 0; the EDM sigmas the
    solver runs on, from inf, are internal); pipelines read them: LTX2's x0 = x_t - v * sigmas[i]
    (inf / NaN with the EDM sigmas) is finite and the step's D.  sigmas[i] is timesteps[i]'s time
    (Heun too); save_pretrained / from_pretrained give the same sigmas."""
    theirs = FlowMatchEulerDiscreteScheduler(**source)
    theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    for solver in ("ipndm", "heun"):
        ours = GITSScheduler.from_config(theirs.config, solver=solver)
        ours.set_timesteps(STEPS, mu=mu)
        assert ours.sigmas.dtype == theirs.sigmas.dtype and ours.sigmas.device == theirs.sigmas.device
        assert math.isinf(float(ours._edm_sigmas[0])) and float(ours.sigmas[-1]) == 0.0
        torch.testing.assert_close(ours.sigmas[:-1] * 1000, ours.timesteps)
        x = noise
        for i, t in enumerate(ours.timesteps):
            v = flow(x, t)
            out = ours.step(v, t, x)
            torch.testing.assert_close(x - v * ours.sigmas[i], out.pred_original_sample, rtol=0, atol=1e-5)
            x = out.prev_sample
    ours = GITSScheduler.from_config(theirs.config, solver="ipndm")
    ours.set_timesteps(STEPS, mu=mu)
    torch.testing.assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=1.2e-7)  # float32 rounding
    ours.save_pretrained(tmp_path)
    loaded = GITSScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(STEPS, mu=mu)
    assert torch.equal(loaded.sigmas, ours.sigmas) and torch.equal(loaded._edm_sigmas, ours._edm_sigmas)

def test_dpmpp_equals_dpmsolver_multistep_flow(flow, noise):
    """DPM-Solver++(2M) on DPMSolverMultistep's flow sigmas.  At the same model times the two agree to
    float32 rounding; DPM evaluates the model at integer timesteps, which alone moves it by ~1e-3."""
    theirs = _dpm()
    ours = GITSScheduler.from_config(theirs.config, solver="dpmpp", solver_options=DPM2)
    assert ours.config.use_flow_sigmas and ours.config.shift == 3.0
    theirs.set_timesteps(STEPS)
    ours.set_timesteps(sigmas=theirs.sigmas)
    at_sigma = lambda i: theirs.sigmas[i] * 1000  # noqa: E731
    torch.testing.assert_close(_run(ours, flow, noise, at_sigma), _run(theirs, flow, noise, at_sigma),
                               rtol=0, atol=2e-6)
    theirs.set_timesteps(STEPS)
    ours.set_timesteps(sigmas=theirs.sigmas)
    diff = (_run(ours, flow, noise) - _run(theirs, flow, noise)).abs().max().item()
    assert 1e-5 < diff < 1e-2


@pytest.mark.parametrize("source,mu", [(dict(shift=3.0), 0.9), (dict(shift=7.0), None),
                                       (dict(use_dynamic_shifting=True), 0.8)])
def test_pipeline_default_sigmas_are_the_configured_schedule(flow, noise, source, mu):
    """FluxImg2Img, Kontext, Qwen-Image, LTX, Lumina2 (with mu), HunyuanVideo, OmniGen (without) pass
    sigmas = linspace(1, 1 / N, N) for the scheduler to shift: that is N steps of the configured
    schedule, so Euler still equals FlowMatchEuler given the same call (a static-shift config ignores
    mu, as FlowMatchEuler does); with shift 1 they are the times themselves; other sigmas are used as given."""
    theirs = FlowMatchEulerDiscreteScheduler(**source)
    ours = GITSScheduler.from_config(theirs.config, solver="euler")
    theirs.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    ours.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS), mu=mu)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(_run(ours, flow, noise), _run(theirs, flow, noise), rtol=0, atol=1e-6)
    ours = GITSScheduler.from_config(theirs.config, shift=1.0, use_dynamic_shifting=False)
    ours.set_timesteps(sigmas=np.linspace(1.0, 1 / STEPS, STEPS))
    torch.testing.assert_close(ours.timesteps, torch.linspace(1000, 1000 / STEPS, STEPS))
    ours.set_timesteps(sigmas=[1.0, 0.8, 0.5])
    torch.testing.assert_close(ours.timesteps, torch.tensor([1000.0, 800.0, 500.0]))


def test_dynamic_shifting_from_dpm_config_uses_mu(flow, noise):
    theirs = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                         use_dynamic_shifting=True)
    ours = GITSScheduler.from_config(theirs.config)
    ours.set_timesteps(STEPS, mu=0.7)
    t = schedules.sigma_to_flow_t(ours._edm_sigmas[:-1])
    torch.testing.assert_close(t, schedules.flow_time_shift(torch.linspace(1, 1 / STEPS, STEPS, dtype=torch.float64),
                                                            0.7))
    with pytest.raises(ValueError, match="mu"):
        ours.set_timesteps(STEPS)


@pytest.mark.parametrize("solver", sorted(gs.SOLVERS))
def test_every_solver_equals_gs_sample_through_flow_denoiser(flow, noise, solver):
    """An unedited flow run is gs.sample on FlowDenoiser with the same EDM sigmas (from sigma = inf)."""
    ours = GITSScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", schedule="flow", shift=3.0,
                         solver=solver)
    ours.set_timesteps(STEPS)
    want = gs.sample(FlowDenoiser(flow), noise.double(), ours._edm_sigmas, solver)
    exact = schedules.sigma_to_flow_t(ours.eval_sigmas) * 1000  # the float32 timesteps round t
    torch.testing.assert_close(_run(ours, flow, noise.double(), lambda i: exact[i]), want, rtol=0, atol=1e-10)


def test_flow_sigmas_timesteps_and_noise(noise):
    ours = GITSScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    ours.set_timesteps(sigmas=[1.0, 0.8, 0.5, 0.25])  # flow times, used as given, then a final 0
    torch.testing.assert_close(ours.timesteps, torch.tensor([1000.0, 800.0, 500.0, 250.0]))
    torch.testing.assert_close(ours.sigmas, torch.tensor([1, 0.8, 0.5, 0.25, 0]))
    ours.set_timesteps(timesteps=[900.0, 300.0])
    torch.testing.assert_close(ours.sigmas, torch.tensor([0.9, 0.3, 0]))
    theirs = FlowMatchEulerDiscreteScheduler()
    theirs.set_timesteps(sigmas=[0.9, 0.3])
    x0 = torch.randn(noise.shape, generator=torch.Generator().manual_seed(2))
    t = ours.timesteps[:1].repeat(2)
    torch.testing.assert_close(ours.scale_noise(x0, t, noise), theirs.scale_noise(x0, t, noise))
    torch.testing.assert_close(ours.add_noise(x0, noise, t), 0.1 * x0 + 0.9 * noise)


def test_step_and_noise_input_errors(noise):
    """Non-tensor inputs and a timestep count that fits no batch are TypeError / ValueError, not
    AttributeError or a broadcasting RuntimeError."""
    ours = GITSScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    ours.set_timesteps(4)
    t = ours.timesteps[0]
    with pytest.raises(TypeError, match=r"model_output must be a torch.Tensor, got tuple.*\.sample or \[0\]"):
        ours.step((noise,), t, noise)
    with pytest.raises(TypeError, match="sample must be a torch.Tensor, got NoneType"):
        ours.step(noise, t, None)
    with pytest.raises(TypeError, match="noise must be a torch.Tensor"):
        ours.scale_noise(noise, ours.timesteps[:1], None)
    with pytest.raises(ValueError, match="timesteps has 3 entries; expected 1 or one per sample"):
        ours.scale_noise(noise, ours.timesteps[:3], noise)
    assert ours.scale_noise(noise, ours.timesteps[1:2].repeat(2), noise).shape == noise.shape


def test_flow_config_errors():
    with pytest.raises(ValueError, match="go together"):
        GITSScheduler(use_flow_sigmas=True)
    with pytest.raises(ValueError, match="go together"):
        GITSScheduler(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="flow-matching"):
        GITSScheduler(schedule="flow")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        GITSScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", schedule="discrete")
    with pytest.raises(ValueError, match="shift_terminal"):
        GITSScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift_terminal=0.1).config)
    with pytest.raises(ValueError, match="num_train_timesteps >= 2"):  # was a ZeroDivisionError
        GITSScheduler.from_config(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1).config)
    with pytest.raises(ValueError, match="mu"):
        GITSScheduler().set_timesteps(4, mu=0.5)
    with pytest.raises(ValueError, match="flow times"):
        GITSScheduler(use_flow_sigmas=True, prediction_type="flow_prediction").set_timesteps(sigmas=[1.5, 0.5])
    ours = GITSScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="sigmas give 2 steps, got num_inference_steps=5"):  # FlowMatchEuler's check
        ours.set_timesteps(5, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="sigmas give 2 steps, got num_inference_steps=5"):
        ours.set_timesteps(5, sigmas=[1.0, 0.6])
    with pytest.raises(ValueError, match="timesteps give 2 steps, got num_inference_steps=3"):
        ours.set_timesteps(3, timesteps=[1000.0, 500.0])
    ours.set_timesteps(2, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="only sigmas.0. may be inf"):
        ours.set_timesteps(timesteps=[1000.0, 1000.0])
    ours.set_timesteps(np.int64(4))  # numpy ints, as diffusers' schedulers take them
    assert ours.timesteps.numel() == 4


@pytest.mark.parametrize("source", [dict(shift_terminal=0.1), dict(use_karras_sigmas=True),
                                    dict(use_dynamic_shifting=True, time_shift_type="linear")])
def test_flow_config_with_an_unreproduced_schedule_takes_another(source):
    """The source's own schedule options are refused for schedule='flow' only: with sigmas= or
    another schedule (as the error says) the config is usable; a step option stays refused."""
    config = FlowMatchEulerDiscreteScheduler(**source).config
    with pytest.raises(ValueError, match="another schedule"):
        GITSScheduler.from_config(config)
    ours = GITSScheduler.from_config(config, sigmas=[1.0, 0.6, 0.3])
    ours.set_timesteps()
    torch.testing.assert_close(ours.timesteps, torch.tensor([1000.0, 600.0, 300.0]))
    assert GITSScheduler.from_config(config, schedule="gits").config.schedule == "gits"
    with pytest.raises(ValueError, match="stochastic_sampling"):
        GITSScheduler.from_config(FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, **source).config,
                                  schedule="gits")


def test_use_gits_on_a_flow_model_and_save_load(flow, noise, tmp_path):
    """GITS on a flow model: inf, then the searched schedule over the finite range, then 0; the
    searched sigmas travel with save_pretrained, flow mode too."""
    ours = GITSScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver="ipndm")
    ours.use_gits(flow, (4, 4, 4), teacher_steps=12, num_warmup=8, batch_size=8, gamma=1.15, refine=False)
    ours.set_timesteps(5)
    assert math.isinf(float(ours._edm_sigmas[0])) and float(ours.sigmas[0]) == 1.0 and float(ours.sigmas[-1]) == 0.0
    assert ours.sigmas.numel() == 6
    x = _run(ours, flow, noise.double())
    ref = gs.sample(FlowDenoiser(flow), noise.double(), torch.cat([schedules.flow_shifted(400, shift=3.0),
                                                                   torch.zeros(1, dtype=torch.float64)]), "ipndm")
    assert bool(torch.isfinite(x).all()) and (x - ref).abs().max().item() < 1.0
    again = GITSScheduler.from_config(ours.config)  # in memory: the searched sigmas are no defaults
    assert again.config.schedule == "gits" and again.config.gits_sigmas == ours.config.gits_sigmas
    ours.save_pretrained(tmp_path)
    loaded = GITSScheduler.from_pretrained(tmp_path)
    assert loaded.config.use_flow_sigmas and loaded.config.schedule == "gits"
    loaded.set_timesteps(5)
    torch.testing.assert_close(loaded.sigmas, ours.sigmas)


def test_config_sigmas_as_a_tensor_save_and_load(tmp_path):
    """sigmas= given as a tensor (FlowMatchEuler's own .sigmas) is kept as a list, so save_pretrained
    writes it (a tensor raised "Object of type Tensor is not JSON serializable"); likewise gits_sigmas."""
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    theirs.set_timesteps(STEPS)
    ours = GITSScheduler.from_config(theirs.config, solver="euler", sigmas=theirs.sigmas)
    ours.save_pretrained(tmp_path)
    loaded = GITSScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(STEPS)
    torch.testing.assert_close(loaded.timesteps, theirs.timesteps, rtol=1e-6, atol=1e-4)
    # gits_sigmas keyed by int steps with tensor values (a step count said "no 2-step schedule ... found: [2]")
    ours = GITSScheduler.from_config(theirs.config, schedule="gits", gits_sigmas={2: torch.tensor([998.0, 10.0, 0.5])})
    ours.set_timesteps(4)
    torch.testing.assert_close(ours._edm_sigmas, torch.tensor([math.inf, 998.0, 10.0, 0.5, 0.0], dtype=torch.float64))
    ours.save_pretrained(tmp_path)
    assert GITSScheduler.from_pretrained(tmp_path).config.gits_sigmas == {"2": [998.0, 10.0, 0.5]}


def test_wan_style_unipc_config_and_video_latents():
    """UniPCMultistep with use_flow_sigmas / flow_shift (Wan's) gives a flow scheduler; 5-D bf16
    latents step in a float32 state and come back in bf16."""
    from diffusers import UniPCMultistepScheduler
    ours = GITSScheduler.from_config(UniPCMultistepScheduler(use_flow_sigmas=True, flow_shift=5.0,
                                                             prediction_type="flow_prediction").config, solver="unipc")
    assert (ours.config.use_flow_sigmas, ours.config.shift, ours.config.schedule) == (True, 5.0, "flow")
    ours.set_timesteps(STEPS)
    means = torch.randn(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    video = GaussianMixtureFlow(GaussianMixtureDenoiser(means, [0.4, 0.6]))
    x = torch.randn(2, 2, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    want = gs.sample(FlowDenoiser(video), x.double(), ours._edm_sigmas, "unipc")
    got = _run(ours, video, x.bfloat16())
    assert got.dtype == torch.bfloat16 and (got.double() - want).abs().max().item() < 0.02  # bf16 output rounding
