"""Trained denoisers shipped with the package, loaded offline.

``load("cifar10-tiny")``: an EDM-preconditioned UNet trained on all of CIFAR-10 box-downsampled to
16x16 (benchmarks/train_cifar10_tiny.py; docs/models.md).  The weights are package data, read with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from importlib import resources

import torch

from .unet import EDMDenoiser, UNet

__all__ = ["load", "available", "EDMDenoiser", "UNet"]

_FILES = {"cifar10-tiny": "cifar10_tiny.pt"}


def available() -> list[str]:
    """Names :func:`load` accepts."""
    return sorted(_FILES)


def load(name: str, device="cpu", dtype: torch.dtype = torch.float32) -> EDMDenoiser:
    """The named denoiser D(x, sigma) in eval mode, gradients off, on ``device`` in ``dtype``.

    It has ``shape`` (one sample's (C, H, W)), ``sigma_min``, ``sigma_max`` and ``sigma_data``."""
    if name not in _FILES:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available())}")
    with resources.files(__name__).joinpath(_FILES[name]).open("rb") as f:
        blob = torch.load(f, map_location="cpu", weights_only=True)
    model = EDMDenoiser(**blob["config"])
    model.load_state_dict({k: v.to(torch.float32) for k, v in blob["state_dict"].items()})
    model.meta = dict(blob.get("meta", {}))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)
