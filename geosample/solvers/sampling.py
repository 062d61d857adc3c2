"""``gs.sample``: run any registered solver on any schedule, with exact NFE accounting."""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..schedules import check_sigmas, check_steps
from .base import SOLVERS, CountedDenoiser, Solver, Trajectory, drive

__all__ = ["sample", "solve", "nfe", "get_solver"]


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


def solve(noise: torch.Tensor, sigmas, solver: str = "ipndm", *, afs: bool = False,
          on_step: Callable | None = None, **options):
    """The whole solve as a generator: yields each ``(x, sigma)`` the denoiser must evaluate,
    expects ``D(x, sigma)`` sent back, and returns the sample (see :func:`sample` for arguments).

    This is how step-by-step APIs (a diffusers scheduler) run any solver without re-implementing it.
    """
    spec = get_solver(solver)
    return _solve(spec, _check_noise(noise), check_sigmas(sigmas).tolist(), afs,
                  on_step or (lambda i, x, denoised: None), _check_options(spec, options))


def _solve(spec: Solver, noise: torch.Tensor, s: list, afs: bool, on_step: Callable, options: dict):
    final = s[-1] == 0.0
    ode = s[:-1] if final else s
    x = yield from spec.fn(noise * s[0], ode, afs=afs, on_step=on_step, **options)
    if final:
        denoised = yield x, ode[-1]
        on_step(len(s) - 2, x, denoised)
        x = denoised
    return x


@torch.no_grad()
def sample(denoiser: Callable, noise: torch.Tensor, sigmas, solver: str = "ipndm", *,
           afs: bool = False, return_trajectory: bool = False, callback: Callable | None = None,
           progress: bool = False, **options):
    """Solve the probability-flow ODE from ``x_T = sigmas[0] * noise`` along ``sigmas``.

    denoiser: D(x, sigma) -> x0_hat with x [B, ...] and sigma a [B] tensor.
    noise: [B, ...] standard normal noise (float dtype; the result keeps its dtype and device).
    sigmas: decreasing schedule; a trailing 0 means a final full denoise x = D(x, sigmas[-2]).
    callback: called after every step's evaluation with a dict (x, i, sigma, sigma_next, denoised).
    Returns the sample [B, ...], or a :class:`Trajectory` with ``return_trajectory=True``.
    """
    spec = get_solver(solver)
    options = _check_options(spec, options)
    noise = _check_noise(noise)
    grid = check_sigmas(sigmas)
    s = grid.tolist()
    model = CountedDenoiser(denoiser)
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

    try:
        x = drive(_solve(spec, noise, s, afs, on_step, options), model)
    finally:
        if bar is not None:
            bar.close()
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"solver {spec.name!r} produced non-finite values; check the denoiser and sigmas")
    if not return_trajectory:
        return x
    return Trajectory(x=torch.stack(xs + [x]), denoised=torch.stack(ds), sigmas=grid,
                      nfe=model.calls, solver=spec.name)
