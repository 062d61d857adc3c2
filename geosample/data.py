"""Datasets for the closed-form denoiser: bundled digits, image folders / tar files, .npy/.npz, memmaps.

Every loader returns images as ``[N, C, H, W]``: float32 in [-1, 1] (``x = q / 127.5 - 1`` for
8-bit pixels), or the raw uint8 pixels with ``dtype="uint8"`` (dequantise with
:data:`UINT8_SCALE` and :data:`UINT8_OFFSET`, which ``KDEDenoiser`` does by default).

Decoded image archives are cached as uint8 ``.npy`` under ``$GEOSAMPLE_CACHE`` (default
``~/.cache/geosample``), keyed by the archive's path, size and mtime, and written atomically.
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ._io import atomic_write, cache_root

__all__ = ["load_dataset", "load_digits", "load_images", "cache_dir", "resolve", "UINT8_SCALE", "UINT8_OFFSET"]

UINT8_SCALE = 2.0 / 255.0
UINT8_OFFSET = -1.0
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_REPO = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """``$GEOSAMPLE_CACHE`` or ``~/.cache/geosample`` (created on demand)."""
    path = cache_root()
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve(name: str) -> Path:
    """The file behind a dataset name: ``"cifar10"`` -> ``$GEOSAMPLE_CIFAR10``, else the first
    existing ``shared/data/cifar10/train.tar.gz`` beside the source tree or the working directory
    (``../shared`` or ``./shared``); anything else is a path."""
    if name == "cifar10":
        if "GEOSAMPLE_CIFAR10" in os.environ:
            candidates = [Path(os.environ["GEOSAMPLE_CIFAR10"])]
        else:
            rel = Path("shared") / "data" / "cifar10" / "train.tar.gz"
            candidates = [_REPO.parent / rel, Path.cwd().parent / rel, Path.cwd() / rel]
        for path in candidates:
            if path.exists():
                return path
        raise FileNotFoundError(f"cifar10 archive not found at {', '.join(map(str, candidates))}; "
                                "set GEOSAMPLE_CIFAR10 to its path")
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no dataset named {name!r} and no such file or folder")
    return path


def load_digits(dtype: str = "float32", limit: int | None = None):
    """scikit-learn's bundled 8x8 digits (1797 images, no network) as ``[N, 1, 8, 8]``.

    Pixels 0..16 map to [-1, 1] (``x = q / 8 - 1``); ``dtype="uint8"`` gives them rescaled to
    0..255 (``round(q * 255 / 16)``)."""
    from sklearn.datasets import load_digits as sk_digits
    q = sk_digits().images[:limit, None].astype(np.float64)
    if dtype == "uint8":
        return torch.from_numpy(np.round(q * 255.0 / 16.0).astype(np.uint8))
    return torch.from_numpy((q / 8.0 - 1.0).astype(np.float32))


def _decode(blob: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(blob)) as im:
        arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    return arr[:, :, None] if arr.ndim == 2 else arr


def _members(path: Path, limit: int | None):
    """(name, encoded bytes) of the first ``limit`` images of a folder or tar(.gz), by name.

    A tar is read once, sequentially (seeking backwards in a gzip stream restarts it)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        return [(str(p.relative_to(path)), p.read_bytes()) for p in files]
    with tarfile.open(path) as tar:
        items = [(m.name, tar.extractfile(m).read()) for m in tar
                 if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(items)[:limit]


def _cache_key(path: Path, limit: int | None) -> str:
    st = path.stat()
    tag = f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}|{limit}"
    return f"{path.name.split('.')[0]}-{hashlib.sha256(tag.encode()).hexdigest()[:16]}.npy"


def load_images(path, limit: int | None = None, progress: bool = True, cache: bool = True) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` decoded from a folder or tar(.gz) of same-sized images.

    The first call decodes (tqdm progress) and caches the array; later calls memory-map the cache.
    ``limit`` keeps the first ``limit`` images in name order."""
    path = Path(path)
    if cache:
        full = cache_dir() / _cache_key(path, None)
        if full.exists():
            return np.load(full, mmap_mode="r")[:limit]
    target = cache_dir() / _cache_key(path, limit) if cache else None
    if target is not None and target.exists():
        return np.load(target, mmap_mode="r")
    members = _members(path, limit)
    if not members:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    first = _decode(members[0][1])
    out = np.empty((len(members), *first.shape), dtype=np.uint8)
    for i, (name, blob) in enumerate(tqdm(members, desc=f"decode {path.name}", disable=not progress)):
        img = first if i == 0 else _decode(blob)
        if img.shape != first.shape:
            raise ValueError(f"{name} has shape {img.shape}, expected {first.shape} like the first image")
        out[i] = img
    out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    if target is None:
        return out
    atomic_write(target, lambda f: np.save(f, out))
    return np.load(target, mmap_mode="r")


def _load_array(path: Path, mmap: bool) -> np.ndarray:
    if path.suffix == ".npz":
        with np.load(path) as z:
            return z[z.files[0]]
    return np.load(path, mmap_mode="r" if mmap else None)


def _to_output(arr, dtype: str, limit: int | None):
    """uint8 arrays map to [-1, 1] float32 or stay uint8; float arrays are returned as float32."""
    arr = arr[:limit]
    if dtype == "uint8":
        if arr.dtype != np.uint8:
            raise TypeError(f"dtype='uint8' needs 8-bit pixel data, the array is {arr.dtype}")
        return torch.from_numpy(np.array(arr))  # a writable in-memory copy (arr may be a read-only memmap)
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.asarray(arr, dtype=np.float32) * np.float32(UINT8_SCALE) + np.float32(UINT8_OFFSET))
    return torch.from_numpy(np.asarray(arr, dtype=np.float32))


def load_dataset(name_or_path="digits", dtype: str = "float32", limit: int | None = None,
                 mmap: bool = False, progress: bool = True):
    """Load a dataset as ``[N, C, H, W]`` float32 in [-1, 1] (or uint8 with ``dtype="uint8"``).

    name_or_path: ``"digits"`` (bundled, default), ``"cifar10"``, a folder or tar(.gz) of images,
    or a ``.npy``/``.npz`` array (uint8 pixels are rescaled, float arrays kept as they are).
    mmap: return the ``.npy`` (or decoded-image cache) as a read-only ``np.memmap`` without
    reading it; ``KDEDenoiser`` streams such arrays from disk chunk by chunk.
    limit: keep the first ``limit`` items.
    """
    if dtype not in ("float32", "uint8"):
        raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if name_or_path == "digits":
        return load_digits(dtype, limit)
    path = resolve(str(name_or_path))
    if path.suffix in (".npy", ".npz"):
        arr = _load_array(path, mmap)
    else:
        arr = load_images(path, limit=limit, progress=progress)
    if mmap:
        if not isinstance(arr, np.memmap):
            raise ValueError(f"mmap=True needs a .npy file or an image archive, got {path.name}")
        return arr[:limit]
    return _to_output(arr, dtype, limit)
