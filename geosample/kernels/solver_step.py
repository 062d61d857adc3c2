"""One solver step in one pass over memory (Triton), with its launcher.

Every step of every built-in solver has the form (history ``H``: a ring buffer ``[K, numel]``,
newest entry at ``slot``, older ones at ``(slot - k) mod K``)

    H[slot] = (y - D) / sigma     (NEW = DIRECTION: Euler, Heun, DPM-2, iPNDM, iPNDM_v, DEIS)
    H[slot] = D                   (NEW = DENOISED: DPM-Solver++, UniPC)
    (nothing written)             (NEW = NONE: the UniPC predictor)
    out     = a x + sum_{k < ORDER} c_k H[(slot - k) mod K]

with the row offsets ``((slot - k) mod K) * numel`` computed on the host.  One program reads x
(and y, D when a new entry is made) and the ORDER - 1 older history rows once, and writes out and
the new history row once: the minimum traffic for the step.  The float64
coefficient row ``coef = [a, 1/sigma, c_0, c_1, c_2, c_3]`` is read from device memory (so a
CUDA graph can replay a whole schedule), then rounded to the compute dtype (float32, or float64
for float64 tensors), matching what torch does with Python-float scalars.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import STEP_BLOCK as BLOCK_SIZE, STEP_MAX_ORDER as MAX_ORDER, STEP_WARPS as NUM_WARPS

__all__ = ["BLOCK_SIZE", "NUM_WARPS", "NONE", "DENOISED", "DIRECTION", "MAX_ORDER", "solver_step", "fused_update",
           "coefficient_row", "entry_kind"]

NONE, DENOISED, DIRECTION = 0, 1, 2


@triton.jit
def _term(acc, coef_ptr, k: tl.constexpr, hist_ptr, row, offs, mask):
    """acc + c_k H[row], in acc's dtype."""
    return acc + tl.load(coef_ptr + 2 + k).to(acc.dtype) * tl.load(hist_ptr + row + offs, mask=mask).to(acc.dtype)


@triton.jit
def _solver_step_kernel(x_ptr, y_ptr, d_ptr, hist_ptr, out_ptr, coef_ptr, numel, row0, row1, row2, row3,
                        NEW: tl.constexpr, ORDER: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask)
    cdt = tl.float64 if x.dtype == tl.float64 else tl.float32
    acc = tl.load(coef_ptr).to(cdt) * x.to(cdt)
    if NEW == 0:
        acc = _term(acc, coef_ptr, 0, hist_ptr, row0, offs, mask)
    else:
        h = tl.load(d_ptr + offs, mask=mask).to(cdt)
        if NEW == 2:
            h = (tl.load(y_ptr + offs, mask=mask).to(cdt) - h) * tl.load(coef_ptr + 1).to(cdt)
        h = h.to(hist_ptr.dtype.element_ty)
        tl.store(hist_ptr + row0 + offs, h, mask=mask)
        acc += tl.load(coef_ptr + 2).to(cdt) * h.to(cdt)
    if ORDER > 1:
        acc = _term(acc, coef_ptr, 1, hist_ptr, row1, offs, mask)
    if ORDER > 2:
        acc = _term(acc, coef_ptr, 2, hist_ptr, row2, offs, mask)
    if ORDER > 3:
        acc = _term(acc, coef_ptr, 3, hist_ptr, row3, offs, mask)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def coefficient_row(a: float, sigma: float | None, coeffs, pin_memory: bool = False) -> torch.Tensor:
    """The kernel's float64 coefficient row [a, 1/sigma (0 without sigma), c_0..c_3] on the CPU
    (in pinned memory when ``pin_memory``), built in one call."""
    row = [float(a), 0.0 if sigma is None else 1.0 / sigma, *map(float, coeffs)]
    return torch.tensor(row + [0.0] * (2 + MAX_ORDER - len(row)), dtype=torch.float64, pin_memory=pin_memory)


def entry_kind(has_denoised: bool, sigma: float | None) -> int:
    """The new history entry: DIRECTION (x - D) / sigma, DENOISED (sigma None) or NONE (no D)."""
    return NONE if not has_denoised else (DENOISED if sigma is None else DIRECTION)


def fused_update(x, hist, slot, coeffs, a, denoised, sigma, at, out):
    """:func:`geosample.solvers.fused.update` on CUDA: one :func:`solver_step` launch with the
    coefficient row uploaded to the device from pinned memory (an upload from pageable memory
    would first wait for everything queued on the stream, every step)."""
    coef = coefficient_row(a, sigma, coeffs, pin_memory=x.is_cuda).to(x.device, non_blocking=True)
    return solver_step(x, hist, slot, coef, len(coeffs), entry_kind(denoised is not None, sigma), denoised, at, out)


def solver_step(x: torch.Tensor, hist: torch.Tensor, slot: int, coef: torch.Tensor, order: int, new: int,
                denoised: torch.Tensor | None = None, at: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch one fused step (see the module docstring); returns ``out`` ([*x.shape], x's dtype).

    x, denoised, at, out: contiguous, same shape/dtype/device; hist: contiguous [K, *x.shape];
    coef: float64 [6] on the device; order in [1, MAX_ORDER] counts the terms, new entry included.
    """
    if not 1 <= order <= min(MAX_ORDER, hist.shape[0]):
        raise ValueError(f"order must be in [1, {min(MAX_ORDER, hist.shape[0])}], got {order}")
    if new not in (NONE, DENOISED, DIRECTION):
        raise ValueError(f"new must be NONE, DENOISED or DIRECTION, got {new!r}")
    if coef.dtype != torch.float64 or coef.numel() < 2 + MAX_ORDER:
        raise TypeError(f"coef must be a float64 tensor [a, 1/sigma, c0..c3], got {coef.dtype} {tuple(coef.shape)}")
    if new != NONE and denoised is None:
        raise ValueError("a new history entry needs the denoiser output")
    out = torch.empty_like(x) if out is None else out
    for name, t in (("x", x), ("hist", hist), ("out", out), ("denoised", denoised), ("at", at)):
        if t is not None and not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    d = x if denoised is None else denoised
    y = x if at is None else at
    numel, K = x.numel(), hist.shape[0]
    rows = [((slot - k) % K) * numel for k in range(MAX_ORDER)]  # element offsets, newest first
    grid = (triton.cdiv(numel, BLOCK_SIZE),)
    _solver_step_kernel[grid](x, y, d, hist, out, coef, numel, *rows,
                              NEW=new, ORDER=order, BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
    return out
