"""Closed-form (kernel-estimated) denoiser of a finite dataset: exact, streaming, Triton on GPU.

For data y_1..y_N the noisy marginal is p_sigma(x) = 1/N sum_i N(x; y_i, sigma^2 I) and the
optimal denoiser is the posterior mean

    D(x; sigma) = sum_i w_i y_i,   w = softmax_i(l_i),   l_i = (x.y_i - |y_i|^2 / 2) / sigma^2,

which equals softmax_i(-|x - y_i|^2 / (2 sigma^2)) (the two differ by the per-query constant
|x|^2 / (2 sigma^2)).  Stats: logZ = logsumexp_i l_i, ESS = 1 / sum_i w_i^2, argmax_i l_i.

Backends (x [B, D] after flattening, data [N, D]):

* ``reference``: float64, direct differences |x - y_i|^2, chunked over N.
* ``cpu``: one streaming pass over N in chunks of C rows: logits L = x y^T / sigma^2 on a BLAS
  matmul ([B, C], never [B, N]), an online log-sum-exp (running max m, sums rescaled by
  exp(m_old - m_new)), S += exp(L - m) y on a second matmul, skipped for chunks whose max logit
  is below m - 80 for every query.  The running top-k logits are re-scored exactly (float64,
  direct differences) at the end, so near-ties between near-duplicates are exact even where
  float32 logits are not (small sigma).  Runs on any torch device; for B <= 4 the N range is
  split across threads and merged by log-sum-exp.
* ``triton``: CUDA kernels in :mod:`geosample.kernels.kde_triton` (imported lazily).
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["KDEDenoiser", "KDEStats"]

SKIP = 80.0          # exp(-80) ~ 1.8e-35: tiles this far below the running max cannot matter
BACKENDS = ("auto", "reference", "cpu", "triton")
STORAGE = ("float32", "float16", "uint8")


@dataclass
class KDEStats:
    """Per-query statistics: log_z [B] = logsumexp_i l_i, ess [B] = 1 / sum_i w_i^2, argmax [B]."""
    log_z: torch.Tensor
    ess: torch.Tensor
    argmax: torch.Tensor


@dataclass
class Partial:
    """Streaming state over a range of the data, relative to the running max ``m`` [B]:
    z = sum exp(l - m) [B] (float64), z2 = sum exp(2 (l - m)) [B] (float64),
    s = sum exp(l - m) y [B, D] (float32), top_v/top_i [B, k] the k largest approximate logits."""
    m: torch.Tensor
    z: torch.Tensor
    z2: torch.Tensor
    s: torch.Tensor
    top_v: torch.Tensor
    top_i: torch.Tensor


def merge(parts: list[Partial], k: int) -> Partial:
    """Log-sum-exp merge of streaming states over disjoint ranges of the data."""
    m = torch.stack([p.m for p in parts]).amax(0)
    k = min(k, sum(p.top_v.shape[1] for p in parts))
    z = z2 = s = 0
    for p in parts:
        a = torch.exp(p.m - m).nan_to_num_(0.0)                 # empty ranges have m = -inf
        z, z2 = z + a.double() * p.z, z2 + (a.double() ** 2) * p.z2
        s = s + a[:, None] * p.s
    top_v, j = torch.cat([p.top_v for p in parts], 1).topk(k, dim=1)
    top_i = torch.cat([p.top_i for p in parts], 1).gather(1, j)
    return Partial(m, z, z2, s, top_v, top_i)


class Store:
    """The dataset as stored: a torch tensor (float32 / float16 / uint8 with y = scale q + offset)
    or a numpy memmap read chunk by chunk; half the squared norms |y_i|^2 / 2 in float64 [N]."""

    def __init__(self, data, storage, scale, offset, chunk):
        self.mmap = isinstance(data, np.memmap)
        if isinstance(data, np.ndarray) and not self.mmap:
            data = torch.from_numpy(np.ascontiguousarray(data))
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
        self.storage = storage
        self.scale, self.offset = self._affine(data, kind, scale, offset, chunk)
        self.data = data if self.mmap else self._convert(data.reshape(self.n, self.dim), kind)
        self.hy2 = self._half_norms(chunk)
        self._device_copies = {}

    def _affine(self, data, kind, scale, offset, chunk):
        if self.storage != "uint8":
            if scale is not None or offset is not None:
                raise ValueError("scale/offset only apply to storage='uint8'")
            return 1.0, 0.0
        if kind == "uint8":
            from ..data import UINT8_OFFSET, UINT8_SCALE
            return (UINT8_SCALE if scale is None else float(scale)), (UINT8_OFFSET if offset is None else float(offset))
        lo = min(float(self._raw(a, b, data).min()) for a, b in self.ranges(chunk, data=data))
        hi = max(float(self._raw(a, b, data).max()) for a, b in self.ranges(chunk, data=data))
        return max(hi - lo, 1e-30) / 255.0, lo

    def _convert(self, data, kind):
        if self.storage == "uint8" and kind != "uint8":
            return ((data.double() - self.offset) / self.scale).round_().clamp_(0, 255).to(torch.uint8)
        return data.to(getattr(torch, self.storage)).contiguous()

    def ranges(self, chunk, lo=0, hi=None, data=None):
        hi = self.n if hi is None else hi
        return [(a, min(a + chunk, hi)) for a in range(lo, hi, chunk)]

    def _raw(self, a, b, data=None):
        rows = (self.data if data is None else data)[a:b]
        if isinstance(rows, np.ndarray):
            rows = torch.from_numpy(np.array(rows))          # a writable copy of the chunk
        return rows.reshape(b - a, self.dim)

    def _dequant(self, q, dtype):
        y = q.to(dtype)
        return y.mul_(self.scale).add_(self.offset) if self.storage == "uint8" else y

    def _half_norms(self, chunk):
        out = torch.empty(self.n, dtype=torch.float64)
        for a, b in self.ranges(chunk):
            y = self._dequant(self._raw(a, b), torch.float64)
            if not bool(torch.isfinite(y).all()):
                raise ValueError(f"data contains NaN or inf (rows {a}..{b - 1})")
            out[a:b] = 0.5 * (y * y).sum(1)
        return out

    def rows(self, a, b, device, out=None):
        """float32 rows a..b on ``device``; a view when stored as float32 on that device."""
        q = self.on(device)[a:b] if not self.mmap else self._raw(a, b).to(device)
        if q.dtype == torch.float32:
            return q
        out = out[: b - a] if out is not None else torch.empty(b - a, self.dim, device=device)
        out.copy_(q)
        return out.mul_(self.scale).add_(self.offset) if self.storage == "uint8" else out

    def gather64(self, idx):
        """float64 rows idx (any shape) -> [*idx.shape, D] on idx's device."""
        flat = idx.reshape(-1).cpu()
        if self.mmap:
            uniq, inv = np.unique(flat.numpy(), return_inverse=True)
            q = torch.from_numpy(np.array(self.data[uniq])).reshape(len(uniq), self.dim)[torch.from_numpy(inv)]
        else:
            q = self.on(idx.device)[flat.to(idx.device)]
        return self._dequant(q.to(idx.device), torch.float64).reshape(*idx.shape, self.dim)

    def on(self, device):
        """The stored tensor on ``device`` (copied once and kept); memmaps stay on disk."""
        device = torch.device(device)
        if self.mmap or device == self.data.device:
            return self.data
        if device not in self._device_copies:
            self._device_copies[device] = self.data.to(device)
        return self._device_copies[device]


def stream(store: Store, x: torch.Tensor, inv_s2: torch.Tensor, lo: int, hi: int, chunk: int, k: int,
           mm_dtype: torch.dtype = torch.float32) -> Partial:
    """Online log-sum-exp pass over data rows lo..hi for float32 queries x [B, D].

    Buffers: logits/weights [B, C], a dequantised chunk [C, D], the sum S [B, D].  ``mm_dtype``
    bfloat16 is ``precision="fast"`` (bf16 matmul inputs, float32 accumulation)."""
    b, dev = x.shape[0], x.device
    xs = (x * inv_s2[:, None]).to(mm_dtype)                         # x / sigma^2
    hy2 = store.hy2.to(dev, torch.float32)
    logits = torch.empty(b, chunk, device=dev)
    weights = torch.empty(b, chunk, device=dev)
    ybuf = None if store.storage == "float32" and not store.mmap else torch.empty(chunk, store.dim, device=dev)
    m = torch.full((b,), -math.inf, device=dev)
    z = torch.zeros(b, dtype=torch.float64, device=dev)
    z2 = torch.zeros_like(z)
    s = torch.zeros(b, store.dim, device=dev)
    top_v = torch.full((b, k), -math.inf, device=dev)
    top_i = torch.zeros(b, k, dtype=torch.long, device=dev)
    for a, e in store.ranges(chunk, lo, hi):
        y = store.rows(a, e, dev, ybuf).to(mm_dtype)
        l = _mm(xs, y.T, logits[:, : e - a])
        l.addr_(inv_s2, hy2[a:e], alpha=-1.0)                       # (x.y - |y|^2/2) / sigma^2
        cv, ci = l.topk(min(k, e - a), dim=1)                       # chunk top-k, then merge
        top_v, j = torch.cat([top_v, cv], 1).topk(k, dim=1)
        top_i = torch.cat([top_i, ci + a], 1).gather(1, j)
        tile_max = l.amax(1)
        m_new = torch.maximum(m, tile_max)
        if not bool((tile_max > m_new - SKIP).any()):
            continue                                                # tile skipping
        alpha = torch.exp(m - m_new)
        p = torch.sub(l, m_new[:, None], out=weights[:, : e - a]).exp_()
        z = z * alpha.double() + p.sum(1, dtype=torch.float64)
        z2 = z2 * alpha.double() ** 2 + torch.mul(p, p, out=l).sum(1, dtype=torch.float64)
        s.mul_(alpha[:, None])
        s.add_(_mm(p.to(mm_dtype), y, None)) if mm_dtype != torch.float32 else s.addmm_(p, y)
        m = m_new
    return Partial(m, z, z2, s, top_v, top_i)


def _mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """a @ b as float32, into ``out`` when given (float32 inputs write it directly)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    r = torch.mm(a, b).float()
    return r if out is None else out.copy_(r)


def refine(store: Store, x64: torch.Tensor, inv_s2: torch.Tensor, part: Partial):
    """Replace the top-k approximate logits by exact float64 ones from direct differences.

    D = (sum_top e^{l_i - M} y_i + e^{m - M} S_rest) / (sum_top e^{l_i - M} + e^{m - M} Z_rest),
    where S_rest, Z_rest are the streamed sums minus the streamed top-k terms."""
    y = store.gather64(part.top_i)                                 # [B, k, D]
    # [B, k] |x - y_i|^2 from direct differences (no [B, k, D] temporary), exact to float64 rounding
    d2 = torch.cdist(x64[:, None, :], y, compute_mode="donot_use_mm_for_euclid_dist")[:, 0].square()
    half = 0.5 * inv_s2[:, None]
    exact = (0.5 * (x64 * x64).sum(1))[:, None] * inv_s2[:, None] - d2 * half   # l_i exactly
    exact = exact.masked_fill(torch.isinf(part.top_v), -math.inf)  # padding of ranges shorter than k
    m = part.m.double()
    approx = torch.exp(part.top_v.double() - m[:, None]).nan_to_num_(0.0)
    z_rest = (part.z - approx.sum(1)).clamp_(min=0)
    z2_rest = (part.z2 - (approx ** 2).sum(1)).clamp_(min=0)
    s_rest = part.s.double() - torch.einsum("bk,bkd->bd", approx, y)
    big = torch.maximum(exact.amax(1), m)
    w = torch.exp(exact - big[:, None])
    r = torch.exp(m - big)
    z = w.sum(1) + r * z_rest
    out = (torch.einsum("bk,bkd->bd", w, y) + r[:, None] * s_rest) / z[:, None]
    stats = KDEStats(big + z.log(), z ** 2 / ((w * w).sum(1) + r * r * z2_rest),
                     part.top_i.gather(1, exact.argmax(1, keepdim=True))[:, 0])
    return out, stats


def reference(store: Store, x64: torch.Tensor, inv_s2: torch.Tensor, chunk: int):
    """Float64 ground truth: l_i = (|x|^2 - |x - y_i|^2) / (2 sigma^2), online log-sum-exp."""
    b = x64.shape[0]
    xx = 0.5 * (x64 * x64).sum(1)
    m = torch.full((b,), -math.inf, dtype=torch.float64, device=x64.device)
    z, z2 = torch.zeros_like(m), torch.zeros_like(m)
    s = torch.zeros_like(x64)
    arg = torch.zeros(b, dtype=torch.long, device=x64.device)
    for a, e in store.ranges(chunk):
        y = store._dequant(store._raw(a, e).to(x64.device), torch.float64)
        d2 = torch.cdist(x64, y, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        l = (xx[:, None] - 0.5 * d2) * inv_s2[:, None]
        cm, ci = l.max(1)
        arg = torch.where(cm > m, ci + a, arg)
        m_new = torch.maximum(m, cm)
        alpha = torch.exp(m - m_new)
        p = torch.exp(l - m_new[:, None])
        z, z2 = z * alpha + p.sum(1), z2 * alpha ** 2 + (p * p).sum(1)
        s = s * alpha[:, None] + p @ y
        m = m_new
    return s / z[:, None], KDEStats(m + z.log(), z ** 2 / z2, arg)


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
    return x.reshape(x.shape[0], -1), sig.expand(x.shape[0])


class KDEDenoiser:
    """Exact denoiser D(x, sigma) of the empirical distribution of ``data`` [N, ...].

    data: torch tensor or numpy array (a ``np.memmap`` is streamed from disk, never loaded).
    backend: "auto" (triton on CUDA tensors when Triton imports, else cpu), "reference",
    "cpu" (the streaming torch path, any device), "triton".
    precision: "exact" (float32 logits + exact float64 re-scoring of the top ``refine_k``
    candidates) or "fast" (bfloat16 matmuls, no re-scoring; its measured error is in the README).
    storage: "float32" | "float16" | "uint8" (default: the data's dtype; float64 -> float32);
    uint8 data use y = scale * q + offset (default 2/255, -1: pixels to [-1, 1]).
    chunk_size: rows per streamed chunk (memory O(B C + C D), never O(B N)).
    Call: ``D(x, sigma, return_stats=False)`` with x [B, ...] (data's trailing shape) and sigma a
    float or a [B] tensor; returns x's dtype and shape, and (D, KDEStats) with return_stats.
    """

    def __init__(self, data, backend: str = "auto", precision: str = "exact", chunk_size: int = 1024,
                 storage: str | None = None, scale: float | None = None, offset: float | None = None,
                 refine_k: int = 16, threads: int | None = None):
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
        inv_s2 = sig ** -2
        backend = self.resolve_backend(x)
        if backend == "reference":
            out, stats = reference(self.store, xf.double(), inv_s2, self.chunk_size)
        else:
            part = self._partial(backend, xf.float(), inv_s2)
            out, stats = self._finish(part, xf, inv_s2)
        out = out.reshape(x.shape).to(x.dtype)
        return (out, stats) if return_stats else out

    def _partial(self, backend, x32, inv_s2) -> Partial:
        k = self.refine_k
        if backend == "triton":
            from ..kernels import triton_available
            if not triton_available():
                raise RuntimeError("backend='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1)")
            from ..kernels.kde_triton import kde_partial
            return kde_partial(self.store, x32, inv_s2, self.chunk_size, k, self.precision)
        mm_dtype = torch.bfloat16 if self.precision == "fast" else torch.float32
        t = self.threads
        if x32.shape[0] > 4 or t < 2 or x32.is_cuda or self.store.n < 2 * self.chunk_size:
            return stream(self.store, x32, inv_s2.float(), 0, self.store.n, self.chunk_size, k, mm_dtype)
        cut = [round(i * self.store.n / t) for i in range(t + 1)]          # N-split for tiny batches
        with ThreadPoolExecutor(t) as pool:
            parts = list(pool.map(lambda i: stream(self.store, x32, inv_s2.float(), cut[i], cut[i + 1],
                                                   self.chunk_size, k, mm_dtype), range(t)))
        return merge(parts, k)

    def _finish(self, part, xf, inv_s2):
        if self.precision == "exact":
            return refine(self.store, xf.double(), inv_s2, part)
        z = part.z
        out = part.s.double() / z[:, None]
        return out, KDEStats(part.m.double() + z.log(), z ** 2 / part.z2, part.top_i[:, 0])
