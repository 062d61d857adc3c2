"""``search_threads``: one torch thread while the library's own loops make small denoiser calls.

On a CPU, a call on a few thousand values spends more on waking torch's worker threads than it
saves (on a busy 2-core machine a GITS search on the 8x8 digits took 66 s with torch's default
threads and 2.1 s with one); large calls (a network, a closed form over a big dataset) gain from
threads.  The rule: one thread when a batch of ``batch`` samples of ``shape`` holds fewer than
:data:`SMALL_CALL` values; the caller's setting is restored afterwards.
"""
from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["search_threads", "SMALL_CALL"]

#: Values per denoiser call (batch x sample size) below which one thread is faster.
SMALL_CALL = 16384


@contextlib.contextmanager
def search_threads(shape, batch: int):
    """One torch thread inside the block when ``batch`` samples of ``shape`` are a small call."""
    before = torch.get_num_threads()
    small = batch * math.prod(shape) < SMALL_CALL
    if small:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(before)
