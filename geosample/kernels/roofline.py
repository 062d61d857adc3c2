"""Static performance model of the Triton kernels at the shapes the GPU benchmarks use, against
the H100 (SXM) and H200 rooflines: what a GPU run should be judged against.

    python -m geosample.kernels.roofline ROWS.json [ROWS.json ...] [--markdown FILE]

prints (and writes) the KDE launch model from compile-check rows (``compile_check --json``), per
Triton release: registers, occupancy and predicted time of each KDE launch at the benchmark shapes.

Per kernel call: ``bytes_min`` moves every tensor once (perfect cache reuse), ``bytes_streamed``
counts every load a program issues (no reuse across programs; L2 serves the difference), ``flops``
counts the arithmetic (FMA = 2).  The bound is max(bytes_min / HBM bandwidth, flops / peak): no
kernel can beat it; a measured time within ~1.5x of it is good.  Block sizes are the launchers'
(:mod:`geosample.kernels.configs`), so the model follows them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

from .configs import (FUSED_BB, FUSED_MIN_TILES, FUSED_PROGRAMS, KDE_BD, KDE_BN, KDE_PRECISION, STEP_MAX_ORDER,
                      cdiv, cost_block_t, fused_tiles, kde_query_block, top_k_width)

__all__ = ["GPUS", "Call", "calls", "format_model", "SM", "blocks_per_sm", "Launch", "kde_launches", "kde_model",
           "format_kde_model"]

# HBM bytes/s and peak FLOP/s: fp32 and fp64 on the CUDA cores, bf16 dense on tensor cores
GPUS = {"H100": {"hbm": 3.35e12, "fp32": 67e12, "fp64": 34e12, "bf16": 989e12},
        "H200": {"hbm": 4.8e12, "fp32": 67e12, "fp64": 34e12, "bf16": 989e12},
        "A100": {"hbm": 2.04e12, "fp32": 19.5e12, "fp64": 9.7e12, "bf16": 312e12}}


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


def _kde(n: int, d: int, b: int, peak: str = "fp32") -> list[Call]:
    """KDE kernels at float32 storage: exact precision (ieee float32 dots on the CUDA cores, ``peak``
    "fp32") or fast ("bf16": tensor cores)."""
    shape = f"N={n} D={d} B={b}"
    data = 4 * n * d
    if d <= 256:                                        # fused: both dots per tile, Y once per query block
        blocks = cdiv(b, FUSED_BB)
        bd, _ = fused_tiles(d)
        return [Call("kde _fused_kernel", shape, data + 4 * n + 4 * b * d, blocks * (data + 4 * n), 4 * b * n * bd,
                     peak)]
    blocks = cdiv(b, kde_query_block(b))
    logits = 4 * b * n
    return [Call("kde _logits_kernel", shape, data + logits, blocks * data + logits, 2 * b * n * d, peak),
            Call("kde _wsum_kernel", shape, data + logits + 4 * b * d,
                 blocks * data + cdiv(d, KDE_BD) * logits, 2 * b * n * d, peak)]


KDE_SHAPES = ((1_000_000, 64), (50_000, 3072))    # (N, D) of the GPU benchmarks, at B = 16 and 256
KDE_BATCHES = (16, 256)


def calls() -> list[Call]:
    """Every modelled launch at the benchmarks' CUDA shapes (benchmarks/bench_*.py, full size)."""
    out = []
    for shape, numel in (("3x64x64 B=256", 256 * 3 * 64 * 64), ("4x128x128 B=64", 64 * 4 * 128 * 128)):
        out += [_step(numel, STEP_MAX_ORDER, "direction", shape), _step(numel, 3, "denoised", shape)]
    out += _cost(64, 3072, 61)
    for n, d in KDE_SHAPES:
        for b in KDE_BATCHES:
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


# --- occupancy and predicted time of the KDE launches, per Triton release ---------------------------
# Per SM (sm_80 and sm_90 alike): 65,536 registers, allocated per warp in units of 256 (a thread's
# count rounded up to 8), at most 64 resident warps and 32 blocks; shared memory per SM for blocks
# (1 KiB of it reserved per block).  Modelled GPU per target: its name in GPUS, SMs, shared bytes.
SM = {"sm_80": ("A100", 108, 164 * 1024), "sm_90": ("H100", 132, 228 * 1024)}
HIDE_WARPS = 16   # the model's assumption: 16 resident warps per SM (4 per scheduler) hide the latencies


def blocks_per_sm(regs: int, warps: int, shared: int, target: str) -> int:
    """Resident blocks per SM of a kernel with ``regs`` registers per thread, ``warps`` warps per
    block and ``shared`` bytes of shared memory, by the register, warp, block and shared limits."""
    warp_regs = cdiv(regs * 32, 256) * 256
    by_regs = (65536 // warp_regs) // warps
    by_shared = SM[target][2] // (shared + 1024)
    return min(32, 64 // warps, by_regs, by_shared)


@dataclass(frozen=True)
class Launch:
    """One KDE kernel launch at a benchmark shape: the modelled call, the compile-check kernel name
    and variant (float32 storage; benchmark shapes are multiples of 16: ints=div16) and its grid."""
    call: Call
    kernel: str
    config: dict
    programs: int


def kde_launches() -> list[Launch]:
    """The KDE launches at the benchmark shapes, exact and fast precision, as the launchers choose
    them (:mod:`geosample.kernels.kde_triton`; the default refine_k = 16; the GPU range of rows
    max(chunk_size, 2^26 / B) per launch)."""
    out = []
    for (n, d), b in ((s, b) for s in KDE_SHAPES for b in KDE_BATCHES):
        rows = min(n, max(1024, (1 << 26) // b))
        for precision, fast in KDE_PRECISION.items():
            calls = _kde(n, d, b, "bf16" if fast else "fp32")
            base = {"storage": "fp32", "precision": precision}
            if d <= 256:
                bd, bn = fused_tiles(d)
                tiles, blocks = cdiv(rows, bn), cdiv(b, FUSED_BB)
                per = max(FUSED_MIN_TILES, cdiv(tiles * blocks, FUSED_PROGRAMS))
                config = {**base, "BD": bd, "KP": top_k_width(16), "ints": "div16"}
                out.append(Launch(calls[0], "kde_triton._fused_kernel", config, blocks * cdiv(tiles, per)))
                continue
            bb = kde_query_block(b)
            tiles, blocks, cols = cdiv(rows, KDE_BN), cdiv(b, bb), cdiv(d, KDE_BD)
            splits = max(1, min(tiles, 128 // max(1, blocks * cols)))
            config = {**base, "BB": bb, "ints": "div16"}
            out += [Launch(calls[0], "kde_triton._logits_kernel", config, blocks * tiles),
                    Launch(calls[1], "kde_triton._wsum_kernel", config, blocks * cols * splits)]
    return out


def kde_model(rows: list[dict]) -> list[dict]:
    """Per KDE launch and modelled target in compile-check ``rows`` (one Triton release): registers,
    blocks per SM, occupancy, the roofline bound and the predicted time in microseconds.

    predicted = bound x max(1, HIDE_WARPS x SMs / warps in flight) x tail: fewer resident warps than
    HIDE_WARPS per SM scale the time up; with more programs than slots (SMs x blocks per SM), a partly
    filled last wave adds its share, tail = waves x slots / programs (else 1)."""
    found = {(r["kernel"], r["target"], json.dumps(r["config"], sort_keys=True)): r for r in rows}
    out = []
    for launch in kde_launches():
        for target, (gpu, sms, _) in SM.items():
            r = found.get((launch.kernel, target, json.dumps(launch.config, sort_keys=True)))
            if r is None or r["n_regs"] is None:
                continue
            if "options" not in r:
                raise ValueError("compile-check rows without launch options (an older geosample wrote them): "
                                 "rerun python -m geosample.kernels.compile_check --json")
            warps = r["options"]["num_warps"]
            blocks = blocks_per_sm(r["n_regs"], warps, r["shared_bytes"], target)
            slots = sms * blocks
            in_flight = min(launch.programs, slots) * warps
            bound, kind = launch.call.bound_us(gpu)
            tail = cdiv(launch.programs, slots) * slots / launch.programs if launch.programs > slots else 1.0
            predicted = bound * max(1.0, HIDE_WARPS * sms / in_flight) * tail
            out.append({"triton": r["triton"], "kernel": launch.kernel.split(".")[-1], "shape": launch.call.shape,
                        "config": {k: v for k, v in launch.config.items() if k not in ("storage", "ints")},
                        "target": target, "gpu": gpu, "n_regs": r["n_regs"], "n_spills": r["n_spills"],
                        "num_warps": warps, "blocks_per_sm": blocks, "occupancy": blocks * warps / 64,
                        "programs": launch.programs, "bound_us": bound, "bound": kind, "predicted_us": predicted})
    return out


def format_kde_model(model: list[dict]) -> str:
    """The KDE launch model as a markdown table, one row per launch and target."""
    lines = ["| Triton | kernel | shape | config | target (GPU) | regs | spills | warps | blocks/SM | occupancy "
             "| programs | bound (us) | predicted (us) |", "|" + "---|" * 13]
    for m in model:
        config = " ".join(f"{k}={v}" for k, v in m["config"].items())
        lines.append(f"| {m['triton']} | {m['kernel']} | {m['shape']} | {config} | {m['target']} ({m['gpu']}) | "
                     f"{m['n_regs']} | {m['n_spills']} | {m['num_warps']} | {m['blocks_per_sm']} | "
                     f"{m['occupancy']:.0%} | {m['programs']} | {m['bound_us']:.0f} {m['bound'][0]} | "
                     f"{m['predicted_us']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m geosample.kernels.roofline", description=__doc__.split("\n")[0])
    p.add_argument("rows", nargs="*", help="compile-check JSON files (compile_check --json), one per Triton release")
    p.add_argument("--markdown", metavar="FILE", help="also write the KDE launch model to FILE")
    a = p.parse_args(argv)
    print(format_model())
    if not a.rows:
        return 0
    model = [m for path in a.rows for m in kde_model(json.load(open(path)))]
    table = format_kde_model(model)
    print()
    print(table)
    if a.markdown:
        with open(a.markdown + ".tmp", "w") as f:     # written whole, then renamed: never half a table
            f.write(table + "\n")
        os.replace(a.markdown + ".tmp", a.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
