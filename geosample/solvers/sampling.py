"""``gs.sample``: run any registered solver on any schedule, with exact NFE accounting."""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..schedules import check_sigmas, check_steps
from .base import SOLVERS, CountedDenoiser, Solver, Trajectory
from .plan import Run, initial_state, plan

__all__ = ["sample", "nfe", "get_solver", "check_grid", "state_dtype", "check_trajectory_memory"]

HALF = (torch.float16, torch.bfloat16)


def get_solver(name) -> Solver:
    """The registered :class:`Solver` for ``name`` (ValueError listing the valid names)."""
    if isinstance(name, Solver):
        return name
    if not isinstance(name, str):
        raise TypeError(f"solver must be a name (str), got {type(name).__name__}")
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid solvers: {', '.join(sorted(SOLVERS))}")
    return SOLVERS[name]


def nfe(solver, steps: int, afs: bool = False, denoise_to_zero: bool = False) -> int:
    """Denoiser calls per sample for ``steps`` steps of ``solver``.

    ``steps`` counts every interval of the grid; with ``denoise_to_zero`` (a trailing 0 in the
    sigmas) the last one is the final full denoise, one call for every solver.
    """
    spec = get_solver(solver)
    steps = check_steps(steps)
    final = int(bool(denoise_to_zero))
    return spec.nfe(steps - final, afs) + final


def steps_for_nfe(solver, nfe: int, afs: bool = False) -> int:
    """Solver steps with exactly ``nfe`` denoiser calls (the inverse of :func:`nfe`):
    nfe = evals_per_step * steps - afs; a ValueError lists the valid NFEs otherwise."""
    spec = get_solver(solver)
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise TypeError(f"nfe must be an int, got {type(nfe).__name__}")
    steps, rest = divmod(nfe + int(afs), spec.evals_per_step)
    if rest or steps < 1:
        valid = [spec.nfe(k, afs) for k in range(1, 6)]
        raise ValueError(f"solver {spec.name!r} cannot use exactly {nfe} denoiser calls (afs={afs}); "
                         f"valid NFEs: {', '.join(map(str, valid))}, ...")
    return steps


def _check_noise(noise) -> torch.Tensor:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must have a floating dtype (float16/bfloat16/float32/float64), got {noise.dtype}")
    if noise.dim() < 1 or noise.shape[0] == 0:
        raise ValueError(f"noise must have shape [B, ...] with B >= 1, got {tuple(noise.shape)}")
    return noise


def _check_options(spec: Solver, options: dict) -> dict:
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        valid = ", ".join(sorted(spec.defaults)) or "none"
        raise TypeError(f"solver {spec.name!r} got unknown options {unknown}; its options: {valid}")
    return {**spec.defaults, **options}


def check_grid(sigmas) -> torch.Tensor:
    """:func:`~geosample.schedules.check_sigmas`, also allowing ``sigmas[0] = inf`` (a zero-SNR start,
    see :mod:`.plan`)."""
    try:
        s = sigmas if isinstance(sigmas, torch.Tensor) else torch.as_tensor(sigmas, dtype=torch.float64)
        infinite_start = s.dim() == 1 and s.numel() >= 2 and not s.is_meta and float(s[0]) == math.inf
    except (TypeError, ValueError, RuntimeError):
        infinite_start = False  # check_sigmas says what is wrong
    if not infinite_start:
        return check_sigmas(sigmas)
    rest = s[1:].detach().to("cpu", torch.float64)
    if bool(torch.isinf(rest).any()):
        raise ValueError(f"only sigmas[0] may be inf (a start at flow time 1 or zero SNR), got {s.tolist()[:8]}")
    check_sigmas(torch.cat([rest[:1] * 2 + 1, rest]))  # the finite part, with a finite stand-in for inf
    return torch.cat([rest.new_full((1,), math.inf), rest])


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """The solver state's dtype: float32 for half-precision inputs (float16/bfloat16), else the input's."""
    return torch.float32 if dtype in HALF else dtype


def _available_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def check_trajectory_memory(noise: torch.Tensor, steps: int) -> None:
    """ValueError, before any work, when a trajectory of ``steps`` steps (x and denoised, stacked
    once more at the end) would not fit in the memory available on noise's device."""
    need = 2 * (2 * steps + 1) * noise.numel() * torch.empty((), dtype=state_dtype(noise.dtype)).element_size()
    free = _available_bytes(noise.device)
    if free is not None and need > free:
        raise ValueError(f"return_trajectory=True over {steps} steps for noise {tuple(noise.shape)} needs about "
                         f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB available on {noise.device}; "
                         "use fewer steps, a smaller batch, or a callback that keeps what you need")


@torch.no_grad()
def sample(denoiser: Callable, noise: torch.Tensor, sigmas, solver: str = "ipndm", *,
           afs: bool = False, return_trajectory: bool = False, callback: Callable | None = None,
           progress: bool = False, **options):
    """Solve the probability-flow ODE from ``x_T = sigmas[0] * noise`` along ``sigmas``.

    denoiser: D(x, sigma) -> x0_hat with x [B, ...] and sigma a [B] tensor.
    noise: [B, ...] standard normal noise (float dtype; the result keeps its dtype and device).
      float16/bfloat16 noise: the solver state is float32, the denoiser gets x in the noise's dtype.
    sigmas: decreasing schedule; a trailing 0 means a final full denoise x = D(x, sigmas[-2]);
      ``sigmas[0] = inf`` starts from x_T = noise at zero SNR (:mod:`geosample.solvers.plan`).
    callback: called after every step's evaluation with a dict (x, i, sigma, sigma_next, denoised).
    Returns the sample [B, ...], or a :class:`Trajectory` with ``return_trajectory=True``.
    """
    spec = get_solver(solver)
    options = _check_options(spec, options)
    noise = _check_noise(noise)
    grid = check_grid(sigmas)
    s = grid.tolist()
    if return_trajectory:
        check_trajectory_memory(noise, len(s) - 1)
    ops, size = plan(spec, s, afs, options)
    model = CountedDenoiser(denoiser, noise.dtype)
    xs, ds = [], []
    bar = tqdm(total=len(s) - 1, desc=f"sample[{spec.name}]", leave=False) if progress else None

    def on_step(i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if return_trajectory:
            xs.append(x)
            ds.append(denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s[i], "sigma_next": s[i + 1], "sigma_hat": s[i],
                      "denoised": denoised})
        if bar is not None:
            bar.update(1)

    run = Run(ops, size, initial_state(noise.to(state_dtype(noise.dtype)), s[0]), on_step)
    try:
        while (request := run.request()) is not None:
            run.send(model(*request))
    finally:
        if bar is not None:
            bar.close()
    x = run.x
    if not bool(torch.isfinite(x.sum())):  # NaN and inf reach the sum (one reduction, no [B, ...] mask)
        raise FloatingPointError(f"solver {spec.name!r} produced non-finite values; check the denoiser and sigmas")
    if not return_trajectory:
        return x.to(noise.dtype)
    return Trajectory(x=torch.stack(xs + [x]).to(noise.dtype), denoised=torch.stack(ds).to(noise.dtype), sigmas=grid,
                      nfe=model.calls, solver=spec.name)
