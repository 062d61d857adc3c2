"""Atomic file writes: every output file appears whole or not at all.

A write goes to a temporary file ``.<name>.<pid>@<host>.<random>.tmp`` next to the target, which is
then renamed over it.  A process killed mid-write leaves its temporary file behind; the next write
into the same folder removes the temporary files of processes that no longer exist on this host
(and any older than :data:`STALE_AFTER_S`, whoever wrote them).  The process umask is never
touched: the temporary file is created with mode 0666 and the kernel applies the umask (or the
folder's default ACL) exactly as for a plain ``open(path, "w")``; overwriting keeps the old file's
mode, again as a plain overwrite would.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import secrets
import socket
import stat
import time
from pathlib import Path
from typing import Callable, IO

__all__ = ["cache_root", "atomic_write", "atomic_write_text", "remove_stale_temps", "STALE_AFTER_S",
           "check_out_dir", "check_out_file", "publish_run", "read_run", "MANIFEST", "run_id", "json_bytes",
           "versions"]

#: The file naming one run's outputs (see :func:`publish_run`).
MANIFEST = "manifest.json"

#: Temporary files older than this are removed whatever process wrote them (a write on another host
#: sharing the folder cannot be checked for liveness).
STALE_AFTER_S = 24 * 3600.0
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\..+\.(\d+)@([A-Za-z0-9_-]+)\.[0-9a-f]{16}\.tmp$")
_LEGACY_TEMP = re.compile(r"^\..+-[a-z0-9_]{8}\.tmp$")   # tempfile.mkstemp names of geosample <= 0.1


def cache_root() -> Path:
    """Where geosample caches decoded datasets and GITS results: ``$GEOSAMPLE_CACHE`` or
    ``~/.cache/geosample``."""
    return Path(os.environ.get("GEOSAMPLE_CACHE") or Path.home() / ".cache" / "geosample")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder, legacy: bool = False) -> list[Path]:
    """Delete the temporary files of killed writes in ``folder``; returns what was removed.

    Stale: written on this host by a process that no longer exists, or older than
    :data:`STALE_AFTER_S`.  Only names of the form ``.<name>.<pid>@<host>.<hex16>.tmp`` are
    considered, so no other file is ever touched.  ``legacy`` (for folders only geosample writes
    into, its caches): also ``.<name>-<8 chars>.tmp`` files of earlier versions older than
    :data:`STALE_AFTER_S`."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP.match(entry.name)
        if m is None and not (legacy and _LEGACY_TEMP.match(entry.name)):
            continue
        try:
            old = now - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
            if old or (m is not None and m.group(2) == _HOST and not _alive(int(m.group(1)))):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:  # removed meanwhile by another cleaner, or not ours to remove
            continue
    return removed


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new file next to ``path``, opened for writing with mode 0666 (the kernel applies the
    umask); O_EXCL makes the name ours alone."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}@{_HOST}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue


def atomic_write(path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(f)`` on a temporary binary file next to ``path``, then rename it into place.

    The folder is created if needed.  A new file gets the usual permissions (0666 & ~umask, applied
    by the kernel); an existing one keeps its mode.  Stale temporary files of killed writes in the
    folder are removed first (:func:`remove_stale_temps`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode))
            except FileNotFoundError:
                pass
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


def check_out_dir(path) -> Path:
    """Prove before the work starts that the output folder ``path`` can be written, creating
    nothing: ``path`` (or, when it does not exist yet, its nearest existing parent, under which it
    will be created at publication) must be a folder that takes a probe file.  So a bad ``--out``
    fails at once and a run that fails or is interrupted before publishing leaves no empty folder.
    ValueError naming the problem otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"output folder {path} exists and is not a folder")
    base = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not base.is_dir():
        raise ValueError(f"cannot create output folder {path}: {base} is not a folder")
    try:
        fd, probe = _create_temp(base / "probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"cannot write into {'output folder ' if base == path.absolute() else ''}{base}"
                         f"{'' if base == path.absolute() else f' (to create {path})'}: {e.strerror or e}") from None
    return path


def check_out_file(path) -> Path:
    """Check before the work starts that ``path`` can be written: not a folder, in a folder that
    exists or can be created (see :func:`check_out_dir`; nothing is created)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"output file {path} is a folder")
    check_out_dir(path.parent)
    return path


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def run_id() -> str:
    """A new run's name: UTC time and 8 random hex digits."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def json_bytes(obj) -> bytes:
    """``obj`` as indented UTF-8 JSON, the form of a run's .json files."""
    return json.dumps(obj, indent=1).encode("utf-8")


def versions() -> dict:
    """What a run report records about its software and machine."""
    import torch

    from ._version import __version__
    return {"geosample": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "torch_threads": torch.get_num_threads()}


def publish_run(folder, files: dict[str, bytes], run: dict | None = None) -> Path:
    """Publish one run's output files into ``folder`` as a set, with a manifest naming them.

    Every file is first written whole to a temporary file; then the old :data:`MANIFEST` is
    removed, the files are renamed into place, and the new manifest (``run`` plus each file's
    size and sha256) is written last.  So a manifest always describes the files next to it: a run
    killed before publishing leaves the previous set untouched, one killed while renaming leaves
    no manifest.  Returns the manifest's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder)
    staged = []
    try:
        for name, blob in files.items():
            fd, tmp = _create_temp(folder / name)
            staged.append((tmp, folder / name))
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
        (folder / MANIFEST).unlink(missing_ok=True)
        for tmp, target in staged:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in staged:
            if tmp.exists():
                tmp.unlink()
        raise
    manifest = {**(run or {}), "files": {n: {"bytes": len(b), "sha256": _sha256(b)} for n, b in files.items()}}
    return atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))


def read_run(folder) -> dict:
    """The manifest of the run published in ``folder``, after checking that every file it names is
    there with its recorded size and sha256; ValueError when the set is incomplete or mixed."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder} holds no complete run ({MANIFEST}: {e})") from None
    for name, meta in manifest.get("files", {}).items():
        try:
            blob = (folder / name).read_bytes()
        except OSError:
            raise ValueError(f"{folder}: {name} of run {manifest.get('run')} is missing") from None
        if len(blob) != meta["bytes"] or _sha256(blob) != meta["sha256"]:
            raise ValueError(f"{folder}: {name} is not the one run {manifest.get('run')} wrote")
    return manifest
