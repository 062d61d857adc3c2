"""Sigma schedules (EDM parametrisation) and conversions between VP time, discrete timesteps and sigma.

Every schedule is a 1-D float64 tensor of ``steps + 1`` strictly decreasing sigmas with
``sigmas[0] = sigma_max`` and ``sigmas[-1] = sigma_min``.  A VP (variance preserving) model at
time ``t`` with signal level ``alpha_t`` (``alphas_cumprod`` in diffusers) is the same process in
EDM coordinates: ``sigma = sqrt((1 - alpha) / alpha)`` and ``x_edm = x_vp / sqrt(alpha)``.
"""
from __future__ import annotations

import inspect
import math
import numbers

import torch

from .denoisers.vp import alpha_to_sigma, discrete_sigmas, sigma_to_alpha, sigma_to_timestep, timestep_to_sigma

__all__ = [
    "polynomial", "logsnr", "time_uniform", "discrete", "by_name", "FAMILIES", "check_sigmas", "check_steps",
    "vp_params", "vp_sigma", "vp_sigma_inv", "alpha_to_sigma", "sigma_to_alpha",
    "discrete_sigmas", "sigma_to_timestep", "timestep_to_sigma",
    "SIGMA_MIN", "SIGMA_MAX", "VP_EPS",
    "flow_t_to_sigma", "sigma_to_flow_t", "flow_shift", "flow_time_shift", "flux_mu", "flow_shifted",
]

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
VP_EPS = 1e-3  # smallest VP time of the standard VP-SDE fitted to [SIGMA_MIN, SIGMA_MAX]


def check_steps(steps) -> int:
    """steps as an int >= 1 (TypeError for non-integers, ValueError below 1)."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return int(steps)


def _check_range(sigma_min: float, sigma_max: float) -> tuple[float, float]:
    sigma_min, sigma_max = float(sigma_min), float(sigma_max)
    if not (math.isfinite(sigma_min) and math.isfinite(sigma_max)):
        raise ValueError(f"sigma_min and sigma_max must be finite, got {sigma_min}, {sigma_max}")
    if sigma_min <= 0:
        raise ValueError(f"sigma_min must be > 0, got {sigma_min}")
    if sigma_min >= sigma_max:
        raise ValueError(f"sigma_min must be < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    return sigma_min, sigma_max


def _check_rho(rho: float) -> float:
    rho = float(rho)
    if not (math.isfinite(rho) and rho > 0):
        raise ValueError(f"rho must be a finite number > 0, got {rho}")
    return rho


def _ramp(steps: int) -> torch.Tensor:
    """u_i = i / steps, i = 0..steps, float64."""
    return torch.arange(steps + 1, dtype=torch.float64) / steps


def _pin_ends(sigmas: torch.Tensor, first: float, last: float) -> torch.Tensor:
    """Set the exact end points, then check that the schedule is finite and strictly decreasing
    (too many steps for a narrow range round neighbours to the same float64)."""
    sigmas[0], sigmas[-1] = first, last
    bad = ~torch.isfinite(sigmas[1:-1])
    if bool(bad.any()):
        i = int(bad.nonzero()[0]) + 1
        raise ValueError(f"the schedule is not finite in float64 (sigma[{i}] = {float(sigmas[i])}) for the range "
                         f"[{last}, {first}]")
    same = sigmas[1:] >= sigmas[:-1]
    if bool(same.any()):
        i = int(same.nonzero()[0])
        raise ValueError(f"{sigmas.numel() - 1} steps over [{last}, {first}] are not strictly decreasing in float64 "
                         f"(sigma[{i}] = {float(sigmas[i])!r}, sigma[{i + 1}] = {float(sigmas[i + 1])!r}); "
                         "use fewer steps or a wider range")
    return sigmas


def polynomial(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
               rho: float = 7.0) -> torch.Tensor:
    """EDM ("Karras") schedule: sigma_i = (smax^(1/rho) + i/steps (smin^(1/rho) - smax^(1/rho)))^rho."""
    steps = check_steps(steps)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    rho = _check_rho(rho)
    try:
        a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    except OverflowError:
        raise ValueError(f"sigma_max ** (1 / rho) overflows float64 (sigma_max={sigma_max}, rho={rho})") from None
    return _pin_ends((a + _ramp(steps) * (b - a)) ** rho, sigma_max, sigma_min)


def logsnr(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """Uniform in lambda = -log sigma (half the log-SNR): sigma_i = smax (smin/smax)^(i/steps)."""
    steps = check_steps(steps)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return _pin_ends(torch.exp(hi + _ramp(steps) * (lo - hi)), sigma_max, sigma_min)


def _log1p_square(s: float) -> float:
    """log(1 + s^2) without overflow for s up to the double range."""
    return math.log1p(s * s) if s < 1e150 else 2 * math.log(s) + math.log1p(1 / (s * s))


def vp_params(sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
              eps: float = VP_EPS) -> tuple[float, float]:
    """(beta_d, beta_min) of the linear VP-SDE with sigma(eps) = sigma_min and sigma(1) = sigma_max.

    sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1.
    """
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    l0, l1 = _log1p_square(sigma_min), _log1p_square(sigma_max)
    beta_d = 2 * (l0 / eps - l1) / (eps - 1)
    return beta_d, l1 - 0.5 * beta_d


def vp_sigma(t, beta_d: float, beta_min: float):
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) (VP time -> EDM sigma)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.sqrt(torch.expm1(0.5 * beta_d * t ** 2 + beta_min * t))


def vp_sigma_inv(sigma, beta_d: float, beta_min: float):
    """Inverse of :func:`vp_sigma`: t = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return (torch.sqrt(beta_min ** 2 + 2 * beta_d * torch.log1p(sigma ** 2)) - beta_min) / beta_d


def time_uniform(steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                 rho: float = 1.0) -> torch.Tensor:
    """Uniform (rho=1) or polynomial (rho) steps in the VP time t in [eps, 1], mapped to sigma.

    t_i = (1 + i/steps (eps^(1/rho) - 1))^rho with the VP-SDE of :func:`vp_params` fitted to
    [sigma_min, sigma_max] (the DPM-Solver / diff-sampler "time_uniform" schedule).
    """
    steps = check_steps(steps)
    sigma_min, sigma_max = _check_range(sigma_min, sigma_max)
    rho = _check_rho(rho)
    beta_d, beta_min = vp_params(sigma_min, sigma_max)
    t = (1 + _ramp(steps) * (VP_EPS ** (1 / rho) - 1)) ** rho
    return _pin_ends(vp_sigma(t, beta_d, beta_min), sigma_max, sigma_min)


def discrete(steps: int, alphas_cumprod, rho: float = 1.0, sigma_min: float | None = None,
             sigma_max: float | None = None) -> torch.Tensor:
    """Schedule for a model trained on discrete timesteps 0..T-1 (LDM / diffusers ``alphas_cumprod``).

    Timesteps t_i = (t_max^(1/rho) + i/steps (t_min^(1/rho) - t_max^(1/rho)))^rho between the
    timesteps of sigma_max and sigma_min (default: the model's whole range), mapped to sigma by
    log-sigma interpolation.  rho=1 gives the uniform ("linspace") spacing of DDIM.
    """
    steps = check_steps(steps)
    rho = _check_rho(rho)
    model_sigmas = discrete_sigmas(alphas_cumprod)
    lo = float(model_sigmas[0]) if sigma_min is None else sigma_min
    hi = float(model_sigmas[-1]) if sigma_max is None else sigma_max
    lo, hi = _check_range(lo, hi)
    t_min, t_max = (float(v) for v in sigma_to_timestep(torch.tensor([lo, hi], dtype=torch.float64), alphas_cumprod))
    a, b = t_max ** (1 / rho), t_min ** (1 / rho)
    t = (a + _ramp(steps) * (b - a)) ** rho
    return _pin_ends(timestep_to_sigma(t, alphas_cumprod), hi, lo)


#: The schedule families by name: ``FAMILIES[name](steps, **params)`` -> ``steps + 1`` sigmas.
FAMILIES = {"polynomial": polynomial, "logsnr": logsnr, "time_uniform": time_uniform, "discrete": discrete}


def by_name(name: str, steps: int, **params) -> torch.Tensor:
    """The ``steps``-step schedule of the family ``name`` (a key of :data:`FAMILIES`), with that
    family's keyword ``params``: polynomial (sigma_min, sigma_max, rho), logsnr (sigma_min,
    sigma_max), time_uniform (sigma_min, sigma_max, rho), discrete (alphas_cumprod, rho, sigma_min,
    sigma_max).  An unknown name is a ValueError, a parameter the family does not take a TypeError."""
    family = FAMILIES.get(name) if isinstance(name, str) else None
    if family is None:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(FAMILIES)}")
    takes = list(inspect.signature(family).parameters)[1:]
    unknown = sorted(set(params) - set(takes))
    if unknown:
        raise TypeError(f"schedule {name!r} takes {', '.join(takes)}; got {', '.join(unknown)}")
    return family(steps, **params)


def _around(v: list, i: int) -> str:
    """A short view of a long list at position i (error messages stay one line)."""
    if len(v) <= 8:
        return str(v)
    lo = max(0, i - 2)
    return f"[{'..., ' if lo else ''}{', '.join(map(repr, v[lo:i + 3]))}{', ...' if i + 3 < len(v) else ''}] ({len(v)} entries)"


def check_sigmas(sigmas) -> torch.Tensor:
    """Validate a schedule and return it as a 1-D float64 CPU tensor.

    Requires at least 2 finite entries, strictly decreasing, all > 0 except an optional
    trailing 0 (a final full denoise).  Errors show the offending entry and its neighbours.
    """
    if isinstance(sigmas, torch.Tensor):
        if sigmas.is_meta:
            raise ValueError("sigmas is a meta tensor (it has no values)")
        s = sigmas.detach().to("cpu", torch.float64)
    else:
        try:
            s = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"sigmas must be a 1-D tensor or sequence of floats: {e}") from None
    if s.dim() != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(s.shape)}")
    v = s.tolist()
    if len(v) < 2:
        raise ValueError(f"sigmas needs at least 2 entries (steps + 1), got {len(v)}")
    bad = [i for i, a in enumerate(v) if not math.isfinite(a)]
    if bad:
        raise ValueError(f"sigmas must be finite (no NaN or inf), got sigma[{bad[0]}] = {v[bad[0]]} in {_around(v, bad[0])}")
    bad = [i for i, a in enumerate(v) if a < 0 or (a == 0 and i < len(v) - 1)]
    if bad:
        raise ValueError(f"sigmas must be positive (a trailing 0 is allowed), got sigma[{bad[0]}] = {v[bad[0]]} "
                         f"in {_around(v, bad[0])}")
    bad = [i for i, (a, b) in enumerate(zip(v, v[1:])) if b >= a]
    if bad:
        i = bad[0]
        raise ValueError(f"sigmas must be strictly decreasing, got sigma[{i}] = {v[i]} then sigma[{i + 1}] = {v[i + 1]} "
                         f"in {_around(v, i)}")
    return s


# ---- flow matching (rectified flows: x_t = (1 - t) x0 + t noise) ----------------------------------
# The flow ODE is the EDM ODE under sigma = t / (1 - t), x = x_t / (1 - t); t = 1 is sigma = inf.

def flow_t_to_sigma(t) -> torch.Tensor:
    """EDM sigma = t / (1 - t) of flow times t in [0, 1] (t = 1 gives inf), float64."""
    t = torch.as_tensor(t, dtype=torch.float64)
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"flow times must lie in [0, 1], got {t.flatten().tolist()[:8]}")
    return torch.where(t == 1, math.inf, t / (1 - t))


def sigma_to_flow_t(sigma) -> torch.Tensor:
    """Flow time t = sigma / (1 + sigma) of EDM sigmas in [0, inf] (inf gives 1), float64."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    if not bool((s >= 0).all()):
        raise ValueError(f"sigmas must be >= 0 (or inf), got {s.flatten().tolist()[:8]}")
    return torch.where(torch.isinf(s), 1.0, s / (1 + s))


def flow_shift(t, shift: float):
    """SD3's static shift of flow times: shift t / (1 + (shift - 1) t) (keeps 0 and 1)."""
    shift = float(shift)
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a finite number > 0, got {shift}")
    t = torch.as_tensor(t, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def flow_time_shift(t, mu: float):
    """Flux's resolution-dependent shift: e^mu / (e^mu + 1 / t - 1), i.e. :func:`flow_shift` by e^mu."""
    mu = float(mu)
    if not math.isfinite(mu):
        raise ValueError(f"mu must be finite, got {mu}")
    return flow_shift(t, math.exp(mu))


def flux_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
            max_shift: float = 1.15) -> float:
    """Flux's shift exponent mu for ``image_seq_len`` latent tokens: linear from base_shift at
    base_seq_len to max_shift at max_seq_len (diffusers' ``calculate_shift``)."""
    if max_seq_len == base_seq_len:
        raise ValueError("max_seq_len must differ from base_seq_len")
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return float(image_seq_len * m + base_shift - m * base_seq_len)


def flow_shifted(steps: int, t_min: float = 1e-3, t_max: float = 1.0, shift: float = 1.0,
                 mu: float | None = None) -> torch.Tensor:
    """Shifted flow schedule as EDM sigmas: flow times uniform from t_max to t_min, shifted by
    ``shift`` (SD3) or by e^mu (Flux, when ``mu`` is given), then sigma = t / (1 - t).

    ``steps + 1`` float64 sigmas, strictly decreasing; the first is inf when t_max = 1.  The
    flow times back: :func:`sigma_to_flow_t`.  With t_min = 1 / steps and ``steps + 1`` points
    this is Flux's ``np.linspace(1, 1 / n, n)`` before the shift.
    """
    steps = check_steps(steps)
    t_min, t_max = float(t_min), float(t_max)
    if not 0 < t_min < t_max <= 1:
        raise ValueError(f"flow times need 0 < t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
    t = t_max + _ramp(steps) * (t_min - t_max)
    t = flow_shift(t, shift) if mu is None else flow_time_shift(t, mu)
    sigmas = flow_t_to_sigma(t)
    return _pin_ends(sigmas, float(sigmas[0]), float(sigmas[-1]))
