"""A whole sampling loop on a preallocated ring buffer, optionally captured as one CUDA graph.

:func:`plan` is the solver's own description (:mod:`geosample.solvers.plan`): a fixed list of
:class:`~geosample.solvers.base.Op`, each one denoiser call (or none) followed by one fused update
(:mod:`geosample.solvers.fused`)

    D      = model(state[src], eval_sigma)             (analytic AFS value on the first call)
    x_next = a x + sum_k c_k H_k,  H_0 = (state[src] - D) / sigma  or  D  (pushed to the ring)
    state[dst] = x_next

the same ops ``gs.sample`` runs.  :class:`FusedSampler` runs a plan for one fixed shape with no
allocation per step; on CUDA, ``graph=True`` captures the whole loop (model included, so the model
must be CUDA-graph capturable) and each call is one graph replay.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from . import amed as _amed
from . import fused
from .base import X, Y, Op, afs_denoised, checked_output, dynamic_threshold
from .plan import plan as _plan
from .sampling import _check_options, _check_noise, check_grid, get_solver, state_dtype

__all__ = ["Op", "plan", "FusedSampler", "sample_fused"]


def plan(solver: str, sigmas, *, afs: bool = False, amed=None, **options) -> tuple[list[Op], int]:
    """(ops, history size) running ``solver`` over ``sigmas`` (a trailing 0 adds the final denoise op);
    ``amed``: fixed AMED predictions (:class:`geosample.amed.Fixed`; a learned predictor needs
    per-sample times, which ``gs.sample`` runs)."""
    if amed is not None:
        if not isinstance(amed, _amed.Fixed):
            raise TypeError(f"the fused sampler runs fixed AMED predictions (gs.amed.Fixed, or predictor.fixed()), "
                            f"got {type(amed).__name__}")
        return amed.plan(solver, check_grid(sigmas).tolist(), afs, _amed.check_options(solver, options))
    spec = get_solver(solver)
    return _plan(spec, check_grid(sigmas).tolist(), afs, _check_options(spec, options))


class FusedSampler:
    """``sampler(noise) -> x0`` for one fixed noise shape/dtype/device: the ``gs.sample`` result
    (within float32 rounding) from a ring buffer, fused updates and no per-step allocation.

    graph=True (CUDA only): capture the whole loop, model included, in a ``torch.cuda.CUDAGraph``
    after two warm-up runs on a side stream; each call then copies the noise in and replays.
    """

    def __init__(self, denoiser: Callable, like: torch.Tensor, sigmas, solver: str = "ipndm", *,
                 afs: bool = False, graph: bool = False, backend: str = "auto", amed=None, **options):
        if not callable(denoiser):
            raise TypeError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
        like = _check_noise(like)
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
        if graph and like.device.type != "cuda":
            raise ValueError(f"graph=True needs a CUDA tensor, got device {like.device}")
        self.ops, size = plan(solver, sigmas, afs=afs, amed=amed, **options)
        self.sigma_max = float(check_grid(sigmas)[0])
        self.denoiser = denoiser
        self.backend = ("triton" if like.is_cuda else "torch") if backend == "auto" else backend
        self.dtype = like.dtype  # the denoiser's and the caller's; the state is state_dtype(dtype)
        self.state = [torch.empty(like.shape, dtype=state_dtype(like.dtype), device=like.device) for _ in (X, Y)]
        self.hist = torch.empty((size, *like.shape), dtype=state_dtype(like.dtype), device=like.device)
        B = like.shape[0]
        self.sigma_t = {v: torch.full((B,), v, dtype=like.dtype, device=like.device)
                        for v in {op.eval_sigma for op in self.ops if op.eval_sigma is not None}}
        self.coef = None  # Triton: every op's coefficient row on the device, so a graph replays them
        if self.backend == "triton":
            from ..kernels import solver_step as ks
            self.coef = torch.stack([ks.coefficient_row(op.a, op.sigma, op.coeffs) for op in self.ops]).to(like.device)
        self.graph = None
        if graph:
            self._capture()

    def _model(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        return checked_output(self.denoiser(x.to(self.dtype), self.sigma_t[sigma]), x)

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

        def torch_step():
            fused.update(x, self.hist, slot, op.coeffs, a=op.a, denoised=denoised, sigma=op.sigma, at=at, out=out,
                         backend="torch")

        if self.backend == "triton":  # the torch step stands in for a kernel that fails on this device
            from ..kernels import run_with_fallback
            from ..kernels import solver_step as ks
            run_with_fallback("solver_step", lambda: ks.solver_step(
                x, self.hist, slot, self.coef[j], len(op.coeffs), ks.entry_kind(denoised is not None, op.sigma),
                denoised, at, out), torch_step)
        else:
            torch_step()
        return slot

    def _run(self, noise: torch.Tensor, check: bool = False) -> torch.Tensor:
        """The loop; ``check``: FloatingPointError naming the first op whose result is not finite."""
        self.state[X].copy_(noise)
        if not math.isinf(self.sigma_max):  # x_T = sigma_max * noise; the noise itself at sigma = inf
            self.state[X].mul_(self.sigma_max)
        slot, step = self.hist.shape[0] - 1, 0
        for j, op in enumerate(self.ops):
            slot = self._step(j, op, slot)
            step = step if op.step is None else op.step
            if check and not bool(torch.isfinite(self.state[op.dst]).all()):
                raise FloatingPointError(f"sample_fused: step {step} (sigma {op.eval_sigma}) produced non-finite "
                                         "values; check the denoiser and sigmas")
        return self.state[X]

    def _capture(self) -> None:
        self.static_noise = torch.zeros_like(self.state[X], dtype=self.dtype)
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
        """The sample [B, ...] for ``noise`` (same shape, dtype and device as ``like``); a new tensor.
        Half-precision noise: the state is float32, the denoiser gets x in the noise's dtype."""
        noise = _check_noise(noise)
        x = self.state[X]
        if noise.shape != x.shape or noise.dtype != self.dtype or noise.device != x.device:
            raise ValueError(f"noise must match the sampler's {tuple(x.shape)} {self.dtype} {x.device}, "
                             f"got {tuple(noise.shape)} {noise.dtype} {noise.device}")
        if self.graph is None:
            out = self._run(noise).clone()
        else:
            self.static_noise.copy_(noise)
            self.graph.replay()
            out = self.static_out.clone()
        if not bool(torch.isfinite(out).all()):
            self._run(noise, check=True)  # again, eagerly, to name the step
            raise FloatingPointError("sample_fused produced non-finite values; check the denoiser and sigmas")
        return out.to(self.dtype)


def sample_fused(denoiser: Callable, noise: torch.Tensor, sigmas, solver: str = "ipndm", *, afs: bool = False,
                 graph: bool = False, backend: str = "auto", amed=None, **options) -> torch.Tensor:
    """``gs.sample(denoiser, noise, sigmas, solver, afs=afs, amed=amed, **options)`` on the fused
    ring-buffer path (no trajectory or callback; ``amed``: fixed predictions only).  For repeated
    calls with one shape keep a :class:`FusedSampler`."""
    return FusedSampler(denoiser, noise, sigmas, solver, afs=afs, graph=graph, backend=backend, amed=amed,
                        **options)(noise)
