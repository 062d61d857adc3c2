"""On-disk cache of GITS results, keyed by a hash of every search parameter and the fingerprint.

Folder: ``$GEOSAMPLE_CACHE/gits`` if that variable is set, else ``~/.cache/geosample/gits``.
Two kinds of entries: ``cost-<key>.pt`` (the averaged teacher cost matrix; shared by every step
count and gamma) and ``schedule-<key>.json`` (a finished :class:`GITSSchedule`).  Writes are
atomic; a corrupt or unreadable entry counts as a miss.
"""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import torch

from .._io import atomic_write, cache_root

from .schedule import GITSSchedule, load

__all__ = ["cache_dir", "key", "get_cost", "put_cost", "get_schedule", "put_schedule"]


def cache_dir() -> Path:
    return cache_root() / "gits"


def key(params: dict) -> str:
    """sha256 (first 32 hex digits) of the canonical JSON of ``params``."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def get_cost(k: str, n: int) -> torch.Tensor | None:
    """The cached float64 [n, n] cost matrix, or None (missing, unreadable or of the wrong shape)."""
    path = cache_dir() / f"cost-{k}.pt"
    try:
        cost = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError):
        return None
    ok = isinstance(cost, torch.Tensor) and cost.shape == (n, n) and cost.dtype == torch.float64
    return cost if ok else None


def put_cost(k: str, cost: torch.Tensor) -> None:
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"cost-{k}.pt", lambda f: torch.save(cost.detach().cpu(), f))


def get_schedule(k: str) -> GITSSchedule | None:
    try:
        return load(cache_dir() / f"schedule-{k}.json")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def put_schedule(k: str, schedule: GITSSchedule) -> None:
    schedule.save(cache_dir() / f"schedule-{k}.json")
