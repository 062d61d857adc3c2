"""Atomic writes: whole files or none, the umask left alone, killed writes cleaned up."""
import os
import stat
import subprocess
import sys
import time

import pytest

from geosample import _io


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_atomic_write_never_touches_the_umask(tmp_path, monkeypatch):
    """It used to set the umask to 0 for a moment: other threads' files came out world-writable."""
    calls = []
    monkeypatch.setattr(os, "umask", lambda *a: calls.append(a))
    _io.atomic_write_text(tmp_path / "a.txt", "x")
    assert calls == []


def test_new_file_gets_the_umask_mode_and_overwrite_keeps_the_mode(tmp_path, umask_027):
    target = tmp_path / "a.txt"
    _io.atomic_write_text(target, "one")
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    target.chmod(0o600)
    _io.atomic_write_text(target, "two")
    assert target.read_text() == "two" and stat.S_IMODE(target.stat().st_mode) == 0o600


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    _io.atomic_write_text(target, "old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        _io.atomic_write(target, boom)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_temps_of_killed_writes_are_removed_by_the_next_write(tmp_path):
    """A write killed by SIGKILL left its .tmp file forever."""
    code = ("import os, sys; from geosample import _io\n"
            "_io.atomic_write(sys.argv[1], lambda f: (f.write(b'x'), f.flush(), os.kill(os.getpid(), 9)))")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a.bin")])
    assert proc.returncode == -9
    (dead,) = tmp_path.iterdir()
    assert dead.name.startswith(".a.bin.") and dead.name.endswith(".tmp")
    live = tmp_path / f".b.bin.{os.getpid()}@{_io._HOST}.{'0' * 16}.tmp"   # a write in progress here
    other = tmp_path / ".c.tmp"                                          # not ours: never touched
    live.write_bytes(b"")
    other.write_bytes(b"")
    _io.atomic_write_text(tmp_path / "d.txt", "y")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, "d.txt"])


def test_old_temps_from_other_hosts_are_removed(tmp_path):
    old = tmp_path / f".a.bin.1@elsewhere.{'1' * 16}.tmp"
    new = tmp_path / f".b.bin.1@elsewhere.{'2' * 16}.tmp"
    old.write_bytes(b"")
    new.write_bytes(b"")
    past = time.time() - _io.STALE_AFTER_S - 10
    os.utime(old, (past, past))
    assert _io.remove_stale_temps(tmp_path) == [old]
    assert new.exists()


def test_legacy_temps_are_removed_only_where_asked(tmp_path):
    """Temporary files of earlier versions (tempfile.mkstemp names) in a cache folder."""
    legacy = tmp_path / ".cost-abc.pt-k2j4_x9q.tmp"
    legacy.write_bytes(b"")
    past = time.time() - _io.STALE_AFTER_S - 10
    os.utime(legacy, (past, past))
    assert _io.remove_stale_temps(tmp_path) == [] and legacy.exists()
    assert _io.remove_stale_temps(tmp_path, legacy=True) == [legacy]


def test_gits_cache_write_cleans_its_folder(tmp_path, monkeypatch):
    import torch
    from geosample.gits import cache

    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path))
    cache.cache_dir().mkdir(parents=True)
    legacy = cache.cache_dir() / ".cost-k.pt-abcdefgh.tmp"
    legacy.write_bytes(b"half a tensor")
    past = time.time() - _io.STALE_AFTER_S - 10
    os.utime(legacy, (past, past))
    cache.put_tensor("cost", "k", torch.zeros(2, 2, dtype=torch.float64))
    assert [p.name for p in cache.cache_dir().iterdir()] == ["cost-k.pt"]
