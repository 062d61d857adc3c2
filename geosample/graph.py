"""A whole sampling loop on a preallocated ring buffer, optionally captured as one CUDA graph.

:func:`plan` turns (solver, sigmas, options) into a fixed list of :class:`Op`, each one denoiser
call (or none) followed by one fused update (:mod:`geosample.solvers.fused`)

    D      = model(state[src], eval_sigma)             (analytic AFS value on the first call)
    x_next = a x + sum_k c_k H_k,  H_0 = (state[src] - D) / sigma  or  D  (pushed to the ring)
    state[dst] = x_next

with the same float64 coefficients as the solvers.  :class:`FusedSampler` runs a plan for one
fixed shape with no allocation per step; on CUDA, ``graph=True`` captures the whole loop (model
included, so the model must be CUDA-graph capturable) and each call is one graph replay.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .schedules import check_sigmas
from .solvers import fused
from .solvers.adams import deis_tab_coefficients, ipndm_coefficients, ipndm_v_coefficients
from .solvers.base import afs_denoised, check_order, checked_output
from .solvers.exponential import dpmpp_coefficients, dynamic_threshold, step_order, unipc_coefficients
from .solvers.sampling import _check_options, _check_noise, get_solver

__all__ = ["Op", "plan", "FusedSampler", "sample_fused"]

X, Y = 0, 1  # the two state buffers: the solution and an intermediate (predictor / midpoint) point


@dataclass(frozen=True)
class Op:
    """One denoiser call at ``state[src]`` (skipped when ``eval_sigma`` is None) and one update.

    sigma: the divisor of the new direction (None: the new entry is D itself);
    afs: use the analytic first-step value instead of calling the model;
    threshold: dynamic thresholding of D before it is pushed (not fused: it needs a quantile).
    """
    eval_sigma: float | None
    src: int
    dst: int
    a: float
    coeffs: tuple[float, ...]
    sigma: float | None = None
    afs: bool = False
    threshold: bool = False


def _adams_plan(s, coefficients, max_order, afs):
    return [Op(s[i], X, X, 1.0, tuple(coefficients(i, min(i + 1, max_order))), s[i], afs and i == 0)
            for i in range(len(s) - 1)]


def _single_step_plan(s, name, afs, r=0.5):
    ops = []
    for i in range(len(s) - 1):
        h, first = s[i + 1] - s[i], afs and i == 0
        if name == "euler":
            ops.append(Op(s[i], X, X, 1.0, (h,), s[i], first))
            continue
        mid = s[i + 1] if name == "heun" else math.exp(r * math.log(s[i + 1]) + (1 - r) * math.log(s[i]))
        w = 0.5 if name == "heun" else 0.5 / r
        ops += [Op(s[i], X, Y, 1.0, (mid - s[i],), s[i], first),
                Op(mid, Y, X, 1.0, (h * w, h * (1 - w)), mid)]
    return ops


def _dpmpp_plan(s, max_order, lower_order_final, thresholding, afs):
    steps = len(s) - 1
    order = [step_order(i, steps, max_order, lower_order_final) for i in range(steps)]
    return [Op(s[i], X, X, s[i + 1] / s[i], tuple(dpmpp_coefficients(s, i, order[i])), None, afs and i == 0,
               thresholding) for i in range(steps)]


def _unipc_plan(s, max_order, variant, lower_order_final, thresholding, afs):
    steps, ops = len(s) - 1, []
    for i in range(steps):
        b_pred, b_corr = unipc_coefficients(s, i, step_order(i, steps, max_order, lower_order_final), variant)
        a, last = s[i + 1] / s[i], i == steps - 1
        ops.append(Op(s[0] if i == 0 else None, X, X if last else Y, a, tuple(b_pred), None, afs and i == 0,
                      thresholding))
        if not last:
            ops.append(Op(s[i + 1], Y, X, a, tuple(b_corr), None, False, thresholding))
    return ops


def plan(solver: str, sigmas, *, afs: bool = False, **options) -> tuple[list[Op], int]:
    """(ops, history size) running ``solver`` over the ODE part of ``sigmas`` (trailing 0 excluded)."""
    spec = get_solver(solver)
    o = _check_options(spec, options)
    s = check_sigmas(sigmas).tolist()
    s = s[:-1] if s[-1] == 0.0 else s
    name = spec.name
    if name in ("ipndm", "ipndm_v", "deis"):
        check_order(o["max_order"], 4)
        if name == "deis":
            table = deis_tab_coefficients(s, o["max_order"]) if len(s) > 1 else []
            coefficients = lambda i, k: table[i]  # noqa: E731
        else:
            fn = ipndm_coefficients if name == "ipndm" else ipndm_v_coefficients
            coefficients = lambda i, k: fn(s, i, k)  # noqa: E731
        return _adams_plan(s, coefficients, o["max_order"], afs), o["max_order"]
    if name in ("euler", "heun", "dpm2"):
        return _single_step_plan(s, name, afs, **o), 1 if name == "euler" else 2
    check_order(o["max_order"], 3)
    if name == "dpmpp":
        return _dpmpp_plan(s, o["max_order"], o["lower_order_final"], o["thresholding"], afs), o["max_order"]
    if name == "unipc":
        return _unipc_plan(s, o["max_order"], o["variant"], o["lower_order_final"], o["thresholding"], afs), \
            o["max_order"] + 1
    raise ValueError(f"solver {name!r} has no fused plan; fused solvers: deis, dpm2, dpmpp, euler, heun, "
                     f"ipndm, ipndm_v, unipc")


class FusedSampler:
    """``sampler(noise) -> x0`` for one fixed noise shape/dtype/device: the ``gs.sample`` result
    (within float32 rounding) from a ring buffer, fused updates and no per-step allocation.

    graph=True (CUDA only): capture the whole loop, model included, in a ``torch.cuda.CUDAGraph``
    after two warm-up runs on a side stream; each call then copies the noise in and replays.
    """

    def __init__(self, denoiser: Callable, like: torch.Tensor, sigmas, solver: str = "ipndm", *,
                 afs: bool = False, graph: bool = False, backend: str = "auto", **options):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
        like = _check_noise(like)
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        if graph and like.device.type != "cuda":
            raise ValueError(f"graph=True needs a CUDA tensor, got device {like.device}")
        self.ops, size = plan(solver, sigmas, afs=afs, **options)
        s = check_sigmas(sigmas).tolist()
        self.sigma_max, self.final = s[0], (s[-2] if s[-1] == 0.0 else None)
        self.denoiser = denoiser
        self.backend = ("triton" if like.is_cuda else "torch") if backend == "auto" else backend
        self.state = [torch.empty_like(like, memory_format=torch.contiguous_format) for _ in (X, Y)]
        self.hist = torch.empty((size, *like.shape), dtype=like.dtype, device=like.device)
        B = like.shape[0]
        self.sigma_t = {v: torch.full((B,), v, dtype=like.dtype, device=like.device)
                        for v in {op.eval_sigma for op in self.ops if op.eval_sigma is not None} | {self.final}
                        if v is not None}
        self.coef = None  # Triton: every op's coefficient row on the device, so a graph replays them
        if self.backend == "triton":
            from .kernels import solver_step as ks
            self.coef = torch.stack([ks.coefficient_row(op.a, op.sigma, op.coeffs) for op in self.ops]).to(like.device)
        self.graph = None
        if graph:
            self._capture()

    def _model(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return checked_output(self.denoiser(x, self.sigma_t[sigma]), x)

    def _step(self, j: int, op: Op, slot: int) -> int:
        at = self.state[op.src]
        denoised = None
        if op.afs:
            denoised = afs_denoised(at, op.eval_sigma)
        elif op.eval_sigma is not None:
            denoised = self._model(at, op.eval_sigma)
        if denoised is not None:
            denoised = dynamic_threshold(denoised) if op.threshold else denoised.contiguous()
            slot = (slot + 1) % self.hist.shape[0]
        x, out = self.state[X], self.state[op.dst]
        if self.backend == "triton":
            from .kernels import solver_step as ks
            ks.solver_step(x, self.hist, slot, self.coef[j], len(op.coeffs), ks.entry_kind(denoised is not None, op.sigma),
                           denoised, at, out)
        else:
            fused.update(x, self.hist, slot, op.coeffs, a=op.a, denoised=denoised, sigma=op.sigma, at=at,
                         out=out, backend=self.backend)
        return slot

    def _run(self, noise: torch.Tensor) -> torch.Tensor:
        torch.mul(noise, self.sigma_max, out=self.state[X])
        slot = self.hist.shape[0] - 1
        for j, op in enumerate(self.ops):
            slot = self._step(j, op, slot)
        return self.state[X] if self.final is None else self._model(self.state[X], self.final)

    def _capture(self) -> None:
        self.static_noise = torch.zeros_like(self.state[X])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles the kernels and lets the model allocate its workspaces
                self._run(self.static_noise)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self._run(self.static_noise)

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor) -> torch.Tensor:
        """The sample [B, ...] for ``noise`` (same shape, dtype and device as ``like``); a new tensor."""
        noise = _check_noise(noise)
        x = self.state[X]
        if noise.shape != x.shape or noise.dtype != x.dtype or noise.device != x.device:
            raise ValueError(f"noise must match the sampler's {tuple(x.shape)} {x.dtype} {x.device}, "
                             f"got {tuple(noise.shape)} {noise.dtype} {noise.device}")
        if self.graph is None:
            return self._run(noise).clone()
        self.static_noise.copy_(noise)
        self.graph.replay()
        return self.static_out.clone()


def sample_fused(denoiser: Callable, noise: torch.Tensor, sigmas, solver: str = "ipndm", *, afs: bool = False,
                 graph: bool = False, backend: str = "auto", **options) -> torch.Tensor:
    """``gs.sample(denoiser, noise, sigmas, solver, afs=afs, **options)`` on the fused ring-buffer
    path (no trajectory or callback).  For repeated calls with one shape keep a :class:`FusedSampler`."""
    return FusedSampler(denoiser, noise, sigmas, solver, afs=afs, graph=graph, backend=backend, **options)(noise)
