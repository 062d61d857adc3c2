"""On-disk cache of GITS results, keyed by a hash of every search parameter and the fingerprint.

Folder: ``$GEOSAMPLE_CACHE/gits`` if that variable is set, else ``~/.cache/geosample/gits``.
Three kinds of entries: ``cost-<key>.pt`` (the averaged teacher cost matrix; shared by every step
count and gamma), ``target-<key>.pt`` (the teacher's samples from round 0's noise, the yardstick
of AFS and gamma selection; same key) and ``schedule-<key>.json`` (a finished
:class:`GITSSchedule`).  Writes are atomic.

Every entry carries its key and a sha256 of its content, and is checked when read: the hash, the
key, the structure, finiteness (the cost's upper triangle, the targets, the schedule's costs) and
a schedule's invariants (indices strictly increasing from 0 to ``teacher_steps``, sigmas equal to
the fine grid at the indices).  A missing entry is a plain miss; any other failure is a miss with
a :class:`CacheWarning`, and the caller recomputes the entry and writes it again.  Writing an
entry removes temporary files that killed writes left in the folder.
"""
from __future__ import annotations

import hashlib
import json
import math
import numbers
import warnings
from pathlib import Path

import torch

from .._io import atomic_write, cache_root, remove_stale_temps

from .schedule import GITSSchedule

__all__ = ["cache_dir", "key", "get_tensor", "put_tensor", "get_schedule", "put_schedule", "CacheWarning",
           "FORMAT"]

#: Entry format; entries of another format (e.g. the bare tensors of earlier versions) are misses.
FORMAT = 2


class CacheWarning(RuntimeWarning):
    """A cache entry was unreadable or invalid and is recomputed."""


class _Invalid(Exception):
    pass


def cache_dir() -> Path:
    return cache_root() / "gits"


def key(params: dict) -> str:
    """sha256 (first 32 hex digits) of the canonical JSON of ``params``."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _tensor_hash(t: torch.Tensor) -> str:
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _json_hash(d) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _miss(path: Path, why: str) -> None:
    warnings.warn(f"GITS cache entry {path} is invalid ({why}); recomputing it", CacheWarning, stacklevel=3)
    return None


def _check(ok: bool, why: str) -> None:
    if not ok:
        raise _Invalid(why)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _upper(c: torch.Tensor) -> torch.Tensor:
    """The strict upper triangle of a square matrix (the only part a cost matrix defines)."""
    return c[torch.ones_like(c, dtype=torch.bool).triu(1)]


def get_tensor(kind: str, k: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor | None:
    """The cached ``kind-<k>.pt`` tensor, or None: missing, or (with a :class:`CacheWarning`)
    unreadable, of another key, hash, shape or dtype, or not finite (for ``"cost"``: above the
    diagonal)."""
    path = cache_dir() / f"{kind}-{k}.pt"
    if not path.exists():
        return None
    try:
        entry = torch.load(path, weights_only=True)
    except Exception as e:  # torch.load fails on junk with almost any exception type
        return _miss(path, f"unreadable: {type(e).__name__}")
    try:
        _check(isinstance(entry, dict) and entry.get("format") == FORMAT, "not an entry of this version")
        t = entry.get("tensor")
        _check(isinstance(t, torch.Tensor) and entry.get("key") == k, "wrong structure or key")
        _check(t.shape == tuple(shape) and t.dtype == dtype,
               f"shape {tuple(t.shape)} {t.dtype}, expected {tuple(shape)} {dtype}")
        _check(entry.get("sha256") == _tensor_hash(t), "content hash mismatch")
        _check(_finite(_upper(t) if kind == "cost" else t), "non-finite values")
    except _Invalid as e:
        return _miss(path, str(e))
    return t


def _put(path: Path, write) -> None:
    """``atomic_write(path, write)``; a cache that cannot be written (``$GEOSAMPLE_CACHE`` a file, the
    entry's path a folder, a read-only disk) is a :class:`CacheWarning`, never a lost result."""
    try:
        remove_stale_temps(path.parent, legacy=True)
        atomic_write(path, write)
    except OSError as e:
        warnings.warn(f"GITS cache entry {path} cannot be written ({e.strerror or e}); the result is not cached",
                      CacheWarning, stacklevel=3)


def put_tensor(kind: str, k: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    entry = {"format": FORMAT, "key": k, "sha256": _tensor_hash(t), "tensor": t}
    _put(cache_dir() / f"{kind}-{k}.pt", lambda f: torch.save(entry, f))


def _valid_schedule(s: GITSSchedule) -> None:
    """The invariants of a searched schedule (raises _Invalid)."""
    idx = s.indices
    _check(all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in idx), "non-integer indices")
    teacher_steps = s.grid.get("teacher_steps")
    _check(isinstance(teacher_steps, int), "no teacher_steps")
    _check(s.cost_matrix.shape == (teacher_steps + 1, teacher_steps + 1), "cost matrix of the wrong shape")
    _check(_finite(_upper(s.cost_matrix)), "non-finite costs")
    _check(math.isfinite(s.cost) and all(math.isfinite(c) for c in s.step_costs), "non-finite path cost")
    try:
        grid = s.grid_sigmas
    except (KeyError, TypeError, ValueError) as e:
        raise _Invalid(f"bad grid: {e}") from None
    _check(len(idx) >= 2 and idx[0] == 0 and idx[-1] == grid.numel() - 1,
           f"indices must run from 0 to the grid's last point, got {idx[:3]}...{idx[-1:]}")
    _check(all(a < b for a, b in zip(idx, idx[1:])), "indices not strictly increasing")
    _check(s.sigmas.shape == (len(idx),) and torch.allclose(s.sigmas, grid[idx], rtol=1e-12, atol=0),
           "sigmas differ from the grid at the indices")


def get_schedule(k: str) -> GITSSchedule | None:
    """The cached schedule, or None: missing, or (with a :class:`CacheWarning`) unreadable, of
    another key or hash, or failing a schedule invariant."""
    path = cache_dir() / f"schedule-{k}.json"
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        return _miss(path, f"unreadable: {type(e).__name__}")
    try:
        entry = json.loads(text)
        _check(isinstance(entry, dict) and entry.get("format") == FORMAT, "not an entry of this version")
        _check(entry.get("key") == k and isinstance(entry.get("schedule"), dict), "wrong structure or key")
        _check(entry.get("sha256") == _json_hash(entry["schedule"]), "content hash mismatch")
        schedule = GITSSchedule.from_dict(entry["schedule"])
        _valid_schedule(schedule)
    except _Invalid as e:
        return _miss(path, str(e))
    except (ValueError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, RecursionError) as e:
        return _miss(path, f"malformed: {type(e).__name__}: {e}")
    return schedule


def put_schedule(k: str, schedule: GITSSchedule) -> None:
    d = schedule.to_dict()
    entry = {"format": FORMAT, "key": k, "sha256": _json_hash(d), "schedule": d}
    _put(cache_dir() / f"schedule-{k}.json", lambda f: f.write(json.dumps(entry).encode("utf-8")))
