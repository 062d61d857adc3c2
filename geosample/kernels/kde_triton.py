"""Split-N (flash-decoding) Triton kernels for the closed-form denoiser.

Per range of n data rows, in the centred coordinates of :mod:`geosample.denoisers.kde` (queries
x_s = (x - c) inv [B, D] with inv ~ 1 / sigma^2, rows y - c [n, D] read as centred float32, or as
float16 / uint8 q with y - c = scale q + shift[col]):

1. ``_logits_kernel``, grid (B / BB, n / BN): L[b, j] = x_s[b] . y_j - inv_b |y_j|^2 / 2
   accumulated over D in blocks of BD, and the tile maxima TMAX[b, t] = max_{j in tile t} L[b, j].
2. host: m = max_t TMAX, z = sum exp(L - m), z2 = sum exp(2 (L - m)), top-k of L (torch).
3. ``_wsum_kernel``, grid (B / BB, D / BD, splits): each program walks its share of the N tiles,
   skips tiles whose max is below m - SKIP for all its queries, and accumulates
   exp(L - m) @ y; the splits' partial sums are added on the host.

Both kernels issue their dots in slices of BK along the summed axis (D in 1., the tile's rows in 3.;
BK = BD = BN is one dot per block), summed in the same order: the depth that keeps an exact float32
dot in registers under the installed Triton release (:func:`geosample.kernels.configs.kde_two_phase`).

Weights below e^-SKIP are exactly 0 (:mod:`geosample.kernels.online_softmax`).  Ranges are merged
by log-sum-exp (:func:`geosample.kernels.online_softmax.merge`).  ``exact`` uses
``input_precision="ieee"`` (full float32 FMA, never TF32); ``fast`` rounds the dot inputs to
bfloat16 (tensor cores).  Memory: L is [B, rows] with rows = max(chunk_size, 2^26 / B) on GPU.

For D <= ``FUSED_MAX_D`` one fused kernel replaces 1-3 (flash decoding): ``_fused_kernel``, grid
(B / BB, splits), keeps a block of BB queries and the running state in registers while it walks
its split of the N tiles (nothing of size B x N is written):

    m' = max(m, max_j L_j),  a = exp(m - m'),  z' = a z + sum_j e^{L_j - m'},
    z2' = a^2 z2 + sum_j e^{2 (L_j - m')},  s' = a s + sum_j e^{L_j - m'} y_j

(tiles whose max is below m - SKIP for all BB queries skip the exp and the second dot), plus a
running top-k of the logits it summed, so the float64 re-scoring subtracts exactly the terms that
were streamed.  Each split writes (m, z, z2, s, top-k); ``_merge_splits`` combines them.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from . import run_with_fallback
from .configs import (FUSED_BB, FUSED_MAX_D, FUSED_MIN_TILES, FUSED_PROGRAMS, KDE_BD, KDE_BN, fused_max_d,
                      fused_options, fused_tiles, kde_query_block, kde_two_phase, top_k_width)
from .online_softmax import SKIP as _SKIP
from .online_softmax import WEIGHT_FLOOR as _FLOOR
from .online_softmax import Partial, exp_weights, merge

SKIP = tl.constexpr(_SKIP)      # compiled Triton reads only constexpr globals (the interpreter reads any)
FLOOR = tl.constexpr(_FLOOR)

__all__ = ["kde_partial"]


@triton.jit
def _load_rows(Y, rows, cols, n, D, scale, SHIFT, DEQUANT: tl.constexpr):
    """Centred float32 rows [rows, cols]: stored as such, or scale * q + SHIFT[col] (DEQUANT)."""
    mask = (rows[:, None] < n) & (cols[None, :] < D)
    y = tl.load(Y + rows[:, None] * D + cols[None, :], mask=mask, other=0).to(tl.float32)
    if DEQUANT:
        shift = tl.load(SHIFT + cols, mask=cols < D, other=0.0)
        y = tl.where(mask, y * scale + shift[None, :], 0.0)
    return y


@triton.jit
def _weights(d):
    """e^d for logit differences d <= 0, exactly 0 below e^-SKIP (never subnormal)."""
    p = tl.exp(tl.maximum(d, -SKIP - 1.0))
    return tl.where(p < FLOOR, 0.0, p)


@triton.jit
def _dot(a, b, acc, FAST: tl.constexpr):
    if FAST:
        return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def _logits_kernel(X, Y, HY2, INV, L, TMAX, B, n, D, T, scale, SHIFT,
                   BB: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
                   DEQUANT: tl.constexpr, FAST: tl.constexpr):
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BB, BN), dtype=tl.float32)
    for d0 in range(0, D, BD):
        for k0 in tl.static_range(0, BD, BK):
            rd = d0 + k0 + tl.arange(0, BK)
            x = tl.load(X + rb[:, None] * D + rd[None, :], mask=(rb[:, None] < B) & (rd[None, :] < D), other=0.0)
            y = _load_rows(Y, rn, rd, n, D, scale, SHIFT, DEQUANT)
            acc = _dot(x, tl.trans(y), acc, FAST)
    inv = tl.load(INV + rb, mask=rb < B, other=0.0)
    hy2 = tl.load(HY2 + rn, mask=rn < n, other=0.0)
    logit = tl.where(rn[None, :] < n, acc - inv[:, None] * hy2[None, :], -float("inf"))
    tl.store(L + rb[:, None] * n + rn[None, :], logit, mask=(rb[:, None] < B) & (rn[None, :] < n))
    tl.store(TMAX + rb * T + tl.program_id(1), tl.max(logit, axis=1), mask=rb < B)


@triton.jit
def _wsum_kernel(L, Y, M, TMAX, OUT, B, n, D, T, tiles_per_split, scale, SHIFT,
                 BB: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr,
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
            for k0 in tl.static_range(0, BN, BK):
                rn = t * BN + k0 + tl.arange(0, BK)
                logit = tl.load(L + rb[:, None] * n + rn[None, :], mask=(rb[:, None] < B) & (rn[None, :] < n),
                                other=-float("inf"))
                p = _weights(logit - m[:, None])
                y = _load_rows(Y, rn, rd, n, D, scale, SHIFT, DEQUANT)
                acc = _dot(p, y, acc, FAST)
    tl.store(OUT + split * B * D + rb[:, None] * D + rd[None, :], acc, mask=(rb[:, None] < B) & (rd[None, :] < D))


def _range_partial(q, hy2, xs, inv, k, fast, scale, shift):
    """Partial state of one range: q [n, D] rows as :meth:`Store.stream_rows` gives them, on x's device."""
    b, d = xs.shape
    n = q.shape[0]
    bb, bn, bd = kde_query_block(b), KDE_BN, KDE_BD
    bk, options = kde_two_phase("logits", fast, bb)
    tiles = triton.cdiv(n, bn)
    logits = torch.empty(b, n, device=xs.device)
    tmax = torch.empty(b, tiles, device=xs.device)
    dequant = q.dtype != torch.float32
    _logits_kernel[(triton.cdiv(b, bb), tiles)](xs, q, hy2, inv, logits, tmax, b, n, d, tiles, scale, shift,
                                                BB=bb, BN=bn, BD=bd, BK=bk, DEQUANT=dequant, FAST=fast, **options)
    m = tmax.amax(1)
    splits = max(1, min(tiles, 128 // max(1, triton.cdiv(b, bb) * triton.cdiv(d, bd))))
    per = triton.cdiv(tiles, splits)
    out = torch.empty(splits, b, d, device=xs.device)
    bk, options = kde_two_phase("wsum", fast, bb)
    _wsum_kernel[(triton.cdiv(b, bb), triton.cdiv(d, bd), splits)](logits, q, m, tmax, out, b, n, d, tiles, per,
                                                                 scale, shift, BB=bb, BN=bn, BD=bd, BK=bk,
                                                                 DEQUANT=dequant, FAST=fast, **options)
    p = exp_weights(logits - m[:, None])
    top_v, top_i = logits.topk(min(k, n), dim=1)
    return Partial(m, p.sum(1, dtype=torch.float64), (p * p).sum(1, dtype=torch.float64), out.sum(0), top_v, top_i)


LOWEST = tl.constexpr(-(2 ** 63))   # removed / out-of-range entries of the packed top-k


@triton.jit
def _pack(logit, rows):
    """Order-preserving int64 keys: the float32 bits made monotone (negatives flipped) in the high
    word, the row in the low word, so a max over keys is the max logit and carries its row."""
    bits = logit.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | rows.to(tl.int64)


@triton.jit
def _kth_value(top):
    """The smallest logit held in the packed top-k ``top`` [BB, KP] -> [BB] float32."""
    key = (tl.min(top, axis=1) >> 32).to(tl.int32)
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)


@triton.jit
def _top_merge(top, cand, KP: tl.constexpr):
    """The KP largest of the distinct keys top [BB, KP] and cand [BB, BN], by KP max-extractions."""
    slot = tl.arange(0, KP)[None, :]
    new = top
    for j in range(KP):
        best = tl.maximum(tl.max(top, axis=1), tl.max(cand, axis=1))[:, None]
        new = tl.where(slot == j, best, new)
        top = tl.where(top == best, LOWEST, top)
        cand = tl.where(cand == best, LOWEST, cand)
    return new


@triton.jit
def _fused_kernel(X, Y, HY2, INV, M, Z, Z2, S, TOP, B, n, D, T, tiles_per_split, scale, SHIFT,
                  BB: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, KP: tl.constexpr,
                  DEQUANT: tl.constexpr, FAST: tl.constexpr):
    """One (query block, split): online log-sum-exp over tiles of BN rows; BD >= D (one D block).
    Writes M, Z, Z2 [splits, B] (m float32, z and z2 float64), S [splits, B, D], TOP [splits, B, KP]."""
    rb = tl.program_id(0) * BB + tl.arange(0, BB)
    rd = tl.arange(0, BD)
    split = tl.program_id(1)
    x = tl.load(X + rb[:, None] * D + rd[None, :], mask=(rb[:, None] < B) & (rd[None, :] < D), other=0.0)
    inv = tl.load(INV + rb, mask=rb < B, other=0.0)
    m = tl.full((BB,), -float("inf"), tl.float32)
    z = tl.zeros((BB,), dtype=tl.float64)
    z2 = tl.zeros((BB,), dtype=tl.float64)
    s = tl.zeros((BB, BD), dtype=tl.float32)
    top = _pack(tl.full((BB, KP), -float("inf"), tl.float32), tl.arange(0, KP)[None, :])  # distinct padding
    kth = tl.full((BB,), -float("inf"), tl.float32)
    t0 = split * tiles_per_split
    for t in range(t0, tl.minimum(t0 + tiles_per_split, T)):
        rn = t * BN + tl.arange(0, BN)
        y = _load_rows(Y, rn, rd, n, D, scale, SHIFT, DEQUANT)
        hy2 = tl.load(HY2 + rn, mask=rn < n, other=0.0)
        logit = _dot(x, tl.trans(y), tl.zeros((BB, BN), dtype=tl.float32), FAST) - inv[:, None] * hy2[None, :]
        logit = tl.where(rn[None, :] < n, logit, -float("inf"))
        tmax = tl.max(logit, axis=1)
        if tl.max(tmax - kth, axis=0) > 0:                      # some query's k-th best improves
            cand = tl.where(rn[None, :] < n, _pack(logit, rn[None, :]), LOWEST)
            top = _top_merge(top, cand, KP)
            kth = _kth_value(top)
        if tl.max(tmax - m, axis=0) > -SKIP:                    # tile skipping
            m_new = tl.maximum(m, tmax)
            a = _weights(m - m_new)
            p = _weights(logit - m_new[:, None])
            a64 = a.to(tl.float64)
            z = z * a64 + tl.sum(p, axis=1).to(tl.float64)
            z2 = z2 * a64 * a64 + tl.sum(p * p, axis=1).to(tl.float64)
            s = _dot(p, y, s * a[:, None], FAST)
            m = m_new
    out = split * B + rb
    tl.store(M + out, m, mask=rb < B)
    tl.store(Z + out, z, mask=rb < B)
    tl.store(Z2 + out, z2, mask=rb < B)
    tl.store(S + out[:, None] * D + rd[None, :], s, mask=(rb[:, None] < B) & (rd[None, :] < D))
    tl.store(TOP + out[:, None] * KP + tl.arange(0, KP)[None, :], top, mask=rb[:, None] < B)


def _fused_partial(q, hy2, xs, inv, k, fast, scale, shift):
    """Partial state of one range by ``_fused_kernel`` (q as in :func:`_range_partial`), D <= FUSED_MAX_D."""
    b, d = xs.shape
    n = q.shape[0]
    bd, bn = fused_tiles(d)
    kp = top_k_width(k)
    tiles, blocks = triton.cdiv(n, bn), triton.cdiv(b, FUSED_BB)
    per = max(FUSED_MIN_TILES, triton.cdiv(tiles * blocks, FUSED_PROGRAMS))
    splits = triton.cdiv(tiles, per)                             # no empty split
    dev = xs.device
    m = torch.empty(splits, b, device=dev)
    z, z2 = torch.empty(2, splits, b, dtype=torch.float64, device=dev)
    s = torch.empty(splits, b, d, device=dev)
    top = torch.empty(splits, b, kp, dtype=torch.int64, device=dev)
    _fused_kernel[(blocks, splits)](xs, q, hy2, inv, m, z, z2, s, top, b, n, d, tiles, per, scale, shift,
                                    BB=FUSED_BB, BN=bn, BD=bd, KP=kp, DEQUANT=q.dtype != torch.float32, FAST=fast,
                                    **fused_options(fast, bd))
    return _merge_splits(m, z, z2, s, top, min(k, n))


def _merge_splits(m, z, z2, s, top, k):
    """:func:`geosample.kernels.online_softmax.merge` over the leading (split) axis of stacked states, with
    the packed top-k keys [splits, B, KP] unpacked: row = low word, logit = high word's float."""
    mx = m.amax(0)
    a = exp_weights(m - mx)                                       # splits are never empty
    keys = top.transpose(0, 1).reshape(top.shape[1], -1).topk(k, dim=1).values
    hi = (keys >> 32).to(torch.int32)
    top_v = (hi ^ ((hi >> 31) & 0x7FFFFFFF)).view(torch.float32)
    top_i = torch.where(torch.isinf(top_v), 0, keys & 0xFFFFFFFF)  # padding (-inf) points at row 0
    a64 = a.double()
    return Partial(mx, (a64 * z).sum(0), (a64 * a64 * z2).sum(0), (a[:, :, None] * s).sum(0), top_v, top_i)


def kde_partial(store, xs: torch.Tensor, inv: torch.Tensor, k: int, precision: str,
                torch_partial: Callable[[int, int], Partial]) -> Partial:
    """Streaming state of the whole dataset for the centred, scaled float32 queries
    xs = (x - c) * inv [B, D] with logit scale inv [B] (see :class:`geosample.denoisers.kde.Query`):
    the fused kernel for D <= FUSED_MAX_D, else the two-phase kernels; ranges merged by log-sum-exp.

    torch_partial(a, e): the same state of rows a..e from the torch path, which runs instead of the
    kernels ("kde_fused" or "kde_two_phase") once they fail to compile or launch
    (:func:`geosample.kernels.run_with_fallback`)."""
    dev, b = xs.device, xs.shape[0]
    xs, inv = xs.contiguous(), inv.to(dev, torch.float32).contiguous()
    hy2, shift = store.hy2.to(dev, torch.float32), store.shift(dev)
    rows = store.chunk if dev.type == "cpu" else max(store.chunk, (1 << 26) // b)
    fast = precision == "fast"
    fused = store.dim <= min(FUSED_MAX_D, fused_max_d(store.storage != "float32", fast))  # FUSED_MAX_D: tests set 0
    fn = _fused_partial if fused else _range_partial

    def triton_partial(a, e):
        part = fn(store.stream_rows(a, e, dev), hy2[a:e].contiguous(), xs, inv, k, fast, store.scale, shift)
        part.top_i += a
        return part

    name = "kde_fused" if fused else "kde_two_phase"
    return merge([run_with_fallback(name, triton_partial, torch_partial, a, e) for a, e in store.ranges(rows)], k)
