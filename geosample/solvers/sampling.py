"""``gs.sample``: run any registered solver on any schedule, with exact NFE accounting."""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..schedules import check_sigmas, check_steps
from . import amed as _amed
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


def _uses_amed(solver, amed) -> bool:
    """True for AMED-Solver ("amed") and for any solver given AMED predictions."""
    return solver == "amed" or (amed is not None and amed is not False)


def nfe(solver, steps: int, afs: bool = False, denoise_to_zero: bool = False, amed=None) -> int:
    """Denoiser calls per sample for ``steps`` steps of ``solver``.

    ``steps`` counts every interval of the grid; with ``denoise_to_zero`` (a trailing 0 in the
    sigmas) the last one is the final full denoise, one call for every solver.  AMED (solver
    "amed", or ``amed`` given: predictions or True): 2 calls per interval, 2 steps - afs.
    """
    steps = check_steps(steps)
    if _uses_amed(solver, amed):
        _amed.check_variant(solver)
        return _amed.nfe(steps, afs, denoise_to_zero)
    spec = get_solver(solver)
    final = int(bool(denoise_to_zero))
    return spec.nfe(steps - final, afs) + final


def steps_for_nfe(solver, nfe: int, afs: bool = False, amed=None) -> int:
    """Solver steps with exactly ``nfe`` denoiser calls (the inverse of :func:`nfe`):
    nfe = evals_per_step * steps - afs (AMED: 2 steps - afs); a ValueError lists the valid NFEs otherwise."""
    if _uses_amed(solver, amed):
        _amed.check_variant(solver)
        return _amed.steps_for_nfe(nfe, afs)
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


def _solver_and_options(solver, options: dict, amed) -> tuple[str, dict]:
    """(the trajectory's solver name, checked options) with or without AMED predictions."""
    if amed is None:
        if solver == "amed":
            raise ValueError("solver 'amed' (AMED-Solver) needs predictions: amed=gs.amed.Fixed(r, scale_dir) or a "
                             "predictor from gs.amed.train / gs.amed.load")
        spec = get_solver(solver)
        return spec.name, _check_options(spec, options)
    if not callable(getattr(amed, "start", None)):
        raise TypeError(f"amed must be gs.amed.Fixed predictions or a predictor from gs.amed.train / gs.amed.load, "
                        f"got {type(amed).__name__}")
    return _amed.label(_amed.check_variant(solver)), _amed.check_options(solver, options)


@torch.no_grad()
def sample(denoiser: Callable, noise: torch.Tensor, sigmas, solver: str = "ipndm", *,
           afs: bool = False, return_trajectory: bool = False, callback: Callable | None = None,
           progress: bool = False, amed=None, **options):
    """Solve the probability-flow ODE from ``x_T = sigmas[0] * noise`` along ``sigmas``.

    denoiser: D(x, sigma) -> x0_hat with x [B, ...] and sigma a [B] tensor.
    noise: [B, ...] standard normal noise (float dtype; the result keeps its dtype and device).
      float16/bfloat16 noise: the solver state is float32, the denoiser gets x in the noise's dtype.
    sigmas: decreasing schedule; a trailing 0 means a final full denoise x = D(x, sigmas[-2]);
      ``sigmas[0] = inf`` starts from x_T = noise at zero SNR (:mod:`geosample.solvers.plan`).
    callback: called after every step's evaluation with a dict (x, i, sigma, sigma_next, denoised).
    amed: AMED predictions (:class:`geosample.amed.Fixed`, or a predictor from
      :func:`geosample.amed.train`) for ``solver`` "amed" (AMED-Solver) or the AMED-Plugin on
      "euler", "dpm2", "ipndm", "dpmpp": one extra call per interval (:mod:`geosample.solvers.amed`).
    Returns the sample [B, ...], or a :class:`Trajectory` with ``return_trajectory=True``.
    """
    name, options = _solver_and_options(solver, options, amed)
    noise = _check_noise(noise)
    grid = check_grid(sigmas)
    s = grid.tolist()
    if return_trajectory:
        check_trajectory_memory(noise, len(s) - 1)
    model = CountedDenoiser(denoiser, noise.dtype)
    xs, ds = [], []

    def on_step(i: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if return_trajectory:
            xs.append(x)
            ds.append(denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": s[i], "sigma_next": s[i + 1], "sigma_hat": s[i],
                      "denoised": denoised})
        if bar is not None:
            bar.update(1)

    x0 = initial_state(noise.to(state_dtype(noise.dtype)), s[0])
    bar = tqdm(total=len(s) - 1, desc=f"sample[{name}]", leave=False) if progress else None
    run = None
    try:
        run = Run(*plan(get_solver(name), s, afs, options), x0, on_step) if amed is None else \
            amed.start(solver, s, afs, options, x0, on_step, denoiser)
        while (request := run.request()) is not None:
            run.send(model(*request))
    finally:
        if bar is not None:
            bar.close()
        getattr(run, "close", lambda: None)()  # a learned predictor's feature hook
    x = run.x
    if not bool(torch.isfinite(x.sum())):  # NaN and inf reach the sum (one reduction, no [B, ...] mask)
        raise FloatingPointError(f"solver {name!r} produced non-finite values; check the denoiser and sigmas")
    if not return_trajectory:
        return x.to(noise.dtype)
    return Trajectory(x=torch.stack(xs + [x]).to(noise.dtype), denoised=torch.stack(ds).to(noise.dtype), sigmas=grid,
                      nfe=model.calls, solver=name)
