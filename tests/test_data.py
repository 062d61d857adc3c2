"""geosample.data: digits, image folders and tar files (cached), .npy/.npz, memmaps, cifar10."""
import io
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from geosample import data


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))


def images(n=5, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)


def test_digits():
    x = data.load_dataset("digits")
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() == -1 and x.max() == 1
    assert data.load_dataset("digits", dtype="uint8", limit=10).dtype == torch.uint8


def test_folder_and_tar_roundtrip(tmp_path):
    imgs = images()
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    with tarfile.open(tmp_path / "imgs.tar.gz", "w:gz") as tar:
        for i, im in enumerate(imgs[::-1]):                     # archive order != name order
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="PNG")
            info = tarfile.TarInfo(f"train/{4 - i:03d}.png")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    want = torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy())
    for src in (folder, tmp_path / "imgs.tar.gz"):
        q = data.load_dataset(src, dtype="uint8", progress=False)
        assert torch.equal(q, want)
        x = data.load_dataset(src, progress=False)
        assert torch.allclose(x, want.float() / 127.5 - 1, atol=1e-6)
        assert data.load_dataset(src, limit=2, progress=False).shape == (2, 3, 6, 5)
    assert len(list((tmp_path / "cache").glob("*.npy"))) >= 2
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_npy_npz_and_memmap(tmp_path):
    arr = np.random.default_rng(1).standard_normal((7, 2, 3)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    np.savez(tmp_path / "a.npz", arr)
    assert torch.equal(data.load_dataset(tmp_path / "a.npy"), torch.from_numpy(arr))
    assert torch.equal(data.load_dataset(tmp_path / "a.npz"), torch.from_numpy(arr))
    mm = data.load_dataset(tmp_path / "a.npy", mmap=True, limit=5, subset="first")
    assert isinstance(mm, np.memmap) and mm.shape == (5, 2, 3)


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.load_dataset(tmp_path / "missing")
    with pytest.raises(ValueError):
        data.load_dataset("digits", dtype="float16")
    with pytest.raises(ValueError):
        data.load_dataset("digits", limit=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError):
        data.load_dataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        os.environ["GEOSAMPLE_CIFAR10"] = str(tmp_path / "nope.tar.gz")
        try:
            data.resolve("cifar10")
        finally:
            del os.environ["GEOSAMPLE_CIFAR10"]


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data",
                                                    "cifar10", "train.tar.gz")), reason="no cifar10 archive")
def test_cifar10_subset_spans_the_classes():
    """The archive is sorted by class: its first 64 images are all airplanes."""
    x = data.load_dataset("cifar10", limit=64, progress=False)
    assert x.shape == (64, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
    rows = data.subset_rows(50_000, 64)
    assert len(set((rows // 5000).tolist())) >= 8                      # 5000 images per class folder
    full = data.load_images(data.resolve("cifar10"), progress=False)
    assert torch.equal(data.load_dataset("cifar10", dtype="uint8", limit=64, progress=False),
                       torch.from_numpy(full[rows]))


def test_limit_draws_a_seeded_random_subset(tmp_path):
    arr = np.arange(100 * 2, dtype=np.float32).reshape(100, 2)
    np.save(tmp_path / "a.npy", arr)
    a = data.load_dataset(tmp_path / "a.npy", limit=10)
    assert torch.equal(a, data.load_dataset(tmp_path / "a.npy", limit=10))          # seeded
    assert not torch.equal(a, torch.from_numpy(arr[:10]))
    assert (a[1:, 0] > a[:-1, 0]).all() and a[-1, 0] > 20                            # ascending rows, not a prefix
    assert not torch.equal(a, data.load_dataset(tmp_path / "a.npy", limit=10, seed=1))
    assert torch.equal(data.load_dataset(tmp_path / "a.npy", limit=10, subset="first"), torch.from_numpy(arr[:10]))
    mm = data.load_dataset(tmp_path / "a.npy", mmap=True, limit=10)
    assert torch.equal(torch.from_numpy(np.asarray(mm)), a)
    d = data.load_dataset("digits", limit=50)
    assert d.shape == (50, 1, 8, 8) and not torch.equal(d, data.load_dataset("digits", limit=50, subset="first"))
    assert data.subset_rows(5, 10) is None
    with pytest.raises(ValueError, match="subset"):
        data.load_dataset("digits", limit=5, subset="head")


def _write_folder(folder, imgs):
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{i:03d}.png")


def test_folder_cache_sees_edits_in_place_and_images_added_in_subfolders(tmp_path):
    """The decoded cache was keyed on the folder's own mtime: both were served stale, silently."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    imgs = images(4)
    _write_folder(folder, imgs)
    first = data.load_dataset(folder, dtype="uint8", progress=False)
    assert torch.equal(first, torch.from_numpy(imgs.transpose(0, 3, 1, 2).copy()))
    stamp = os.stat(folder)
    edited = images(1, seed=9)[0]
    Image.fromarray(edited).save(folder / "001.png")                    # same name, new pixels
    os.utime(folder, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))          # the folder itself looks unchanged
    again = data.load_dataset(folder, dtype="uint8", progress=False)
    assert torch.equal(again[1], torch.from_numpy(edited.transpose(2, 0, 1).copy()))
    (folder / "sub").mkdir()
    Image.fromarray(images(1, seed=3)[0]).save(folder / "sub" / "000.png")
    os.utime(folder, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert data.load_dataset(folder, dtype="uint8", progress=False).shape[0] == 5
    assert data.load_dataset(folder, dtype="uint8", limit=2, progress=False).shape[0] == 2


def test_damaged_decoded_cache_is_rebuilt_with_a_warning(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    imgs = images(3)
    _write_folder(folder, imgs)
    want = data.load_dataset(folder, dtype="uint8", progress=False)
    (cached,) = (tmp_path / "cache").glob("*.npy")
    for junk in (b"garbage", None):
        if junk is None:
            np.save(cached, np.zeros((2, 3, 6, 5), np.uint8))              # readable, wrong length
        else:
            cached.write_bytes(junk)
        with pytest.warns(data.DataCacheWarning):
            assert torch.equal(data.load_dataset(folder, dtype="uint8", progress=False), want)
        assert torch.equal(torch.from_numpy(np.load(cached)), want)        # rewritten


def test_tar_member_over_the_size_cap_is_refused_before_it_is_inflated(tmp_path):
    """A gzip bomb: one member declaring 1 TiB inflated until memory ran out."""
    info = tarfile.TarInfo("bomb.png")
    info.size = 1 << 40
    import gzip
    (tmp_path / "bomb.tar.gz").write_bytes(gzip.compress(info.tobuf() + b"\0" * 4096))
    with pytest.raises(ValueError, match="decompression bomb"):
        data.load_dataset(tmp_path / "bomb.tar.gz", progress=False)
    with tarfile.open(tmp_path / "small.tar", "w") as tar:
        blob = io.BytesIO()
        Image.fromarray(images(1)[0]).save(blob, format="PNG")
        member = tarfile.TarInfo("a.png")
        member.size = blob.tell()
        blob.seek(0)
        tar.addfile(member, blob)
    with pytest.raises(ValueError, match="max_member_bytes=10"):
        data.load_images(tmp_path / "small.tar", max_member_bytes=10, progress=False)
    assert data.load_images(tmp_path / "small.tar", progress=False).shape == (1, 3, 6, 5)


@pytest.mark.parametrize("mmap", [True, False])
def test_npy_shorter_than_its_header_is_refused_at_open(tmp_path, mmap):
    np.save(tmp_path / "a.npy", np.zeros((1000, 10), np.float32))
    os.truncate(tmp_path / "a.npy", 2000)
    with pytest.raises(ValueError, match=r"truncated: its header declares float32 \(1000, 10\)"):
        data.load_dataset(tmp_path / "a.npy", mmap=mmap)


def test_npz_picks_the_image_array_or_names_its_arrays(tmp_path):
    """The first key was taken: labels [N] gave a misleading shape error downstream."""
    imgs = images(4).transpose(0, 3, 1, 2)
    np.savez(tmp_path / "a.npz", labels=np.arange(4), images=imgs)
    assert torch.equal(data.load_dataset(tmp_path / "a.npz", dtype="uint8"), torch.from_numpy(imgs))
    np.savez(tmp_path / "b.npz", labels=np.arange(4), weights=np.ones(4))
    with pytest.raises(ValueError, match=r"labels \[4\], weights \[4\]"):
        data.load_dataset(tmp_path / "b.npz")


def test_archives_that_do_not_fit_in_memory_are_refused_up_front(tmp_path, monkeypatch):
    with tarfile.open(tmp_path / "a.tar", "w") as tar:
        for i in range(3):
            blob = io.BytesIO()
            Image.fromarray(images(1, seed=i)[0]).save(blob, format="PNG")
            member = tarfile.TarInfo(f"{i}.png")
            member.size = blob.tell()
            blob.seek(0)
            tar.addfile(member, blob)
    monkeypatch.setattr(data, "available_memory", lambda: 100)
    with pytest.raises(MemoryError, match="more than the 0.00 GiB available"):
        data.load_images(tmp_path / "a.tar", progress=False, cache=False)


def test_a_file_that_is_no_dataset_is_a_value_error(tmp_path):
    """--data README.md raised tarfile.ReadError (a traceback in the CLI); a truncated archive EOFError."""
    text = tmp_path / "README.md"
    text.write_text("# not images\n")
    with pytest.raises(ValueError, match="is not a dataset: expected a folder or tar"):
        data.load_dataset(str(text))
    good = tmp_path / "imgs.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        for i in range(20):
            blob = io.BytesIO()
            Image.fromarray(np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(blob, "PNG")
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(blob.getvalue())
            tar.addfile(info, io.BytesIO(blob.getvalue()))
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="damaged archive"):
        data.load_dataset(str(cut))


def _cifar_python_archive(path, batches, payload=None):
    """A tar.gz laid out like the official cifar-10-python.tar.gz (pickled dicts, protocol 2)."""
    import pickle
    with tarfile.open(path, "w:gz") as tar:
        for k, data in batches.items():
            blob = payload or pickle.dumps({b"batch_label": b"x", b"labels": [0] * len(data), b"data": data}, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/data_batch_{k}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_the_official_cifar10_python_archive(tmp_path, monkeypatch):
    """What a user downloads as CIFAR-10: data_batch_1..5 pickles of uint8 [N, 3072] (R, G, B planes)."""
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    batches = {k: rng.integers(0, 256, (4, 3072), dtype=np.uint8) for k in (2, 1)}
    _cifar_python_archive(tmp_path / "cifar-10-python.tar.gz", batches)
    monkeypatch.setenv("GEOSAMPLE_CIFAR10", str(tmp_path / "cifar-10-python.tar.gz"))
    got = data.load_dataset("cifar10", dtype="uint8", progress=False)
    want = np.concatenate([batches[1], batches[2]]).reshape(8, 3, 32, 32)
    np.testing.assert_array_equal(got.numpy(), want)


def test_a_hostile_pickle_in_a_cifar_archive_is_refused(tmp_path, monkeypatch):
    import pickle
    monkeypatch.setenv("GEOSAMPLE_CACHE", str(tmp_path / "cache"))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))
    _cifar_python_archive(tmp_path / "evil.tar.gz", {1: None}, payload=pickle.dumps(Evil(), protocol=2))
    with pytest.raises(ValueError, match="may not reference"):
        data.load_dataset(str(tmp_path / "evil.tar.gz"), progress=False)
    assert not (tmp_path / "pwned").exists()
