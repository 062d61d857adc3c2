"""Adapters turning outside models into EDM denoisers D(x, sigma) -> x0_hat.

- :class:`EDMDenoiser`: EDM-style preconditioned nets ``net(x, sigma, class_labels)``, already D.
- :class:`EpsDenoiser`: discrete-time VP models ``model(x_vp, timestep, **kwargs)`` trained with
  ``alphas_cumprod`` (diffusers UNets, LDM), predicting eps, v or x0.
- :class:`FlowDenoiser`: flow-matching (rectified-flow) velocity models ``model(x_t, timestep, **kwargs)``
  (SD3, Flux, Wan, ...), x_t = (1 - t) x0 + t noise, v = noise - x0.
- :class:`CFGDenoiser`: classifier-free guidance, conditional and unconditional in one batch.

A VP model at signal level ``alpha = 1 / (1 + sigma^2)`` sees ``x_vp = sqrt(alpha) x`` with
``x = x0 + sigma n`` the EDM state; its timestep is the continuous ``t`` with
``timestep_to_sigma(t) = sigma`` (log-sigma interpolation, :func:`~geosample.schedules.sigma_to_timestep`).
"""
from __future__ import annotations

from typing import Callable

import torch

from .vp import discrete_sigmas, sigma_to_timestep

__all__ = ["EDMDenoiser", "EpsDenoiser", "FlowDenoiser", "CFGDenoiser", "vp_to_denoised", "flow_to_denoised",
           "PREDICTION_TYPES"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """sigma (float or [B] tensor) as a [B, 1, ..., 1] tensor in x's dtype and device."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return s.reshape(-1, *([1] * (x.dim() - 1))).expand(x.shape[0], *([1] * (x.dim() - 1)))


def _output_tensor(out) -> torch.Tensor:
    """A model's prediction: diffusers' ``.sample``, the first entry of a tuple, or the tensor itself."""
    out = getattr(out, "sample", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model returned {type(out).__name__}; expected a tensor, a tuple or an object with .sample")
    return out


def _check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def vp_to_denoised(output: torch.Tensor, x: torch.Tensor, sigma, prediction_type: str = "epsilon") -> torch.Tensor:
    """D(x, sigma) from a VP model's output at ``x_vp = x / sqrt(1 + sigma^2)``.

    epsilon:      D = x - sigma eps
    v_prediction: D = x / (1 + sigma^2) - sigma v / sqrt(1 + sigma^2)
                  (v = sqrt(alpha) eps - sqrt(1 - alpha) x0, alpha = 1 / (1 + sigma^2))
    sample:       D = output
    sigma = inf (zero terminal SNR, a float): x is the noise (the VP sample) and D = -v or the
    output; an epsilon model's D is undefined there (ValueError).
    A learned-variance output with 2C channels for a C-channel x keeps its first C channels.
    """
    _check_prediction_type(prediction_type)
    if output.dim() > 1 and x.dim() > 1 and output.shape[1] == 2 * x.shape[1]:
        output = output[:, : x.shape[1]]
    if output.shape != x.shape:
        raise ValueError(f"model output has shape {tuple(output.shape)}, expected {tuple(x.shape)}")
    output = output.to(x.dtype)
    if isinstance(sigma, float) and sigma == float("inf"):
        if prediction_type == "epsilon":
            raise ValueError("an epsilon model's x0 = x - sigma eps is undefined at sigma = inf (zero terminal SNR)")
        return -output if prediction_type == "v_prediction" else output
    s = _per_sample(sigma, x)
    if prediction_type == "epsilon":
        return x - s * output
    if prediction_type == "v_prediction":
        return x / (1 + s * s) - s * torch.rsqrt(1 + s * s) * output
    return output


def _broadcast(v, batch: int):
    """A keyword tensor with batch 1 expanded to ``batch``; anything else unchanged."""
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == 1 and batch != 1:
        return v.expand(batch, *v.shape[1:])
    return v


def _batched(c, batch: int, name: str):
    """A conditioning tensor with batch ``batch``: batch-1 tensors are expanded, others must match."""
    if not isinstance(c, torch.Tensor):
        return c
    if c.shape[0] == 1 and batch != 1:
        return c.expand(batch, *c.shape[1:])
    if c.shape[0] != batch:
        raise ValueError(f"{name} has batch {c.shape[0]}, expected 1 or {batch}")
    return c


class EDMDenoiser:
    """D(x, sigma) = net(x, sigma, class_labels) for EDM-preconditioned nets (EDMPrecond and kin).

    class_labels: [1 or B, label_dim] (or None) used when the call gives none; batch 1 is broadcast.
    """

    def __init__(self, net: Callable, class_labels: torch.Tensor | None = None):
        if not callable(net):
            raise TypeError(f"net must be callable net(x, sigma, class_labels), got {type(net).__name__}")
        self.net = net
        self.class_labels = class_labels

    def __call__(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        labels = self.class_labels if class_labels is None else class_labels
        labels = _batched(labels, x.shape[0], "class_labels")
        return _output_tensor(self.net(x, _per_sample(sigma, x).flatten(), labels))


class EpsDenoiser:
    """D(x, sigma) for a discrete-time VP model ``model(x_vp, timestep, **model_kwargs)``.

    x_vp = x / sqrt(1 + sigma^2); timestep = sigma_to_timestep(sigma, alphas_cumprod) (continuous,
    [B], float32, or float64 when x is); the output (eps, v or x0 per ``prediction_type``) becomes D
    by :func:`vp_to_denoised`.  ``model_kwargs`` (e.g. ``encoder_hidden_states``) go to every call;
    keyword arguments of the call are added to them; batch-1 tensors among them are broadcast.
    """

    def __init__(self, model: Callable, alphas_cumprod, prediction_type: str = "epsilon",
                 model_kwargs: dict | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable model(x, timestep), got {type(model).__name__}")
        self.model = model
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        discrete_sigmas(self.alphas_cumprod)  # validates
        self.prediction_type = _check_prediction_type(prediction_type)
        self.model_kwargs = dict(model_kwargs or {})

    def timestep(self, sigma, x: torch.Tensor) -> torch.Tensor:
        """The model's continuous timestep for each sample's sigma: [B]."""
        t = sigma_to_timestep(_per_sample(sigma, x).flatten().to("cpu", torch.float64), self.alphas_cumprod)
        return t.to(x.device, torch.promote_types(x.dtype, torch.float32))

    def __call__(self, x: torch.Tensor, sigma, **model_kwargs) -> torch.Tensor:
        s = _per_sample(sigma, x)
        kwargs = {k: _broadcast(v, x.shape[0]) for k, v in {**self.model_kwargs, **model_kwargs}.items()}
        out = self.model(x * torch.rsqrt(1 + s * s), self.timestep(sigma, x), **kwargs)
        return vp_to_denoised(_output_tensor(out), x, s.flatten(), self.prediction_type)


def _flow_coords(x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, t) of the EDM state x at sigma: t = sigma / (1 + sigma), x_t = x / (1 + sigma);
    at sigma = inf, t = 1 and x_t = x (the state is the noise there, see docs/solvers.md).  t: [B, 1, ...]."""
    s = _per_sample(sigma, x)
    inf = torch.isinf(s)
    return torch.where(inf, x, x / (1 + s)), torch.where(inf, 1.0, s / (1 + s))


def flow_to_denoised(velocity: torch.Tensor, x: torch.Tensor, sigma) -> torch.Tensor:
    """D(x, sigma) = x_t - t v from a flow model's velocity v at (x_t, t) = (x / (1 + sigma), sigma / (1 + sigma));
    at sigma = inf, D = x - v with x the noise."""
    if velocity.shape != x.shape:
        raise ValueError(f"model output has shape {tuple(velocity.shape)}, expected {tuple(x.shape)}")
    x_t, t = _flow_coords(x, sigma)
    return x_t - t * velocity.to(x.dtype)


class FlowDenoiser:
    """D(x, sigma) for a flow-matching velocity model ``model(x_t, timestep, **model_kwargs)``.

    x_t = (1 - t) x0 + t noise, v = noise - x0 (SD3, Flux, Wan, Sana); the EDM ODE is the same
    under sigma = t / (1 - t), x = x_t / (1 - t).  The model is called at x_t = x / (1 + sigma)
    with timestep = t * timestep_scale ([B], float32, or float64 when x is): 1000 for diffusers'
    SD3 transformers, 1 for Flux's (its pipeline divides by 1000).  D = x_t - t v; at sigma = inf
    (t = 1) x is the noise and D = noise - v(noise, 1).  ``model_kwargs`` (prompt embeddings,
    guidance) go to every call, keyword arguments of the call are added; batch-1 tensors are broadcast.
    """

    def __init__(self, model: Callable, timestep_scale: float = 1000.0, model_kwargs: dict | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable model(x_t, timestep), got {type(model).__name__}")
        timestep_scale = float(timestep_scale)
        if not (timestep_scale > 0 and timestep_scale != float("inf")):
            raise ValueError(f"timestep_scale must be a finite number > 0, got {timestep_scale}")
        self.model, self.timestep_scale = model, timestep_scale
        self.model_kwargs = dict(model_kwargs or {})

    def __call__(self, x: torch.Tensor, sigma, **model_kwargs) -> torch.Tensor:
        x_t, t = _flow_coords(x, sigma)
        timestep = (t.flatten() * self.timestep_scale).to(torch.promote_types(x.dtype, torch.float32))
        kwargs = {k: _broadcast(v, x.shape[0]) for k, v in {**self.model_kwargs, **model_kwargs}.items()}
        return flow_to_denoised(_output_tensor(self.model(x_t, timestep, **kwargs)), x, sigma)


class CFGDenoiser:
    """Classifier-free guidance in one batched call: D = D_u + scale (D_c - D_u).

    model(x, sigma, c) is called once on the batch [x; x] with sigma [sigma; sigma] and conditioning
    [uncond; cond].  cond/uncond are tensors (passed positionally: class labels of an EDM net) or
    dicts of keyword tensors (e.g. ``{"encoder_hidden_states": e}`` for an :class:`EpsDenoiser`);
    batch-1 conditionings are broadcast to the sample batch.
    """

    def __init__(self, model: Callable, cond, uncond, scale: float):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if isinstance(cond, dict) != isinstance(uncond, dict):
            raise TypeError("cond and uncond must both be tensors or both be dicts")
        if isinstance(cond, dict) and set(cond) != set(uncond):
            raise ValueError(f"cond and uncond need the same keys, got {sorted(cond)} and {sorted(uncond)}")
        self.model, self.cond, self.uncond, self.scale = model, cond, uncond, float(scale)

    def _pair(self, u, c, batch: int, name: str):
        return torch.cat([_batched(u, batch, f"uncond {name}"), _batched(c, batch, f"cond {name}")])

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        b = x.shape[0]
        x2 = torch.cat([x, x])
        s2 = _per_sample(sigma, x).flatten().repeat(2)
        if isinstance(self.cond, dict):
            kwargs = {k: self._pair(self.uncond[k], self.cond[k], b, k) for k in self.cond}
            out = self.model(x2, s2, **kwargs)
        else:
            out = self.model(x2, s2, self._pair(self.uncond, self.cond, b, "conditioning"))
        d_u, d_c = _output_tensor(out).chunk(2)
        return d_u + self.scale * (d_c - d_u)
