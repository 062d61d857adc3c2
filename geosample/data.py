"""Datasets for the closed-form denoiser: bundled digits, image folders / tar files, .npy/.npz, memmaps.

Every loader returns images as ``[N, C, H, W]``: float32 in [-1, 1] (``x = q / 127.5 - 1`` for
8-bit pixels), or the raw uint8 pixels with ``dtype="uint8"`` (dequantise with
:data:`UINT8_SCALE` and :data:`UINT8_OFFSET`, which ``KDEDenoiser`` does by default).

Decoded image archives are cached as uint8 ``.npy`` under ``$GEOSAMPLE_CACHE`` (default
``~/.cache/geosample``), written atomically and keyed by the source: a tar's path, size and mtime;
a folder's path and every image file's relative name, size and mtime, subfolders included, so
editing, adding or removing an image is a new key.  A cache file that fails to load or holds
something other than a uint8 ``[N, C, H, W]`` array of the expected length is a miss (with a
:class:`DataCacheWarning`): the images are decoded again and the file rewritten.

Hostile input is refused before it is read: a tar member larger than ``max_member_bytes`` (a
gzip bomb inflates a small archive to any size), members or a decoded array that would not fit in
the available memory (MemoryError), and a ``.npy`` shorter than its header says.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ._io import atomic_write, cache_root, remove_stale_temps
from .denoisers.kde import UINT8_OFFSET, UINT8_SCALE  # the pixel map of the KDE's uint8 storage

__all__ = ["load_dataset", "load_digits", "load_images", "subset_rows", "cache_dir", "resolve", "UINT8_SCALE", "UINT8_OFFSET",
           "MAX_MEMBER_BYTES", "DataCacheWarning"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
#: Largest decompressed size of one image in a tar (64 MiB: a 4096 x 4096 RGBA bitmap fits).
MAX_MEMBER_BYTES = 64 << 20
_REPO = Path(__file__).resolve().parent.parent


#: Where the CIFAR-10 python archive (cifar-10-python.tar.gz, 163 MB) is published.
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


class DataCacheWarning(RuntimeWarning):
    """A decoded-image cache file was unreadable or invalid and is rebuilt."""


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
        raise FileNotFoundError(f"cifar10 archive not found at {', '.join(map(str, candidates))}; download "
                                f"{CIFAR10_URL} (or any folder / tar(.gz) of its training images) and set "
                                "GEOSAMPLE_CIFAR10 to its path")
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


def _image_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _members(path: Path, limit: int | None, max_member_bytes: int):
    """(name, encoded bytes) of the first ``limit`` images of a folder or tar(.gz), by name.

    A tar is read once, sequentially (seeking backwards in a gzip stream restarts it); a member
    whose header declares more than ``max_member_bytes`` is refused before it is inflated."""
    if path.is_dir():
        return [(str(p.relative_to(path)), p.read_bytes()) for p in _image_files(path)[:limit]]
    items, total = [], 0
    try:
        tar = tarfile.open(path)
    except tarfile.ReadError:
        raise ValueError(f"{path} is not a dataset: expected a folder or tar(.gz) of images, or a .npy/.npz "
                         "array") from None
    try:
        with tar:
            for m in tar:
                if not (m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES)):
                    continue
                if m.size > max_member_bytes:
                    raise ValueError(f"{path}: member {m.name!r} inflates to {m.size} bytes, more than "
                                     f"max_member_bytes={max_member_bytes} (a decompression bomb?)")
                total += m.size
                _check_fits(total, f"reading {path} (up to {m.name!r})")
                items.append((m.name, tar.extractfile(m).read()))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(f"{path} is a damaged archive ({type(e).__name__}: {e})") from None
    return sorted(items)[:limit]


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_fits(nbytes: int, what: str) -> None:
    free = available_memory()
    if free is not None and nbytes > free:
        raise MemoryError(f"{what} needs {nbytes / 2**30:.2f} GiB, more than the {free / 2**30:.2f} GiB available")


def _source_tag(path: Path) -> tuple[str, int | None]:
    """(what the decoded cache depends on, the image count when known): a file's size and mtime;
    for a folder, every image's relative name, size and mtime (nanoseconds), subfolders included."""
    if not path.is_dir():
        st = path.stat()
        return f"{st.st_size}|{st.st_mtime_ns}", None
    h = hashlib.sha256()
    files = _image_files(path)
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest(), len(files)


def _cache_key(path: Path, tag: str, limit: int | None) -> str:
    key = f"{path.resolve()}|{tag}|{limit}"
    return f"{path.name.split('.')[0]}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"


def _read_cache(file: Path, count: int | None) -> np.ndarray | None:
    """The cached uint8 [N, C, H, W] array (memory-mapped), or None when missing; an unreadable or
    misshapen file (``count``: the expected N, when known) is a miss with a warning."""
    if not file.exists():
        return None
    try:
        arr = _load_npy(file, mmap=True)
        ok = arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[0] >= 1 and count in (None, arr.shape[0])
        why = f"holds {arr.dtype} {arr.shape}, expected uint8 [{count or 'N'}, C, H, W]"
    except (OSError, ValueError, EOFError) as e:
        ok, why = False, f"unreadable: {e}"
    if ok:
        return arr
    warnings.warn(f"decoded-image cache {file} is invalid ({why}); decoding again", DataCacheWarning, stacklevel=3)
    return None


def load_images(path, limit: int | None = None, progress: bool = True, cache: bool = True,
                max_member_bytes: int = MAX_MEMBER_BYTES) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` decoded from a folder or tar(.gz) of same-sized images.

    The first call decodes (tqdm progress) and caches the array; later calls memory-map the cache.
    ``limit`` keeps the first ``limit`` images in name order.  ``max_member_bytes``: refuse a tar
    member that would inflate to more than this."""
    path = Path(path)
    if cache:
        tag, count = _source_tag(path)
        full = _read_cache(cache_dir() / _cache_key(path, tag, None), count)
        if full is not None:
            return full[:limit]
        if count is not None and limit is not None:
            count = min(count, limit)
        cached = _read_cache(cache_dir() / _cache_key(path, tag, limit), count)
        if cached is not None:
            return cached
    members = _members(path, limit, max_member_bytes)
    out = _cifar_batches(path, limit) if not members and not path.is_dir() else None
    if out is None:
        out = _decode_all(path, members, progress)
    if not cache:
        return out
    target = cache_dir() / _cache_key(path, tag, limit)
    remove_stale_temps(target.parent, legacy=True)
    atomic_write(target, lambda f: np.save(f, out))
    return np.load(target, mmap_mode="r")


def _decode_all(path: Path, members: list, progress: bool) -> np.ndarray:
    """uint8 [N, C, H, W] from (name, encoded image) pairs of one shape."""
    if not members:
        raise ValueError(f"{path} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no CIFAR-10 python batches")
    first = _decode(members[0][1])
    _check_fits(2 * len(members) * first.size, f"decoding {len(members)} images of shape {first.shape} (two copies)")
    out = np.empty((len(members), *first.shape), dtype=np.uint8)
    for i, (name, blob) in enumerate(tqdm(members, desc=f"decode {path.name}", disable=not progress)):
        img = first if i == 0 else _decode(blob)
        if img.shape != first.shape:
            raise ValueError(f"{name} has shape {img.shape}, expected {first.shape} like the first image")
        out[i] = img
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles the official CIFAR-10 python batches and nothing else: only numpy's array
    reconstruction (and bytes re-encoding) may be called, so a hostile pickle cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise ValueError(f"a CIFAR-10 batch may not reference {module}.{name}")
        if module == "numpy.core.multiarray" and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core.multiarray"   # numpy 2 renamed it (numpy.core is a deprecated alias)
        return super().find_class(module, name)


def _cifar_batches(path: Path, limit: int | None) -> np.ndarray | None:
    """uint8 [N, 3, 32, 32] from the official CIFAR-10 python archive (``cifar-10-python.tar.gz``:
    ``cifar-10-batches-py/data_batch_1..5``, 10,000 images each, in batch order), or None when the
    archive holds no such batches."""
    batches = {}
    with tarfile.open(path) as tar:
        for m in tar:
            stem = m.name.rsplit("/", 1)[-1]
            if m.isfile() and stem.startswith("data_batch_") and stem[11:].isdigit():
                try:
                    batch = _BatchUnpickler(tar.extractfile(m), encoding="bytes").load()
                except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as e:
                    raise ValueError(f"{path}: {m.name} is not a CIFAR-10 batch ({type(e).__name__}: {e})") from None
                data = batch.get(b"data") if isinstance(batch, dict) else None
                if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                    raise ValueError(f"{path}: {m.name} is not a CIFAR-10 batch (no uint8 [N, 3072] 'data')")
                batches[int(stem[11:])] = data
    if not batches:
        return None
    return np.concatenate([batches[k] for k in sorted(batches)]).reshape(-1, 3, 32, 32)[:limit].copy()


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    """``np.load`` of a ``.npy`` after checking that the file holds all the bytes its header
    declares (a short file would otherwise be memory-mapped and fault when read)."""
    fmt = np.lib.format
    with open(path, "rb") as f:
        version = fmt.read_magic(f)
        read_header = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
        if read_header is None:  # format 3.0 (utf-8 field names): numpy's own checks only
            return np.load(path, mmap_mode="r" if mmap else None)
        shape, _, dtype = read_header(f)
        offset = f.tell()
    if dtype.hasobject:
        raise ValueError(f"{path} holds Python objects ({dtype}); only numeric arrays are loaded")
    need = offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = os.path.getsize(path)
    if have < need:
        raise ValueError(f"{path} is truncated: its header declares {dtype} {tuple(shape)} "
                         f"({need} bytes with the header), the file has {have}")
    return np.load(path, mmap_mode="r" if mmap else None)


def _load_array(path: Path, mmap: bool) -> np.ndarray:
    if path.suffix != ".npz":
        return _load_npy(path, mmap)
    with np.load(path) as z:
        shapes = {k: z[k].shape for k in z.files}
        images = [k for k, shape in shapes.items() if len(shape) == 4]
        if len(shapes) == 1 or len(images) == 1:
            return z[z.files[0] if len(shapes) == 1 else images[0]]
    listing = ", ".join(f"{k} {list(v)}" for k, v in shapes.items()) or "nothing"
    raise ValueError(f"{path} holds {listing}: give a .npz with one array, or one 4-D [N, C, H, W] image array")


def _to_output(arr, dtype: str):
    """uint8 arrays map to [-1, 1] float32 or stay uint8; float arrays are returned as float32."""
    if dtype == "uint8":
        if arr.dtype != np.uint8:
            raise TypeError(f"dtype='uint8' needs 8-bit pixel data, the array is {arr.dtype}")
        return torch.from_numpy(np.array(arr))  # a writable in-memory copy (arr may be a read-only memmap)
    if arr.dtype == np.uint8:
        return torch.from_numpy(np.asarray(arr, dtype=np.float32) * np.float32(UINT8_SCALE) + np.float32(UINT8_OFFSET))
    return torch.from_numpy(np.asarray(arr, dtype=np.float32))


def subset_rows(n: int, limit: int | None, subset: str = "random", seed: int = 0):
    """Row indices of a ``limit``-row subset of ``n`` rows, ascending (memmap reads stay sequential).

    ``"random"``: a seeded uniform draw without replacement (``torch.Generator``); ``"first"``:
    rows 0..limit-1.  ``None`` when every row is kept.  Image sets are often sorted by class, so
    the first rows of CIFAR-10 are all airplanes: ask for ``"first"`` only on purpose."""
    if subset not in ("random", "first"):
        raise ValueError(f"subset must be 'random' or 'first', got {subset!r}")
    if limit is None or limit >= n:
        return None
    if subset == "first":
        return np.arange(limit)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))[:limit]
    return np.sort(perm.numpy())


def load_dataset(name_or_path="digits", dtype: str = "float32", limit: int | None = None,
                 mmap: bool = False, progress: bool = True, subset: str = "random", seed: int = 0):
    """Load a dataset as ``[N, C, H, W]`` float32 in [-1, 1] (or uint8 with ``dtype="uint8"``).

    name_or_path: ``"digits"`` (bundled, default), ``"cifar10"``, a folder or tar(.gz) of images,
    or a ``.npy``/``.npz`` array (uint8 pixels are rescaled, float arrays kept as they are).
    mmap: return the ``.npy`` (or decoded-image cache) as a read-only ``np.memmap`` without
    reading it; ``KDEDenoiser`` streams such arrays from disk chunk by chunk.
    limit: keep ``limit`` items, a seeded random subset (``subset="random"``, ``seed``; rows in
    their original order) or the first ones (``subset="first"``).  With ``mmap`` a random subset
    is read into memory (``limit`` rows); the first rows stay a memmap.
    """
    if dtype not in ("float32", "uint8"):
        raise ValueError(f"dtype must be 'float32' or 'uint8', got {dtype!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    subset_rows(1, None, subset)                                     # check the name before any work
    if name_or_path == "digits":
        full = load_digits(dtype)
        rows = subset_rows(len(full), limit, subset, seed)
        return full if rows is None else full[torch.from_numpy(rows)]
    path = resolve(str(name_or_path))
    if path.suffix in (".npy", ".npz"):
        arr = _load_array(path, mmap)
    else:                                    # a first-rows subset decodes only those images
        arr = load_images(path, limit=limit if subset == "first" else None, progress=progress)
    if mmap and not isinstance(arr, np.memmap):
        raise ValueError(f"mmap=True needs a .npy file or an image archive, got {path.name}")
    rows = subset_rows(len(arr), limit, subset, seed)
    if rows is not None:
        arr = arr[:limit] if subset == "first" else arr[rows]
    return arr if mmap else _to_output(arr, dtype)
