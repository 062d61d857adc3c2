"""A dataset index for the closed-form denoiser: exact results from a certified subset of the rows.

For a query x at noise level sigma only the rows with |x - y_i|^2 within 2 sigma^2 log(N / tol)
of the nearest one can carry weight above tol / N of the largest.  The index proves which rows
cannot, without touching them, from a lower bound on their distance.

Bound.  P [D, r] an orthonormal basis (float64; the top-r principal directions of a seeded
subsample), c the data mean, v_i = (P^T (y_i - c), rho_i) in R^{r+1} with
rho_i = |(I - P P^T)(y_i - c)|, and v_x likewise for the query.  Pythagoras on the span of P plus
the reverse triangle inequality on its complement give

    |x - y_i|^2 >= |P^T (x - y_i)|^2 + (|r_x| - rho_i)^2 = |v_x - v_i|^2 =: L_i.

With |v_i| = |y_i - c| and |v_x| = |x - c| exact (float64 norms), only the cross term
v_x . v_i = z_x . z_i + |r_x| rho_i depends on the computed projections.  If the stored z_i, rho_i are
within ez_i, er_i of the true ones and z_x, |r_x| within e_x, then

    L_i >= |v_x|^2 + |v_i|^2 - 2 (z_x . z_i + |r_x| rho_i) - 2 |z_x| ez_i - 2 |r_x| er_i
           - 2 e_x (|v_i| + ez_i + er_i) - c_r (|v_x| + |v_i|)^2,    c_r = (r + 32) 2^-24

(the last term: the float32 GEMM below and the float32 rounding of the stored and query
vectors).  The index keeps per row (z_i, rho_i, |v_i|, ez_i, er_i, |v_i| + ez_i + er_i, -t_i / 2,
-1 / 2) in float32 (4 (r + 7) bytes), t_i = (1 - c_r) |v_i|^2, so that the right-hand side for a
block of rows is one float32 GEMM of inner size r + 7 against the query's matching row: a
certified lower bound on |x - y_i|^2 as the float64 softmax sees it, up to (r + 16) 2^-149 (the
absolute error of float32 subnormals, added to the threshold below).

Certified set, per query.  Pass 1 over the index: the ``probe`` rows of smallest L_i; their exact
float64 distances give d_up >= min_i |x - y_i|^2.  Pass 2: S = {i : L_i <= T},
T = d_up + 2 sigma^2 log(N / tol).  Every row outside S has |x - y_i|^2 > T >= d_min + 2 sigma^2
log(N / tol), so its weight is below tol / N of the largest: the rows left out carry less than
``tol`` (default 1e-12, the exact path's REST_TOL) of the total weight.  The rows of S are then
evaluated exactly, each query on its own set only (float64 logits anchored on a row of the set,
the reference backend's arithmetic, an online log-sum-exp over chunks of (query, row) pairs).
A query whose S would exceed ``max_fraction`` of N (large sigma, where the Cauchy-Schwarz slack
2 |r_x| rho_i of the bound swamps the softmax width) is handed back to the full streaming pass;
so are queries for which 2 sigma^2 log(N / tol) >= (|x - c| + max_i |y_i - c|)^2 (every row would
be kept) or (|x - c| + max_i |y_i - c|)^2 > F32_SAFE (the GEMM could overflow), before any index
work.

Build: one seeded random subsample (``sample`` rows, random access) for P (a randomized SVD),
then one streaming pass over the data for v_i, from the rows as stored, centred in float32 on the
mean in stored units m: z_i = P^T (y_i - c) = scale P^T (q_i - m) + P^T w (w = scale m + offset - c,
tiny), the first term a float32 GEMM accumulated in float64 over blocks of BUILD_BLOCK coordinates,
with the rigorous bound ez_i = scale |q_i - m| (sqrt(r) (gamma_BUILD_BLOCK + 2^-23) + 2^-24) (P and
the centring rounded to float32) on its error (so data far from the origin lose nothing), and
rho_i the midpoint of the interval sqrt(|y_i - c|^2 - |z*|^2), |z*| in [|z_i| - ez_i, |z_i| + ez_i],
er_i its half-width.  Memory: the index plus one chunk.  Cached on disk under
``cache_root()/kde_index`` keyed by the sha256 of every stored byte and the build options; the
file carries a checksum, and a file that does not load or check is a miss, rebuilt with an
:class:`IndexCacheWarning`; a cache that cannot be written (a file where the folder should be, a
read-only folder) warns the same way and the built index is used uncached.
"""
from __future__ import annotations

import hashlib
import io
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._io import atomic_write, cache_root
from .kde_stats import INDEXED, KDEStats, anchored_stats, candidate_sq_dists, put_rows

__all__ = ["KDEIndex", "IndexCacheWarning", "INDEXED"]

U32 = 2.0 ** -24
U64 = 2.0 ** -53
FORMAT = 5                       # cache file layout version (and key scheme)
BLOCK = 1 << 15                  # index rows per GEMM block of a pass
PROGRESS_ROWS = 100_000          # a build over this many rows shows a progress bar (tens of seconds at 10^6)
KEEP_BOUNDS = 1 << 28            # bytes of pass-1 bounds [B, N] kept for pass 2 (else recomputed)
EXACT_BYTES = 1 << 21            # float64 bytes of (query, row) pairs per block of the exact evaluation (cache)
BUILD_BYTES = 1 << 22            # float32 bytes of rows per block of the build pass
BUILD_BLOCK = 512                # coordinates per float32 partial product of the build
RESIDUAL_FLOOR = 3e-3            # the basis stops where the sample's residual RMS is below this fraction of its
                                 # RMS (above the float32 SVD's own error, ~1e-3.5 in these units)
FINE_LIMIT = 2                   # the fine bound refines coarse sets of up to this many times the cap
SIGMA_SKIP = 4.0                 # queries with sigma above this many sigma_data take the full pass at once
F32_SAFE = 2.0 ** 120            # queries with (|x - c| + max_i |y_i - c|)^2 above this take the full pass (no
                                 # float32 overflow in the bound's GEMM: no +inf, no NaN)


class IndexCacheWarning(UserWarning):
    """A cached index file was unreadable or failed its checks and is being rebuilt, or a built
    index could not be written to the cache (it is used all the same)."""


def _rho(norm2: torch.Tensor, proj2: torch.Tensor, dim: int, rank: int):
    """rho = sqrt(|v|^2 - |P^T v|^2) from float64 norms, and a bound e on its error (float64)."""
    eps = 4.0 * (dim + rank + 4) * math.sqrt(rank) * U64 * norm2 + 1e-300
    rho2 = (norm2 - proj2).clamp_(min=0)
    rho = rho2.sqrt()
    err = torch.maximum((rho2 + eps).sqrt() - rho, rho - (rho2 - eps).clamp(min=0).sqrt())
    return rho, err * (1 + 1e-6) + 4 * U32 * rho          # + the float32 rounding of the stored rho


def _rho_interval(norm2: torch.Tensor, z: torch.Tensor, ez: torch.Tensor, dim: int):
    """(rho, e) for rows whose z = P^T v is known to |dz| <= ez: rho^2 = |v|^2 - |z*|^2 with
    |z*| in [|z| - ez, |z| + ez] (|v|^2 = norm2, a float64 sum of ``dim`` squares); rho the
    interval's midpoint, e its half-width (float64)."""
    zn = z.norm(dim=1)
    ez = ez + (z.shape[1] + 2) * U64 * zn                                     # the float64 rounding of |z|
    slack = 4 * U64 * ((dim + 4) * norm2 + (zn + ez).square()) + 1e-300      # ... of |v|^2, the squares, differences
    hi = (norm2 - (zn - ez).clamp(min=0).square() + slack).clamp(min=0).sqrt()
    lo = (norm2 - (zn + ez).square() - slack).clamp(min=0).sqrt()
    return 0.5 * (hi + lo), 0.5 * (hi - lo) * (1 + 1e-6)


def _blocked_mm(q: torch.Tensor, p32: torch.Tensor) -> torch.Tensor:
    """q [C, D] @ p32 [D, r] (float32) summed in float64 over blocks of BUILD_BLOCK coordinates:
    each entry within gamma_BUILD_BLOCK sum_j |q_j p_j| of the exact product."""
    return sum(torch.mm(q[:, a:a + BUILD_BLOCK], p32[a:a + BUILD_BLOCK]).double()
               for a in range(0, q.shape[1], BUILD_BLOCK))


def _top_directions(ys: torch.Tensor, r: int, gen: torch.Generator, oversample: int = 16, power: int = 2):
    """[D, r']: the top-r' right singular vectors of ys [m, D], by a seeded randomized range finder
    with ``power`` subspace iterations (Halko, Martinsson and Tropp 2011), in float32:
    O(m D (r + p)) instead of the O(m D min(m, D)) of a full SVD; r' <= r stops where the
    sample's residual RMS falls below RESIDUAL_FLOOR of its RMS (data of lower rank get a smaller
    index).  Any basis keeps the bound valid (the caller orthonormalises it in float64); a good
    one keeps it tight."""
    k = min(r + oversample, *ys.shape)
    y32 = (ys / ys.abs().amax().clamp(min=1e-300)).float()                 # no float32 overflow or underflow
    basis = torch.linalg.qr(y32 @ torch.randn(ys.shape[1], k, generator=gen)).Q                # [m, k]
    for _ in range(power):
        basis = torch.linalg.qr(y32 @ (y32.T @ basis)).Q
    _, sv, vh = torch.linalg.svd(basis.T @ y32, full_matrices=False)                             # [k, D]
    total = y32.double().square().sum()
    residual = (total - sv.double().square().cumsum(0)).clamp(min=0) / total
    r = min(r, int((residual > RESIDUAL_FLOOR ** 2).sum()) + 1)        # no direction past the sample's rank
    return vh[:r].T.double()


class KDEIndex:
    """Projection index of a :class:`~geosample.denoisers.kde.Store` (see the module docstring).

    basis [D, r] float64 (orthonormal), vecs [N, r + 7] float32: per row the GEMM columns
    (z_i [r], rho_i, |v_i|, ez_i, er_i, |v_i| + ez_i + er_i, -t_i / 2, -1 / 2).  ``tol``: the
    weight a certified set may leave out, relative to the total; ``max_fraction``: the largest
    certified set, as a fraction of N, evaluated through the index (larger ones take the full
    streaming pass); ``probe``: rows re-scored in float64 to
    set the threshold.  One shard of a dataset split across processes: ``n_total`` rows in all and
    ``reduce_min(t [B] float64) -> [B]``, the elementwise minimum over the shards (a collective,
    called once per :meth:`solve` on every shard), so that every shard certifies against the
    nearest row of the whole dataset and a shard none of whose rows can matter does no exact work."""

    def __init__(self, basis: torch.Tensor, vecs: torch.Tensor, fine: torch.Tensor | None = None,
                 fine_cols: torch.Tensor | None = None, tol: float = 1e-12, max_fraction: float = 0.05,
                 probe: int = 4, n_total: int | None = None, reduce_min=None):
        if not 0 < tol < 1:
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        if not 0 < max_fraction <= 1:
            raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction!r}")
        if isinstance(probe, bool) or not isinstance(probe, int) or probe < 1:
            raise ValueError(f"probe must be a positive int, got {probe!r}")
        if n_total is not None and (isinstance(n_total, bool) or not isinstance(n_total, int)
                                    or n_total < vecs.shape[0]):
            raise ValueError(f"n_total must be an int >= this index's {vecs.shape[0]} rows, got {n_total!r}")
        self.basis, self.vecs, self.fine, self.fine_cols = basis, vecs, fine, fine_cols
        self.rank, self.fine_rank = vecs.shape[1] - 7, basis.shape[1]
        self.tol, self.max_fraction, self.probe = tol, max_fraction, probe
        self.n_total, self.reduce_min = n_total, reduce_min
        self.c_r, self.c_f = (self.rank + 32) * U32, (self.fine_rank + 32) * U32
        self._copies = {vecs.device: (basis, vecs, fine, fine_cols)}
        self.build_s, self.cached, self.queries, self.hits = 0.0, False, 0, 0

    @property
    def nbytes(self) -> int:
        """Memory of the index (bytes): 4 (r + 7) per row, plus 2 (r_fine - r) + 12 with a fine level."""
        return sum(t.numel() * t.element_size() for t in (self.basis, self.vecs, self.fine, self.fine_cols)
                   if t is not None)

    def report(self) -> dict:
        """Build time (s; 0 when loaded), whether it came from the cache, size (bytes), ranks, and
        the hit rate: queries answered on their certified sets / queries asked."""
        return dict(build_s=self.build_s, cached=self.cached, bytes=self.nbytes, rank=self.rank,
                    fine_rank=self.fine_rank, queries=self.queries, hits=self.hits,
                    hit_rate=self.hits / self.queries if self.queries else None)

    # ---------------------------------------------------------------- build and cache
    @classmethod
    def build(cls, store, rank: int = 128, fine_rank: int = 256, sample: int = 4096, seed: int = 0,
              cache: bool | str | Path = True, **options) -> "KDEIndex":
        """The index of ``store``: loaded from the cache when a valid entry exists (``cache``: True for
        ``cache_root()/kde_index``, a folder, or False), else built (one subsample, one pass) and saved.
        ``rank``: the coarse bound every call scans; ``fine_rank`` (> rank, else no fine level): the
        finer bound evaluated on the rows the coarse one keeps."""
        for name, v in (("rank", rank), ("fine_rank", fine_rank), ("sample", sample)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        folder = None if cache is False else (cache_root() / "kde_index" if cache is True else Path(cache))
        path = folder / f"{cls.key(store, rank, fine_rank, sample, seed)}.npz" if folder is not None else None
        try:
            hit = path is not None and path.exists()
        except OSError:                                   # e.g. a folder on the way that cannot be listed
            hit = False
        if hit:
            try:
                index = cls(*cls._load(path, store, rank, fine_rank), **options)
                index.cached = True
                return index
            except Exception as e:   # any unreadable or inconsistent file is a miss
                warnings.warn(f"KDE index cache {path} is invalid ({e}); rebuilding", IndexCacheWarning, stacklevel=2)
        t0 = time.perf_counter()
        arrays = cls._compute(store, rank, fine_rank, sample, seed)
        build_s = time.perf_counter() - t0
        if path is not None:
            try:
                cls._save(path, *arrays)
            except OSError as e:                          # a file where a folder should be, read-only, full
                warnings.warn(f"KDE index cache {path} cannot be written ({e}); the index is used "
                              "without caching", IndexCacheWarning, stacklevel=2)
        index = cls(*arrays, **options)
        index.build_s = build_s
        return index

    @staticmethod
    def key(store, rank: int, fine_rank: int, sample: int, seed: int) -> str:
        """Content key: the sha256 of every stored byte (:meth:`Store.digest`), the storage's affine
        map and the build options."""
        h = hashlib.sha256(repr((FORMAT, store.digest(), store.scale, store.offset, rank, fine_rank, sample,
                                 seed)).encode())
        return h.hexdigest()[:32]

    @staticmethod
    def _compute(store, rank, fine_rank, sample, seed):
        """(basis [D, r2], vecs [N, r + 7], fine [N, r2 - r] float16 | None, fine_cols [N, 3] | None)."""
        g = torch.Generator().manual_seed(seed)
        m = min(sample, store.n)
        idx = torch.randperm(store.n, generator=g)[:m].sort().values
        ys = store.gather64(idx) - store.center
        basis = torch.linalg.qr(_top_directions(ys, min(max(rank, fine_rank), m, store.dim), g)).Q.contiguous()
        r2 = basis.shape[1]                                                  # (orthonormal to float64 rounding)
        r = min(rank, r2)
        c_r = (r + 32) * U32
        vecs = torch.empty(store.n, r + 7)
        fine = torch.empty(store.n, r2 - r, dtype=torch.float16) if r2 > r else None
        fine_cols = torch.empty(store.n, 3) if r2 > r else None
        m32 = ((store.center - store.offset) / store.scale).float()         # the mean in stored units
        w = m32.double() * store.scale + store.offset - store.center          # y - c = scale (q - m32) + w
        shift, p32, wn, root_d = w @ basis, basis.float(), float(w.norm()), math.sqrt(store.dim)
        big = float(store.center.norm()) + root_d * abs(store.offset)         # the size float64 rounds against
        blk = min(BUILD_BLOCK, store.dim)

        def ez_of(k, qn, vn):   # the bound on |dz| of k coordinates: products, P in float32 and the centring's
            # rounding (rate); the float64 shift, scaling and sum; w and y = scale q + offset as stored
            rate = math.sqrt(k) * (blk * U32 / (1 - blk * U32) + 2 * U32) * (1 + 1e-6) + U32
            return rate * qn + (store.dim + 8) * U64 * math.sqrt(k) * (qn + wn) + 6 * U64 * (vn + big)

        chunk = max(64, BUILD_BYTES // (4 * store.dim))                      # the converted block stays in cache
        buf = torch.empty(chunk, store.dim)                                  # reused: no page faults per chunk
        blocks = store.ranges(chunk=chunk)
        for a, b in tqdm(blocks, desc=f"kde index ({store.n:,} rows)", leave=False, disable=store.n < PROGRESS_ROWS):
            q = buf[: b - a].copy_(store._raw(a, b)).sub_(m32)               # centred in float32 (rounded)
            norm2 = 2 * store.hy2[a:b]                                         # hy2 = |y_i - c|^2 / 2
            vn = norm2.sqrt()
            qn = (vn + wn) * (1 + 2 * U32)                                     # >= scale |q_i - m32| and |q'_i|
            z = _blocked_mm(q, p32).mul_(store.scale).add_(shift)              # P^T (y_i - c)
            ez = ez_of(r, qn, vn)
            rho, er = _rho_interval(norm2, z[:, :r], ez, store.dim)
            vecs[a:b] = torch.cat([z[:, :r], torch.stack([rho, vn, ez, er, vn + ez + er, -0.5 * (1 - c_r) * norm2,
                                                          torch.full_like(vn, -0.5)], 1)], 1)
            if fine is not None:
                ez2 = ez_of(r2, qn, vn)
                rho2, er2 = _rho_interval(norm2, z, ez2, store.dim)
                f16 = z[:, r:].to(torch.float16)
                fine[a:b] = f16                                                # + its rounding, measured
                ez2 = ez2 + (f16.double() - z[:, r:]).norm(dim=1) * (1 + 1e-6) + r2 * 2.0 ** -149
                fine_cols[a:b] = torch.stack([rho2, er2, ez2], 1)
        return basis, vecs, fine, fine_cols

    @staticmethod
    def _checksum(*arrays) -> str:
        h = hashlib.blake2b(digest_size=16)
        for a in arrays:
            h.update(b"" if a is None else a.numpy().tobytes())
        return h.hexdigest()

    @classmethod
    def _save(cls, path, basis, vecs, fine, fine_cols):
        extra = {} if fine is None else dict(fine=fine.numpy(), fine_cols=fine_cols.numpy())

        def write(f):
            np.savez(f, basis=basis.numpy(), vecs=vecs.numpy(), **extra,
                     checksum=np.array(cls._checksum(basis, vecs, fine, fine_cols)))
        atomic_write(path, write)

    @classmethod
    def _load(cls, path, store, rank, fine_rank):
        with np.load(path, allow_pickle=False) as f:
            basis, vecs, checksum = torch.from_numpy(f["basis"]), torch.from_numpy(f["vecs"]), str(f["checksum"])
            fine = torch.from_numpy(f["fine"]) if "fine" in f else None
            fine_cols = torch.from_numpy(f["fine_cols"]) if "fine_cols" in f else None
        r, r2 = vecs.shape[1] - 7, basis.shape[1]
        if basis.dtype != torch.float64 or basis.shape[0] != store.dim or not 1 <= r2 <= max(rank, fine_rank):
            raise ValueError(f"basis {tuple(basis.shape)} {basis.dtype} does not fit D = {store.dim}")
        if vecs.dtype != torch.float32 or tuple(vecs.shape) != (store.n, r + 7) or not 1 <= r <= min(rank, r2):
            raise ValueError(f"vectors {tuple(vecs.shape)} {vecs.dtype} do not fit N = {store.n}, r = {r}")
        if (fine is None) != (r2 == r) or (fine is not None and (
                fine.dtype != torch.float16 or tuple(fine.shape) != (store.n, r2 - r)
                or fine_cols.dtype != torch.float32 or tuple(fine_cols.shape) != (store.n, 3))):
            raise ValueError("the fine level does not fit the basis")
        if checksum != cls._checksum(basis, vecs, fine, fine_cols):
            raise ValueError("checksum mismatch")
        return basis, vecs, fine, fine_cols

    # ---------------------------------------------------------------- queries
    @staticmethod
    def _gemm(qx: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """qx [B, k] @ cols [n, k]^T: certified lower bounds (float64 where float32 matmuls may be
        rounded to TF32 / bfloat16)."""
        ieee = torch.get_float32_matmul_precision() == "highest" and not (
            qx.is_cuda and torch.backends.cuda.matmul.allow_tf32)
        return torch.mm(qx, cols.T) if ieee else torch.mm(qx.double(), cols.T.double())

    def _lower_bounds(self, qx: torch.Tensor, a: int, b: int) -> torch.Tensor:
        """[B, b - a]: the coarse lower bounds L_i on |x - y_i|^2 for rows a..b (one GEMM)."""
        return self._gemm(qx, self._on(qx.device)[1][a:b])

    def _fine_bounds(self, qf: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[B, len(ids)]: the fine lower bounds (rank r_fine, same layout as the coarse columns) for
        rows ``ids``, their columns assembled from the coarse z, the float16 rest and the fine norms."""
        _, vecs, fine, fc = self._on(qf.device)
        v, r = vecs[ids], self.rank
        vn, ez, er = v[:, r + 1], fc[ids, 2], fc[ids, 1]
        cols = torch.cat([v[:, :r], fine[ids].float(), torch.stack(
            [fc[ids, 0], vn, ez, er, vn + ez + er, -0.5 * (1 - self.c_f) * vn.double().square().float(),
             torch.full_like(vn, -0.5)], 1)], 1)
        return self._gemm(qf, cols)

    def _on(self, device):
        """(basis, vecs, fine, fine_cols) on ``device`` (copied once)."""
        if device not in self._copies:
            self._copies[device] = tuple(None if t is None else t.to(device) for t in self._copies[self.vecs.device])
        return self._copies[device]

    def _query_cols(self, store, q, rank: int | None = None):
        """Per query the GEMM row -2 [z_x, |r_x|, c_r |v_x|, |z_x|, |r_x|, e_x, 1, t_x] (float32),
        t_x = (1 - c_r) |v_x|^2, against the rows' columns (module docstring), for the coarse rank
        (default) or the fine one."""
        rank = rank or self.rank
        c_r = (rank + 32) * U32
        zx = q.xc @ self._on(q.xc.device)[0][:, :rank]
        xn2 = q.xc.square().sum(1)
        rx, ex = _rho(xn2, zx.square().sum(1), store.dim, rank)
        zn = zx.norm(dim=1)
        ex = ex + 4 * (store.dim + rank) * math.sqrt(rank) * U64 * xn2.sqrt()   # + z_x's float64 error
        vn = xn2.sqrt()
        cols = [rx, c_r * vn, zn, rx, ex, torch.ones_like(rx), (1 - c_r) * xn2]
        return (-2.0 * torch.cat([zx, torch.stack(cols, 1)], 1)).float()

    def solve(self, store, q, full):
        """(D [B, D] float64, KDEStats) for the prepared queries ``q``: each query on its certified
        set (path INDEXED), or by ``full(q_subset) -> (D, KDEStats)`` when its set is too large."""
        b, dev = q.xc.shape[0], q.xc.device
        gap = 2.0 * math.log((self.n_total or store.n) / self.tol) / q.inv_s2       # [B] in |x - y|^2 units
        live = gap < (q.xc.norm(dim=1) + store.radius) ** 2                  # else every row would be kept
        live &= q.inv_s2 * (SIGMA_SKIP * store.sigma_data) ** 2 >= 1          # else (measured) no set is small
        rows, cols, big = self.certify(store, q, gap, live)
        self.queries += b
        self.hits += int((live & ~big).sum())
        out = torch.zeros_like(q.x64)
        stats = KDEStats(*(torch.zeros(b, dtype=torch.float64, device=dev) for _ in range(2)),
                         torch.zeros(b, dtype=torch.long, device=dev), torch.zeros(b, dtype=torch.float64, device=dev),
                         torch.full((b,), INDEXED, dtype=torch.int8, device=dev),
                         torch.zeros(b, dtype=torch.float64, device=dev))
        ok = (live & ~big).nonzero()[:, 0]
        if len(ok):
            res, st = self._exact(store, q, rows, cols, b)
            put_rows(out, stats, ok, res[ok], st.select(ok))
        idx = (~live | big).nonzero()[:, 0]
        if len(idx):
            put_rows(out, stats, idx, *full(q.select(idx)))
        return out, stats

    def certify(self, store, q, gap, live=None):
        """(row ids, query ids) of every (query, row) pair in the certified sets of the ``live``
        queries (default all), and the mask of the queries whose set exceeds max_fraction N or
        whose bound could overflow float32 ((|x - c| + max_i |y_i - c|)^2 > F32_SAFE)."""
        b, n, dev = q.xc.shape[0], store.n, q.xc.device
        live = torch.ones(b, dtype=torch.bool, device=dev) if live is None else live
        unsafe = live & ((q.xc.norm(dim=1) + store.radius) ** 2 > F32_SAFE)
        live = live & ~unsafe
        idx = live.nonzero()[:, 0]
        d_up = torch.full((b,), math.inf, dtype=torch.float64, device=dev)
        sub = q.select(idx)
        qx = self._query_cols(store, sub)
        blocks = []
        if len(idx):
            d_up[idx], blocks = self._probe(store, sub, qx)
        if self.reduce_min is not None:
            d_up = self.reduce_min(d_up)                                      # the whole dataset's nearest row
        # float32, rounded up; + the absolute error of float32 subnormals (products, stored values, thr)
        thr = ((d_up[idx] + gap[idx]) * (1 + 1e-9) + (self.fine_rank + 16) * 2.0 ** -149).float() * (1 + 4 * U32)
        cap = max(int(self.max_fraction * n), min(self.probe, n))
        count = torch.zeros(len(idx), dtype=torch.long, device=dev)
        coarse = torch.zeros_like(count)                                      # sizes before the fine bound
        qf = self._query_cols(store, sub, self.fine_rank) if self.fine is not None and len(idx) else None
        rows, cols = [], []
        for a, low, lb in blocks:                                             # pass 2: the sets
            if bool((low > thr).all()):
                continue                                                      # no row of the block is kept
            lb = self._lower_bounds(qx, a, min(a + BLOCK, n)) if lb is None else lb
            qi, ri = (lb <= thr[:, None]).nonzero(as_tuple=True)
            if qf is not None and len(ri):                                    # the fine bound on what the coarse keeps
                coarse += torch.bincount(qi, minlength=len(idx))
                hope = coarse[qi] <= FINE_LIMIT * cap                         # (no fine work on hopeless sets)
                qi, ri = qi[hope], ri[hope]
                uniq, pos = torch.unique(ri, return_inverse=True)
                fine = self._fine_bounds(qf, uniq + a)
                keep = fine[qi, pos] <= thr[qi]
                qi, ri = qi[keep], ri[keep]
            count += torch.bincount(qi, minlength=len(idx))
            keep = count[qi] <= cap
            rows.append(ri[keep] + a)
            cols.append(qi[keep])
            if bool(((count > cap) | (coarse > FINE_LIMIT * cap)).all()):
                break                                                         # every set is too large: the full pass
        big = unsafe.clone()
        big[idx] = (count > cap) | (coarse > FINE_LIMIT * cap)
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        rows, cols = (torch.cat(rows), idx[torch.cat(cols)]) if rows else (empty, empty)
        keep = ~big[cols]
        return rows[keep], cols[keep], big

    def _probe(self, store, q, qx):
        """Pass 1 over the index: d_up [B] float64, the exact distance to the nearest of the ``probe``
        rows of smallest L_i, and per block of rows (first row, smallest L_i [B], the bounds
        [B, rows] when they fit in KEEP_BOUNDS bytes, else None)."""
        b, n, dev = q.xc.shape[0], store.n, q.xc.device
        k = min(self.probe, n)
        best_v = torch.full((b, k), math.inf, device=dev)
        best_i = torch.zeros(b, k, dtype=torch.long, device=dev)
        blocks = []
        for a in range(0, n, BLOCK):
            lb = self._lower_bounds(qx, a, min(a + BLOCK, n))
            v, i = lb.topk(min(k, lb.shape[1]), dim=1, largest=False)
            blocks.append((a, v[:, 0], lb if lb.element_size() * b * n <= KEEP_BOUNDS else None))
            best_v, j = torch.cat([best_v.to(v.dtype), v], 1).topk(k, dim=1, largest=False)
            best_i = torch.cat([best_i, i + a], 1).gather(1, j)
        return candidate_sq_dists(q.x64, store.gather64(best_i)).amin(1), blocks

    def _exact(self, store, q, rows, cols, b):
        """Float64 softmax of each query over its certified rows, pair by pair (logits anchored on
        the query's first certified row a, kde_stats.anchored_logits: h_i = (y_i - a).(x - a) -
        |y_i - a|^2 / 2, online log-sum-exp over chunks of (query, row) pairs in query order); a
        query with no row (a shard none of whose rows matter) gets D = 0 and log_mass = -inf."""
        dev = q.x64.device
        order = torch.argsort(cols * store.n + rows)
        rows, cols = rows[order], cols[order]
        first = torch.full((b,), len(rows), dtype=torch.long, device=dev).scatter_reduce_(
            0, cols, torch.arange(len(rows), device=dev), "amin")
        has = first < len(rows)
        anchor = store.gather64(torch.where(has, rows[first.clamp(max=max(len(rows) - 1, 0))] if len(rows) else 0, 0))
        u = q.x64 - anchor                                                     # x - a
        m = torch.full((b,), -math.inf, dtype=torch.float64, device=dev)
        z, z2 = torch.zeros_like(m), torch.zeros_like(m)
        s = torch.zeros_like(q.x64)
        arg = torch.zeros(b, dtype=torch.long, device=dev)
        step = max(1, EXACT_BYTES // (8 * store.dim))
        for a in range(0, len(rows), step):
            r, c = rows[a:a + step], cols[a:a + step]
            diff = store.gather64(r).sub_(anchor[c])                          # [P, D] rows y_i - a
            h = (diff * u[c]).sum(1) - 0.5 * diff.square().sum(1)
            l = h.mul_(q.inv_s2[c])                                           # (g_i - g_a) / sigma^2
            cm = torch.full_like(m, -math.inf).scatter_reduce_(0, c, l, "amax")
            top = l == cm[c]
            ci = torch.full_like(arg, store.n).scatter_reduce_(0, c[top], r[top], "amin")    # first row at the max
            arg = torch.where(cm > m, ci, arg)
            m_new = torch.maximum(m, cm)
            alpha = torch.exp((m - m_new).nan_to_num_(0.0))
            p = torch.exp(l - m_new[c])
            z = z * alpha + torch.zeros_like(z).index_add_(0, c, p)
            z2 = z2 * alpha ** 2 + torch.zeros_like(z).index_add_(0, c, p * p)
            s.mul_(alpha[:, None]).index_add_(0, c, diff.mul_(p[:, None]))  # sum p_i (y_i - a)
            m = m_new
        stats = anchored_stats(store.center.to(dev), q.x64, anchor, q.inv_s2, m + z.log(),
                               torch.where(has, z ** 2 / z2.clamp(min=1e-300), 0.0), arg, INDEXED)
        return torch.where(has[:, None], anchor + s / z.clamp(min=1e-300)[:, None], 0.0), stats
