"""Triton kernels, imported lazily: nothing here is needed (or imported) on CPU-only installs.

Every launch goes through :func:`run_with_fallback`: a kernel that fails to compile or launch on
the user's device warns once and that kernel's torch path is used from then on (set
``GEOSAMPLE_STRICT_TRITON=1`` to make the failure an error instead, as the GPU checks do).
"""
from __future__ import annotations

import functools
import os
import warnings

__all__ = ["triton_available", "fused_update", "run_with_fallback", "fallback_kernels", "STRICT_ENV"]

STRICT_ENV = "GEOSAMPLE_STRICT_TRITON"
_FAILED: dict[str, str] = {}   # kernel name -> the error that sent it to the torch path


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


def fallback_kernels() -> dict[str, str]:
    """The kernels now on their torch path, name -> the error that put them there."""
    return dict(_FAILED)


def _is_kernel_failure(e: Exception) -> bool:
    """A compile or launch failure of the kernel, not bad input (ValueError / TypeError from the
    launchers' checks) nor running out of device memory (the torch path would too)."""
    if isinstance(e, (ValueError, TypeError)):
        return False
    import torch
    return not isinstance(e, torch.cuda.OutOfMemoryError)


def run_with_fallback(name: str, triton_fn, torch_fn, *args, **kwargs):
    """``triton_fn(*args, **kwargs)``, or ``torch_fn(*args, **kwargs)`` once the Triton kernel
    ``name`` has failed to compile or launch: the first failure warns (RuntimeWarning) and every
    later call of ``name`` goes straight to ``torch_fn``.  With ``GEOSAMPLE_STRICT_TRITON=1`` the
    failure is raised as a RuntimeError instead.  Bad input is never caught: ValueError and
    TypeError propagate from either path."""
    if name not in _FAILED:
        try:
            return triton_fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 -- filtered by _is_kernel_failure
            if not _is_kernel_failure(e):
                raise
            error = f"{type(e).__name__}: {e}"
            if os.environ.get(STRICT_ENV) == "1":
                raise RuntimeError(f"Triton kernel {name!r} failed ({STRICT_ENV}=1): {error}") from e
            _FAILED[name] = error
            warnings.warn(f"Triton kernel {name!r} failed, using its torch path from now on: {error}",
                          RuntimeWarning, stacklevel=2)
    return torch_fn(*args, **kwargs)
