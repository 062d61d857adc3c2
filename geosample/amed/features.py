"""What a learned AMED predictor sees of the state x_i: features of the evaluation D(x_i, t_i).

Kinds (``features=`` of :func:`geosample.amed.train`):

- ``"bottleneck"``: the network's lowest-resolution activations during that call, caught by a
  forward hook (the reference hooks the UNet's 8x8 block).  The module is found by
  :func:`find_bottleneck`: the denoiser's ``bottleneck`` attribute (``gs.models`` networks have
  one), else a wrapped model's (``.model``, ``.net``, ``.inner``; a diffusers UNet's ``mid_block``,
  so ``EpsDenoiser(unet, ...)`` works as is).  Any denoiser gains it by setting
  ``denoiser.bottleneck = some_module``.
- ``"denoised"``: D(x_i, t_i) itself, which every denoiser has.
- ``"none"``: no state features: the predictions depend on the interval only (one value per
  interval for every sample, what :meth:`Predictor.fixed` gives exactly).

Either tensor is reduced by :func:`pool`: [B, C, H, W] -> the channel mean, average-pooled to at
most 8x8 (the reference's 64 numbers); other shapes -> flattened, average-pooled to at most 64.
With AFS the first interval has no evaluation; its features are zeros (as in the reference).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

__all__ = ["FEATURES", "pool", "pooled_size", "find_bottleneck", "resolve", "FeatureSource"]

FEATURES = ("bottleneck", "denoised", "none")
SIDE = 8  # pooled side of an image feature map (the reference's 8x8)


def pool(t: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B, F] float32 (see the module docstring)."""
    t = t.detach().float()
    if t.dim() == 4:
        m = t.mean(1, keepdim=True)
        return F.adaptive_avg_pool2d(m, (min(m.shape[2], SIDE), min(m.shape[3], SIDE))).flatten(1)
    flat = t.flatten(1)
    if flat.shape[1] <= SIDE * SIDE:
        return flat
    return F.adaptive_avg_pool1d(flat[:, None], SIDE * SIDE)[:, 0]


def pooled_size(shape) -> int:
    """F of :func:`pool` for one sample of ``shape``."""
    return pool(torch.zeros((1, *shape))).shape[1]


def find_bottleneck(denoiser, depth: int = 3):
    """The module whose output is the bottleneck (see the module docstring), or None."""
    own = getattr(denoiser, "bottleneck", None)
    if isinstance(own, torch.nn.Module):
        return own
    mid = getattr(denoiser, "mid_block", None)
    if isinstance(mid, torch.nn.Module):
        return mid
    if depth > 0:
        for name in ("model", "net", "inner"):
            inner = getattr(denoiser, name, None)
            if inner is not None and inner is not denoiser:
                found = find_bottleneck(inner, depth - 1)
                if found is not None:
                    return found
    return None


def resolve(kind: str, denoiser) -> str:
    """``kind`` checked; "auto" is "bottleneck" when the denoiser exposes one, else "denoised"."""
    if kind == "auto":
        return "bottleneck" if find_bottleneck(denoiser) is not None else "denoised"
    if kind not in FEATURES:
        raise ValueError(f"features must be 'auto' or one of {', '.join(FEATURES)}, got {kind!r}")
    if kind == "bottleneck" and find_bottleneck(denoiser) is None:
        raise ValueError(f"features='bottleneck' needs a denoiser with a 'bottleneck' module (or a wrapped model's, "
                         f"e.g. a diffusers UNet's mid_block); {type(denoiser).__name__} has none. Set "
                         "denoiser.bottleneck = module, or use features='denoised'")
    return kind


class FeatureSource:
    """Features of the latest evaluation: ``source(D)`` -> [B, F] (None for "none").

    For "bottleneck" a forward hook on the module keeps its latest output from ``open()`` until
    ``close()``; a classifier-free-guidance batch of 2B rows ([uncond; cond]) gives the cond half.
    """

    def __init__(self, kind: str, denoiser=None):
        self.kind = kind
        self.module = find_bottleneck(denoiser) if kind == "bottleneck" else None
        if kind == "bottleneck" and self.module is None:
            resolve(kind, denoiser)  # raises, naming the problem
        self.latest = None
        self._hook = None

    def open(self) -> "FeatureSource":
        if self.module is not None and self._hook is None:
            self._hook = self.module.register_forward_hook(self._keep)
        return self

    def _keep(self, module, inputs, output):
        self.latest = output[0] if isinstance(output, (tuple, list)) else output

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.latest = None

    def __call__(self, denoised: torch.Tensor) -> torch.Tensor | None:
        if self.kind == "none":
            return None
        if self.kind == "denoised":
            return pool(denoised)
        if self.latest is None:
            raise RuntimeError("the bottleneck hook saw no call; was the denoiser evaluated through this module?")
        b = denoised.shape[0]
        t = self.latest
        if t.shape[0] == 2 * b:
            t = t[b:]
        if t.shape[0] != b:
            raise ValueError(f"the bottleneck has {t.shape[0]} rows for a batch of {b}")
        return pool(t)
