"""``GITSScheduler``: any geosample solver on a GITS (or other) schedule inside diffusers pipelines.

    pipe.scheduler = GITSScheduler.from_config(pipe.scheduler.config, solver="ipndm")
    pipe.scheduler.use_gits(pipe.unet, shape)    # optional: search GITS schedules on the model

Design.  The scheduler works in VP space like diffusers' DDIM / DPM-Solver schedulers
(``init_noise_sigma = 1``, ``scale_model_input`` is the identity), so any pipeline can drive it.
It runs the solver's own plan (:mod:`geosample.solvers.plan`), the description ``gs.sample`` and
the fused sampler run too: each ``step`` turns the model output into the denoiser value D
(:func:`~geosample.denoisers.adapters.vp_to_denoised`) at the sample it is given, applies the
solver's update, and returns the point of the next model evaluation.  So latents edited between
steps (inpainting's blending, ``callback_on_step_end``) are stepped from as given, every
registered solver works, and an unedited run equals ``gs.sample`` through
:class:`~geosample.denoisers.adapters.EpsDenoiser`.  ``timesteps`` lists every model evaluation
(Heun and DPM-2 evaluate twice per interval; ``order`` says how many).

``num_inference_steps = N`` means N intervals: the schedule family with N - 1 steps over the
model's sigma range, then the final denoise to 0 (``denoise_to_zero=True``, as diffusers' and
k-diffusion's schedules do); with ``denoise_to_zero=False``, N steps that stop at sigma_min.
img2img: ``set_begin_index(k)`` (or a first timestep later in ``timesteps``) starts the solver
afresh on the rest of the schedule from the sample given, as diffusers' multistep schedulers do.
A zero-terminal-SNR model (``rescale_betas_zero_snr=True``) has sigma_max = inf: schedules then
start at inf (see docs/diffusers.md).

Flow matching (``use_flow_sigmas=True``, ``prediction_type="flow_prediction"``; ``from_config`` of a
``FlowMatchEulerDiscreteScheduler`` or flow DPM-Solver config sets both): the samples are
x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0 at timestep t * num_train_timesteps,
and the solver runs on the same ODE in EDM form, sigma = t / (1 - t), x = x_t / (1 - t), starting at
sigma = inf when t = 1.  ``sigmas=`` are then flow times in [0, 1], used as given, and the
``sigmas`` attribute holds flow times too, as FlowMatchEulerDiscreteScheduler's (pipelines read it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
try:
    from diffusers import DDPMScheduler
except ImportError as e:
    raise ImportError("geosample.integrations.diffusers needs diffusers: pip install 'geosample-diffusion[diffusers]'") from e
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from .. import schedules
from ..denoisers.adapters import EpsDenoiser, FlowDenoiser, flow_to_denoised, vp_to_denoised, _check_prediction_type
from ..solvers import amed as _amed
from ..solvers import get_solver
from ..solvers.base import dynamic_threshold
from ..solvers.plan import Run, plan
from ..solvers.sampling import _check_options, check_grid, state_dtype

__all__ = ["GITSScheduler", "GITSSchedulerOutput"]

FAMILIES = ("polynomial", "logsnr", "time_uniform", "discrete", "gits", "flow")
SPACINGS = ("linspace", "leading", "trailing")
FLOW = "flow_prediction"  # diffusers' name for velocity (v = noise - x0) prediction
# source-config options whose steps GITSScheduler does not reproduce, and those of the source's schedule
# (refused only when that schedule is asked for: schedule="flow" without sigmas); from_config refuses them
_FLOW_UNSUPPORTED = ("invert_sigmas", "stochastic_sampling")
_FLOW_SCHEDULE_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


@dataclass
class GITSSchedulerOutput(BaseOutput):
    """prev_sample: the next VP sample; pred_original_sample: the denoiser value D of this step."""
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def _scale(sigma: float, flow: bool) -> float:
    """The model's sample per EDM state at ``sigma``: 1 / sqrt(1 + sigma^2) (VP) or 1 / (1 + sigma)
    (flow, x_t = x (1 - t)); 1 at sigma = inf, where the state is the sample itself (the noise)."""
    if math.isinf(sigma):
        return 1.0
    return 1.0 / (1.0 + sigma) if flow else 1.0 / math.sqrt(1.0 + sigma * sigma)


def _pipeline_steps(sigmas) -> int:
    """N when ``sigmas`` are ``np.linspace(1, 1 / N, N)`` (to 1e-6), the flow times that most diffusers
    flow pipelines (FluxImg2Img, Kontext, Fill, Control, Chroma, Qwen-Image, LTX, Lumina2 with ``mu``;
    HunyuanVideo, HunyuanImage, OmniGen without) pass for the scheduler to shift, i.e. their stand-in
    for "N steps"; else 0."""
    t = torch.as_tensor(sigmas, dtype=torch.float64).cpu().flatten()
    n = t.numel()
    uniform = n and torch.allclose(t, torch.linspace(1, 1 / n, n, dtype=torch.float64), rtol=0, atol=1e-6)
    return n if uniform else 0


def _check_tensors(**tensors) -> None:
    """TypeError unless each keyword is a floating-point tensor."""
    for name, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            hint = " (a model's output: take .sample or [0])" if name == "model_output" else ""
            raise TypeError(f"{name} must be a torch.Tensor, got {type(v).__name__}{hint}")
        if not v.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {v.dtype}")


def _check_gits_sigmas(gits_sigmas) -> dict:
    """``{str(steps): [steps + 1 decreasing sigmas]}``, each entry checked (ValueError naming it)."""
    if not isinstance(gits_sigmas, dict):
        raise TypeError(f"gits_sigmas must be a dict {{steps: sigmas}}, got {type(gits_sigmas).__name__}")
    out = {}
    for k, v in gits_sigmas.items():
        try:
            steps = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"gits_sigmas keys must be step counts, got {k!r}") from None
        sigmas = check_grid(torch.as_tensor(v, dtype=torch.float64).flatten())
        if steps < 1 or str(steps) != str(k).strip() or sigmas.numel() != steps + 1:
            raise ValueError(f"gits_sigmas[{k!r}] must be a {k}-step schedule ({steps + 1} sigmas), "
                             f"got {sigmas.numel()} sigmas")
        out[str(steps)] = sigmas.tolist()
    return out


def _check_clipping(clip_sample_range: float, ratio: float, sample_max_value: float) -> None:
    if not (math.isfinite(clip_sample_range) and clip_sample_range > 0):
        raise ValueError(f"clip_sample_range must be a finite number > 0, got {clip_sample_range}")
    if not 0 < ratio <= 1:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio}")
    if not sample_max_value >= 1:
        raise ValueError(f"sample_max_value must be >= 1 (the threshold s is clamped to [1, sample_max_value]), "
                         f"got {sample_max_value}")


def _is_flow_config(config: dict) -> bool:
    """A flow-matching source config: a FlowMatch* scheduler's (named so once saved; else a ``shift``
    and no betas), or one with ``use_flow_sigmas`` (DPM-Solver's)."""
    name = config.get("_class_name", "")
    return (bool(config.get("use_flow_sigmas")) or (isinstance(name, str) and name.startswith("FlowMatch"))
            or ("shift" in config and "beta_start" not in config))


class GITSScheduler(SchedulerMixin, ConfigMixin):
    """Runs a geosample solver step by step for a VP model trained on ``alphas_cumprod``.

    Config: the model's betas (as in every diffusers scheduler, ``rescale_betas_zero_snr``
    included) and ``prediction_type`` ("epsilon" | "v_prediction" | "sample"); ``solver`` (any name
    in ``gs.SOLVERS``) with ``solver_options`` (no ``afs``: the pipeline evaluates the model on its
    first sample itself); ``schedule`` ("polynomial" | "logsnr" | "time_uniform" | "discrete" |
    "gits") with ``rho`` (polynomial, time_uniform, discrete; the family's default when None) over
    [sigma_min, sigma_max] (default: the model's range); ``timestep_spacing`` and ``steps_offset``
    (schedule="discrete": "linspace" is uniform in timesteps to the power rho, "leading" and
    "trailing" are diffusers' integer timesteps); ``sigmas``, a fixed schedule that overrides
    ``schedule`` (flow times for a flow model, as ``set_timesteps(sigmas=)``); ``gits_sigmas``,
    the GITS schedules found so far by step count (saved with the config, so a loaded scheduler
    needs no model); ``denoise_to_zero``; ``amed``: AMED predictions per interval ({"r": [...],
    "scale_dir": ..., "scale_time": ...}, see :meth:`use_amed`) for ``solver`` "amed" or a base of
    the AMED-Plugin, two model calls per interval.

    Flow matching: ``use_flow_sigmas=True`` with ``prediction_type="flow_prediction"``;
    ``schedule="flow"`` is FlowMatchEulerDiscreteScheduler's as Flux uses it (N flow times uniform
    from 1 to 1 / N, shifted by ``shift``, or by e^mu with ``use_dynamic_shifting`` and the ``mu``
    given to ``set_timesteps``); ``base_shift``, ``max_shift``, ``base_image_seq_len`` and
    ``max_image_seq_len`` are kept for the pipelines that compute mu from them.  Other families run
    over [sigma_min, sigma_max] (default: the training times 1 / T to 1 as EDM sigmas, so they start
    at inf and continue from sigma = T - 1); a finite first sigma takes the pipeline's sample as x_t
    at that time.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 rescale_betas_zero_snr: bool = False, timestep_spacing: str = "linspace", steps_offset: int = 0,
                 solver: str = "ipndm", solver_options: dict | None = None,
                 schedule: str = "polynomial", rho: float | None = None, sigma_min: float | None = None,
                 sigma_max: float | None = None, sigmas: list | None = None, gits_sigmas: dict | None = None,
                 denoise_to_zero: bool = True, amed: dict | None = None, use_flow_sigmas: bool = False,
                 shift: float = 1.0,
                 use_dynamic_shifting: bool = False, base_shift: float = 0.5, max_shift: float = 1.15,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096, clip_sample: bool = False,
                 clip_sample_range: float = 1.0, thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, gits_key: str | None = None):
        if use_flow_sigmas != (prediction_type == FLOW):
            raise ValueError(f"use_flow_sigmas=True and prediction_type={FLOW!r} go together (flow matching), got "
                             f"use_flow_sigmas={use_flow_sigmas}, prediction_type={prediction_type!r}")
        if not use_flow_sigmas:
            _check_prediction_type(prediction_type)
            if schedule == "flow":
                raise ValueError("schedule='flow' needs a flow-matching model (use_flow_sigmas=True)")
        elif schedule == "discrete":
            raise ValueError("schedule='discrete' follows alphas_cumprod, which a flow-matching model has not")
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {shift}")
        if use_flow_sigmas and not num_train_timesteps >= 2:  # training times 1 / T .. 1 need two
            raise ValueError(f"a flow-matching model needs num_train_timesteps >= 2, got {num_train_timesteps}")
        if amed is None and solver == "amed":
            raise ValueError("solver 'amed' (AMED-Solver) needs predictions: GITSScheduler(solver='amed', "
                             "amed=gs.amed.Fixed(...).to_dict()), or use_amed(...) with another solver first")
        if amed is None:
            _check_options(get_solver(solver), dict(solver_options or {}))
        else:
            _amed.Fixed.from_dict(amed)
            _amed.check_options(solver, dict(solver_options or {}))
        if sigmas is not None and not isinstance(sigmas, list):  # a tensor or array: as the list save_pretrained writes
            self._set_config(sigmas=torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist())
        if gits_sigmas is not None:  # keyed by str(steps) with lists, as save_pretrained writes them
            self._set_config(gits_sigmas=_check_gits_sigmas(gits_sigmas))
        _check_clipping(clip_sample_range, dynamic_thresholding_ratio, sample_max_value)
        if schedule not in FAMILIES:
            raise ValueError(f"schedule must be one of {FAMILIES}, got {schedule!r}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")
        if rho is not None and schedule in ("logsnr", "gits", "flow"):
            raise ValueError(f"rho does not apply to schedule={schedule!r} (pass GITS options to use_gits)")
        ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                             beta_schedule=beta_schedule, trained_betas=trained_betas,
                             rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.betas, self.alphas = ddpm.betas, ddpm.alphas
        self.alphas_cumprod = ddpm.alphas_cumprod.to(torch.float64)
        # sigma <-> timestep on the finite part; a zero-SNR last timestep is sigma = inf
        self.flow = bool(use_flow_sigmas)
        self.zero_snr = bool(self.alphas_cumprod[-1] == 0)
        self._finite_ac = self.alphas_cumprod[:-1] if self.zero_snr else self.alphas_cumprod
        if self.flow:  # training times 1 / T .. 1; the largest finite one is (T - 1) / T
            self.model_sigma_range = (1.0 / (num_train_timesteps - 1), math.inf)
            self._finite_top = float(num_train_timesteps - 1)
        else:
            model_sigmas = schedules.discrete_sigmas(self._finite_ac)
            self.model_sigma_range = (float(model_sigmas[0]), math.inf if self.zero_snr else float(model_sigmas[-1]))
            self._finite_top = float(model_sigmas[-1])
        self.init_noise_sigma = 1.0
        self._mu = None
        self.num_inference_steps = None
        self.sigmas = self._edm_sigmas = self.eval_sigmas = self.timesteps = None
        self._gits = None
        self._step_index = self._begin_index = None
        self._run = None

    @classmethod
    def from_config(cls, config=None, return_unused_kwargs: bool = False, **kwargs):
        """diffusers' ``from_config``; a flow-matching config (FlowMatchEulerDiscreteScheduler's, or
        DPM-Solver's with ``use_flow_sigmas``) gives a flow scheduler: ``use_flow_sigmas=True``,
        ``prediction_type="flow_prediction"``, ``schedule="flow"`` and ``shift`` (DPM's ``flow_shift``)
        unless ``kwargs`` say otherwise.  Options whose steps it does not reproduce (``invert_sigmas``,
        ``stochastic_sampling``) raise ValueError, and so do those of the source's schedule
        (``shift_terminal``, Karras / exponential / beta sigmas, ``time_shift_type="linear"``) unless
        ``kwargs`` give ``sigmas`` or another ``schedule``.  The source's ``clip_sample`` is kept even
        at its default (True for DDIM and DDPM), so such a config clips x0 here as it did there."""
        own = isinstance(config, dict) and (config.get("_class_name") == cls.__name__ or "gits_sigmas" in config)
        if isinstance(config, dict) and not own and config.get("clip_sample") and "clip_sample" not in kwargs:
            kwargs["clip_sample"] = True  # DDIM / DDPM clip by default, and from_config drops values left at defaults
        if isinstance(config, dict) and not own and _is_flow_config(config):
            own_schedule = kwargs.get("schedule", "flow") == "flow" and kwargs.get("sigmas") is None
            options = _FLOW_UNSUPPORTED + (_FLOW_SCHEDULE_UNSUPPORTED if own_schedule else ())
            used = [k for k in options if config.get(k)]
            if own_schedule and config.get("time_shift_type", "exponential") != "exponential":
                used.append("time_shift_type='linear'")
            if used:
                raise ValueError(f"GITSScheduler does not reproduce {used} of this flow scheduler; "
                                 "pass sigmas= or another schedule (e.g. schedule='gits') to from_config")
            flow = {"use_flow_sigmas": True, "prediction_type": FLOW, "schedule": "flow"}
            if "flow_shift" in config:
                flow["shift"] = config["flow_shift"]
            kwargs = {**flow, **kwargs}
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @property
    def shift(self) -> float:
        """The static flow shift (FlowMatchEulerDiscreteScheduler's ``shift``)."""
        return self.config.shift

    @property
    def order(self) -> int:
        """Model evaluations per interval of the schedule (img2img pipelines start at t_start * order)."""
        return 2 if self.config.amed is not None else get_solver(self.config.solver).evals_per_step

    @property
    def step_index(self) -> int | None:
        """Index into ``timesteps`` of the next evaluation (None before the first ``step``)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """Index into ``timesteps`` of the first evaluation, set by :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next run at ``timesteps[begin_index]`` (img2img); it must begin an interval."""
        self._begin_index = begin_index

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # ---- sigma <-> timestep ------------------------------------------------------------------
    def _t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).cpu().flatten()
        if self.flow:
            return schedules.flow_t_to_sigma(t / self.config.num_train_timesteps)
        s = schedules.timestep_to_sigma(t, self._finite_ac)
        if self.zero_snr:
            s = torch.where(t >= len(self.alphas_cumprod) - 1, math.inf, s)
        return s

    def _check_timesteps(self, timesteps) -> torch.Tensor:
        """Given model timesteps as float64, each within the model's range (ValueError naming the first outside)."""
        t = torch.as_tensor(timesteps, dtype=torch.float64).cpu().flatten()
        top = self.config.num_train_timesteps if self.flow else len(self.alphas_cumprod) - 1
        bad = ~((t >= 0) & (t <= top))
        if bool(bad.any()):
            raise ValueError(f"timesteps must lie in [0, {top}] (the model's), got {float(t[bad][0])}")
        return t

    def _sigma_to_t(self, s: torch.Tensor) -> torch.Tensor:
        if self.flow:
            return schedules.sigma_to_flow_t(s) * self.config.num_train_timesteps
        return torch.where(torch.isinf(s), float(len(self.alphas_cumprod) - 1),
                           schedules.sigma_to_timestep(s, self._finite_ac))

    # ---- schedules -------------------------------------------------------------------------
    def use_gits(self, model, shape, model_kwargs: dict | None = None, timestep_scale: float | None = None,
                 **search_options) -> None:
        """Search GITS schedules on ``model`` (the pipeline's UNet through :class:`EpsDenoiser`, or
        its flow transformer through :class:`FlowDenoiser`) lazily: at each ``set_timesteps`` with a
        step count not in the config's ``gits_sigmas``, ``gs.gits.search(denoiser, shape, steps,
        **search_options)`` (shape: one sample, e.g. (4, 64, 64), or Flux's packed (tokens, 64);
        by default the recommended search for the scheduler's solver, ``solver=config.solver,
        gamma=GAMMAS, refine=True``, with progress bars; sigma_min / sigma_max default to the
        scheduler's finite range, device to the model's); each result is added to ``gits_sigmas``.  Sets ``schedule="gits"``.  The schedules found are keyed
        (``gits_key``) by the model's fingerprint, ``shape`` and the options: ``use_gits`` with another
        model or other options drops them (schedules given by hand, with no key, are kept).  A flow model is called as
        ``model(x_t, timestep=t * timestep_scale, **model_kwargs)``; ``timestep_scale`` defaults to
        ``num_train_timesteps`` (SD3); Flux's transformer takes 1.  A model with a ``dtype`` (diffusers'
        models; bf16 / fp16 checkpoints) gets its samples in that dtype; the search runs in float32."""
        dtype = getattr(model, "dtype", None)  # a diffusers model's weights: bf16 / fp16 take inputs in kind
        cast = (lambda x: x) if dtype is None else (lambda x: x.to(dtype))
        if self.flow:
            scale = self.config.num_train_timesteps if timestep_scale is None else timestep_scale
            denoiser = FlowDenoiser(lambda x_t, t, **kw: model(cast(x_t), timestep=t, **kw), scale, model_kwargs)
        elif timestep_scale is not None:
            raise ValueError("timestep_scale applies to flow-matching models (use_flow_sigmas=True)")
        else:
            denoiser = EpsDenoiser(lambda x, t, **kw: model(cast(x), t, **kw), self._finite_ac,
                                   self.config.prediction_type, model_kwargs)
        from .. import gits  # imported lazily: only GITS schedules need the search

        if self.config.clip_sample or self.config.thresholding:  # search on the D the steps will use
            unclipped = denoiser
            denoiser = lambda x, sigma: self.clip_denoised(unclipped(x, sigma))  # noqa: E731
        options = {"device": getattr(model, "device", "cpu"), "solver": self.config.solver, "gamma": gits.GAMMAS,
                   "refine": True, "progress": True, **search_options}
        chosen = {k: v for k, v in options.items() if k != "progress"}
        key = gits.cache.key({"fingerprint": gits.fingerprint(denoiser, shape, options["device"]), "shape": list(shape),
                              "options": chosen})
        if self.config.gits_key not in (None, key):  # schedules searched on another model or with other options
            self._set_config(gits_sigmas={})
        self._gits = (denoiser, shape, options)
        self._set_config(schedule="gits", gits_key=key)

    def use_amed(self, predictions, solver: str | None = None) -> None:
        """Run AMED (two model calls per interval) with ``predictions``: :class:`geosample.amed.Fixed`,
        its dict, or a trained :class:`geosample.amed.Predictor`, whose mean predictions over its
        training samples (:meth:`~geosample.amed.Predictor.fixed`) are used, as the reference's
        diffusers plugin does: a pipeline gives one timestep per batch, so per-sample times cannot
        be passed (docs/amed.md measures the difference).  Sets ``amed`` in the config (kept by
        ``save_pretrained``), ``solver`` and ``solver_options`` (a predictor's own; one trained with AFS is
        refused); the schedule must have
        as many intervals as the predictions (``num_inference_steps`` = K + 1 with the final denoise),
        and a predictor needs the schedule it was trained on (pass ``sigmas=`` to ``set_timesteps``)."""
        options = dict(self.config.solver_options or {})
        if hasattr(predictions, "fixed") and hasattr(predictions, "solver"):  # a trained predictor: its own setup
            if solver not in (None, predictions.solver):
                raise ValueError(f"this predictor was trained for {predictions.solver!r}, not {solver!r}")
            if predictions.afs:
                raise ValueError("this predictor was trained with afs=True; the scheduler evaluates the model at "
                                 "every step (no analytical first step): train one with afs=False")
            solver, options = predictions.solver, dict(predictions.meta["options"])
            predictions = predictions.fixed()
        fixed = predictions if isinstance(predictions, _amed.Fixed) else _amed.Fixed.from_dict(predictions)
        solver = solver or self.config.solver
        options = _amed.check_options(solver, options)
        self._set_config(amed=fixed.to_dict(), solver=solver, solver_options=options)

    def _set_config(self, **values) -> None:
        """register_to_config, and the values no longer count as defaults (which from_config would drop)."""
        defaults = [k for k in self.config.get("_use_default_values", []) if k not in values]
        self.register_to_config(**values, _use_default_values=defaults)

    def _gits_schedule(self, steps: int, lo: float, hi: float) -> torch.Tensor:
        found = dict(self.config.gits_sigmas or {})
        if str(steps) not in found:
            if self._gits is None:
                raise ValueError(f"schedule='gits' has no {steps}-step schedule: call scheduler.use_gits(pipe.unet, "
                                 f"shape) first (found so far: {sorted(found, key=int) or 'none'}), or pass sigmas=")
            from .. import gits

            denoiser, shape, options = self._gits
            options = {"sigma_min": lo, "sigma_max": hi, **options}
            found[str(steps)] = [float(v) for v in gits.search(denoiser, shape, steps, **options).sigmas]
            self._set_config(gits_sigmas=found)
        return torch.tensor(found[str(steps)], dtype=torch.float64)

    def _finite_family(self, steps: int, lo: float, hi: float) -> torch.Tensor:
        cfg = self.config
        if cfg.schedule == "gits":
            return self._gits_schedule(steps, lo, hi)
        params = {"sigma_min": lo, "sigma_max": hi}
        if cfg.rho is not None and cfg.schedule != "logsnr":   # logsnr has no rho
            params["rho"] = cfg.rho
        if cfg.schedule == "discrete":
            params["alphas_cumprod"] = self._finite_ac
        return schedules.by_name(cfg.schedule, steps, **params)

    def _spaced_timesteps(self, points: int) -> torch.Tensor:
        """diffusers' "leading" / "trailing" integer timesteps, ``points`` of them, decreasing."""
        T = self.config.num_train_timesteps
        if self.config.timestep_spacing == "leading":
            t = (np.arange(points) * (T // points)).round()[::-1] + self.config.steps_offset
        else:
            t = np.round(np.arange(T, 0, -T / points)) - 1
        return torch.from_numpy(t.copy()).to(torch.float64)

    def _flow_family(self, steps: int) -> torch.Tensor:
        """``steps + 1`` flow times uniform from 1 to 1 / (steps + 1), shifted, as EDM sigmas."""
        cfg = self.config
        if cfg.sigma_min is not None or cfg.sigma_max is not None:
            raise ValueError("schedule='flow' spans the flow times 1 / N .. 1: sigma_min and sigma_max do not apply")
        if cfg.use_dynamic_shifting and self._mu is None:
            raise ValueError("use_dynamic_shifting=True needs mu: set_timesteps(..., mu=mu) (Flux pipelines pass it)")
        if steps == 0:
            return torch.tensor([math.inf], dtype=torch.float64)
        return schedules.flow_shifted(steps, t_min=1.0 / (steps + 1), shift=cfg.shift,
                                      mu=self._mu if cfg.use_dynamic_shifting else None)

    def _family(self, steps: int) -> torch.Tensor:
        """``steps + 1`` decreasing sigmas of the configured family (starting at inf for zero-SNR and
        flow models)."""
        cfg = self.config
        if cfg.schedule == "flow":
            return self._flow_family(steps)
        if cfg.schedule == "discrete" and cfg.timestep_spacing != "linspace":
            if cfg.rho is not None or cfg.sigma_min is not None or cfg.sigma_max is not None:
                raise ValueError(f"timestep_spacing={cfg.timestep_spacing!r} fixes the timesteps: "
                                 "rho, sigma_min and sigma_max do not apply")
            return self._t_to_sigma(self._spaced_timesteps(steps + 1))
        lo = self.model_sigma_range[0] if cfg.sigma_min is None else cfg.sigma_min
        hi = self.model_sigma_range[1] if cfg.sigma_max is None else cfg.sigma_max
        if steps == 0:
            return torch.tensor([hi], dtype=torch.float64)
        if math.isinf(hi):  # inf, then the family over the finite range (see docs/diffusers.md)
            rest = torch.tensor([lo], dtype=torch.float64) if steps == 1 else \
                self._finite_family(steps - 1, lo, self._finite_top)
            return torch.cat([torch.tensor([math.inf], dtype=torch.float64), rest])
        return self._finite_family(steps, lo, hi)

    def _given(self, sigmas) -> torch.Tensor:
        """A given schedule as EDM sigmas: as is, or for a flow model flow times (a final 0 added unless present)."""
        if not self.flow:
            return check_grid(sigmas)
        t = torch.as_tensor(sigmas, dtype=torch.float64).cpu().flatten()
        if not (t.numel() and float(t[-1]) == 0):
            t = torch.cat([t, t.new_zeros(1)])
        return check_grid(schedules.flow_t_to_sigma(t))

    def _grid(self, num_inference_steps, sigmas, timesteps) -> torch.Tensor:
        if sigmas is not None and timesteps is not None:
            raise ValueError("pass sigmas or timesteps, not both")
        zero = torch.zeros(1, dtype=torch.float64)
        n = _pipeline_steps(sigmas) if sigmas is not None and self.flow else 0
        if n and num_inference_steps in (None, n):
            num_inference_steps, sigmas = n, None  # a pipeline's "N steps" (see set_timesteps)
        grid = None
        if sigmas is not None:
            grid, given = self._given(sigmas), "sigmas"
        elif timesteps is not None:
            grid, given = check_grid(torch.cat([self._t_to_sigma(self._check_timesteps(timesteps)), zero])), "timesteps"
        elif self.config.sigmas is not None:
            grid, given = self._given(self.config.sigmas), "the config's sigmas"
        if grid is not None:
            if num_inference_steps not in (None, grid.numel() - 1):
                raise ValueError(f"{given} give {grid.numel() - 1} steps, "
                                 f"got num_inference_steps={num_inference_steps}")
            return grid
        if num_inference_steps is None:
            raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise TypeError(f"num_inference_steps must be an int, got {type(num_inference_steps).__name__}")
        num_inference_steps = int(num_inference_steps)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not self.config.denoise_to_zero:
            return check_grid(self._family(num_inference_steps))
        return check_grid(torch.cat([self._family(num_inference_steps - 1), zero]))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, timesteps=None,
                      mu: float | None = None) -> None:
        """Fix the schedule and list every model evaluation.

        sigmas: an explicit EDM schedule (decreasing, optionally ending in 0, optionally starting
        at inf), or for a flow model the flow times (decreasing in [0, 1], used as given, a final 0
        added unless present), except ``np.linspace(1, 1 / N, N)``: most flow pipelines pass that for
        the scheduler to shift, and it means N steps of the configured schedule (what FluxPipeline
        asks by passing no sigmas; ``schedule="flow"`` with shift 1 and no dynamic shifting runs
        those times); timesteps: model timesteps (decreasing), mapped to sigmas by
        log-sigma interpolation (flow: t = timestep / num_train_timesteps), then a final 0.
        mu: the flow shift exponent (Flux), used by ``schedule="flow"`` with ``use_dynamic_shifting``.
        Sets ``self.eval_sigmas`` (EDM, float64, CPU) and ``self.timesteps`` (continuous, float32, on
        ``device``): one entry per model call; and ``self.sigmas``: the schedule's EDM sigmas (float64,
        CPU), or for a flow model flow times as FlowMatchEulerDiscreteScheduler exposes them (float32,
        on ``device``; ``sigmas[i]`` is the time of ``timesteps[i]``, then the last time, e.g. 0), which
        pipelines read (LTX2: ``x0 = x_t - v * sigmas[i]``).
        """
        if mu is not None and not self.flow:
            raise ValueError("mu (the flow shift exponent) applies to flow-matching models (use_flow_sigmas=True)")
        self._mu = None if mu is None else float(mu)
        grid = self._grid(num_inference_steps, sigmas, timesteps)
        if math.isinf(float(grid[0])) and self.config.prediction_type == "epsilon":
            raise ValueError("a schedule starting at sigma = inf (zero terminal SNR) needs prediction_type "
                             "'v_prediction' or 'sample': an epsilon model's x0 = x - sigma eps is undefined there; "
                             "set a finite sigma_max to run an epsilon model")
        ops, _ = self._plan(grid)
        evals = [op for op in ops if op.eval_sigma is not None]
        self._edm_sigmas = grid  # what the solver runs on
        self.num_inference_steps = grid.numel() - 1
        self.eval_sigmas = torch.tensor([op.eval_sigma for op in evals], dtype=torch.float64)
        self._eval_interval = [op.step for op in evals]  # the interval an evaluation starts, else None
        self.timesteps = self._sigma_to_t(self.eval_sigmas).to(device, torch.float32)
        self.sigmas = grid if not self.flow else \
            schedules.sigma_to_flow_t(torch.cat([self.eval_sigmas, grid[-1:]])).to(device, torch.float32)
        self._step_index = self._begin_index = None
        self._run = None

    def _plan(self, grid: torch.Tensor, first: int = 0):
        """The solver's ops over ``grid``, which starts at interval ``first`` of the schedule."""
        options = dict(self.config.solver_options or {})
        if self.config.amed is None:
            spec = get_solver(self.config.solver)
            return plan(spec, grid.tolist(), False, _check_options(spec, options))
        fixed = _amed.Fixed.from_dict(self.config.amed)
        ode = grid.numel() - 1 - int(float(grid[-1]) == 0.0) + first
        if ode != fixed.steps:
            extra = int(self.config.denoise_to_zero)
            raise ValueError(f"the AMED predictions are for {fixed.steps} intervals, this schedule has {ode}: use "
                             f"num_inference_steps={fixed.steps + extra} (denoise_to_zero={self.config.denoise_to_zero})")
        r, c, a = (v[first:] for v in fixed.predictions())
        return _amed.Fixed(r, c, a).plan(self.config.solver, grid.tolist(), False,
                                         _amed.check_options(self.config.solver, options))

    # ---- stepping --------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The identity: samples are already in the model's VP scale."""
        return sample

    def _start(self, timestep, sample: torch.Tensor) -> None:
        """Begin a run at ``begin_index`` (or at ``timestep``'s first interval start): the solver
        starts afresh on the rest of the schedule, from ``sample``."""
        k = self._begin_index
        if k is None:
            t = float(torch.as_tensor(timestep, dtype=torch.float32).flatten()[0])
            starts = [j for j, i in enumerate(self._eval_interval)
                      if i is not None and math.isclose(float(self.timesteps[j]), t, rel_tol=1e-5, abs_tol=1e-3)]
            if not starts:
                raise ValueError(f"timestep {t} starts no interval of this schedule (timesteps: "
                                 f"{[round(float(v), 3) for v in self.timesteps]}); call set_timesteps, and "
                                 "set_begin_index for img2img")
            k = starts[0]
        if not 0 <= k < len(self.timesteps) or self._eval_interval[k] is None:
            raise ValueError(f"begin index {k} is not the first evaluation of an interval of this schedule "
                             f"({len(self.timesteps)} evaluations, order {self.order})")
        interval = self._eval_interval[k]
        ops, size = self._plan(self._edm_sigmas[interval:], interval)
        sigma = float(self._edm_sigmas[interval])
        x = sample.to(state_dtype(sample.dtype)) * (1.0 / _scale(sigma, self.flow))
        self._run, self._step_index, self._prev = Run(ops, size, x), k, None

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, return_dict: bool = True,
             generator=None, eta: float = 0.0, use_clipped_model_output: bool | None = None):
        """Consume the model output at ``timestep`` for ``sample`` and return the sample for the next call (VP).

        The solver steps from ``sample`` as given (it may differ from the last ``prev_sample``).
        generator, eta (must be 0), use_clipped_model_output (no clipping here, so it changes
        nothing): accepted for pipelines that pass them (DDIM's); the solvers are deterministic.
        After the last evaluation, prev_sample is the solver's result.
        """
        _check_tensors(model_output=model_output, sample=sample)
        if eta != 0:
            raise ValueError(f"GITSScheduler's solvers are deterministic (the probability-flow ODE): eta must be 0, "
                             f"got {eta}")
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        if self._run is None:
            self._start(timestep, sample)
        k = self._step_index
        if k >= len(self.timesteps):
            raise ValueError(f"step called more than the {len(self.timesteps)} times the schedule needs; "
                             "call set_timesteps to start again")
        t = torch.as_tensor(timestep, dtype=torch.float32).cpu()
        if t.numel() != 1 or not torch.isclose(t.flatten()[0], self.timesteps[k].cpu(), rtol=1e-5, atol=1e-3):
            raise ValueError(f"step {k} expects timestep {float(self.timesteps[k]):.4f}, got {timestep}")
        if not bool(torch.isfinite(model_output).all()):
            raise FloatingPointError(f"the model output at step {k} (timestep {float(self.timesteps[k]):.4f}) "
                                     "is not finite (NaN or inf)")
        sigma = float(self.eval_sigmas[k])
        point = self._run.request()[0]
        x = point if sample is self._prev else sample.to(point.dtype) * (1.0 / _scale(sigma, self.flow))
        denoised = self._denoised(model_output.to(point.dtype), x, sigma)
        self._run.send(denoised, at=x)
        self._step_index = k + 1
        nxt = self._run.request()
        x_next, sigma_next = (self._run.x, float(self._edm_sigmas[-1])) if nxt is None else nxt
        prev_sample = (x_next * _scale(sigma_next, self.flow)).to(sample.dtype)
        self._prev = prev_sample
        denoised = denoised.to(sample.dtype)
        if not return_dict:
            return (prev_sample, denoised)
        return GITSSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)

    def _denoised(self, output: torch.Tensor, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """D from the model output (at sigma = inf: -v for v-prediction, the output for sample, noise - v
        for flow), then clipped or thresholded as the config asks (:meth:`clip_denoised`)."""
        if self.flow:
            return self.clip_denoised(flow_to_denoised(output, x, sigma))
        return self.clip_denoised(vp_to_denoised(output, x, sigma, self.config.prediction_type))

    def clip_denoised(self, x0: torch.Tensor) -> torch.Tensor:
        """The prediction of x0 as diffusers' schedulers treat it before a step: ``thresholding``
        (Imagen's dynamic thresholding: s = the ``dynamic_thresholding_ratio`` quantile of |x0| per
        sample, clamped to [1, ``sample_max_value``]; x0 -> clamp(x0, -s, s) / s), else ``clip_sample``
        (x0 -> clamp(x0, -clip_sample_range, clip_sample_range)), else x0 as is.  Every solver then
        steps with this D (for ``solver="euler"`` that is DDIMScheduler with use_clipped_model_output=True)."""
        cfg = self.config
        if cfg.thresholding:
            return dynamic_threshold(x0, cfg.dynamic_thresholding_ratio, cfg.sample_max_value)
        if cfg.clip_sample:
            return x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        return x0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_vp = (x0 + sigma n) / sqrt(1 + sigma^2) per sample, sigma the timestep's (= noise at inf),
        or for a flow model x_t = (1 - t) x0 + t n; a timestep of this schedule uses its exact sigma."""
        _check_tensors(original_samples=original_samples, noise=noise)
        t = torch.as_tensor(timesteps, dtype=torch.float64).cpu().flatten()
        if t.numel() not in (1, original_samples.shape[0]):
            raise ValueError(f"timesteps has {t.numel()} entries; expected 1 or one per sample "
                             f"({original_samples.shape[0]})")
        s = self._t_to_sigma(t)
        if self.timesteps is not None:
            exact = (t[:, None] == self.timesteps.cpu().double()[None, :])
            s = torch.where(exact.any(1), self.eval_sigmas[exact.int().argmax(1)], s)
        c = 1 / (1 + s) if self.flow else torch.rsqrt(1 + s * s)
        c_x = torch.where(torch.isinf(s), 0.0, c)
        c_n = torch.where(torch.isinf(s), 1.0, s * c)
        shape = (-1, *([1] * (original_samples.dim() - 1)))
        c_x, c_n = (c.to(original_samples.device, original_samples.dtype).reshape(shape) for c in (c_x, c_n))
        return c_x * original_samples + c_n * noise

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """FlowMatchEulerDiscreteScheduler's name for :meth:`add_noise` (flow img2img pipelines call it)."""
        return self.add_noise(sample, noise, timestep)
