"""KDE denoiser speed: cpu exact vs the sgemm roofline, naive cdist+softmax+matmul, per-sample loop.

Default (CI): a tiny problem, so ``pytest benchmarks/bench_kde.py --benchmark-disable`` is quick.
``GEOSAMPLE_BENCH_FULL=1``: CIFAR size N = 50,000, D = 3072 (the decoded CIFAR-10 cache when
present, else seeded random data), B in {16, 64, 256}, sigma in {80, 1, 0.02}.
``python benchmarks/bench_kde.py`` measures every ratio in one process and writes
benchmarks/results/kde_cpu.json and kde_cpu.md.
CUDA only (skipped without a GPU): the triton backend vs naive torch, the chunked torch stream
(backend "cpu" on CUDA tensors) and scaled_dot_product_attention, at N = 1e6 synthetic D = 64
(the fused small-D kernel) and CIFAR size N = 50,000, D = 3072; TFLOP/s = 4 B N D / time.
"""
from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import geosample as gs
from geosample import data as gsdata
from geosample._io import atomic_write_text

FULL = os.environ.get("GEOSAMPLE_BENCH_FULL") == "1"
BATCHES = (16, 64, 256) if FULL else (4, 16)
SIGMAS = (80.0, 1.0, 0.02)
LOOP_SUBSET = 4


def dataset():
    """[N, D] float32: CIFAR-10 (cached decode) at full size, else seeded random."""
    if FULL:
        try:
            return gsdata.load_dataset("cifar10").reshape(50000, -1), "cifar10"
        except (FileNotFoundError, ValueError):
            pass
    n, d = (50000, 3072) if FULL else (2000, 192)
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, d, generator=g) * 2 - 1, "random"


def queries(y, b, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, y.shape[0], (b,), generator=g)
    return y[idx.to(y.device)] + sigma * torch.randn(b, y.shape[1], generator=g).to(y.device)


def naive(y, x, sigma):
    """cdist + softmax + matmul: materialises the [B, N] matrix."""
    return torch.softmax(-torch.cdist(x, y) ** 2 / (2 * sigma ** 2), dim=1) @ y


def per_sample(y, x, sigma):
    """The reference implementation's style: one query at a time, direct differences."""
    out = []
    for xi in x:
        w = torch.softmax(-((xi[None] - y) ** 2).sum(1) / (2 * sigma ** 2), dim=0)
        out.append(w @ y)
    return torch.stack(out)


def timeit(fn, repeat=3):
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def sgemm_rate(b, n, d, repeat=3):
    """float32 matmul FLOP/s of torch.mm at the KDE's shapes ([B, D] x [D, N] and [B, N] x [N, D])."""
    g = torch.Generator().manual_seed(2)
    x, y, p = torch.randn(b, d, generator=g), torch.randn(n, d, generator=g), torch.rand(b, n, generator=g)
    t = timeit(lambda: (torch.mm(x, y.T), torch.mm(p, y)), repeat)
    return 4 * b * n * d / t


@pytest.fixture(scope="module")
def problem():
    y, _ = dataset()
    return y, gs.KDEDenoiser(y, backend="cpu")


@pytest.mark.parametrize("b", BATCHES)
@pytest.mark.parametrize("sigma", SIGMAS)
def test_cpu_exact(benchmark, problem, b, sigma):
    y, kde = problem
    x = queries(y, b, sigma)
    out = benchmark(kde, x, sigma)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("b", BATCHES)
def test_naive(benchmark, problem, b):
    y, _ = problem
    x = queries(y, b, 1.0)
    assert torch.isfinite(benchmark(naive, y, x, 1.0)).all()


CUDA = torch.cuda.is_available()
GPU_PROBLEMS = {"synthetic_1e6_d64": (1_000_000, 64), "cifar_50k_d3072": (50000, 3072)}


@functools.lru_cache(maxsize=2)
def gpu_problem(name):
    """[N, D] float32 on CUDA: CIFAR-10 (cached decode) when present at CIFAR size, else seeded random."""
    n, d = GPU_PROBLEMS[name]
    y = None
    if d == 3072:
        try:
            y = gsdata.load_dataset("cifar10").reshape(n, d)
        except (FileNotFoundError, ValueError):
            pass
    if y is None:
        y = torch.rand(n, d, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return torch.as_tensor(y).cuda()


def sdpa(y, x, sigma):
    """softmax((x.y - |y|^2/2) / sigma^2) y as one attention head: q = [x / sigma^2, -1 / (2 sigma^2)],
    k = [y, |y|^2], v = y, scale 1."""
    q = torch.cat([x / sigma ** 2, x.new_full((x.shape[0], 1), -0.5 / sigma ** 2)], 1)
    k = torch.cat([y, (y * y).sum(1, keepdim=True)], 1)
    return torch.nn.functional.scaled_dot_product_attention(q[None, None], k[None, None], y[None, None], scale=1.0)[0, 0]


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("name", list(GPU_PROBLEMS))
@pytest.mark.parametrize("method", ["triton", "naive", "chunked", "sdpa"])
@pytest.mark.parametrize("b", (16, 256))
@pytest.mark.parametrize("sigma", (1.0, 0.02))
def test_gpu(benchmark, name, method, b, sigma):
    y = gpu_problem(name)
    x = queries(y, b, sigma)
    if method in ("triton", "chunked"):                     # chunked: the streaming torch path on CUDA
        fn = gs.KDEDenoiser(y, backend="triton" if method == "triton" else "cpu")
    else:
        fn = functools.partial(naive if method == "naive" else sdpa, y)

    def run():
        out = fn(x, sigma)
        torch.cuda.synchronize()
        return out

    run()                                                   # compile / copy to the device outside the timing
    out = benchmark(run)
    assert out.shape == x.shape and torch.isfinite(out).all()
    n, d = y.shape
    benchmark.extra_info.update(N=n, D=d, B=b, device=torch.cuda.get_device_name())
    if benchmark.stats is not None:
        benchmark.extra_info["tflops"] = 4 * b * n * d / benchmark.stats.stats.mean / 1e12


def measure():
    """All ratios in one process; returns the result record."""
    y, source = dataset()
    n, d = y.shape
    kde = gs.KDEDenoiser(y, backend="cpu")
    rows = []
    for b in BATCHES:
        rate = sgemm_rate(b, n, d)
        roof = 4 * b * n * d / rate
        t_naive = timeit(lambda: naive(y, queries(y, b, 1.0), 1.0))
        xs = queries(y, LOOP_SUBSET, 1.0)
        t_loop = timeit(lambda: per_sample(y, xs, 1.0), repeat=1) * b / LOOP_SUBSET
        for sigma in SIGMAS:
            x = queries(y, b, sigma)
            t = timeit(lambda: kde(x, sigma))
            rows.append(dict(B=b, sigma=sigma, cpu_exact_s=t, roofline_s=roof, sgemm_gflops=rate / 1e9,
                             naive_s=t_naive, per_sample_loop_s=t_loop, vs_roofline=t / roof,
                             speedup_vs_naive=t_naive / t, speedup_vs_loop=t_loop / t))
            print(rows[-1], flush=True)
    return dict(date=datetime.date.today().isoformat(), machine=platform.machine(),
                processor=platform.processor() or platform.platform(), cpu_count=os.cpu_count(),
                torch_threads=torch.get_num_threads(), torch=torch.__version__, numpy=np.__version__,
                python=sys.version.split()[0], data=source, N=n, D=d, chunk_size=kde.chunk_size,
                per_sample_loop_note=f"timed on {LOOP_SUBSET} queries and scaled to B", rows=rows)


def write(result, out_dir):
    atomic_write_text(out_dir / "kde_cpu.json", json.dumps(result, indent=1))
    lines = [f"# KDE denoiser, cpu exact backend ({result['date']})", "",
             f"{result['processor']}, {result['cpu_count']} cores ({result['torch_threads']} torch threads), "
             f"torch {result['torch']}, numpy {result['numpy']}, Python {result['python']}; "
             f"data {result['data']} N={result['N']} D={result['D']}, chunk {result['chunk_size']}. "
             f"Per-sample loop {result['per_sample_loop_note']}.", "",
             "| B | sigma | cpu exact (ms) | roofline (ms) | x roofline | naive (ms) | vs naive | loop (s) | vs loop |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['B']} | {r['sigma']:g} | {1e3 * r['cpu_exact_s']:.0f} | {1e3 * r['roofline_s']:.0f} | "
                     f"{r['vs_roofline']:.2f} | {1e3 * r['naive_s']:.0f} | {r['speedup_vs_naive']:.1f}x | "
                     f"{r['per_sample_loop_s']:.1f} | {r['speedup_vs_loop']:.0f}x |")
    atomic_write_text(out_dir / "kde_cpu.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    write(measure(), Path(__file__).parent / "results")
