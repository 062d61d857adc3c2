"""Closed-form (kernel-estimated) denoiser of a finite dataset: exact, streaming, Triton on GPU.

For data y_1..y_N the noisy marginal is p_sigma(x) = 1/N sum_i N(x; y_i, sigma^2 I) and the
optimal denoiser is the posterior mean

    D(x; sigma) = sum_i w_i y_i,   w = softmax_i(-|x - y_i|^2 / (2 sigma^2)).

Stats: log_z = logsumexp_i l_i with l_i = (x.y_i - |y_i|^2 / 2) / sigma^2 (the same softmax up
to the per-query constant |x|^2 / (2 sigma^2)), log_mass = logsumexp_i -|x - y_i|^2 / (2 sigma^2)
(free of that constant, so shards merge on it exactly), ESS = 1 / sum_i w_i^2, argmax_i w_i.

How the exact path stays exact (x [B, D] flattened, data [N, D]):

1. Translation invariance, D(x; Y) = c + D(x - c; Y - c): the data are streamed centred on
   their mean c, so data far from the origin (a common offset, raw 0..255 pixels) lose nothing.
2. A float32 streaming pass (two BLAS GEMMs per chunk of C rows, memory O(B C + C D)) with
   logits g_i / sigma^2, g_i = x_c.y_c,i - |y_c,i|^2 / 2 (x_c = x - c, y_c = y - c), an online
   log-sum-exp, and the k rows with the largest float32 logits.  Weights below e^{-43} of the
   running max are exactly zero (:mod:`geosample.kernels.online_softmax`): no subnormal reaches a
   GEMM, and the second GEMM runs only over the rows some query still weighs.
3. The k candidates are re-scored exactly in float64, anchored on the best float32 candidate a:
   g_i - g_a = (y_i - a).(x - a) - |y_i - a|^2 / 2 from row differences
   (:func:`~geosample.denoisers.kde_stats.anchored_logits`), never as a difference of two squared
   distances (which cancels for queries far from the data: |x - y|^2 ~ 1e32 with gaps ~ 1e16).  The
   float32 logits carry an error of at most delta = eps_g / sigma^2 with
   eps_g = 2 (sqrt(D) + 4) u (|x_c| max_i |y_c,i| + max_i |y_c,i|^2), u = 2^-24 (the probabilistic
   rounding bound of a length-D float32 dot product, lambda = 2, applied to every term), so per
   query one of three paths is provably right:

   * ``EXACT``: every row outside the candidates has a true logit below the best candidate's by
     more than log(N / 1e-12): the result is the float64 softmax over the candidates, with a
     relative weight error below 1e-12 (the usual path at small sigma);
   * ``MIXED``: delta <= 0.05: the candidates exactly, the other rows with their float32
     weights, each off by a factor e^{+-delta} at most (the usual path at large sigma, where the
     posterior is spread over many rows and the measured delta is < 1e-4);
   * ``FULL64``: neither holds (float32 logits too coarse to rank the rows that matter, e.g.
     more than k near-duplicates at tiny sigma): a float64 direct-difference pass for that query.

Backends: ``reference`` (float64, chunked over N: the nearest row by direct differences, then
logits anchored on it: the ground truth),
``cpu`` (the streaming pass above with torch BLAS; for B <= 4 the N range is split across
threads and merged by log-sum-exp), ``triton`` (CUDA kernels in :mod:`geosample.kernels.kde_triton`,
imported lazily, followed by the same exact re-scoring).  Every backend's error against the float64
softmax is measured in benchmarks/results/kde_exactness.md.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..kernels.online_softmax import Partial, exp_weights, merge
from .kde_stats import EXACT, FAST, FULL64, MIXED, KDEStats, anchored_logits, anchored_stats, put_rows

__all__ = ["KDEDenoiser", "KDEStats", "EXACT", "MIXED", "FULL64", "FAST"]

BACKENDS = ("auto", "reference", "cpu", "triton")
STORAGE = ("float32", "float16", "uint8")
U32 = 2.0 ** -24                                  # float32 unit roundoff
U64 = 2.0 ** -53                                  # float64 unit roundoff
MIXED_MAX_DELTA = 0.05                            # largest float32 logit error a MIXED result may carry
REST_TOL = 1e-12                                  # largest relative weight an EXACT result may drop
WIDE_K = 512                                      # candidates of the second try, before FULL64
LOGIT_CAP = 1e30                                  # float32 logits are scaled to stay below this
SETUP_BYTES = 1 << 22                             # float64 bytes per block of the setup passes
STREAM_BYTES = 1 << 20                            # float32 bytes per block of the streaming pass (cache)
INDEX_AUTO_N = 100_000                            # index="auto" builds one for stores of this many rows
INDEX_AUTO_MIN_D = 256                            # ... of more coordinates than this
UINT8_SCALE = 2.0 / 255.0                         # uint8 pixels q map to q * UINT8_SCALE + UINT8_OFFSET
UINT8_OFFSET = -1.0                               # in [-1, 1] (geosample.data uses the same map)


class Store:
    """The dataset as stored (a torch tensor of the store's own: float32 / float16 / uint8 with
    y = scale q + offset, or a numpy memmap read in place), its mean ``center`` c [D] (float64),
    half the centred squared norms |y_i - c|^2 / 2 (float64 [N]) and the largest centred norm
    ``radius``.

    The streaming pass reads blocks of ``stream_block`` rows y' = q - m in stored units, centred on
    m [D] float32 (uint8: the rounded mean, so y' is exact; else the mean rounded to float32), with
    y - c = scale y' + w, w = scale m + offset - c (float64, |w_j| <= scale / 2 for uint8): one
    conversion per element, in a cache-sized buffer, and the scale and w folded into the queries."""

    def __init__(self, data, storage, scale, offset, chunk):
        self.mmap = isinstance(data, np.memmap)
        if isinstance(data, np.ndarray) and not self.mmap:
            data = torch.from_numpy(np.ascontiguousarray(data))            # copied below (_convert)
        self.file_id = _file_id(data) if self.mmap else None
        if not isinstance(data, (torch.Tensor, np.memmap)):
            raise TypeError(f"data must be a torch.Tensor or numpy array, got {type(data).__name__}")
        if data.ndim < 2 or data.shape[0] == 0:
            raise ValueError(f"data must have shape [N, ...] with N >= 1, got {tuple(data.shape)}")
        self.shape = tuple(data.shape[1:])
        self.n, self.dim = int(data.shape[0]), int(np.prod(self.shape))
        kind = str(data.dtype).replace("torch.", "")
        if kind not in STORAGE + ("float64",):
            raise TypeError(f"data dtype must be float32/float64/float16/uint8, got {kind}")
        if storage is None:
            storage = "float32" if kind == "float64" else kind
        if storage not in STORAGE:
            raise ValueError(f"storage must be one of {STORAGE}, got {storage!r}")
        if kind == "uint8" and storage != "uint8":
            raise ValueError("uint8 data must use storage='uint8' (with its scale and offset)")
        self.storage, self.chunk = storage, chunk
        self.scale, self.offset = self._affine(data, kind, scale, offset)
        self.data = data if self.mmap else self._convert(data.reshape(self.n, self.dim), kind)
        self.view = self._torch_view()
        self.center = self._mean()
        self.hy2, self.radius = self._centred_norms()
        m = (self.center - self.offset) / self.scale
        self.m32 = (m.round() if self.storage == "uint8" else m).float()
        self.w = self.m32.double() * self.scale + self.offset - self.center
        self.stream_radius = self.radius + float(self.w.norm())      # >= scale |y'_i|
        self.hy2_32 = self.hy2.float()
        self.sigma_data = math.sqrt(2 * float(self.hy2.mean()) / self.dim)   # RMS distance to c per coordinate
        self._device_copies = {}
        self._digest = None

    def _affine(self, data, kind, scale, offset):
        if self.storage != "uint8":
            if scale is not None or offset is not None:
                raise ValueError("scale/offset only apply to storage='uint8'")
            return 1.0, 0.0
        if kind == "uint8":
            return (UINT8_SCALE if scale is None else float(scale)), (UINT8_OFFSET if offset is None else float(offset))
        lo = min(float(self._raw(a, b, data).min()) for a, b in self.ranges(data=data))
        hi = max(float(self._raw(a, b, data).max()) for a, b in self.ranges(data=data))
        return max(hi - lo, 1e-30) / 255.0, lo

    def _convert(self, data, kind):
        """The rows as stored, in a tensor of the store's own (never the caller's memory: the means,
        norms and index computed from them stay true when the caller edits its tensor or array)."""
        if self.storage == "uint8" and kind != "uint8":
            return ((data.double() - self.offset) / self.scale).round_().clamp_(0, 255).to(torch.uint8)
        return torch.empty(data.shape, dtype=getattr(torch, self.storage), device=data.device).copy_(data)

    def check_unchanged(self):
        """ValueError when a memmapped file was rewritten in place since the store was built (same
        inode, another size or modification time): the mapping then shows other rows than its means
        and norms describe.  A file deleted or replaced by another (a new inode) leaves the mapping
        on the old rows: nothing to refuse."""
        if self.file_id is None:
            return
        try:
            now = _file_id(self.data)
        except OSError:
            return
        if now[2:] == self.file_id[2:] and now != self.file_id:
            raise ValueError(f"the memmapped data file {self.data.filename} changed after the KDEDenoiser "
                             "was built; build a new denoiser for the new rows")

    def ranges(self, chunk=None, lo=0, hi=None, data=None):
        chunk = chunk or self.chunk
        hi = self.n if hi is None else hi
        return [(a, min(a + chunk, hi)) for a in range(lo, hi, chunk)]

    def _torch_view(self):
        """The stored rows as a torch tensor [N, D]: the data, or a memmap's pages without a copy
        (None when the memmap's layout has no such view: then each chunk is copied)."""
        if not self.mmap:
            return self.data
        try:
            with warnings.catch_warnings():              # read-only pages: never written through
                warnings.simplefilter("ignore", UserWarning)
                return torch.from_numpy(self.data).view(self.n, self.dim)
        except (ValueError, RuntimeError):
            return None

    def _raw(self, a, b, data=None):
        """Rows a..b as stored [b - a, D] (a view; never written to)."""
        if data is None and self.view is not None:
            return self.view[a:b]
        rows = (self.data if data is None else data)[a:b]
        if isinstance(rows, np.ndarray):
            rows = torch.from_numpy(np.array(rows))
        return rows.reshape(b - a, self.dim)

    def _dequant(self, q, dtype):
        y = q.to(dtype)
        return y.mul_(self.scale).add_(self.offset) if self.storage == "uint8" else y

    def rows64(self, a, b, out=None):
        """Rows a..b as stored, in float64 (not centred) [b - a, D] (into ``out`` [>= b - a, D])."""
        if out is None:
            return self._dequant(self._raw(a, b), torch.float64)
        y = out[: b - a].copy_(self._raw(a, b))
        return y.mul_(self.scale).add_(self.offset) if self.storage == "uint8" else y

    def blocks64(self):
        """Row ranges of SETUP_BYTES of float64: the setup passes stay in cache (4 MB blocks run
        them ~3x faster than chunks of thousands of rows, which stream every temporary through DRAM)."""
        return self.ranges(chunk=max(1, SETUP_BYTES // (8 * self.dim)))

    def _mean(self):
        """The float64 mean of the rows as stored (uint8: in stored units, exactly, then mapped)."""
        total = torch.zeros(self.dim, dtype=torch.float64)
        buf = torch.empty(self.blocks64()[0][1], self.dim, dtype=torch.float64)    # reused: no page faults
        for a, b in self.blocks64():
            q = buf[: b - a].copy_(self._raw(a, b))
            if self.storage != "uint8" and not bool(torch.isfinite(q).all()):
                raise ValueError(f"data contains NaN or inf (rows {a}..{b - 1})")
            total += q.sum(0)
        return total / self.n * self.scale + self.offset if self.storage == "uint8" else total / self.n

    def _centred_norms(self):
        """|y_i - c|^2 / 2 [N] float64 (uint8: scale^2 |q_i - m|^2 / 2, m = (c - offset) / scale) and
        the radius max_i |y_i - c|."""
        hy2 = torch.empty(self.n, dtype=torch.float64)
        buf = torch.empty(self.blocks64()[0][1], self.dim, dtype=torch.float64)
        m = (self.center - self.offset) / self.scale if self.storage == "uint8" else self.center
        half = 0.5 * self.scale ** 2 if self.storage == "uint8" else 0.5
        for a, b in self.blocks64():
            hy2[a:b] = buf[: b - a].copy_(self._raw(a, b)).sub_(m).square_().sum(1).mul_(half)
        return hy2, math.sqrt(2.0 * float(hy2.max()))

    def digest(self) -> str:
        """sha256 of every stored byte, row by row (computed once: in-memory rows are the store's
        own, a memmap's file is checked by :meth:`check_unchanged`); ~1.8 GB/s with SHA-NI."""
        if self._digest is None:
            h = hashlib.sha256(repr((self.n, self.shape, self.storage)).encode())
            for a, b in self.ranges(chunk=max(1, (1 << 26) // max(1, self.dim))):
                rows = self.data[a:b]
                h.update(np.ascontiguousarray(rows) if self.mmap else rows.cpu().contiguous().numpy())
            self._digest = h.hexdigest()
        return self._digest

    def shift(self, device) -> torch.Tensor:
        """The float32 vector added to scale * q: offset - c (uint8) or -c [D], on ``device``."""
        return (self.offset - self.center).float().to(device)

    def stream_rows(self, a, b, device) -> torch.Tensor:
        """Rows a..b [b - a, D] on ``device`` for the Triton kernels: centred float32 rows y_i - c
        (float32 storage: a centred copy per device, made on first use; memmaps centre each
        chunk), else the stored q, with y_i - c = scale q + shift."""
        if self.storage == "float32":
            if self.mmap:
                return (self._raw(a, b).double() - self.center).float().to(device)
            key = (torch.device(device), "centred")
            if key not in self._device_copies:
                self._device_copies[key] = torch.cat([(self._raw(u, v).double() - self.center).float()
                                                      for u, v in self.blocks64()]).to(device)
            return self._device_copies[key][a:b]
        return (self.on(device)[a:b] if not self.mmap else self._raw(a, b).to(device)).contiguous()

    def stream_block(self, a, b, out):
        """y' = q - m for rows a..b (float32, see the class notes) into ``out`` [>= b - a, D]."""
        q, m = self._raw(a, b).to(out.device) if self.mmap else self.on(out.device)[a:b], self.on(out.device, self.m32)
        if q.dtype == torch.float32:
            return torch.sub(q, m, out=out[: b - a])
        return out[: b - a].copy_(q).sub_(m)          # (a mixed-dtype sub takes the slow casting path: 2x)

    def block_rows(self) -> int:
        """Rows per block of the streaming pass: ``chunk``, at most STREAM_BYTES of float32 (the
        block stays in cache between its conversion and both GEMMs)."""
        return max(1, min(self.chunk, STREAM_BYTES // (4 * self.dim)))

    def gather64(self, idx):
        """float64 rows idx (any shape) -> [*idx.shape, D] on idx's device, as stored (not centred)."""
        flat = idx.reshape(-1).cpu()
        if self.mmap and self.view is None:
            uniq, inv = np.unique(flat.numpy(), return_inverse=True)
            q = torch.from_numpy(np.array(self.data[uniq])).reshape(len(uniq), self.dim)[torch.from_numpy(inv)]
        elif self.mmap:
            q = self.view[flat]
        else:
            q = self.on(idx.device)[flat.to(idx.device)]
        return self._dequant(q.to(idx.device), torch.float64).reshape(*idx.shape, self.dim)

    def on(self, device, tensor=None):
        """``tensor`` (default: the stored data) on ``device``, copied once and kept; memmaps stay on disk."""
        tensor = self.data if tensor is None else tensor
        device = torch.device(device)
        if (self.mmap and tensor is self.data) or device == tensor.device:
            return self.view if tensor is self.data and self.view is not None else tensor
        key = (device, id(tensor))
        if key not in self._device_copies:
            self._device_copies[key] = tensor.to(device)
        return self._device_copies[key]


def _file_id(mm: np.memmap):
    """(size, mtime_ns, inode, device) of a memmap's file, or None for an anonymous map."""
    name = getattr(mm, "filename", None)
    if name is None:
        return None
    st = os.stat(name)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def stream(store: Store, xs: torch.Tensor, inv: torch.Tensor, lo: int, hi: int, k: int,
           mm_dtype: torch.dtype = torch.float32) -> Partial:
    """Online log-sum-exp pass over data rows lo..hi in the streamed coordinates y' = q - m of
    :class:`Store` (y - c = scale y' + w): float32 queries xs = (x - c) scale / sigma^2 [B, D],
    logits L = xs y'^T - inv |y - c|^2 / 2 with inv [B] float32 the (capped) 1 / sigma^2.  The
    result is relative to y' (s = sum_i p_i y'_i); :func:`to_centred` adds the per-query constant
    (x - c).w / sigma^2 that L leaves out and maps s to sum_i p_i (y_i - c).

    Per block of C rows (Store.block_rows, cache-sized): one conversion, two GEMMs, and the
    bookkeeping on [B, C] (the top-k merged only when a row beats some query's k-th logit, the sums
    rescaled only when some query's max moves).  Buffers: logits/weights [B, C], the block [C, D],
    the sum s [B, D].  ``mm_dtype`` bfloat16 is ``precision="fast"`` (bf16 GEMM inputs)."""
    b, dev, rows = xs.shape[0], xs.device, store.block_rows()
    xs = xs.to(mm_dtype)
    hy2 = store.on(dev, store.hy2_32)
    logits = torch.empty(b, rows, device=dev)
    weights = torch.empty(b, rows, device=dev)
    ybuf = torch.empty(rows, store.dim, device=dev)
    m = torch.full((b,), -math.inf, device=dev)
    z = torch.zeros(b, dtype=torch.float64, device=dev)
    z2 = torch.zeros_like(z)
    s = torch.zeros(b, store.dim, device=dev)
    top_v = torch.full((b, k), -math.inf, device=dev)
    top_i = torch.zeros(b, k, dtype=torch.long, device=dev)
    for a, e in store.ranges(rows, lo, hi):
        y = store.stream_block(a, e, ybuf).to(mm_dtype)
        l = _mm(xs, y.T, logits[:, : e - a])
        l.addr_(inv, hy2[a:e], alpha=-1.0)
        if bool((l > top_v[:, -1:]).any()):                         # some row enters a top k
            cv, ci = l.topk(min(k, e - a), dim=1)
            top_v, j = torch.cat([top_v, cv], 1).topk(k, dim=1)
            top_i = torch.cat([top_i, ci + a], 1).gather(1, j)
        cmax = l.amax(1)
        if bool((cmax > m).any()):                                  # rescale the sums to the new max
            m_new = torch.maximum(m, cmax)
            alpha = exp_weights(m - m_new)
            z.mul_(alpha.double())
            z2.mul_(alpha.double() ** 2)
            s.mul_(alpha[:, None])
            m = m_new
        p = exp_weights(torch.sub(l, m[:, None], out=weights[:, : e - a]))
        live = p.any(0)
        n_live = int(live.sum())
        if n_live == 0:
            continue                                                # no query weighs this block
        z += p.sum(1, dtype=torch.float64)
        z2 += torch.mul(p, p, out=l).sum(1, dtype=torch.float64)
        if n_live < (e - a) // 2:                                   # the second GEMM over live rows only
            idx = live.nonzero()[:, 0]
            p, y = p.index_select(1, idx), y.index_select(0, idx)
        s.add_(_mm(p.to(mm_dtype), y, None)) if mm_dtype != torch.float32 else s.addmm_(p, y)
    return Partial(m, z, z2, s, top_v, top_i)


def to_centred(part: Partial, bias: torch.Tensor, scale: float, w: torch.Tensor) -> Partial:
    """A streaming state over rows r_i with y_i - c = scale r_i + w, logits missing the per-query
    constant ``bias`` [B] (float64): the same state over y_i - c, in float64 (m and top_v + bias,
    s = scale s + z w)."""
    bias = bias.to(part.m.device)
    return Partial(part.m.double() + bias, part.z, part.z2,
                   scale * part.s.double() + part.z[:, None] * w.to(part.s.device), part.top_v.double() + bias[:, None],
                   part.top_i)


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a @ b as float32, into ``out`` when given (float32 inputs write it directly)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    r = torch.mm(a, b).float()
    return r if out is None else out.copy_(r)


@dataclass
class Query:
    """One batch of queries, prepared once: x64 [B, D] float64 as given, xc = x - c (float64),
    inv_s2 = 1 / sigma^2 [B] (float64), inv = the float32 logit scale (inv_s2 capped so that no
    float32 logit overflows), err_g = the bound on the float32 error of g = x_c.y_c - |y_c|^2 / 2."""
    x64: torch.Tensor
    xc: torch.Tensor
    inv_s2: torch.Tensor
    inv: torch.Tensor
    err_g: torch.Tensor

    @classmethod
    def prepare(cls, store: Store, x64: torch.Tensor, inv_s2: torch.Tensor) -> "Query":
        xc = x64 - store.center.to(x64.device)
        r = store.stream_radius                                         # >= |y_i - c| and scale |y'_i|
        g_max = xc.norm(dim=1) * r + r ** 2                              # |g_i| <= g_max for every row
        err_g = 2 * (math.sqrt(store.dim) + 4) * U32 * g_max
        inv = torch.minimum(inv_s2, LOGIT_CAP / g_max.clamp(min=1e-300))
        return cls(x64, xc, inv_s2, inv, err_g)

    def select(self, idx: torch.Tensor) -> "Query":
        """The queries ``idx`` alone."""
        return Query(self.x64[idx], self.xc[idx], self.inv_s2[idx], self.inv[idx], self.err_g[idx])

    def scaled32(self, scale: float = 1.0) -> torch.Tensor:
        """(x - c) * inv * scale as float32, with no subnormal entry."""
        xs = (self.xc * (self.inv * scale)[:, None]).float()
        return xs.masked_fill_(xs.abs() < torch.finfo(torch.float32).tiny, 0.0)


def rescore(store: Store, q: Query, part: Partial):
    """Exact float64 result from the streamed state (see the module docstring, step 3):
    (D [B, D] float64, KDEStats, mask of the queries that need a FULL64 pass).

    The candidates' logits are anchored on the best float32 candidate a (kde_stats.anchored_logits):
    h_i = g_i - g_a from row differences, so queries far from the data keep their logit gaps."""
    y = store.gather64(part.top_i)                                 # [B, k, D] as stored
    anchor = y[:, 0].clone()
    pad = torch.isinf(part.top_v)                                  # ranges shorter than k
    h = anchored_logits(q.x64, y, anchor)                          # y is now y_i - a
    exact = (h * q.inv_s2[:, None]).masked_fill_(pad, -math.inf)    # (g_i - g_a) / sigma^2
    best = exact.amax(1)
    ac = anchor - store.center.to(y.device)
    g_a = (q.xc * ac).sum(1) - 0.5 * ac.square().sum(1)              # g of the anchor, float64
    # every other row: g_i <= (k-th float32 logit) / inv + err_g; the float64 g_a and h carry < err64
    err64 = 8 * (store.dim + 4) * U64 * (q.err_g / (2 * (math.sqrt(store.dim) + 4) * U32))
    g_rest = part.top_v[:, -1].double() / q.inv + q.err_g + err64
    n_rest = store.n - (~pad).sum(1)
    rest_gap = torch.log(n_rest.double()) + (g_rest - g_a) * q.inv_s2 - best
    exact_only = (n_rest == 0) | (rest_gap <= math.log(REST_TOL))
    delta = q.err_g * q.inv_s2
    mixed = ~exact_only & (delta <= MIXED_MAX_DELTA) & (q.inv == q.inv_s2)
    # the float32 rest, without the candidates' own terms; its logits relative to g_a / sigma^2
    m = part.m.double() - g_a * q.inv_s2
    approx = exp_weights((part.top_v.double() - part.m.double()[:, None]).nan_to_num_(-math.inf))
    z_rest = torch.where(mixed, (part.z - approx.sum(1)).clamp_(min=0), 0.0)
    z2_rest = torch.where(mixed, (part.z2 - approx.square().sum(1)).clamp_(min=0), 0.0)
    # sum over the rest of p_i (y_i - a) = s - sum_cand p_i (y_i - a) - z (a - c)
    s_rest = part.s.double() - torch.einsum("bk,bkd->bd", approx, y) - part.z[:, None] * ac
    top = torch.where(mixed, torch.maximum(best, m), best)
    w = torch.exp(exact - top[:, None])
    r = torch.where(mixed, torch.exp(m - top), 0.0)
    z = w.sum(1) + r * z_rest
    out = anchor + (torch.einsum("bk,bkd->bd", w, y) + r[:, None] * s_rest) / z[:, None]
    path = torch.where(exact_only, EXACT, MIXED)
    stats = anchored_stats(store.center.to(y.device), q.x64, anchor, q.inv_s2, top + z.log(),
                           z ** 2 / ((w * w).sum(1) + r * r * z2_rest),
                           part.top_i.gather(1, exact.argmax(1, keepdim=True))[:, 0], MIXED)
    stats.path = path.to(torch.int8)
    return out, stats, ~(exact_only | mixed)


def reference(store: Store, x64: torch.Tensor, inv_s2: torch.Tensor):
    """Float64 ground truth, two passes over the rows as stored: the nearest row a of each query
    (direct differences), then the logits (g_i - g_a) / sigma^2 anchored on it
    (kde_stats.anchored_logits) with an online log-sum-exp over chunks.  Returns (D [B, D], KDEStats)."""
    b, dev = x64.shape[0], x64.device
    near = torch.full((b,), math.inf, dtype=torch.float64, device=dev)
    arg = torch.zeros(b, dtype=torch.long, device=dev)
    for a, e in store.blocks64():
        d2 = torch.cdist(x64, store.rows64(a, e).to(dev), compute_mode="donot_use_mm_for_euclid_dist")
        cm, ci = d2.min(1)
        arg = torch.where(cm < near, ci + a, arg)
        near = torch.minimum(near, cm)
    anchor = store.gather64(arg)
    m = torch.full((b,), -math.inf, dtype=torch.float64, device=dev)
    z, z2 = torch.zeros_like(m), torch.zeros_like(m)
    s = torch.zeros_like(x64)
    for a, e in store.blocks64():
        y = store.rows64(a, e).to(dev)
        l = torch.stack([anchored_logits(x64[i:i + 1], y.clone()[None], anchor[i:i + 1])[0] for i in range(b)])
        l.mul_(inv_s2[:, None])
        cm, ci = l.max(1)
        arg = torch.where(cm > m, ci + a, arg)
        m_new = torch.maximum(m, cm)
        alpha = torch.exp(m - m_new)
        p = torch.exp(l - m_new[:, None])
        z, z2 = z * alpha + p.sum(1), z2 * alpha ** 2 + (p * p).sum(1)
        s = s * alpha[:, None] + p @ y - p.sum(1)[:, None] * anchor              # sum p_i (y_i - a)
        m = m_new
    stats = anchored_stats(store.center.to(dev), x64, anchor, inv_s2, m + z.log(), z ** 2 / z2, arg, FULL64)
    return anchor + s / z[:, None], stats


def check_query(x, sigma, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a denoiser call on data of trailing ``shape``: (x flattened [B, D], sigma float64 [B])."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if tuple(x.shape[1:]) != shape or x.shape[0] == 0:
        raise ValueError(f"x must have shape [B, {', '.join(map(str, shape))}] (the data's trailing "
                         f"shape) with B >= 1, got {tuple(x.shape)}")
    sig = torch.as_tensor(sigma, dtype=torch.float64).to(x.device).reshape(-1)
    if sig.numel() not in (1, x.shape[0]):
        raise ValueError(f"sigma must be a float or a [B] tensor with B = {x.shape[0]}, got {sig.numel()} values")
    if not bool((sig > 0).all()) or not bool(torch.isfinite(sig).all()):
        raise ValueError("sigma must be finite and > 0")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")
    if not bool(torch.isfinite(sig.double() ** -2).all()):
        raise ValueError(f"sigma must be >= 1e-150 (1 / sigma^2 overflows float64), got {float(sig.min()):g}")
    return x.reshape(x.shape[0], -1), sig.expand(x.shape[0])


class KDEDenoiser:
    """Exact denoiser D(x, sigma) of the empirical distribution of ``data`` [N, ...].

    data: torch tensor or numpy array, copied (the denoiser owns its rows: editing the caller's
    tensor or array afterwards does not change it), or a ``np.memmap``, streamed from disk, never
    loaded; a memmap whose file changes afterwards (size, modification time or inode) is refused
    with a ValueError at the next call.
    backend: "auto" (triton on CUDA tensors when Triton imports, else cpu), "reference",
    "cpu" (the streaming torch path, any device), "triton".
    precision: "exact" (float32 streaming + exact float64 re-scoring of the ``refine_k`` best
    candidates, with the error guarantee of the module docstring: every result is within 1e-12
    (EXACT), within a float32 logit error delta <= 0.05 on the non-candidate rows' weights (MIXED,
    measured < 1e-5 relative), or the float64 direct softmax itself (FULL64)) or "fast" (bfloat16
    matmuls, no re-scoring; its measured error is in benchmarks/results/kde_exactness.md).
    storage: "float32" | "float16" | "uint8" (default: the data's dtype; float64 -> float32);
    uint8 data use y = scale * q + offset (default 2/255, -1: pixels to [-1, 1]).
    chunk_size: rows per streamed chunk, at most (the pass reads blocks of at most STREAM_BYTES).
    index: exact results from a certified subset of the rows where the posterior is concentrated
    (path INDEXED = 4, rows left out < 1e-12 of the weight; large sets take the full pass), see
    :class:`~geosample.denoisers.kde_index.KDEIndex`.  "auto" (default): for N >= INDEX_AUTO_N
    rows (and D > INDEX_AUTO_MIN_D) built at the first call with a sigma <= 2 sigma_data
    (sigma_data = the rows' RMS distance to their mean per coordinate), from the on-disk cache
    when it holds one; about 4 (r + 7) + 2 (r_fine - r) + 12 = 808 bytes a row at the default
    ranks (0.8 GB for 10^6 rows).  True, or a dict of :meth:`KDEIndex.build
    <geosample.denoisers.kde_index.KDEIndex.build>` options (plus ``build_below``: a sigma, to
    build at the first call at or below it instead of now): built now.  False: never.
    Call: ``D(x, sigma, return_stats=False)`` with x [B, ...] (data's trailing shape) and sigma a
    float or a [B] tensor; returns x's dtype and shape, and (D, KDEStats) with return_stats.
    """

    def __init__(self, data, backend: str = "auto", precision: str = "exact", chunk_size: int = 1024,
                 storage: str | None = None, scale: float | None = None, offset: float | None = None,
                 refine_k: int = 16, threads: int | None = None, index: bool | dict | str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if precision not in ("exact", "fast"):
            raise ValueError(f"precision must be 'exact' or 'fast', got {precision!r}")
        for name, v in (("chunk_size", chunk_size), ("refine_k", refine_k)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.backend, self.precision, self.chunk_size = backend, precision, chunk_size
        self.store = Store(data, storage, scale, offset, chunk_size)
        self.shape = self.store.shape
        self.refine_k = min(refine_k, self.store.n)
        self.threads = threads or torch.get_num_threads()
        self.configure_index(index)

    def configure_index(self, index):
        """Set up the index (``index`` as in the class docstring).  "auto" builds none where no call
        would use it: the fast precision and the reference backend never take the indexed path."""
        self.index, self._index_options, self.index_below = None, None, None
        if index == "auto":
            exact = self.precision == "exact" and self.backend != "reference"
            if exact and self.store.n >= INDEX_AUTO_N and self.store.dim > INDEX_AUTO_MIN_D:
                self._index_options, self.index_below = {}, 2 * self.store.sigma_data
        elif index is True or isinstance(index, dict):
            options = {} if index is True else dict(index)
            self.index_below = options.pop("build_below", math.inf)
            self._index_options = options
            if self.index_below == math.inf:
                self._build_index()
        elif index is not False and index is not None:
            raise ValueError(f"index must be 'auto', True, False or a dict of options, got {index!r}")

    def _build_index(self):
        from .kde_index import KDEIndex
        self.index = KDEIndex.build(self.store, **self._index_options)
        self._index_options = None

    def __len__(self):
        return self.store.n

    def _check(self, x, sigma):
        return check_query(x, sigma, self.shape)

    def resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        if x.is_cuda:
            from ..kernels import triton_available
            if triton_available():
                return "triton"
        return "cpu"

    def __call__(self, x: torch.Tensor, sigma, return_stats: bool = False):
        xf, sig = self._check(x, sigma)
        self.store.check_unchanged()
        x64, inv_s2 = xf.double(), sig ** -2
        backend = self.resolve_backend(x)
        if self._index_options is not None and float(sig.min()) <= self.index_below:
            self._build_index()                                            # lazily: the first small sigma
        if backend == "reference":
            out, stats = reference(self.store, x64, inv_s2)
        else:
            q = Query.prepare(self.store, x64, inv_s2)
            out, stats = self._solve(backend, q)
        out = out.reshape(x.shape).to(x.dtype)
        return (out, stats) if return_stats else out

    def _partial(self, backend: str, q: Query, k: int) -> Partial:
        """The streaming state of every row for the queries ``q``, relative to y - c (float64 m,
        top_v, s; :func:`to_centred`)."""
        st, inv = self.store, q.inv.float()
        xs64 = q.xc * q.inv[:, None]                                       # (x - c) / sigma^2, capped
        xs, w = q.scaled32(st.scale), st.w.to(xs64.device)
        mm_dtype = torch.bfloat16 if self.precision == "fast" else torch.float32

        def rows(a, e):                                                    # the torch pass over rows a..e, in y'
            return stream(st, xs, inv, a, e, k, mm_dtype)
        if backend == "triton":
            from ..kernels import triton_available
            if not triton_available():
                raise RuntimeError("backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
            from ..kernels.kde_triton import kde_partial
            # the kernels read y - c - wk: centred float32 copies, or scale q + shift (shift rounded to float32)
            wk = torch.zeros_like(w) if st.storage == "float32" else (st.offset - st.center - st.shift("cpu").double())
            wk = wk.to(w.device)

            def fallback(a, e):                                            # the torch pass in the kernels' terms
                return to_centred(rows(a, e), xs64 @ (w - wk), st.scale, w - wk)
            return to_centred(kde_partial(st, q.scaled32(), inv, k, self.precision, fallback), xs64 @ wk, 1.0, wk)
        n, t = st.n, self.threads
        if xs.shape[0] > 4 or t < 2 or xs.is_cuda or n < 2 * self.chunk_size:
            part = rows(0, n)
        else:
            cut = [round(i * n / t) for i in range(t + 1)]                 # N-split for tiny batches
            with ThreadPoolExecutor(t) as pool:
                part = merge(list(pool.map(lambda i: rows(cut[i], cut[i + 1]), range(t))), k)
        return to_centred(part, xs64 @ w, st.scale, w)

    def _solve(self, backend: str, q: Query, use_index: bool = True):
        """(D [B, D] float64, KDEStats): the streaming pass, then the exact re-scoring; queries
        whose candidates do not settle it are streamed again with WIDE_K candidates (by the torch
        streaming pass, on any device), and the few that still need it get the FULL64 pass.
        With an index, each query is first tried on its certified set (the rest take that path)."""
        if use_index and self.index is not None and self.precision == "exact":
            return self.index.solve(self.store, q, lambda sub: self._solve(backend, sub, use_index=False))
        part = self._partial(backend, q, self.refine_k)
        if self.precision == "fast":
            return self._fast(q, part)
        out, stats, todo = rescore(self.store, q, part)
        idx = todo.nonzero()[:, 0]
        wide = min(WIDE_K, self.store.n)
        if len(idx) and wide > self.refine_k:
            sub = q.select(idx)
            out_w, st_w, again = rescore(self.store, sub, self._partial("cpu", sub, wide))   # torch, any device
            put_rows(out, stats, idx, out_w, st_w)
            idx = idx[again]
        if len(idx):
            put_rows(out, stats, idx, *reference(self.store, q.x64[idx], q.inv_s2[idx]))
        return out, stats

    def _fast(self, q: Query, part: Partial):
        """precision="fast": the bfloat16 streaming sums as they are (no re-scoring)."""
        kappa = 0.5 * q.xc.square().sum(1)
        log_mass = part.m.double() - kappa * q.inv + part.z.log()
        out = self.store.center.to(q.x64.device) + part.s.double() / part.z[:, None]
        path = torch.full_like(part.top_i[:, 0], FAST, dtype=torch.int8)
        return out, KDEStats(log_mass + 0.5 * q.x64.square().sum(1) * q.inv, part.z ** 2 / part.z2,
                             part.top_i[:, 0], log_mass, path, part.m.double() + part.z.log())
