"""Atomic file writes: every output file appears whole or not at all."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def cache_root() -> Path:
    """Where geosample caches decoded datasets and GITS results: ``$GEOSAMPLE_CACHE`` or
    ``~/.cache/geosample``."""
    return Path(os.environ.get("GEOSAMPLE_CACHE") or Path.home() / ".cache" / "geosample")


def atomic_write(path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then rename it into place.

    The folder is created if needed; the file gets the usual permissions (0666 & ~umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))
