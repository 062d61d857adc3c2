"""GITSScheduler in real flow-matching pipelines, offline: tiny random-weight SD3Transformer2DModel
in StableDiffusion3Pipeline (with CFG) and FluxTransformer2DModel in FluxPipeline (guidance-distilled,
dynamic shifting), prompt embeddings passed directly (no text encoders, no VAE: output_type="latent"),
against FlowMatchEulerDiscreteScheduler and DPMSolverMultistepScheduler on the same sigmas."""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (AutoencoderKL, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,  # noqa: E402
                       FluxImg2ImgPipeline, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel,
                       StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline)

from geosample.integrations.diffusers import GITSScheduler  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (fixtures)

STEPS, SIZE = 6, 64  # the pipelines' default VAE factor 8 (no VAE): 8x8 latents, Flux packs them to 16 tokens
EMB = 16
DPM2 = {"max_order": 2, "lower_order_final": False}
GITS = dict(teacher_steps=12, num_warmup=8, batch_size=8)
# GITS schedules continue from sigma = T - 1 (t = 0.999) after the start at inf; the float32 EDM state
# x = x_t / (1 - t) there is 1000x the latents, so its rounding reaches ~1e-5 on them
ATOL_NEAR_ONE = 1e-4


def _embeddings(seed, negative=True):
    g = torch.Generator().manual_seed(seed)
    e = dict(prompt_embeds=torch.randn(1, 5, EMB, generator=g), pooled_prompt_embeds=torch.randn(1, EMB, generator=g))
    if negative:
        e.update(negative_prompt_embeds=torch.randn(1, 5, EMB, generator=g),
                 negative_pooled_prompt_embeds=torch.randn(1, EMB, generator=g))
    return e


@pytest.fixture(scope="module")
def sd3():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=SIZE // 8, patch_size=1, in_channels=4, out_channels=4,
                                        num_layers=1, attention_head_dim=8, num_attention_heads=2,
                                        caption_projection_dim=EMB, joint_attention_dim=EMB,
                                        pooled_projection_dim=EMB).eval()
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def flux():
    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=EMB,
                                         pooled_projection_dim=EMB, axes_dims_rope=[2, 2, 4],
                                         guidance_embeds=True).eval()
    pipe = FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                        vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(pipe, scheduler, **kwargs):
    pipe.scheduler = scheduler
    negative = not isinstance(pipe, FluxPipeline)
    args = dict(height=SIZE, width=SIZE, guidance_scale=3.5, output_type="latent",
                generator=torch.Generator().manual_seed(0), **_embeddings(1, negative))
    return pipe(**{**args, **kwargs}).images


def test_sd3_euler_equals_flow_match_euler(sd3):
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    want = _latents(sd3, theirs, num_inference_steps=STEPS)
    ours = _latents(sd3, GITSScheduler.from_config(theirs.config, solver="euler"), sigmas=theirs.sigmas[:-1].tolist())
    torch.testing.assert_close(ours, want, rtol=0, atol=2e-6)
    assert float(want.std()) > 0.1


def test_sd3_dpmpp_equals_dpmsolver_multistep_flow(sd3):
    """Same sigmas.  DPM's flow mode calls the model at integer timesteps (floor(t * 1000)),
    GITSScheduler at t * 1000: with the transformer's timesteps floored the two agree to float32
    rounding; as they are, the random transformer's sensitivity to t moves the latents by < 2e-2."""
    theirs = DPMSolverMultistepScheduler(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction",
                                         solver_order=2, lower_order_final=False)
    want = _latents(sd3, theirs, num_inference_steps=STEPS)
    ours = GITSScheduler.from_config(theirs.config, solver="dpmpp", solver_options=DPM2,
                                     sigmas=theirs.sigmas.tolist())
    assert (_latents(sd3, ours, num_inference_steps=STEPS) - want).abs().max().item() < 2e-2
    hook = sd3.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: (args, {**kwargs, "timestep": kwargs["timestep"].floor()}), with_kwargs=True)
    try:
        got = _latents(sd3, ours, num_inference_steps=STEPS)
    finally:
        hook.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_sd3_img2img_euler_equals_flow_match_euler(sd3):
    """img2img (strength 0.6) starting from latents: scale_noise at the first kept timestep, then
    set_begin_index; a tiny VAE only supplies latent_channels (latents in, latents out)."""
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=2).eval()
    pipe = StableDiffusion3Img2ImgPipeline(transformer=sd3.transformer, scheduler=sd3.scheduler, vae=vae,
                                           text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                           text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    image = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    size = SIZE // 8 * pipe.vae_scale_factor
    theirs = FlowMatchEulerDiscreteScheduler(shift=3.0)
    want = _latents(pipe, theirs, image=image, strength=0.6, height=size, width=size, num_inference_steps=STEPS)
    ours = GITSScheduler.from_config(theirs.config, solver="euler")
    got = _latents(pipe, ours, image=image, strength=0.6, height=size, width=size, sigmas=theirs.sigmas[:-1].tolist())
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert ours.begin_index == 2 and float((want - image).abs().max()) > 0.1


def test_flux_img2img_euler_equals_flow_match_euler(flux):
    """FluxImg2ImgPipeline passes sigmas = linspace(1, 1 / N, N) and mu (it has no use_flow_sigmas
    check): GITSScheduler runs its own shifted schedule on them, equal to FlowMatchEuler's."""
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=2).eval()
    pipe = FluxImg2ImgPipeline(transformer=flux.transformer, scheduler=flux.scheduler, vae=vae, text_encoder=None,
                               tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    image = torch.randn(1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(3))
    size = SIZE // 8 * pipe.vae_scale_factor
    theirs = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    want = _latents(pipe, theirs, image=image, strength=0.6, height=size, width=size, num_inference_steps=STEPS)
    ours = GITSScheduler.from_config(theirs.config, solver="euler")
    got = _latents(pipe, ours, image=image, strength=0.6, height=size, width=size, num_inference_steps=STEPS)
    torch.testing.assert_close(ours.timesteps, theirs.timesteps, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert ours.begin_index == 2 and float(want.std()) > 0.1


def test_sd3_gits_searched_on_the_transformer(sd3):
    """use_gits on the SD3 transformer (conditional embeddings); then the pipeline runs the searched
    schedule, equal to FlowMatchEuler (shift 1) given the same flow times."""
    e = _embeddings(1, negative=False)
    ours = GITSScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver="euler")
    ours.use_gits(sd3.transformer, (4, SIZE // 8, SIZE // 8), **GITS,
                  model_kwargs={"encoder_hidden_states": e["prompt_embeds"],
                                "pooled_projections": e["pooled_prompt_embeds"]})
    got = _latents(sd3, ours, num_inference_steps=STEPS)
    assert float(ours.sigmas[0]) == 1.0 and ours.sigmas.numel() == STEPS + 1
    t = ours.sigmas[:-1].tolist()  # flow times, as FlowMatchEuler's sigmas
    want = _latents(sd3, FlowMatchEulerDiscreteScheduler(shift=1.0), sigmas=t)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL_NEAR_ONE)


def test_gits_searched_on_a_bfloat16_transformer(sd3):
    """Transformers are loaded in bf16: use_gits calls one with bf16 samples (the search itself runs
    in float32); a float32 sample raised "Input type (float) and bias type (BFloat16)"."""
    e = _embeddings(1, negative=False)
    transformer = copy.deepcopy(sd3.transformer).to(torch.bfloat16)
    ours = GITSScheduler.from_config(FlowMatchEulerDiscreteScheduler(shift=3.0).config, solver="euler")
    ours.use_gits(transformer, (4, SIZE // 8, SIZE // 8), **{**GITS, "num_warmup": 4, "batch_size": 4},
                  use_cache=False, model_kwargs={"encoder_hidden_states": e["prompt_embeds"].bfloat16(),
                                                 "pooled_projections": e["pooled_prompt_embeds"].bfloat16()})
    ours.set_timesteps(STEPS)
    assert float(ours.sigmas[0]) == 1.0 and ours.sigmas.numel() == STEPS + 1
    assert bool((ours.sigmas[1:-1].diff() < 0).all()) and float(ours.sigmas[-1]) == 0.0


def test_flux_euler_equals_flow_match_euler(flux):
    """FluxPipeline passes mu; with use_flow_sigmas in its config it passes no sigmas, and
    schedule='flow' is the pipeline's own linspace(1, 1 / N, N) shifted by e^mu."""
    want = _latents(flux, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), num_inference_steps=STEPS)
    ours = GITSScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config, solver="euler")
    torch.testing.assert_close(_latents(flux, ours, num_inference_steps=STEPS), want, rtol=0, atol=2e-6)
    assert float(want.std()) > 0.1


def test_flux_gits_searched_on_the_transformer(flux):
    """use_gits on Flux's transformer (timestep_scale 1, packed latents, ids and guidance as kwargs)."""
    e = _embeddings(1, negative=False)
    n = SIZE // 16  # packed latents: (2 n)^2 / 4 tokens of 4 * 4 channels
    img_ids = FluxPipeline._prepare_latent_image_ids(1, n, n, "cpu", torch.float32)
    kwargs = {"encoder_hidden_states": e["prompt_embeds"], "pooled_projections": e["pooled_prompt_embeds"],
              "txt_ids": torch.zeros(5, 3), "img_ids": img_ids, "guidance": torch.full([1], 3.5)}
    ours = GITSScheduler.from_config(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).config, solver="ipndm")
    ours.use_gits(flux.transformer, (n * n, 16), model_kwargs=kwargs, timestep_scale=1.0, **GITS)
    got = _latents(flux, ours, num_inference_steps=STEPS)
    assert float(ours.sigmas[0]) == 1.0 and bool(torch.isfinite(got).all()) and float(got.std()) > 0.1
    # the same schedule with Euler equals FlowMatchEuler on its flow times
    euler = GITSScheduler.from_config(ours.config, solver="euler")
    t = ours.sigmas[:-1].tolist()
    want = _latents(flux, FlowMatchEulerDiscreteScheduler(), sigmas=t)
    torch.testing.assert_close(_latents(flux, euler, num_inference_steps=STEPS), want, rtol=0, atol=ATOL_NEAR_ONE)
