"""Trained denoisers shipped with the package, loaded offline.

``load("cifar10-tiny")``: an EDM-preconditioned UNet trained on all of CIFAR-10 box-downsampled to
16x16 (benchmarks/train_cifar10_tiny.py; docs/models.md).  The weights are package data: their
sha256 is checked before they are read (``torch.load(weights_only=True)``), so a damaged install
(a flipped byte, NaN weights, a truncated or empty file) fails loudly instead of sampling wrong.
"""
from __future__ import annotations

import hashlib
import io
from importlib import resources

import torch

from .._device import check_device
from .unet import EDMDenoiser, UNet

__all__ = ["load", "available", "EDMDenoiser", "UNet"]

#: name -> (package file, its sha256)
_FILES = {"cifar10-tiny": ("cifar10_tiny.pt", "ea0da7bfea2aa92f339866669f63935a862f607753f70b99f0259da83f8bbbf1")}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def available() -> list[str]:
    """Names :func:`load` accepts."""
    return sorted(_FILES)


def _check_dtype(dtype) -> torch.dtype:
    """A floating torch.dtype, or its name ("float16", "torch.bfloat16", ...)."""
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype or one of {', '.join(_DTYPES)}, got {dtype!r}")
    return dtype


def _read_weights(name: str) -> dict:
    """The checked contents of a shipped weights file (ValueError when damaged)."""
    file, sha256 = _FILES[name]
    blob = resources.files(__name__).joinpath(file).read_bytes()
    if hashlib.sha256(blob).hexdigest() != sha256:
        raise ValueError(f"the weights of {name!r} ({file}, {len(blob)} bytes) are damaged: their sha256 differs "
                         "from the one shipped; reinstall geosample")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def load(name: str, device="cpu", dtype: torch.dtype | str = torch.float32) -> EDMDenoiser:
    """The named denoiser D(x, sigma) in eval mode, gradients off, on ``device`` in ``dtype``.

    It has ``shape`` (one sample's (C, H, W)), ``sigma_min``, ``sigma_max`` and ``sigma_data``.
    ValueError for an unknown name or device, or damaged weights; TypeError for a non-float dtype."""
    if name not in _FILES:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    device, dtype = check_device(device), _check_dtype(dtype)
    blob = _read_weights(name)
    model = EDMDenoiser(**blob["config"])
    model.load_state_dict({k: v.to(torch.float32) for k, v in blob["state_dict"].items()})
    model.meta = dict(blob.get("meta", {}))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
