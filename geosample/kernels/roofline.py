"""Static performance model of the Triton kernels at the shapes the GPU benchmarks use, against
the H100 (SXM) and H200 rooflines: what a GPU run should be judged against.

Per kernel call: ``bytes_min`` moves every tensor once (perfect cache reuse), ``bytes_streamed``
counts every load a program issues (no reuse across programs; L2 serves the difference), ``flops``
counts the arithmetic (FMA = 2).  The bound is max(bytes_min / HBM bandwidth, flops / peak): no
kernel can beat it; a measured time within ~1.5x of it is good.  Block sizes are the launchers'
(:mod:`geosample.kernels.configs`), so the model follows them.
"""
from __future__ import annotations

from dataclasses import dataclass

from .configs import FUSED_BB, KDE_BD, STEP_MAX_ORDER, cdiv, cost_block_t, fused_tiles, kde_query_block

__all__ = ["GPUS", "Call", "calls", "format_model"]

# HBM bytes/s and peak FLOP/s: fp32 and fp64 on the CUDA cores, bf16 dense on tensor cores
GPUS = {"H100": {"hbm": 3.35e12, "fp32": 67e12, "fp64": 34e12, "bf16": 989e12},
        "H200": {"hbm": 4.8e12, "fp32": 67e12, "fp64": 34e12, "bf16": 989e12}}


@dataclass(frozen=True)
class Call:
    """One kernel launch at one benchmark shape; ``peak`` names the arithmetic it runs on."""
    kernel: str
    shape: str
    bytes_min: float
    bytes_streamed: float
    flops: float
    peak: str = "fp32"

    def bound_us(self, gpu: str) -> tuple[float, str]:
        """(lower bound on the time in microseconds, "memory" or "compute")."""
        g = GPUS[gpu]
        mem, comp = self.bytes_min / g["hbm"], self.flops / g[self.peak]
        return 1e6 * max(mem, comp), ("memory" if mem >= comp else "compute")


def _step(numel: int, order: int, new: str, shape: str) -> Call:
    """Fused solver step, float32: reads x, D (new entry) and the older rows, writes out and the new row."""
    rows = order - 1 if new != "none" else order
    moved = 4 * numel * (1 + rows + (2 if new != "none" else 0) + 1)
    flops = numel * (1 + 2 * order + {"direction": 2, "denoised": 0, "none": 0}[new])
    return Call("solver_step", f"{shape} order={order} {new}", moved, moved, flops)


def _cost(b: int, d: int, t: int) -> list[Call]:
    """GITS pair (l2) and moment kernels, float32 trajectory x [T, B, D], den [T-1, B, D]."""
    pairs = t * (t - 1) // 2
    inputs = 4 * b * d * (2 * t - 1)
    block_t = cost_block_t(t)
    programs = b * sum(cdiv(t, block_t) - (i + 1) // block_t for i in range(t - 1))          # with some j > i
    pair = Call("gits _pair_kernel", f"B={b} D={d} T={t}", inputs + 8 * b * t * t,
                4 * b * d * pairs + 8 * d * programs, 5 * b * d * pairs + 2 * b * d * (t - 1))
    moment = Call("gits _moment_kernel", f"B={b} D={d} T={t}", inputs + 40 * b * t,
                  4 * b * d * (4 * t - 1), 14 * b * d * t)
    return [pair, moment]


def _kde(n: int, d: int, b: int) -> list[Call]:
    """KDE kernels at float32 storage, exact precision (ieee float32 dots on the CUDA cores)."""
    shape = f"N={n} D={d} B={b}"
    data = 4 * n * d
    if d <= 256:                                        # fused: both dots per tile, Y once per query block
        blocks = cdiv(b, FUSED_BB)
        bd, _ = fused_tiles(d)
        return [Call("kde _fused_kernel", shape, data + 4 * n + 4 * b * d, blocks * (data + 4 * n), 4 * b * n * bd)]
    blocks = cdiv(b, kde_query_block(b))
    logits = 4 * b * n
    return [Call("kde _logits_kernel", shape, data + logits, blocks * data + logits, 2 * b * n * d),
            Call("kde _wsum_kernel", shape, data + logits + 4 * b * d,
                 blocks * data + cdiv(d, KDE_BD) * logits, 2 * b * n * d)]


def calls() -> list[Call]:
    """Every modelled launch at the benchmarks' CUDA shapes (benchmarks/bench_*.py, full size)."""
    out = []
    for shape, numel in (("3x64x64 B=256", 256 * 3 * 64 * 64), ("4x128x128 B=64", 64 * 4 * 128 * 128)):
        out += [_step(numel, STEP_MAX_ORDER, "direction", shape), _step(numel, 3, "denoised", shape)]
    out += _cost(64, 3072, 61)
    for n, d in ((1_000_000, 64), (50_000, 3072)):
        for b in (16, 256):
            out += _kde(n, d, b)
    return out


def format_model() -> str:
    """The model as a table: traffic, flops, and the H100 / H200 bounds per call."""
    head = f"{'kernel':20} {'shape':34} {'MB min':>8} {'MB strm':>8} {'GFLOP':>7} {'H100 us':>11} {'H200 us':>11}"
    lines = ["Roofline model: lower bounds per call (float32, exact precision; m = memory-, c = compute-bound)",
             head, "-" * len(head)]
    for c in calls():
        bounds = [c.bound_us(gpu) for gpu in ("H100", "H200")]
        lines.append(f"{c.kernel:20} {c.shape:34} {c.bytes_min / 1e6:8.1f} {c.bytes_streamed / 1e6:8.1f} "
                     f"{c.flops / 1e9:7.2f} " + " ".join(f"{us:9.1f} {kind[0]}" for us, kind in bounds))
    return "\n".join(lines)
