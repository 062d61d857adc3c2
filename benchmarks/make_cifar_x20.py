"""Build the N = 1,000,000 x 3072 uint8 benchmark dataset for bench_kde_index.py, outside the repo.

CIFAR-10's 50,000 training images x 20 seeded augmentations (copy 0 is the original; copy k > 0
is a horizontal flip with probability 1/2 and a circular shift by (dy, dx) in [-4, 4]^2, one draw
per image and copy from ``numpy.random.default_rng(k)``), written as a ``.npy`` memmap [N, 3, 32, 32].

    python benchmarks/make_cifar_x20.py [--out PATH] [--copies 20]

Input: /tmp/cifar_u8.npy ([50000, 3, 32, 32] uint8) when present, else ``gs.data.load_dataset("cifar10",
dtype="uint8")``.  Default output: $GEOSAMPLE_CACHE/bench/cifar10_x20_u8.npy.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def default_path() -> Path:
    from geosample._io import cache_root
    return cache_root() / "bench" / "cifar10_x20_u8.npy"


def load_cifar() -> np.ndarray:
    if os.path.exists("/tmp/cifar_u8.npy"):
        return np.load("/tmp/cifar_u8.npy", mmap_mode="r")
    import geosample as gs
    return np.asarray(gs.data.load_dataset("cifar10", dtype="uint8"))


def augment(x: np.ndarray, copy: int) -> np.ndarray:
    """Copy ``copy`` of the images x [n, 3, 32, 32]: identity for 0, else seeded flips and shifts."""
    if copy == 0:
        return np.asarray(x)
    rng = np.random.default_rng(copy)
    flip = rng.random(len(x)) < 0.5
    shift = rng.integers(-4, 5, size=(len(x), 2))
    out = np.where(flip[:, None, None, None], x[..., ::-1], x)
    for dy in range(-4, 5):                       # one roll per distinct shift
        for dx in range(-4, 5):
            sel = (shift[:, 0] == dy) & (shift[:, 1] == dx)
            out[sel] = np.roll(out[sel], (dy, dx), axis=(2, 3))
    return out


def build(out: Path, copies: int = 20) -> Path:
    x = load_cifar()
    n = len(x)
    if out.exists():
        y = np.load(out, mmap_mode="r")
        if y.shape == (n * copies,) + x.shape[1:] and y.dtype == np.uint8:
            return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial.npy")
    y = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n * copies,) + x.shape[1:])
    for k in range(copies):
        y[k * n:(k + 1) * n] = augment(x, k)
    y.flush()
    del y
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--copies", type=int, default=20)
    a = ap.parse_args()
    print(build(a.out or default_path(), a.copies))
