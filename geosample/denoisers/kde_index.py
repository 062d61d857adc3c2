"""A dataset index for the closed-form denoiser: exact results from a certified subset of the rows.

For a query x at noise level sigma only the rows with |x - y_i|^2 within 2 sigma^2 log(N / tol)
of the nearest one can carry weight above tol / N of the largest.  The index proves which rows
cannot, without touching them, from a lower bound on their distance.

Bound.  P [D, r] an orthonormal basis (the top-r principal directions of a seeded subsample, in
float64), c the data mean, v_i = (P^T (y_i - c), rho_i) in R^{r+1} with
rho_i = |(I - P P^T)(y_i - c)|, and v_x likewise for the query.  Pythagoras on the span of P plus
the reverse triangle inequality on its complement give

    |x - y_i|^2 >= |P^T (x - y_i)|^2 + (|r_x| - rho_i)^2 = |v_x - v_i|^2 =: L_i.

The index keeps v_i in float32 ([N, r + 1] plus five columns: 4 (r + 6) bytes a row), and
L_i for a block of rows is one float32 GEMM of inner size r + 6, whose extra columns add the
squared norms and subtract a rounding margin  c_r (|v_x| + |v_i|)^2 + 2 (|r_x| + rho_i)(e_x + e_i), c_r = (r + 32) 2^-24
(the float32 GEMM, the float32 rounding of the stored v_i and of v_x, and the float64 error
e_i / e_x of rho computed as sqrt(|y - c|^2 - |P^T (y - c)|^2)), so that the computed L_i is a
lower bound on |x - y_i|^2 as the float64 softmax sees it.

Certified set, per query.  Pass 1 over the index: the ``probe`` rows of smallest L_i; their exact
float64 distances give d_up >= min_i |x - y_i|^2.  Pass 2: S = {i : L_i <= T},
T = d_up + 2 sigma^2 log(N / tol).  Every row outside S has |x - y_i|^2 > T >= d_min + 2 sigma^2
log(N / tol), so its weight is below tol / N of the largest: the rows left out carry less than
``tol`` (default 1e-12, the exact path's REST_TOL) of the total weight.  The rows of S are then
evaluated exactly (float64 direct differences |x - y_i|^2, the reference backend's arithmetic).
A query whose S would exceed ``max_fraction`` of N (large sigma, where the Cauchy-Schwarz slack
2 |r_x| rho_i of the bound swamps the softmax width) is handed back to the full streaming pass;
so are queries for which 2 sigma^2 log(N / tol) >= (|x - c| + max_i |y_i - c|)^2 (every row would
be kept), before any index work.

Build: one seeded random subsample (``sample`` rows, random access) for P (a randomized SVD), then one streaming pass
over the data for v_i.  Memory: the index plus one chunk.  Cached on disk under
``cache_root()/kde_index`` keyed by the data's content (shape, dtype, affine map and a hash of
seeded sample rows) and the build options; the file carries a checksum, and a file that does not
load or check is a miss, rebuilt with a :class:`IndexCacheWarning`.
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write, cache_root
from .kde_stats import INDEXED, KDEStats, put_rows

__all__ = ["KDEIndex", "IndexCacheWarning", "INDEXED"]

U32 = 2.0 ** -24
U64 = 2.0 ** -53
FORMAT = 2                       # cache file layout version
BLOCK = 1 << 15                  # index rows per GEMM block of a pass
EXACT_CHUNK = 2048               # rows per float64 block of the exact evaluation


class IndexCacheWarning(UserWarning):
    """A cached index file was unreadable or failed its checks and is being rebuilt."""


def _rho(norm2: torch.Tensor, proj2: torch.Tensor, dim: int, rank: int):
    """rho = sqrt(|v|^2 - |P^T v|^2) from float64 norms, and a bound e on its error (float64)."""
    eps = 4.0 * (dim + rank + 4) * math.sqrt(rank) * U64 * norm2 + 1e-300
    rho2 = (norm2 - proj2).clamp_(min=0)
    rho = rho2.sqrt()
    err = torch.maximum((rho2 + eps).sqrt() - rho, rho - (rho2 - eps).clamp(min=0).sqrt())
    return rho, err * (1 + 1e-6) + 4 * U32 * rho          # + the float32 rounding of the stored rho


def _top_directions(ys: torch.Tensor, r: int, gen: torch.Generator, oversample: int = 16, power: int = 2):
    """[D, r] float64: the top-r right singular vectors of ys [m, D], by a seeded randomized range
    finder with ``power`` subspace iterations (Halko, Martinsson and Tropp 2011): O(m D (r + p))
    instead of the O(m D min(m, D)) of a full SVD.  Any basis keeps the bound valid; a good one
    keeps it tight."""
    k = min(r + oversample, *ys.shape)
    basis = torch.linalg.qr(ys @ torch.randn(ys.shape[1], k, generator=gen, dtype=ys.dtype)).Q    # [m, k]
    for _ in range(power):
        basis = torch.linalg.qr(ys @ (ys.T @ basis)).Q
    _, _, vh = torch.linalg.svd(basis.T @ ys, full_matrices=False)                              # [k, D]
    return vh[:r].T


class KDEIndex:
    """Projection index of a :class:`~geosample.denoisers.kde.Store` (see the module docstring).

    basis [D, r] float64 (orthonormal), vecs [N, r + 6] float32: per row the GEMM columns
    (z_i [r], rho_i, |v_i|, e_i, rho_i, -t_i / 2, -1 / 2) with z_i = P^T (y_i - c) and the row
    term t_i = (1 - c_r) |v_i|^2 - 2 rho_i e_i.  ``tol``: the weight a certified set may leave out, relative to
    the total; ``max_fraction``: the largest certified set, as a fraction of N, evaluated through
    the index (larger ones take the full streaming pass); ``probe``: rows re-scored in float64 to
    set the threshold."""

    def __init__(self, basis: torch.Tensor, vecs: torch.Tensor, tol: float = 1e-12,
                 max_fraction: float = 0.05, probe: int = 4):
        if not 0 < tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        if not 0 < max_fraction <= 1:
            raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction!r}")
        self.basis, self.vecs = basis, vecs
        self.rank = basis.shape[1]
        self.tol, self.max_fraction, self.probe = tol, max_fraction, probe
        self.c_r = (self.rank + 32) * U32

    # ---------------------------------------------------------------- build and cache
    @classmethod
    def build(cls, store, rank: int = 32, sample: int = 4096, seed: int = 0, cache: bool | str | Path = True,
              **options) -> "KDEIndex":
        """The index of ``store``: loaded from the cache when a valid entry exists (``cache``: True for
        ``cache_root()/kde_index``, a folder, or False), else built (one subsample, one pass) and saved."""
        for name, v in (("rank", rank), ("sample", sample)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        folder = None if cache is False else (cache_root() / "kde_index" if cache is True else Path(cache))
        path = folder / f"{cls.key(store, rank, sample, seed)}.npz" if folder is not None else None
        if path is not None and path.exists():
            try:
                return cls(*cls._load(path, store, rank), **options)
            except Exception as e:   # any unreadable or inconsistent file is a miss
                warnings.warn(f"KDE index cache {path} is invalid ({e}); rebuilding", IndexCacheWarning, stacklevel=2)
        basis, vecs = cls._compute(store, rank, sample, seed)
        if path is not None:
            cls._save(path, basis, vecs)
        return cls(basis, vecs, **options)

    @staticmethod
    def key(store, rank: int, sample: int, seed: int) -> str:
        """Content key: shape, storage, affine map, build options and 64 seeded rows as stored."""
        h = hashlib.sha256(repr((FORMAT, store.n, store.shape, store.storage, store.scale, store.offset,
                                 rank, sample, seed)).encode())
        rows = np.unique(np.random.default_rng(12345).integers(0, store.n, 64).tolist() + [0, store.n - 1])
        for i in rows:
            h.update(store._raw(int(i), int(i) + 1).contiguous().numpy().tobytes())
        return h.hexdigest()[:32]

    @staticmethod
    def _compute(store, rank, sample, seed):
        g = torch.Generator().manual_seed(seed)
        m = min(sample, store.n)
        idx = torch.randperm(store.n, generator=g)[:m].sort().values
        ys = store.gather64(idx) - store.center
        r = min(rank, m, store.dim)
        basis = torch.linalg.qr(_top_directions(ys, r, g)).Q.contiguous()   # orthonormal to float64 rounding
        c_r = (r + 32) * U32
        vecs = torch.empty(store.n, r + 6)
        for a, b in store.ranges(chunk=max(store.chunk, 4096)):
            z = (store.rows64(a, b) - store.center) @ basis
            rho, err = _rho(2 * store.hy2[a:b], z.square().sum(1), store.dim, r)    # hy2 = |y_i - c|^2 / 2
            vn2 = z.square().sum(1) + rho.square()
            t = vn2 * (1 - c_r) - 2 * rho * err
            vecs[a:b] = torch.cat([z, torch.stack([rho, vn2.sqrt(), err, rho, -0.5 * t, torch.full_like(t, -0.5)], 1)], 1)
        return basis, vecs

    @staticmethod
    def _checksum(basis, vecs) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(basis.numpy().tobytes())
        h.update(vecs.numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def _save(cls, path, basis, vecs):
        def write(f):
            np.savez(f, basis=basis.numpy(), vecs=vecs.numpy(), checksum=np.array(cls._checksum(basis, vecs)))
        atomic_write(path, write)

    @classmethod
    def _load(cls, path, store, rank):
        with np.load(path, allow_pickle=False) as f:
            basis, vecs, checksum = torch.from_numpy(f["basis"]), torch.from_numpy(f["vecs"]), str(f["checksum"])
        r = basis.shape[1]
        if basis.dtype != torch.float64 or basis.shape[0] != store.dim or not 1 <= r <= rank:
            raise ValueError(f"basis {tuple(basis.shape)} {basis.dtype} does not fit D = {store.dim}")
        if vecs.dtype != torch.float32 or tuple(vecs.shape) != (store.n, r + 6):
            raise ValueError(f"vectors {tuple(vecs.shape)} {vecs.dtype} do not fit N = {store.n}, r = {r}")
        if checksum != cls._checksum(basis, vecs):
            raise ValueError("checksum mismatch")
        return basis, vecs

    # ---------------------------------------------------------------- queries
    def _lower_bounds(self, qx: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """float32 [B, b - a]: certified lower bounds L_i on |x - y_i|^2 for rows a..b (one GEMM)."""
        return torch.mm(qx, self.vecs[a:b].T)

    def _query_cols(self, store, q):
        """Per query the GEMM row -2 [z_x, |r_x|, c_r |v_x|, |r_x|, e_x, 1, t_x] (float32) with
        t_x = (1 - c_r) |v_x|^2 - 2 |r_x| e_x, so that L_i = t_x + t_i - 2 (v_x.v_i + margin terms)."""
        zx = q.xc @ self.basis.to(q.xc.device)
        rx, ex = _rho(q.xc.square().sum(1), zx.square().sum(1), store.dim, self.rank)
        ex = ex + 4 * U32 * (rx + zx.norm(dim=1))             # float32 rounding of z_x and |r_x|
        vn = (zx.square().sum(1) + rx.square()).sqrt()
        tx = vn.square() * (1 - self.c_r) - 2 * rx * ex
        # against rows [z_i, rho_i, |v_i|, e_i, rho_i, -t_i / 2, -1 / 2]
        return (-2.0 * torch.cat([zx, torch.stack([rx, self.c_r * vn, rx, ex, torch.ones_like(rx), tx], 1)], 1)).float()

    def solve(self, store, q, full):
        """(D [B, D] float64, KDEStats) for the prepared queries ``q``: each query on its certified
        set (path INDEXED), or by ``full(q_subset) -> (D, KDEStats)`` when its set is too large."""
        b, n, dev = q.xc.shape[0], store.n, q.xc.device
        gap = 2.0 * math.log(n / self.tol) / q.inv_s2                        # [B] in |x - y|^2 units
        todo = gap >= (q.xc.norm(dim=1) + store.radius) ** 2                 # every row would be kept
        live = (~todo).nonzero()[:, 0]
        out = torch.zeros_like(q.x64)
        stats = KDEStats(*(torch.zeros(b, dtype=torch.float64, device=dev) for _ in range(2)),
                         torch.zeros(b, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.float64, device=dev),
                         torch.full((b,), INDEXED, dtype=torch.int8, device=dev))
        if len(live):
            sub = q.select(live)
            rows, cols, big = self.certify(store, sub, gap[live])
            res, st = self._exact(store, sub, rows, cols, len(live))
            ok = ~big
            put_rows(out, stats, live[ok], res[ok], st.select(ok))
            todo[live[big]] = True
        idx = todo.nonzero()[:, 0]
        if len(idx):
            put_rows(out, stats, idx, *full(q.select(idx)))
        return out, stats

    def certify(self, store, q, gap):
        """(row ids, query ids) of every (query, row) pair in the certified sets, and the mask of the
        queries whose set exceeds max_fraction N."""
        b, n = q.xc.shape[0], store.n
        qx = self._query_cols(store, q)
        k = min(self.probe, n)
        best_v = torch.full((b, k), math.inf)
        best_i = torch.zeros(b, k, dtype=torch.long)
        block_min = []
        for a in range(0, n, BLOCK):                                          # pass 1: probe rows
            lb = self._lower_bounds(qx, a, min(a + BLOCK, n))
            v, i = lb.topk(min(k, lb.shape[1]), dim=1, largest=False)
            block_min.append(v[:, 0])
            best_v, j = torch.cat([best_v, v], 1).topk(k, dim=1, largest=False)
            best_i = torch.cat([best_i, i + a], 1).gather(1, j)
        d_up = _sq_dist(q.x64, store.gather64(best_i)).amin(1)
        thr = ((d_up + gap) * (1 + 1e-9)).float() * (1 + 4 * U32)             # float32, rounded up
        cap = max(int(self.max_fraction * n), k)
        count = torch.zeros(b, dtype=torch.long)
        rows, cols = [], []
        for j, a in enumerate(range(0, n, BLOCK)):                            # pass 2: the sets
            if bool((block_min[j] > thr).all()):
                continue                                                      # no row of the block is kept
            lb = self._lower_bounds(qx, a, min(a + BLOCK, n))
            qi, ri = (lb <= thr[:, None]).nonzero(as_tuple=True)
            count += torch.bincount(qi, minlength=b)
            keep = count[qi] <= cap
            rows.append(ri[keep] + a)
            cols.append(qi[keep])
            if bool((count > cap).all()):
                break                                                         # every set is too large: the full pass
        big = count > cap
        rows, cols = torch.cat(rows), torch.cat(cols)
        keep = ~big[cols]
        return rows[keep], cols[keep], big

    def _exact(self, store, q, rows, cols, b):
        """Float64 softmax of each query over its certified rows (direct differences, online
        log-sum-exp over blocks of the union of the rows): (D [B, D], KDEStats)."""
        dev = q.x64.device
        uniq, inv = torch.unique(rows, return_inverse=True)
        m = torch.full((b,), -math.inf, dtype=torch.float64, device=dev)
        z, z2 = torch.zeros_like(m), torch.zeros_like(m)
        s = torch.zeros_like(q.x64)
        arg = torch.zeros(b, dtype=torch.long, device=dev)
        for a in range(0, len(uniq), EXACT_CHUNK):
            e = min(a + EXACT_CHUNK, len(uniq))
            y = store.gather64(uniq[a:e]).to(dev)
            sel = (inv >= a) & (inv < e)
            mask = torch.zeros(b, e - a, dtype=torch.bool, device=dev)
            mask[cols[sel], inv[sel] - a] = True
            l = torch.full((b, e - a), -math.inf, dtype=torch.float64, device=dev)
            qs = mask.any(1).nonzero()[:, 0]
            d2 = torch.cdist(q.x64[qs], y, compute_mode="donot_use_mm_for_euclid_dist").square_()
            l[qs] = (d2 * (-0.5 * q.inv_s2[qs, None])).masked_fill_(~mask[qs], -math.inf)
            cm, ci = l.max(1)
            arg = torch.where(cm > m, uniq[a:e].to(dev)[ci], arg)
            m_new = torch.maximum(m, cm)
            alpha = torch.exp((m - m_new).nan_to_num_(0.0))
            p = torch.exp(l - m_new[:, None]).nan_to_num_(0.0)
            z, z2 = z * alpha + p.sum(1), z2 * alpha ** 2 + (p * p).sum(1)
            s = s * alpha[:, None] + p @ y
            m = m_new
        log_mass = m + z.log()
        path = torch.full((b,), INDEXED, dtype=torch.int8, device=dev)
        return s / z[:, None], KDEStats(log_mass + 0.5 * q.x64.square().sum(1) * q.inv_s2, z ** 2 / z2, arg,
                                        log_mass, path)


def _sq_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|x_b - y_bj|^2 [B, K] in float64 from direct differences (x [B, D], y [B, K, D])."""
    return torch.cdist(x[:, None, :], y, compute_mode="donot_use_mm_for_euclid_dist")[:, 0].square()
