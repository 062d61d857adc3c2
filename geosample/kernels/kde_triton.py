"""Split-N (flash-decoding) Triton kernels for the closed-form denoiser.

Per range of n data rows (queries x_s = x / sigma^2 [B, D], data y [n, D] stored as float32,
float16 or uint8 with y = scale q + offset):

1. ``_logits_kernel``, grid (B / BB, n / BN): L[b, j] = x_s[b] . y_j - |y_j|^2 / (2 sigma_b^2)
   accumulated over D in blocks of BD, and the tile maxima TMAX[b, t] = max_{j in tile t} L[b, j].
2. host: m = max_t TMAX, z = sum exp(L - m), z2 = sum exp(2 (L - m)), top-k of L (torch).
3. ``_wsum_kernel``, grid (B / BB, D / BD, splits): each program walks its share of the N tiles,
   skips tiles whose max is below m - 80 for all its queries, and accumulates
   exp(L - m) @ y; the splits' partial sums are added on the host.

Ranges are merged by log-sum-exp (:func:`geosample.denoisers.kde.merge`).  ``exact`` uses
``input_precision="ieee"`` (full float32 FMA, never TF32); ``fast`` rounds the dot inputs to
bfloat16 (tensor cores).  Memory: L is [B, rows] with rows = max(chunk_size, 2^26 / B) on GPU.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from ..denoisers.kde import SKIP, Partial, merge

__all__ = ["kde_partial"]


@triton.jit
def _load_rows(Y, rows, cols, n, D, scale, offset, DEQUANT: tl.constexpr):
    mask = (rows[:, None] < n) & (cols[None, :] < D)
    y = tl.load(Y + rows[:, None] * D + cols[None, :], mask=mask, other=0).to(tl.float32)
    if DEQUANT:
        y = tl.where(mask, y * scale + offset, 0.0)
    return y


@triton.jit
def _dot(a, b, acc, FAST: tl.constexpr):
    if FAST:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _logits_kernel(X, Y, HY2, INV, L, TMAX, B, n, D, T, scale, offset,
                   BB: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                   DEQUANT: tl.constexpr, FAST: tl.constexpr):
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        x = tl.load(X + rb[:, None] * D + rd[None, :], mask=(rb[:, None] < B) & (rd[None, :] < D), other=0.0)
        y = _load_rows(Y, rn, rd, n, D, scale, offset, DEQUANT)
        acc = _dot(x, tl.trans(y), acc, FAST)
    inv = tl.load(INV + rb, mask=rb < B, other=0.0)
    hy2 = tl.load(HY2 + rn, mask=rn < n, other=0.0)
    logit = tl.where(rn[None, :] < n, acc - inv[:, None] * hy2[None, :], -float("inf"))
    tl.store(L + rb[:, None] * n + rn[None, :], logit, mask=(rb[:, None] < B) & (rn[None, :] < n))
    tl.store(TMAX + rb * T + tl.program_id(1), tl.max(logit, axis=1), mask=rb < B)


@triton.jit
def _wsum_kernel(L, Y, M, TMAX, OUT, B, n, D, T, tiles_per_split, scale, offset,
                 BB: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr,
                 DEQUANT: tl.constexpr, FAST: tl.constexpr):
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rd = tl.program_id(1) * BD + tl.arange(0, BD)
    split = tl.program_id(2)
    m = tl.load(M + rb, mask=rb < B, other=0.0)
    acc = tl.zeros((BB, BD), dtype=tl.float32)
    t0 = split * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, T)):
        tmax = tl.load(TMAX + rb * T + t, mask=rb < B, other=-float("inf"))
        if tl.max(tmax - m, axis=0) > -SKIP:                     # tile skipping
            rn = t * BN + tl.arange(0, BN)
            logit = tl.load(L + rb[:, None] * n + rn[None, :], mask=(rb[:, None] < B) & (rn[None, :] < n),
                            other=-float("inf"))
            p = tl.exp(logit - m[:, None])
            y = _load_rows(Y, rn, rd, n, D, scale, offset, DEQUANT)
            acc = _dot(p, y, acc, FAST)
    tl.store(OUT + split * B * D + rb[:, None] * D + rd[None, :], acc, mask=(rb[:, None] < B) & (rd[None, :] < D))


def _range_partial(q, hy2, xs, inv, k, fast, scale, offset):
    """Partial state of one range: q [n, D] raw stored rows on x's device."""
    b, d = xs.shape
    n = q.shape[0]
    bb, bn, bd = (16 if b <= 16 else 64), 64, 64
    tiles = triton.cdiv(n, bn)
    logits = torch.empty(b, n, device=xs.device)
    tmax = torch.empty(b, tiles, device=xs.device)
    dequant = q.dtype == torch.uint8
    _logits_kernel[(triton.cdiv(b, bb), tiles)](xs, q, hy2, inv, logits, tmax, b, n, d, tiles, scale, offset,
                                                BB=bb, BN=bn, BD=bd, DEQUANT=dequant, FAST=fast)
    m = tmax.amax(1)
    splits = max(1, min(tiles, 128 // max(1, triton.cdiv(b, bb) * triton.cdiv(d, bd))))
    per = triton.cdiv(tiles, splits)
    out = torch.empty(splits, b, d, device=xs.device)
    _wsum_kernel[(triton.cdiv(b, bb), triton.cdiv(d, bd), splits)](logits, q, m, tmax, out, b, n, d, tiles, per,
                                                                 scale, offset, BB=bb, BN=bn, BD=bd,
                                                                 DEQUANT=dequant, FAST=fast)
    p = torch.exp(logits - m[:, None])
    top_v, top_i = logits.topk(min(k, n), dim=1)
    return Partial(m, p.sum(1, dtype=torch.float64), (p * p).sum(1, dtype=torch.float64), out.sum(0), top_v, top_i)


def kde_partial(store, x32: torch.Tensor, inv_s2: torch.Tensor, chunk: int, k: int, precision: str) -> Partial:
    """Streaming state of the whole dataset for float32 queries x32 [B, D] (see module docstring)."""
    dev = x32.device
    b = x32.shape[0]
    inv = inv_s2.to(dev, torch.float32).contiguous()
    xs = (x32 * inv[:, None]).contiguous()
    hy2 = store.hy2.to(dev, torch.float32)
    rows = chunk if dev.type == "cpu" else max(chunk, (1 << 26) // b)
    parts = []
    for a, e in store.ranges(rows):
        q = store.on(dev)[a:e] if not store.mmap else store._raw(a, e).to(dev)
        part = _range_partial(q.reshape(e - a, -1).contiguous(), hy2[a:e].contiguous(), xs, inv, k,
                              precision == "fast", store.scale, store.offset)
        part.top_i += a
        parts.append(part)
    return merge(parts, k)
