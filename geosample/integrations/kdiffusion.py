"""k-diffusion / ComfyUI-style sampler functions backed by :func:`geosample.sample`.

Every ``sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``
follows k-diffusion's conventions: ``x`` is already ``sigmas[0] * noise``; ``model(x, sigma * s_in,
**extra_args)`` returns the denoised x0 with ``sigma`` a [B] tensor; ``sigmas`` usually ends in 0
(the last step is then the full denoise ``x = D(x, sigmas[-2])``); ``callback`` gets a dict with
``x, i, sigma, sigma_hat, denoised`` once per step (``sigma`` and ``sigma_hat`` are ``sigmas[i]``);
``disable`` turns the progress bar off.  ``options`` are the geosample solver's options, and
``amed=`` (:mod:`geosample.amed` predictions) runs the AMED-Plugin on euler, dpm_2, ipndm and the
DPM-Solver++ samplers, or AMED-Solver with :func:`sample_amed` (2 calls per interval; a final 0 is
the usual full denoise).  Without ``extra_args`` the model itself is the denoiser, so a predictor
trained on ``model`` (``gs.amed.train(model, ...)``) is recognised; with them, train on the same
callable you sample with.

Same maths as k-diffusion (to rounding): euler, heun, dpm_2 (k-diffusion's second evaluation is
skipped on the step to 0, exactly geosample's final denoise), dpmpp_2m (k-diffusion's
``denoised_d`` midpoint form is the DPM-Solver++(2M) update; geosample keeps order 2 up to the
denoise step, ``lower_order_final=False``, as k-diffusion does) and ComfyUI's ipndm.
Differences: ``sample_dpmpp_3m`` is deterministic multistep DPM-Solver++(3M); k-diffusion only
has ``sample_dpmpp_3m_sde``, whose ``eta=0`` case equals it except on the second step, where
k-diffusion's warm-up adds ``phi_2 (D_1 - D_0) / r`` (``phi_2 = expm1(-h)/h + 1``) while geosample
uses the 2M form ``-expm1(-h)/2 (D_1 - D_0) / r``; both are second order.

Flow-matching models as ComfyUI passes them (SD3, Flux: ``sigmas`` are flow times t in [0, 1], ``x``
is x_t = (1 - t) x0 + t noise, the model returns x0 = x_t - t v): wrap any sampler with
:func:`flow_sampler`, which runs it on the same ODE in EDM form (sigma = t / (1 - t), x = x_t / (1 - t),
starting at sigma = inf when t = 1)::

    x0 = flow_sampler(sample_dpmpp_2m)(model, noise, sigmas)   # sigmas: e.g. 1.0, ..., 0.0
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from ..schedules import flow_t_to_sigma
from ..solvers import sample
from ..solvers.sampling import check_grid

__all__ = ["sample_euler", "sample_heun", "sample_dpm_2", "sample_ipndm", "sample_ipndm_v",
           "sample_dpmpp_2m", "sample_dpmpp_3m", "sample_unipc", "sample_deis", "sample_amed", "get_sigmas_gits",
           "flow_sampler"]


def _check_x(x, sigmas) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(sigmas, torch.Tensor):
        raise TypeError(f"sigmas must be a torch.Tensor, got {type(sigmas).__name__}")


def _sample(solver: str, model: Callable, x: torch.Tensor, sigmas: torch.Tensor, extra_args, callback,
            disable, options: dict) -> torch.Tensor:
    """gs.sample on noise = x / sigmas[0] (x itself when sigmas[0] = inf), with the k-diffusion model
    call and callback."""
    _check_x(x, sigmas)
    grid = check_grid(sigmas)
    extra_args = {} if extra_args is None else extra_args

    def conditioned(xi, sigma):
        return model(xi, sigma, **extra_args)

    denoiser = conditioned if extra_args else model  # the model itself: an AMED predictor's fingerprint

    def on_step(info):
        i = info["i"]
        callback({"x": info["x"], "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i],
                  "denoised": info["denoised"]})

    noise = x if math.isinf(float(grid[0])) else x / float(grid[0])
    return sample(denoiser, noise, grid, solver, callback=None if callback is None else on_step,
                  progress=not disable, **options)


def _sampler(name: str, solver: str, summary: str, **defaults) -> Callable:
    """A k-diffusion-signature function running geosample's ``solver`` with ``defaults`` options."""
    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        return _sample(solver, model, x, sigmas, extra_args, callback, disable, {**defaults, **options})

    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = (f"{summary}\n\nk-diffusion signature; geosample solver {solver!r}"
                  + (f" with {defaults}" if defaults else "") + "; other options go to the solver.")
    return fn


sample_euler = _sampler("sample_euler", "euler", "Euler: x_next = x + (s_next - s) (x - D) / s.")
sample_heun = _sampler("sample_heun", "heun", "Heun (EDM's 2nd-order trapezoidal predictor-corrector), 2 calls per step.")
sample_dpm_2 = _sampler("sample_dpm_2", "dpm2", "DPM-Solver-2 with the geometric midpoint, 2 calls per step.")
sample_ipndm = _sampler("sample_ipndm", "ipndm", "iPNDM: Adams-Bashforth up to 4th order with fixed weights.")
sample_ipndm_v = _sampler("sample_ipndm_v", "ipndm_v", "iPNDM_v: variable-step Adams-Bashforth up to 4th order.")
sample_dpmpp_2m = _sampler("sample_dpmpp_2m", "dpmpp", "DPM-Solver++(2M), k-diffusion's order schedule.",
                           max_order=2, lower_order_final=False)
sample_dpmpp_3m = _sampler("sample_dpmpp_3m", "dpmpp", "Deterministic DPM-Solver++(3M), 3rd order up to the denoise step.",
                           max_order=3, lower_order_final=False)
sample_unipc = _sampler("sample_unipc", "unipc", "UniPC (bh2, order 3) with the free corrector.")
sample_deis = _sampler("sample_deis", "deis", "DEIS-tAB3: exponential-integrator multistep in VP time.")
sample_amed = _sampler("sample_amed", "amed", "AMED-Solver: one extra call per interval at the predicted time "
                       "(needs amed=, geosample.amed predictions).")


def get_sigmas_gits(n: int, model: Callable, shape, extra_args=None, device="cpu", dtype: torch.dtype | None = None,
                    **search_options) -> torch.Tensor:
    """A GITS schedule in k-diffusion form: ``n + 1`` decreasing sigmas ending in 0 (like
    ``get_sigmas_karras(n, ...)``): the ``n - 1``-step GITS schedule searched on ``model`` (see
    :func:`geosample.gits.search`, which takes ``shape`` and ``search_options``; by default the
    recommended search, ``gamma=GAMMAS, refine=True``, judged with ``solver="ipndm"``: pass the
    ``solver`` you will sample with, e.g. ``solver="dpmpp"`` for DPM-Solver++(2M)-like samplers;
    progress bars on unless ``progress=False``), then the final 0.

    model: a k-diffusion denoiser ``model(x, sigma, **extra_args)``; its ``sigma_min`` / ``sigma_max``
    attributes (k-diffusion's discrete-model wrappers have them) set the search range unless
    ``search_options`` give it.  Returns ``dtype`` on ``device``; the default is torch's default
    dtype (float32 unless changed), as k-diffusion's own ``get_sigmas_*`` return, so that its
    samplers keep a float32 model's inputs in float32.  With ``afs=True`` in ``search_options`` the
    search inserts the free analytical first step, so ``n + 2`` sigmas come back for the same
    number of denoiser calls (sample them with ``afs=True``).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2 (n - 1 GITS steps plus the final denoise), got {n!r}")
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    from .. import gits  # imported lazily: the search is only needed here

    extra_args = {} if extra_args is None else extra_args
    for name in ("sigma_min", "sigma_max"):
        if name not in search_options and hasattr(model, name):
            search_options[name] = float(getattr(model, name))
    search_options = {"gamma": gits.GAMMAS, "refine": True, "progress": True, **search_options}
    found = gits.search(lambda x, sigma: model(x, sigma, **extra_args), shape, n - 1, **search_options)
    sigmas = torch.as_tensor(found.sigmas, dtype=torch.float64).cpu()
    out = torch.cat([sigmas, sigmas.new_zeros(1)]).to(dtype)
    if not bool((out[1:] < out[:-1]).all()):
        raise ValueError(f"the GITS sigmas {sigmas.tolist()} are not strictly decreasing in {dtype}; "
                         "pass dtype=torch.float64")
    return out.to(device)


def flow_sampler(sampler: Callable) -> Callable:
    """``sampler`` (any k-diffusion-signature function here) for a flow-matching model as ComfyUI
    passes one: ``sigmas`` are flow times t (decreasing in [0, 1], usually from 1.0 to 0.0),
    ``x`` = x_t at ``sigmas[0]`` (the noise when it is 1), ``model(x_t, t * s_in, **extra_args)``
    returns x0 = x_t - t v.

    The sampler runs on the EDM form of the same ODE: sigma = t / (1 - t) (inf at t = 1),
    x = x_t / (1 - t), the model called at (x_t, t).  Returns x_t at ``sigmas[-1]`` (x0 when it
    is 0); ``callback`` gets x_t and ``sigma = sigma_hat = t``.  Euler is flow Euler,
    x_t' = x_t + (t' - t) v, exactly; DPM-Solver++ is diffusers' DPMSolverMultistep in flow mode.

        x0 = flow_sampler(sample_dpmpp_2m)(model, noise, torch.tensor([1.0, 0.8, 0.5, 0.2, 0.0]))
    """
    if not callable(sampler):
        raise TypeError(f"sampler must be a k-diffusion-signature function such as sample_euler, got "
                        f"{type(sampler).__name__}")

    @functools.wraps(sampler)
    def fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options):
        _check_x(x, sigmas)
        t = sigmas.detach().to("cpu", torch.float64).flatten()
        grid = flow_t_to_sigma(t)  # validates t in [0, 1]
        extra_args = {} if extra_args is None else extra_args

        def to_flow(xe, sigma):
            """(x_t, t) of the EDM state at sigma ([B] tensor)."""
            s = sigma.reshape(-1, *([1] * (xe.dim() - 1))).to(xe.dtype)
            inf = torch.isinf(s)
            return torch.where(inf, xe, xe / (1 + s)), torch.where(inf, 1.0, s / (1 + s)).flatten()

        def denoiser(xe, sigma, **kwargs):
            x_t, tt = to_flow(xe, sigma)
            return model(x_t, tt.to(x.dtype), **kwargs)

        def on_step(info):
            i = info["i"]
            x_t = to_flow(info["x"], grid[i].expand(info["x"].shape[0]))[0]
            callback({**info, "x": x_t, "sigma": sigmas[i], "sigma_hat": sigmas[i]})

        x_edm = x if t[0] == 1 else x / (1 - float(t[0]))
        out = sampler(denoiser, x_edm, grid, extra_args=extra_args,
                      callback=None if callback is None else on_step, disable=disable, **options)
        return out if t[-1] == 0 else out * (1 - float(t[-1]))

    fn.__doc__ = f"{sampler.__name__} for a flow-matching model (ComfyUI's flow times as sigmas); see flow_sampler."
    return fn
