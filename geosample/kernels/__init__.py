"""Triton kernels, imported lazily: nothing here is needed (or imported) on CPU-only installs."""
from __future__ import annotations

import functools
import os

__all__ = ["triton_available", "fused_update"]


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports and can run: a CUDA device, or ``TRITON_INTERPRET=1`` (CPU interpreter)."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def fused_update(*args):
    """The CUDA solver update (:func:`geosample.kernels.solver_step.fused_update`), importing
    Triton only on first use."""
    from .solver_step import fused_update as update
    return update(*args)
