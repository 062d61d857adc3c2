"""``check_device``: a torch device that exists here, or a ValueError naming what is wrong."""
from __future__ import annotations

import torch

__all__ = ["check_device"]


def check_device(device) -> torch.device:
    """``device`` (a string such as "cpu", "cuda:1", or a torch.device) as a torch.device that this
    machine has: ValueError for an unknown device type, a backend torch was built without or that
    has no device here, or an index past the devices present."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use e.g. 'cpu' or 'cuda'") from None
    if dev.type == "cpu" or dev.type == "meta":
        return dev
    module = getattr(torch, dev.type, None)
    available = getattr(module, "is_available", None)
    if available is None or not available():
        raise ValueError(f"device {str(device)!r} is not available: this torch ({torch.__version__}) has no "
                         f"{dev.type} device here; use 'cpu'")
    count = getattr(module, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {str(device)!r} does not exist: {count} {dev.type} device(s) here")
    return dev
