"""On-disk cache of GITS results, keyed by a hash of every search parameter and the fingerprint.

Folder: ``$GEOSAMPLE_CACHE/gits`` if that variable is set, else ``~/.cache/geosample/gits``.
Three kinds of entries: ``cost-<key>.pt`` (the averaged teacher cost matrix; shared by every step
count and gamma), ``target-<key>.pt`` (the teacher's samples from round 0's noise, the yardstick
of AFS and gamma selection; same key) and ``schedule-<key>.json`` (a finished
:class:`GITSSchedule`).  Writes are atomic; a corrupt or unreadable entry counts as a miss.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch

from .._io import atomic_write, cache_root

from .schedule import GITSSchedule, load

__all__ = ["cache_dir", "key", "get_tensor", "put_tensor", "get_schedule", "put_schedule"]


def cache_dir() -> Path:
    return cache_root() / "gits"


def key(params: dict) -> str:
    """sha256 (first 32 hex digits) of the canonical JSON of ``params``."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def get_tensor(kind: str, k: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor | None:
    """The cached ``kind-<k>.pt`` tensor, or None (missing, unreadable, or of another shape/dtype)."""
    try:
        t = torch.load(cache_dir() / f"{kind}-{k}.pt", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError):
        return None
    ok = isinstance(t, torch.Tensor) and t.shape == tuple(shape) and t.dtype == dtype
    return t if ok else None


def put_tensor(kind: str, k: str, t: torch.Tensor) -> None:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"{kind}-{k}.pt", lambda f: torch.save(t.detach().cpu(), f))


def get_schedule(k: str) -> GITSSchedule | None:
    try:
        return load(cache_dir() / f"schedule-{k}.json")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def put_schedule(k: str, schedule: GITSSchedule) -> None:
    schedule.save(cache_dir() / f"schedule-{k}.json")
