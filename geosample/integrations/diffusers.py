"""``GITSScheduler``: any geosample solver on a GITS (or other) schedule inside diffusers pipelines.

    pipe.scheduler = GITSScheduler.from_config(pipe.scheduler.config, solver="ipndm")
    pipe.scheduler.use_gits(pipe.unet, shape)    # optional: search GITS schedules on the model

Design.  The scheduler works in VP space like diffusers' DDIM / DPM-Solver schedulers
(``init_noise_sigma = 1``, ``scale_model_input`` is the identity), so any pipeline can drive it.
Every geosample solver is a generator that yields each (x, sigma) it needs evaluated
(:func:`geosample.solvers.solve`); the scheduler holds that generator and, at each ``step``,
converts the model output to the denoiser value D
(:func:`~geosample.denoisers.adapters.vp_to_denoised`) and sends it in: the next request is the
sample the model must see.  So every solver (and every solver registered later) runs unchanged,
with its multistep history kept inside the generator, and the result is ``gs.sample`` on the
same model through :class:`~geosample.denoisers.adapters.EpsDenoiser`.  ``timesteps`` lists every
model evaluation (Heun and DPM-2 evaluate twice per interval), found by one dry run of the solver.

``num_inference_steps = N`` means N intervals: the schedule family with N - 1 steps over the
model's sigma range, then the final denoise to 0 (``denoise_to_zero=True``, as diffusers' and
k-diffusion's schedules do); with ``denoise_to_zero=False``, N steps that stop at sigma_min.
The pipeline must run the whole schedule and pass back each ``prev_sample`` unchanged
(img2img and latent-blending inpainting are not supported; ``step`` raises if they are tried).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .. import schedules
from ..denoisers.adapters import EpsDenoiser, vp_to_denoised, _check_prediction_type
from ..solvers import get_solver, sample, solve

__all__ = ["GITSScheduler", "GITSSchedulerOutput"]

FAMILIES = ("polynomial", "logsnr", "time_uniform", "discrete", "gits")


@dataclass
class GITSSchedulerOutput(BaseOutput):
    """prev_sample: the next VP sample; pred_original_sample: the denoiser value D of this step."""
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _vp_scale(sigma: float) -> float:
    """sqrt(alpha) = 1 / sqrt(1 + sigma^2): x_vp = x / sqrt(1 + sigma^2)."""
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


class GITSScheduler(SchedulerMixin, ConfigMixin):
    """Runs a geosample solver step by step for a VP model trained on ``alphas_cumprod``.

    Config: the model's betas (as in every diffusers scheduler) and ``prediction_type``
    ("epsilon" | "v_prediction" | "sample"); ``solver`` (any name in ``gs.SOLVERS``) with
    ``solver_options`` (no ``afs``: the pipeline evaluates the model on its first sample itself);
    ``schedule`` ("polynomial" | "logsnr" | "time_uniform" | "discrete" | "gits") with ``rho``
    (polynomial, time_uniform, discrete; the family's default when None) over [sigma_min,
    sigma_max] (default: the model's range); ``sigmas``, a fixed schedule (e.g. a saved GITS one)
    that overrides ``schedule``; ``denoise_to_zero``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 solver: str = "ipndm", solver_options: dict | None = None,
                 schedule: str = "polynomial", rho: float | None = None, sigma_min: float | None = None,
                 sigma_max: float | None = None, sigmas: list | None = None, denoise_to_zero: bool = True):
        _check_prediction_type(prediction_type)
        spec = get_solver(solver)
        unknown = sorted(set(solver_options or {}) - set(spec.defaults))
        if unknown:
            raise TypeError(f"solver {solver!r} got unknown options {unknown}; its options: {sorted(spec.defaults)}")
        if schedule not in FAMILIES:
            raise ValueError(f"schedule must be one of {FAMILIES}, got {schedule!r}")
        if rho is not None and schedule in ("logsnr", "gits"):
            raise ValueError(f"rho does not apply to schedule={schedule!r} (pass GITS options to use_gits)")
        ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                             beta_schedule=beta_schedule, trained_betas=trained_betas)
        self.alphas_cumprod = ddpm.alphas_cumprod.to(torch.float64)
        model_sigmas = schedules.discrete_sigmas(self.alphas_cumprod)
        self.model_sigma_range = (float(model_sigmas[0]), float(model_sigmas[-1]))
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.sigmas = self.eval_sigmas = self.timesteps = None
        self._gits = None
        self._gits_cache: dict[int, torch.Tensor] = {}
        self._reset()

    @property
    def order(self) -> int:
        """Model evaluations per interval of the schedule (diffusers uses it for progress bars)."""
        return get_solver(self.config.solver).evals_per_step

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def _reset(self) -> None:
        self._solver = None   # the running solve() generator
        self._calls = 0       # model outputs consumed this run
        self._pending = None  # (EDM x, VP sample) the model must evaluate next

    # ---- schedules -------------------------------------------------------------------------
    def use_gits(self, model, shape, model_kwargs: dict | None = None, **search_options) -> None:
        """Search GITS schedules on ``model`` (the pipeline's UNet, through :class:`EpsDenoiser`)
        lazily: at each ``set_timesteps`` with a new step count, ``gs.gits.search(denoiser, shape,
        steps, **search_options)`` (shape: one sample, e.g. (4, 64, 64); sigma_min / sigma_max
        default to the scheduler's range, device to the model's); results are cached per step
        count.  Sets ``schedule="gits"``."""
        self._gits = (EpsDenoiser(model, self.alphas_cumprod, self.config.prediction_type, model_kwargs),
                      shape, search_options)
        self._gits_cache.clear()
        self.register_to_config(schedule="gits")

    def _family(self, steps: int) -> torch.Tensor:
        cfg = self.config
        lo = self.model_sigma_range[0] if cfg.sigma_min is None else cfg.sigma_min
        hi = self.model_sigma_range[1] if cfg.sigma_max is None else cfg.sigma_max
        rho = {} if cfg.rho is None else {"rho": cfg.rho}
        if cfg.schedule == "gits":
            if self._gits is None:
                raise ValueError("schedule='gits' needs a model to search on: call scheduler.use_gits(pipe.unet, "
                                 "shape) first, or pass sigmas=, or set the config's sigmas")
            if steps not in self._gits_cache:
                from .. import gits  # imported lazily: only GITS schedules need the search
                denoiser, shape, options = self._gits
                options = {"sigma_min": lo, "sigma_max": hi, "device": getattr(denoiser.model, "device", "cpu"),
                           **options}
                found = gits.search(denoiser, shape, steps, **options)
                self._gits_cache[steps] = torch.as_tensor(found.sigmas, dtype=torch.float64).cpu()
            return self._gits_cache[steps]
        if cfg.schedule == "discrete":
            return schedules.discrete(steps, self.alphas_cumprod, sigma_min=lo, sigma_max=hi, **rho)
        if cfg.schedule == "logsnr":
            return schedules.logsnr(steps, lo, hi)
        return getattr(schedules, cfg.schedule)(steps, lo, hi, **rho)

    def _grid(self, num_inference_steps, sigmas, timesteps) -> torch.Tensor:
        if sigmas is not None and timesteps is not None:
            raise ValueError("pass sigmas or timesteps, not both")
        zero = torch.zeros(1, dtype=torch.float64)
        if sigmas is not None:
            return schedules.check_sigmas(sigmas)
        if timesteps is not None:
            t = torch.as_tensor(timesteps, dtype=torch.float64).cpu()
            return schedules.check_sigmas(torch.cat([schedules.timestep_to_sigma(t, self.alphas_cumprod), zero]))
        if self.config.sigmas is not None:
            grid = schedules.check_sigmas(self.config.sigmas)
            if num_inference_steps not in (None, grid.numel() - 1):
                raise ValueError(f"the config's sigmas have {grid.numel() - 1} steps, "
                                 f"got num_inference_steps={num_inference_steps}")
            return grid
        if num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
        final = int(bool(self.config.denoise_to_zero))
        if num_inference_steps < 1 + final:
            raise ValueError(f"num_inference_steps must be >= {1 + final}, got {num_inference_steps}")
        grid = self._family(num_inference_steps - final)
        return torch.cat([grid, zero]) if final else grid

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, timesteps=None) -> None:
        """Fix the schedule and list every model evaluation.

        sigmas: an explicit EDM schedule (decreasing, optionally ending in 0); timesteps: model
        timesteps (decreasing), mapped to sigmas by log-sigma interpolation, then a final 0.
        Sets ``self.sigmas`` (float64, CPU), ``self.eval_sigmas`` and ``self.timesteps``
        (continuous, float32, on ``device``): one entry per model call.
        """
        grid = self._grid(num_inference_steps, sigmas, timesteps)
        probed: list[float] = []

        def probe(x, sigma):
            probed.append(float(sigma[0]))
            return torch.zeros_like(x)

        sample(probe, torch.zeros(1, dtype=torch.float64), grid, self.config.solver,
               **(self.config.solver_options or {}))
        self.sigmas = grid
        self.num_inference_steps = grid.numel() - 1
        self.eval_sigmas = torch.tensor(probed, dtype=torch.float64)
        self.timesteps = schedules.sigma_to_timestep(self.eval_sigmas, self.alphas_cumprod).to(device, torch.float32)
        self._reset()

    # ---- stepping --------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The identity: samples are already in the model's VP scale."""
        return sample

    @property
    def step_index(self) -> int:
        """How many model outputs this run has consumed."""
        return self._calls

    def _advance(self, denoised: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """Send D to the solver (None starts it): (next EDM x, its sigma) or (result, sigmas[-1])."""
        try:
            x, sigma = self._solver.send(denoised)
        except StopIteration as done:
            return done.value, float(self.sigmas[-1])
        return x, sigma

    def _check_step(self, timestep, sample: torch.Tensor) -> int:
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        k = self.step_index
        if k >= len(self.timesteps):
            raise ValueError(f"step called more than the {len(self.timesteps)} times the schedule needs; "
                             "call set_timesteps to start again")
        t = torch.as_tensor(timestep, dtype=torch.float32).cpu()
        if t.numel() != 1 or not torch.isclose(t.flatten()[0], self.timesteps[k].cpu(), rtol=1e-5, atol=1e-3):
            raise ValueError(f"step {k} expects timestep {float(self.timesteps[k]):.4f}, got {timestep}: "
                             "GITSScheduler runs its whole schedule from the first timestep (no img2img)")
        if k > 0 and not torch.equal(sample, self._pending[1]):
            raise ValueError("the sample passed to step differs from the previous prev_sample: "
                             "GITSScheduler cannot follow latents edited between steps")
        return k

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             generator=None):
        """Consume the model output at ``timestep`` and return the sample for the next call (VP).

        generator: accepted for pipelines that pass one; the solvers are deterministic.
        After the last evaluation, prev_sample is the solver's result.
        """
        k = self._check_step(timestep, sample)
        sigma = float(self.eval_sigmas[k])
        if k == 0:
            x = sample / _vp_scale(sigma)
            self._solver = solve(x / sigma, self.sigmas, self.config.solver, **(self.config.solver_options or {}))
            self._advance(None)  # the first request is (x, sigma) itself
        else:
            x = self._pending[0]
        denoised = vp_to_denoised(model_output, x, sigma, self.config.prediction_type)
        self._calls += 1
        x_next, sigma_next = self._advance(denoised)
        prev_sample = (x_next * _vp_scale(sigma_next)).to(sample.dtype)
        self._pending = (x_next, prev_sample)
        if not return_dict:
            return (prev_sample, denoised)
        return GITSSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_vp = (x0 + sigma n) / sqrt(1 + sigma^2) with sigma = timestep_to_sigma(timesteps) per sample."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).cpu().flatten()
        s = schedules.timestep_to_sigma(t, self.alphas_cumprod).to(original_samples.device, original_samples.dtype)
        s = s.reshape(-1, *([1] * (original_samples.dim() - 1)))
        return (original_samples + s * noise) * torch.rsqrt(1 + s * s)
