"""GITSScheduler in real diffusers pipelines (tiny random-weight Stable Diffusion, built offline)
against diffusers' own schedulers where the maths coincide: Euler in sigma = DDIM (eta 0) =
EulerDiscrete, multistep DPM-Solver++(2M) = DPMSolverMultistep, Heun = HeunDiscrete."""
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from diffusers import (AutoencoderKL, DDIMPipeline, DDIMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                       EulerDiscreteScheduler, HeunDiscreteScheduler, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: E402

from geosample.integrations.diffusers import GITSScheduler  # noqa: E402
from tiny_diffusers import one_thread  # noqa: E402,F401  (fixtures)

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
STEPS, SIZE = 5, 16  # 16x16 images, 8x8 latents
ATOL = 2e-4




@pytest.fixture(scope="module")
def components(tmp_path_factory):
    """A tiny random-weight Stable Diffusion: CLIP text encoder and a letters-only tokenizer, UNet, VAE."""
    d = tmp_path_factory.mktemp("tokenizer")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                          pad_token_id=1)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=SIZE // 2, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(4, 8), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=2)
    return dict(vae=vae.eval(), text_encoder=CLIPTextModel(text).eval(), unet=unet.eval(),
                tokenizer=CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=8),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def _pipe(cls, components, scheduler):
    pipe = cls(**components, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ddim():
    return DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=1,
                         timestep_spacing="leading")


def _ours_like_ddim(solver="euler"):
    """Euler in sigma on DDIM's own timesteps (schedule='discrete' with its leading spacing): DDIM, eta = 0."""
    return GITSScheduler.from_config(_ddim().config, solver=solver, schedule="discrete")


def _images(pipe, **kwargs):
    args = dict(prompt="a cat", height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=4.0,
                generator=torch.Generator().manual_seed(0), output_type="pt")
    return pipe(**{**args, **kwargs}).images


def test_txt2img_cfg_equals_ddim(components):
    ours = _images(_pipe(StableDiffusionPipeline, components, _ours_like_ddim()))
    want = _images(_pipe(StableDiffusionPipeline, components, _ddim()))
    torch.testing.assert_close(ours, want, rtol=0, atol=ATOL)
    assert float(ours.std()) > 0.01


def test_txt2img_cfg_equals_dpmsolver_multistep(components):
    dpm = DPMSolverMultistepScheduler(**SD_BETAS, solver_order=2)
    dpm.set_timesteps(STEPS)
    ours = GITSScheduler.from_config(dpm.config, solver="dpmpp", sigmas=dpm.sigmas.tolist(),
                                     solver_options={"max_order": 2, "lower_order_final": False})
    got = _images(_pipe(StableDiffusionPipeline, components, ours))
    want = _images(_pipe(StableDiffusionPipeline, components, DPMSolverMultistepScheduler(**SD_BETAS, solver_order=2)))
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("theirs, solver", [(EulerDiscreteScheduler, "euler"), (HeunDiscreteScheduler, "heun")])
def test_txt2img_cfg_equals_karras_style_schedulers(components, theirs, solver):
    """Euler/Heun start from x_T = sigma_0 n (k-diffusion): give our VP scheduler that same x_T."""
    ref = theirs(**SD_BETAS)
    ref.set_timesteps(STEPS)
    sigmas = torch.unique_consecutive(ref.sigmas.double())
    ours = GITSScheduler.from_config(ref.config, solver=solver, sigmas=sigmas.tolist())
    n = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(1))
    s0 = float(sigmas[0])
    got = _images(_pipe(StableDiffusionPipeline, components, ours), latents=n * s0 / (1 + s0 * s0) ** 0.5)
    want = _images(_pipe(StableDiffusionPipeline, components, theirs(**SD_BETAS)), latents=n)
    assert len(ours.timesteps) == len(ref.timesteps)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def _init_image():
    g = torch.Generator().manual_seed(2)
    return torch.rand(1, 3, SIZE, SIZE, generator=g)


@pytest.mark.parametrize("theirs, solver", [(_ddim, "euler"), (HeunDiscreteScheduler, "heun")])
def test_img2img_equals_diffusers(components, theirs, solver):
    """strength 0.6: the pipeline slices timesteps[t_start * order:] and calls set_begin_index."""
    ref = theirs() if theirs is _ddim else theirs(**SD_BETAS)
    if solver == "euler":
        ours = _ours_like_ddim()
    else:
        ref.set_timesteps(STEPS)
        ours = GITSScheduler.from_config(ref.config, solver=solver,
                                         sigmas=torch.unique_consecutive(ref.sigmas.double()).tolist())
    got = _images(_pipe(StableDiffusionImg2ImgPipeline, components, ours), image=_init_image(), strength=0.6)
    want = _images(_pipe(StableDiffusionImg2ImgPipeline, components, theirs() if theirs is _ddim else theirs(**SD_BETAS)),
                   image=_init_image(), strength=0.6)
    assert ours.begin_index == (STEPS - int(STEPS * 0.6)) * ours.order
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_inpainting_with_latent_blending_equals_ddim(components):
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = 1.0
    args = dict(image=_init_image(), mask_image=mask)
    got = _images(_pipe(StableDiffusionInpaintPipeline, components, _ours_like_ddim()), **args)
    want = _images(_pipe(StableDiffusionInpaintPipeline, components, _ddim()), **args)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def _shrink_latents(pipe, i, t, kwargs):
    """A callback that edits the latents between steps."""
    return {"latents": kwargs["latents"] * 0.9 + 0.05 * (i == 1)}


@pytest.mark.parametrize("case", ["ddim", "dpmsolver"])
def test_callback_editing_latents(components, case):
    if case == "ddim":
        ours, theirs = _ours_like_ddim(), _ddim()
    else:
        theirs = DPMSolverMultistepScheduler(**SD_BETAS, solver_order=2)
        theirs.set_timesteps(STEPS)
        ours = GITSScheduler.from_config(theirs.config, solver="dpmpp", sigmas=theirs.sigmas.tolist(),
                                         solver_options={"max_order": 2, "lower_order_final": False})
    got = _images(_pipe(StableDiffusionPipeline, components, ours), callback_on_step_end=_shrink_latents)
    want = _images(_pipe(StableDiffusionPipeline, components, theirs), callback_on_step_end=_shrink_latents)
    plain = _images(_pipe(StableDiffusionPipeline, components, ours))
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert (got - plain).abs().max() > 1e-3  # the edit mattered


def test_ddim_pipeline_equals_ddim():
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    ddim = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")  # not a default:
    runs = []  # from_config leaves a source's default values out
    for scheduler in (GITSScheduler.from_config(ddim.config, solver="euler", schedule="discrete"), ddim):
        pipe = DDIMPipeline(unet=unet, scheduler=ddim)
        pipe.scheduler = scheduler  # DDIMPipeline converts its constructor's scheduler to DDIM
        pipe.set_progress_bar_config(disable=True)
        runs.append(pipe(batch_size=1, generator=torch.Generator().manual_seed(3), num_inference_steps=STEPS,
                         output_type="np").images)
    torch.testing.assert_close(torch.from_numpy(runs[0]), torch.from_numpy(runs[1]), rtol=0, atol=ATOL)
