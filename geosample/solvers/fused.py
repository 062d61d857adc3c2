"""Fused solver updates on a ring buffer of history entries: the one update every solver shares.

Every step of Euler, Heun, DPM-2, iPNDM, iPNDM_v, DEIS, DPM-Solver++ and UniPC is

    H_new  = (y - D) / sigma   (direction solvers; y = the point D was evaluated at, default x)
    H_new  = D                 (data-prediction solvers, sigma=None)
    x_next = a x + sum_k c_k H_k     (k = 0 newest, at most 4 terms; H_0 = H_new when given)

with float64 host coefficients from the solvers' own coefficient functions.  The history is a
preallocated ring buffer ``[K, *x.shape]`` (:class:`History`); ``update`` writes ``H_new`` into its
next slot and combines in one pass: the Triton kernel (:mod:`geosample.kernels.solver_step`) on
CUDA, plain in-place torch on a fresh output tensor elsewhere (no temporaries besides ``out``).
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["History", "update", "use_triton_step", "MAX_ORDER"]

MAX_ORDER = 4


def _check_like(name: str, t, x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"{name} must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), "
                         f"got ({tuple(t.shape)}, {t.dtype}, {t.device})")


def _torch_update(x, rows, coeffs, a, denoised, sigma, at, out):
    """The CPU path: the same formula with in-place torch ops; rows = [H_0, H_1, ...] (views)."""
    if denoised is not None:
        if sigma is None:
            rows[0].copy_(denoised)
        else:
            torch.sub(x if at is None else at, denoised, out=rows[0]).mul_(1.0 / sigma)   # mul: ~2x cheaper than div
    if a == 1.0:  # x + c_0 H_0 in one pass (no copy of x)
        out = torch.add(x, rows[0], alpha=coeffs[0], out=out)
    else:
        out = torch.mul(x, a, out=out).add_(rows[0], alpha=coeffs[0])
    for c, h in zip(coeffs[1:], rows[1:]):
        out.add_(h, alpha=c)
    return out


_triton_update = None  # a CUDA update installed by use_triton_step; None: geosample.kernels.fused_update


def use_triton_step(triton_update) -> None:
    """Install a one-kernel CUDA update, ``triton_update(x, hist, slot, coeffs, a, denoised, sigma,
    at, out)``, in place of :func:`geosample.kernels.fused_update` (the default, imported on first
    use and run through :func:`geosample.kernels.run_with_fallback`)."""
    global _triton_update
    _triton_update = triton_update


def update(x: torch.Tensor, hist: torch.Tensor, slot: int, coeffs: Sequence[float], *, a: float = 1.0,
           denoised: torch.Tensor | None = None, sigma: float | None = None, at: torch.Tensor | None = None,
           out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """One solver update on the ring buffer ``hist`` [K, *x.shape] (see the module docstring).

    slot: the newest entry's row; with ``denoised`` the new entry is written there first.
    coeffs: c_0.. (newest first, 1..min(K, 4) of them); entry k lives in row (slot - k) mod K.
    backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
    Returns ``out`` (a new tensor unless given; x itself is allowed).
    """
    if not isinstance(hist, torch.Tensor) or hist.dim() != x.dim() + 1 or hist.shape[1:] != x.shape:
        raise ValueError(f"hist must be a tensor [K, {', '.join(map(str, x.shape))}], "
                         f"got {tuple(hist.shape) if isinstance(hist, torch.Tensor) else type(hist).__name__}")
    K = hist.shape[0]
    if not 1 <= len(coeffs) <= min(K, MAX_ORDER):
        raise ValueError(f"need 1 to {min(K, MAX_ORDER)} coefficients for a history of {K}, got {len(coeffs)}")
    if not 0 <= slot < K:
        raise ValueError(f"slot must be in [0, {K}), got {slot}")
    for name, t in (("denoised", denoised), ("at", at), ("out", out)):
        if t is not None:
            _check_like(name, t, x)
    if sigma is not None and denoised is None:
        raise ValueError("sigma is only used with denoised (the new direction (at - denoised) / sigma)")
    return _apply(_resolve(backend, x), x, hist, hist.unbind(0), slot, [float(c) for c in coeffs], float(a),
                  denoised, sigma, at, out)


def _resolve(backend: str, x: torch.Tensor) -> str:
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return backend


def _apply(backend, x, hist, views, slot, coeffs, a, denoised, sigma, at, out):
    """Dispatch one checked update (float ``coeffs`` and ``a``); ``views`` are the rows of ``hist``."""
    def torch_path():
        rows = [views[(slot - k) % len(views)] for k in range(len(coeffs))]
        return _torch_update(x, rows, coeffs, a, denoised, sigma, at, out)

    if backend == "torch":
        return torch_path()
    from ..kernels import fused_update, run_with_fallback  # imported where used: the kernels are a leaf
    return run_with_fallback("solver_step", lambda: (_triton_update or fused_update)(
        x, hist, slot, coeffs, a, denoised, sigma, at, out), torch_path)


class History:
    """A ring buffer of the newest ``size`` solver history entries for states shaped like ``x``.

    ``hist.update(x, coeffs, ...)`` pushes the new entry (when ``denoised`` is given) and returns
    x_next = a x + sum_k coeffs[k] H_k; without ``denoised`` it combines the stored entries only.
    """

    def __init__(self, x: torch.Tensor, size: int, backend: str = "auto"):
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_ORDER:
            raise ValueError(f"history size must be an int in [1, {MAX_ORDER}], got {size!r}")
        self.buffer = torch.empty((size, *x.shape), dtype=x.dtype, device=x.device)
        self.views = self.buffer.unbind(0)
        self.slot, self.count, self.backend = size - 1, 0, _resolve(backend, x)

    def update(self, x: torch.Tensor, coeffs: Sequence[float], *, a: float = 1.0,
               denoised: torch.Tensor | None = None, sigma: float | None = None,
               at: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """x_next (a new tensor unless ``out``); see :func:`update` (the solvers' hot path: ``coeffs``
        and ``a`` are Python floats, as :class:`~geosample.solvers.base.Op` holds them; only the
        history bookkeeping is checked here, tensor shapes by the ops themselves)."""
        K = self.buffer.shape[0]
        slot, count = self.slot, self.count
        if denoised is not None:
            slot, count = (slot + 1) % K, min(count + 1, K)
        if len(coeffs) > count:
            raise ValueError(f"{len(coeffs)} coefficients but only {count} history entries")
        if not 1 <= len(coeffs) <= MAX_ORDER:
            raise ValueError(f"need 1 to {MAX_ORDER} coefficients, got {len(coeffs)}")
        out = _apply(self.backend, x, self.buffer, self.views, slot, coeffs, a, denoised, sigma, at, out)
        self.slot, self.count = slot, count
        return out
