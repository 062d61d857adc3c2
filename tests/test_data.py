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
    mm = data.load_dataset(tmp_path / "a.npy", mmap=True, limit=5)
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
def test_cifar10_prefix():
    x = data.load_dataset("cifar10", limit=64, progress=False)
    assert x.shape == (64, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
