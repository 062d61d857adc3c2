"""FID and KID of image sets: image sources, resumable feature caches, reference statistics files.

* :class:`ImageSource`: images in [-1, 1] read range by range from a dataset name, an image folder
  or tar, or an ``.npy``/``.npz`` array (uint8 pixels, or floats in [-1, 1]; [N, C, H, W] or
  [N, H, W, C]), optionally a seeded random subset and box-averaged to a smaller side;
  :class:`GeneratedSource` draws them from a sampler run.  Each has a ``key``: what its images
  depend on.
* :func:`cached_features`: features of a source in chunks of :data:`CHUNK` images, each chunk an
  atomically written float32 ``.npy`` under ``$GEOSAMPLE_CACHE/fid/features/<key hash>/``, so an
  interrupted run resumes at its first missing chunk and a finished one is read back.
* :class:`Reference`: Gaussian statistics (mu, sigma) of a reference set plus a seeded subset of
  :data:`KID_ROWS` of its features (for KID); saved as an ``.npz`` that EDM's tools read too
  (keys ``mu``, ``sigma``), with ``kid_features`` and a JSON ``meta`` naming the features and
  the source, checked when loaded.
* :func:`score`: FID (with a bootstrap spread over the samples) and KID (mean and spread over
  random subsets) of sample features against a :class:`Reference`.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .._io import atomic_write, atomic_write_text, cache_root
from .frechet import frechet_distance_to_features, frechet_distances, kid
from .stats import feature_stats

__all__ = ["ImageSource", "GeneratedSource", "cached_features", "Reference", "score", "CHUNK", "KID_ROWS",
           "STATS_FORMAT", "feature_cache_dir"]

CHUNK = 500                 # images per cached feature chunk
KID_ROWS = 5000             # reference features kept for KID (a seeded random subset)
STATS_FORMAT = "geosample-fid-stats/1"
FLOAT_RANGE = 1.5           # float images beyond +-this are not in [-1, 1] (e.g. 0..255): refused


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def feature_cache_dir() -> Path:
    """``$GEOSAMPLE_CACHE/fid/features`` (default ``~/.cache/geosample/fid/features``)."""
    return cache_root() / "fid" / "features"


def _to_nchw(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.ndim != 4:
        raise ValueError(f"{where}: images must be a 4-D array [N, C, H, W] or [N, H, W, C], got shape {arr.shape}")
    if arr.shape[1] not in (1, 3) and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.shape[1] not in (1, 3):
        raise ValueError(f"{where}: images need 1 or 3 channels, got shape {arr.shape}")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{where}: images must be uint8 pixels or floats in [-1, 1], got {arr.dtype}")
    return arr


class ImageSource:
    """Images of a dataset, folder, tar or array as float32 [-1, 1] tensors, range by range.

    spec: a dataset name (``digits``, ``cifar10``) or a path (:func:`geosample.data.resolve`).
    num: a seeded random subset of ``num`` images (``seed``; all when None or larger).
    size: box-average to ``size`` x ``size`` (the side must be a multiple of it), as
    ``cifar10-tiny``'s training images were prepared from CIFAR-10's 32x32.
    Float arrays are taken as they are, clamped to [-1, 1] (values beyond +-1.5 are refused: they
    are not in [-1, 1]); uint8 pixels q map to q / 127.5 - 1."""

    def __init__(self, spec: str, num: int | None = None, seed: int = 0, size: int | None = None,
                 progress: bool = True):
        from ..data import _load_array, _source_tag, load_digits, load_images, resolve, subset_rows

        if num is not None and (isinstance(num, bool) or not isinstance(num, int) or num < 2):
            raise ValueError(f"the number of images must be an int >= 2, got {num!r}")
        if spec == "digits":
            arr, tag = load_digits("uint8").numpy(), "sklearn-digits"
        else:
            path = resolve(str(spec))
            if path.suffix in (".npy", ".npz"):
                arr = _load_array(path, mmap=True)
            else:
                arr = load_images(path, progress=progress)
            tag = f"{path.resolve()}|{_source_tag(path)[0]}"
        self.array = _to_nchw(arr, str(spec))
        rows = subset_rows(len(self.array), num, "random", seed)
        self.rows = np.arange(len(self.array)) if rows is None else rows
        side = self.array.shape[-1]
        if size is not None and (size < 1 or side % size or self.array.shape[-2] % size):
            raise ValueError(f"cannot box-average {self.array.shape[-2]}x{side} images to {size}x{size}: "
                             "the sides must be multiples of the size")
        self.factor = side // size if size else 1
        self.count = len(self.rows)
        self.shape = (self.array.shape[1], self.array.shape[2] // self.factor, side // self.factor)
        self.name = str(spec)
        self.key = {"source": tag, "num": self.count, "seed": seed if rows is not None else None,
                    "size": size, "dtype": str(self.array.dtype)}
        if self.array.dtype != np.uint8:
            self._check_range()

    def _check_range(self) -> None:
        lo = hi = None
        for i in range(0, len(self.rows), 4096):
            block = np.asarray(self.array[self.rows[i:i + 4096]])
            if not np.isfinite(block).all():
                raise ValueError(f"{self.name}: the images hold NaN or infinite values")
            lo = min(float(block.min()), lo if lo is not None else np.inf)
            hi = max(float(block.max()), hi if hi is not None else -np.inf)
        if lo < -FLOAT_RANGE or hi > FLOAT_RANGE:
            raise ValueError(f"{self.name}: float images must be in [-1, 1], these span [{lo:g}, {hi:g}] "
                             "(save 8-bit pixels as uint8, or map them with x / 127.5 - 1)")
        if lo >= 0:
            warnings.warn(f"{self.name}: every value is in [0, {hi:g}]; float images are read as [-1, 1] "
                          "(map images in [0, 1] with 2 x - 1)", stacklevel=3)

    def images(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start``..``stop`` of the (subset) source: float32 [n, C, h, w] in [-1, 1]."""
        block = np.asarray(self.array[self.rows[start:stop]])
        x = torch.from_numpy(block.astype(np.float32))
        x = x / 127.5 - 1 if block.dtype == np.uint8 else x.clamp(-1, 1)
        return F.avg_pool2d(x, self.factor) if self.factor > 1 else x


class GeneratedSource:
    """``num`` samples of ``sample(noise)`` (a solve returning [n, C, H, W] in about [-1, 1],
    clamped), from noise [num, *shape] drawn once from ``torch.Generator().manual_seed(seed)``
    and solved ``CHUNK`` rows at a time.  ``key``: what the samples depend on (the caller names
    the model, solver and the exact sigmas in it)."""

    def __init__(self, sample, shape, num: int, seed: int, key: dict):
        if isinstance(num, bool) or not isinstance(num, int) or num < 2:
            raise ValueError(f"the number of samples must be an int >= 2, got {num!r}")
        self.sample, self.count, self.shape = sample, num, tuple(shape)
        self.noise = torch.randn((num, *self.shape), generator=torch.Generator().manual_seed(seed))
        self.key = {**key, "num": num, "seed": seed, "noise": "randn(num, *shape), one generator"}
        self.name = key.get("name", "samples")

    def images(self, start: int, stop: int) -> torch.Tensor:
        return self.sample(self.noise[start:stop]).float().clamp(-1, 1)


def _read_chunk(path: Path, rows: int, dim: int) -> np.ndarray | None:
    try:
        arr = np.load(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError) as e:
        warnings.warn(f"feature cache {path} is unreadable ({e}); computing it again", stacklevel=3)
        return None
    if arr.ndim != 2 or arr.shape[0] != rows or dim not in (None, arr.shape[1]) or arr.dtype != np.float32 \
            or not np.isfinite(arr).all():
        warnings.warn(f"feature cache {path} holds {arr.dtype} {arr.shape}, expected float32 ({rows}, {dim or 'd'}); "
                      "computing it again", stacklevel=3)
        return None
    return arr


def cached_features(source, extractor, *, use_cache: bool = True, progress: bool = False,
                    batch_size: int | None = None, chunk: int = CHUNK) -> np.ndarray:
    """Features [source.count, d] float32 of every image of ``source``, computed ``chunk``
    images at a time; with ``use_cache`` each chunk is read from or written (atomically) to
    ``feature_cache_dir() / <hash of source.key, extractor.key, chunk>``, so a killed run
    resumes where it stopped.  ``extractor``: e.g. :class:`InceptionFeatures`; its ``key`` (what its
    features depend on) and ``dim`` (the feature width, checked on reading) are used when present."""
    from .features import extract_features

    ident = {"images": source.key, "features": getattr(extractor, "key", type(extractor).__name__), "chunk": chunk}
    folder = feature_cache_dir() / _digest(ident)
    if use_cache:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "key.json").exists():
            atomic_write_text(folder / "key.json", json.dumps(ident, indent=1))
    dim = getattr(extractor, "dim", None)   # None: any width
    out = []
    bar = tqdm(total=source.count, desc=f"features {source.name}", disable=not progress, unit="img")
    for start in range(0, source.count, chunk):
        stop = min(start + chunk, source.count)
        path = folder / f"{start // chunk:05d}.npy"
        feats = _read_chunk(path, stop - start, dim) if use_cache else None
        if feats is None:
            feats = extract_features(extractor, source.images(start, stop), batch_size).numpy().astype(np.float32)
            if not np.isfinite(feats).all():
                raise ValueError(f"{source.name}: features of images {start}..{stop} are not finite")
            if use_cache:
                atomic_write(path, lambda f, a=feats: np.save(f, a))
        out.append(feats)
        bar.update(stop - start)
    bar.close()
    return np.concatenate(out)


class Reference:
    """Statistics of a reference image set: ``mu`` [d], ``sigma`` [d, d] (float64), ``kid_features``
    [k, d] float32 (a seeded subset of its features, or None) and ``meta`` (features and source)."""

    def __init__(self, mu, sigma, kid_features=None, meta: dict | None = None):
        self.mu, self.sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
        self.kid_features = None if kid_features is None else np.asarray(kid_features, np.float32)
        self.meta = dict(meta or {})

    @classmethod
    def from_features(cls, features: np.ndarray, meta: dict, kid_rows: int = KID_ROWS, seed: int = 0) -> "Reference":
        """Statistics of ``features`` [n, d]; KID keeps ``min(n, kid_rows)`` rows drawn with ``seed``."""
        from ..data import subset_rows

        mu, sigma = feature_stats(features)
        rows = subset_rows(len(features), kid_rows, "random", seed)
        kid_features = features if rows is None else features[rows]
        return cls(mu, sigma, kid_features, {**meta, "format": STATS_FORMAT, "num": len(features),
                                             "kid_rows": len(kid_features), "kid_seed": seed})

    def save(self, path) -> None:
        """An ``.npz`` with ``mu``, ``sigma`` (EDM's reference format), ``kid_features`` and ``meta``."""
        arrays = {"mu": self.mu, "sigma": self.sigma, "meta": np.array(json.dumps(self.meta))}
        if self.kid_features is not None:
            arrays["kid_features"] = self.kid_features
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path, features_key: dict | None = None) -> "Reference":
        """Read a statistics file and check it: ``mu`` [d] and ``sigma`` [d, d] finite; when it was
        written here, its features must be ``features_key`` (the extractor's ``key``).  A plain
        ``mu``/``sigma`` file (EDM's ``fid.py ref``) loads with a warning and no KID features."""
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path} is not a statistics .npz ({e})") from None
        with z:
            missing = {"mu", "sigma"} - set(z.files)
            if missing:
                raise ValueError(f"{path} lacks {sorted(missing)}: a statistics file holds 'mu' and 'sigma'")
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
            kid_features = z["kid_features"] if "kid_features" in z.files else None
            meta = json.loads(str(z["meta"])) if "meta" in z.files else None
        if mu.ndim != 1 or sigma.shape != (mu.size, mu.size) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError(f"{path}: need finite mu [d] and sigma [d, d], got {mu.shape} and {sigma.shape}")
        if meta is None:
            warnings.warn(f"{path} has no geosample key (written by another tool): assuming Inception-v3 pool "
                          "features of the same network and resize; KID needs reference features and is skipped",
                          stacklevel=2)
            meta = {}
        elif meta.get("format") != STATS_FORMAT:
            raise ValueError(f"{path}: unknown statistics format {meta.get('format')!r} (this version reads {STATS_FORMAT})")
        elif features_key is not None and meta.get("features") != features_key:
            raise ValueError(f"{path} holds statistics of other features ({meta.get('features')}) than these "
                             f"({features_key}); compute them again with --save-stats")
        if kid_features is not None and (kid_features.ndim != 2 or kid_features.shape[1] != mu.size):
            raise ValueError(f"{path}: kid_features must be [k, {mu.size}], got {kid_features.shape}")
        return cls(mu, sigma, kid_features, meta)


def score(features, ref: Reference, *, bootstrap: int = 10, kid_subsets: int = 100, kid_subset_size: int = 1000,
          seed: int = 0) -> dict:
    """FID and KID of sample ``features`` [n, d] against ``ref``.

    fid: Frechet distance of the samples' Gaussian statistics to (ref.mu, ref.sigma); fid_std: its
    standard deviation over ``bootstrap`` resamples of the samples with replacement (0: none, None).
    kid, kid_std: mean and standard deviation of the unbiased cubic-kernel MMD^2 over ``kid_subsets``
    subsets of ``kid_subset_size`` rows of the samples and of ref.kid_features (None without them).
    Every draw comes from ``torch.Generator().manual_seed(seed)``."""
    f = torch.as_tensor(np.asarray(features)).double()
    if f.dim() != 2 or f.shape[1] != ref.mu.size:
        raise ValueError(f"features must be [n, {ref.mu.size}], got {tuple(f.shape)}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    g = torch.Generator().manual_seed(seed)
    n, d = f.shape
    sets = [f] + [f[torch.randint(n, (n,), generator=g)] for _ in range(bootstrap)]
    if n <= d:      # an n x n eigenproblem per set (frechet_distance_to_features)
        fids = [frechet_distance_to_features(ref.mu, ref.sigma, s) for s in sets]
    else:           # the reference's factor once, a d x d eigenproblem per set
        fids = frechet_distances(ref.mu, ref.sigma, [feature_stats(s) for s in sets])
    out = {"fid": fids[0], "fid_std": float(np.std(fids[1:], ddof=1)) if bootstrap > 1 else None,
           "fid_bootstrap": bootstrap, "kid": None, "kid_std": None, "num": n}
    if ref.kid_features is not None:
        k, s = kid(f, torch.from_numpy(ref.kid_features), num_subsets=kid_subsets, subset_size=kid_subset_size,
                   generator=g)
        out.update(kid=k, kid_std=s, kid_subsets=kid_subsets,
                   kid_subset_size=min(kid_subset_size, n, len(ref.kid_features)))
    return out
