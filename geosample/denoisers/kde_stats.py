"""What a closed-form denoiser call reports per query, shared by the streaming pass (kde.py) and
the index (kde_index.py): :class:`KDEStats`, the path codes, assembly from sub-batches, and the
float64 arithmetic every exact path scores rows with.

Anchored logits.  The softmax needs only differences of squared distances.  Relative to an anchor
row a (a data row near the query) they are

    h_i = -(|x - y_i|^2 - |x - a|^2) / 2 = (y_i - a).(x - a) - |y_i - a|^2 / 2,

whose float64 error is ~ u sqrt(D) |y_i - a| (|x - a| + |y_i - a|): it scales with the rows'
spread, never with |x|^2.  Formed from the distances themselves, the difference of two numbers of
size |x - y|^2 loses everything once |x - y|^2 u exceeds the gaps (queries 1e16 from the data:
|x - y|^2 ~ 1e32 in steps of 1e16, a one-hot posterior came out a mixture)."""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

__all__ = ["KDEStats", "put_rows", "candidate_sq_dists", "anchored_logits", "anchored_stats", "EXACT", "MIXED", "FULL64", "FAST", "INDEXED"]

EXACT, MIXED, FULL64, FAST = 0, 1, 2, 3           # KDEStats.path: how each query was computed
INDEXED = 4                                       # computed on its certified set (kde_index.py)


@dataclass
class KDEStats:
    """Per-query statistics [B]: log_z = logsumexp_i (x.y_i - |y_i|^2/2) / sigma^2,
    log_mass = logsumexp_i -|x - y_i|^2 / (2 sigma^2), ess = 1 / sum_i w_i^2, argmax = argmax_i w_i,
    path = how it was computed (EXACT, MIXED, FULL64, FAST or INDEXED; see kde.py's docstring),
    log_zc = logsumexp_i ((x - c).(y_i - c) - |y_i - c|^2 / 2) / sigma^2 = log_mass + |x - c|^2 / (2 sigma^2)
    with c the denoiser's ``center`` (the data mean): the three normalisers differ by per-query
    constants; each is computed without forming them (log_mass is the precise one near the data,
    log_zc far from it)."""
    log_z: torch.Tensor
    ess: torch.Tensor
    argmax: torch.Tensor
    log_mass: torch.Tensor = None
    path: torch.Tensor = None
    log_zc: torch.Tensor = None

    def select(self, idx: torch.Tensor) -> "KDEStats":
        """The statistics of the queries ``idx`` alone."""
        return KDEStats(*(getattr(self, f.name)[idx] for f in fields(self)))


def put_rows(out: torch.Tensor, stats: KDEStats, idx: torch.Tensor, out_i: torch.Tensor, stats_i: KDEStats):
    """out[idx] = out_i and every field of stats[idx] = stats_i, in place."""
    out[idx] = out_i
    for f in fields(stats):
        getattr(stats, f.name)[idx] = getattr(stats_i, f.name)


def candidate_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x_b - y_bj|^2 [B, K] in float64 from direct differences (x [B, D], y [B, K, D]; no
    [B, K, D] temporary)."""
    return torch.cdist(x[:, None, :], y, compute_mode="donot_use_mm_for_euclid_dist")[:, 0].square()


def anchored_logits(x: torch.Tensor, rows: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """h_i = (y_i - a).(x - a) - |y_i - a|^2 / 2 [B, K] float64 (module docstring) for x [B, D],
    rows y [B, K, D] (overwritten with y_i - a) and anchors a [B, D]."""
    a = rows.sub_(anchor[:, None])
    return torch.bmm(a, (x - anchor)[:, :, None])[..., 0] - 0.5 * a.square().sum(-1)


def anchored_stats(center: torch.Tensor, x: torch.Tensor, anchor: torch.Tensor, inv_s2: torch.Tensor,
                   lse: torch.Tensor, ess: torch.Tensor, argmax: torch.Tensor, path: int) -> KDEStats:
    """KDEStats of a softmax whose log normaliser relative to the anchors' logit is
    ``lse`` = log sum_i e^{h_i / sigma^2} [B] (x, anchors a [B, D] float64, center c [D]): the
    anchor's own terms in float64, each normaliser without a large per-query constant."""
    xc, ac = x - center, anchor - center
    g_a = (xc * ac).sum(1) - 0.5 * ac.square().sum(1)                 # (x - c).(a - c) - |a - c|^2 / 2
    log_mass = -0.5 * (x - anchor).square().sum(1) * inv_s2 + lse
    log_zc = g_a * inv_s2 + lse
    log_z = (g_a + (x * center).sum(1) - 0.5 * center.square().sum()) * inv_s2 + lse
    return KDEStats(log_z, ess, argmax, log_mass, torch.full_like(argmax, path, dtype=torch.int8), log_zc)
