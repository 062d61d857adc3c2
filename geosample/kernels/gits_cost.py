"""GITS cost matrix on CUDA (Triton): the jump errors are formed in registers, never stored.

Pair kernel (l1 / l2), one program per (sample b, start point i, block of BLOCK_T later points j):

    e_ij = (x_i - x_j) + h_ij d_i,   d_i = (x_i - D_i) / G_i,   h_ij = G_j - G_i
    out[b, i, j] = sum_k |e_ijk|^p   (p = 1 or 2)

streamed over D in BLOCK_D columns: a [BLOCK_T, BLOCK_D] tile of the teacher points per step, each
block's sums in the input precision, accumulated in float64 (the C++ kernel's rule).  A block
with no j > i reads nothing.  Block sizes come from :mod:`geosample.kernels.configs`.

Moment kernel (dev), one program per (point t, sample b): the five float64 dot products
``r.r, r.c, d.d, d.c, r.d`` with ``r = x[T-1] - x[t]``, ``c = x[T-1] - x[0]``, from which the
projected deviations follow (:func:`geosample.gits.cost.dev_from_moments`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import COST_BLOCK_D, COST_PAIR_OPTIONS, COST_WARPS, MOMENT_BLOCK_D, cost_block_t

__all__ = ["pair_sums", "dev_moments"]


@triton.jit
def _pair_kernel(x_ptr, den_ptr, grid_ptr, out_ptr, B, D, T,
                 SQUARE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1).to(tl.int64)
    j = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    later = (j > i) & (j < T)
    d_end = tl.where((tl.program_id(2) + 1) * BLOCK_T > i + 1, D, 0)             # no j > i: read nothing
    g_i = tl.load(grid_ptr + i)
    h = tl.load(grid_ptr + j, mask=j < T, other=0.0) - g_i                        # float64 [BLOCK_T]
    row_i = (i * B + b) * D
    rows_j = (j.to(tl.int64) * B + b) * D
    acc = tl.zeros([BLOCK_T], dtype=tl.float64)
    for k0 in range(0, d_end, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        kmask = k < D
        xi = tl.load(x_ptr + row_i + k, mask=kmask, other=0.0)
        di = ((xi.to(tl.float64) - tl.load(den_ptr + row_i + k, mask=kmask, other=0.0).to(tl.float64)) / g_i)
        tile = later[:, None] & kmask[None, :]
        xj = tl.load(x_ptr + rows_j[:, None] + k[None, :], mask=tile, other=0.0)
        e = (xi[None, :] - xj) + h.to(xj.dtype)[:, None] * di.to(xj.dtype)[None, :]
        e = tl.where(tile, e, 0.0)
        if SQUARE:
            part = tl.sum(e * e, axis=1)
        else:
            part = tl.sum(tl.abs(e), axis=1)
        acc += part.to(tl.float64)
    tl.store(out_ptr + (b * T + i) * T + j, acc, mask=j < T)


def pair_sums(x: torch.Tensor, den: torch.Tensor, grid: torch.Tensor, square: bool) -> torch.Tensor:
    """float64 [B, T, T]: per sample, sum_k |e_ijk|^p for i < T-1 (row T-1 and j <= i are zero).

    x [T, B, D], den [T-1, B, D] (float32 or float64, contiguous, one device), grid float64 [T].
    """
    t, b, d = x.shape
    out = torch.zeros(b, t, t, dtype=torch.float64, device=x.device)
    block_t = cost_block_t(t)
    _pair_kernel[(b, t - 1, triton.cdiv(t, block_t))](x, den, grid, out, b, d, t, SQUARE=square, BLOCK_T=block_t,
                                                      BLOCK_D=COST_BLOCK_D, **COST_PAIR_OPTIONS)
    return out


@triton.jit
def _moment_kernel(x_ptr, den_ptr, grid_ptr, out_ptr, B, D, T, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    d_end = tl.where(t + 1 < T, D, 0)              # the last point has no direction: d = 0 there
    inv = 1.0 / tl.load(grid_ptr + t)
    row_t, row_first, row_last = (t * B + b) * D, b * D, ((T - 1) * B + b) * D
    rr = tl.zeros([BLOCK_D], dtype=tl.float64)
    rc = tl.zeros([BLOCK_D], dtype=tl.float64)
    dd = tl.zeros([BLOCK_D], dtype=tl.float64)
    dc = tl.zeros([BLOCK_D], dtype=tl.float64)
    rd = tl.zeros([BLOCK_D], dtype=tl.float64)
    for k0 in range(0, D, BLOCK_D):
        k = k0 + tl.arange(0, BLOCK_D)
        kmask = k < D
        last = tl.load(x_ptr + row_last + k, mask=kmask, other=0.0).to(tl.float64)
        xt = tl.load(x_ptr + row_t + k, mask=kmask, other=0.0).to(tl.float64)
        c = last - tl.load(x_ptr + row_first + k, mask=kmask, other=0.0).to(tl.float64)
        r = last - xt
        dmask = k < d_end
        d = tl.where(dmask, (xt - tl.load(den_ptr + row_t + k, mask=dmask, other=0.0).to(tl.float64)) * inv, 0.0)
        rr += r * r
        rc += r * c
        dd += d * d
        dc += d * c
        rd += r * d
    base = (t * B + b) * 5
    tl.store(out_ptr + base + 0, tl.sum(rr, axis=0))
    tl.store(out_ptr + base + 1, tl.sum(rc, axis=0))
    tl.store(out_ptr + base + 2, tl.sum(dd, axis=0))
    tl.store(out_ptr + base + 3, tl.sum(dc, axis=0))
    tl.store(out_ptr + base + 4, tl.sum(rd, axis=0))


def dev_moments(x: torch.Tensor, den: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """float64 [T, B, 5]: r.r, r.c, d.d, d.c, r.d per point and sample (d = 0 at the last point)."""
    t, b, d = x.shape
    out = torch.empty(t, b, 5, dtype=torch.float64, device=x.device)
    _moment_kernel[(t, b)](x, den, grid, out, b, d, t, BLOCK_D=MOMENT_BLOCK_D, num_warps=COST_WARPS)
    return out
