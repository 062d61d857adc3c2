"""The streaming (online) softmax state shared by the closed-form denoiser's CPU and Triton paths.

Over a range of data rows with logits l_j (one row of logits per query), relative to the running
max m [B]:

    z = sum_j e^{l_j - m} [B] (float64),  z2 = sum_j e^{2 (l_j - m)} [B] (float64),
    s = sum_j e^{l_j - m} y_j [B, D] (float32),  top_v / top_i [B, k]: the k largest logits.

Weights below ``WEIGHT_FLOOR`` = e^{-SKIP} (l < m - 43) are exactly zero, so no subnormal ever
reaches a GEMM (a subnormal operand runs ~170x slower in x86 sgemm) and their squares (for z2) stay
normal floats; the mass dropped is below N e^{-43} = N 2.1e-19 of the total (1e-14 at N = 50,000).
Tiles whose every logit is below m - SKIP are skipped outright, for the same reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Partial", "merge", "SKIP", "WEIGHT_FLOOR", "flush", "exp_weights"]

SKIP = 43.0                       # logits this far below the running max get weight exactly 0
WEIGHT_FLOOR = math.exp(-SKIP)    # 2.1e-19 > sqrt(FLT_MIN): kept weights and their squares are normal


def flush(w: torch.Tensor) -> torch.Tensor:
    """w with every entry below WEIGHT_FLOOR set to 0, in place (never a subnormal GEMM operand)."""
    return torch.threshold_(w, WEIGHT_FLOOR, 0.0)


def exp_weights(d: torch.Tensor) -> torch.Tensor:
    """flush(e^d) in place for logit differences d <= 0.  The argument is clamped first: an exp
    whose result is subnormal runs ~400x slower than a normal one on x86."""
    return flush(d.clamp_(min=-SKIP - 1.0).exp_())


@dataclass
class Partial:
    """Streaming state over a range of the data (see the module docstring)."""
    m: torch.Tensor
    z: torch.Tensor
    z2: torch.Tensor
    s: torch.Tensor
    top_v: torch.Tensor
    top_i: torch.Tensor


def merge(parts: list[Partial], k: int) -> Partial:
    """Log-sum-exp merge of streaming states over disjoint ranges of the data."""
    m = torch.stack([p.m for p in parts]).amax(0)
    k = min(k, sum(p.top_v.shape[1] for p in parts))
    z = z2 = s = 0
    for p in parts:
        a = exp_weights((p.m - m).nan_to_num_(-math.inf))        # empty ranges have m = -inf
        z, z2 = z + a.double() * p.z, z2 + (a.double() ** 2) * p.z2
        s = s + a[:, None] * p.s
    top_v, j = torch.cat([p.top_v for p in parts], 1).topk(k, dim=1)
    top_i = torch.cat([p.top_i for p in parts], 1).gather(1, j)
    return Partial(m, z, z2, s, top_v, top_i)
